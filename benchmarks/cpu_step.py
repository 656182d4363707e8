"""CPU cost of one training step of the tiny recipe, and what each piece adds.

    python benchmarks/cpu_step.py [--steps 5] [--recipe recipes/tiny.toml]

Times, in one process and on the same batches: forward+backward with L1 only, with
L1 + LPIPS + Gram (the demo's losses), and encode-only throughput at several image sides.
Prints absolute times and ratios; copy the table into benchmarks/RESULTS.md with the date.
"""

from __future__ import annotations

import argparse
import platform

import torch
from _timing import median_seconds

from atoken_core.build import build_component, build_modality, build_model
from atoken_core.interfaces import LossInputs
from atoken_core.plugin_manager import get_registries
from atoken_core.recipe import load_recipe
from atoken_core.train import step_generator




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/tiny.toml")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    registries = get_registries()
    recipe = load_recipe(args.recipe, registries, ["data.image.video_frames=0"])
    model = build_model(recipe, registries)
    modality = build_modality(recipe, registries, "image")
    data = build_component(recipe.data["image"], "data", registries)
    losses = [(s, build_component(s, "loss", registries)) for s in recipe.loss]
    bs = recipe.stage[0].batch_size
    samples = data.train_batch(bs, step_generator(0, 0))

    def step(use: set[str]) -> None:
        tokens = modality.patchify(samples, model.spec)
        recon, bott = model(tokens.patches)
        recons = modality.unpatchify(tokens.patches.with_features(recon), tokens.meta, model.spec)
        inputs = LossInputs("image", torch.stack(samples), torch.stack(recons), bott)
        total = sum(s.weight * v for s, fn in losses if s.kind in use for v in fn(inputs).values())
        total.backward()
        model.zero_grad(set_to_none=True)

    l1 = median_seconds(lambda: step({"l1", "kl"}), args.steps)
    full = median_seconds(lambda: step({"l1", "kl", "lpips", "gram"}), args.steps)
    crop = samples[0].shape[-1]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"flavor {recipe.model.flavor}, batch {bs} x {crop}x{crop}, params {sum(model.num_params().values()):,}")
    print("| step | seconds | ratio to L1 only |\n|---|---|---|")
    print(f"| L1 + KL | {l1:.3f} | 1.00 |")
    print(f"| L1 + KL + LPIPS + Gram | {full:.3f} | {full / l1:.2f} |")
    print("\n| encode, 1 image | tokens | seconds | tokens/s |\n|---|---|---|---|")
    model.eval()
    for side in (256, 512, 1024):
        x = torch.rand(3, side, side) * 2 - 1
        tokens = modality.patchify([x], model.spec)
        with torch.no_grad():
            sec = median_seconds(lambda t=tokens: model.bottleneck.encode_project(model.encode(t.patches)), 3)
        n = tokens.patches.num_tokens
        print(f"| {side}x{side} | {n} | {sec:.3f} | {n / sec:,.0f} |")


if __name__ == "__main__":
    main()
