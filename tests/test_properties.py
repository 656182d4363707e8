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


@given(coords4, coords4, coords4, st.floats(0.0, 2.0), st.permutations(list("txyz")),
       st.sampled_from([100.0, 10000 ** (1 / 8)]), st.booleans(), st.integers(0, 2**31 - 1))
def test_attention_scores_depend_only_on_coordinate_difference_in_every_state(a, b, shift, scale, axes, theta,
                                                                              qk_norm, seed):
    # Every state the model can be in: any learned RoPE frequency scale (0 = SigLIP2 just
    # imported, 1 = plain RoPE, anything training reaches), any axis order and base, QK-norm on
    # or off. (The RoPE gate this replaced, q + g * (rope(q) - q), failed this for 0 < g < 1.)
    from atoken_core.model import Attention

    torch.manual_seed(seed)
    attn = Attention(16, 2, RoPE4D(head_dim=8, theta=theta, axes=tuple(axes)), qk_norm=qk_norm, rope_scale=True)
    with torch.no_grad():
        attn.rope_scale.fill_(scale)
    x = torch.randn(2, 16)

    def scores(pa, pb):
        coords = torch.tensor([pa, pb])
        q, k, _ = attn.qkv_rotated(x, attn.rope.angles(coords))
        return (q[0] * k[1]).sum(-1)  # (heads,): query at pa, key at pb

    moved = scores([x + s for x, s in zip(a, shift)], [x + s for x, s in zip(b, shift)])
    torch.testing.assert_close(scores(a, b), moved, atol=1e-4, rtol=1e-4)


@given(st.permutations(list("txyz")), st.integers(0, 3), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_rope_axis_groups_follow_the_axis_order(axes, axis, delta, seed):
    # Moving along one coordinate turns exactly the channel group at that axis's place in ``axes``.
    rope = RoPE4D(head_dim=32, theta=100.0, axes=tuple(axes))
    q = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(seed))
    moved = torch.zeros(1, 4, dtype=torch.long)
    moved[0, axis] = delta
    rotated = rope(q, rope.angles(moved))
    place = axes.index("txyz"[axis])
    group = torch.zeros(32, dtype=torch.bool)
    group[place * 8 : place * 8 + 8] = True
    assert not torch.allclose(rotated[..., group], q[..., group])
    assert torch.equal(rotated[..., ~group], q[..., ~group])


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


@given(st.integers(1, 9), st.integers(4, 30), st.integers(4, 30), st.integers(0, 2**31 - 1))
def test_crop_policy_keeps_the_centre_whole_patches_and_first_whole_temporal_patches(t, h, w, seed):
    # size_policy = "crop" is Apple's preprocessing: H, W cut to multiples of p around the
    # centre (the odd row/column at the bottom/right), T cut to its first whole temporal patches.
    from atoken_modalities.video import VideoConfig
    from atoken_modalities.video_impl import VideoModality

    x = image(h, w, seed)
    h2, w2 = h // 4 * 4, w // 4 * 4
    top, left = (h - h2) // 2, (w - w2) // 2
    images = ImageModality(ImageConfig(size_policy="crop"))
    tokens = images.patchify([x], SPEC)
    assert tokens.patches.num_tokens == (h2 // 4) * (w2 // 4)
    assert torch.equal(images.unpatchify(tokens.patches, tokens.meta, SPEC)[0], x[:, top:top + h2, left:left + w2])
    clip = torch.stack([image(h, w, seed + i) for i in range(t)])
    videos = VideoModality(VideoConfig(size_policy="crop"))
    if t < 2:
        try:
            videos.patchify([clip], SPEC)
        except ValueError as err:
            assert "shorter than one temporal patch" in str(err)
        else:
            raise AssertionError("a clip shorter than one temporal patch was accepted")
        return
    tokens = videos.patchify([clip], SPEC)
    kept = clip[: t // 2 * 2, :, top:top + h2, left:left + w2]
    assert torch.equal(videos.unpatchify(tokens.patches, tokens.meta, SPEC)[0], kept)
    assert torch.equal(videos.targets([clip], SPEC)[0], kept)
