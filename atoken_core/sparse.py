"""Sparse 4D latents: a packed batch of (feature, [t, x, y, z]) pairs.

Samples of different sizes (an image of 12 tokens, another of 1080) are concatenated along
one token axis; ``cu_seqlens`` (cumulative lengths, as flash-attention's varlen API uses)
says where each sample starts, so nothing is padded. A host copy of ``cu_seqlens`` (``offsets``)
travels with it, so packing decisions (equal lengths? where does each sample start?) never read
a GPU tensor: the one read happens when a batch is built on the device, none when a CPU batch
is moved there.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

AXES = ("t", "x", "y", "z")


@attrs.frozen
class Sparse4D:
    features: torch.Tensor  # (L, C)
    coords: torch.Tensor  # (L, 4) int64, columns [t, x, y, z]
    cu_seqlens: torch.Tensor  # (B + 1,) int64, cu_seqlens[0] = 0, cu_seqlens[-1] = L
    #: ``cu_seqlens`` on the host (read from it when not given)
    offsets: tuple[int, ...] = attrs.field(default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        L = self.features.shape[0]
        if self.features.ndim != 2:
            raise ValueError(f"features must be (L, C), got {tuple(self.features.shape)}")
        if self.coords.shape != (L, 4):
            raise ValueError(f"coords must be ({L}, 4), got {tuple(self.coords.shape)}")
        if self.coords.dtype.is_floating_point:
            raise ValueError("coords must be integer grid positions")
        if self.cu_seqlens.ndim != 1:
            raise ValueError(f"cu_seqlens must be (B + 1,), got shape {tuple(self.cu_seqlens.shape)}")
        if self.offsets is None:
            object.__setattr__(self, "offsets", tuple(self.cu_seqlens.tolist()))
        if len(self.offsets) != self.cu_seqlens.numel() or self.offsets[0] != 0 or self.offsets[-1] != L:
            raise ValueError(f"cu_seqlens must run from 0 to {L}, got {list(self.offsets)}")

    @classmethod
    def single(cls, features: torch.Tensor, coords: torch.Tensor) -> Sparse4D:
        cu = torch.tensor([0, features.shape[0]], dtype=torch.long, device=features.device)
        return cls(features, coords.long(), cu, (0, features.shape[0]))

    @classmethod
    def cat(cls, samples: Sequence[Sparse4D]) -> Sparse4D:
        if not samples:
            raise ValueError("cannot pack an empty list of samples")
        offsets = [0]
        for s in samples:
            offsets += [offsets[-1] + n for n in s.host_lengths()]
        cu = torch.tensor(offsets, dtype=torch.long, device=samples[0].cu_seqlens.device)
        return cls(torch.cat([s.features for s in samples]), torch.cat([s.coords for s in samples]), cu, tuple(offsets))

    @classmethod
    def pack(cls, samples: Sequence[Sparse4D]) -> Sparse4D:
        """Like :meth:`cat`, for samples whose feature widths differ (an image token holds one
        frame, a video token ``t``): narrower features are zero-padded on the right. For patch
        pixels this is exact: a linear patch embedding gives zero-filled frames zero weight."""
        width = max(s.features.shape[1] for s in samples)
        return cls.cat([s.with_features(torch.nn.functional.pad(s.features, (0, width - s.features.shape[1])))
                        for s in samples])

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    def sample_ids(self) -> torch.Tensor:
        """(L,) index of the sample each token belongs to."""
        return torch.repeat_interleave(torch.arange(self.batch_size, device=self.features.device), self.lengths,
                                       output_size=self.num_tokens)  # a known size: no device read

    def host_lengths(self) -> list[int]:
        """Tokens per sample, from the host copy (no device read)."""
        return [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def uniform_length(self) -> int | None:
        """The common length if every sample has the same number of tokens, else None."""
        lengths = self.host_lengths()
        return lengths[0] if lengths and all(n == lengths[0] for n in lengths) else None

    def length_groups(self) -> list[tuple[int, list[int], torch.Tensor]]:
        """The samples grouped by token count, shortest first, empty samples left out: (length,
        sample indices, (b, length) token rows), from the host copy of the offsets."""
        device, lengths = self.cu_seqlens.device, self.host_lengths()
        groups = []
        for n in sorted(set(lengths) - {0}):
            which = [i for i, m in enumerate(lengths) if m == n]
            first = torch.tensor([self.offsets[i] for i in which], device=device)
            groups.append((n, which, first[:, None] + torch.arange(n, device=device)))
        return groups

    def to(self, device: torch.device | str) -> Sparse4D:
        return Sparse4D(self.features.to(device), self.coords.to(device), self.cu_seqlens.to(device), self.offsets)

    def with_features(self, features: torch.Tensor) -> Sparse4D:
        return Sparse4D(features, self.coords, self.cu_seqlens, self.offsets)

    def chunk_time(self, chunk: int) -> Sparse4D:
        """Every sample cut into runs of ``chunk`` time steps (``t // chunk``), each run packed
        as a sample of its own with t restarting at 0: the same tokens in the same order, with
        finer ``cu_seqlens``. Tokens must be ordered by time within each sample (as the video
        modality emits them), so that each run is contiguous."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        t = self.coords[:, 0]
        if t.numel() == 0 or int(t.max()) < chunk:
            return self  # one run per sample (images, 3D, short clips): nothing to cut
        if bool((t < 0).any()):
            raise ValueError("temporal chunks need t >= 0")
        run = torch.div(t, chunk, rounding_mode="floor")
        ids = self.sample_ids()
        same_sample = ids[1:] == ids[:-1]
        if bool(((run[1:] < run[:-1]) & same_sample).any()):
            raise ValueError("temporal chunks need each sample's tokens ordered by time")
        starts = torch.nonzero(~same_sample | (run[1:] != run[:-1])).flatten() + 1
        cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), self.num_tokens)])
        coords = self.coords.clone()
        coords[:, 0] = t - run * chunk
        return Sparse4D(self.features, coords, cu)

    def split(self) -> list[Sparse4D]:
        bounds = self.offsets
        return [
            Sparse4D.single(self.features[a:b], self.coords[a:b]) for a, b in zip(bounds[:-1], bounds[1:])
        ]
