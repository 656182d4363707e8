"""Image data sources."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import fsspec
import torch

from atoken_core.imaging import resize_within
from atoken_core.interfaces import DataSource
from atoken_modalities.image_impl import ImageError, load_image

log = logging.getLogger(__name__)


def resolve_package_path(uri: str) -> str:
    """``pkg://skimage/data/astronaut.png`` -> the file inside the installed package."""
    if not uri.startswith("pkg://"):
        return uri
    package, _, rest = uri.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImageError(f"{uri}: package {package!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / rest
    if not path.exists():
        raise ImageError(f"{uri}: no such file in package {package!r} ({path})")
    return str(path)


def video_frames(path: str, count: int) -> list[torch.Tensor]:
    """``count`` evenly spaced frames of a video file, each a (3, H, W) training image."""
    from atoken_modalities.video_impl import load_video

    clip = load_video(path)
    idx = torch.linspace(0, clip.shape[0] - 1, min(count, clip.shape[0])).round().long().unique()
    return list(clip[idx])


class CropSource(DataSource):
    """Random square crops (with horizontal flips) of in-memory images (C, H, W), or random
    space-time crops of ``frames`` frames of in-memory videos (T, C, H, W)."""

    def __init__(self, train: list[torch.Tensor], evals: list[tuple[str, torch.Tensor]], crop: int,
                 frames: int | None = None, captions: list[str] | None = None) -> None:
        if captions is not None and len(captions) != len(train):
            raise ValueError(f"{len(captions)} captions for {len(train)} training samples")
        self.captions = captions
        if not train:
            raise ImageError("the training set is empty: no readable samples")
        if not evals:
            raise ImageError("the held-out set is empty: no readable samples")
        self.crop, self.frames = crop, frames
        self.train = [resize_within(x, min_side=crop) for x in train]
        self.evals = evals

    def train_batch(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        return self.train_batch_texts(batch_size, generator)[0]

    def train_batch_texts(self, batch_size: int, generator: torch.Generator) -> tuple[list[torch.Tensor], list[str] | None]:
        c, out, texts = self.crop, [], []
        for _ in range(batch_size):
            index = int(torch.randint(len(self.train), (1,), generator=generator))
            x = self.train[index]
            texts.append(self.captions[index] if self.captions is not None else "")
            if self.frames is not None:
                start = int(torch.randint(x.shape[0] - self.frames + 1, (1,), generator=generator))
                x = x[start : start + self.frames]
            h, w = x.shape[-2:]
            top = int(torch.randint(h - c + 1, (1,), generator=generator))
            left = int(torch.randint(w - c + 1, (1,), generator=generator))
            x = x[..., top : top + c, left : left + c]
            if bool(torch.rand((), generator=generator) < 0.5):
                x = x.flip(-1)
            out.append(x)
        return out, (texts if self.captions is not None else None)

    def eval_samples(self) -> list[tuple[str, torch.Tensor]]:
        return self.evals

    def train_pool(self):
        return iter(self.train)


def caption_from_name(prefix: str, path: str) -> str:
    """A weak caption from a file name ('a photo of' + 'hubble_deep_field.jpg' -> 'a photo of
    hubble deep field'), for sources without captions; documented as such."""
    stem = basename(path).rsplit(".", 1)[0]
    return f"{prefix} {re.sub(r'[_-]+', ' ', stem).strip()}"


def basename(path: str) -> str:
    """The last part of a path or URI (a sample's name in reports)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


class PackagedPhotos(CropSource):
    def __init__(self, config: Any) -> None:
        train = [load_image(resolve_package_path(p)) for p in config.train]
        captions = [caption_from_name("a photo of", p) for p in config.train]
        if config.video_frames:
            for clip in config.clips:
                frames = video_frames(resolve_package_path(clip), config.video_frames)
                train += frames
                captions += [caption_from_name("a video frame of", clip)] * len(frames)
        evals = [(basename(p), load_image(resolve_package_path(p))) for p in config.eval]
        super().__init__(train, evals, config.crop, captions=captions)


def folder_captions(root: str, uris: list[str], error: type[ValueError]) -> list[str]:
    """The captions of files under ``root`` (captions.json or STEM.txt, as ``atoken eval`` reads
    them); a missing one is an ``error`` naming the files."""
    from atoken_core.understanding import UnderstandingError, read_captions

    _, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/") + "/"
    names = [fsspec.core.url_to_fs(u)[1].removeprefix(base) for u in uris]
    try:
        return read_captions(root, names)
    except UnderstandingError as err:
        raise error(str(err)) from None


def folder_stream(config: Any, modality: str, error: type[ValueError], **settings: Any) -> Any:
    """A folder source that streams: an index of the training and held-out files (paths and sizes
    only), each drawn sample read and decoded on demand (in ``config.workers`` processes), through
    the tar-shard reader with a folder's files as its samples, so batches are a function of the
    step's generator alone and unreadable files are skipped and counted as in shards."""
    from atoken_core.tarshards import FileIndex, ShardError
    from atoken_modalities.shards import TarShardsConfig
    from atoken_modalities.shards_impl import TarShards

    media = [e.lower().lstrip(".") for e in config.extensions]
    try:
        train = FileIndex(config.root, config.extensions)
        held = FileIndex(config.eval_root, config.extensions)
    except ShardError as err:
        raise error(str(err)) from None
    for what, index in (("training", train), ("held-out", held)):
        if not len(index):
            raise error(f"{index.root}: the {what} set is empty: no files ending in {', '.join(config.extensions)}")
    if config.captions:
        train.captions = folder_captions(config.root, train.urls, error)
    shards = TarShardsConfig(shards=[], eval_shards=[], modality=modality, media=media, crop=config.crop,
                             caption="txt" if config.captions else "", label="", workers=config.workers,
                             prefetch=config.prefetch, **settings)
    try:
        source = TarShards(shards, indexes=(train, held), label=f"{modality} folder {config.root}")
    except ShardError as err:
        raise error(str(err)) from None
    return source


def image_folder(config: Any) -> Any:
    """Every image under ``root`` (random crops with flips) and ``eval_root`` (held out, whole),
    streamed (:func:`folder_stream`)."""
    return folder_stream(config, "image", ImageError)
