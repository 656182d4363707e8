"""Video clips as a data source: random space-time crops for training, held-out clips whole."""

from __future__ import annotations

from typing import Any

import torch

from atoken_core.imaging import resize_within
import logging

from atoken_modalities.photos_impl import (
    CropSource,
    basename,
    caption_from_name,
    folder_captions,
    list_images,
    resolve_package_path,
)
from atoken_modalities.video_impl import VideoError, load_video


def _load(uri: str, config: Any) -> torch.Tensor:
    clip = load_video(resolve_package_path(uri), max_frames=config.max_frames)
    return resize_within(clip, max_side=config.max_side)  # (T, C, H, W): frames resize as a batch


class PackagedClips(CropSource):
    def __init__(self, config: Any) -> None:
        train = [_load(u, config) for u in config.train]
        short = [u for u, clip in zip(config.train, train) if clip.shape[0] < config.frames]
        if short:
            raise VideoError(f"{short[0]}: shorter than the {config.frames} frames of a training crop")
        evals = [(basename(u), _load(u, config)[: config.eval_frames]) for u in config.eval]
        super().__init__(train, evals, config.crop, frames=config.frames,
                         captions=[caption_from_name("a video of", u) for u in config.train])


log = logging.getLogger(__name__)


class VideoFolder(CropSource):
    """Every video in ``root`` (training crops) and ``eval_root`` (held out). Corrupt, truncated,
    empty or too-short files are skipped, counted in ``skipped`` and logged."""

    def __init__(self, config: Any) -> None:
        self.skipped: list[str] = []
        train, kept = [], []
        for uri in list_images(config.root, config.extensions):
            try:
                clip = _load(uri, config)
            except VideoError as err:
                self.skipped.append(str(err))
                continue
            if clip.shape[0] < config.frames:
                self.skipped.append(f"{uri}: {clip.shape[0]} frames, shorter than a {config.frames}-frame crop")
                continue
            train.append(clip)
            kept.append(uri)
        evals = []
        for uri in list_images(config.eval_root, config.extensions):
            try:
                evals.append((basename(uri), _load(uri, config)[: config.eval_frames]))
            except VideoError as err:
                self.skipped.append(str(err))
        if self.skipped:
            log.warning("skipped %d unreadable video(s), first: %s", len(self.skipped), "; ".join(self.skipped[:3]))
        captions = folder_captions(config.root, kept, VideoError) if config.captions else None
        super().__init__(train, evals, config.crop, frames=config.frames, captions=captions)
