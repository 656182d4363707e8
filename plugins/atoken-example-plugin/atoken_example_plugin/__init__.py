"""Registration of the example plugin's ``charbonnier`` loss.

Loaded by atoken's plugin manager from the ``atoken`` entry-point group, so it stays cheap:
no torch here; the factory string points at the submodule that has the torch code.
"""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component


@attrs.define(kw_only=True)
class CharbonnierConfig:
    eps: float = attrs.field(default=1e-3, metadata={"doc": "smoothing: quadratic below about eps, L1 above"})


@hookimpl
def atoken_losses() -> list[Component]:
    return [
        Component("charbonnier", "atoken_example_plugin.charbonnier:CharbonnierLoss", CharbonnierConfig,
                  "Charbonnier (smooth L1) pixel loss: mean(sqrt((recon - target)^2 + eps^2))"),
    ]
