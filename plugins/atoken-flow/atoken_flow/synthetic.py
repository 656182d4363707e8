"""The ``synthetic_flow`` data source: smooth random optical-flow fields made from a seed.

Each field sums a few random motions over pixel coordinates centred on the field and scaled by half
its longer side (so a field's look does not depend on its resolution):

- an affine motion ``(u, v) = t + A (x, y)`` (translation, zoom, shear, small rotation);
- a rotation with zoom about a random centre ``c``: ``(u, v) = w (-(y - cy), x - cx) + s (x - cx, y - cy)``;
- a Gaussian bump: a translation ``a`` weighted by ``exp(-|p - c|^2 / (2 sigma^2))`` (an object moving
  over a still background, with soft edges).

The sum is scaled so its fastest pixel moves ``U(1/4, 1) * max_speed`` pixels, then divided by
``max_displacement``: samples are what the ``flow`` modality reads from a ``.flo`` file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from atoken_core.interfaces import DataSource


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)


def random_field(height: int, width: int, motions: int, generator: torch.Generator) -> torch.Tensor:
    """(2, height, width) float64: the sum of ``motions`` random motions (see the module docstring),
    its fastest pixel at speed 1."""
    half = max(height, width) / 2
    y = (torch.arange(height, dtype=torch.float64) - (height - 1) / 2) / half
    x = (torch.arange(width, dtype=torch.float64) - (width - 1) / 2) / half
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    u, v = torch.zeros_like(xx), torch.zeros_like(xx)
    for _ in range(motions):
        kind = int(torch.randint(3, (1,), generator=generator))
        if kind == 0:  # affine
            t, a = _uniform(generator, -1, 1, 2), _uniform(generator, -1, 1, 2, 2)
            u, v = u + t[0] + a[0, 0] * xx + a[0, 1] * yy, v + t[1] + a[1, 0] * xx + a[1, 1] * yy
        elif kind == 1:  # rotation and zoom about a centre
            c, (w, s) = _uniform(generator, -1, 1, 2), _uniform(generator, -1, 1, 2)
            dx, dy = xx - c[0], yy - c[1]
            u, v = u - w * dy + s * dx, v + w * dx + s * dy
        else:  # Gaussian bump
            c, a = _uniform(generator, -1, 1, 2), _uniform(generator, -1, 1, 2)
            sigma = float(_uniform(generator, 0.15, 0.5, 1))
            g = torch.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * sigma**2))
            u, v = u + a[0] * g, v + a[1] * g
    field = torch.stack([u, v])
    return field / torch.linalg.vector_norm(field, dim=0).max().clamp_min(1e-12)


def make_fields(count: int, height: int, width: int, config: Any, generator: torch.Generator) -> list[torch.Tensor]:
    """``count`` normalised float32 fields (2, height, width)."""
    out = []
    for _ in range(count):
        speed = float(_uniform(generator, 0.25, 1.0, 1)) * config.max_speed  # pixels
        field = random_field(height, width, config.motions, generator) * speed / config.max_displacement
        out.append(field.float().clamp(-1, 1))
    return out


class SyntheticFlow(DataSource):
    """Training fields (``train`` of ``size`` x ``size``) and held-out ones (``eval`` of ``eval_size``),
    each set a function of ``seed`` alone. Batches draw fields with the step's generator and flip
    half of them left-right (a mirrored field: u changes sign)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.train = make_fields(config.train, config.size, config.size, config,
                                 torch.Generator().manual_seed(2 * config.seed))
        h, w = config.eval_size
        self.evals = [(f"field-{i:03d}", x) for i, x in
                      enumerate(make_fields(config.eval, h, w, config, torch.Generator().manual_seed(2 * config.seed + 1)))]

    def train_batch(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        out = []
        for _ in range(batch_size):
            x = self.train[int(torch.randint(len(self.train), (1,), generator=generator))]
            if bool(torch.rand((), generator=generator) < 0.5):
                x = x.flip(-1) * torch.tensor([-1.0, 1.0]).view(2, 1, 1)
            out.append(x)
        return out

    def eval_samples(self) -> list[tuple[str, torch.Tensor]]:
        return self.evals

    def train_pool(self) -> Iterator[torch.Tensor]:
        return iter(self.train)
