"""The ``atoken`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from atoken_core import __version__

EXIT_USAGE = 2


def _registries():
    from atoken_core.plugin_manager import get_registries

    return get_registries()


def cmd_validate(args: argparse.Namespace) -> int:
    from atoken_core.build import check_modalities
    from atoken_core.recipe import load_recipe

    registries = _registries()
    recipe = load_recipe(args.recipe, registries, args.set)
    unchecked = check_modalities(recipe, registries)
    steps = sum(s.steps for s in recipe.stage)
    print(f"{args.recipe}: OK ({len(recipe.stage)} stage(s), {steps} steps, flavor {recipe.model.flavor}, "
          f"bottleneck {recipe.bottleneck.kind}, losses {', '.join(s.kind for s in recipe.loss)})")
    if unchecked:
        print(f"  not run through the model (no Modality.example): {', '.join(unchecked)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from atoken_core.build import check_modalities
    from atoken_core.recipe import load_recipe
    from atoken_core.train import run_recipe

    registries = _registries()
    recipe = load_recipe(args.recipe, registries, args.set)
    check_modalities(recipe, registries)
    if args.dry_run:
        from atoken_core.estimate import dry_run, format_dry_run

        print(format_dry_run(dry_run(recipe, registries)))
        return 0
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(args.nproc)
    report = run_recipe(recipe, registries, args.out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(report, args.out or recipe.resolved_output_dir()))
    _end_distributed()
    return 0


def _end_distributed() -> None:
    """Under torchrun, leave the process group cleanly."""
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch_torchrun(nproc: int) -> int:
    """`atoken run --nproc N ...` = `torchrun --standalone --nproc-per-node N -m atoken_core.cli run ...`
    (one node; for several nodes call torchrun yourself, see recipes/full.toml)."""
    import subprocess

    argv = sys.argv[1:]
    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(argv[i])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "atoken_core.cli", *rest]
    return subprocess.call(cmd)


def summary(report: dict[str, Any], out: str) -> str:
    lines = [f"run {report['recipe']!r}: {report['steps']} steps, outputs in {out}"]
    for modality, final in report["final"].items():
        start = report["step_0"][modality]["mean"]
        end = final["mean"]
        lines.append(f"  {modality} held-out PSNR {start['psnr']:.2f} dB at step 0 -> {end['psnr']:.2f} dB "
                     f"(SSIM {start['ssim']:.3f} -> {end['ssim']:.3f})")
        pca = (report.get("pca_baseline") or {}).get(modality)
        if pca:
            lines.append(f"  {modality} PCA baseline ({pca['components']} components): PSNR {pca['mean']['psnr']:.2f} dB, "
                         f"SSIM {pca['mean']['ssim']:.3f}")
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    registries = _registries()
    rows = [
        {"kind": kind, "name": e.component.name, "plugin": e.plugin, "doc": e.component.doc}
        for kind, reg in registries.by_kind.items()
        for e in reg.list()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for kind, reg in registries.by_kind.items():
        print(f"{kind}:")
        for e in reg.list():
            print(f"  {e.component.name:<18} [{e.plugin}] {e.component.doc}")
    return 0


def _pick_modality(tok, requested: str | None, path: str) -> str:
    """--modality, else the checkpoint's modality whose reader takes ``path``'s suffix."""
    if requested:
        return requested
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    owners = [m for m in tok.modalities if suffix in getattr(tok.modality(m), "suffixes", ())]
    if len(owners) == 1:
        return owners[0]
    from atoken_core.api import TokenizerError

    raise TokenizerError(f"{path}: cannot tell which modality reads {suffix or 'it'!r} "
                         f"(checkpoint modalities: {', '.join(tok.modalities)}); pass --modality")


def cmd_encode(args: argparse.Namespace) -> int:
    from atoken_core.extract import ExtractError, ExtractOptions, is_batch_input, run_extract

    if is_batch_input(args.input):
        # a folder or tar shards -> OUT/part-*.safetensors, stats.json, index.json (atoken_core/extract.py)
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            import torch

            gpus = torch.cuda.device_count()
            if gpus and args.nproc > gpus:
                raise ExtractError(f"--nproc {args.nproc}: this machine has {gpus} GPU(s); one process per GPU")
            return launch_torchrun(args.nproc)
        options = ExtractOptions(inputs=list(args.input), out=args.output, ckpt=args.ckpt, modality=args.modality,
                                 shard_samples=args.shard_samples, device=args.device,
                                 progress=not args.no_progress, workers=args.workers)
        try:
            run_extract(options)
        finally:
            _end_distributed()
        return 0
    if args.nproc > 1:
        raise ExtractError("--nproc applies to a data folder or tar shards, not to one file")
    return _encode_one(args, args.input[0])


def _encode_one(args: argparse.Namespace, path: str) -> int:
    """`atoken encode FILE -o TOKENS.safetensors`: one file's tokens."""
    from safetensors.torch import save as st_save

    from atoken_core.api import TokenizerError, load
    from atoken_core.io import atomic_write_bytes

    if os.path.abspath(args.output) == os.path.abspath(args.ckpt):
        raise TokenizerError(f"{args.output}: is the checkpoint itself; refusing to overwrite it")
    tok = load(args.ckpt, device=args.device)
    modality = _pick_modality(tok, args.modality, path)
    enc = tok.encode(path, modality)
    # discrete: the integer codes only (the decoder's latent is a function of them)
    tensors = {"coords": enc.coords.contiguous()}
    if enc.codes is not None:
        tensors["codes"] = enc.codes.contiguous()
    else:
        tensors["latent"] = enc.mean.contiguous()
    if enc.logvar is not None:
        tensors["logvar"] = enc.logvar.contiguous()
    metadata = {
        "format": "atoken-tokens-v1",
        "modality": modality,
        "meta": json.dumps(enc.meta),
        "frames": str(enc.frames),
        "checkpoint": os.path.basename(args.ckpt),
        "checkpoint_step": str(tok.metadata["state"]["step"]),
        "recipe": tok.recipe.name,
        "latent_dim": str(tok.latent_dim),
        "discrete": str(tok.discrete).lower(),
    }
    atomic_write_bytes(args.output, st_save(tensors, metadata=metadata))
    kind = f"{enc.codes.shape[1]} integer codes each" if enc.codes is not None else f"{enc.mean.shape[1]}-channel latents"
    print(f"{path}: {modality}, {enc.num_tokens} tokens ({kind}) -> {args.output}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    import torch

    from atoken_core.api import Encoding, TokenizerError, load
    from atoken_core.checkpoint import CheckpointError
    from atoken_core.io import read_safetensors

    tok = load(args.ckpt, device=args.device)
    try:
        tensors, header = read_safetensors(args.tokens)
    except FileNotFoundError:
        raise CheckpointError(f"{args.tokens}: tokens file not found") from None
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if header.get("format") != "atoken-tokens-v1" or "coords" not in tensors:
        raise CheckpointError(f"{args.tokens}: not an atoken tokens file")
    modality = header["modality"]
    codes = tensors.get("codes")
    mean = tensors.get("latent")
    if mean is None and codes is not None:
        if not tok.discrete:
            raise TokenizerError(f"{args.tokens}: holds discrete codes; {args.ckpt} is a continuous checkpoint")
        mean = tok.model.bottleneck.codes_to_latent(codes)
    if mean is None:
        raise CheckpointError(f"{args.tokens}: holds neither latents nor codes")
    frames = int(header.get("frames", "1"))
    enc = Encoding(modality=modality, coords=tensors["coords"], mean=mean, codes=codes, frames=frames,
                   meta=json.loads(header["meta"]))
    sample = tok.decode(enc)
    mod = tok.modality(modality)
    written = mod.write(mod.from_user(sample), args.output)
    shape = "x".join(str(s) for s in sample.shape) if torch.is_tensor(sample) else ""
    print(f"{args.tokens}: decoded {enc.num_tokens} {modality} tokens -> {', '.join(written)} {shape}".rstrip())
    return 0


def cmd_import_siglip2(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save as st_save

    from atoken_core.flavors import FLAVORS
    from atoken_core.io import atomic_write_bytes
    from atoken_core.model import AToken
    from atoken_core.siglip2 import (
        convert_siglip2_state,
        encoder_state_dict,
        load_siglip2_vision_state,
    )

    flavor = FLAVORS[args.flavor]
    state = load_siglip2_vision_state(args.path)
    tensors = convert_siglip2_state(state, flavor, source=args.path)
    # Check the converted keys and shapes against the real model, built on the meta device so
    # an 800M-parameter flavour costs no memory here.
    kl = _registries()["bottleneck"].get("kl")
    with torch.device("meta"):
        model = AToken(flavor, kl.build(kl.config(), in_dim=flavor.width, latent_dim=32))
    own = encoder_state_dict(model)
    wrong = sorted(set(own) ^ set(tensors)) + [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if wrong:
        raise RuntimeError(f"SigLIP2 conversion does not match AToken's encoder: {', '.join(wrong[:8])}")
    metadata = {"format": "atoken-encoder-v1", "source": args.path, "origin": "siglip2 vision tower",
                "flavor": args.flavor, "atoken_version": __version__}
    atomic_write_bytes(args.output, st_save(tensors, metadata=metadata))
    params = sum(t.numel() for t in tensors.values())
    print(f"{args.path}: SigLIP2 vision tower -> {len(tensors)} encoder tensors ({params:,} parameters, "
          f"flavour {args.flavor}) -> {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from atoken_core.eval_run import EvalOptions, parse_metric_options, run_eval

    options = EvalOptions(
        modality=args.modality, metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        max_side=args.max_side, max_frames=args.max_frames, metric_options=parse_metric_options(args.metric_option),
        inception_weights=args.inception_weights, i3d_weights=args.i3d_weights, teacher=args.teacher,
        prompt=args.prompt, seed=args.seed, probe_test_fraction=args.probe_test_fraction,
        heldout_views=args.heldout_views, grid_images=args.grid_images, progress=not args.no_progress)
    report = run_eval(args.ckpt, args.data, args.out, _registries(), options)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items() if isinstance(v, float))
    print(f"{args.data}: {report['n_samples']} {report['unit']} ({report['n_skipped']} skipped): {shown} -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atoken", description="A unified tokenizer for images, videos and 3D assets.")
    parser.add_argument("--version", action="version", version=f"atoken {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set stage[0].steps=20 (repeatable)")

    p = sub.add_parser("run", help="train (and evaluate) from a recipe")
    p.add_argument("recipe")
    p.add_argument("--out", help="output folder (default: the recipe's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="print parameters, tokens, FLOPs and activation memory per step; build nothing real, run nothing")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (FSDP2 through torchrun; one per GPU, or gloo on CPU)")
    add_set(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe")
    add_set(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plugins", help="list every registered component and its plugin")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    modalities = sorted(_registries()["modality"])
    p = sub.add_parser("eval", help="reconstruction and understanding metrics of a checkpoint on a folder of samples",
                       description="Metrics per modality: `atoken plugins` lists the modalities; each declares the "
                                   "metrics it supports (image: psnr ssim lpips rfid codebook zeroshot retrieval probe; "
                                   "video: rfvd instead of rfid; 3d: psnr ssim lpips codebook); any registered loss "
                                   "name is also a metric. zeroshot and probe read classes from DATA/CLASS/FILE; "
                                   "retrieval reads captions from DATA/captions.json {file: caption} or STEM.txt "
                                   "beside each file.")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True,
                   help="folder (fsspec path or URI) of images, videos, or 3D assets (posed-views folders with "
                        "transforms.json, mesh files); sklearn://digits[?size=32&per_class=N] is scikit-learn's "
                        "1797 labelled 8x8 digits as DATA/CLASS images (no download)")
    p.add_argument("--out", required=True, help="folder for eval.json, report.md and the figures")
    p.add_argument("--modality", choices=modalities,
                   help="what --data holds (default: the checkpoint's modality, when it was trained on one)")
    p.add_argument("--metrics", default="psnr,ssim,lpips", help="comma-separated (see above; default: psnr,ssim,lpips)")
    p.add_argument("--max-side", type=int, default=512, help="downscale images and frames so the longer side is at most this")
    p.add_argument("--max-frames", type=int, default=16, help="video: frames read from the start of each clip (default 16)")
    p.add_argument("--metric-option", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="a setting of a loss-backed metric, e.g. lpips.vgg16_weights=PATH (repeatable)")
    p.add_argument("--inception-weights", help="safetensors of torchvision's inception_v3 state dict (for rfid)")
    p.add_argument("--i3d-weights", help="TorchScript video network for rfvd, called like StyleGAN-V's "
                                         "i3d_torchscript.pt (local path or fsspec URI; nothing is downloaded)")
    p.add_argument("--teacher", help="text tower for zeroshot/retrieval: random | siglip2:PATH "
                                     "(default: the teacher of the checkpoint's recipe)")
    p.add_argument("--prompt", help="zero-shot prompt template with {} for the class name "
                                    "(default: 'a photo of a {}.'; video: 'a video of a {}.')")
    p.add_argument("--seed", type=int, default=0, help="seed of the linear probe's stratified train/test split")
    p.add_argument("--probe-test-fraction", type=float, default=0.25, help="share of samples the probe is tested on")
    p.add_argument("--heldout-views", type=int,
                   help="3d: views each asset is scored on (posed views: its last N; meshes: a ring of N new cameras); "
                        "default: the recipe's eval_views")
    p.add_argument("--grid-images", type=int, default=4,
                   help="samples shown in grid.png and saved under samples/ (default 4)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("encode", help="a file of any registered modality -> tokens (.safetensors); "
                                      "a dataset -> latent shards",
                       description="Deterministic: continuous checkpoints store the posterior mean (and log-variance), "
                                   "discrete ones the integer codes and their latent values. Given a folder, .tar "
                                   "shards or a brace pattern of them, extracts every sample into the folder -o OUT: "
                                   "OUT/part-RRRRR-SSSSS.safetensors (coords, mean, codes for FSQ, offsets), "
                                   "OUT/stats.json (per-channel mean and std) and OUT/index.json; the same command "
                                   "run again continues an interrupted extraction.")
    p.add_argument("--ckpt", required=True, help="any atoken checkpoint (a run's or atoken import-official's)")
    p.add_argument("input", nargs="+",
                   help="the file (local path or fsspec URI); or a dataset: a folder, .tar shards, or a brace "
                        "pattern such as 'shards/{000..009}.tar'")
    p.add_argument("-o", "--output", required=True,
                   help="the tokens file (.safetensors); for a dataset, the output folder")
    p.add_argument("--modality", choices=modalities,
                   help="what the file holds (default: the checkpoint's modality that reads its suffix; for a "
                        "dataset, the checkpoint's only modality)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available; under torchrun each "
                                    "process uses its own GPU)")
    p.add_argument("--shard-samples", type=int, default=1000, help="dataset: samples per output shard (default 1000)")
    p.add_argument("--nproc", type=int, default=1,
                   help="dataset: processes on this machine (through torchrun; one per GPU, or CPU processes)")
    p.add_argument("--workers", type=int, default=4,
                   help="dataset: threads per process reading and decoding samples ahead (default 4)")
    p.add_argument("--no-progress", action="store_true", help="dataset: no progress bar")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="tokens (.safetensors) -> a file in the modality's format (image .png/.jpg, video .mp4, ...)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("tokens")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=cmd_decode)

    # flavors.py needs only attrs: cheap enough to import while building the parser
    from atoken_core.flavors import FLAVORS

    p = sub.add_parser("import-siglip2", help="SigLIP2 vision weights (.safetensors) -> encoder initialisation")
    p.add_argument("path", help="a Siglip2VisionModel or Siglip2Model safetensors file (local path or fsspec URL)")
    p.add_argument("--flavor", default="so400m", choices=list(FLAVORS),
                   help="the flavour the weights must fit (default: so400m)")
    p.add_argument("-o", "--output", required=True, help="where to write the encoder weights (.safetensors)")
    p.set_defaults(func=cmd_import_siglip2)

    # Commands that plugins add (e.g. import-official), found through the same registry mechanism
    from atoken_core.plugin_manager import shared_plugin_manager

    shared_plugin_manager().hook.atoken_add_commands(subparsers=sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What is printed as one line: errors a user can fix (every plugin's derive from UserError)
    and files that are not there."""
    from atoken_core.errors import UserError

    return (UserError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    from atoken_core.errors import UserError

    try:
        parser = build_parser()
    except UserError as err:  # a plugin that cannot load
        print(f"atoken: error: {err}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        hint = {"run": "the last checkpoint on disk is complete; continue with --resume",
                "encode": "every shard on disk is complete; the same command continues"}.get(args.command, "")
        print(f"atoken: interrupted{f' ({hint})' if hint else ''}", file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, _user_errors()):
            print(f"atoken: error: {err}", file=sys.stderr)
            return EXIT_USAGE if type(err).__name__ == "ConfigError" else 1
        raise


if __name__ == "__main__":
    sys.exit(main())
