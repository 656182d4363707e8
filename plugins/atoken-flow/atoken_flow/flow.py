"""The ``flow`` modality: optical-flow fields on the (x, y) plane of the shared 4D space, ``t = z = 0``.

A sample is a float tensor (2, H, W): channel 0 is u (motion to the right), channel 1 is v (motion
downwards, the image y axis), both divided by ``max_displacement`` pixels and clipped to [-1, 1].
It is cut into p x p patches exactly as an image is (channel-last inside each patch), but with
2 values per pixel, so the core gives it its own patch embedding and output head of
``t * p * p * 2`` values on the shared transformer (``Modality.channels``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from atoken_core.interfaces import Modality, ModalityError, PatchSpec, Tokens
from atoken_core.io import atomic_write_bytes
from atoken_core.patching import patchify_plane, plane_grid, unpatchify_plane
from atoken_core.sparse import Sparse4D
from atoken_flow.flo import UNKNOWN_FLOW, flo_bytes, read_flo_bytes

#: value (HSV) of pixels moving faster than max_displacement in previews (Middlebury's 0.75)
OUT_OF_RANGE_VALUE = 0.75


def flow_wheel(x: torch.Tensor) -> torch.Tensor:
    """Normalised flow (..., 2, H, W) -> RGB (..., 3, H, W) in [0, 1] on the Middlebury colour
    wheel (Baker et al. 2011) drawn in HSV: hue is the direction, measured from "to the right"
    (red, 0 degrees) through "down" (yellow-green, 90: v > 0 points down the image) to "left"
    (cyan, 180) and "up" (blue-violet, 270); saturation is the speed in units of max_displacement
    (zero motion is white, max_displacement fully saturated); faster pixels keep full saturation
    and are darkened to value 0.75, as Middlebury's ``flowToColor`` marks them. The scale is fixed
    (not each field's own maximum), so a target and its reconstruction are comparable."""
    u, v = x[..., 0, :, :].float(), x[..., 1, :, :].float()
    speed = torch.sqrt(u * u + v * v)
    hue = torch.remainder(torch.atan2(v, u) / (2 * math.pi), 1.0)
    sat = speed.clamp(max=1.0)
    val = torch.where(speed > 1.0, torch.full_like(speed, OUT_OF_RANGE_VALUE), torch.ones_like(speed))
    # HSV -> RGB: channel n is V - V S clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6, n = 5, 3, 1
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(3, 1, 1)
    k = torch.remainder(n + 6 * hue.unsqueeze(-3), 6.0)
    return val.unsqueeze(-3) * (1 - sat.unsqueeze(-3) * torch.minimum(k, 4 - k).clamp(0, 1))


class FlowModality(Modality):
    name = "flow"
    subspace = ("x", "y")
    suffixes = (".flo",)
    channels = 2
    noun = "fields"
    # "epe" is not an `atoken eval` built-in: any other metric name is a registered loss, and this
    # plugin registers an epe loss (atoken_flow.epe), so eval reports its mean term per field.
    eval_metrics = ("psnr", "ssim", "epe", "codebook")

    def __init__(self, config: Any) -> None:
        self.config = config
        self.scale = float(config.max_displacement)

    # ------------------------------------------------------------------ files
    def read_bytes(self, data: bytes, name: str) -> torch.Tensor:
        """A ``.flo`` file's bytes -> (2, H, W) normalised; unknown-flow pixels (Middlebury's 1e10)
        become zero motion."""
        uv = torch.from_numpy(read_flo_bytes(data, name)).permute(2, 0, 1).contiguous()
        uv[:, (uv.abs() > UNKNOWN_FLOW).any(0)] = 0.0
        return self.normalise(uv)

    def write(self, sample: torch.Tensor, url: str) -> list[str]:
        """A normalised (2, H, W) field as a ``.flo`` file in pixels."""
        self._check(sample, 0)
        uv = self.pixels(sample).permute(1, 2, 0).cpu().numpy()
        atomic_write_bytes(url, flo_bytes(uv))
        return [url]

    def save_reconstruction(self, recon: Sparse4D, meta: list[dict[str, Any]], spec: PatchSpec,
                            prefix: str) -> list[str]:
        sample = self.unpatchify(recon, meta, spec)[0].clamp(-1, 1)
        return self.write(sample, f"{prefix}.flo")

    # ------------------------------------------------------------------ values
    def normalise(self, uv: torch.Tensor) -> torch.Tensor:
        """Pixels -> the model's values: divided by max_displacement, clipped to [-1, 1]."""
        return (uv.float() / self.scale).clamp(-1, 1)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The model's values -> pixels (the inverse of :meth:`normalise` inside the range)."""
        return x.float().clamp(-1, 1) * self.scale

    def to_user(self, y: Any) -> Any:
        """Decoded fields as the Python API returns them: (u, v) in pixels."""
        return self.pixels(y) if torch.is_tensor(y) else y

    def from_user(self, x: Any) -> Any:
        """A field in pixels (2, H, W) from a Python API user -> normalised."""
        if not torch.is_tensor(x):
            return x
        if not x.is_floating_point():
            raise ModalityError(f"modality {self.name!r}: expected a float flow field in pixels, got {x.dtype}")
        return self.normalise(x)

    def preview(self, x: torch.Tensor) -> torch.Tensor:
        return flow_wheel(x) * 2 - 1

    def downscale(self, x: Any, max_side: int) -> Any:
        """A field shrunk to a longer side of at most ``max_side``: its vectors shrink with it (a
        motion of 8 pixels is 4 pixels at half the size), unlike an image's values."""
        from atoken_core.imaging import resize_within

        h, w = x.shape[-2:]
        if max(h, w) <= max_side:
            return x
        y = resize_within(x, max_side=max_side, mode="bilinear")
        return torch.stack([y[0] * (y.shape[-1] / w), y[1] * (y.shape[-2] / h)])

    def example(self, spec: PatchSpec, generator: torch.Generator) -> torch.Tensor:
        """A smooth random field of 2p+1 x 3p-1 pixels (not whole patches: padding is exercised)."""
        p = spec.patch_size
        coarse = torch.rand(1, 2, 3, 4, generator=generator) * 2 - 1
        return F.interpolate(coarse, size=(2 * p + 1, 3 * p - 1), mode="bilinear", align_corners=True)[0]

    # ------------------------------------------------------------------ tokens
    def _check(self, x: Any, index: int) -> None:
        if not torch.is_tensor(x) or x.ndim != 3 or x.shape[0] != self.channels:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ModalityError(f"modality {self.name!r}, sample {index}: expected a flow field (2, H, W), got {shape}")
        if x.shape[1] == 0 or x.shape[2] == 0:
            raise ModalityError(f"modality {self.name!r}, sample {index}: the field has zero size {tuple(x.shape[1:])}")

    def num_tokens(self, shape: Sequence[int], spec: PatchSpec) -> int:
        gh, gw = plane_grid(shape[-2], shape[-1], spec.patch_size)
        return gh * gw

    def targets(self, samples: Sequence[torch.Tensor], spec: PatchSpec) -> list[torch.Tensor]:
        for i, x in enumerate(samples):
            self._check(x, i)
        return list(samples)

    def patchify(self, samples: Sequence[torch.Tensor], spec: PatchSpec) -> Tokens:
        """Features (gh * gw, p * p * 2) per field: one frame, channel-last inside each patch, cut by
        the core's plane patching (as images are). The model's ``spec`` counts RGB channels; this
        modality's width comes from its own channels."""
        parts = []
        for i, x in enumerate(samples):
            self._check(x, i)
            parts.append(patchify_plane(x.float(), spec.patch_size, self.config.pad_mode))
        return Tokens(Sparse4D.cat([t for t, _ in parts]), [m for _, m in parts])

    def unpatchify(self, patches: Sparse4D, meta: list[dict[str, Any]], spec: PatchSpec) -> list[torch.Tensor]:
        """Each field from its tokens' first ``p * p * 2`` values (its head emits ``t * p * p * 2``:
        one frame is a field), the padding cropped off."""
        return [unpatchify_plane(sample.features, m, spec.patch_size, self.channels)
                for sample, m in zip(patches.split(), meta)]
