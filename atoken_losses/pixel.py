"""Pixel and latent losses."""

from __future__ import annotations

import torch

from atoken_core.interfaces import Loss, LossInputs


class L1Loss(Loss):
    def __init__(self, config) -> None:
        super().__init__()

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        return {"l1": (inputs.recon - inputs.target).abs().mean()}


class KLLoss(Loss):
    def __init__(self, config) -> None:
        super().__init__()

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        posterior = inputs.bottleneck.aux.get("posterior")
        if posterior is None:  # discrete bottleneck: nothing to regularise
            return {}
        return {"kl": posterior.kl().mean()}
