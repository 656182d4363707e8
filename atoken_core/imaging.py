"""Resizing pixel tensors, shared by data sources, evaluation and perceptual losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_within(x: torch.Tensor, *, max_side: int | None = None, min_side: int | None = None,
                  mode: str = "bicubic") -> torch.Tensor:
    """Scale ``x`` (C, H, W) or (B, C, H, W), keeping its aspect ratio, so its longer side is at
    most ``max_side`` or its shorter side at least ``min_side``; unchanged when it already fits.
    Antialiased; values stay in [-1, 1]."""
    h, w = x.shape[-2:]
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
    elif min_side is not None and min(h, w) < min_side:
        scale = min_side / min(h, w)
    else:
        return x
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if min_side is not None:
        size = (max(min_side, size[0]), max(min_side, size[1]))
    batch = x if x.ndim == 4 else x[None]
    out = F.interpolate(batch, size=size, mode=mode, align_corners=False, antialias=True).clamp(-1, 1)
    return out if x.ndim == 4 else out[0]


def to_pil(x_3hw: torch.Tensor):
    """An RGB tensor (3, H, W) in [-1, 1] as an 8-bit PIL image."""
    from PIL import Image

    if x_3hw.ndim != 3 or x_3hw.shape[0] != 3:
        raise ValueError(f"expected an RGB tensor (3, H, W), got shape {tuple(x_3hw.shape)}")
    arr = ((x_3hw.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def save_png(x_3hw: torch.Tensor, url: str) -> None:
    """Write an RGB tensor (3, H, W) in [-1, 1] as a PNG at an fsspec URL, atomically."""
    import io

    from atoken_core.io import atomic_write_bytes

    buf = io.BytesIO()
    to_pil(x_3hw).save(buf, format="PNG")
    atomic_write_bytes(url, buf.getvalue())
