"""Property-based tests of the 4D coordinate invariants (one invariant per test)."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from atoken_core.interfaces import PatchSpec
from atoken_core.model import RoPE4D
from atoken_core.sparse import Sparse4D
from atoken_modalities.image import ImageConfig
from atoken_modalities.image_impl import ImageModality

SPEC = PatchSpec(patch_size=4, temporal_patch=2, channels=3)
sizes = st.integers(min_value=1, max_value=23)
pad_modes = st.sampled_from(["replicate", "reflect", "constant"])


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@given(st.lists(st.tuples(sizes, sizes), min_size=1, max_size=4), pad_modes)
def test_image_patchify_round_trip(shapes, pad_mode):
    modality = ImageModality(ImageConfig(pad_mode=pad_mode))
    images = [image(h, w, i) for i, (h, w) in enumerate(shapes)]
    tokens = modality.patchify(images, SPEC)
    back = modality.unpatchify(tokens.patches, tokens.meta, SPEC)
    assert all(torch.equal(a, b) for a, b in zip(images, back))


@given(st.lists(st.tuples(sizes, sizes), min_size=1, max_size=4))
def test_image_tokens_live_in_xy_plane_unique_and_in_bounds(shapes):
    tokens = ImageModality(ImageConfig()).patchify([image(h, w) for h, w in shapes], SPEC)
    for sample, (h, w) in zip(tokens.patches.split(), shapes):
        c = sample.coords
        assert torch.all(c[:, 0] == 0) and torch.all(c[:, 3] == 0)
        assert len({tuple(r) for r in c.tolist()}) == c.shape[0]
        assert c[:, 1].min() >= 0 and c[:, 1].max() < math.ceil(w / 4)
        assert c[:, 2].min() >= 0 and c[:, 2].max() < math.ceil(h / 4)


@given(st.lists(st.tuples(sizes, sizes), min_size=1, max_size=4))
def test_image_token_count_formula(shapes):
    tokens = ImageModality(ImageConfig()).patchify([image(h, w) for h, w in shapes], SPEC)
    expected = [math.ceil(h / 4) * math.ceil(w / 4) for h, w in shapes]
    assert tokens.patches.lengths.tolist() == expected
    assert tokens.patches.features.shape == (sum(expected), 4 * 4 * 3)


@given(st.integers(1, 8), st.integers(0, 1000))
def test_image_patch_pixels_are_channel_last_blocks(grid, seed):
    # Token (row r, col c) holds pixels [r*p:(r+1)*p, c*p:(c+1)*p] flattened as (ph, pw, C).
    x = image(grid * 4, grid * 4 + 4, seed)
    tokens = ImageModality(ImageConfig()).patchify([x], SPEC)
    for (_t, col, row, _z), feat in zip(tokens.patches.coords.tolist(), tokens.patches.features):
        block = x[:, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4].permute(1, 2, 0).flatten()
        assert torch.equal(feat, block)


coords4 = st.lists(st.integers(-40, 40), min_size=4, max_size=4)


@given(coords4, coords4, coords4, st.integers(0, 2**31 - 1))
def test_rope_scores_depend_only_on_coordinate_difference(a, b, shift, seed):
    rope = RoPE4D(head_dim=32, theta=100.0)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 32, generator=g), torch.randn(1, 1, 32, generator=g)

    def score(pa, pb):
        ca, cb = torch.tensor([pa]), torch.tensor([pb])
        return (rope(q, rope.angles(ca)) * rope(k, rope.angles(cb))).sum()

    moved = score([x + s for x, s in zip(a, shift)], [x + s for x, s in zip(b, shift)])
    torch.testing.assert_close(score(a, b), moved, atol=1e-4, rtol=1e-4)


@given(st.integers(0, 3), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_rope_uses_every_axis(axis, delta, seed):
    # Each axis owns its own rotation pairs: moving along any one axis changes the score.
    rope = RoPE4D(head_dim=32, theta=100.0)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 32, generator=g)
    zero = torch.zeros(1, 4, dtype=torch.long)
    moved = zero.clone()
    moved[0, axis] = delta
    rotated = rope(q, rope.angles(moved))
    group = slice(axis * 8, axis * 8 + 8)
    others = torch.ones(32, dtype=torch.bool)
    others[group] = False
    assert not torch.allclose(rotated[..., group], q[..., group])
    assert torch.equal(rotated[..., others], q[..., others])


@given(st.lists(st.integers(1, 12), min_size=1, max_size=5))
def test_sparse_cat_split_round_trip(lengths):
    parts = [Sparse4D.single(torch.randn(n, 3), torch.randint(0, 9, (n, 4))) for n in lengths]
    packed = Sparse4D.cat(parts)
    assert packed.lengths.tolist() == lengths
    assert packed.sample_ids().tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    for a, b in zip(parts, packed.split()):
        assert torch.equal(a.features, b.features) and torch.equal(a.coords, b.coords)
