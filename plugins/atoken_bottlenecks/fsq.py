"""Finite scalar quantisation (Mentzer et al., 2023, arXiv 2309.15505).

Each channel is squashed to a bounded range and rounded to one of ``levels[i]`` values;
rounding passes gradients straight through. The latent is split into groups of
``len(levels)`` channels; each group is one integer code in ``[0, prod(levels))``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from atoken_bottlenecks.kl import grow_rows, mean_rows, zero_mean_rows
from atoken_core.interfaces import Bottleneck, BottleneckOutput


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


class FSQBottleneck(Bottleneck):
    discrete = True

    def __init__(self, config, *, in_dim: int, latent_dim: int) -> None:
        super().__init__()
        levels = list(config.levels)
        if latent_dim % len(levels):
            raise ValueError(
                f"bottleneck.levels: latent_dim {latent_dim} is not a multiple of len(levels) = {len(levels)}"
            )
        self.latent_dim = latent_dim
        self.groups = latent_dim // len(levels)
        self.codebook_size = math.prod(levels)
        # With logvar_rows, W_r is a KL posterior's [mean | log-variance] projection and the mean
        # is quantised (Apple's So/D); the log-variance rows are kept but unused.
        self.logvar_rows = config.logvar_rows
        self.proj = nn.Linear(in_dim, (2 if config.logvar_rows else 1) * latent_dim, bias=config.bias)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
        lv = torch.tensor(levels, dtype=torch.long)
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0), persistent=False)

    @property
    def half_width(self) -> torch.Tensor:
        return (self.levels // 2).float()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash each channel into (-L/2, L/2) so that rounding gives exactly L values."""
        lv = self.levels.float().repeat(self.groups)
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(L, latent_dim) -> quantised values normalised to [-1, 1], computed in float32 (near a
        rounding boundary bf16 would pick the other level), returned in ``z``'s dtype."""
        q = round_ste(self.bound(z.float())) / self.half_width.repeat(self.groups)
        return q.to(z.dtype)

    def latent_to_codes(self, latent: torch.Tensor) -> torch.Tensor:
        """Index of each group: sum_k digit_k * prod(levels[:k]), digit_k = q_k * L_k//2 + L_k//2."""
        digits = rearrange(latent.float(), "l (g c) -> l g c", g=self.groups) * self.half_width + self.half_width
        return (digits.round().long() * self.basis).sum(-1)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dtype.is_floating_point:
            raise TypeError("codes must be integers")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        digits = (codes[..., None] // self.basis) % self.levels
        latent = (digits.float() - self.half_width) / self.half_width
        return rearrange(latent, "l g c -> l (g c)")

    def project(self, features: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        z = self.proj(features)[:, : self.latent_dim]
        return z if offset is None else z + offset

    def latent_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return mean_rows(self.proj, self.latent_dim)

    @torch.no_grad()
    def convert_from(self, old: Bottleneck) -> bool:
        """Take over a continuous bottleneck's latent projection (the paper's stage 4 quantises
        the latent the earlier stages learned): near zero the squashing is close to the
        identity, so the decoder first sees a rounded version of the latent it knows."""
        proj = old.latent_projection()
        if proj is None or proj[0].shape != (self.latent_dim, self.proj.in_features):
            return False
        self.proj.weight[: self.latent_dim].copy_(proj[0])
        if self.proj.bias is not None:
            if proj[1] is None:
                self.proj.bias[: self.latent_dim].zero_()
            else:
                self.proj.bias[: self.latent_dim].copy_(proj[1])
        return True

    def forward(self, features: torch.Tensor, *, sample: bool = True,
                offset: torch.Tensor | None = None) -> BottleneckOutput:
        latent = self.quantize(self.project(features, offset))
        return BottleneckOutput(latent=latent, codes=self.latent_to_codes(latent.detach()))

    def encode_project(self, features: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        return self.quantize(self.project(features, offset))

    @torch.no_grad()
    def grow_from(self, old: FSQBottleneck) -> None:
        if not torch.equal(old.levels, self.levels):
            raise ValueError("FSQ can grow its number of groups, not change its levels")
        if old.logvar_rows != self.logvar_rows:
            raise ValueError("FSQ cannot grow into a bottleneck with a different logvar_rows setting")
        k, n = old.latent_dim, self.latent_dim
        # The new channels enter the decoder through zero weights; if they also all quantised to
        # the same value neither side would get a gradient. Unit-scale projections spread them
        # over the levels from the first step.
        nn.init.normal_(self.proj.weight[k:n], std=self.proj.in_features**-0.5)
        if self.logvar_rows:
            grow_rows(self.proj, old.proj, k, n)
            return
        self.proj.weight[:k].copy_(old.proj.weight)
        if self.proj.bias is not None and old.proj.bias is not None:
            self.proj.bias[:k].copy_(old.proj.bias)

    def zero_init_projection(self) -> None:
        zero_mean_rows(self.proj, self.latent_dim)
