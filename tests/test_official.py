"""Apple's released AToken: conversion of its checkpoints and parity with its inference code.

The golden outputs in tests/official/fixtures/ were written by the official code itself
(apple/ml-atoken at 3f5afdc, run on CPU by tests/official/make_fixtures.py) for reduced So/C-,
So/D- and s1-shaped models with seeded random weights whose norms and biases were moved away
from 1 / 0. Here the real converter reads those ``.pt`` files and atoken must reproduce every
intermediate output: encoder features, pooled embedding, KL mean and log-variance, FSQ indices
(identical) and reconstructions, for an image (centre-cropped), an 8-frame clip, a 26-frame
clip (cut to 24 frames: one full 16-frame chunk and a remainder) and a 3D voxel sample at token
level. A random-weights match is the strongest check possible without the real files.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file

import atoken
from atoken_core.cli import main
from atoken_core.sparse import Sparse4D

FIXTURES = Path(__file__).parent / "official" / "fixtures"
TOL = {"atol": 1e-4, "rtol": 1e-4}
NAMES = ("soc", "sod", "s1")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("official")
    paths = {}
    for name in NAMES:
        paths[name] = str(out / f"{name}.safetensors")
        assert main(["import-official", str(FIXTURES / f"{name}.pt"), "--config", str(FIXTURES / f"{name}.yaml"),
                     "-o", paths[name]]) == 0
    return paths


@pytest.fixture(scope="module")
def inputs():
    return load_file(FIXTURES / "inputs.safetensors")


def outputs(name):
    return load_file(FIXTURES / f"{name}-outputs.safetensors")


def unit(x_uint8_thwc):
    """The fixture's uint8 pixels as the API takes them: float in [0, 1], channels first."""
    return rearrange(x_uint8_thwc, "... h w c -> ... c h w").float() / 255


def official_pixels(recon_lf, rows, cols, frames):
    """The official decoder's per-token output as frames, the official layout
    ("(t h w) (pt ph pw c) -> (t pt) c (h ph) (w pw)", sparse_to_img_list), clamped to [0, 1]."""
    video = rearrange(recon_lf, "(t h w) (pt ph pw c) -> (t pt) c (h ph) (w pw)", h=rows, w=cols, pt=4, ph=16, pw=16)
    return ((video[:frames].clamp(-1, 1)) + 1) / 2


def assert_model_matches(tok, tokens, ref, prefix, frames):
    """Every intermediate output of ``tokens`` through the converted model against the official
    code's: encoder features, pooled embedding, KL mean and log-variance or FSQ values and codes,
    and the reconstruction from them."""
    model = tok.model
    with torch.no_grad():
        features = model.encode(tokens)
        torch.testing.assert_close(features, ref[prefix + "features"], **TOL)
        pooled = F.normalize(model.semantic_embedding(features, tokens), dim=-1)
        torch.testing.assert_close(pooled, ref[prefix + "pooled"], **TOL)
        out = model.bottleneck(features, sample=False)
        if tok.discrete:
            assert torch.equal(out.codes, ref[prefix + "codes"])
            torch.testing.assert_close(out.latent, ref[prefix + "quantized"], atol=0, rtol=0)
            recon = ref[prefix + "recon_quantized"]
        else:
            post = out.aux["posterior"]
            torch.testing.assert_close(post.mean, ref[prefix + "mean"], **TOL)
            torch.testing.assert_close(post.logvar, ref[prefix + "logvar"], **TOL)
            recon = ref[prefix + "recon_mean"]
        torch.testing.assert_close(model.decode(tokens.with_features(out.latent), frames=frames), recon, **TOL)


# Sample slices of the official packed batch [image 3x4 tokens | clip8 2x2x2 | clip26 6x1x2].
SLICES = {"image": slice(0, 12), "clip8": slice(12, 20), "clip26": slice(20, 32)}


def test_conversion_records_source_terms_and_architecture(converted):
    tok = atoken.load(converted["soc"], device="cpu")
    source = tok.metadata["state"]["imported_from"]
    assert source["file"] == "soc.pt"
    assert source["sha256"] == hashlib.sha256((FIXTURES / "soc.pt").read_bytes()).hexdigest()
    assert "non-commercial" in source["weights_terms"] and "same terms" in source["weights_terms"]
    assert tok.recipe.model.flavor == "atoken-so-c"
    assert tok.recipe.model.flavor_overrides == {"width": 32, "depth": 2, "decoder_depth": 2, "heads": 2, "mlp": 80}
    official = torch.load(FIXTURES / "soc.pt", weights_only=True)
    n_official = sum(v.numel() for k, v in official.items() if not k.startswith("lpips_loss."))
    assert sum(p.numel() for p in tok.model.parameters()) == n_official
    assert atoken.load(converted["sod"], device="cpu").discrete
    assert atoken.load(converted["s1"], device="cpu").modalities == ["image"]


@pytest.mark.parametrize("name", NAMES)
def test_packed_batch_matches_official_outputs(converted, inputs, name):
    # The official packed batch [image, 8-frame clip, 26-frame clip] through atoken's own patchify.
    tok = atoken.load(converted[name], device="cpu")
    ref = outputs(name)
    image = tok.modality("image").patchify([unit(inputs["image"]) * 2 - 1], tok.model.spec).patches
    video = atoken.load(converted["soc"], device="cpu").modality("video")
    clips = video.patchify([unit(inputs["clip8"]) * 2 - 1, unit(inputs["clip26"]) * 2 - 1], tok.model.spec).patches
    batch = Sparse4D.pack([image, *clips.split()])
    # official coords are (batch, t, row, col, z); atoken's (t, x = col, y = row, z)
    c = batch.coords
    assert torch.equal(torch.stack([batch.sample_ids(), c[:, 0], c[:, 2], c[:, 1], c[:, 3]], 1), ref["official_coords"])
    assert_model_matches(tok, batch, ref, "", frames=4)


@pytest.mark.parametrize("name", NAMES)
def test_api_encode_decode_embed_match_official(converted, inputs, name):
    tok = atoken.load(converted[name], device="cpu")
    ref = outputs(name)
    recon_key = "recon_quantized" if name == "sod" else "recon_mean"
    cases = [("image", "image", (3, 4), 1)] + ([] if name == "s1" else
                                                [("clip8", "video", (2, 2), 8), ("clip26", "video", (1, 2), 24)])
    for key, modality, (rows, cols), frames in cases:
        x = unit(inputs[key])
        enc = tok.encode(x, modality)
        rows_of = ref["official_coords"][SLICES[key]]
        assert torch.equal(enc.coords[:, [0, 2, 1, 3]], rows_of[:, 1:])
        if name == "sod":
            assert torch.equal(enc.codes, ref["codes"][SLICES[key]])
            assert enc.codes.dtype == torch.int64 and enc.codes.shape[1] == 8
        else:
            assert enc.codes is None
            torch.testing.assert_close(enc.mean, ref["mean"][SLICES[key]], **TOL)
            torch.testing.assert_close(enc.logvar, ref["logvar"][SLICES[key]], **TOL)
        y = tok.decode(enc)
        want = official_pixels(ref[recon_key][SLICES[key]], rows, cols, frames)
        torch.testing.assert_close(y, want[0] if modality == "image" else want, **TOL)
        index = list(SLICES).index(key)
        torch.testing.assert_close(tok.embed(x, modality), ref["pooled"][index], **TOL)
    # the cropped sizes, as the official preprocessing crops them
    assert tok.decode(tok.encode(unit(inputs["image"]), "image")).shape == (3, 48, 64)


@pytest.mark.parametrize("name", NAMES)
def test_voxels_through_the_main_model_match_official(converted, inputs, name):
    # 3D at token level: official coords (t, X, Y, Z) with the learned grid read at [X, Y] are
    # atoken's (t, x = Y, y = X, z = Z); features are 768 colour values zero-padded to 3072.
    tok = atoken.load(converted[name], device="cpu")
    ref = outputs(name)
    xyz = inputs["voxel_xyz"].long()
    tokens = Sparse4D.single(inputs["voxel_colours"] * 2 - 1,
                             torch.stack([torch.zeros_like(xyz[:, 0]), xyz[:, 1], xyz[:, 0], xyz[:, 2]], 1))
    assert_model_matches(tok, tokens, ref, "voxel_", frames=1)  # the first 768 values per voxel


def test_cli_encode_decode_and_eval_give_the_official_reconstruction(converted, inputs, tmp_path, capsys):
    from PIL import Image

    from atoken_core.evaluate import image_metrics

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(inputs["image"].numpy()).save(folder / "astronaut.png")
    tokens, png = tmp_path / "t.safetensors", tmp_path / "r.png"
    assert main(["encode", "--ckpt", converted["sod"], str(folder / "astronaut.png"), "-o", str(tokens),
                 "--device", "cpu"]) == 0
    saved = load_file(tokens)
    assert torch.equal(saved["codes"], outputs("sod")["codes"][SLICES["image"]])
    assert main(["decode", "--ckpt", converted["sod"], str(tokens), "-o", str(png), "--device", "cpu"]) == 0
    decoded = torch.tensor(__import__("numpy").array(Image.open(png))).permute(2, 0, 1).float() / 255
    want = official_pixels(outputs("sod")["recon_quantized"][SLICES["image"]], 3, 4, 1)[0]
    assert (decoded - want).abs().max() <= 0.5 / 255 + 1e-4  # the PNG's 8-bit rounding
    # atoken eval scores the official reconstruction of the centre crop
    out = tmp_path / "eval"
    assert main(["eval", "--ckpt", converted["soc"], "--data", str(folder), "--out", str(out), "--metrics",
                 "psnr,ssim", "--no-progress"]) == 0
    report = json.loads((out / "eval.json").read_text())
    crop = unit(inputs["image"])[:, 1:49, 3:67]
    want = official_pixels(outputs("soc")["recon_mean"][SLICES["image"]], 3, 4, 1)[0]
    expected = image_metrics(crop * 2 - 1, want * 2 - 1)
    assert report["metrics"]["psnr"] == pytest.approx(expected["psnr"], abs=1e-3)
    assert report["metrics"]["ssim"] == pytest.approx(expected["ssim"], abs=1e-4)


# ----------------------------------------------------------------------------- bad input


def run_import(tmp_path, pt, yaml_path, capsys):
    out = tmp_path / "out.safetensors"
    rc = main(["import-official", str(pt), "--config", str(yaml_path), "-o", str(out)])
    err = capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("out.safetensors.tmp-*"))  # nothing half-written
    return rc, err


class NotATensor:  # a pickled object weights_only must refuse
    pass


def test_bad_checkpoints_are_one_line_errors_naming_the_file(tmp_path, capsys):
    yaml_path = FIXTURES / "soc.yaml"
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    rc, err = run_import(tmp_path, not_dict, yaml_path, capsys)
    assert rc == 1 and f"{not_dict}: holds a list, not a state dict" in err and err.count("\n") == 1
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, nested)
    rc, err = run_import(tmp_path, nested, yaml_path, capsys)
    assert rc == 1 and f"{nested}: not a flat state dict: 2 entries are not tensors (epoch, state_dict)" in err
    evil = tmp_path / "object.pt"
    torch.save({"w": torch.zeros(1), "obj": NotATensor()}, evil)
    rc, err = run_import(tmp_path, evil, yaml_path, capsys)
    assert rc == 1 and f"{evil}: refused by torch.load(weights_only=True)" in err and err.count("\n") == 1
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(pickle.dumps("x", protocol=2)[:3] + b"\x00" * 50)
    rc, err = run_import(tmp_path, garbage, yaml_path, capsys)
    assert rc == 1 and str(garbage) in err and err.count("\n") == 1
    rc, err = run_import(tmp_path, tmp_path / "missing.pt", yaml_path, capsys)
    assert rc == 1 and "missing.pt: file not found" in err


def test_config_and_weights_that_disagree_list_every_difference(tmp_path, capsys):
    # s1's config (32-channel latent) with So/C's weights (48): the projection and decoder input differ.
    rc, err = run_import(tmp_path, FIXTURES / "soc.pt", FIXTURES / "s1.yaml", capsys)
    assert rc == 1
    assert "soc.pt: the weights do not match the architecture of the config" in err
    assert "shape mismatch proj.weight: file (96, 32), expected (64, 32)" in err
    assert "shape mismatch decoder.input_layer.weight: file (32, 48), expected (32, 32)" in err
    # a config one block deeper: the missing block's tensors are listed by name
    deeper = tmp_path / "deeper.yaml"
    deeper.write_text((FIXTURES / "soc.yaml").read_text().replace("encoder_num_blocks: 2", "encoder_num_blocks: 3"))
    rc, err = run_import(tmp_path, FIXTURES / "soc.pt", deeper, capsys)
    assert rc == 1 and "missing keys (" in err and "encoder.2.attn.qkv.weight" in err


def test_unknown_or_unsupported_architecture_keys_are_refused(tmp_path, capsys):
    text = (FIXTURES / "soc.yaml").read_text()
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(text.replace("use_decoder: true", "use_decoder: true\n      encoder_use_swiglu: true"))
    rc, err = run_import(tmp_path, FIXTURES / "soc.pt", unknown, capsys)
    assert rc == 1 and f"{unknown}: unknown architecture keys in model.model_cfg.arch_cfg: encoder_use_swiglu" in err
    windowed = tmp_path / "swin.yaml"
    windowed.write_text(text.replace("decoder_attn_mode: full", "decoder_attn_mode: swin"))
    rc, err = run_import(tmp_path, FIXTURES / "soc.pt", windowed, capsys)
    assert rc == 1 and "decoder_attn_mode 'swin': only 'full' attention" in err
    not_official = tmp_path / "other.yaml"
    not_official.write_text("model:\n  name: vae\n")
    rc, err = run_import(tmp_path, FIXTURES / "soc.pt", not_official, capsys)
    assert rc == 1 and "no model.model_cfg.arch_cfg table" in err


def test_video_shorter_than_one_temporal_patch_is_refused(converted, tmp_path, capsys):
    tok = atoken.load(converted["soc"], device="cpu")
    with pytest.raises(Exception, match=r"sample 0: 3 frame\(s\), shorter than one temporal patch \(4 frames\)"):
        tok.encode(torch.rand(3, 3, 32, 32), "video")
    from atoken_modalities.video_impl import save_video

    clip = tmp_path / "short.mp4"
    save_video(torch.rand(2, 3, 32, 32) * 2 - 1, str(clip))
    out = tmp_path / "t.safetensors"
    assert main(["encode", "--ckpt", converted["soc"], str(clip), "-o", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "shorter than one temporal patch" in err and err.count("\n") == 1 and not out.exists()


def test_tokens_of_one_kind_are_refused_by_a_checkpoint_of_the_other(converted, inputs):
    soc, sod = atoken.load(converted["soc"], device="cpu"), atoken.load(converted["sod"], device="cpu")
    x = unit(inputs["image"])
    with pytest.raises(atoken.TokenizerError, match="a discrete checkpoint decodes codes"):
        sod.decode(soc.encode(x, "image"))
    with pytest.raises(atoken.TokenizerError, match="these tokens are discrete codes"):
        soc.decode(sod.encode(x, "image"))
    with pytest.raises(atoken.TokenizerError, match="trained on image, video; pass modality="):
        soc.encode(x)
    with pytest.raises(atoken.TokenizerError, match="trained on image; not on 'video'"):
        atoken.load(converted["s1"], device="cpu").encode(torch.rand(4, 3, 32, 32), "video")


def test_flavours_have_the_official_parameter_counts(registries):
    # OFFICIAL.md: So/C has 845,738,048 parameters in 563 tensors (the pooling head's to_q and
    # to_kv, 4 tensors, are 2 in atoken's fused in_proj); s1 differs only in its 32-channel latent.
    from atoken_core.flavors import FLAVORS
    from atoken_core.model import AToken

    counts = {}
    for name in ("atoken-so-c", "atoken-so-d", "atoken-so-c-s1"):
        flavor = FLAVORS[name]
        component = registries["bottleneck"].get(flavor.bottleneck)
        config = component.config(**{k: list(v) if isinstance(v, tuple) else v for k, v in flavor.bottleneck_settings})
        with torch.device("meta"):
            model = AToken(flavor, component.build(config, in_dim=flavor.width, latent_dim=flavor.latent_dim))
        state = model.state_dict()
        counts[name] = (sum(v.numel() for v in state.values()), len(state) + 2)
    assert counts["atoken-so-c"] == counts["atoken-so-d"] == (845_738_048, 563)
    assert counts["atoken-so-c-s1"] == (845_738_048 - (96 - 64) * 1152 - (48 - 32) * 1152, 563)


def test_bf16_inference_runs_matmuls_in_bf16_and_stays_close(converted, inputs):
    # dtype=torch.bfloat16: weights stay float32, matmuls and attention run in bf16 (autocast),
    # norms in float32; encodings come back float32.
    fp32 = atoken.load(converted["soc"], device="cpu")
    bf16 = atoken.load(converted["soc"], device="cpu", dtype=torch.bfloat16)
    x = unit(inputs["image"])
    a, b = fp32.encode(x, "image"), bf16.encode(x, "image")
    assert b.mean.dtype == torch.float32 and next(bf16.model.parameters()).dtype == torch.float32
    error = float((a.mean - b.mean).abs().max())
    assert 0 < error < 0.1, error  # bf16 did run (the result differs), and stays close
    assert float((fp32.decode(a) - bf16.decode(b)).abs().max()) < 0.1


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.slow
def test_finetune_recipe_trains_from_the_converted_weights(converted, inputs, tmp_path, cache):
    # recipes/finetune-official.toml on CPU with the tiny official-layout model: it starts from
    # exactly the converted weights (its step-0 evaluation is the converted model's), trains on
    # image and video with the semantic losses (a random stand-in teacher) and writes a
    # checkpoint atoken.load reads.
    from PIL import Image
    from test_cli import ROOT
    from test_cli import atoken as atoken_cli

    from atoken_core.evaluate import image_metrics

    photos = tmp_path / "photos"
    photos.mkdir()
    frames = inputs["clip26"]  # 26 frames 18x33: distinct small photographs
    for i in range(4):
        Image.fromarray(torch.cat([frames[i], frames[i + 4]], dim=1).numpy()).save(photos / f"p{i}.png")
    (photos / "captions.json").write_text(json.dumps({f"p{i}.png": f"a photo of part {i} of an astronaut"
                                                      for i in range(4)}))
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    Image.fromarray(inputs["image"].numpy()).save(held_out / "astronaut.png")
    teacher = 'teacher="random", teacher_config={embed_dim=32}'
    sets = [
        f"model.init=checkpoint:{converted['soc']}",
        "model.flavor_overrides={width = 32, depth = 2, decoder_depth = 2, heads = 2, mlp = 80}",
        f'data.image={{kind="image_folder", root="{photos}", eval_root="{held_out}", crop=16, captions=true}}',
        "data.video={kind=\"packaged_clips\", frames=4, crop=16, max_frames=8, max_side=48, eval_frames=4}",
        f'loss=[{{kind="l1", weight=0.2}}, {{kind="distill", modalities=["image"], tau=2.0, {teacher}}}, '
        f'{{kind="sigmoid", modalities=["video"], {teacher}}}, {{kind="kl", weight=1e-8}}]',
        "stage[0].steps=3", "stage[0].batch_size=2", "optim.warmup_steps=1", "log.every=1",
        "log.checkpoint_every=3", "eval.pca_baseline=false", "eval.grid_images=1",
    ]
    out = tmp_path / "run"
    atoken_cli("run", str(ROOT / "recipes" / "finetune-official.toml"), "--out", str(out), "--no-progress",
           *[a for s in sets for a in ("--set", s)], cache=cache)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert {"image/l1", "image/distill", "video/l1", "video/sigmoid"} <= set(rows[0])
    report = json.loads((out / "eval.json").read_text())
    tok = atoken.load(converted["soc"], device="cpu")
    x = unit(inputs["image"])
    want = image_metrics(tok.modality("image").targets([x * 2 - 1], tok.model.spec)[0], tok.reconstruct(x, "image") * 2 - 1)
    got = report["step_0"]["image"]["per_image"]["astronaut.png"]
    assert got["psnr"] == pytest.approx(want["psnr"], abs=1e-3) and got["ssim"] == pytest.approx(want["ssim"], abs=1e-4)
    final = atoken.load(str(next((out / "checkpoints").glob("step-000003.safetensors"))), device="cpu")
    assert final.recipe.model.flavor == "atoken-so-c" and final.decode(final.encode(x, "image")).shape == (3, 48, 64)


@pytest.mark.slow
def test_finetune_from_a_checkpoint_of_another_architecture_stops_before_training(converted, tmp_path, cache):
    # s1's 32-channel latent into a recipe for So/C's 48: one error listing the tensors, no step run.
    from test_cli import ROOT
    from test_cli import atoken as atoken_cli

    sets = [f"model.init=checkpoint:{converted['s1']}",
            "model.flavor_overrides={width = 32, depth = 2, decoder_depth = 2, heads = 2, mlp = 80}",
            'data.image={kind="packaged_photos", crop=16, video_frames=0}',
            'data.video={kind="packaged_clips", frames=4, crop=16, max_frames=8, max_side=48, eval_frames=4}',
            'loss=[{kind="l1"}]', "stage[0].steps=2", "stage[0].batch_size=2"]
    out = tmp_path / "run"
    proc = atoken_cli("run", str(ROOT / "recipes" / "finetune-official.toml"), "--out", str(out), "--no-progress",
                      *[a for s in sets for a in ("--set", s)], cache=cache, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{converted['s1']}: checkpoint does not match this model architecture" in proc.stderr
    assert "shape mismatch bottleneck.proj.weight: checkpoint (64, 32) vs model (96, 32)" in proc.stderr
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()
