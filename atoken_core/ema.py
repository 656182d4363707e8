"""An exponential moving average of the model's weights, used for evaluation and export."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from atoken_core.distributed import local


class EMA:
    """``shadow`` holds each parameter's average (the local shard under FSDP2), or is None when
    the recipe keeps no average (``optim.ema_decay = 0``)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] | None = None
        self.reset(model)

    def reset(self, model: torch.nn.Module) -> None:
        """Start the average again from ``model``'s weights (after an edit or a new parameter set)."""
        self.shadow = ({n: local(p.detach()).clone() for n, p in model.named_parameters()}
                       if self.decay else None)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self.shadow is None:
            return
        params = dict(model.named_parameters())
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [local(params[n].detach()) for n in names],
                             1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the live weights and the averaged ones (twice restores them)."""
        if self.shadow is None:
            return
        for name, p in model.named_parameters():
            live = local(p.detach()).clone()
            local(p.detach()).copy_(self.shadow[name])
            self.shadow[name] = live

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """``model`` holds the averaged weights inside the block (the live ones again after it)."""
        self.swap(model)
        try:
            yield
        finally:
            self.swap(model)
