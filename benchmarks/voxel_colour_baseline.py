"""A reference point for 3D reconstruction: what do the voxel tokens alone give, with no network?

    python benchmarks/voxel_colour_baseline.py [--recipe recipes/tiny-curriculum.toml] [--ckpt CKPT]

Every occupied voxel becomes one opaque isotropic Gaussian (half a voxel wide) coloured with the
mean colour of the view patches back-projected onto it (its token's features), rendered at the
held-out cameras of the recipe's 3D eval assets. This is the 3D analogue of the PCA baseline for
images: a tokenizer-free reconstruction the learned Gaussian decoder has to beat. With --ckpt,
the checkpoint's reconstructions of the same assets are scored beside it.
"""

from __future__ import annotations

import argparse

import torch
from einops import rearrange

from atoken_core.build import build_component, build_modality, model_from_checkpoint
from atoken_core.evaluate import evaluate_images, image_metrics, mean_metrics
from atoken_core.interfaces import PatchSpec
from atoken_core.plugin_manager import get_registries
from atoken_core.recipe import load_recipe
from atoken_modalities.gaussians import GAUSSIAN_PARAMS
from atoken_modalities.objects import ThreeDConfig
from atoken_modalities.objects_impl import ThreeDModality


def baseline_raw(features_lf: torch.Tensor, spec: PatchSpec) -> torch.Tensor:
    """Head outputs (L, 14) that decode to one opaque, centred, half-voxel Gaussian per voxel in
    the voxel's mean patch colour (see atoken_modalities.gaussians.gaussians_from_raw)."""
    rgb = rearrange(features_lf[:, : spec.frame_dim], "l (pp c) -> l pp c", c=spec.channels).mean(1)
    rgb01 = ((rgb + 1) / 2).clamp(1e-3, 1 - 1e-3)
    raw = torch.zeros(len(features_lf), GAUSSIAN_PARAMS)
    raw[:, 3:6] = torch.logit(rgb01)  # colour
    raw[:, 6] = torch.logit(torch.tensor(0.95))  # opacity
    return raw  # offset 0: at the centre; scale 0: half a voxel; rotation 0: identity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/tiny-curriculum.toml")
    ap.add_argument("--ckpt", help="also score this checkpoint's reconstructions of the same assets")
    args = ap.parse_args()
    registries = get_registries()
    recipe = load_recipe(args.recipe, registries)
    source = build_component(recipe.data["3d"], "data", registries)
    patch = 16
    if args.ckpt:
        model, ckpt_recipe, _ = model_from_checkpoint(args.ckpt, registries)
        patch = model.spec.patch_size
    spec = PatchSpec(patch, 1)
    one = ThreeDModality(ThreeDConfig(gaussians_per_voxel=1))
    samples = source.eval_samples()
    per = {}
    for name, asset in samples:
        tokens = one.patchify([asset], spec)
        raw = baseline_raw(tokens.patches.features, spec)
        (views,) = one.unpatchify(tokens.patches.with_features(raw), tokens.meta, spec)
        per[name] = image_metrics(asset.target_views, views)
    mean = mean_metrics(list(per.values()))
    print(f"3D held-out views ({len(samples)} assets, {source.config.eval_views} views each, "
          f"{source.config.size}px, voxels {source.config.resolution}^3, patch {patch})")
    print(f"  voxel-colour baseline: PSNR {mean['psnr']:.2f} dB, SSIM {mean['ssim']:.3f}  "
          + ", ".join(f"{n} {m['psnr']:.2f}" for n, m in per.items()))
    if args.ckpt:
        modality = build_modality(ckpt_recipe, registries, "3d")
        metrics, _ = evaluate_images(model, modality, samples)
        m = metrics["mean"]
        print(f"  checkpoint:            PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}  "
              + ", ".join(f"{n} {v['psnr']:.2f}" for n, v in metrics["per_image"].items()))
        print(f"  checkpoint - baseline: {m['psnr'] - mean['psnr']:+.2f} dB")


if __name__ == "__main__":
    main()
