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
    description: str = ""

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


FLAVORS: dict[str, Flavor] = {
    "test": Flavor(32, 1, 1, 2, 64, patch_size=4, temporal_patch=2, description="unit tests only"),
    "tiny": Flavor(192, 4, 4, 3, 768, description="CPU demo (~4M params)"),
    "base": Flavor(768, 12, 12, 12, 3072, description="ViT-B/16 encoder + decoder (~170M), the paper's capacity ablation"),
    "so400m": Flavor(1152, 27, 27, 16, 4304, description="SigLIP2-So400m/16 encoder + decoder of the same size"),
}
