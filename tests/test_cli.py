"""End to end: the real `atoken` CLI on a very small recipe, and what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from atoken_core.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.toml")
# The tiny recipe shrunk to seconds: test flavour (patch 4), 32-pixel crops, no video frames.
SMALL = [
    "model.flavor=test", "model.latent_dim=8", "data.image.crop=32", "data.image.video_frames=0",
    "stage[0].batch_size=4", "eval.max_side=48", "loss[1].max_side=32", "loss[2].max_side=32",
    "log.every=1", "log.checkpoint_every=10", "optim.warmup_steps=2",
]

pytestmark = pytest.mark.slow


def atoken(*args: str, cache: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATOKEN_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "atoken_core.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"atoken {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def small(steps: int, *extra: str) -> list[str]:
    out = []
    for item in [*SMALL, f"stage[0].steps={steps}", *extra]:
        out += ["--set", item]
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    atoken("run", TINY, "--out", str(out), "--no-progress", *small(30), cache=cache)
    return out


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_metrics_and_loss_falls(trained):
    rows = read_metrics(trained / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        assert {"image/l1", "image/lpips", "image/gram", "image/kl", "lr", "seconds", "loss"} <= set(r)
    # batches differ step to step, so compare averages: the first steps against the last ten
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_eval_reports_step0_final_and_pca(trained):
    report = json.loads((trained / "eval.json").read_text())
    start, final = report["step_0"]["image"]["mean"], report["final"]["image"]["mean"]
    assert final["psnr"] > start["psnr"] + 3
    assert set(report["final"]["image"]["per_image"]) == {"china.jpg", "flower.jpg"}
    pca = report["pca_baseline"]["image"]
    assert pca["components"] == 8 and 0 < pca["explained_variance"] < 1
    assert pca["mean"]["psnr"] > 15  # 8 of 48 dimensions of 4x4 patches keep most of a photo


def test_checkpoint_describes_itself(trained):
    ckpts = sorted((trained / "checkpoints").glob("*.safetensors"))
    assert [p.name for p in ckpts] == ["step-000020.safetensors", "step-000030.safetensors"]
    tensors, meta = read_checkpoint(str(ckpts[-1]))
    assert meta["recipe"]["model"]["flavor"] == "test" and meta["recipe"]["stage"][0]["steps"] == 30
    assert meta["atoken_version"] and meta["state"]["step"] == 30
    assert any(k.startswith("optim.") for k in tensors)


def test_recon_grid_png(trained):
    (grid,) = (trained / "recon").glob("*.png")
    img = Image.open(grid)
    assert img.format == "PNG" and img.width > 3 * 48


def test_encode_decode_round_trip_any_size(trained, tmp_path, cache):
    src = tmp_path / "odd.png"
    arr = (torch.rand(23, 37, 3) * 255).byte().numpy()
    Image.fromarray(arr).save(src)
    ckpt = str(sorted((trained / "checkpoints").glob("*.safetensors"))[-1])
    atoken("encode", "--ckpt", ckpt, str(src), "-o", str(tmp_path / "t.safetensors"), cache=cache)
    from safetensors.torch import load_file

    tokens = load_file(str(tmp_path / "t.safetensors"))
    assert tokens["latent"].shape == (6 * 10, 8) and tokens["coords"].shape == (60, 4)
    atoken("decode", "--ckpt", ckpt, str(tmp_path / "t.safetensors"), "-o", str(tmp_path / "r.png"), cache=cache)
    assert Image.open(tmp_path / "r.png").size == (37, 23)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, cache, trained):
    out = tmp_path / "killed"
    env = {**os.environ, "ATOKEN_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "atoken_core.cli", "run", TINY, "--out", str(out), "--no-progress", *small(30)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000010.safetensors").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((out / "checkpoints").glob("*.tmp-*")) or True  # a stray temp file is ignored, never loaded
    for p in (out / "checkpoints").glob("step-*.safetensors"):
        read_checkpoint(str(p))  # every checkpoint on disk is complete
    atoken("run", TINY, "--out", str(out), "--no-progress", "--resume", *small(30), cache=cache)
    resumed = read_metrics(out / "metrics.jsonl")
    straight = read_metrics(trained / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(resumed, straight):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])


def test_refuses_to_overwrite_a_run(trained, cache):
    proc = atoken("run", TINY, "--out", str(trained), *small(30), cache=cache, check=False)
    assert proc.returncode == 1 and "already holds checkpoints; pass --resume" in proc.stderr


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["validate", TINY, "--set", "loss[0].kind=l2"], "loss[0].kind: unknown loss 'l2'", 2),
        (["validate", TINY, "--set", "model.flavour=tiny"], "unknown key 'flavour' (did you mean 'flavor'?)", 2),
        (["run", TINY, "--out", "/nonexistent-parent/x/run"], "parent folder '/nonexistent-parent/x' does not exist", 1),
    ],
)
def test_clear_errors(args, message, code, cache):
    proc = atoken(*args, cache=cache, check=False)
    assert proc.returncode == code and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_image_inputs(trained, tmp_path, cache):
    ckpt = str(sorted((trained / "checkpoints").glob("*.safetensors"))[-1])
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    good = tmp_path / "good.png"
    Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    cases = {
        "notes.png": "not an image file PIL can read",
        "empty.png": "file is empty",
        "trunc.png": "corrupt or truncated image",
        "missing.png": "file not found",
    }
    for name, message in cases.items():
        proc = atoken("encode", "--ckpt", ckpt, str(tmp_path / name), "-o", str(tmp_path / "t.safetensors"),
                      cache=cache, check=False)
        assert proc.returncode == 1 and f"{tmp_path / name}: {message}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_wrong_architecture_checkpoint(trained, tmp_path, cache):
    # A tokens file from this model decoded by a checkpoint of another latent size.
    other = tmp_path / "other"
    atoken("run", TINY, "--out", str(other), "--no-progress", *small(1, "model.latent_dim=4"), cache=cache)
    good = tmp_path / "g.png"
    Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(good)
    ckpt = str(sorted((trained / "checkpoints").glob("*.safetensors"))[-1])
    atoken("encode", "--ckpt", ckpt, str(good), "-o", str(tmp_path / "t.safetensors"), cache=cache)
    other_ckpt = str(next((other / "checkpoints").glob("*.safetensors")))
    proc = atoken("decode", "--ckpt", other_ckpt, str(tmp_path / "t.safetensors"), "-o", str(tmp_path / "x.png"),
                  cache=cache, check=False)
    assert proc.returncode == 1 and "expects 4-channel latents, got shape (16, 8)" in proc.stderr


def test_fsq_checkpoint_encodes_integer_codes(tmp_path, cache):
    out = tmp_path / "fsq"
    atoken("run", TINY, "--out", str(out), "--no-progress",
           *small(3, "bottleneck={kind = \"fsq\", levels = [5, 4]}", "model.latent_dim=4", "eval.pca_baseline=false"),
           cache=cache)
    ckpt = str(next((out / "checkpoints").glob("*.safetensors")))
    src = tmp_path / "x.png"
    Image.fromarray((torch.rand(10, 9, 3) * 255).byte().numpy()).save(src)
    atoken("encode", "--ckpt", ckpt, str(src), "-o", str(tmp_path / "t.safetensors"), cache=cache)
    from safetensors.torch import load_file

    tokens = load_file(str(tmp_path / "t.safetensors"))
    assert "latent" not in tokens and tokens["codes"].dtype == torch.int64
    assert tokens["codes"].shape == (3 * 3, 2) and int(tokens["codes"].max()) < 20
    atoken("decode", "--ckpt", ckpt, str(tmp_path / "t.safetensors"), "-o", str(tmp_path / "r.png"), cache=cache)
    assert Image.open(tmp_path / "r.png").size == (9, 10)


def test_pca_shortcut_run_starts_at_the_baseline(tmp_path, cache):
    out = tmp_path / "shortcut"
    atoken("run", TINY, "--out", str(out), "--no-progress", *small(2, 'model.shortcut="pca"'), cache=cache)
    report = json.loads((out / "eval.json").read_text())
    for name, start in report["step_0"]["image"]["per_image"].items():
        pca = report["pca_baseline"]["image"]["per_image"][name]
        assert abs(start["psnr"] - pca["psnr"]) < 1e-3 and abs(start["ssim"] - pca["ssim"]) < 1e-4
    assert "shortcut" in report["params"]


def test_stage_switches_bottleneck_and_latent_and_resumes_across_the_switch(tmp_path, cache):
    out = tmp_path / "two-stage"
    stages = ['stage[1]={name = "fsq", steps = 3, batch_size = 4, latent_dim = 12, '
              'bottleneck = {kind = "fsq", levels = [5, 4]}}',
              "log.checkpoint_every=3", "log.keep_checkpoints=3", "eval.pca_baseline=false"]
    atoken("run", TINY, "--out", str(out), "--no-progress", *small(3, *stages), cache=cache)
    ckpts = sorted((out / "checkpoints").glob("*.safetensors"))
    assert [p.name for p in ckpts] == ["step-000003.safetensors", "step-000006.safetensors"]
    first, _ = read_checkpoint(str(ckpts[0]))
    last, meta = read_checkpoint(str(ckpts[1]))
    assert first["model.bottleneck.proj.weight"].shape[0] == 16  # KL: mean and log-variance of 8 channels
    assert last["model.bottleneck.proj.weight"].shape[0] == 12 and meta["state"]["stage"] == 1  # grown 8 -> 12
    assert last["model.decoder_in.weight"].shape == (32, 12)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["image"] * 3 + ["fsq"] * 3
    assert "image/kl" in rows[0] and "image/kl" not in rows[-1]  # no KL term on FSQ latents

    # resume from the stage-0 checkpoint: the FSQ stage replays exactly
    ckpts[1].unlink()
    atoken("run", TINY, "--out", str(out), "--no-progress", "--resume", *small(3, *stages), cache=cache)
    def without_time(rs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]

    assert without_time(read_metrics(out / "metrics.jsonl")) == without_time(rows)


def test_image_and_video_curriculum_end_to_end(tmp_path, cache):
    # recipes/tiny-video.toml shrunk: stage 1 images, stage 2 images + video with the latent grown
    out = tmp_path / "tv"
    video_recipe = str(ROOT / "recipes" / "tiny-video.toml")
    sets = ["model.flavor=test", "model.latent_dim=8", "stage[1].latent_dim=12", "data.image.crop=32",
            "data.video.crop=16", "data.video.frames=4", "data.video.max_side=64", "data.video.max_frames=12",
            "data.video.eval_frames=4", "eval.max_side=48", "stage[0].steps=2", "stage[1].steps=2",
            "stage[0].batch_size=2", "stage[1].batch_size=2", "log.every=1"]
    atoken("run", video_recipe, "--out", str(out), "--no-progress", *[a for s in sets for a in ("--set", s)],
           cache=cache)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["image", "image", "image+video", "image+video"]
    assert "video/l1" in rows[-1] and "video/lpips" not in rows[-1]  # perceptual losses are image-only here
    report = json.loads((out / "eval.json").read_text())
    assert set(report["final"]) == {"image", "video"}
    assert report["pca_baseline"]["video"]["components"] == 12
    assert {p.name for p in (out / "recon").glob("*.png")} == {"image-step-000004.png", "video-step-000004.png",
                                                                "video-carphone_pristine-frames.png"}
    from atoken_modalities.video_impl import load_video

    clip = load_video(str(out / "recon" / "video-carphone_pristine.mp4"))  # the reconstruction, playable
    assert clip.shape[:2] == (4, 3)  # data.video.eval_frames
    _, meta = read_checkpoint(str(out / "checkpoints" / "step-000004.safetensors"))
    assert meta["state"]["stage"] == 1


def test_ema_weights_tensorboard_and_eval_every(tmp_path, cache):
    pytest.importorskip("tensorboard")
    out = tmp_path / "ema"
    atoken("run", TINY, "--out", str(out), "--no-progress",
           *small(4, "optim.ema_decay=0.5", "eval.every=2", "eval.pca_baseline=false"), cache=cache)
    tensors, _ = read_checkpoint(str(out / "checkpoints" / "step-000004.safetensors"))
    ema = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
    live = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    assert ema and set(ema) <= set(live)
    # after 4 updates with decay 0.5 the average trails the live weights but has moved from init
    name = "decoder_in.weight"
    assert not torch.equal(ema[name], live[name])
    evals = read_metrics(out / "eval.jsonl")
    assert [r["step"] for r in evals] == [0, 2, 4] and "psnr" in evals[-1]["image"]
    assert (out / "recon" / "image-step-000002.png").exists()
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"loss", "image/l1", "eval/image/psnr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]


def test_semantic_distillation_trains_w_s_from_a_teacher(tmp_path, cache):
    # A flavour with the attention-pooling head and W_s, the random stand-in teacher, a prompt set.
    out = tmp_path / "sem"
    distill = ('loss=[{kind="l1"}, {kind="distill", weight=1.0, teacher="random", '
               'teacher_config={embed_dim=64}, prompts=["a photo of a cat", "a photo of a rocket", "coins"]}]')
    atoken("run", TINY, "--out", str(out), "--no-progress",
           *small(4, "model.flavor=test-siglip", distill, "eval.pca_baseline=false", "optim.lr=1e-2"), cache=cache)
    rows = read_metrics(out / "metrics.jsonl")
    assert all("image/distill" in r and r["image/distill"] >= 0 for r in rows)
    tensors, _ = read_checkpoint(str(out / "checkpoints" / "step-000004.safetensors"))
    assert tensors["model.semantic_proj.weight"].shape == (64, 64)


def test_stage_weight_scales_a_modalitys_loss(tmp_path, cache):
    losses = []
    for w in (1.0, 2.5):
        out = tmp_path / f"w{w}"
        atoken("run", TINY, "--out", str(out), "--no-progress",
               *small(1, f"stage[0].weights={{image={w}}}", "eval.pca_baseline=false"), cache=cache)
        (row,) = read_metrics(out / "metrics.jsonl")
        losses.append(row["loss"])
    assert losses[1] == pytest.approx(2.5 * losses[0], rel=1e-5)


def test_run_report_counts_skipped_files(tmp_path, cache):
    import numpy as np

    for split, n in (("train", 3), ("eval", 1)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.fromarray((np.random.default_rng(i).random((40, 48, 3)) * 255).astype("uint8")).save(
                tmp_path / split / f"{i}.png")
    (tmp_path / "train" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    folder = f'data.image={{kind="image_folder", root="{tmp_path / "train"}", eval_root="{tmp_path / "eval"}", crop=32}}'
    atoken("run", TINY, "--out", str(out), "--no-progress", *small(1, folder, "eval.pca_baseline=false"), cache=cache)
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["image"]["n_skipped"] == 1
    assert "broken.png" in report["data"]["image"]["skipped_first"][0]


def test_plugin_errors_are_one_line_without_a_traceback(tmp_path, cache):
    # A data source's own error type (a tar_shards pattern matching nothing) reaches the user as
    # one line: every plugin error derives from atoken_core.errors.UserError.
    proc = atoken("run", TINY, "--out", str(tmp_path / "run"), "--no-progress", "--set",
                  f'data.image={{kind="tar_shards", shards=["{tmp_path}/none-*.tar"], eval_shards=["{tmp_path}/x.tar"]}}',
                  cache=cache, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"atoken: error: {tmp_path}/none-*.tar: no shard matches this pattern"
