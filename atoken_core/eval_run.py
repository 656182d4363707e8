"""`atoken eval`: reconstruction metrics of a checkpoint on a folder of images, reproducibly.

Everything is deterministic (posterior mean / quantised latents, no sampling), so the same
checkpoint, data and settings give identical numbers on every run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from atoken_core import __version__
from atoken_core.build import build_modality, model_from_checkpoint
from atoken_core.evaluate import SSIM_SETTINGS, image_metrics, mean_metrics, reconstruct_images, save_grid
from atoken_core.imaging import resize_within
from atoken_core.io import atomic_write_bytes
from atoken_core.metrics import InceptionFeatures, codebook_usage, feature_stats, frechet_distance
from atoken_core.registry import Registries

METRICS = ("psnr", "ssim", "lpips", "rfid", "codebook")
EXTENSIONS = [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"]


class EvalError(ValueError):
    pass


def load_folder(data: str) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Every readable image under ``data`` (sorted), and one message per unreadable file."""
    from atoken_modalities.image_impl import ImageError, load_image
    from atoken_modalities.photos_impl import basename, list_images

    samples, skipped = [], []
    for path in list_images(data, EXTENSIONS):
        try:
            samples.append((basename(path), load_image(path)))
        except ImageError as err:
            skipped.append(str(err))
    if not samples:
        raise EvalError(f"{data}: no readable images ({len(skipped)} unreadable)")
    return samples, skipped


def run_eval(ckpt: str, data: str, out: str, registries: Registries, *, metrics: Sequence[str] = ("psnr", "ssim"),
             max_side: int = 512, lpips_weights: str = "auto", inception_weights: str | None = None,
             grid_images: int = 4, progress: bool = True) -> dict[str, Any]:
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise EvalError(f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if "rfid" in metrics and not inception_weights:
        raise EvalError("--metrics rfid needs --inception-weights PATH (a safetensors file of torchvision's "
                        "inception_v3 state dict); nothing is downloaded")
    model, recipe, meta = model_from_checkpoint(ckpt, registries)
    modality = build_modality(recipe, registries, "image")
    samples, skipped = load_folder(data)
    samples = [(n, resize_within(x, max_side=max_side)) for n, x in samples]
    images = [x for _, x in samples]
    recons = reconstruct_images(model, modality, tqdm(images, desc="reconstruct", disable=not progress))

    per_image: dict[str, dict[str, float]] = {}
    for (name, x), r in zip(samples, recons):
        m = image_metrics(x, r)
        per_image[name] = {k: v for k, v in m.items() if k in metrics}
    settings: dict[str, Any] = {"max_side": max_side, "ssim": SSIM_SETTINGS}
    summary: dict[str, Any] = {}
    if "lpips" in metrics:
        from atoken_core.interfaces import BottleneckOutput, LossInputs
        from atoken_losses import LPIPSConfig
        from atoken_losses.perceptual import LPIPSLoss

        lpips = LPIPSLoss(LPIPSConfig(vgg16_weights=lpips_weights))
        with torch.no_grad():
            for (name, x), r in zip(samples, recons):
                inputs = LossInputs("image", x[None], r[None], BottleneckOutput(latent=torch.zeros(0)))
                per_image[name]["lpips"] = float(lpips(inputs)["lpips"])
        settings["lpips"] = f"VGG16 LPIPS v0.1, backbone weights {lpips_weights!r}"
    if per_image and any(per_image.values()):
        summary.update(mean_metrics(list(per_image.values())))
    if "rfid" in metrics:
        net = InceptionFeatures(inception_weights)
        with torch.no_grad():
            real = torch.cat([net(x[None]) for x in images]).double().numpy()
            fake = torch.cat([net(r[None]) for r in recons]).double().numpy()
        summary["rfid"] = frechet_distance(*feature_stats(real), *feature_stats(fake))
        settings["rfid"] = {"network": "torchvision inception_v3 pool features (2048-d), 299x299 bilinear",
                            "weights": inception_weights, "samples": len(images),
                            "note": "not comparable with TF-Inception FID numbers"}
    if "codebook" in metrics:
        if not model.bottleneck.discrete:
            raise EvalError("--metrics codebook needs a discrete (FSQ) checkpoint")
        with torch.no_grad():
            codes = torch.cat([model.bottleneck.latent_to_codes(model.encode_latent(modality.patchify([x], model.spec).patches))
                               for x in images])
        summary["codebook"] = codebook_usage(codes, model.bottleneck.codebook_size)

    report = {
        "atoken_version": __version__, "checkpoint": ckpt, "checkpoint_step": meta["state"]["step"],
        "recipe": recipe.name, "data": data, "n_samples": len(samples), "n_skipped": len(skipped),
        "skipped_first": skipped[:5], "metrics": summary, "settings": settings, "per_image": per_image,
    }
    _write(out, report, samples, recons, grid_images)
    return report


def _write(out: str, report: dict[str, Any], samples, recons, grid_images: int) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    atomic_write_bytes(f"{out}/eval.json", json.dumps(report, indent=2, sort_keys=True).encode())
    rows = [[(f"{n} original", x), ("reconstruction", r)] for (n, x), r in list(zip(samples, recons))[:grid_images]]
    save_grid(rows, f"{out}/grid.png")
    lines = [f"# atoken eval: {report['recipe']} (step {report['checkpoint_step']})", "",
             f"Checkpoint `{report['checkpoint']}`, data `{report['data']}`: {report['n_samples']} images, "
             f"{report['n_skipped']} skipped.", "", "| metric | value |", "|---|---|"]
    for name, value in report["metrics"].items():
        shown = json.dumps(value) if isinstance(value, dict) else f"{value:.4f}"
        lines.append(f"| {name} | {shown} |")
    per = report["per_image"]
    if per:
        cols = sorted(next(iter(per.values())))
        lines += ["", "| image | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |" for n, m in per.items()]
    lines += ["", "![originals and reconstructions](grid.png)", "",
              "Settings: " + json.dumps(report["settings"], sort_keys=True)]
    atomic_write_bytes(f"{out}/report.md", "\n".join(lines).encode())
