"""The four abstract interfaces plugins implement: Modality, Bottleneck, Loss, Curriculum
(plus DataSource, which feeds a modality).

Plugins subclass these in modules their factories point at; the plugin's registration
module itself stays free of torch imports.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import nn

from atoken_core.errors import UserError
from atoken_core.sparse import Sparse4D


class ModalityError(UserError, ValueError):
    """A sample or request a modality cannot serve, naming the modality and the rule."""


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


@attrs.frozen(kw_only=True)
class EvalRequest:
    """What ``atoken eval`` asks of :meth:`Modality.load_eval`: the checkpoint's recipe (so samples
    are prepared as in training) and the user's size limits; a modality reads what applies."""

    recipe: Any = None
    max_side: int = 512  # longer side of images / frames / views, at most
    max_frames: int = 16  # frames read from the start of a clip
    heldout_views: int | None = None  # views a multi-view sample is scored on (None: the recipe's)


@attrs.frozen
class EvalData:
    samples: list[tuple[str, Any]]  # (name relative to the data root, sample), sorted by name
    skipped: list[str] = attrs.field(factory=list)  # one message per unreadable file
    settings: dict[str, Any] = attrs.field(factory=dict)  # how they were read, for the report


class Modality(abc.ABC):
    """One kind of visual input living in its own subspace of the shared 4D space.

    Beyond patchify/unpatchify, a modality declares everything the core does with its samples
    (reading and writing files, previews for figures, evaluation data and metrics, the user-facing
    value range), so the core never branches on a modality's name."""

    name: str
    #: axes whose coordinate may be non-zero, e.g. ("x", "y") for images
    subspace: tuple[str, ...]
    #: file suffixes (lower case, with the dot) :meth:`read` understands
    suffixes: tuple[str, ...] = ()
    #: values per pixel of a sample. The shared patch embedding and pixel head take
    #: ``PatchSpec.channels`` (RGB); a modality with another count gets its own input
    #: embedding and output head of ``t * p * p * channels`` on the shared transformer.
    channels: int = 3
    #: what reports call several samples ("images", "clips", "assets")
    noun: str = "samples"
    #: metrics ``atoken eval`` computes for this modality: built-ins (psnr, ssim, rfid, rfvd,
    #: codebook, zeroshot, retrieval, probe) and any registered loss name (its mean term)
    eval_metrics: tuple[str, ...] = ("psnr", "ssim")
    #: zero-shot prompt template with ``{}`` for the class name; None: ``--prompt`` is required
    prompt_template: str | None = None

    def read(self, path: str) -> Any:
        """One file (any fsspec path) as a sample, in the form :meth:`patchify` takes (pixel
        modalities: values in [-1, 1]). The default reads the bytes and calls :meth:`read_bytes`."""
        from atoken_core.io import read_input

        return self.read_bytes(read_input(path, ModalityError), path)

    def read_bytes(self, data: bytes, name: str) -> Any:
        """A file's bytes (a folder's file, a tar shard's member) as a sample; ``name`` ends in the
        file's suffix and names it in errors."""
        raise ModalityError(f"modality {self.name!r} does not read files")

    def load_eval(self, data: str, request: EvalRequest) -> EvalData:
        """The held-out set ``atoken eval`` scores: by default every file under the folder ``data``
        with one of :attr:`suffixes`, read with :meth:`read_eval` (unreadable files, those raising a
        :class:`~atoken_core.errors.UserError`, are skipped with their message)."""
        from atoken_core.io import files_under

        samples, skipped = [], []
        for rel, url in files_under(data, self.suffixes):
            try:
                samples.append((rel, self.read_eval(url, request)))
            except UserError as err:
                skipped.append(str(err))
        if not samples:
            raise ModalityError(f"{data}: no readable {self.noun} for modality {self.name!r} (files ending in "
                                f"{', '.join(self.suffixes) or '(none declared)'}; {len(skipped)} unreadable)")
        return EvalData(samples, skipped)

    def read_eval(self, url: str, request: EvalRequest) -> Any:
        """One held-out file as :meth:`load_eval` reads it: :meth:`read` by default; a modality may
        read less (a clip's first ``request.max_frames`` frames) or shrink it."""
        return self.read(url)

    def preview(self, x: torch.Tensor) -> torch.Tensor:
        """What figures show of a target or reconstruction (what :meth:`targets` / :meth:`unpatchify`
        return): RGB in [-1, 1], (3, H, W) or (N, 3, H, W) for several frames or views. The default
        takes tensors whose channel axis (dim -3) holds 3 values as they are and shows 1 value as
        grey; other counts need their own preview."""
        channels = x.shape[-3] if x.ndim >= 3 else 0
        if channels == 3:
            return x
        if channels == 1:
            return x.expand(*x.shape[:-3], 3, *x.shape[-2:])
        raise ModalityError(f"modality {self.name!r}: no preview for samples of shape {tuple(x.shape)} "
                            "(define Modality.preview to show them as RGB)")

    def figure(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """One picture of a held-out sample for reports, (3, H, W) in [-1, 1]: by default the
        preview of the target above that of the reconstruction, frames or views side by side."""
        rows = []
        for x in (target, recon):
            p = self.preview(x)
            rows.append(p if p.ndim == 3 else torch.cat(list(p), dim=-1))
        return torch.cat(rows, dim=-2)

    def to_user(self, y: Any) -> Any:
        """A decoded sample as the Python API returns it. Pixel modalities: [-1, 1] -> [0, 1]."""
        return (y.clamp(-1, 1) + 1) / 2 if torch.is_tensor(y) else y

    def from_user(self, x: Any) -> Any:
        """A sample a Python API user passes (the inverse of :meth:`to_user`): pixels in [0, 1]."""
        if not torch.is_tensor(x):
            return x
        if not x.is_floating_point():
            hint = " (divide by 255 first)" if x.dtype == torch.uint8 else ""
            raise ModalityError(f"modality {self.name!r}: expected float values in [0, 1], got {x.dtype}{hint}")
        return x.float() * 2 - 1

    def downscale(self, x: Any, max_side: int) -> Any:
        """``x`` shrunk so its longer side is at most ``max_side`` (held-out samples during
        training). The default resizes tensors (..., H, W) with antialiasing and leaves other
        samples alone; a modality whose values depend on the scale (optical flow) overrides it."""
        from atoken_core.imaging import resize_within

        return resize_within(x, max_side=max_side) if torch.is_tensor(x) else x

    def example(self, spec: PatchSpec, generator: torch.Generator) -> Any | None:
        """A small random sample (a few tokens), for ``atoken validate``'s check that this modality
        runs through the recipe's model, and for tests over every registered modality; None when
        the modality cannot make one (then the check is skipped and says so)."""
        return None

    def has_pca_baseline(self, spec: PatchSpec) -> bool:
        """Whether the PCA of patch features (the best linear tokenizer of the latent's size) is a
        baseline for this modality: it reconstructs :meth:`targets` only when the patches are the
        targets' own pixels, i.e. the modality decodes to patch pixels (not 3D's rendered views)."""
        return self.head_dim(spec) is None

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


@runtime_checkable
class SampleShape(Protocol):
    """What a data source's config declares so ``--dry-run`` can count tokens without data."""

    def train_sample_shape(self) -> tuple[int, ...]:
        """The shape of one training sample as the source yields it (what
        :meth:`Modality.num_tokens` takes)."""


@runtime_checkable
class Discrete(Protocol):
    """What a discrete bottleneck offers beyond :class:`Bottleneck` (codebook metrics read it)."""

    codebook_size: int

    def latent_to_codes(self, latent: torch.Tensor) -> torch.Tensor:
        """Quantised latent values (L, latent_dim) -> their integer codes (L, groups)."""


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
