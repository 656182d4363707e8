"""Registration of the ``flow`` modality, the ``synthetic_flow`` data source and the ``epe`` loss.

atoken's plugin manager loads this module from the ``atoken`` entry-point group of this
distribution, eagerly, whenever ``atoken`` starts: so it imports no torch. The three factories are
``"module:attribute"`` strings resolved only when a recipe builds the component.

One number ties the three together: ``max_displacement``, the motion in pixels that a sample's
value 1 stands for. Each component has its own copy (a component receives only its own config),
all defaulting to :data:`DEFAULT_MAX_DISPLACEMENT`; a recipe that changes it changes all three
(``[modality.flow]``, ``[data.flow]`` and each ``epe`` loss).
"""

from __future__ import annotations

from typing import Any

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component

#: pixels of motion that a normalised value of 1 stands for, unless a recipe says otherwise
DEFAULT_MAX_DISPLACEMENT = 16.0


def max_displacement_field(what: str) -> Any:
    return attrs.field(default=DEFAULT_MAX_DISPLACEMENT, validator=attrs.validators.gt(0.0),
                       metadata={"doc": f"pixels of motion a normalised value of 1 stands for ({what}); keep it "
                                        "equal in [modality.flow], [data.flow] and every epe loss"})


@attrs.define(kw_only=True)
class FlowConfig:
    max_displacement: float = max_displacement_field(
        "files are read as flow / max_displacement, components beyond it clipped to [-1, 1]; the Python API "
        "takes and returns pixels")
    pad_mode: str = attrs.field(
        default="replicate", validator=attrs.validators.in_(["replicate", "reflect", "constant"]),
        metadata={"doc": "how fields whose sides are not multiples of the patch are padded before patchifying "
                         "('constant': zero motion); the padding is cropped off after decoding"})


def _size_pair(instance: Any, attribute: attrs.Attribute, value: list[int]) -> None:
    if len(value) != 2 or any(not isinstance(v, int) or v < 8 for v in value):
        raise ValueError(f"'{attribute.name}' must be [height, width], each an integer >= 8, got {value!r}")


@attrs.define(kw_only=True)
class SyntheticFlowConfig:
    train: int = attrs.field(default=64, validator=attrs.validators.ge(1),
                             metadata={"doc": "training fields made once from `seed` (batches draw from them)"})
    eval: int = attrs.field(default=4, validator=attrs.validators.ge(1),
                            metadata={"doc": "held-out fields, made from `seed` independently of the training ones"})
    size: int = attrs.field(default=64, validator=attrs.validators.ge(8),
                            metadata={"doc": "side of the square training fields, in pixels"})
    eval_size: list[int] = attrs.field(factory=lambda: [44, 70], validator=_size_pair,
                                       metadata={"doc": "[height, width] of the held-out fields (any size: the "
                                                        "modality pads to whole patches and crops back)"})
    seed: int = attrs.field(default=0, validator=attrs.validators.ge(0),
                            metadata={"doc": "seeds the fields themselves (the recipe's seed only orders batches)"})
    motions: int = attrs.field(default=3, validator=attrs.validators.ge(1),
                               metadata={"doc": "random motions summed per field: each an affine, a rotation "
                                                "about a random centre, or a Gaussian bump"})
    max_speed: float = attrs.field(default=DEFAULT_MAX_DISPLACEMENT,
                                   validator=attrs.validators.gt(0.0),
                                   metadata={"doc": "pixels: each field's fastest pixel moves between a quarter of "
                                                    "this and all of it (at most max_displacement)"})
    max_displacement: float = max_displacement_field("the fields are made in pixels and divided by it")

    def __attrs_post_init__(self) -> None:
        if self.max_speed > self.max_displacement:
            raise ValueError(f"'max_speed' must be at most max_displacement ({self.max_displacement}), got "
                             f"{self.max_speed}: faster motion would be clipped")

    def train_sample_shape(self) -> tuple[int, int, int]:
        return (2, self.size, self.size)


@attrs.define(kw_only=True)
class EPEConfig:
    max_displacement: float = max_displacement_field("the loss is reported in pixels")


@hookimpl
def atoken_modalities() -> list[Component]:
    return [
        Component("flow", "atoken_flow.flow:FlowModality", FlowConfig,
                  "2-channel optical-flow fields (u, v) of any size, Middlebury .flo files: coords (0, x, y, 0)"),
    ]


@hookimpl
def atoken_data() -> list[Component]:
    return [
        Component("synthetic_flow", "atoken_flow.synthetic:SyntheticFlow", SyntheticFlowConfig,
                  "smooth random flow fields (affine, rotations, Gaussian bumps) made from a seed"),
    ]


@hookimpl
def atoken_losses() -> list[Component]:
    return [
        Component("epe", "atoken_flow.epe:EPELoss", EPEConfig,
                  "average end-point error of 2-channel flow in pixels: mean |recon - target|_2 * max_displacement"),
    ]
