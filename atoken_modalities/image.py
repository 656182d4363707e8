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


def size_policy_field() -> str:
    """What happens to sizes that are not multiples of the patch (shared with video)."""
    return attrs.field(
        default="pad",
        validator=attrs.validators.in_(["pad", "crop"]),
        metadata={"doc": "sizes that are not multiples of the patch: 'pad' (padded, and the padding cropped off "
                         "after decoding: every pixel comes back) or 'crop' (centre-cropped to multiples of the "
                         "patch, a video cut to whole temporal patches: Apple's preprocessing; outputs and "
                         "metrics are of the cropped input)"},
    )


@attrs.define(kw_only=True)
class ImageConfig:
    pad_mode: str = pad_mode_field()
    size_policy: str = size_policy_field()


@hookimpl
def atoken_modalities() -> list[Component]:
    return [
        Component("image", "atoken_modalities.image_impl:ImageModality", ImageConfig,
                  "RGB images of any size, as a one-frame video: coords (0, x, y, 0)"),
    ]
