"""Charbonnier loss (a differentiable L1): mean(sqrt((recon - target)^2 + eps^2))."""

from __future__ import annotations

import torch

from atoken_core.interfaces import Loss, LossInputs


class CharbonnierLoss(Loss):
    def __init__(self, config) -> None:
        super().__init__()
        self.eps = config.eps

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        diff = inputs.recon - inputs.target
        return {"charbonnier": torch.sqrt(diff * diff + self.eps**2).mean()}
