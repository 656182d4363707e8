"""Patches of a plane: a (C, H, W) tensor as tokens at integer (x, y) coordinates and back, the
cutting that image-like modalities share (the image modality, a third party's flow or depth)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from atoken_core.sparse import Sparse4D


def plane_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """Patch rows and columns covering ``height`` x ``width`` (the last ones padded)."""
    return math.ceil(height / patch), math.ceil(width / patch)


def patchify_plane(x_chw: torch.Tensor, patch: int, pad_mode: str = "replicate") -> tuple[Sparse4D, dict[str, Any]]:
    """(C, H, W) -> one sample's tokens: features (gh * gw, p * p * C), channel-last inside each
    patch (SigLIP2's layout), coords ``[0, col, row, 0]``; sizes that are not whole patches are
    padded with ``pad_mode`` (``reflect`` falls back to ``replicate`` where the padding is wider
    than the tensor). Returns the tokens and what :func:`unpatchify_plane` needs."""
    h, w = x_chw.shape[-2:]
    gh, gw = plane_grid(h, w, patch)
    pad = (0, gw * patch - w, 0, gh * patch - h)
    if any(pad):
        mode = "replicate" if pad_mode == "reflect" and (pad[1] >= w or pad[3] >= h) else pad_mode
        x_chw = F.pad(x_chw[None], pad, mode=mode)[0]
    patches = rearrange(x_chw, "c (gh ph) (gw pw) -> (gh gw) (ph pw c)", ph=patch, pw=patch)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    coords = torch.zeros(gh * gw, 4, dtype=torch.long)
    coords[:, 1] = cols.flatten()  # x
    coords[:, 2] = rows.flatten()  # y
    return Sparse4D.single(patches, coords.to(x_chw.device)), {"height": int(h), "width": int(w), "grid": (gh, gw)}


def unpatchify_plane(features_lf: torch.Tensor, meta: dict[str, Any], patch: int, channels: int) -> torch.Tensor:
    """The inverse of :func:`patchify_plane` for one sample: its tokens' first ``p * p * C``
    values (a decoder head may emit several frames per token) -> (C, H, W), padding cropped off."""
    gh, gw = meta["grid"]
    frame = features_lf[:, : patch * patch * channels]
    x = rearrange(frame, "(gh gw) (ph pw c) -> c (gh ph) (gw pw)", gh=gh, gw=gw, ph=patch, pw=patch)
    return x[:, : meta["height"], : meta["width"]]
