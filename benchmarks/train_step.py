"""Training step time, tokens/s and model FLOPs utilisation (MFU), with and without
torch.compile and activation checkpointing. Issue #7.

    python benchmarks/train_step.py                                   # CPU: tiny + base, fp32 (~4 min on 2 cores)
    python benchmarks/train_step.py --flavors so400m --batch 2 --compile off --steps 2
    python benchmarks/train_step.py --device cuda --dtype bf16 --flavors so400m --batch 32
    python benchmarks/train_step.py --quick                           # smoke run (~1 min)

One step = what the trainer does for an image stage with the reconstruction losses: patchify a
batch of ``--batch`` random ``--side``^2 images, ``forward_all`` (encoder, KL bottleneck with
sampling, decoder, pixel head) under bf16 autocast when ``--dtype bf16`` (the trainer's
single-GPU mixed precision: fp32 master weights), L1 + 1e-8 KL, backward, AdamW. Perceptual and
semantic losses are left out: their networks are not the tokenizer's FLOPs (cpu_step.py shows
what they add). Every configuration gets a freshly built model; ``--warmup`` steps (compilation
happens there, timed apart), then the median of ``--steps`` timed steps.

Model FLOPs per step = 3 x ``atoken_core.estimate.forward_flops`` (matmuls and attention; the
convention of PaLM/torchtitan: recomputation under activation checkpointing is not counted, so
checkpointing lowers MFU). tests/test_estimate.py checks that count against torch's own
FlopCounterMode for the forward and for forward + backward. MFU = achieved model FLOP/s over the
device's peak: on CUDA the dense bf16 tensor-core peak of the GPU from NVIDIA's data sheet (or
``--peak-tflops``); on CPU there is no data-sheet figure, so the peak is measured here: the
best FLOP/s of large square matmuls in the same dtype ("GEMM" column, also printed for CUDA).
Memory ("added GiB"): what one setting adds from before its model is built to the peak of its
warm-up steps (weights, AdamW state, activations, compiled code): CUDA = max_memory_allocated
minus memory_allocated before; CPU = the resident-set high-water mark (VmHWM, reset first) minus
the resident set before. On CPU the settings of a flavour are timed interleaved (``--interleave``:
one step of each per round) so that a drifting machine slows them alike; "best" is the fastest
step, "step" the median. Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import shlex
import statistics
import sys
import time

import torch
from _timing import PeakMemory

from atoken_core.estimate import forward_flops
from atoken_core.flavors import FLAVORS
from atoken_core.interfaces import LossInputs
from atoken_core.model import AToken
from atoken_core.plugin_manager import get_registries
from atoken_modalities.image import ImageConfig
from atoken_modalities.image_impl import ImageModality

T0 = time.perf_counter()

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets. Longest match first.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4), ("H200", 989.4),
                    ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.1)]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str] | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{key} dense bf16 data sheet, {tflops:g} TFLOP/s"
    return None


def gemm_flops_per_s(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], repeats: int = 8) -> float:
    """The best FLOP/s of square matmuls of these sizes over ``repeats`` calls each: the practical
    ceiling of this device and dtype (best, not median: on a shared or boosting CPU the median
    GEMM can fall below what the model's own matmuls reach a minute later)."""
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def build(flavor: str, device: torch.device) -> AToken:
    kl = get_registries()["bottleneck"].get("kl")
    fl = FLAVORS[flavor]
    return AToken(fl, kl.build(kl.config(), in_dim=fl.width, latent_dim=32)).to(device).train()


class Config:
    """One (flavour, compile, activation checkpointing) setting: a fresh model, its optimizer and
    a fixed batch. ``warm_up`` builds and runs the untimed steps and records the memory this
    configuration added (weights, AdamW state, activations, compiled code); ``step`` is one
    timed training step."""

    def __init__(self, args, flavor: str, compiled: bool, checkpointing: bool, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.args, self.flavor, self.compiled, self.ac, self.device, self.dtype = (
            args, flavor, compiled, checkpointing, device, dtype)
        self.times: list[float] = []
        self.losses: list[float] = []

    def warm_up(self) -> None:
        _, _, peak_mib = PeakMemory(self.device).run(self._build_and_warm_up)
        self.mem_gib = None if peak_mib is None else peak_mib / 1024

    def _build_and_warm_up(self) -> None:
        args, device = self.args, self.device
        torch.manual_seed(0)
        self.model = model = build(self.flavor, device)
        model.activation_checkpointing = self.ac
        if self.compiled:
            model.compile_blocks()
        registries = get_registries()
        l1, kl = (registries["loss"].get(k) for k in ("l1", "kl"))
        self.l1, self.kl = l1.build(l1.config()), kl.build(kl.config())
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        self.modality = ImageModality(ImageConfig())
        self.images = [torch.rand(3, args.side, args.side) * 2 - 1 for _ in range(args.batch)]
        self.target = torch.stack(self.images).to(device)
        self.tokens = args.batch * (args.side // model.spec.patch_size) ** 2
        fwd = forward_flops(model.flavor, 32, model.spec.frame_dim, [self.tokens // args.batch] * args.batch)
        self.model_flops = 3 * fwd
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup if args.warmup is not None else (3 if self.compiled else 2)):
            self.step()
        sync(device)
        self.warmup_s = time.perf_counter() - t0

    def step(self) -> float:
        model, device = self.model, self.device
        self.optimizer.zero_grad(set_to_none=True)
        tokens = self.modality.patchify(self.images, model.spec)  # in the step: the trainer patchifies every batch
        with (torch.autocast(device.type, dtype=torch.bfloat16) if self.dtype == torch.bfloat16
              else contextlib.nullcontext()):
            out = model.forward_all(tokens.patches.to(device))
        recons = self.modality.unpatchify(tokens.patches.with_features(out.recon.float()), tokens.meta, model.spec)
        inputs = LossInputs("image", self.target, torch.stack(recons), out.bottleneck)
        loss = sum(self.l1(inputs).values()) + 1e-8 * sum(self.kl(inputs).values())
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())  # the trainer logs it: a host sync every step, as here

    def timed_step(self) -> None:
        t0 = time.perf_counter()
        self.losses.append(self.step())
        sync(self.device)
        self.times.append(time.perf_counter() - t0)
        log(f"  {self.flavor} compile={self.compiled} ac={self.ac}: step {len(self.times)}/{self.args.steps} "
            f"{self.times[-1]:.3f} s")

    def result(self) -> dict:
        return {"flavor": self.flavor, "params": sum(p.numel() for p in self.model.parameters()),
                "compile": self.compiled, "ac": self.ac, "warmup_s": self.warmup_s,
                "step_s": statistics.median(self.times), "best_s": min(self.times), "tokens": self.tokens,
                "model_flops": self.model_flops, "mem_gib": self.mem_gib,
                "finite": all(v == v for v in self.losses)}

    def release(self) -> None:
        del self.model, self.optimizer
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def run_flavor(args, flavor: str, settings: list[tuple[bool, bool]], device: torch.device,
               dtype: torch.dtype) -> list[dict]:
    """Every setting of one flavour. Interleaved: all are built and warmed up, then timed in
    rounds (one step of each per round), so a machine whose speed drifts (a shared VM, CPU boost)
    slows every setting alike and the ratios hold; sequential: one setting at a time (for
    settings that do not fit in memory together)."""
    configs = [Config(args, flavor, c, a, device, dtype) for c, a in settings]
    rows = []
    if args.interleave:
        for cfg in configs:
            log(f"{flavor}: compile={cfg.compiled} activation_checkpointing={cfg.ac}: build + warm-up")
            cfg.warm_up()
        for _ in range(args.steps):
            for cfg in configs:
                cfg.timed_step()
        rows = [cfg.result() for cfg in configs]
        for cfg in configs:
            cfg.release()
        return rows
    for cfg in configs:
        log(f"{flavor}: compile={cfg.compiled} activation_checkpointing={cfg.ac}")
        try:
            cfg.warm_up()
            for _ in range(args.steps):
                cfg.timed_step()
            rows.append(cfg.result())
            cfg.release()
        except torch.OutOfMemoryError as err:
            log(f"{flavor} compile={cfg.compiled} ac={cfg.ac}: out of memory ({err})")
            rows.append({"flavor": flavor, "compile": cfg.compiled, "ac": cfg.ac, "oom": True})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavors", default=None, help="comma list (default: tiny,base on CPU, so400m on CUDA)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: 4 on CPU, 32 on CUDA)")
    ap.add_argument("--side", type=int, default=256, help="image side in pixels (tokens per image = (side/16)^2)")
    ap.add_argument("--compile", default="off,on", help="comma list of off/on")
    ap.add_argument("--ac", default="off", help="activation checkpointing: comma list of off/on")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2, 3 with compile)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: data sheet / GEMM)")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="time the settings of a flavour in alternating rounds (default: on CPU, off on CUDA, "
                         "where all settings of so400m would not fit at once)")
    ap.add_argument("--quick", action="store_true", help="tiny only, batch 2 at 64^2, one timed step: a smoke run")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    flavors = (args.flavors or ("so400m" if cuda else "tiny,base")).split(",")
    if args.quick:
        flavors, args.batch, args.side, args.steps = ["tiny"], 2, 64, args.steps or 1
    args.batch = args.batch or (32 if cuda else 4)
    args.interleave = (not cuda) if args.interleave is None else args.interleave
    args.steps = args.steps or (20 if cuda else 3)
    unknown = [f for f in flavors if f not in FLAVORS]
    if unknown:
        sys.exit(f"--flavors: unknown {unknown}; known: {sorted(FLAVORS)}")
    if args.side % 16:
        sys.exit(f"--side {args.side}: must be a multiple of the patch size 16")

    def onoff(text: str, what: str) -> list[bool]:
        values = {"off": False, "on": True}
        bad = [v for v in text.split(",") if v not in values]
        if bad:
            sys.exit(f"--{what}: expected a comma list of off/on, got {bad}")
        return [values[v] for v in text.split(",")]

    compiles, acs = onoff(args.compile, "compile"), onoff(args.ac, "ac")
    gemm = gemm_flops_per_s(device, dtype, (4096, 8192) if cuda else (1024, 2048, 4096))
    sheet = datasheet_peak(device, dtype)
    if args.peak_tflops:
        peak, peak_src = args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops:g}"
    elif sheet:
        peak, peak_src = sheet
    else:
        peak, peak_src = gemm, f"best measured {args.dtype} GEMM, {gemm / 1e12:.3f} TFLOP/s"

    settings = [(c, a) for c in compiles for a in acs]
    rows = [row for flavor in flavors for row in run_flavor(args, flavor, settings, device, dtype)]

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"command: python benchmarks/train_step.py {shlex.join(sys.argv[1:])}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device {name}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; dtype {args.dtype} "
          f"({'autocast, fp32 master weights' if dtype == torch.bfloat16 else 'weights and compute'})")
    print(f"step: {args.batch} x {args.side}^2 images, L1 + KL, AdamW; warm-up {args.warmup or '2-3'} steps, "
          f"median of {args.steps} ({'interleaved' if args.interleave else 'one setting at a time'}); "
          f"MFU peak: {peak_src}; GEMM: best measured {args.dtype} matmul {gemm / 1e12:.3f} TFLOP/s")
    print()
    print("| flavour | params | compile | act. ckpt | tokens/step | step s | best s | tokens/s | images/s "
          "| model TFLOP/step | TFLOP/s | MFU | vs GEMM | added GiB | warm-up s | step vs first row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    first = None
    for r in rows:
        if r.get("oom"):
            print(f"| {r['flavor']} | | {r['compile']} | {r['ac']} | out of memory |" + " |" * 11)
            continue
        first = first or r["step_s"]
        achieved = r["model_flops"] / r["step_s"]
        mem = "n/a" if r["mem_gib"] is None else f"{r['mem_gib']:.2f}"
        print(f"| {r['flavor']} | {r['params'] / 1e6:.1f}M | {'on' if r['compile'] else 'off'} | "
              f"{'on' if r['ac'] else 'off'} | {r['tokens']:,} | {r['step_s']:.3f} | {r['best_s']:.3f} | "
              f"{r['tokens'] / r['step_s']:,.0f} | "
              f"{args.batch / r['step_s']:.2f} | {r['model_flops'] / 1e12:.3f} | {achieved / 1e12:.3f} | "
              f"{100 * achieved / peak:.1f}% | {100 * achieved / gemm:.1f}% | {mem} | {r['warmup_s']:.1f} | "
              f"{r['step_s'] / first:.2f} |" + ("" if r["finite"] else " (non-finite loss)"))


if __name__ == "__main__":
    main()
