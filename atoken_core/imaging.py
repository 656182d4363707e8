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
