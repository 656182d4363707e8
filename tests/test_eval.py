"""`atoken eval` and its metrics: Fréchet distance against closed forms, codebook statistics,
and a reproducible end-to-end run of the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_cli import TINY, atoken, small

from atoken_core.metrics import codebook_usage, feature_stats, frechet_distance, frechet_distance_features
from atoken_modalities.photos_impl import resolve_package_path


def make_checkpoint(path: Path, recipe_file: str, overrides: list[str], seed: int = 0, step: int = 0) -> str:
    """A freshly initialised model of ``recipe_file`` (with ``overrides``) saved as a checkpoint of
    ``step``, as the trainer saves one: no training, real weights, real recipe metadata."""
    from atoken_core.build import build_model
    from atoken_core.checkpoint import save_checkpoint
    from atoken_core.plugin_manager import get_registries
    from atoken_core.recipe import load_recipe, recipe_to_dict

    registries = get_registries()
    recipe = load_recipe(recipe_file, registries, overrides)
    torch.manual_seed(seed)
    model = build_model(recipe, registries)
    save_checkpoint(str(path), model, recipe=recipe_to_dict(recipe), step=step, stage=0)
    return str(path)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_full_covariances_via_eigenvalues():
    # Tr((S1 S2)^1/2) = sum of square roots of the (real, non-negative) eigenvalues of S1 S2.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("n1,n2,d", [(40, 50, 6), (3, 5, 64), (7, 4, 20)])
def test_frechet_distance_features_matches_scipy_sqrtm(n1, n2, d):
    # Few samples in many dimensions (the eval case): exact via singular values, checked against
    # the eigenvalue formula and scipy's sqrtm on the full covariances.
    from scipy import linalg

    rng = np.random.default_rng(n1 * d)
    a, b = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) * 1.5 + 0.3
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    eig = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    got = frechet_distance_features(a, b)
    assert got == pytest.approx(eig, rel=1e-6) and got == pytest.approx(ref, rel=1e-4)
    assert frechet_distance_features(a, a) == pytest.approx(0, abs=1e-8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance_features(a[:1], b)


def test_codebook_usage():
    uniform = codebook_usage(torch.arange(16).repeat(3), 16)
    assert uniform["utilisation"] == 1.0 and uniform["perplexity"] == pytest.approx(16)
    single = codebook_usage(torch.full((10,), 3), 16)
    assert single["utilisation"] == 1 / 16 and single["perplexity"] == pytest.approx(1)
    half = codebook_usage(torch.arange(8), 16)
    assert half["utilisation"] == 0.5 and half["perplexity"] == pytest.approx(8) and half["tokens"] == 8


@pytest.fixture(scope="module")
def fsq_checkpoint(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("fsq") / "run"
    atoken("run", TINY, "--out", str(out), "--no-progress", *small(2, 'bottleneck={kind = "fsq", levels = [5, 4]}',
           "model.latent_dim=4", "eval.pca_baseline=false"), cache=cache)
    return str(next((out / "checkpoints").glob("*.safetensors"))), cache


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        img = Image.open(resolve_package_path(f"pkg://skimage/data/{name}")).convert("RGB")
        img.resize((img.width // 8, img.height // 8)).save(root / name)
    (root / "notes.png").write_text("not an image")
    return root


@pytest.mark.slow
def test_eval_writes_report_and_reruns_identically(fsq_checkpoint, folder, tmp_path, monkeypatch):
    from atoken_core.cli import main

    ckpt, cache = fsq_checkpoint
    import torchvision

    torch.manual_seed(0)  # a random Inception stands in for real weights (which cannot be downloaded here)
    inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in inception.state_dict().items()}, str(weights))
    args = ["eval", "--ckpt", ckpt, "--data", str(folder), "--metrics", "psnr,ssim,lpips,codebook,rfid",
            "--inception-weights", str(weights), "--max-side", "64", "--no-progress"]
    atoken(*args, "--out", str(tmp_path / "a"), cache=cache)  # the real command, in its own process
    monkeypatch.setenv("ATOKEN_CACHE", str(cache))
    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # again, in this process
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert a == b, "same checkpoint, data and settings must give identical numbers"
    assert a["n_samples"] == 3 and a["n_skipped"] == 1 and "notes.png" in a["skipped_first"][0]
    assert a["modality"] == "image" and a["shapes"]["coffee.png"] == [3, 43, 64]
    assert set(a["per_sample"]["coffee.png"]) == {"psnr", "ssim", "lpips"}
    assert a["metrics"]["codebook"]["codebook_size"] == 20 and 0 < a["metrics"]["codebook"]["utilisation"] <= 1
    assert np.isfinite(a["metrics"]["rfid"]) and a["metrics"]["rfid"] >= 0
    assert a["settings"]["rfid"]["weights"] == str(weights)
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| psnr |" in report and "grid.png" in report and (tmp_path / "a" / "grid.png").exists()


@pytest.mark.slow
def test_eval_errors_are_clear(fsq_checkpoint, folder, tmp_path, capsys, monkeypatch):
    from atoken_core.cli import main

    ckpt, cache = fsq_checkpoint
    monkeypatch.setenv("ATOKEN_CACHE", str(cache))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", str(folder), "--metrics", "rfid"], "--metrics rfid needs --inception-weights"),
        (["--data", str(folder), "--metrics", "fid"], "--metrics: unknown fid"),
        (["--data", str(empty)], f"{empty}: no readable images"),
        (["--data", str(folder), "--metrics", "rfid", "--inception-weights", str(tmp_path / "none.safetensors")],
         "Inception-v3 weights not found"),
        (["--data", str(folder), "--max-frames", "0"], "--max-frames must be >= 1, got 0"),
        (["--data", "sklearn://digits", "--modality", "video"], "trained on image, not on 'video'"),
    ]
    for extra, message in cases:  # main() is the command line's own entry point: one line on stderr, exit 1
        assert main(["eval", "--ckpt", ckpt, "--out", str(tmp_path / "o"), "--no-progress", *extra]) == 1, extra
        err = capsys.readouterr().err
        assert err.startswith("atoken: error: ") and message in err, (extra, err[-500:])
    proc = atoken("eval", "--ckpt", ckpt, "--out", str(tmp_path / "o"), "--data", str(folder), "--metrics", "rfid",
                  cache=cache, check=False)  # and once through a real process
    assert proc.returncode == 1 and "needs --inception-weights" in proc.stderr and "Traceback" not in proc.stderr
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
