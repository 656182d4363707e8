"""Temporal tiling with a KV cache: equal to full attention restricted to (this tile, previous tile)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from atoken_core.sparse import Sparse4D
from atoken_modalities.video import VideoConfig
from atoken_modalities.video_impl import VideoModality

TOL = {"atol": 2e-5, "rtol": 2e-5}


def video_tokens(model, frames: int, seed: int = 0) -> Sparse4D:
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(frames, 3, 8, 12, generator=g) * 2 - 1
    return VideoModality(VideoConfig()).patchify([video], model.spec).patches


def masked_reference(model, blocks, x_ld, tokens, norm, tile_blocks):
    """All tokens at once; token i may attend to token j iff j's tile is i's tile or the one before."""
    tile = tokens.coords[:, 0] // tile_blocks
    allowed_ll = (tile[None, :] == tile[:, None]) | (tile[None, :] == tile[:, None] - 1)
    angles = model.rope.angles(tokens.coords)
    for block in blocks:
        q, k, v = block.attn.qkv_rotated(block.norm1(x_ld), angles)
        out = F.scaled_dot_product_attention(*(rearrange(t, "l h d -> 1 h l d") for t in (q, k, v)),
                                             attn_mask=allowed_ll)
        x_ld = x_ld + block.attn.proj(rearrange(out, "1 h l d -> l (h d)"))
        x_ld = x_ld + block.mlp(block.norm2(x_ld))
    return norm(x_ld)


@pytest.fixture(scope="module")
def model(registries):
    torch.manual_seed(0)
    m = make_model(registries).eval()
    with torch.no_grad():  # make later frames count, as in a trained model
        torch.nn.init.normal_(m.patch_embed.weight, std=0.05)
    return m


@given(st.integers(1, 12), st.integers(1, 3), st.integers(0, 100))
def test_tiled_encoder_equals_masked_full_attention(model, frames, tile_blocks, seed):
    tokens = video_tokens(model, frames, seed)
    with torch.no_grad():
        tiled = model.encode_tiled(tokens, tile_blocks)
        reference = masked_reference(model, model.encoder, model.embed(tokens), tokens, model.encoder_norm,
                                     tile_blocks)
    torch.testing.assert_close(tiled, reference, **TOL)


@given(st.integers(1, 12), st.integers(1, 3), st.integers(0, 100))
def test_tiled_decoder_equals_masked_full_attention(model, frames, tile_blocks, seed):
    tokens = video_tokens(model, frames, seed)
    with torch.no_grad():
        latent = tokens.with_features(model.encode_latent(tokens))
        tiled = model.decode_tiled(latent, tile_blocks, frames=2)
        x = masked_reference(model, model.decoder, model.decoder_in(latent.features), latent, model.decoder_norm,
                             tile_blocks)
        reference = model.pixel_head(x)
    torch.testing.assert_close(tiled, reference, **TOL)


@given(st.integers(1, 12), st.integers(1, 3), st.integers(0, 100))
def test_tiled_latent_is_the_tiled_encoding_projected(model, frames, tile_blocks, seed):
    # encode_latent_tiled projects each tile as it goes; the result is W_r of the whole tiled encoding
    tokens = video_tokens(model, frames, seed)
    with torch.no_grad():
        streamed = model.encode_latent_tiled(tokens, tile_blocks)
        reference = model.bottleneck.encode_project(model.encode_tiled(tokens, tile_blocks))
    torch.testing.assert_close(streamed, reference, **TOL)


@given(st.integers(1, 6), st.integers(0, 100))
def test_one_tile_is_the_untiled_model(model, frames, seed):
    tokens = video_tokens(model, frames, seed)
    blocks = -(-frames // model.spec.temporal_patch)  # every temporal block in one tile
    with torch.no_grad():
        torch.testing.assert_close(model.encode_tiled(tokens, blocks), model.encode(tokens), **TOL)
        latent = tokens.with_features(model.encode_latent(tokens))
        torch.testing.assert_close(model.decode_tiled(latent, blocks, 2), model.decode(latent, 2), **TOL)


def test_tiling_rejects_what_it_cannot_do(model):
    tokens = video_tokens(model, 6)
    with pytest.raises(ValueError, match="one sample at a time"):
        model.encode_tiled(Sparse4D.cat([tokens, tokens]), 1)
    reversed_tokens = Sparse4D.single(tokens.features.flip(0), tokens.coords.flip(0))
    with pytest.raises(ValueError, match="ordered by time"):
        model.encode_tiled(reversed_tokens, 1)
    with pytest.raises(ValueError, match="tile_blocks must be >= 1"):
        model.encode_tiled(tokens, 0)
