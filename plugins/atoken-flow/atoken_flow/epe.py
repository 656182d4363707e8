"""The ``epe`` loss: average end-point error of optical flow, in pixels.

EPE is the standard optical-flow error (Baker et al. 2011): the Euclidean distance between the
estimated and the true motion vector of a pixel, averaged over pixels. On normalised fields it is
``|recon - target|_2`` over the channel axis times ``max_displacement``. As a training loss it is an
L2-per-pixel (not squared) penalty, the one flow networks train with; as an ``atoken eval`` metric
(``--metrics epe``) it is reported per field.

The distance is taken over whatever the channel axis (dim -3) holds, so the loss runs on any pixel
tensor; it means an end-point error only for 2-channel flow, so a recipe that trains other
modalities too restricts it with ``modalities = ["flow"]``.
"""

from __future__ import annotations

import torch

from atoken_core.errors import UserError
from atoken_core.interfaces import Loss, LossInputs


class EPEError(UserError, ValueError):
    """The loss was given tensors it cannot compare."""


class EPELoss(Loss):
    def __init__(self, config) -> None:
        super().__init__()
        self.scale = float(config.max_displacement)

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        target, recon = inputs.target, inputs.recon
        if target.ndim < 3 or recon.shape != target.shape:
            raise EPEError(f"loss 'epe' compares fields (..., 2, H, W) of equal shape; modality {inputs.modality!r} "
                           f"gave target {tuple(target.shape)} and reconstruction {tuple(recon.shape)}")
        # vector_norm's gradient is 0 where the error is exactly 0 (no NaN from sqrt at 0)
        return {"epe": torch.linalg.vector_norm(recon - target, dim=-3).mean() * self.scale}
