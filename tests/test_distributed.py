"""Two processes on the CPU (gloo) under torchrun: FSDP2 gives the single-process loss curve on the
same global batch, sharded checkpoints resume exactly, and the consolidated export is usable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_cli import TINY, atoken, read_metrics

pytestmark = pytest.mark.slow

# The tiny recipe at test size: FSQ (deterministic, so no sampling noise differs between a
# batch of 4 in one process and 2 + 2 in two), L1 only, and a second stage that grows the
# latent 8 -> 12 (the sharded model is rebuilt at the switch).
ARGS = [
    "model.flavor=test", "model.latent_dim=8", "data.image.crop=32", "data.image.video_frames=0",
    "stage[0].batch_size=4", "stage[0].steps=3", "eval.max_side=48", "log.every=1", "log.checkpoint_every=3",
    "optim.warmup_steps=2", 'bottleneck={kind="fsq", levels=[5, 4]}', 'loss=[{kind="l1"}]',
    "eval.pca_baseline=false", "eval.grid_images=1", 'stage[1]={name="grow", steps=2, batch_size=4, latent_dim=12}',
]
SETS = [a for s in ARGS for a in ("--set", s)]
# Summation order differs (each rank reduces its half, then the halves are averaged), so the
# curves agree to float32 rounding, not bit for bit.
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("dist")
    atoken("run", TINY, "--out", str(root / "one"), "--no-progress", *SETS, cache=cache)
    atoken("run", TINY, "--out", str(root / "two"), "--no-progress", "--nproc", "2", *SETS, cache=cache)
    return root


def test_two_processes_follow_the_single_process_loss_curve(runs):
    one, two = read_metrics(runs / "one" / "metrics.jsonl"), read_metrics(runs / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in two] == ["image"] * 3 + ["grow"] * 2
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    report = json.loads((runs / "two" / "eval.json").read_text())
    assert report["processes"] == 2


def test_sharded_checkpoints_are_folders_and_resume_exactly(runs, cache, tmp_path):
    ckpts = sorted(p.name for p in (runs / "two" / "checkpoints").iterdir())
    assert ckpts == ["step-000003.dcp", "step-000005.dcp"]
    meta = json.loads((runs / "two" / "checkpoints" / "step-000003.dcp" / "atoken.json").read_text())
    assert meta["state"]["step"] == 3 and meta["state"]["world_size"] == 2 and meta["recipe"]["name"] == "tiny"
    # a crashed run: the last checkpoint is gone; resuming replays steps 4-5 (across the stage switch)
    out = tmp_path / "two"
    shutil.copytree(runs / "two", out)
    shutil.rmtree(out / "checkpoints" / "step-000005.dcp")
    atoken("run", TINY, "--out", str(out), "--no-progress", "--nproc", "2", "--resume", *SETS, cache=cache)

    def without_time(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert without_time(read_metrics(out / "metrics.jsonl")) == without_time(read_metrics(runs / "two" / "metrics.jsonl"))


def test_consolidated_export_rebuilds_the_model(runs):
    from atoken_core.build import model_from_checkpoint
    from atoken_core.plugin_manager import get_registries

    model, recipe, meta = model_from_checkpoint(str(runs / "two" / "final.safetensors"), get_registries())
    assert meta["state"]["stage"] == 1 and model.bottleneck.latent_dim == 12
    single, _, _ = model_from_checkpoint(str(runs / "one" / "checkpoints" / "step-000005.safetensors"), get_registries())
    for (name, a), (_, b) in zip(model.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_sharded_checkpoint_cannot_be_resumed_by_one_process(runs, cache, tmp_path):
    out = tmp_path / "two"
    shutil.copytree(runs / "two", out)
    proc = atoken("run", TINY, "--out", str(out), "--no-progress", "--resume", *SETS, cache=cache, check=False)
    assert proc.returncode == 1 and "a sharded checkpoint; resume it under torchrun" in proc.stderr


def test_round_robin_reduces_gradients_once_per_optimiser_step(tmp_path, cache):
    """Two modalities accumulate into one optimiser step; FSDP2 reduce-scatters each unit's
    gradients once per step (after the last micro-step), not once per micro-step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "collectives.json"
    sets = ["model.flavor=test", "model.latent_dim=8", "data.image.crop=32", "data.video.crop=32",
            "data.video.frames=2", "data.video.max_side=64", 'loss=[{kind="l1"}]',
            'stage=[{name="both", steps=2, batch_size=2, modalities=["image", "video"]}]']
    env = {**os.environ, "ATOKEN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(root / "tests" / "collectives_script.py"), str(out),
                           str(root / "recipes" / "tiny-video.toml"), *sets],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for step in report["steps"]:
        assert step["finite"] and step["micro_steps"] == 2
        # one reduce-scatter per FSDP unit (each block and the root), whatever the micro-steps
        assert step["reduce_scatters"] == report["units"], report
