"""Named model sizes. Recipes pick one by name (``[model] flavor = "so400m"``).

A flavour fixes the transformer's architecture; every way in which Apple's released AToken
differs from atoken's own flavours is a field here (RoPE base and axis order, the decoder's
norms, biases, QK-norm and position grid, 16-frame video chunks, the semantic head's output),
so the ``atoken-so-*`` flavours are configuration, not forks of the model code.
"""

from __future__ import annotations

from typing import Any

import attrs

AXES = ("t", "x", "y", "z")


def resolve_flavor(name: str, overrides: dict[str, Any] | None = None) -> Flavor:
    """The named flavour with some fields replaced (``[model] flavor_overrides``, already
    type-checked by the recipe): e.g. Apple's architecture at another width and depth."""
    return attrs.evolve(FLAVORS[name], **(overrides or {}))


def _axis_order(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if sorted(value) != sorted(AXES):
        raise ValueError(f"'{attribute.name}' must order the axes {AXES}, got {value!r}")


@attrs.frozen
class Flavor:
    width: int
    depth: int  # encoder blocks
    decoder_depth: int
    heads: int
    mlp: int
    patch_size: int = 16
    temporal_patch: int = 4
    # 4D RoPE: per axis, head_dim // 8 rotation pairs at frequencies rope_theta^(-j / (head_dim // 8));
    # the axis groups follow rope_axes inside each head (coordinates are [t, x, y, z], x the column).
    rope_theta: float = 100.0
    rope_axes: tuple[str, ...] = attrs.field(default=AXES, validator=_axis_order)
    # A learnable per-block frequency scale s (angles s * coord * freq): still a rotation by an
    # angle linear in the coordinate, so scores depend on coordinate differences only, for every
    # s; s = 0 switches RoPE off (SigLIP2 import starts there), training opens it.
    rope_scale: bool = False
    # SigLIP2 NaFlex style learned position embeddings of a g x g grid, resized to each
    # sample's patch grid and read at [row, col]. Set for flavours meant to start from a SigLIP2
    # checkpoint (encoder) and for Apple's release (encoder and decoder each have one).
    pos_embed_grid: int | None = None
    decoder_pos_embed_grid: int | None = None
    # decoder blocks: "layernorm" (LayerNorm with bias) or "rmsnorm"; linears with or without
    # bias; QK-norm (per-head RMS normalisation with a learned gain, before RoPE)
    decoder_norm: str = attrs.field(default="layernorm", validator=attrs.validators.in_(["layernorm", "rmsnorm"]))
    decoder_bias: bool = True
    decoder_qk_norm: bool = False
    # Videos run through the encoder and decoder in independent chunks of this many latent
    # frames, t restarting at 0 in each (Apple's release: 4 = 16 frames); None = the whole video
    # at once. (Long videos can also be run in KV-cached temporal tiles: AToken.encode_tiled.)
    temporal_chunk: int | None = None
    # SigLIP2's attention-pooling head: one vector per sample for understanding tasks.
    semantic: bool = False
    text_dim: int | None = None  # W_s output (the text tower's embedding size); None = width
    text_projection: bool = True  # W_s exists; False: the pooled vector itself is the embedding
    # SigLIP-style logit constants pairing the embedding with a text tower: logits =
    # exp(logit_scale) * cos + logit_bias (None: the flavour has none of its own).
    logit_scale: float | None = None
    logit_bias: float | None = None
    # Flavours of released weights fix what a recipe's first stage must use to load them: the
    # latent width, the bottleneck kind and settings of that bottleneck's config.
    latent_dim: int | None = None
    bottleneck: str | None = None
    bottleneck_settings: tuple[tuple[str, Any], ...] = ()
    description: str = ""

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


# Apple's release (github.com/apple/ml-atoken, configs/atoken-*.yaml): the SigLIP2-So400m/16
# encoder with biases and LayerNorm; a decoder of the same size with RMSNorm, QK-norm and no
# biases; RoPE 10000^(-j/head_dim) over axis groups (t, row, col, z) in encoder and decoder;
# each side its own learned 16 x 16 position grid; 16-frame video chunks.
_OFFICIAL = dict(
    width=1152, depth=27, decoder_depth=27, heads=16, mlp=4304, rope_theta=10000 ** (1 / 8),
    rope_axes=("t", "y", "x", "z"), pos_embed_grid=16, decoder_pos_embed_grid=16, decoder_norm="rmsnorm",
    decoder_bias=False, decoder_qk_norm=True, temporal_chunk=4, semantic=True, text_projection=False,
    logit_scale=4.8438, logit_bias=-15.5625,
)
_OFFICIAL_KL = (("bias", False),)
_OFFICIAL_FSQ = (("bias", False), ("levels", (4, 4, 4, 4, 4, 4)), ("logvar_rows", True))

FLAVORS: dict[str, Flavor] = {
    "test": Flavor(32, 1, 1, 2, 64, patch_size=4, temporal_patch=2, description="unit tests only"),
    "test-siglip": Flavor(64, 2, 1, 4, 128, patch_size=4, temporal_patch=2, pos_embed_grid=4, semantic=True,
                          rope_scale=True, description="unit tests of SigLIP2 import (a small so400m look-alike)"),
    "tiny": Flavor(192, 4, 4, 3, 768, description="CPU demo (~4M params)"),
    "base": Flavor(768, 12, 12, 12, 3072, description="ViT-B/16 encoder + decoder (~170M), the paper's capacity ablation"),
    # SigLIP2-so400m-patch16-naflex: 256 learned positions (16 x 16) and the pooling head.
    "so400m": Flavor(1152, 27, 27, 16, 4304, pos_embed_grid=16, semantic=True, rope_scale=True,
                     description="SigLIP2-So400m/16 encoder + decoder of the same size"),
    "atoken-so-c": Flavor(**_OFFICIAL, latent_dim=48, bottleneck="kl", bottleneck_settings=_OFFICIAL_KL,
                          description="Apple's AToken-So/C (and So/C-s2): continuous 48-channel latent"),
    "atoken-so-d": Flavor(**_OFFICIAL, latent_dim=48, bottleneck="fsq", bottleneck_settings=_OFFICIAL_FSQ,
                          description="Apple's AToken-So/D: FSQ, 8 codes of 4096 per token"),
    "atoken-so-c-s1": Flavor(**_OFFICIAL, latent_dim=32, bottleneck="kl", bottleneck_settings=_OFFICIAL_KL,
                             description="Apple's AToken-So/C stage 1 (images): continuous 32-channel latent"),
}
