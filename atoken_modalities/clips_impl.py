"""Video clips as a data source: random space-time crops for training, held-out clips whole."""

from __future__ import annotations

from typing import Any

import torch

from atoken_core.imaging import resize_within
from atoken_core.interfaces import DataSource
from atoken_modalities.photos_impl import resolve_package_path
from atoken_modalities.video_impl import VideoError, load_video


def _load(uri: str, config: Any) -> torch.Tensor:
    clip = load_video(resolve_package_path(uri), max_frames=config.max_frames)
    return resize_within(clip, max_side=config.max_side)  # (T, C, H, W): frames resize as a batch


class PackagedClips(DataSource):
    def __init__(self, config: Any) -> None:
        self.config = config
        self.train = [resize_within(_load(u, config), min_side=config.crop) for u in config.train]
        if not self.train:
            raise VideoError("the training set is empty: no clips")
        short = [u for u, c in zip(config.train, self.train) if c.shape[0] < config.frames]
        if short:
            raise VideoError(f"{short[0]}: shorter than the {config.frames} frames of a training crop")
        self.evals = [(u.rstrip("/").rsplit("/", 1)[-1], _load(u, config)[: config.eval_frames]) for u in config.eval]
        if not self.evals:
            raise VideoError("the held-out set is empty: no clips")

    def train_batch(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        f, c = self.config.frames, self.config.crop
        out = []
        for _ in range(batch_size):
            clip = self.train[int(torch.randint(len(self.train), (1,), generator=generator))]
            t, _, h, w = clip.shape
            start = int(torch.randint(t - f + 1, (1,), generator=generator))
            top = int(torch.randint(h - c + 1, (1,), generator=generator))
            left = int(torch.randint(w - c + 1, (1,), generator=generator))
            x = clip[start : start + f, :, top : top + c, left : left + c]
            if bool(torch.rand((), generator=generator) < 0.5):
                x = x.flip(-1)
            out.append(x)
        return out

    def eval_samples(self) -> list[tuple[str, torch.Tensor]]:
        return self.evals

    def train_pool(self):
        return iter(self.train)
