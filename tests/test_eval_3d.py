"""`atoken eval --modality 3d`: a folder holding a posed-views asset (transforms.json) and mesh
files is scored on held-out views; each asset gets a Gaussian-splat .ply, a turntable and a
views figure; the numbers are recomputed independently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio
from test_cli import atoken
from test_eval import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL_3D = ['model.flavor="test"', "model.latent_dim=8", "data.3d.resolution=8", "data.3d.views=4",
            "data.3d.eval_views=2", "data.3d.size=32"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """box_views/ (6 rendered RGBA views + transforms.json), sphere.ply, a broken mesh."""
    import trimesh

    from atoken_modalities.cameras import sphere_cameras
    from atoken_modalities.mesh_render import render_mesh
    from atoken_modalities.objects_impl import prepare_mesh
    from atoken_modalities.posed_views import write_posed_views

    root = tmp_path_factory.mktemp("assets")
    mesh = prepare_mesh("primitive://box", 0)
    cams = sphere_cameras(6, 2.0, 40.0, 32)
    rgb, depth = render_mesh(mesh.vertices, mesh.faces, mesh.colors, cams)
    write_posed_views(str(root / "box_views"), rgb * 2 - 1, cams, alpha_vhw=torch.isfinite(depth).float())
    trimesh.creation.icosphere(subdivisions=2).export(root / "sphere.ply")
    (root / "broken.obj").write_text("this is not a mesh\n")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt3d") / "3d.safetensors", str(ROOT / "recipes" / "tiny-3d.toml"),
                           SMALL_3D)


@pytest.mark.slow
def test_3d_eval_scores_heldout_views_and_writes_assets(assets, ckpt, cache, tmp_path, registries):
    out = tmp_path / "out"
    proc = atoken("eval", "--ckpt", ckpt, "--data", str(assets), "--modality", "3d", "--metrics", "psnr,ssim",
                  "--out", str(out), "--no-progress", cache=cache)
    report = json.loads((out / "eval.json").read_text())
    assert "2 assets (1 skipped)" in proc.stdout and "broken.obj" in report["skipped_first"][0]
    assert sorted(report["per_sample"]) == ["box_views", "sphere.ply"]
    # posed views: the last 2 of 6 views are held out; meshes: a ring of 2 new cameras (the recipe's eval_views)
    assert report["shapes"]["box_views"] == [2, 3, 32, 32] and report["shapes"]["sphere.ply"] == [2, 3, 32, 32]
    s = report["settings"]["3d"]
    assert s["voxel_resolution"] == 8 and s["render_settings_from"] == "recipe [data.3d] (packaged_meshes)"
    for name in ("box_views", "sphere.ply"):
        for suffix in (".ply", "-turntable.png", ".png"):  # splats, turntable, held-out views vs renders
            assert (out / "samples" / f"{name}{suffix}").stat().st_size > 0
        assert set(report["per_sample"][name]) == {"psnr", "ssim"}
    md = (out / "report.md").read_text()
    assert "samples/sphere.ply-turntable.png" in md and "(samples/sphere.ply.ply)" in md and "| psnr |" in md

    # Independently: the held-out views of the posed-views folder, the model's decoded Gaussians
    # rendered at those cameras, PSNR per view by scikit-image, averaged.
    from atoken_core.build import build_modality, model_from_checkpoint
    from atoken_core.evaluate import to_unit_hwc
    from atoken_modalities.posed_views import load_posed_views

    model, recipe, _ = model_from_checkpoint(ckpt, registries)
    modality = build_modality(recipe, registries, "3d")
    asset = load_posed_views(str(assets / "box_views"), 8, 1.0, heldout=2)
    tokens = modality.patchify([asset], model.spec)
    with torch.no_grad():
        raw, _ = model(tokens.patches, sample=False, head="3d")
    renders = modality.unpatchify(tokens.patches.with_features(raw), tokens.meta, model.spec)[0].clamp(-1, 1)
    psnr = np.mean([peak_signal_noise_ratio(to_unit_hwc(t), to_unit_hwc(r), data_range=1)
                    for t, r in zip(asset.target_views, renders)])
    assert report["per_sample"]["box_views"]["psnr"] == pytest.approx(psnr, rel=1e-6)


def test_3d_eval_heldout_option_and_errors(assets, ckpt, registries, tmp_path):
    from atoken_core.errors import UserError
    from atoken_core.eval_run import EvalError, run_eval

    report = run_eval(ckpt, str(assets / "box_views"), str(tmp_path / "one"), registries, modality="3d",
                      metrics=["psnr"], heldout_views=3, progress=False)
    assert list(report["per_sample"]) == ["box_views"] and report["shapes"]["box_views"][0] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no readable 3D assets"):
        run_eval(ckpt, str(empty), str(tmp_path / "o"), registries, modality="3d", metrics=["psnr"], progress=False)
    image_only = make_checkpoint(tmp_path / "image.safetensors", str(ROOT / "recipes" / "tiny.toml"),
                                 ['model.flavor="test"', "model.latent_dim=8"])
    with pytest.raises(EvalError, match="trained on image, not on '3d'"):
        run_eval(image_only, str(assets), str(tmp_path / "o"), registries, modality="3d", metrics=["psnr"], progress=False)
    with pytest.raises(EvalError, match="unknown zeroshot for --modality 3d"):
        run_eval(ckpt, str(assets), str(tmp_path / "o"), registries, modality="3d", metrics=["zeroshot"], progress=False)
