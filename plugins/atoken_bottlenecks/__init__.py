"""First-party bottlenecks: KL (continuous, diagonal Gaussian) and FSQ (discrete).

This module only declares what it provides; the torch code lives in ``kl.py`` / ``fsq.py``
and is imported when a recipe builds a bottleneck.
"""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component


def _levels_ok(instance: object, attribute: attrs.Attribute, value: list[int]) -> None:
    if not value:
        raise ValueError("'levels' must not be empty")
    bad = [lv for lv in value if lv < 2]
    if bad:
        raise ValueError(f"'levels' must all be >= 2, got {value}")


def _bias_field() -> bool:
    return attrs.field(default=True, metadata={"doc": "W_r has a bias (Apple's released weights: false)"})


@attrs.define(kw_only=True)
class KLConfig:
    logvar_init: float = attrs.field(
        default=0.0, metadata={"doc": "initial log-variance (bias of the logvar head); lower = less sampling noise "
                                      "at start; needs bias = true"}
    )
    logvar_min: float = attrs.field(default=-30.0, metadata={"doc": "clamp for numerical safety"})
    logvar_max: float = attrs.field(default=20.0, metadata={"doc": "clamp for numerical safety"})
    bias: bool = _bias_field()

    def __attrs_post_init__(self) -> None:
        if self.logvar_init and not self.bias:
            raise ValueError(f"'logvar_init' = {self.logvar_init} needs a bias to start from (bias = false)")


@attrs.define(kw_only=True)
class FSQConfig:
    levels: list[int] = attrs.field(
        factory=lambda: [8, 8, 8, 5, 5, 5],
        validator=_levels_ok,
        metadata={"doc": "quantisation levels per channel of one group; codebook size = their product"},
    )
    bias: bool = _bias_field()
    logvar_rows: bool = attrs.field(
        default=False,
        metadata={"doc": "W_r also keeps a KL posterior's log-variance rows (unused by quantisation): Apple's So/D "
                         "quantises the mean of a KL projection"},
    )


@hookimpl
def atoken_bottlenecks() -> list[Component]:
    return [
        Component("kl", "atoken_bottlenecks.kl:KLBottleneck", KLConfig,
                  "continuous latent, diagonal Gaussian posterior regularised by KL"),
        Component("fsq", "atoken_bottlenecks.fsq:FSQBottleneck", FSQConfig,
                  "finite scalar quantisation: integer codes, straight-through rounding"),
    ]
