"""Encode / decode throughput, peak memory and scaling of atoken, side by side with the
tokenizers users would pick instead (diffusers' SD-VAE for images, a diffusers video VAE for
videos), all measured in one process on the same inputs with random weights (speed and memory
do not depend on the weights). Issue #7.

    pip install diffusers   # the `bench` extra
    python benchmarks/throughput.py                  # CPU, tiny + base: ~9 min on 2 shared cores
    python benchmarks/throughput.py --quick          # smoke run, small inputs, one call each (~30 s)
    python benchmarks/throughput.py --device cuda --dtype bf16 --flavors tiny,base,so400m
    python benchmarks/throughput.py --device cuda --dtype bf16 --flavors atoken-so-c --cases images   # Apple's architecture
    python benchmarks/throughput.py --cases images,scaling --flavors base --video-vae wan

Cases (``--cases``: names, or the groups images, videos, 3d, scaling):
  image256, image512, image1024   ``--batch`` images of that side (1 on CPU, 8 on CUDA)
  video17                         17 frames at 256^2, whole clip at once (full attention)
  video65                         65 frames at 256^2, temporal tiling (``--tile`` temporal blocks per tile)
  3d                              one asset (icosphere, ``--voxels`` 64^3 grid, ``--views`` views of
                                  ``--view-size`` px, 128 on CPU / 512 on CUDA); decode = decoder + Gaussian
                                  head + rendering every view
  scale-images                    encode time and peak memory vs image side, 128..1024, one image
  scale-videos                    tiled encode + decode peak memory vs video length 1x, 4x, 16x of 17
                                  frames (``--scale-video-side``, 128 on CPU / 256 on CUDA)
Baselines: ``--image-vae sd-vae`` (diffusers AutoencoderKL, vs_sd_vae.py's SD config) and
``--video-vae ltx`` (AutoencoderKLLTXVideo; or wan, cogvideox: several minutes per 17-frame call
on 2 CPU cores), each from its default config. On CPU, calls of minutes each are left out unless
``--full``: SD-VAE at 1024^2, the video VAE on 65 frames, 3D at 64^3 for
flavours beyond tiny; the output lists what was skipped.

Encode = patchify (pixels -> tokens) + encoder + bottleneck mean; decode = decoder + pixel
head + unpatchify (pixels out), so both sides go pixels -> latent -> pixels. The 3D
back-projection of the input views onto voxels is data preparation, timed and printed apart.
Progress goes to stderr, the report (markdown tables) to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _timing import PeakMemory, median_seconds

from atoken_core.flavors import FLAVORS
from atoken_core.model import AToken
from atoken_core.plugin_manager import get_registries
from atoken_modalities.gaussians import GAUSSIAN_PARAMS
from atoken_modalities.image import ImageConfig
from atoken_modalities.image_impl import ImageModality
from atoken_modalities.objects import ThreeDConfig
from atoken_modalities.video import VideoConfig
from atoken_modalities.video_impl import VideoModality

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # image | video | 3d
    side: int = 0
    frames: int = 0
    tiled: bool = False
    voxels: int = 0

    @property
    def group(self) -> str:
        return {"image": "images", "video": "videos", "3d": "3d"}[self.kind]


def make_cases(quick: bool, voxels: int) -> list[Case]:
    if quick:
        return [Case("image64", "image", 64), Case("video9", "video", 64, 9),
                Case("video17-tiled", "video", 32, 17, tiled=True),
                Case("3d", "3d", voxels=voxels)]
    return [Case("image256", "image", 256), Case("image512", "image", 512), Case("image1024", "image", 1024),
            Case("video17", "video", 256, 17), Case("video65", "video", 256, 65, tiled=True),
            Case("3d", "3d", voxels=voxels)]


# ---------------------------------------------------------------------------- timing


@dataclass
class Measure:
    seconds: float
    timed: int  # calls timed after the warm-up; 0 = the warm-up call is the measurement (slow cases)
    peak_mib: float | None

    def fmt_s(self) -> str:
        return f"{self.seconds:.3f}" + ("*" if self.timed == 0 else "")


class Bench:
    """The first call is the warm-up; it gives the peak memory and the output later steps use (the
    latent a decode starts from). Then the median of up to ``repeats`` timed calls: through
    ``_timing.median_seconds`` (one more warm-up) for calls under 1 s, else as many as fit
    ``budget`` seconds (at least one). A warm-up slower than ``single`` seconds is the measurement
    itself (marked *)."""

    def __init__(self, device: torch.device, repeats: int, budget: float, single: float) -> None:
        self.device, self.repeats, self.budget, self.single = device, repeats, budget, single
        self.memory = PeakMemory(device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(self, fn: Callable[[], Any]) -> tuple[Measure, Any]:
        def call() -> None:
            fn()
            self._sync()

        out, first, peak = self.memory.run(fn)
        if first >= self.single or self.repeats < 1:
            return Measure(first, 0, peak), out
        if first < 1.0:
            return Measure(median_seconds(call, self.repeats), self.repeats, peak), out
        n = min(self.repeats, max(1, int(self.budget // first)))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return Measure(statistics.median(times), n, peak), out


# ---------------------------------------------------------------------------- models


def build_ours(name: str, device: torch.device, dtype: torch.dtype, head_3d: int) -> AToken:
    fl = FLAVORS[name]
    kl = get_registries()["bottleneck"].get("kl")
    model = AToken(fl, kl.build(kl.config(), in_dim=fl.width, latent_dim=fl.latent_dim or 32))
    model.add_head("3d", head_3d)
    model = model.to(device=device, dtype=dtype).eval()
    model.rope.freqs = model.rope.freqs.float()  # rotation angles stay fp32 under bf16 weights
    return model


def build_sd_vae():
    from vs_sd_vae import sd_vae  # the same Stable Diffusion configuration as benchmarks/vs_sd_vae.py

    return sd_vae()


VIDEO_VAES = {
    # name: (diffusers class, description); each from its default config = the released model's architecture
    "ltx": ("AutoencoderKLLTXVideo", "LTX-Video VAE (diffusers AutoencoderKLLTXVideo, default config)"),
    "wan": ("AutoencoderKLWan", "Wan 2.1 VAE (diffusers AutoencoderKLWan, default config)"),
    "cogvideox": ("AutoencoderKLCogVideoX", "CogVideoX VAE (diffusers AutoencoderKLCogVideoX, default config)"),
}


def build_video_vae(name: str):
    import diffusers

    return getattr(diffusers, VIDEO_VAES[name][0])().eval()


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


# ---------------------------------------------------------------------------- inputs


def image_input(side: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(side)
    return (torch.rand(batch, 3, side, side, generator=g) * 2 - 1).to(device, dtype)


def video_input(frames: int, side: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(frames * 1000 + side)
    return (torch.rand(frames, 3, side, side, generator=g) * 2 - 1).to(device, dtype)  # (T, C, H, W)


def make_3d_asset(voxels: int, views: int, size: int):
    from atoken_modalities.cameras import sphere_cameras
    from atoken_modalities.objects_impl import make_asset, prepare_mesh

    mesh = prepare_mesh("primitive://icosphere", 0)
    return make_asset(mesh, sphere_cameras(views, 2.0, 40.0, size), voxels)


# ---------------------------------------------------------------------------- our encode / decode


Coder = tuple[Callable[[], Any], Callable[[Any], Callable[[], Any]], Callable[[Any], int], str]


def ours_fns(model: AToken, case: Case, x: Any, tile: int) -> Coder:
    """(encode, decode_from(encode's output), tokens(encode's output), note) for one case."""
    spec = model.spec
    tp = spec.temporal_patch
    if case.kind == "3d":  # x = (tokens already back-projected and on the device, meta, modality)
        patches, meta, mod = x

        def encode():
            return patches.with_features(model.encode_latent(patches))

        def decode_from(latent):
            def decode():
                raw = model.decode(latent, head="3d").float()  # Gaussians and rendering in fp32
                return mod.unpatchify(latent.with_features(raw), meta, spec)
            return decode

        return encode, decode_from, lambda latent: latent.num_tokens, "decode renders every view"

    mod = ImageModality(ImageConfig()) if case.kind == "image" else VideoModality(VideoConfig())
    samples = list(x) if case.kind == "image" else [x]
    frames = 1 if case.kind == "image" else tp
    if case.tiled:
        def encode():
            tok = mod.patchify(samples, spec)
            return tok, tok.patches.with_features(model.encode_latent_tiled(tok.patches, tile))

        def decode_from(out):
            tok, latent = out
            return lambda: mod.unpatchify(latent.with_features(model.decode_tiled(latent, tile, tp)), tok.meta, spec)

        note = f"temporal tiling: tiles of {tile} temporal blocks ({tile * tp} frames), KV cache of the previous tile"
    else:
        def encode():
            tok = mod.patchify(samples, spec)
            return tok, tok.patches.with_features(model.encode_latent(tok.patches))

        def decode_from(out):
            tok, latent = out
            return lambda: mod.unpatchify(latent.with_features(model.decode(latent, frames)), tok.meta, spec)

        note = "full attention per image" if case.kind == "image" else "whole clip at once (full attention)"
    return encode, decode_from, lambda out: out[1].num_tokens, note


def prepare_3d(case: Case, args, bench: Bench, device: torch.device, dtype: torch.dtype, spec) -> tuple[Any, Measure, dict]:
    """Render the asset's views (not timed), then back-project them onto its voxels (timed, on CPU)."""
    from atoken_modalities.objects_impl import ThreeDModality

    t0 = time.perf_counter()
    asset = make_3d_asset(case.voxels, args.views, args.view_size)
    log(f"3d asset rendered ({time.perf_counter() - t0:.1f}s): {len(asset.voxels)} surface voxels")
    mod = ThreeDModality(ThreeDConfig())
    prep, tok = bench.measure(lambda: mod.patchify([asset], spec))
    patches = tok.patches.to(device)
    patches = patches.with_features(patches.features.to(dtype))
    info = {"voxels": len(asset.voxels), "gaussians": patches.num_tokens * mod.config.gaussians_per_voxel}
    return (patches, tok.meta, mod), prep, info


# ---------------------------------------------------------------------------- their encode / decode


def theirs_fns(vae, case: Case, x: torch.Tensor) -> Coder:
    inp = x if case.kind == "image" else x.permute(1, 0, 2, 3)[None]  # video (T, C, H, W) -> (1, C, T, H, W)

    def encode():
        return vae.encode(inp).latent_dist.mode()

    def decode_from(z):
        return lambda: vae.decode(z).sample

    # "tokens" of a conv VAE = its latent positions (all but the channel axis)
    return encode, decode_from, lambda z: z[:, 0].numel(), ""


# ---------------------------------------------------------------------------- report


def machine_line(device: torch.device, dtype_name: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        visible = len(os.sched_getaffinity(0))
    except AttributeError:
        visible = os.cpu_count()
    dev = "cpu"
    if device.type == "cuda":
        dev = f"cuda ({torch.cuda.get_device_name(device)}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
    try:
        import diffusers

        dver = diffusers.__version__
    except ImportError:
        dver = "not installed"
    return (f"machine: {cpu}, {visible} cores visible ({os.cpu_count()} in the machine), torch threads "
            f"{torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, diffusers {dver}; "
            f"device {dev}; dtype {dtype_name}; no_grad")


def fmt_rate(n: float) -> str:
    return f"{n:,.0f}" if n >= 100 else f"{n:.2f}"


def fmt_mib(m: float | None) -> str:
    return "n/a" if m is None else f"{m:,.0f}"


def cpu_skip(device: torch.device, full: bool, model: str, case: Case) -> str | None:
    """Why a (model, case) pair is left out of a CPU run without --full (or None): cases of minutes each."""
    if device.type != "cpu" or full:
        return None
    if model == "SD-VAE" and case.side >= 1024:
        return "SD-VAE at 1024^2 on CPU: minutes per call"
    if model in ("LTX", "Wan", "CogVideoX") and case.frames > 32:
        return f"{model} with {case.frames} frames on CPU: minutes per call"
    if case.kind == "3d" and model not in ("atoken tiny",) and case.voxels >= 64:
        return f"{model} 3d at {case.voxels}^3 on CPU: ~14k tokens of full attention, minutes per call"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavors", default="tiny,base", help="comma list of atoken flavours (tiny, base, so400m, atoken-so-c, ...)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and inputs of every model")
    ap.add_argument("--quick", action="store_true", help="small inputs, one call each: a smoke run")
    ap.add_argument("--full", action="store_true",
                    help="on CPU, also run what takes minutes per call: SD-VAE at 1024^2, "
                         "the video VAE on 65 frames, 3D at 64^3 for flavours beyond tiny")
    ap.add_argument("--cases", default="images,videos,3d,scaling",
                    help="comma list of case names (image256, ..., scale-images, scale-videos) or groups "
                         "(images, videos, 3d, scaling)")
    ap.add_argument("--batch", type=int, default=None, help="images per call (default: 1 on CPU, 8 on CUDA)")
    ap.add_argument("--tile", type=int, default=2, help="temporal blocks (of 4 frames) per tile for tiled videos")
    ap.add_argument("--voxels", type=int, default=64, help="3D: voxel grid side")
    ap.add_argument("--views", type=int, default=8, help="3D: input views, and views the decoder renders")
    ap.add_argument("--view-size", type=int, default=None, help="3D: view side in pixels (default: 128 on CPU, 512 on CUDA)")
    ap.add_argument("--scale-video-side", type=int, default=None,
                    help="frame side of the video-length scaling (default: 128 on CPU, 256 on CUDA)")
    ap.add_argument("--image-vae", default="sd-vae", choices=["sd-vae", "none"])
    ap.add_argument("--video-vae", default="ltx", choices=[*VIDEO_VAES, "none"])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per measurement after the warm-up")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of timed calls per measurement, at most")
    ap.add_argument("--single", type=float, default=8.0, help="a warm-up slower than this many seconds is the measurement")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    cpu = device.type == "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    batch = args.batch or (1 if cpu else 8)
    args.view_size = args.view_size or (128 if cpu else 512)
    scale_side = args.scale_video_side or (128 if cpu else 256)
    scale_sides, scale_frames = [128, 256, 512, 1024], 17
    if args.quick:
        args.repeats, args.views, args.view_size, args.voxels = 0, 2, 32, 16
        scale_sides, scale_frames, scale_side = [32, 64, 128], 5, 32
    flavors = args.flavors.split(",")
    for name in flavors:
        if name not in FLAVORS:
            sys.exit(f"unknown flavour {name!r} (choose from {', '.join(FLAVORS)})")
    cases = make_cases(args.quick, args.voxels)
    wanted = set(args.cases.split(","))
    known = {c.name for c in cases} | {c.group for c in cases} | {"scaling", "scale-images", "scale-videos"}
    if wanted - known:
        sys.exit(f"unknown --cases {sorted(wanted - known)} (choose from {', '.join(sorted(known))})")
    cases = [c for c in cases if c.name in wanted or c.group in wanted]
    scale_images = bool(wanted & {"scaling", "scale-images"})
    scale_videos = bool(wanted & {"scaling", "scale-videos"})

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    bench = Bench(device, args.repeats, args.budget, args.single)
    header = [
        f"atoken throughput benchmark, {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        machine_line(device, args.dtype),
        f"command: {shlex.join(sys.orig_argv)}",
        f"peak memory: {bench.memory.describe()}",
        ("timing: --quick, one call each (its warm-up, marked *)" if args.quick else
         f"timing: wall clock, one warm-up call (it also gives the peak memory), then the median of up to {args.repeats} "
         f"calls within {args.budget:g} s; '*' = the warm-up alone, for calls slower than {args.single:g} s"),
        "random weights everywhere (speed and memory do not depend on them); atoken latent = tokens x 32 channels, "
        "conv VAE latent = channels x [frames x] height x width; 'tokens/s' of a conv VAE counts its latent positions",
    ]
    for line in header:
        log(line)

    results: dict[tuple[str, str], dict] = {}  # (case, model) -> row
    notes: list[str] = []
    models_line: list[str] = []
    skipped: dict[str, list[str]] = {}

    def skip(model: str, case: Case) -> bool:
        why = cpu_skip(device, args.full, model, case)
        if why:
            skipped.setdefault(why, []).append(case.name)
        return why is not None

    def run_case(label: str, case: Case, coder: Coder, latent_fmt: Callable[[Any], str], note: str) -> None:
        encode, decode_from, count, base_note = coder
        try:
            log(f"{case.name} {label}: encode ...")
            me, out = bench.measure(encode)
            tokens = count(out)
            log(f"{case.name} {label}: encode {me.fmt_s()} s ({tokens} tokens); decode ...")
            md, _ = bench.measure(decode_from(out))
            log(f"{case.name} {label}: decode {md.fmt_s()} s")
        except Exception as err:  # out of memory, a shape a VAE does not take, ...: report and go on
            notes.append(f"{case.name} {label}: failed ({type(err).__name__}: {str(err)[:200]})")
            log(notes[-1])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        results[case.name, label] = {"model": label, "enc": me, "dec": md, "tokens": tokens, "latent": latent_fmt(out),
                                     "note": "; ".join(s for s in (base_note, note) if s), "ref": label.split()[0] != "atoken"}

    def make_input(case: Case) -> torch.Tensor:
        if case.kind == "image":
            return image_input(case.side, batch, device, dtype)
        return video_input(case.frames, case.side, device, dtype)

    # ---- the conv VAEs, once per case
    for kind, which in (("image", args.image_vae), ("video", args.video_vae)):
        kind_cases = [c for c in cases if c.kind == kind]
        if which == "none" or not kind_cases:
            continue
        label = "SD-VAE" if kind == "image" else {"ltx": "LTX", "wan": "Wan", "cogvideox": "CogVideoX"}[which]
        desc = ("SD-VAE (diffusers AutoencoderKL in Stable Diffusion's configuration, as vs_sd_vae.py builds it)"
                if kind == "image" else VIDEO_VAES[which][1])
        kind_cases = [c for c in kind_cases if not skip(label, c)]
        if not kind_cases:
            continue
        try:
            t0 = time.perf_counter()
            vae = build_sd_vae() if kind == "image" else build_video_vae(which)
            vae = vae.to(device)
            if dtype != torch.float32:
                vae = vae.to(dtype)
            log(f"built {desc} in {time.perf_counter() - t0:.1f}s")
        except Exception as err:  # offline without the class's files, a diffusers without it, ...
            notes.append(f"{desc}: could not be built ({type(err).__name__}: {err}); its rows are missing")
            log(notes[-1])
            continue
        models_line.append(f"{label} = {desc}, {millions(n_params(vae))} params")
        mode = "" if kind == "image" else {
            "ltx": "whole clip at once (diffusers default; its framewise tiling off)",
            "wan": "diffusers default: causal chunks of 4 frames with a feature cache",
            "cogvideox": "diffusers default: frame batches with a conv cache"}[which]
        for case in kind_cases:
            run_case(label, case, theirs_fns(vae, case, make_input(case)), lambda z: "x".join(map(str, z.shape[1:])), mode)
        del vae
        gc.collect()

    # ---- atoken, flavour by flavour
    prep_3d: tuple | None = None
    image_scaling: dict[str, list] = {}
    video_scaling: dict[str, list] = {}
    for name in flavors:
        label = f"atoken {name}"
        t0 = time.perf_counter()
        model = build_ours(name, device, dtype, ThreeDConfig().gaussians_per_voxel * GAUSSIAN_PARAMS)
        c = model.num_params()
        models_line.append(f"{label} = {millions(c['encoder'])} encoder + {millions(c['decoder'])} decoder (incl. the "
                           f"3D Gaussian head) + {c['bottleneck'] / 1e3:.0f}k bottleneck, patch {model.spec.patch_size}, "
                           f"temporal patch {model.spec.temporal_patch}")
        log(f"built {label} in {time.perf_counter() - t0:.1f}s")
        for case in cases:
            if skip(label, case):
                continue
            note = ""
            if case.kind == "3d":
                if prep_3d is None:
                    prep_3d = prepare_3d(case, args, bench, device, dtype, model.spec)
                x, prep, info = prep_3d
                note = (f"{info['voxels']:,} surface voxels, {info['gaussians']:,} Gaussians, {args.views} views of "
                        f"{args.view_size}^2 rendered by the {render_backend(device)} rasteriser; back-projection "
                        f"(data preparation on CPU, not in encode) {prep.fmt_s()} s")
            else:
                x = make_input(case)
            run_case(label, case, ours_fns(model, case, x, args.tile), lambda out: f"{count_tokens(out)}x32", note)
            del x
        probe = Case("scale-images", "image", 1024)
        if scale_images and not skip(label, probe):
            rows = []
            for side in scale_sides:
                r = results.get((f"image{side}", label))
                if batch == 1 and r is not None:
                    rows.append((side, r["tokens"], r["enc"]))
                    continue
                log(f"scale-images {label}: {side}^2 ...")
                encode, _, count, _ = ours_fns(model, Case(f"image{side}", "image", side),
                                               image_input(side, 1, device, dtype), args.tile)
                m, out = bench.measure(encode)
                rows.append((side, count(out), m))
            image_scaling[name] = rows
        probe = Case("scale-videos", "video", scale_side, 16 * scale_frames, tiled=True)
        if scale_videos and not skip(label, probe):
            rows = []
            for mult in (1, 4, 16):
                frames = scale_frames * mult
                tok = VideoModality(VideoConfig()).patchify([video_input(frames, scale_side, device, dtype)], model.spec)

                def both(p=tok.patches, tile=args.tile, m=model):
                    latent = p.with_features(m.encode_latent_tiled(p, tile))
                    return m.decode_tiled(latent, tile, m.spec.temporal_patch)

                log(f"scale-videos {label}: {frames} frames ({tok.patches.num_tokens} tokens), tiled encode + decode ...")
                m, out = bench.measure(both)
                rows.append((mult, frames, tok.patches.num_tokens, tok.patches.features.nbytes / 2**20,
                             out.nbytes / 2**20, m))
                del tok, out
            video_scaling[name] = rows
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for why, names in skipped.items():
        notes.append(f"skipped: {why} ({', '.join(dict.fromkeys(names))}); --full runs them")

    # ---- report
    out = [f"# {h}" for h in header] + [f"# models: {m}" for m in models_line] + [""]
    if cases:
        out += ["## Encode / decode throughput (samples/s per single sample; peak MiB as in the header; "
                "'time / ref' = atoken time / the conv VAE's time on the same input)", "",
                "| case | model | latent | encode s | decode s | enc samples/s | dec samples/s | enc tokens/s | "
                "dec tokens/s | enc peak MiB | dec peak MiB | time / ref: enc, dec, enc+dec | notes |",
                "|" + "---|" * 13]
        for case in cases:
            per_call = batch if case.kind == "image" else 1
            rows = sorted((r for (c, _), r in results.items() if c == case.name), key=lambda r: not r["ref"])
            ref = next((r for r in rows if r["ref"]), None)
            desc = {"image": f"{case.side}^2 x{batch}", "video": f"{case.frames} frames {case.side}^2",
                    "3d": f"{case.voxels}^3 voxels"}[case.kind]
            for r in rows:
                e, d = r["enc"], r["dec"]
                ratio = "1" if r["ref"] else "-"
                if ref is not None and not r["ref"]:
                    re_, rd = ref["enc"].seconds, ref["dec"].seconds
                    ratio = f"{e.seconds / re_:.3f}, {d.seconds / rd:.3f}, {(e.seconds + d.seconds) / (re_ + rd):.3f}"
                out.append(f"| {case.name} ({desc}) | {r['model']} | {r['latent']} | {e.fmt_s()} | {d.fmt_s()} | "
                           f"{fmt_rate(per_call / e.seconds)} | {fmt_rate(per_call / d.seconds)} | "
                           f"{fmt_rate(r['tokens'] / e.seconds)} | {fmt_rate(r['tokens'] / d.seconds)} | "
                           f"{fmt_mib(e.peak_mib)} | {fmt_mib(d.peak_mib)} | {ratio} | {r['note']} |")
        out.append("")
    for name, rows in image_scaling.items():
        side0, tok0, m0 = rows[0]
        out += [f"## Scaling: encode vs image side, atoken {name}, one image per call (relative to {side0}^2: a flat "
                "'per token' column = linear in tokens; a flat 'per token^2' column = quadratic)", "",
                "| side | tokens | encode s | peak MiB | s per token (rel.) | s per token^2 (rel.) | MiB per token (rel.) "
                "| MiB per token^2 (rel.) |", "|" + "---|" * 8]
        for side, tok, m in rows:
            n, rt = tok / tok0, m.seconds / m0.seconds
            mem = ("n/a", "n/a")
            if m.peak_mib is not None and m0.peak_mib:
                rm = m.peak_mib / m0.peak_mib
                mem = (f"{rm / n:.2f}", f"{rm / n**2:.3f}")
            out.append(f"| {side} | {tok} | {m.fmt_s()} | {fmt_mib(m.peak_mib)} | {rt / n:.2f} | {rt / n**2:.3f} | "
                       f"{mem[0]} | {mem[1]} |")
        out.append("")
    for name, rows in video_scaling.items():
        m0, tok0 = rows[0][-1], rows[0][2]
        work0 = None if m0.peak_mib is None else m0.peak_mib - rows[0][4]
        out += [f"## Scaling: peak memory vs video length under temporal tiling, atoken {name} ({scale_side}^2 frames, "
                f"tiles of {args.tile} temporal blocks, encode + decode in one call from patchified input to decoded "
                "patches; 'working' = peak minus the decoded output, which grows with the video by necessity)", "",
                "| duration | frames | tokens | input MiB | output MiB | enc+dec s | peak MiB | working MiB | "
                "time vs 1x | working vs 1x |", "|" + "---|" * 10]
        for mult, frames, tok, in_mib, out_mib, m in rows:
            work = None if m.peak_mib is None else m.peak_mib - out_mib
            rel = "n/a" if work is None or not work0 or work0 <= 0 else f"{work / work0:.2f}"
            out.append(f"| {mult}x | {frames} | {tok} | {in_mib:,.0f} | {out_mib:,.0f} | {m.fmt_s()} | "
                       f"{fmt_mib(m.peak_mib)} | {fmt_mib(work)} | {m.seconds / m0.seconds:.2f} | {rel} |")
        out.append("")
    if notes:
        out += ["Notes:"] + [f"- {n}" for n in notes]
    log(f"done in {time.perf_counter() - T0:.0f}s")
    print("\n".join(out), flush=True)


def count_tokens(out: Any) -> int:
    return out[1].num_tokens if isinstance(out, tuple) else out.num_tokens


def render_backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "pure-torch"
    from atoken_modalities.gaussians import _gsplat

    fn, why = _gsplat()
    return "gsplat" if fn is not None else f"pure-torch ({why})"


if __name__ == "__main__":
    main()
