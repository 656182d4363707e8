"""The image modality: points on the (x, y) plane of the shared 4D space, ``t = z = 0``.

Registration only; the torch code is in :mod:`atoken_modalities.image_impl`.
"""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component


def pad_mode_field() -> str:
    """Spatial padding of sizes that are not multiples of the patch (shared with video)."""
    return attrs.field(
        default="replicate",
        validator=attrs.validators.in_(["replicate", "reflect", "constant"]),
        metadata={"doc": "how sizes that are not multiples of the patch are padded (the padding is cropped off again)"},
    )


@attrs.define(kw_only=True)
class ImageConfig:
    pad_mode: str = pad_mode_field()


@hookimpl
def atoken_modalities() -> list[Component]:
    return [
        Component("image", "atoken_modalities.image_impl:ImageModality", ImageConfig,
                  "RGB images of any size, as a one-frame video: coords (0, x, y, 0)"),
    ]
