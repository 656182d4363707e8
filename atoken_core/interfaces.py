"""The four abstract interfaces plugins implement: Modality, Bottleneck, Loss, Curriculum
(plus DataSource, which feeds a modality).

Plugins subclass these in modules their factories point at; the plugin's registration
module itself stays free of torch imports.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from atoken_core.sparse import Sparse4D


@attrs.frozen
class PatchSpec:
    """How the shared 4D space is cut into tokens: ``t x p x p`` blocks of ``channels``."""

    patch_size: int
    temporal_patch: int
    channels: int = 3

    @property
    def frame_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels


@attrs.frozen
class Tokens:
    """A modality's patchified samples: patch pixels as features, 4D coords, and what
    ``unpatchify`` needs to restore each sample exactly (original sizes, padding)."""

    patches: Sparse4D  # features (L, frames * p * p * C), channel-last inside each patch
    meta: list[dict[str, Any]]


class Modality(abc.ABC):
    """One kind of visual input living in its own subspace of the shared 4D space."""

    name: str
    #: axes whose coordinate may be non-zero, e.g. ("x", "y") for images
    subspace: tuple[str, ...]
    #: file suffixes (lower case, with the dot) :meth:`read` understands
    suffixes: tuple[str, ...] = ()

    def read(self, path: str) -> Any:
        """One file (any fsspec path) as a sample, in the form :meth:`patchify` takes (pixel
        modalities: values in [-1, 1])."""
        raise NotImplementedError(f"modality {self.name!r} does not read files")

    def write(self, sample: Any, url: str) -> list[str]:
        """Write one sample (what :meth:`unpatchify` returns) at an fsspec URL in this modality's
        own file format; return the URLs written."""
        raise NotImplementedError(f"modality {self.name!r} does not write files")

    @abc.abstractmethod
    def patchify(self, samples: Sequence[torch.Tensor], spec: PatchSpec) -> Tokens:
        """Cut samples into patches with integer coordinates; pack them into one batch."""

    @abc.abstractmethod
    def unpatchify(self, patches: Sparse4D, meta: list[dict[str, Any]], spec: PatchSpec) -> list[torch.Tensor]:
        """Inverse of :meth:`patchify` (up to the reconstruction itself)."""

    @abc.abstractmethod
    def num_tokens(self, shape: Sequence[int], spec: PatchSpec) -> int:
        """Tokens one sample of this shape becomes (for cost estimates without data)."""

    def head_dim(self, spec: PatchSpec) -> int | None:
        """Width of this modality's own decoder output head, or None to share the pixel head
        (images and videos decode to patch pixels; 3D decodes to Gaussian parameters)."""
        return None

    def targets(self, samples: Sequence[Any], spec: PatchSpec) -> list[torch.Tensor]:
        """What :meth:`unpatchify` of a perfect reconstruction would return for ``samples``, the
        tensors losses and metrics compare with (the samples themselves for pixel modalities, or
        the part of them that was tokenised; the rendered target views for 3D)."""
        return list(samples)

    def save_reconstruction(self, recon: Sparse4D, meta: list[dict[str, Any]], spec: PatchSpec,
                            prefix: str) -> list[str]:
        """Write one decoded sample in this modality's own file formats (a video as .mp4, a 3D
        asset as a Gaussian-splat .ply and a turntable), at fsspec URLs starting with ``prefix``;
        return the URLs written. Images need nothing beyond the PNG grids."""
        return []

    def default_losses(self) -> list[str]:
        return ["l1"]

    def default_metrics(self) -> list[str]:
        return ["psnr"]


@attrs.frozen
class BottleneckOutput:
    latent: torch.Tensor  # (L, latent_dim): what the decoder receives
    aux: Mapping[str, Any] = attrs.field(factory=dict)  # e.g. {"posterior": ...} or {"codes": ...}
    codes: torch.Tensor | None = None  # (L, groups) int64 for discrete bottlenecks


class Bottleneck(nn.Module, abc.ABC):
    """Maps encoder features (L, in_dim) to the reconstruction latent (L, latent_dim).

    Owns the projection ``W_r``. Continuous bottlenecks expose a distribution in ``aux``;
    discrete ones return integer ``codes`` and implement :meth:`codes_to_latent`.
    """

    discrete: bool = False
    latent_dim: int

    @abc.abstractmethod
    def forward(self, features: torch.Tensor, *, sample: bool = True,
                offset: torch.Tensor | None = None) -> BottleneckOutput:
        """``offset`` (L, latent_dim), when given, is added to the projected latent before it is
        regularised or quantised (the model's linear shortcut)."""

    @abc.abstractmethod
    def encode_project(self, features: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The deterministic latent (posterior mode / quantised value) for export."""

    @abc.abstractmethod
    def zero_init_projection(self) -> None:
        """Start the encoder's contribution to the latent at zero (a shortcut carries it at first)."""

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is continuous; it has no codes")

    def grow_from(self, old: Bottleneck) -> None:
        """Copy a smaller bottleneck of the same kind into this one's first channels."""
        raise NotImplementedError(f"{type(self).__name__} cannot grow its latent")

    def latent_projection(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight (latent_dim, in_dim), bias or None) of the linear map to the deterministic latent
        before any squashing (KL: the mean rows of W_r), for bottlenecks that have one."""
        return None

    def convert_from(self, old: Bottleneck) -> bool:
        """Start from a bottleneck of another kind and the same width (KL -> FSQ: quantise what
        the KL mean projected to, instead of a fresh W_r). Returns whether it did."""
        return False


@attrs.frozen
class LossInputs:
    modality: str
    target: torch.Tensor  # (B, C, H, W) for images, values in [-1, 1]
    recon: torch.Tensor
    bottleneck: BottleneckOutput
    # Shared per-step memo so losses that look at the same network features (LPIPS, Gram)
    # run that network once.
    cache: dict[str, Any] = attrs.field(factory=dict)
    # For the semantic losses (distill, sigmoid): the student's W_s output, (B, text_dim),
    # unnormalised (AToken.semantic_embedding), and one caption or prompt per sample (or a
    # prompt set for distill). None where the step has none.
    semantic: torch.Tensor | None = None
    texts: Sequence[str] | None = None


class Loss(nn.Module, abc.ABC):
    """Named loss terms from inputs and reconstructions."""

    #: reads ``LossInputs.semantic``: the trainer computes the W_s embedding only when a loss does
    needs_semantic: bool = False

    @abc.abstractmethod
    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]: ...


@attrs.frozen
class StagePlan:
    index: int
    name: str
    steps: int
    modalities: tuple[str, ...]
    batch_size: int
    lr: float
    bottleneck: Any  # ComponentSpec in force for this stage
    latent_dim: int = 0  # latent channels in force for this stage
    weights: Mapping[str, float] = attrs.field(factory=dict)  # loss multiplier per modality (default 1)


class Curriculum(abc.ABC):
    """Orders the recipe's stages and says which modality each micro-step trains on."""

    @abc.abstractmethod
    def stages(self, recipe: Any) -> list[StagePlan]: ...

    @abc.abstractmethod
    def modality_schedule(self, stage: StagePlan, step: int) -> list[str]:
        """Modalities whose gradients are accumulated into optimiser step ``step``."""


class DataSource(abc.ABC):
    """Training and held-out samples for one modality.

    Sources that skip unreadable samples keep one message per skip in ``skipped`` (and may
    count more than they keep in ``n_skipped``); runs report both."""

    skipped: Sequence[str] = ()

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @abc.abstractmethod
    def train_batch(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """A batch drawn with ``generator`` only, so a step's batch is a function of the seed."""

    @abc.abstractmethod
    def eval_samples(self) -> list[tuple[str, torch.Tensor]]:
        """Held-out (name, sample) pairs at native size."""

    def train_pool(self) -> Iterator[torch.Tensor]:
        """Every training sample once (used to fit the PCA baseline / PCA init)."""
        raise NotImplementedError

    def train_batch_texts(self, batch_size: int, generator: torch.Generator) -> tuple[list[Any], list[str] | None]:
        """:meth:`train_batch` with one caption per sample, for sources that have captions
        (the semantic losses read them); None when the source has none."""
        return self.train_batch(batch_size, generator), None

    def train_batch_part(self, batch_size: int, generator: torch.Generator, rank: int,
                         world: int) -> tuple[list[Any], list[str] | None]:
        """Samples ``rank::world`` of :meth:`train_batch_texts` (one data-parallel rank's slice of
        the global batch). This default makes the whole batch and slices it; sources whose
        samples are costly to decode may draw the same indices and decode only their slice."""
        samples, texts = self.train_batch_texts(batch_size, generator)
        return samples[rank::world], None if texts is None else texts[rank::world]


class Teacher(nn.Module, abc.ABC):
    """A frozen image-text model the semantic losses learn from (SigLIP2 in the paper).

    Its parameters never require grad and it stays in eval mode, but :meth:`encode_image` is
    differentiable with respect to its *input* (the CLIP perceptual term back-propagates through
    the reconstruction); call it under ``torch.no_grad()`` when no gradient is needed.
    Logits follow SigLIP: ``logit_scale * cos(image, text) + logit_bias``.
    """

    embed_dim: int
    #: multiplier t of cosine similarities (the exp of transformers' ``logit_scale`` parameter)
    logit_scale: float
    logit_bias: float

    @abc.abstractmethod
    def encode_image(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W) -> L2-normalised embeddings (B, embed_dim)."""

    @abc.abstractmethod
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings -> L2-normalised embeddings (N, embed_dim)."""

    def freeze(self) -> Teacher:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Teacher:
        # A teacher has no training mode (no dropout, no batch statistics), whatever its owner does.
        return super().train(False)
