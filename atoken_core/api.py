"""The Python API: load any atoken checkpoint, encode, decode, embed.

    import atoken
    tok = atoken.load("atoken-soc.safetensors")
    enc = tok.encode(x, modality="image")   # x: (3, H, W) image or (T, 3, H, W) video in [0, 1]
    enc.coords, enc.mean, enc.codes          # (L, 4) [t, x, y, z]; (L, C); (L, groups) or None
    y = tok.decode(enc)                      # x's layout, in [0, 1]
    v = tok.embed(x, modality="image")       # (D,) pooled, L2-normalised semantic embedding

Everything is deterministic: encodings hold the posterior *mean* (continuous checkpoints) or
the quantised latent (discrete ones), and decoding uses them. ``encode(..., sample=True)``
draws from the posterior instead, with an optional seeded generator. (Apple's own wrapper,
``ATokenWrapper.inference``, samples the posterior without a seed, so its reconstructions
change from call to call; atoken reproduces its mean path exactly.)

The CLI's ``encode``/``decode`` go through this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from atoken_core.errors import UserError
from atoken_core.registry import Registries
from atoken_core.sparse import Sparse4D

__all__ = ["Encoding", "Tokenizer", "TokenizerError", "load"]


class TokenizerError(UserError, ValueError):
    """A request the checkpoint cannot serve (another modality, a latent of another width...)."""


@attrs.frozen(kw_only=True)
class Encoding:
    """One sample's tokens. ``mean`` is what the decoder reads: the posterior mean (KL) or the
    quantised latent values (FSQ, whose integer indices are ``codes``)."""

    modality: str
    coords: torch.Tensor  # (L, 4) int64 [t, x, y, z]
    mean: torch.Tensor  # (L, C) float32
    codes: torch.Tensor | None = None  # (L, groups) int64 for discrete checkpoints
    logvar: torch.Tensor | None = None  # (L, C) float32 posterior log-variance (KL checkpoints)
    frames: int = 1  # frames per token the decoder emits (1 for images, the temporal patch for videos)
    meta: dict[str, Any] = attrs.field(factory=dict)  # what the modality needs to restore the layout

    @property
    def num_tokens(self) -> int:
        return int(self.coords.shape[0])


class Tokenizer:
    """A checkpoint's model with its recipe's modalities, ready for inference."""

    def __init__(self, model: torch.nn.Module, recipe: Any, registries: Registries, *, source: str,
                 metadata: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.recipe = recipe
        self.registries = registries
        self.source = source
        self.metadata = metadata or {}
        self.dtype = dtype
        from atoken_core.build import checkpoint_modalities

        self.modalities = checkpoint_modalities(recipe)
        self._built: dict[str, Any] = {}

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def flavor(self) -> Any:
        return self.model.flavor

    @property
    def discrete(self) -> bool:
        return bool(self.model.bottleneck.discrete)

    @property
    def latent_dim(self) -> int:
        return int(self.model.bottleneck.latent_dim)

    @property
    def logit_scale(self) -> float | None:
        """The flavour's SigLIP-style log logit scale (image-text logits = exp(scale) cos + bias)."""
        return self.flavor.logit_scale

    @property
    def logit_bias(self) -> float | None:
        return self.flavor.logit_bias

    def modality(self, name: str) -> Any:
        """The checkpoint's modality ``name`` (configured as its recipe says); refuses one the
        checkpoint was not trained on."""
        if name not in self.modalities:
            raise TokenizerError(f"{self.source}: trained on {', '.join(self.modalities)}; not on {name!r}")
        if name not in self._built:
            from atoken_core.build import build_modality

            self._built[name] = build_modality(self.recipe, self.registries, name)
        return self._built[name]

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        with torch.no_grad():
            if self.dtype is None or self.dtype == torch.float32:
                yield
            else:
                # weights stay float32; matmuls and attention run in ``dtype``, norms in float32
                with torch.autocast(self.device.type, dtype=self.dtype):
                    yield

    def _sample(self, x: Any, modality: Any) -> Any:
        """A user's input as the modality's internal sample: a path is read by the modality; other
        inputs go through :meth:`Modality.from_user` (pixels in [0, 1] become [-1, 1])."""
        if isinstance(x, str):
            return modality.read(x)
        return modality.from_user(x)

    def _modality_name(self, modality: str | None) -> str:
        if modality is not None:
            return modality
        if len(self.modalities) == 1:
            return self.modalities[0]
        raise TokenizerError(f"{self.source}: trained on {', '.join(self.modalities)}; pass modality=")

    def _tokens(self, x: Any, modality: str | None, read: bool = False) -> tuple[str, Any, Any]:
        name = self._modality_name(modality)
        mod = self.modality(name)
        tokens = mod.patchify([x if read else self._sample(x, mod)], self.model.spec)
        return name, mod, tokens

    # ------------------------------------------------------------------ the three calls
    def encode(self, x: Any, modality: str | None = None, *, sample: bool = False,
               generator: torch.Generator | None = None, read: bool = False) -> Encoding:
        """One sample (a tensor in [0, 1] for pixel modalities, or a file path) -> its tokens.
        ``modality`` may be left out when the checkpoint knows only one. ``read=True``: ``x`` is
        already in the modality's own form (what :meth:`Modality.read` returns), as batch
        extraction reads it."""
        name, mod, tokens = self._tokens(x, modality, read)
        patches = tokens.patches.to(self.device)
        stem = self._head(name)
        with self._inference():
            features = self.model.encode(patches, stem)
            out = self.model.bottleneck(features, sample=False, offset=self.model.latent_offset(patches, stem))
        posterior = out.aux.get("posterior")
        mean = out.latent.float()
        if sample:
            if posterior is None:
                raise TokenizerError(f"{self.source}: a discrete checkpoint has no posterior to sample")
            mean = posterior.sample(generator).float()
        frames = max(1, tokens.patches.features.shape[1] // self.model.patch_embed_of(stem).spec.frame_dim)
        return Encoding(
            modality=name, coords=patches.coords.cpu(), mean=mean.cpu(),
            codes=None if out.codes is None else out.codes.cpu(),
            logvar=None if posterior is None else posterior.logvar.float().cpu(),
            frames=frames, meta=dict(tokens.meta[0]),
        )

    def latent_of(self, enc: Encoding) -> torch.Tensor:
        """What the decoder reads for ``enc``: the values of its codes (discrete checkpoints) or its
        ``mean``; refuses a latent this checkpoint cannot decode."""
        bottleneck = self.model.bottleneck
        if enc.codes is not None:
            if not bottleneck.discrete:
                raise TokenizerError(f"{self.source}: these tokens are discrete codes; this checkpoint is continuous")
            return bottleneck.codes_to_latent(enc.codes.to(self.device))
        if bottleneck.discrete:
            raise TokenizerError(f"{self.source}: a discrete checkpoint decodes codes; these tokens have none "
                                 "(continuous latents of another checkpoint?)")
        if enc.mean.ndim != 2 or enc.mean.shape[1] != self.latent_dim:
            raise TokenizerError(f"{self.source}: expects {self.latent_dim}-channel latents, got shape "
                                 f"{tuple(enc.mean.shape)}")
        if not bool(torch.isfinite(enc.mean).all()):
            raise TokenizerError("the latent holds NaN or infinite values")
        return enc.mean.to(self.device, torch.float32)

    def decode(self, enc: Encoding) -> Any:
        """Tokens -> the sample in its input layout; pixels in [0, 1] for pixel modalities (of the
        part of the input that was tokenised, e.g. the centre crop under size_policy = 'crop')."""
        mod = self.modality(enc.modality)
        latent = Sparse4D.single(self.latent_of(enc), enc.coords.to(self.device))
        with self._inference():
            recon = self.model.decode(latent, enc.frames, self._head(enc.modality))
        out = mod.unpatchify(latent.with_features(recon.float().cpu()), [enc.meta], self.model.spec)[0]
        return mod.to_user(out)

    def _head(self, modality: str) -> str | None:
        """The model's own output head and input stem of ``modality``, None for the shared ones."""
        return modality if modality in self.model.heads else None

    def embed(self, x: Any, modality: str | None = None) -> torch.Tensor:
        """(D,) the pooled semantic embedding (W_s of the attention pool where the flavour has
        W_s), L2-normalised: what image-text similarity reads."""
        if self.model.pool_head is None:
            raise TokenizerError(f"{self.source}: flavour {self.recipe.model.flavor!r} has no semantic head")
        name, _, tokens = self._tokens(x, modality)
        patches = tokens.patches.to(self.device)
        with self._inference():
            emb = self.model.semantic_embedding(self.model.encode(patches, self._head(name)), patches)
        return F.normalize(emb.float(), dim=-1)[0].cpu()

    def reconstruct(self, x: Any, modality: str | None = None) -> Any:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x, modality))


def load(path: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         registries: Registries | None = None) -> Tokenizer:
    """Any atoken checkpoint (a run's ``step-*.safetensors`` / ``final.safetensors``, or one
    written by ``atoken import-official``), at a local path or fsspec URI. ``device``: default
    CUDA when available. ``dtype``: e.g. ``torch.bfloat16`` runs matmuls in bf16 (autocast)."""
    from atoken_core.build import model_from_checkpoint
    from atoken_core.plugin_manager import get_registries

    registries = registries or get_registries()
    model, recipe, meta = model_from_checkpoint(path, registries)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Tokenizer(model.to(device), recipe, registries, source=path, metadata=meta, dtype=dtype)
