"""Losses that learn (the sigmoid loss's log_t and bias, here against the seeded random teacher):
their values and their optimiser's state are in both kinds of checkpoint (``loss.{i}.{name}``,
``loss_optim.*``), so a resumed run continues exactly; under torchrun their gradients are
averaged over the ranks (each holds a replicated copy) and the sigmoid loss compares each rank's
samples with the whole global batch's captions, so two gloo processes follow the single-process
run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_cli import TINY, atoken, read_metrics

pytestmark = pytest.mark.slow

# test-siglip: the smallest flavour with a semantic head (W_s gives 64 = the random teacher's
# embed_dim). FSQ: deterministic, so no sampling noise differs between a batch of 4 in one
# process and 2 + 2 in two. L1 + the sigmoid loss (loss[1]) on captioned photos.
ARGS = [
    'model.flavor="test-siglip"', "model.latent_dim=8", "data.image.crop=16", "data.image.video_frames=0",
    "stage[0].batch_size=4", "stage[0].steps=4", "optim.warmup_steps=1", "eval.max_side=32", "log.every=1",
    "log.checkpoint_every=2", 'bottleneck={kind="fsq", levels=[5, 4]}',
    'loss=[{kind="l1"}, {kind="sigmoid", teacher="random", teacher_config={embed_dim=64}}]',
    "eval.pca_baseline=false", "eval.grid_images=1",
]
NAMES = ["loss.1.log_t", "loss.1.bias"]
INIT = {"loss.1.log_t": math.log(10.0), "loss.1.bias": -10.0}
RTOL = 1e-5  # as tests/test_distributed.py: each rank sums its half, then the halves are averaged


def sets(*args: str) -> list[str]:
    return [a for s in args for a in ("--set", s)]


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def single_state(path) -> dict[str, torch.Tensor]:
    """The losses' tensors (values and optimiser state) of a single-process checkpoint."""
    from atoken_core.checkpoint import read_checkpoint

    tensors, _ = read_checkpoint(str(path))
    return {k: v for k, v in tensors.items() if k.startswith(("loss.", "loss_optim."))}


def sharded_state(path) -> dict[str, torch.Tensor]:
    """The same from a torch.distributed.checkpoint folder, read in this one process."""
    import torch.distributed.checkpoint as dcp

    spec = json.loads((path / "atoken.json").read_text())["loss_state"]
    state = {"loss": {k: torch.empty(s["shape"], dtype=getattr(torch, s["dtype"])) for k, s in spec.items()}}
    with pytest.warns(UserWarning, match="load in a single process"):
        dcp.load(state, checkpoint_id=str(path))
    return state["loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("loss-params")
    atoken("run", TINY, "--out", str(root / "one"), "--no-progress", *sets(*ARGS), cache=cache)
    atoken("run", TINY, "--out", str(root / "two"), "--no-progress", "--nproc", "2", *sets(*ARGS), cache=cache)
    return root


def test_checkpoints_hold_the_loss_parameters_and_their_optimiser_state(runs):
    state = single_state(runs / "one" / "checkpoints" / "step-000002.safetensors")
    assert set(state) == {*NAMES, *(f"loss_optim.{i}.{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq"))}
    for name in NAMES:  # trained: resuming at the initial values would change the rest of the run
        assert abs(float(state[name]) - INIT[name]) > 1e-4, name
    assert float(state["loss_optim.0.step"]) == 2
    assert set(sharded_state(runs / "two" / "checkpoints" / "step-000002.dcp")) == set(state)


def test_one_process_resume_restores_the_loss_parameters(runs, cache, tmp_path):
    out = tmp_path / "one"
    shutil.copytree(runs / "one", out)
    (out / "checkpoints" / "step-000004.safetensors").unlink()
    atoken("run", TINY, "--out", str(out), "--no-progress", "--resume", *sets(*ARGS), cache=cache)
    assert without_time(read_metrics(out / "metrics.jsonl")) == without_time(read_metrics(runs / "one" / "metrics.jsonl"))
    resumed = single_state(out / "checkpoints" / "step-000004.safetensors")
    straight = single_state(runs / "one" / "checkpoints" / "step-000004.safetensors")
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def test_two_processes_follow_the_single_process_run(runs):
    one, two = read_metrics(runs / "one" / "metrics.jsonl"), read_metrics(runs / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("loss", "image/sigmoid", "image/l1"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), (a["step"], key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    single = single_state(runs / "one" / "checkpoints" / "step-000004.safetensors")
    sharded = sharded_state(runs / "two" / "checkpoints" / "step-000004.dcp")
    assert sharded.keys() == single.keys()
    for name in NAMES:
        # the distance travelled from the initial value, so the tolerance is not swamped by it
        moved = float(single[name]) - INIT[name]
        assert float(sharded[name]) - INIT[name] == pytest.approx(moved, rel=1e-3), name
    for name, value in single.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-7, msg=name)


def test_sharded_checkpoint_resumes_the_loss_parameters(runs, cache, tmp_path):
    out = tmp_path / "two"
    shutil.copytree(runs / "two", out)
    shutil.rmtree(out / "checkpoints" / "step-000004.dcp")
    atoken("run", TINY, "--out", str(out), "--no-progress", "--nproc", "2", "--resume", *sets(*ARGS), cache=cache)
    assert without_time(read_metrics(out / "metrics.jsonl")) == without_time(read_metrics(runs / "two" / "metrics.jsonl"))
    resumed = sharded_state(out / "checkpoints" / "step-000004.dcp")
    straight = sharded_state(runs / "two" / "checkpoints" / "step-000004.dcp")
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def test_resume_refuses_a_recipe_whose_losses_learn_other_parameters(runs, cache, tmp_path):
    out = tmp_path / "one"
    shutil.copytree(runs / "one", out)
    proc = atoken("run", TINY, "--out", str(out), "--no-progress", "--resume",
                  *sets(*ARGS, 'loss=[{kind="l1"}]'), cache=cache, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the losses' learnable parameters do not match" in proc.stderr
    assert "unexpected: loss.1.bias, loss.1.log_t" in proc.stderr
    assert "Traceback" not in proc.stderr
