"""Image patchify/unpatchify and image file I/O."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from atoken_core.errors import UserError
from atoken_core.imaging import resize_within
from atoken_core.interfaces import EvalData, EvalRequest, Modality, PatchSpec, Tokens
from atoken_core.io import read_input
from atoken_core.patching import patchify_plane, plane_grid, unpatchify_plane
from atoken_core.sparse import Sparse4D


class ImageError(UserError, ValueError):
    """An image that cannot be used, with the file (or sample) it came from."""


def image_to_tensor(img: Image.Image, source: str) -> torch.Tensor:
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{source}: image has zero size ({img.width}x{img.height})")
    if img.mode in ("RGBA", "LA", "P"):
        # Composite transparency onto white so transparent pixels do not become arbitrary colours.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0  # (3, H, W) in [-1, 1]


def load_image(path: str) -> torch.Tensor:
    """Read an image file (any fsspec path) as a (3, H, W) float tensor in [-1, 1]."""
    return image_from_bytes(read_input(path, ImageError), path)


def image_from_bytes(data: bytes, name: str) -> torch.Tensor:
    """An encoded image (png/jpeg/...) as (3, H, W) in [-1, 1]; errors name ``name``."""
    if not data:
        raise ImageError(f"{name}: file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file PIL can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{name}: corrupt or truncated image: {err}") from None
    return image_to_tensor(img, name)


def tensor_to_image(x_chw: torch.Tensor) -> Image.Image:
    arr = ((x_chw.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def save_image(x_chw: torch.Tensor, path: str) -> None:
    buf = io.BytesIO()
    fmt = path.rsplit(".", 1)[-1].lower()
    tensor_to_image(x_chw).save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())


def check_image_tensor(x: torch.Tensor, index: int, channels: int) -> None:
    if x.ndim != 3:
        raise ImageError(f"sample {index}: expected an image tensor (C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] != channels:
        raise ImageError(f"sample {index}: expected {channels} channels, got {x.shape[0]} (shape {tuple(x.shape)})")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ImageError(f"sample {index}: image has zero size {tuple(x.shape[1:])}")


def center_crop(x: torch.Tensor, patch: int, where: str, error: type[ValueError]) -> torch.Tensor:
    """The centre (..., H // p * p, W // p * p) of ``x``: the rows and columns left over are
    split with the extra one at the bottom/right (Apple's preprocessing)."""
    h, w = x.shape[-2:]
    h2, w2 = h // patch * patch, w // patch * patch
    if not h2 or not w2:
        raise error(f"{where}: {h}x{w} is smaller than one {patch}x{patch} patch, so cropping to whole patches "
                    "leaves nothing (size_policy = 'crop'; 'pad' keeps it)")
    top, left = (h - h2) // 2, (w - w2) // 2
    return x[..., top : top + h2, left : left + w2]


class ImageModality(Modality):
    name = "image"
    subspace = ("x", "y")
    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
    noun = "images"
    eval_metrics = ("psnr", "ssim", "lpips", "rfid", "codebook", "zeroshot", "retrieval", "probe")
    prompt_template = "a photo of a {}."

    def read(self, path: str) -> torch.Tensor:
        return load_image(path)

    def read_bytes(self, data: bytes, name: str) -> torch.Tensor:
        return image_from_bytes(data, name)

    def example(self, spec: PatchSpec, generator: torch.Generator) -> torch.Tensor:
        """(3, H, W) with H, W not multiples of the patch (so padding or cropping is exercised)."""
        p = spec.patch_size
        return torch.rand(self.channels, 2 * p + 1, 3 * p - 1, generator=generator) * 2 - 1

    def load_eval(self, data: str, request: EvalRequest) -> EvalData:
        """Every readable image under the folder ``data``, downscaled to ``request.max_side``;
        ``sklearn://digits[?size=N&per_class=N]`` is scikit-learn's labelled digits."""
        from atoken_core.understanding import DIGITS_SOURCE, DIGITS_URI, digits_samples, parse_digits_uri

        settings: dict[str, Any] = {"max_side": request.max_side}
        if data.startswith(DIGITS_URI):
            found = EvalData(digits_samples(**parse_digits_uri(data)))
            settings["data_source"] = DIGITS_SOURCE
        else:
            found = super().load_eval(data, request)
        samples = [(n, resize_within(x, max_side=request.max_side)) for n, x in found.samples]
        return EvalData(samples, found.skipped, settings)

    def write(self, sample: torch.Tensor, url: str) -> list[str]:
        save_image(sample, url)
        return [url]

    def __init__(self, config: Any) -> None:
        self.config = config

    def num_tokens(self, shape: Sequence[int], spec: PatchSpec) -> int:
        gh, gw = plane_grid(shape[-2], shape[-1], spec.patch_size)
        return gh * gw

    def _fit(self, x: torch.Tensor, i: int, spec: PatchSpec) -> torch.Tensor:
        """The sample as it is tokenised: itself, or its centre crop (size_policy = 'crop')."""
        check_image_tensor(x, i, spec.channels)
        if self.config.size_policy == "crop":
            return center_crop(x, spec.patch_size, f"sample {i}", ImageError)
        return x

    def targets(self, samples: Sequence[torch.Tensor], spec: PatchSpec) -> list[torch.Tensor]:
        return [self._fit(x, i, spec) for i, x in enumerate(samples)]

    def patchify(self, samples: Sequence[torch.Tensor], spec: PatchSpec) -> Tokens:
        parts = [patchify_plane(self._fit(x, i, spec), spec.patch_size, self.config.pad_mode)
                 for i, x in enumerate(samples)]
        return Tokens(Sparse4D.cat([t for t, _ in parts]), [m for _, m in parts])

    def unpatchify(self, patches: Sparse4D, meta: list[dict[str, Any]], spec: PatchSpec) -> list[torch.Tensor]:
        return [unpatchify_plane(sample.features, m, spec.patch_size, spec.channels)
                for sample, m in zip(patches.split(), meta)]
