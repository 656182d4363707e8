"""WebDataset-style tar shards as a data source for images, videos or 3D assets.
Registration only; see :mod:`atoken_modalities.shards_impl`.

A shard is an uncompressed tar whose members are grouped into samples by key, as WebDataset
writes them (``000123.jpg``, ``000123.txt``, ``000123.cls``). The source indexes the members'
offsets once and reads each drawn sample with ranged reads, so a step's batch depends only on
the step's generator (resumable at any step) and no shard is ever held in memory.
"""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component

_ge = attrs.validators.ge

#: member extensions tried, in order, for the media of a sample when ``media`` is left empty
DEFAULT_MEDIA = {
    "image": ["jpg", "jpeg", "png", "webp"],
    "video": ["mp4", "webm"],
    "3d": ["glb", "obj", "ply"],
}


@attrs.define(kw_only=True)
class TarShardsConfig:
    shards: list[str] = attrs.field(metadata={"doc": (
        "training shards: fsspec URIs, globs or brace patterns, e.g. 's3://b/train-{000000..000099}.tar'")})
    eval_shards: list[str] = attrs.field(metadata={"doc": "held-out shards (same forms), evaluated at native size"})
    modality: str = attrs.field(default="image", validator=attrs.validators.min_len(1), metadata={
        "doc": "what the media members hold: image, video or 3d (decoded and augmented here), or any other "
               "registered modality, which reads its members itself (training samples: random crop x crop "
               "windows, not resized or flipped)"})
    media: list[str] = attrs.field(
        default=attrs.Factory(lambda self: list(DEFAULT_MEDIA.get(self.modality, [])), takes_self=True),
        metadata={"doc": "member extensions holding the media, first present wins (default: jpg/jpeg/png/webp "
                         "for images, mp4/webm for video, glb/obj/ply for 3d, the file suffixes of any other "
                         "modality); samples without one are ignored"},
    )
    caption: str = attrs.field(default="txt", metadata={"doc": "member extension of captions ('' = the source has none)"})
    label: str = attrs.field(default="cls", metadata={"doc": "member extension of class labels, exposed for "
                                                             "held-out samples in `labels` ('' = none)"})
    workers: int = attrs.field(default=0, validator=_ge(0), metadata={"doc": (
        "decoding processes (spawned); 0 decodes in the training process")})
    prefetch: int = attrs.field(default=2, validator=_ge(0), metadata={"doc": (
        "steps decoded ahead in the background when workers > 0 (speculative, keyed by the step's "
        "generator state, so it never changes a batch)")})
    # images and video
    crop: int = attrs.field(default=attrs.Factory(lambda self: 64 if self.modality == "video" else 128, takes_self=True),
                            validator=_ge(8), metadata={"doc": "side of the square training crops (default 128, video 64)"})
    # video only
    frames: int = attrs.field(default=8, validator=_ge(1), metadata={"doc": "video: frames in each training crop"})
    max_frames: int = attrs.field(default=64, validator=_ge(1),
                                  metadata={"doc": "video: frames read from the start of each clip"})
    max_side: int = attrs.field(default=256, validator=_ge(8),
                                metadata={"doc": "video: clips are downscaled so the longer side is at most this"})
    eval_frames: int = attrs.field(default=16, validator=_ge(1),
                                   metadata={"doc": "video: frames of each held-out clip that are evaluated"})
    # 3D only (as packaged_meshes)
    resolution: int = attrs.field(default=64, validator=_ge(4), metadata={"doc": "3d: voxel grid side"})
    views: int = attrs.field(default=8, validator=_ge(1), metadata={"doc": "3d: input views per asset"})
    eval_views: int = attrs.field(default=4, validator=_ge(1), metadata={"doc": "3d: held-out views per eval asset"})
    size: int = attrs.field(default=64, validator=_ge(8), metadata={"doc": "3d: rendered view side in pixels"})
    fov: float = attrs.field(default=40.0, metadata={"doc": "3d: camera field of view in degrees"})
    radius: float = attrs.field(default=2.0, metadata={"doc": "3d: camera distance from the object centre"})
    rotate: bool = attrs.field(default=True, metadata={"doc": "3d: random rotation of each training asset"})
    colour_seed: int = attrs.field(default=0, metadata={"doc": "3d: seed of the colour field for uncoloured meshes"})

    @media.validator
    def _check_media(self, attribute: attrs.Attribute, value: list[str]) -> None:
        if any(not e or e.startswith(".") for e in value) or (not value and self.modality in DEFAULT_MEDIA):
            raise ValueError(f"'media' must list member extensions without dots, e.g. ['jpg', 'png']; got {value!r}")

    def train_sample_shape(self) -> tuple[int, ...]:
        if self.modality == "video":
            return (self.frames, 3, self.crop, self.crop)
        if self.modality == "3d":
            return (int(2.5 * self.resolution**2),)  # surface voxels of a closed shape, for estimates
        if self.modality == "image":
            return (3, self.crop, self.crop)
        return (self.crop, self.crop)  # another modality's window: its num_tokens reads the last two sides


@hookimpl
def atoken_data() -> list[Component]:
    return [
        Component("tar_shards", "atoken_modalities.shards_impl:TarShards", TarShardsConfig,
                  "WebDataset-style tar shards (fsspec, brace patterns) of images, videos, meshes or any modality's "
                  "files, with captions/labels; ranged reads, resumable at any step, decoded by worker processes"),
    ]
