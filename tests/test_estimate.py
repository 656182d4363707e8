"""`--dry-run` estimates against torch's own FLOP counter and a real build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import make_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from atoken_core.build import build_model
from atoken_core.estimate import dry_run, format_dry_run, forward_flops
from atoken_core.recipe import load_recipe
from atoken_core.sparse import Sparse4D
from test_model import random_tokens

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.toml")


def test_forward_flops_match_torch_flop_counter(registries):
    model = make_model(registries)
    tokens = Sparse4D.cat(random_tokens([10, 10, 10]))  # equal lengths: the batched attention path
    # The math SDPA backend runs attention as matmuls the counter sees (the fused CPU kernel
    # is invisible to it).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(tokens, sample=False)
    assert counter.get_total_flops() == forward_flops(model.flavor, 8, model.spec.frame_dim, [10, 10, 10])


def test_forward_flops_of_mixed_lengths_match_torch_flop_counter(registries):
    model = make_model(registries)
    lengths = [5, 12, 7, 12]  # the grouped path: attention per distinct length, sum of n_i^2
    tokens = Sparse4D.cat(random_tokens(lengths))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(tokens, sample=False)
    assert counter.get_total_flops() == forward_flops(model.flavor, 8, model.spec.frame_dim, lengths)


def test_training_step_is_three_forwards(registries):
    """benchmarks/train_step.py counts a step's model FLOPs as 3 x forward (backward = 2 x
    forward: a matmul's gradient needs one product for its input, one for its weight). The
    exception is the patch embedding, whose input (pixels) needs no gradient."""
    model = make_model(registries)
    lengths = [10, 10, 10]
    tokens = Sparse4D.cat(random_tokens(lengths))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        recon, _ = model(tokens, sample=True)
        recon.square().mean().backward()
    fl, frame_dim = model.flavor, model.spec.frame_dim
    embed = 2 * sum(lengths) * fl.width * frame_dim
    assert counter.get_total_flops() == 3 * forward_flops(fl, 8, frame_dim, lengths) - embed


def test_dry_run_counts_params_without_building_weights(registries):
    recipe = load_recipe(TINY, registries, ["model.flavor=\"test\"", "model.latent_dim=8", "data.image.crop=32"])
    report = dry_run(recipe, registries)
    real = build_model(recipe, registries)
    assert report["params"] == real.num_params()
    (stage,) = report["stages"]
    assert stage["tokens_per_step"] == recipe.stage[0].batch_size * (32 // 4) ** 2


def test_dry_run_cli_so400m_allocates_nothing():
    # 847M parameters would take 3.2 GiB in fp32. Measured as growth of the peak resident set
    # over a tiny dry run in the same process, so library loading does not count.
    code = (
        "import resource, sys\n"
        "from atoken_core.cli import main\n"
        "def peak():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        f"assert main(['run', {TINY!r}, '--dry-run']) == 0\n"
        "before = peak()\n"
        f"rc = main(['run', {TINY!r}, '--dry-run', '--set', 'model.flavor=\"so400m\"'])\n"
        "print('GROWTH', peak() - before)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "flavor so400m: 846,993,291 parameters" in proc.stdout
    growth = float(proc.stdout.split("GROWTH")[1])
    assert growth < 300, f"the so400m dry run grew the process by {growth:.0f} MiB"


def test_full_recipe_dry_run_is_the_papers_four_stages(registries):
    # recipes/full.toml: so400m (~800M encoder + decoder), image -> +video (48 channels) -> +3D -> FSQ
    report = dry_run(load_recipe(str(ROOT / "recipes" / "full.toml"), registries), registries)
    assert 780e6 < report["params"]["encoder"] + report["params"]["decoder"] < 900e6
    assert [s["modalities"] for s in report["stages"]] == [["image"], ["image", "video"], ["image", "video", "3d"],
                                                          ["image", "video", "3d"]]
    with torch.device("meta"):
        model = build_model(load_recipe(str(ROOT / "recipes" / "full.toml"), registries), registries)
    assert model.heads["3d"].out_features == 32 * 14  # 32 Gaussians per voxel, 14 numbers each


def test_finetune_official_dry_run_has_apples_parameter_count(registries):
    # Apple's So/C has 845,738,048 parameters (OFFICIAL.md, read from its checkpoint's shapes)
    report = dry_run(load_recipe(str(ROOT / "recipes" / "finetune-official.toml"), registries), registries)
    assert report["total_params"] == 845_738_048
    assert "flavor atoken-so-c: 845,738,048 parameters" in format_dry_run(report)
