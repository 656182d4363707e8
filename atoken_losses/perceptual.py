"""LPIPS and Gram losses on one shared VGG16 (ImageNet weights from a local file).

Both use the ``lpips`` package's network (its ScalingLayer, its VGG16 slices, its trained
linear layers); the backbone weights come from :mod:`atoken_losses.vgg16_weights`. The VGG
features of a step's target and reconstruction are computed once and shared through
``LossInputs.cache``.

Gram layers: relu1_2 .. relu4_3 by default, the layers Gatys et al. use for texture.
relu5_3 is left out: at 1/16 resolution it holds little texture and its 512x512 Gram mostly
duplicates what LPIPS already matches at that depth.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from atoken_core.errors import UserError
from atoken_core.imaging import resize_within
from atoken_core.interfaces import Loss, LossInputs
from atoken_core.io import cache_dir
from atoken_losses.vgg16_weights import resolve_vgg16_weights



class PerceptualError(UserError, ValueError):
    """Inputs the VGG16-based losses cannot take."""

def lpips_network(vgg16_weights: str) -> nn.Module:
    """An ``lpips.LPIPS(net='vgg')`` with real backbone weights, frozen, in eval mode.

    Cached per weights source so LPIPS and Gram losses of one recipe share one network.
    """
    source = str(cache_dir()) if vgg16_weights == "auto" else vgg16_weights
    return _lpips_network(vgg16_weights, source)


@functools.cache
def _lpips_network(vgg16_weights: str, source: str) -> nn.Module:
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=`
        # pnet_rand=True: build VGG16 without downloading; its weights are loaded just below.
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    state = resolve_vgg16_weights(vgg16_weights)
    model.net.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def vgg_features(inputs: LossInputs, model: nn.Module, max_side: int | None = None,
                 max_samples: int | None = None) -> tuple[list, list]:
    """(target features, recon features) at relu1_2..relu5_3, computed once per step for each
    (network, size, sample count) so LPIPS and Gram with the same settings share one pass."""
    key = f"vgg16:{id(model)}:{max_side}:{max_samples}"
    if key not in inputs.cache:
        h, w = inputs.target.shape[-2:]
        if min(h, w) < 32:
            raise PerceptualError(f"{inputs.modality}: a sample of {h}x{w} pixels is too small for VGG16's five "
                                  "poolings (LPIPS and Gram need at least 32 on each side)")

        def features(x: torch.Tensor) -> list:
            x = resize_within(x[:max_samples], max_side=max_side, mode="bilinear")
            return list(model.net(model.scaling_layer(x)))

        with torch.no_grad():
            target = features(inputs.target)
        inputs.cache[key] = (target, features(inputs.recon))
    return inputs.cache[key]


def lpips_from_features(model: nn.Module, feats0: list, feats1: list) -> torch.Tensor:
    """The lpips package's forward, from precomputed features: (B,) distances."""
    import lpips

    total = 0.0
    for kk, (f0, f1) in enumerate(zip(feats0, feats1)):
        diff = (lpips.normalize_tensor(f0) - lpips.normalize_tensor(f1)) ** 2
        total = total + lpips.spatial_average(model.lins[kk](diff), keepdim=True)
    return total.flatten()


def gram_matrix(features_bchw: torch.Tensor) -> torch.Tensor:
    """G = F F^T / (C H W) with F the (C, H*W) feature map: (B, C, C)."""
    b, c, h, w = features_bchw.shape
    f = features_bchw.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


class _FrozenNetLoss(Loss):
    def __init__(self, config, net: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.net = net if net is not None else lpips_network(config.vgg16_weights)

    def train(self, mode: bool = True) -> _FrozenNetLoss:
        # The lpips linear layers carry dropout: the network stays in eval mode whatever the
        # caller does, or LPIPS would turn random.
        super().train(mode)
        self.net.eval()
        return self


class LPIPSLoss(_FrozenNetLoss):

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        target, recon = vgg_features(inputs, self.net, self.config.max_side, self.config.max_samples)
        return {"lpips": lpips_from_features(self.net, target, recon).mean()}


class GramLoss(_FrozenNetLoss):

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        target, recon = vgg_features(inputs, self.net, self.config.max_side, self.config.max_samples)
        terms = [F.mse_loss(gram_matrix(recon[i]), gram_matrix(target[i])) for i in self.config.layers]
        return {"gram": torch.stack(terms).mean()}
