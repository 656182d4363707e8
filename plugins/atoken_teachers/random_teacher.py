"""A deterministic random teacher: a stand-in for SigLIP2 in tests and CPU demos.

It has the teacher's shape, not its knowledge: embeddings are fixed random functions of the
input, identical for a given seed in every process, with no meaningful image-text alignment.
Use it to exercise the semantic losses end to end where SigLIP2's weights are not at hand.

- image tower: two fixed random convolutions (4x4 stride 4, then 3x3 stride 2, GELU) whose
  feature maps are summarised by their spatial mean and standard deviation, then a fixed
  random linear map to ``embed_dim``. Any image of at least 4x4 pixels works.
- text tower: a bag of words. Each lower-cased word (``\\w+``) maps to a random vector seeded
  by the teacher's seed and the word's CRC32 (stable across processes, unlike ``hash``);
  a text's embedding is the sum over its words plus a start vector, so the empty text and
  word order have no special meaning.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from atoken_core.interfaces import Teacher

_WORD = re.compile(r"\w+")
_START = "<start>"  # contributes to every text, so that no text embeds as the zero vector


class RandomTeacher(Teacher):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_dim = config.embed_dim
        self.logit_scale = float(config.logit_scale)
        self.logit_bias = float(config.logit_bias)
        self.seed = config.seed
        w = config.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=4, stride=4)
        self.conv2 = nn.Conv2d(w, w, kernel_size=3, stride=2, padding=1)
        self.proj = nn.Linear(2 * w, config.embed_dim)
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            for module in (self.conv1, self.conv2, self.proj):
                fan_in = module.weight[0].numel()
                # He-style scale keeps activations O(1) through the GELUs
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        self._words: dict[str, torch.Tensor] = {}
        self.freeze()

    def encode_image(self, images_bchw: torch.Tensor) -> torch.Tensor:
        x = images_bchw.to(self.proj.weight.dtype)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        stats_bf = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)], dim=1)
        return F.normalize(self.proj(stats_bf), dim=-1)

    def _word_vector(self, word: str) -> torch.Tensor:
        if word not in self._words:
            seed = (self.seed * 1_000_003 + zlib.crc32(word.encode("utf-8"))) % (2**63)
            self._words[word] = torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(seed))
        return self._words[word]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        rows = [sum((self._word_vector(w) for w in _WORD.findall(text.lower())), self._word_vector(_START))
                for text in texts]
        text_nd = torch.stack(rows) if rows else torch.zeros(0, self.embed_dim)
        return F.normalize(text_nd, dim=-1).to(self.proj.weight.device)
