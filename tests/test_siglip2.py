"""Importing a SigLIP2 vision tower: after import our encoder equals transformers' reference.

A small random ``Siglip2VisionModel`` (NaFlex) stands in for SigLIP2-so400m: the mapping
is size-independent, and a random model exercises every weight.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from atoken_core.flavors import FLAVORS
from atoken_core.model import AToken
from atoken_core.siglip2 import (
    SigLIP2ImportError,
    import_siglip2,
    load_siglip2_vision_state,
)
from atoken_modalities.image import ImageConfig
from atoken_modalities.image_impl import ImageModality

FLAVOR = FLAVORS["test-siglip"]
P, WIDTH, DEPTH, HEADS, MLP, GRID = (FLAVOR.patch_size, FLAVOR.width, FLAVOR.depth, FLAVOR.heads, FLAVOR.mlp,
                                     FLAVOR.pos_embed_grid)
SIZES = [(8, 12), (16, 16), (12, 20), (4, 4), (24, 8)]  # (height, width) in pixels
TOL = {"atol": 1e-4, "rtol": 0}


def hf_model(patch_size: int = P, seed: int = 0) -> Siglip2VisionModel:
    torch.manual_seed(seed)
    config = Siglip2VisionConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                 intermediate_size=MLP, patch_size=patch_size, num_patches=GRID * GRID,
                                 num_channels=3, vision_use_head=True)
    model = Siglip2VisionModel(config).eval()
    # post_init leaves LayerNorms at (1, 0) and biases at 0: randomise them so every tensor is tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(mean=1.0 if "norm" in name and name.endswith("weight") else 0.0, std=0.1)
    return model


def saved(tmp_path, state: dict[str, torch.Tensor], name: str = "siglip2.safetensors") -> str:
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def our_model() -> AToken:
    from atoken_core.plugin_manager import get_registries

    kl = get_registries()["bottleneck"].get("kl")
    return AToken(FLAVOR, kl.build(kl.config(), in_dim=WIDTH, latent_dim=8)).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_model()
    path = saved(tmp_path_factory.mktemp("siglip2"), hf.state_dict())
    ours = our_model()
    import_siglip2(ours, load_siglip2_vision_state(path), source=path)
    return hf, ours


def images(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in sizes]


def hf_inputs(patches: list[torch.Tensor], grids: list[tuple[int, int]]):
    """NaFlex inputs: patches padded to the longest sample, a mask, and (rows, cols) per sample."""
    n = max(x.shape[0] for x in patches)
    pixel_values = torch.zeros(len(patches), n, patches[0].shape[1])
    mask = torch.zeros(len(patches), n, dtype=torch.long)
    for i, x in enumerate(patches):
        pixel_values[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = 1
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor(grids)}


def run_both(hf, ours, imgs):
    tokens = ImageModality(ImageConfig()).patchify(imgs, ours.spec)
    parts = tokens.patches.split()
    grids = [tuple(m["grid"]) for m in tokens.meta]
    with torch.no_grad():
        ref = hf(**hf_inputs([p.features for p in parts], grids))
        feats = ours.encode(tokens.patches)
        pooled = ours.pool(feats, tokens.patches)
        # W_s starts as the identity, so the text-space embedding is SigLIP2's pooled output too
        torch.testing.assert_close(ours.semantic_embedding(feats, tokens.patches), pooled, atol=0, rtol=0)
    return ref, feats, pooled, [p.num_tokens for p in parts]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_imported_encoder_equals_siglip2(models, size):
    hf, ours = models
    ref, feats, pooled, (n,) = run_both(hf, ours, images([size]))
    torch.testing.assert_close(feats, ref.last_hidden_state[0, :n], **TOL)
    torch.testing.assert_close(pooled, ref.pooler_output, **TOL)


def test_packed_batch_of_different_sizes_equals_padded_siglip2(models):
    # Our packed (unpadded) batch against SigLIP2's padded batch with its attention mask.
    hf, ours = models
    ref, feats, pooled, lengths = run_both(hf, ours, images([(12, 20), (8, 8), (16, 12)]))
    for i, ours_i in enumerate(feats.split(lengths)):
        torch.testing.assert_close(ours_i, ref.last_hidden_state[i, : lengths[i]], **TOL)
    torch.testing.assert_close(pooled, ref.pooler_output, **TOL)


def test_import_zeroes_temporal_weights_and_rope_scales(models):
    hf, ours = models
    w = ours.patch_embed.weight
    assert torch.equal(w[:, 1:], torch.zeros_like(w[:, 1:]))
    torch.testing.assert_close(w[:, 0], hf.embeddings.patch_embedding.weight, atol=0, rtol=0)
    assert all(float(block.attn.rope_scale.detach()) == 0.0 for block in ours.encoder)
    # A video of one repeated frame still embeds like the image (the temporal weights are zero).
    (img,) = images([(8, 12)])
    tokens = ImageModality(ImageConfig()).patchify([img], ours.spec).patches
    video = tokens.with_features(tokens.features.repeat(1, ours.spec.temporal_patch))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(video), ours.encode(tokens), atol=0, rtol=0)


def test_rope_scale_defaults_to_one_and_learns_from_zero(models):
    fresh = our_model()
    assert all(float(block.attn.rope_scale.detach()) == 1.0 for block in fresh.encoder)
    # At 0 (just imported) the scale still gets a gradient: training can turn RoPE on.
    _, imported = models
    (img,) = images([(8, 8)])
    tokens = ImageModality(ImageConfig()).patchify([img], imported.spec).patches
    imported.zero_grad()
    imported.pool(imported.encode(tokens), tokens).sum().backward()
    assert all(block.attn.rope_scale.grad is not None and float(block.attn.rope_scale.grad.abs()) > 0
               for block in imported.encoder)
    imported.zero_grad(set_to_none=True)


def test_full_siglip2_model_file_is_accepted(models, tmp_path):
    # A full Siglip2Model file prefixes vision keys and carries the text tower and logit scale/bias.
    hf, _ = models
    state = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    state.update({"text_model.embeddings.token_embedding.weight": torch.zeros(5, 4),
                  "logit_scale": torch.zeros(1), "logit_bias": torch.zeros(1)})
    loaded = load_siglip2_vision_state(saved(tmp_path, state))
    assert set(loaded) == set(hf.state_dict())


def import_error(tmp_path, state) -> str:
    ours = our_model()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(SigLIP2ImportError) as err:
        import_siglip2(ours, load_siglip2_vision_state(saved(tmp_path, state)))
    for k, v in ours.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k
    return str(err.value)


def test_wrong_patch_size_is_named(tmp_path):
    msg = import_error(tmp_path, hf_model(patch_size=8).state_dict())
    assert "patch size: the file has 8x8 patches" in msg and "the flavour uses 4x4" in msg
    assert "shape mismatch embeddings.patch_embedding.weight: file (64, 192) vs expected (64, 48)" in msg


def test_every_problem_is_listed_at_once(models, tmp_path):
    hf, _ = models
    state = dict(hf.state_dict())
    del state["encoder.layers.1.self_attn.k_proj.bias"]
    state["encoder.layers.0.mlp.fc1.weight"] = torch.zeros(MLP + 1, WIDTH)
    state["encoder.layers.2.layer_norm1.weight"] = torch.ones(WIDTH)  # a third layer the flavour lacks
    msg = import_error(tmp_path, state)
    assert "missing keys (1): encoder.layers.1.self_attn.k_proj.bias" in msg
    assert "shape mismatch encoder.layers.0.mlp.fc1.weight: file (129, 64) vs expected (128, 64)" in msg
    assert "unexpected keys (1): encoder.layers.2.layer_norm1.weight" in msg
    assert "depth: the file has 3 encoder layers, the flavour 2" in msg


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SigLIP2ImportError, match="not a readable safetensors file"):
        load_siglip2_vision_state(str(bad))
    with pytest.raises(SigLIP2ImportError, match="SigLIP2 weights not found"):
        load_siglip2_vision_state(str(tmp_path / "none.safetensors"))


def test_cli_writes_encoder_weights(models, tmp_path, monkeypatch, capsys):
    import json

    from safetensors.torch import load_file

    from atoken_core import flavors
    from atoken_core.cli import main
    from atoken_core.siglip2 import encoder_state_dict

    hf, ours = models
    monkeypatch.setitem(flavors.FLAVORS, "siglip-test", FLAVOR)
    src, out = saved(tmp_path, hf.state_dict()), str(tmp_path / "encoder.safetensors")
    assert main(["import-siglip2", src, "--flavor", "siglip-test", "-o", out]) == 0
    written = load_file(out)
    expected = encoder_state_dict(ours)
    assert set(written) == set(expected) and all(torch.equal(written[k], expected[k]) for k in expected)
    raw = (tmp_path / "encoder.safetensors").read_bytes()
    meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert meta["source"] == src and meta["flavor"] == "siglip-test" and meta["format"] == "atoken-encoder-v1"
    # A file for another architecture: one error message, exit status 1, nothing written.
    bad = str(tmp_path / "other.safetensors")
    assert main(["import-siglip2", saved(tmp_path, hf_model(patch_size=8).state_dict(), "p8.safetensors"),
                 "--flavor", "siglip-test", "-o", bad]) == 1
    assert "patch size: the file has 8x8 patches" in capsys.readouterr().err
    assert not (tmp_path / "other.safetensors").exists()


def test_recipe_init_imports_siglip2_before_training(tmp_path, registries):
    from pathlib import Path

    from atoken_core.checkpoint import read_checkpoint
    from atoken_core.recipe import load_recipe
    from atoken_core.siglip2 import encoder_state_dict
    from atoken_core.train import run_recipe

    path = saved(tmp_path, hf_model().state_dict())
    tiny = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml")
    # lr = 0: the one step changes nothing, so the checkpoint shows exactly what was imported
    recipe = load_recipe(tiny, registries, [
        f'model.init="siglip2:{path}"', 'model.flavor="test-siglip"', "model.latent_dim=8", "data.image.crop=16",
        "data.image.video_frames=0", "stage[0].steps=1", "stage[0].batch_size=2", "optim.lr=0",
        "optim.warmup_steps=0", "eval.max_side=32", "eval.pca_baseline=false", 'loss=[{kind = "l1"}]',
    ])
    run_recipe(recipe, registries, str(tmp_path / "run"), progress=False)
    tensors, _ = read_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-000001.safetensors"))
    expected = our_model()
    import_siglip2(expected, load_siglip2_vision_state(path))
    for key, value in encoder_state_dict(expected).items():
        assert torch.equal(tensors[f"model.{key}"], value), key


def test_recipe_init_must_name_siglip2(registries):
    from pathlib import Path

    from atoken_core.config import ConfigError
    from atoken_core.recipe import load_recipe

    tiny = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml")
    with pytest.raises(ConfigError, match="model.init: invalid value"):
        load_recipe(tiny, registries, ['model.init="clip:/x"'])
