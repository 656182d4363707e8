"""Named model sizes. Recipes pick one by name (``[model] flavor = "so400m"``)."""

from __future__ import annotations

import attrs


@attrs.frozen
class Flavor:
    width: int
    depth: int  # encoder blocks
    decoder_depth: int
    heads: int
    mlp: int
    patch_size: int = 16
    temporal_patch: int = 4
    rope_theta: float = 100.0
    # SigLIP2 NaFlex style learned position embeddings of a g x g grid, resized to each
    # sample's patch grid. Set for flavours meant to start from a SigLIP2 checkpoint: the
    # encoder then also carries a per-block RoPE gate (see model.Attention).
    pos_embed_grid: int | None = None
    # SigLIP2's attention-pooling head: one vector per sample for understanding tasks.
    semantic: bool = False
    text_dim: int | None = None  # W_s output (the text tower's embedding size); None = width
    description: str = ""

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


FLAVORS: dict[str, Flavor] = {
    "test": Flavor(32, 1, 1, 2, 64, patch_size=4, temporal_patch=2, description="unit tests only"),
    "test-siglip": Flavor(64, 2, 1, 4, 128, patch_size=4, temporal_patch=2, pos_embed_grid=4, semantic=True,
                          description="unit tests of SigLIP2 import (a small so400m look-alike)"),
    "tiny": Flavor(192, 4, 4, 3, 768, description="CPU demo (~4M params)"),
    "base": Flavor(768, 12, 12, 12, 3072, description="ViT-B/16 encoder + decoder (~170M), the paper's capacity ablation"),
    # SigLIP2-so400m-patch16-naflex: 256 learned positions (16 x 16) and the pooling head.
    "so400m": Flavor(1152, 27, 27, 16, 4304, pos_embed_grid=16, semantic=True,
                     description="SigLIP2-So400m/16 encoder + decoder of the same size"),
}
