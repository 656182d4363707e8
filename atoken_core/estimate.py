"""`atoken run --dry-run`: what a recipe costs, computed without data, weights or outputs.

The model is built on the meta device (shapes only, no memory); FLOPs and activation memory
come from the transformer's shapes. FLOPs count multiply-adds as 2 (matmuls and attention,
which dominate; norms and activations are left out); a training step is 3x the forward.
Activations are what autograd keeps per token for backward without recomputation, the
attention matrix excluded (memory-efficient SDPA does not store it).
"""

from __future__ import annotations

from typing import Any

import torch

from atoken_core.build import build_component, build_model, build_modality
from atoken_core.errors import UserError
from atoken_core.interfaces import SampleShape
from atoken_core.recipe import Recipe
from atoken_core.registry import Registries


class EstimateError(UserError, ValueError):
    pass


def forward_flops(flavor: Any, latent_dim: int, frame_dim: int, lengths: list[int], frames: int = 1) -> int:
    """Forward FLOPs of the encoder + bottleneck + decoder for samples of the given token counts."""
    d, m, tp = flavor.width, flavor.mlp, flavor.temporal_patch
    tokens = sum(lengths)
    per_block = 2 * tokens * (4 * d * d + 2 * d * m) + sum(2 * 2 * n * n * d for n in lengths)
    blocks = (flavor.depth + flavor.decoder_depth) * per_block
    embed = 2 * tokens * d * frames * frame_dim
    # KL's W_r emits mean and log-variance; FSQ's only the latent: count the larger.
    bottleneck = 2 * tokens * d * 2 * latent_dim
    head = 2 * tokens * (latent_dim * d + d * tp * frame_dim)
    return blocks + embed + bottleneck + head


def activation_elements_per_token(flavor: Any) -> int:
    # per block: norm1 in/out, q, k, v, attention out, norm2 in/out (8 x width) + MLP hidden pre/post GELU
    return (flavor.depth + flavor.decoder_depth) * (8 * flavor.width + 2 * flavor.mlp)


def dry_run(recipe: Recipe, registries: Registries) -> dict[str, Any]:
    curriculum = build_component(recipe.curriculum, "curriculum", registries)
    with torch.device("meta"):
        model = build_model(recipe, registries)
    flavor = model.flavor
    stages = []
    for plan in curriculum.stages(recipe):
        lengths: list[int] = []
        fwd = 0
        for name in plan.modalities:
            modality = build_modality(recipe, registries, name)
            config = recipe.data[name].config
            if not isinstance(config, SampleShape):
                raise EstimateError(f"[data.{name}] (kind {recipe.data[name].kind!r}): its config has no "
                                    "train_sample_shape(), which --dry-run needs to count tokens without data "
                                    "(atoken_core.interfaces.SampleShape)")
            these = [modality.num_tokens(config.train_sample_shape(), model.spec)] * plan.batch_size
            frame_dim = model.patch_embed_of(name).spec.frame_dim  # its own stem's, for other channel counts
            fwd += forward_flops(flavor, plan.latent_dim, frame_dim, these)
            lengths += these
        act = activation_elements_per_token(flavor) * sum(lengths)
        stages.append({
            "stage": plan.name, "steps": plan.steps, "modalities": list(plan.modalities),
            "tokens_per_step": sum(lengths), "train_flops_per_step": 3 * fwd,
            "activation_bytes_bf16": 2 * act, "activation_bytes_fp32": 4 * act,
            "activation_bytes_bf16_checkpointed": 2 * flavor.width * (flavor.depth + flavor.decoder_depth) * sum(lengths),
        })
    params = model.num_params()
    return {"flavor": recipe.model.flavor, "params": params, "total_params": sum(params.values()),
            "weights_bytes_fp32": 4 * sum(params.values()), "stages": stages}


def format_dry_run(report: dict[str, Any]) -> str:
    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if n < 1024 or unit == "TiB":
                return f"{n:.1f} {unit}"
            n /= 1024
        return ""

    lines = [f"flavor {report['flavor']}: {report['total_params']:,} parameters "
             f"({size(report['weights_bytes_fp32'])} in fp32)"]
    lines += [f"  {name:<10} {count:>14,}" for name, count in report["params"].items()]
    w = max(10, *(len(st["stage"]) for st in report["stages"]))
    lines.append(f"  {'stage':<{w}} {'steps':>7}  tokens/step  train TFLOP/step  activations bf16 (checkpointed)  fp32")
    for st in report["stages"]:
        lines.append(
            f"  {st['stage']:<{w}} {st['steps']:>7}  {st['tokens_per_step']:>11,}  {st['train_flops_per_step'] / 1e12:>16.3f}"
            f"  {size(st['activation_bytes_bf16']):>12} ({size(st['activation_bytes_bf16_checkpointed'])})"
            f"  {size(st['activation_bytes_fp32'])}"
        )
    lines.append("(estimates: matmul + attention FLOPs, training = 3x forward; perceptual-loss networks and "
                 "optimiser state not included)")
    return "\n".join(lines)
