"""Held-out evaluation: PSNR / SSIM (scikit-image's implementations), the PCA baseline at the
same latent size, and PNG grids of originals beside reconstructions."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from atoken_core.interfaces import Modality, PatchSpec
from atoken_core.io import atomic_write_bytes
from atoken_core.sparse import Sparse4D

SSIM_SETTINGS = "skimage.metrics.structural_similarity, 7x7 uniform window, data_range=1, on the channels mapped to [0, 1]"


def to_unit_hwc(x_chw: torch.Tensor) -> np.ndarray:
    return ((x_chw.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy().astype(np.float64)


def image_metrics(original: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM of an image (C, H, W), or the per-frame mean of a video (T, C, H, W)."""
    if original.ndim == 4:
        return mean_metrics([image_metrics(a, b) for a, b in zip(original, recon)])
    a, b = to_unit_hwc(original), to_unit_hwc(recon)
    return {
        "psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        "ssim": float(structural_similarity(a, b, data_range=1.0, channel_axis=2)),
    }


def mean_metrics(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}


class PCABaseline:
    """The best linear tokenizer of a given size: project each patch onto the top-k principal
    components of the training patches (fitted exactly from the covariance matrix)."""

    def __init__(self, modality: Modality, spec: PatchSpec, components: int) -> None:
        self.modality = modality
        self.spec = spec
        self.k = components

    def fit(self, samples: Iterable[torch.Tensor]) -> PCABaseline:
        # Streamed sums in float64: memory is D x D, not (number of patches) x D.
        n, total, outer = 0, None, None
        for x in samples:
            p = self.modality.patchify([x], self.spec).patches.features.double()
            if total is None:
                total, outer = p.sum(0), p.T @ p
            else:
                total, outer = total + p.sum(0), outer + p.T @ p
            n += p.shape[0]
        if not n:
            raise ValueError("PCA needs at least one training sample")
        self.mean = total / n
        cov = (outer - n * torch.outer(self.mean, self.mean)) / max(1, n - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        self.basis = evecs[:, -self.k :].flip(1).T.contiguous()  # (k, D), leading component first
        self.variance = evals[-self.k :].flip(0).clamp_min(0)  # (k,) variance along each component
        self.explained = float(evals[-self.k :].sum() / evals.sum())
        return self

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.modality.patchify([x], self.spec)
        feats = tokens.patches.features.double() - self.mean
        recon = (feats @ self.basis.T) @ self.basis + self.mean
        return self.modality.unpatchify(tokens.patches.with_features(recon.float()), tokens.meta, self.spec)[0]


def _fit_height(img: Image.Image, height: int) -> Image.Image:
    w = max(1, round(img.width * height / img.height))
    return img.resize((w, height), Image.Resampling.LANCZOS)


def save_grid(rows: list[list[tuple[str, torch.Tensor]]], path: str, height: int = 256) -> None:
    """One row per held-out sample; each cell a labelled RGB picture (3, H, W) in [-1, 1]
    (a modality's :meth:`~atoken_core.interfaces.Modality.preview`)."""
    from atoken_core.imaging import to_pil

    label_h, pad = 18, 4
    rendered = [[(label, _fit_height(to_pil(x), height)) for label, x in row] for row in rows]
    width = max(sum(img.width + pad for _, img in row) + pad for row in rendered)
    canvas = Image.new("RGB", (width, len(rendered) * (height + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for row in rendered:
        x = pad
        for label, img in row:
            draw.text((x, y), label, fill="black")
            canvas.paste(img, (x, y + label_h))
            x += img.width + pad
        y += height + label_h + pad
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def preview_rows(modality: Modality, cells: list[tuple[str, torch.Tensor]], unit: str = "frame"
                 ) -> list[list[tuple[str, torch.Tensor]]]:
    """Grid rows for one sample's cells (label, target or reconstruction): one row of previews, or
    for several frames / views one row for the first and one for the last."""
    shown = [(label, modality.preview(x)) for label, x in cells]
    if shown[0][1].ndim == 3:
        return [shown]
    last = shown[0][1].shape[0] - 1
    return [[(f"{label} {unit} {t}", v[t]) for label, v in shown] for t in sorted({0, last})]


@attrs.frozen
class Reconstruction:
    """A held-out sample's decoded form: what :meth:`Modality.unpatchify` returns (clamped to
    [-1, 1]), and the decoded tokens with their meta for the modality's own file formats."""

    sample: torch.Tensor
    tokens: Sparse4D
    meta: list[dict[str, Any]]


@torch.no_grad()
def reconstruct(model: Any, modality: Modality, samples: Iterable[Any]) -> list[Reconstruction]:
    """The one encode-decode path of evaluation, grids and saved reconstructions: each sample at
    its native size, with the posterior mode / quantised latent, through the modality's own
    stem and head where the model has them; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    head = modality_head(model, modality)
    device = next(model.parameters()).device
    out = []
    try:
        for x in samples:
            tokens = modality.patchify([x], model.spec)
            recon, _ = model(tokens.patches.to(device), sample=False, head=head)
            decoded = tokens.patches.with_features(recon.float().cpu())
            sample = modality.unpatchify(decoded, tokens.meta, model.spec)[0].clamp(-1, 1)
            out.append(Reconstruction(sample, decoded, tokens.meta))
    finally:
        model.train(was_training)
    return out


def reconstruct_images(model: Any, modality: Modality, images: Iterable[Any]) -> list[torch.Tensor]:
    """:func:`reconstruct`, the decoded samples only."""
    return [r.sample for r in reconstruct(model, modality, images)]


def modality_head(model: Any, modality: Modality) -> str | None:
    """The name of the model's output head (and input stem) for ``modality``, None for the shared
    pixel head."""
    return modality.name if modality.name in model.heads else None


def evaluate_images(model: Any, modality: Modality, samples: list[tuple[str, Any]]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """PSNR/SSIM of every held-out sample's reconstruction against its targets (the sample
    itself; a 3D asset's held-out views), and the reconstructions."""
    recons = reconstruct_images(model, modality, [x for _, x in samples])
    return score(modality, model.spec, samples, recons), recons


def score(modality: Modality, spec: PatchSpec, samples: list[tuple[str, Any]], recons: Sequence[torch.Tensor]
          ) -> dict[str, Any]:
    """PSNR/SSIM of each reconstruction (the model's, or a baseline's) against its sample's targets:
    {"mean": ..., "per_image": {name: ...}}."""
    targets = modality.targets([x for _, x in samples], spec)
    per_image = {name: image_metrics(t, r) for (name, _), t, r in zip(samples, targets, recons)}
    return {"mean": mean_metrics(list(per_image.values())), "per_image": per_image}
