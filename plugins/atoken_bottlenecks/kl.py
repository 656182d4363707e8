"""KL bottleneck: W_r predicts a diagonal Gaussian posterior over the latent."""

from __future__ import annotations

import torch
from torch import nn

from atoken_core.interfaces import Bottleneck, BottleneckOutput


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), per token."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = mean
        self.logvar = logvar
        self.std = torch.exp(0.5 * logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per token, summed over channels: shape (L,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=-1)


class KLBottleneck(Bottleneck):
    discrete = False

    def __init__(self, config, *, in_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.config = config
        self.latent_dim = latent_dim
        self.proj = nn.Linear(in_dim, 2 * latent_dim, bias=config.bias)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
            with torch.no_grad():
                self.proj.bias[latent_dim:].fill_(config.logvar_init)

    def posterior(self, features: torch.Tensor, offset: torch.Tensor | None = None) -> DiagonalGaussian:
        mean, logvar = self.proj(features).chunk(2, dim=-1)
        if offset is not None:
            mean = mean + offset
        return DiagonalGaussian(mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max))

    def forward(self, features: torch.Tensor, *, sample: bool = True,
                offset: torch.Tensor | None = None) -> BottleneckOutput:
        post = self.posterior(features, offset)
        latent = post.sample() if sample else post.mode()
        return BottleneckOutput(latent=latent, aux={"posterior": post})

    def encode_project(self, features: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        return self.posterior(features, offset).mode()

    @torch.no_grad()
    def grow_from(self, old: KLBottleneck) -> None:
        grow_rows(self.proj, old.proj, old.latent_dim, self.latent_dim)

    def latent_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return mean_rows(self.proj, self.latent_dim)

    def zero_init_projection(self) -> None:
        zero_mean_rows(self.proj, self.latent_dim)  # the logvar head keeps its configured start


def mean_rows(proj: nn.Linear, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias or None) of the first ``n`` rows of a projection: the mean of a
    [mean | log-variance] one (KL; FSQ with logvar_rows), or all of a plain FSQ one."""
    return proj.weight[:n], None if proj.bias is None else proj.bias[:n]


@torch.no_grad()
def zero_mean_rows(proj: nn.Linear, n: int) -> None:
    """Zero the first ``n`` rows (weight and bias) of a projection: its latent's contribution."""
    proj.weight[:n].zero_()
    if proj.bias is not None:
        proj.bias[:n].zero_()


@torch.no_grad()
def grow_rows(new: nn.Linear, old: nn.Linear, k: int, n: int) -> None:
    """Copy a [mean (k) | log-variance (k)] projection into the first rows of each half of a
    [mean (n) | log-variance (n)] one."""
    new.weight[:k].copy_(old.weight[:k])  # means
    new.weight[n : n + k].copy_(old.weight[k:])  # log-variances
    if new.bias is not None and old.bias is not None:
        new.bias[:k].copy_(old.bias[:k])
        new.bias[n : n + k].copy_(old.bias[k:])

