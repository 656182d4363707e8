"""The video modality: points in the (t, x, y) volume of the shared 4D space, ``z = 0``.

Registration only; the torch code is in :mod:`atoken_modalities.video_impl`.
"""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component
from atoken_modalities.image import pad_mode_field, size_policy_field


@attrs.define(kw_only=True)
class VideoConfig:
    pad_mode: str = pad_mode_field()
    size_policy: str = size_policy_field()
    frame_pad: str = attrs.field(
        default="replicate",
        validator=attrs.validators.in_(["replicate", "constant"]),
        metadata={"doc": "how a duration that is not a multiple of the temporal patch is padded: "
                         "replicate repeats the last frame, constant adds zero (mid-grey) frames; "
                         "the padding is cut off again, so no frame is dropped"},
    )


@hookimpl
def atoken_modalities() -> list[Component]:
    return [
        Component("video", "atoken_modalities.video_impl:VideoModality", VideoConfig,
                  "RGB videos (T, C, H, W) of any duration and size: coords (t, x, y, 0)"),
    ]
