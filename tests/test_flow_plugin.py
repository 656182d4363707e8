"""A third-party modality that is not RGB (plugins/atoken-flow: 2-channel optical flow, installed as
its own distribution) goes through the whole tool with no change to atoken: its file format and
preview against independent references, then the real CLI in a subprocess (plugins, validate,
run --dry-run, run alone and mixed with images, eval, encode/decode, batch extraction), and the
token grid of the trained checkpoint as a property."""

from __future__ import annotations

import colorsys
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atoken_core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "plugins" / "atoken-flow" / "recipes"
FLOW, MIXED = RECIPES / "flow-tiny.toml", RECIPES / "flow-image-tiny.toml"
SCALE = 16.0  # the recipes' max_displacement (a power of two: scaling by it is exact in float32)
# the recipes shrunk to seconds: test flavour (patch 4), 8-channel latent, 16x16 training fields
SMALL = ["model.flavor=test", "model.latent_dim=8", "stage[0].steps=3", "stage[0].batch_size=4", "data.flow.train=8",
         "data.flow.size=16", "data.flow.eval=2", "log.every=1", "log.checkpoint_every=10", "optim.warmup_steps=1"]
SMALL_IMAGE = ["data.image.crop=32", "loss[1].max_side=32", "loss[2].max_side=32", "eval.max_side=48"]
SIZES = {"a.flo": (20, 30), "b.flo": (17, 23), "sub/c.flo": (32, 32)}  # (height, width), not all whole patches


@pytest.fixture(autouse=True, scope="module")
def installed() -> None:
    try:
        importlib.metadata.distribution("atoken-flow")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the flow plugin is not installed: run `pip install --no-deps -e plugins/atoken-flow`")


def cli(*args: str, cache: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """The real `atoken` in a subprocess, with the plugin-loading environment the test controls."""
    base = {k: v for k, v in os.environ.items() if k not in ("ATOKEN_DISABLE_PLUGIN_AUTOLOAD", "ATOKEN_PLUGINS")}
    if cache is not None:
        base["ATOKEN_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "atoken_core.cli", *map(str, args)], capture_output=True, text=True,
                          env={**base, **env}, cwd=REPO, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def modality(**config):
    from atoken_core.plugin_manager import get_registries

    component = get_registries()["modality"].get("flow")
    return component.build(component.config(**config))


def smooth_pixels(h: int, w: int, seed: int, speed: float = 10.0) -> np.ndarray:
    """A smooth (h, w, 2) field in pixels whose fastest pixel moves ``speed``."""
    from atoken_flow.synthetic import random_field

    field = random_field(h, w, 3, torch.Generator().manual_seed(seed)) * speed
    return field.float().permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- the .flo format
@pytest.mark.parametrize("h, w", [(1, 1), (5, 7), (16, 3)])
def test_flo_round_trips_exactly_and_matches_numpy_fromfile(tmp_path, h, w):
    from atoken_flow.flo import flo_bytes, read_flo_bytes

    uv = (torch.rand(h, w, 2, generator=torch.Generator().manual_seed(h * w)) * 2 - 1).numpy() * SCALE
    path = tmp_path / "f.flo"
    path.write_bytes(flo_bytes(uv))
    # an independent reading of the same bytes, as Middlebury's readers do it
    assert np.fromfile(path, np.float32, count=1)[0] == np.float32(202021.25)
    assert path.read_bytes()[:4] == b"PIEH"
    assert np.fromfile(path, np.int32, count=2, offset=4).tolist() == [w, h]
    raw = np.fromfile(path, np.float32, offset=12)
    assert raw.size == h * w * 2
    np.testing.assert_array_equal(raw.reshape(h, w, 2), uv)
    np.testing.assert_array_equal(read_flo_bytes(path.read_bytes(), str(path)), uv)
    assert flo_bytes(read_flo_bytes(path.read_bytes(), "x")) == path.read_bytes()
    # the modality: (2, H, W) normalised by max_displacement, and back to the same bytes
    mod = modality(max_displacement=SCALE)
    x = mod.read(str(path))
    assert x.shape == (2, h, w) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(uv).permute(2, 0, 1) / SCALE, rtol=0, atol=0)
    assert mod.write(x, str(tmp_path / "g.flo")) == [str(tmp_path / "g.flo")]
    assert (tmp_path / "g.flo").read_bytes() == path.read_bytes()


def _header(w: int, h: int) -> bytes:
    return np.array([202021.25], "<f4").tobytes() + np.array([w, h], "<i4").tobytes()


@pytest.mark.parametrize("data, problem", [
    (b"", "0 bytes, shorter than the 12-byte header"),
    (b"PIEH\x02\x00", "6 bytes, shorter than the 12-byte header"),
    (b"\x89PNG\r\n\x1a\n" + bytes(24), "not a Middlebury .flo file (magic number"),
    (_header(-3, 2), "corrupt .flo header: size -3x2"),
    (_header(4, 3) + bytes(8 * 12 - 4), "truncated): a 4x3 field needs 108 bytes, the file has 104"),
    (_header(2, 2) + bytes(8 * 4 + 1), "has trailing bytes): a 2x2 field needs 44 bytes, the file has 45"),
    (_header(1, 1) + np.array([np.nan, 0], "<f4").tobytes(), "NaN or infinite"),
])
def test_a_corrupt_flo_file_is_a_one_line_error_naming_it(tmp_path, data, problem):
    from atoken_flow.flo import FloError

    path = tmp_path / "broken.flo"
    path.write_bytes(data)
    with pytest.raises(FloError) as info:
        modality().read(str(path))
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and problem in message, message


def test_unknown_flow_pixels_are_read_as_zero_motion_and_large_motion_is_clipped(tmp_path):
    from atoken_flow.flo import flo_bytes

    uv = np.array([[[1e10, 1e10], [3.0, -40.0]]], np.float32)  # (1, 2, 2): unknown, then beyond 16 px
    (tmp_path / "u.flo").write_bytes(flo_bytes(uv))
    x = modality(max_displacement=SCALE).read(str(tmp_path / "u.flo"))
    assert x.tolist() == [[[0.0, 3 / 16]], [[0.0, -1.0]]]


# ----------------------------------------------------------------------------- the preview
def _wheel(u: float, v: float) -> tuple[float, float, float]:
    """The documented colour wheel, computed independently per pixel with colorsys."""
    speed = math.hypot(u, v)
    hue = (math.atan2(v, u) / (2 * math.pi)) % 1.0
    return colorsys.hsv_to_rgb(hue, min(speed, 1.0), 1.0 if speed <= 1.0 else 0.75)


def test_the_colour_wheel_follows_middlebury_and_matches_an_independent_hsv():
    mod = modality()

    def colour(u: float, v: float) -> list[float]:
        x = torch.tensor([u, v]).view(2, 1, 1).expand(2, 3, 2)
        rgb = (mod.preview(x) + 1) / 2  # preview is RGB in [-1, 1]
        assert rgb.shape == (3, 3, 2)
        return rgb[:, 0, 0].tolist()

    assert colour(0.0, 0.0) == pytest.approx([1, 1, 1])  # no motion: white
    r, g, b = colour(1.0, 0.0)  # right, at the full scale: pure red
    assert (r, g, b) == pytest.approx((1, 0, 0), abs=1e-6)
    r, g, b = colour(0.4, 0.0)  # slower: a paler red, same hue
    assert r == pytest.approx(1) and g == pytest.approx(b) and g == pytest.approx(0.6)
    r, g, b = colour(-1.0, 0.0)  # left: cyan
    assert r == pytest.approx(0, abs=1e-6) and g == pytest.approx(1) and b == pytest.approx(1)
    r, g, b = colour(0.0, 1.0)  # down (v > 0): yellow-green, between red and cyan through yellow
    assert g == pytest.approx(1) and b == pytest.approx(0, abs=1e-6) and 0 < r < 1
    r, g, b = colour(0.0, -1.0)  # up: blue-violet
    assert b == pytest.approx(1) and g == pytest.approx(0, abs=1e-6) and 0 < r < 1
    # every pixel of a random field (speeds beyond the scale included) against colorsys
    field = torch.rand(2, 2, 5, 6, generator=torch.Generator().manual_seed(1)) * 3 - 1.5  # (N, 2, H, W)
    got = (mod.preview(field) + 1) / 2
    assert got.shape == (2, 3, 5, 6) and float(got.min()) >= 0 and float(got.max()) <= 1
    want = torch.tensor([[[_wheel(float(field[n, 0, i, j]), float(field[n, 1, i, j])) for j in range(6)]
                          for i in range(5)] for n in range(2)]).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the loss and the source
def test_epe_is_the_mean_end_point_error_in_pixels_with_a_finite_gradient_at_zero():
    from atoken_core.plugin_manager import get_registries
    from atoken_core.interfaces import BottleneckOutput, LossInputs
    from atoken_flow.epe import EPEError

    component = get_registries()["loss"].get("epe")
    loss = component.build(component.config(max_displacement=SCALE))
    g = torch.Generator().manual_seed(0)
    target, recon = torch.rand(3, 2, 5, 4, generator=g) * 2 - 1, torch.rand(3, 2, 5, 4, generator=g) * 2 - 1
    out = loss(LossInputs("flow", target, recon, BottleneckOutput(latent=torch.zeros(1, 1))))
    d = ((recon - target) * SCALE).double().numpy()
    assert out.keys() == {"epe"}
    assert float(out["epe"]) == pytest.approx(np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2).mean(), rel=1e-6)
    same = target.clone().requires_grad_(True)
    loss(LossInputs("flow", target, same, BottleneckOutput(latent=torch.zeros(1, 1))))["epe"].backward()
    assert bool(torch.isfinite(same.grad).all())
    with pytest.raises(EPEError, match=r"loss 'epe' compares fields .* of equal shape; modality 'flow' gave target "
                                       r"\(1, 2, 4, 4\) and reconstruction \(1, 2, 4, 3\)"):
        loss(LossInputs("flow", torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 3), BottleneckOutput(latent=torch.zeros(0))))


def test_synthetic_flow_is_a_function_of_its_seed_and_of_the_step_generator():
    from atoken_core.config import ConfigError, structure
    from atoken_core.interfaces import SampleShape
    from atoken_core.plugin_manager import get_registries

    component = get_registries()["data"].get("synthetic_flow")
    config = structure({"train": 6, "eval": 2, "size": 24, "eval_size": [13, 29], "max_speed": 8.0}, component.config)
    a, b = component.build(config), component.build(config)
    assert isinstance(config, SampleShape) and config.train_sample_shape() == (2, 24, 24)
    assert all(torch.equal(x, y) for x, y in zip(a.train_pool(), b.train_pool()))
    assert [n for n, _ in a.eval_samples()] == ["field-000", "field-001"]
    assert all(x.shape == (2, 13, 29) for _, x in a.eval_samples())
    for x in [*a.train_pool(), *(x for _, x in a.eval_samples())]:
        fastest = float(torch.linalg.vector_norm(x, dim=0).max()) * SCALE  # pixels
        assert 8.0 / 4 - 1e-4 <= fastest <= 8.0 + 1e-4
    batch = a.train_batch(5, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(batch, b.train_batch(5, torch.Generator().manual_seed(3))))
    assert [tuple(x.shape) for x in batch] == [(2, 24, 24)] * 5
    pool = list(a.train_pool())
    # each sample is a pool field or its mirror image (u changes sign when left and right swap)
    mirrored = [p.flip(-1) * torch.tensor([-1.0, 1.0]).view(2, 1, 1) for p in pool]
    assert all(any(torch.equal(x, p) for p in pool + mirrored) for x in batch)
    with pytest.raises(ConfigError, match=r"data\.flow\.max_speed: invalid value: must be at most max_displacement"):
        structure({"max_speed": 20.0}, component.config, "data.flow")
    with pytest.raises(ConfigError, match=r"data\.flow\.eval_size"):
        structure({"eval_size": [12]}, component.config, "data.flow")


@given(h=st.integers(1, 21), w=st.integers(1, 21), p=st.sampled_from([2, 4, 5]),
       pad_mode=st.sampled_from(["replicate", "reflect", "constant"]))
def test_patchify_is_exact_channel_last_and_counts_its_tokens(h, w, p, pad_mode):
    from atoken_core.interfaces import PatchSpec

    mod, spec = modality(pad_mode=pad_mode), PatchSpec(p, 2)  # the model's spec counts RGB; flow uses its own 2
    x = torch.rand(2, h, w, generator=torch.Generator().manual_seed(h * 100 + w)) * 2 - 1
    tokens = mod.patchify([x], spec)
    gh, gw = math.ceil(h / p), math.ceil(w / p)
    assert tokens.patches.features.shape == (gh * gw, p * p * 2) == (mod.num_tokens(x.shape, spec), p * p * 2)
    assert torch.equal(tokens.patches.features[0].view(p, p, 2)[: min(p, h), : min(p, w)],
                       x[:, :p, :p].permute(1, 2, 0))  # channel-last inside a patch
    assert torch.equal(mod.unpatchify(tokens.patches, tokens.meta, spec)[0], x)


def test_registration_module_imports_no_torch():
    code = "import sys, atoken_flow; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ----------------------------------------------------------------------------- the real CLI
def test_plugins_lists_the_flow_components_from_its_entry_point():
    rows = json.loads(ok(cli("plugins", "--json")).stdout)
    mine = {(r["kind"], r["name"]) for r in rows if r["plugin"] == "flow"}
    assert mine == {("modality", "flow"), ("data", "synthetic_flow"), ("loss", "epe")}


def test_both_recipes_validate_and_need_the_plugin():
    for recipe in (FLOW, MIXED):
        out = ok(cli("validate", recipe)).stdout
        assert "OK" in out and "epe" in out and "not run through the model" not in out
    refused = cli("validate", FLOW, ATOKEN_DISABLE_PLUGIN_AUTOLOAD="1")
    assert refused.returncode != 0
    for problem in ("unknown loss 'epe'", "unknown modality 'flow'", "unknown data source 'synthetic_flow'"):
        assert problem in refused.stderr, refused.stderr


def test_dry_run_counts_flow_and_image_tokens():
    out = ok(cli("run", "--dry-run", MIXED)).stdout
    # per step: 16 fields of 64x64 at patch 16 (16 tokens) + 16 images of 128x128 (64 tokens)
    row = next(line for line in out.splitlines() if line.strip().startswith("image+flow"))
    assert row.split()[2] == f"{16 * 16 + 16 * 64:,}", out


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("flow-run") / "run"
    ok(cli("run", FLOW, "--out", out, "--no-progress", *sets(*SMALL), cache=cache))
    return out


@pytest.fixture(scope="module")
def ckpt(flow_run) -> str:
    return str(flow_run / "checkpoints" / "step-000003.safetensors")


@pytest.fixture(scope="module")
def tok(ckpt):
    import atoken

    return atoken.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def flo_folder(tmp_path_factory) -> Path:
    """Three .flo fields of odd sizes (one in a subfolder), a corrupt .flo and a text file."""
    from atoken_flow.flo import flo_bytes

    folder = tmp_path_factory.mktemp("flo")
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(flo_bytes(smooth_pixels(h, w, seed=i)))
    (folder / "broken.flo").write_bytes(b"PIEH")
    (folder / "notes.txt").write_text("not a sample")
    return folder


@pytest.mark.slow
def test_flow_alone_trains_evaluates_and_writes_its_own_files(flow_run):
    from atoken_core.checkpoint import read_checkpoint

    rows = [json.loads(line) for line in (flow_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"flow/l1", "flow/epe", "flow/kl"} <= set(r) and math.isfinite(r["loss"]) for r in rows)
    report = json.loads((flow_run / "eval.json").read_text())
    assert set(report["final"]["flow"]["per_image"]) == {"field-000", "field-001"}
    assert report["pca_baseline"]["flow"]["components"] == 8
    recon = flow_run / "recon"
    assert sorted(p.name for p in recon.iterdir()) == ["flow-field-000.flo", "flow-field-001.flo",
                                                       "flow-step-000003.png"]
    assert modality().read(str(recon / "flow-field-000.flo")).shape == (2, 44, 70)  # the held-out size
    tensors, meta = read_checkpoint(str(flow_run / "checkpoints" / "step-000003.safetensors"))
    p, t = 4, 2  # the test flavour's patch and temporal patch
    assert tensors["model.stems.flow.weight"].shape[1:] == (t, p * p * 2)  # its own 2-channel patch embedding
    assert tensors["model.heads.flow.weight"].shape[0] == t * p * p * 2


@pytest.mark.slow
def test_flow_and_images_train_in_one_stage(tmp_path, cache):
    out = tmp_path / "mixed"
    ok(cli("run", MIXED, "--out", out, "--no-progress", *sets(*SMALL, *SMALL_IMAGE, "stage[0].batch_size=2"),
           cache=cache))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"image/l1", "image/lpips", "image/gram", "image/kl", "flow/l1", "flow/epe", "flow/kl"} <= keys
    assert not keys & {"flow/lpips", "flow/gram", "image/epe"}  # each loss on the modalities it names
    report = json.loads((out / "eval.json").read_text())
    assert set(report["final"]) == {"image", "flow"}
    assert {p.name for p in (out / "recon").glob("*.png")} == {"image-step-000003.png", "flow-step-000003.png"}


@pytest.mark.slow
def test_eval_scores_a_folder_of_flo_files_with_the_plugin_loss_as_a_metric(ckpt, tok, flo_folder, tmp_path):
    out = tmp_path / "eval"
    line = ok(cli("eval", "--ckpt", ckpt, "--data", flo_folder, "--modality", "flow", "--metrics", "psnr,epe",
                  "--out", out, "--no-progress")).stdout
    assert "3 fields (1 skipped)" in line
    report = json.loads((out / "eval.json").read_text())
    assert report["modality"] == "flow" and report["unit"] == "fields" and report["n_samples"] == 3
    assert report["skipped_first"] == [f"{flo_folder / 'broken.flo'}: not a .flo file: 4 bytes, shorter than the "
                                       "12-byte header"]
    assert report["settings"]["epe"]["plugin"] == "flow"
    assert set(report["per_sample"]) == set(SIZES)
    # EPE recomputed independently: the API's reconstruction (pixels) against the file's field
    from atoken_flow.flo import read_flo_bytes

    for name, values in report["per_sample"].items():
        truth = torch.from_numpy(read_flo_bytes((flo_folder / name).read_bytes(), name)).permute(2, 0, 1)
        recon = tok.reconstruct(str(flo_folder / name), "flow")
        assert values["epe"] == pytest.approx(float(torch.linalg.vector_norm(recon - truth, dim=0).mean()), rel=1e-4)
    assert {"psnr", "epe"} == set(report["metrics"])
    assert "| epe |" in (out / "report.md").read_text()
    from PIL import Image

    assert Image.open(out / "grid.png").format == "PNG"
    assert sorted(p.name for p in (out / "samples").glob("*.flo")) == ["a.flo.flo", "b.flo.flo", "sub__c.flo.flo"]


@pytest.mark.slow
def test_eval_refuses_a_modality_the_checkpoint_never_learnt(ckpt, flo_folder, tmp_path):
    result = cli("eval", "--ckpt", ckpt, "--data", flo_folder, "--modality", "image", "--out", tmp_path / "e")
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip()
    assert message.startswith("atoken: error:") and "\n" not in message and "trained on flow" in message


@pytest.mark.slow
def test_encode_then_decode_a_flo_file_gives_the_api_reconstruction(ckpt, tok, flo_folder, tmp_path):
    from safetensors.torch import load_file

    from atoken_flow.flo import read_flo_bytes

    src, tokens, dst = flo_folder / "b.flo", tmp_path / "b.safetensors", tmp_path / "b-recon.flo"
    ok(cli("encode", "--ckpt", ckpt, src, "-o", tokens))
    saved = load_file(str(tokens))
    h, w = SIZES["b.flo"]
    assert saved["latent"].shape == (math.ceil(h / 4) * math.ceil(w / 4), 8)
    ok(cli("decode", "--ckpt", ckpt, tokens, "-o", dst))
    decoded = read_flo_bytes(dst.read_bytes(), str(dst))
    assert decoded.shape == (h, w, 2)
    want = tok.reconstruct(str(src), "flow")  # pixels, (2, H, W)
    torch.testing.assert_close(torch.from_numpy(decoded).permute(2, 0, 1), want, rtol=1e-5, atol=1e-5)
    bad = cli("encode", "--ckpt", ckpt, flo_folder / "broken.flo", "-o", tmp_path / "x.safetensors")
    assert bad.returncode == 1 and bad.stderr.strip() == (f"atoken: error: {flo_folder / 'broken.flo'}: not a .flo "
                                                          "file: 4 bytes, shorter than the 12-byte header")


@pytest.mark.slow
def test_batch_extraction_of_a_flo_folder(ckpt, tok, flo_folder, tmp_path):
    from atoken_core.extract import load_latents

    out = tmp_path / "latents"
    ok(cli("encode", flo_folder, "-o", out, "--ckpt", ckpt, "--modality", "flow", "--no-progress",
           "--shard-samples", "2"))
    assert sorted(p.name for p in out.glob("part-*.safetensors")) == ["part-00000-00000.safetensors",
                                                                     "part-00000-00001.safetensors"]
    stats = json.loads((out / "stats.json").read_text())
    tokens = sum(math.ceil(h / 4) * math.ceil(w / 4) for h, w in SIZES.values())
    assert stats["modality"] == "flow" and stats["channels"] == 8 == len(stats["std"]) and stats["tokens"] == tokens
    assert stats["samples"] == 3 and stats["skipped"] == 1
    loaded = dict(load_latents(str(out)))
    assert sorted(loaded) == sorted(SIZES)
    for name, enc in loaded.items():
        torch.testing.assert_close(enc.mean, tok.encode(str(flo_folder / name), "flow").mean, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@given(h=st.integers(1, 30), w=st.integers(1, 30))
def test_the_checkpoint_tokenises_any_field_on_its_patch_grid(tok, h, w):
    p = tok.model.spec.patch_size
    field = torch.from_numpy(smooth_pixels(h, w, seed=h * 31 + w)).permute(2, 0, 1)  # pixels, as API users give it
    enc = tok.encode(field, "flow")
    gh, gw = math.ceil(h / p), math.ceil(w / p)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    grid = torch.stack([torch.zeros(gh * gw, dtype=torch.long), cols.flatten(), rows.flatten(),
                        torch.zeros(gh * gw, dtype=torch.long)], dim=1)
    assert enc.num_tokens == gh * gw and torch.equal(enc.coords, grid)
    assert tok.decode(enc).shape == (2, h, w)


def test_downscale_shrinks_the_vectors_with_the_field():
    from atoken_flow.flow import FlowModality
    from atoken_flow import FlowConfig

    modality = FlowModality(FlowConfig())
    field = torch.zeros(2, 40, 80)
    field[0], field[1] = 0.5, -0.25  # uniform motion: right and up
    small = modality.downscale(field, 40)
    assert small.shape == (2, 20, 40)
    assert torch.allclose(small[0], torch.full((20, 40), 0.25)) and torch.allclose(small[1], torch.full((20, 40), -0.125))
    assert modality.downscale(field, 80) is field


def test_tar_shards_read_flow_members_through_the_modality(tmp_path):
    """The first-party tar_shards source decodes a third-party modality's members with its own
    read_bytes: held-out fields whole, training samples crop x crop windows of them."""
    from atoken_core.tarshards import ShardError, write_shards
    from atoken_flow import FlowConfig
    from atoken_flow.flo import flo_bytes
    from atoken_flow.flow import FlowModality
    from atoken_modalities.shards import TarShardsConfig
    from atoken_modalities.shards_impl import TarShards

    modality = FlowModality(FlowConfig())
    rng = np.random.default_rng(0)
    fields = {f"{i:03d}": rng.uniform(-8, 8, size=(20, 30, 2)).astype(np.float32) for i in range(6)}
    records = [(k, {"flo": flo_bytes(v)}) for k, v in fields.items()]
    train = write_shards(records[:4], str(tmp_path / "train-%02d.tar"), 2)
    held = write_shards(records[4:], str(tmp_path / "eval-%02d.tar"), 2)
    config = TarShardsConfig(shards=train, eval_shards=held, modality="flow", crop=16)
    assert config.media == [] and config.train_sample_shape() == (16, 16)
    source = TarShards(config, modality=modality)
    decoded = {k: modality.read_bytes(flo_bytes(v), f"{k}.flo") for k, v in fields.items()}
    assert [n for n, _ in source.eval_samples()] == ["004.flo", "005.flo"]
    assert all(torch.equal(x, decoded[n[:3]]) for n, x in source.eval_samples())
    batch = source.train_batch(5, torch.Generator().manual_seed(1))
    assert all(x.shape == (2, 16, 16) for x in batch)

    def window_of(x, full):
        return any(torch.equal(x, full[:, i : i + 16, j : j + 16]) for i in range(5) for j in range(15))

    assert all(any(window_of(x, decoded[k]) for k in list(fields)[:4]) for x in batch)
    again = source.train_batch(5, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(batch, again))  # a function of the generator
    with pytest.raises(ShardError, match="no modality object"):
        TarShards(config)
    # a recipe's [data.flow] table of kind tar_shards gets the recipe's flow modality
    from atoken_core.build import build_data, build_modality
    from atoken_core.plugin_manager import get_registries
    from atoken_core.recipe import load_recipe

    regs = get_registries()
    table = (f'{{kind = "tar_shards", shards = {json.dumps(train)}, eval_shards = {json.dumps(held)}, '
             f'modality = "flow", crop = 16}}')
    recipe = load_recipe(str(REPO / "plugins" / "atoken-flow" / "recipes" / "flow-tiny.toml"), regs,
                         [f"data.flow={table}", "modality.flow.max_displacement=8.0"])
    built = build_data(recipe, regs, "flow", build_modality(recipe, regs, "flow"))
    assert isinstance(built, TarShards) and built.modality.scale == 8.0
