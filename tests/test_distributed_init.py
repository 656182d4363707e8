"""Initialisations that edit the whole model before the first step (``model.init = "siglip2:..."``,
``model.shortcut = "pca"``) under torchrun: rank 0 runs them on a gathered copy and every rank's
FSDP2 shard is refilled from it, so two gloo processes start from, and follow, the single-process
run."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import TINY, atoken, read_metrics
from test_distributed import ARGS, RTOL
from test_siglip2 import hf_model, our_model, saved

pytestmark = pytest.mark.slow


def sets(*args: str) -> list[str]:
    return [a for s in args for a in ("--set", s)]


def both(root, name, args, cache):
    """The same recipe in one process and in two; returns the two output folders."""
    one, two = root / f"{name}-one", root / f"{name}-two"
    atoken("run", TINY, "--out", str(one), "--no-progress", *sets(*args), cache=cache)
    atoken("run", TINY, "--out", str(two), "--no-progress", "--nproc", "2", *sets(*args), cache=cache)
    return one, two


def assert_same_run(one, two):
    a_rows, b_rows = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in b_rows] == [r["step"] for r in a_rows]
    for a, b in zip(a_rows, b_rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
    a, b = (json.loads((p / "eval.json").read_text()) for p in (one, two))
    assert b["processes"] == 2
    for name, metrics in a["step_0"]["image"]["mean"].items():
        assert b["step_0"]["image"]["mean"][name] == pytest.approx(metrics, rel=RTOL), name
    return a, b


# The distributed tests' recipe (FSQ, L1, a second stage that grows the latent 8 -> 12) with the
# PCA shortcut: the shortcut is grown at the switch too.
PCA_ARGS = [*ARGS, 'model.shortcut="pca"']


@pytest.fixture(scope="module")
def pca_runs(tmp_path_factory, cache):
    return both(tmp_path_factory.mktemp("dist-pca"), "pca", PCA_ARGS, cache)


def test_pca_shortcut_under_torchrun_follows_the_single_process_run(pca_runs):
    one, two = pca_runs
    _, b = assert_same_run(one, two)
    assert "shortcut" in b["params"]


def test_pca_shortcut_under_torchrun_starts_at_the_pca_solution(pca_runs, cache, tmp_path):
    # Step 0 of a run without the shortcut's PCA start (pure random transformer) is far worse:
    # the equality above is the PCA's, not two identical random initialisations'.
    one, two = pca_runs
    plain = tmp_path / "plain"
    atoken("run", TINY, "--out", str(plain), "--no-progress", *sets(*ARGS), cache=cache)
    start = json.loads((two / "eval.json").read_text())["step_0"]["image"]["mean"]["psnr"]
    random_start = json.loads((plain / "eval.json").read_text())["step_0"]["image"]["mean"]["psnr"]
    assert start > random_start + 3, (start, random_start)


# lr = 0: the steps change nothing, so the consolidated export shows exactly what was imported.
SIGLIP_ARGS = [
    'model.flavor="test-siglip"', "model.latent_dim=8", "data.image.crop=16", "data.image.video_frames=0",
    "stage[0].batch_size=4", "stage[0].steps=2", "optim.lr=0", "optim.warmup_steps=0", "eval.max_side=32",
    "log.every=1", "log.checkpoint_every=2", 'bottleneck={kind="fsq", levels=[5, 4]}', 'loss=[{kind="l1"}]',
    "eval.pca_baseline=false", "eval.grid_images=1",
]


@pytest.fixture(scope="module")
def siglip_runs(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("dist-siglip")
    path = saved(root, hf_model().state_dict())
    return (path, *both(root, "siglip", [*SIGLIP_ARGS, f'model.init="siglip2:{path}"'], cache))


def test_siglip2_init_under_torchrun_follows_the_single_process_run(siglip_runs):
    _, one, two = siglip_runs
    assert_same_run(one, two)


def test_siglip2_init_under_torchrun_imports_the_encoder(siglip_runs):
    from atoken_core.checkpoint import read_checkpoint
    from atoken_core.siglip2 import encoder_state_dict, import_siglip2, load_siglip2_vision_state

    path, _, two = siglip_runs
    tensors, _ = read_checkpoint(str(two / "final.safetensors"))
    random_start = our_model()
    expected = our_model()
    import_siglip2(expected, load_siglip2_vision_state(path))
    imported = encoder_state_dict(expected)
    assert imported
    for key, value in imported.items():
        assert torch.equal(tensors[f"model.{key}"], value), key
    # a random start would not pass: (almost) every encoder tensor differs from SigLIP2's
    fresh = encoder_state_dict(random_start)
    assert sum(not torch.equal(fresh[k], v) for k, v in imported.items()) > len(imported) // 2


def test_siglip2_init_error_under_torchrun_stops_every_rank(tmp_path, cache):
    # A file for another architecture fails on rank 0; the other rank must raise too, not wait.
    bad = saved(tmp_path, hf_model(patch_size=8).state_dict())
    proc = atoken("run", TINY, "--out", str(tmp_path / "run"), "--no-progress", "--nproc", "2",
                  *sets(*SIGLIP_ARGS, f'model.init="siglip2:{bad}"'), cache=cache, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("patch size: the file has 8x8 patches") >= 2, proc.stderr[-3000:]
    assert bad in proc.stderr
