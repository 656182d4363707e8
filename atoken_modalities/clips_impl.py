"""Video clips as a data source: random space-time crops for training, held-out clips whole."""

from __future__ import annotations

from typing import Any

import torch

from atoken_core.imaging import resize_within
import logging

from atoken_modalities.photos_impl import CropSource, basename, caption_from_name, folder_stream, resolve_package_path
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


def video_folder(config: Any) -> Any:
    """Every video under ``root`` (random space-time crops) and ``eval_root`` (held out, the first
    eval_frames frames), streamed (:func:`~atoken_modalities.photos_impl.folder_stream`); corrupt,
    empty or too-short files are skipped and counted."""
    return folder_stream(config, "video", VideoError, frames=config.frames, max_frames=config.max_frames,
                         max_side=config.max_side, eval_frames=config.eval_frames)
