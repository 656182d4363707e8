"""Model, bottlenecks and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from hypothesis import given
from hypothesis import strategies as st

from atoken_bottlenecks import FSQConfig
from atoken_bottlenecks.fsq import FSQBottleneck
from atoken_core.checkpoint import CheckpointError, load_model_state, read_checkpoint, save_checkpoint
from atoken_core.sparse import Sparse4D

levels_st = st.lists(st.integers(2, 9), min_size=1, max_size=4)


def fsq(levels, groups=2):
    return FSQBottleneck(FSQConfig(levels=levels), in_dim=16, latent_dim=groups * len(levels))


@given(levels_st, st.integers(0, 2**31 - 1))
def test_fsq_codes_in_range_and_values_on_grid(levels, seed):
    b = fsq(levels)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(seed)) * 10
    out = b(x)
    assert out.codes.dtype == torch.long and out.codes.shape == (50, 2)
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < math.prod(levels) == b.codebook_size
    # every channel takes one of exactly L values: (d - L//2) / (L//2), d = 0..L-1
    for c, lv in enumerate(levels * 2):
        allowed = torch.tensor([(d - lv // 2) / (lv // 2) for d in range(lv)])
        assert torch.isclose(out.latent[:, c, None], allowed).any(-1).all()


@given(levels_st, st.integers(0, 2**31 - 1))
def test_fsq_code_latent_code_identity(levels, seed):
    b = fsq(levels)
    codes = torch.randint(0, b.codebook_size, (40, 2), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(b.latent_to_codes(b.codes_to_latent(codes)), codes)


def test_fsq_reaches_every_level_and_passes_gradients():
    b = fsq([5, 4])
    z = torch.linspace(-6, 6, 400)[:, None].repeat(1, 4).requires_grad_()
    q = b.quantize(z)
    assert q[:, 0].unique().numel() == 5 and q[:, 1].unique().numel() == 4
    q.sum().backward()
    assert (z.grad != 0).any()  # straight-through estimator
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 20\)"):
        b.codes_to_latent(torch.tensor([[20, 0]]))


def test_fsq_latent_dim_must_fit_levels():
    with pytest.raises(ValueError, match="not a multiple of len"):
        FSQBottleneck(FSQConfig(levels=[8, 5, 5]), in_dim=8, latent_dim=8)


def random_tokens(lengths, seed=0, feat=48):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        coords = torch.zeros(n, 4, dtype=torch.long)
        coords[:, 1:3] = torch.randint(0, 10, (n, 2), generator=g)
        parts.append(Sparse4D.single(torch.randn(n, feat, generator=g), coords))
    return parts


@given(st.lists(st.integers(1, 9), min_size=2, max_size=4), st.integers(0, 1000))
def test_packed_samples_do_not_see_each_other(registries, lengths, seed):
    model = make_model(registries).eval()
    parts = random_tokens(lengths, seed)
    with torch.no_grad():
        packed, _ = model(Sparse4D.cat(parts), sample=False)
        alone = torch.cat([model(p, sample=False)[0] for p in parts])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@given(st.integers(2, 12), st.integers(0, 1000))
def test_permuting_tokens_with_coords_permutes_output(registries, n, seed):
    model = make_model(registries).eval()
    (tokens,) = random_tokens([n], seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out, _ = model(tokens, sample=False)
        out_p, _ = model(Sparse4D.single(tokens.features[perm], tokens.coords[perm]), sample=False)
    torch.testing.assert_close(out_p, out[perm], atol=1e-5, rtol=1e-5)


def test_video_of_identical_frames_embeds_like_the_image(registries):
    # Temporal patch weights start at zero: a t-frame block of one repeated frame gives the
    # same features as the single frame.
    model = make_model(registries).eval()
    (img,) = random_tokens([6])
    t = model.spec.temporal_patch
    video = img.with_features(img.features.repeat(1, t))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(video), model.encode(img), atol=0, rtol=0)


def test_kl_bottleneck_mode_and_sampling(registries):
    model = make_model(registries, logvar_init=-4.0).requires_grad_(False)
    feats = torch.randn(10, model.flavor.width)
    out = model.bottleneck(feats, sample=False)
    torch.testing.assert_close(out.latent, out.aux["posterior"].mean)
    logvar = out.aux["posterior"].logvar
    assert abs(float(logvar.mean()) + 4.0) < 0.5  # the logvar head starts at its configured bias
    torch.manual_seed(0)
    noise = model.bottleneck(feats.repeat(200, 1), sample=True).latent - out.latent.repeat(200, 1)
    assert abs(float(noise.std()) - math.exp(-2.0)) < 0.03


def test_checkpoint_round_trip_and_metadata(registries, tmp_path):
    model = make_model(registries)
    opt = torch.optim.AdamW(model.parameters())
    model(random_tokens([5])[0])[0].sum().backward()
    opt.step()
    path = str(tmp_path / "c.safetensors")
    save_checkpoint(path, model, recipe={"name": "x"}, step=3, stage=0, optimizer=opt)
    assert not list(tmp_path.glob("*.tmp-*")), "no temporary file left behind"
    tensors, meta = read_checkpoint(path)
    assert meta["recipe"] == {"name": "x"} and meta["state"]["step"] == 3 and meta["atoken_version"]
    other = make_model(registries)
    load_model_state(other, tensors, path)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_from_other_architecture_lists_differences(registries, tmp_path):
    path = str(tmp_path / "c.safetensors")
    save_checkpoint(path, make_model(registries, latent_dim=8), recipe={}, step=0, stage=0)
    tensors, _ = read_checkpoint(path)
    with pytest.raises(CheckpointError) as err:
        load_model_state(make_model(registries, bottleneck="fsq", latent_dim=6, levels=[4, 3, 3]), tensors, path)
    msg = str(err.value)
    assert "does not match this model" in msg and "shape mismatch bottleneck.proj.weight" in msg
    assert "decoder_in.weight: checkpoint (32, 8) vs model (32, 6)" in msg


def test_corrupt_or_foreign_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(str(bad))
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not an atoken checkpoint"):
        read_checkpoint(str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(str(tmp_path / "none.safetensors"))


@pytest.mark.parametrize("kind, params, old, new", [("kl", {}, 8, 12), ("fsq", {"levels": [5, 4]}, 8, 12)])
@pytest.mark.parametrize("shortcut", [False, True])
def test_growing_the_latent_keeps_reconstructions(registries, kind, params, old, new, shortcut):
    # The paper grows z_r from 32 to 48 channels at stage 2: the switch must not change what
    # stage 1 reconstructs.
    torch.manual_seed(0)
    model = make_model(registries, kind, latent_dim=old, shortcut=shortcut, **params).eval()
    if shortcut:  # a non-trivial shortcut, so its growth is exercised too
        model.init_shortcut(torch.randn(48), torch.linalg.qr(torch.randn(48, old))[0].T, torch.rand(old) + 0.5)
        torch.nn.init.normal_(model.pixel_head.weight, std=0.02)
    tokens = Sparse4D.cat(random_tokens([5, 7]))
    with torch.no_grad():
        before, _ = model(tokens, sample=False)
    component = registries["bottleneck"].get(kind)
    model.replace_bottleneck(component.build(component.config(**params), in_dim=model.flavor.width, latent_dim=new))
    assert model.bottleneck.latent_dim == new and model.decoder_in.in_features == new
    with torch.no_grad():
        after, bott = model(tokens, sample=False)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert bott.latent.shape == (12, new)
    # the new channels are live: they get gradients and can learn
    model.train()
    out, _ = model(tokens)
    (out - torch.randn_like(out)).square().sum().backward()
    assert model.decoder_in.weight.grad[:, old:].abs().sum() > 0


def test_kl_to_fsq_switch_quantises_the_learned_latent(registries):
    # Stage 4 of the curriculum: FSQ takes over the KL mean's projection, so the decoder first
    # sees a rounded version of the latent it was trained on, not a fresh random projection's.
    torch.manual_seed(0)
    model = make_model(registries, latent_dim=8).eval()
    with torch.no_grad():
        model.bottleneck.proj.weight.normal_(std=0.1)  # latents of order 1, like a trained model's
    tokens = Sparse4D.cat(random_tokens([12], seed=1))
    with torch.no_grad():
        kl_latent = model.encode_latent(tokens)
    fresh = fsq([7, 7], groups=4)
    fresh.proj = torch.nn.Linear(model.flavor.width, 8)  # a fresh W_r of the model's width
    converted = fsq([7, 7], groups=4)
    converted.proj = torch.nn.Linear(model.flavor.width, 8)
    assert converted.convert_from(model.bottleneck)
    torch.testing.assert_close(converted.proj.weight, model.bottleneck.proj.weight[:8])
    with torch.no_grad():
        feats = model.encode(tokens)
        err_converted = (converted(feats).latent - kl_latent).abs().mean()
        err_fresh = (fresh(feats).latent - kl_latent).abs().mean()
    assert err_converted < 0.5 * err_fresh
    model.replace_bottleneck(converted)  # the model keeps the converted projection
    assert model.bottleneck is converted


def test_compiled_blocks_match_eager_without_graph_breaks(registries):
    """`[parallel] compile = true`: each block compiled with dynamic shapes gives the eager
    outputs and gradients, for equal and mixed sample lengths and a changed token count, and
    traces in one graph per block (attention grouping is decided outside the blocks)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = make_model(registries)
    compiled = make_model(registries)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    for lengths in ([10, 10, 10], [5, 12, 7], [9, 9]):
        tokens = Sparse4D.cat(random_tokens(lengths, seed=len(lengths)))
        outs, grads = [], []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            recon, _ = model(tokens, sample=False)
            recon.square().mean().backward()
            outs.append(recon.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.encoder.parameters()]))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_checkpoint_of_an_earlier_version_says_what_changed(registries, tmp_path):
    # atoken 0.1's SigLIP flavours had a RoPE gate per encoder block; its checkpoints must fail
    # to load with the reason, not just a list of keys.
    model = make_model(registries, flavor="test-siglip")
    path = str(tmp_path / "old.safetensors")
    save_checkpoint(path, model, recipe={}, step=0, stage=0)
    tensors, _ = read_checkpoint(path)
    old = {k.replace("attn.rope_scale", "attn.rope_gate"): v for k, v in tensors.items()}
    with pytest.raises(CheckpointError) as err:
        load_model_state(make_model(registries, flavor="test-siglip"), old, path)
    assert "unexpected keys (2): encoder.0.attn.rope_gate, encoder.1.attn.rope_gate" in str(err.value)
    assert "attn.rope_gate: written by atoken 0.1" in str(err.value)


def test_fsq_over_a_kl_mean_projection_uses_the_official_index(registries):
    # Apple's So/D: W_r is a KL projection [mean | logvar] without bias; the mean is quantised
    # with levels [4]*6 in groups of 6 channels; index = sum_k (2 q_k + 2) * 4^k.
    kl = registries["bottleneck"].get("kl")
    fsq = registries["bottleneck"].get("fsq")
    cont = kl.build(kl.config(bias=False), in_dim=16, latent_dim=12)
    disc = fsq.build(fsq.config(bias=False, logvar_rows=True, levels=[4] * 6), in_dim=16, latent_dim=12)
    assert disc.proj.weight.shape == cont.proj.weight.shape == (24, 16) and disc.proj.bias is None
    assert disc.convert_from(cont)
    x = torch.randn(30, 16) * 3
    mean = cont(x, sample=False).latent
    z = torch.tanh(mean + math.atanh(0.5 / 1.5015)) * 1.5015 - 0.5
    q = z.round() / 2
    out = disc(x)
    torch.testing.assert_close(out.latent, q, atol=0, rtol=0)
    digits = (2 * q + 2).reshape(30, 2, 6)
    index = (digits * 4 ** torch.arange(6)).sum(-1).long()
    assert torch.equal(out.codes, index)
    torch.testing.assert_close(disc.codes_to_latent(out.codes), q, atol=0, rtol=0)


def test_decoder_norms_match_their_formulas():
    from atoken_core.model import HeadRMSNorm, RMSNorm

    x = torch.randn(7, 4, 16)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-6))
    qk = HeadRMSNorm(4, 16)
    with torch.no_grad():
        qk.gamma.uniform_(0.5, 1.5)
    want = x / x.norm(dim=-1, keepdim=True) * qk.gamma * 4.0
    torch.testing.assert_close(qk(x), want)


def test_temporal_chunks_are_independent_samples_with_t_restarted(registries):
    # A flavour with temporal_chunk = 2: a 5-latent-frame video is encoded and decoded as the
    # chunks [0, 2), [2, 4), [4, 5), each alone with t starting at 0.
    import attrs

    from atoken_core.flavors import FLAVORS
    from atoken_core.model import AToken

    flavor = attrs.evolve(FLAVORS["test"], temporal_chunk=2, pos_embed_grid=4, decoder_pos_embed_grid=4)
    kl = registries["bottleneck"].get("kl")
    model = AToken(flavor, kl.build(kl.config(), in_dim=flavor.width, latent_dim=8)).eval()
    t, rows, cols = torch.meshgrid(torch.arange(5), torch.arange(3), torch.arange(2), indexing="ij")
    coords = torch.stack([t, cols, rows, torch.zeros_like(t)], -1).reshape(-1, 4)
    video = Sparse4D.single(torch.randn(30, 2 * 4 * 4 * 3), coords)
    image = Sparse4D.single(torch.randn(4, 2 * 4 * 4 * 3), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                                           [0, 1, 1, 0]]))
    batch = Sparse4D.cat([image, video])
    with torch.no_grad():
        feats = model.encode(batch)
        chunks = [Sparse4D.single(video.features[a:b], video.coords[a:b] - torch.tensor([a // 6, 0, 0, 0]))
                  for a, b in ((0, 12), (12, 24), (24, 30))]
        alone = torch.cat([model.encode(image)] + [model.encode(c) for c in chunks])
        torch.testing.assert_close(feats, alone, atol=1e-5, rtol=1e-5)
        latent = batch.with_features(torch.randn(34, 8))
        dec = model.decode(latent, frames=2)
        dec_alone = torch.cat([model.decode(latent.split()[0], 2)] + [
            model.decode(c.with_features(latent.features[4 + a:4 + b]), 2)
            for c, (a, b) in zip(chunks, ((0, 12), (12, 24), (24, 30)))])
        torch.testing.assert_close(dec, dec_alone, atol=1e-5, rtol=1e-5)
    shuffled = Sparse4D.single(video.features.flip(0), video.coords.flip(0))
    with pytest.raises(ValueError, match="ordered by time"):
        model.encode(shuffled)
    with pytest.raises(ValueError, match="independent chunks"):
        model.encode_tiled(video, 2)


def test_attention_pool_over_a_packed_batch_equals_each_sample_alone_and_survives_empty_samples():
    """Samples of several lengths pooled in one packed batch give what each gives alone (no
    attention across samples), and a sample with no tokens pools to a finite vector."""
    from atoken_core.model import AttentionPool
    from atoken_core.sparse import Sparse4D

    torch.manual_seed(0)
    pool = AttentionPool(16, 2, 32).eval()
    lengths = [3, 5, 0, 3, 1]
    feats = [torch.randn(n, 16) for n in lengths]
    batch = Sparse4D.cat([Sparse4D.single(f, torch.zeros(len(f), 4, dtype=torch.long)) for f in feats])
    with torch.no_grad():
        together = pool(batch.features, batch)
        alone = [pool(f, Sparse4D.single(f, torch.zeros(len(f), 4, dtype=torch.long)))[0] for f in feats]
    assert together.shape == (5, 16) and torch.isfinite(together).all()
    for i, a in enumerate(alone):
        torch.testing.assert_close(together[i], a, rtol=1e-5, atol=1e-6)
    # the empty sample: attention over nothing puts zero weight on every value -> the output bias
    bias = pool.attention.out_proj.bias
    torch.testing.assert_close(together[2], bias + pool.mlp(pool.layernorm(bias)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flavor", ["test", "test-siglip"])
def test_a_sample_without_tokens_leaves_the_batch_finite(registries, flavor):
    """An empty sample in a packed batch (an asset no view sees, a zero-size crop) gives no NaN in
    the reconstruction or, where the flavour pools, the semantic embedding."""
    from atoken_core.sparse import Sparse4D

    model = make_model(registries, flavor=flavor).eval()
    fd = model.spec.frame_dim

    def sample(n):
        i = torch.arange(n)
        return Sparse4D.single(torch.randn(n, fd), torch.stack([0 * i, i % 3, i // 3, 0 * i], 1))

    batch = Sparse4D.cat([sample(4), sample(0), sample(6)])
    with torch.no_grad():
        out = model.forward_all(batch, sample=False, semantic=model.pool_head is not None)
    assert out.recon.shape[0] == 10 and torch.isfinite(out.recon).all()
    assert out.semantic is None or (out.semantic.shape[0] == 3 and torch.isfinite(out.semantic).all())
