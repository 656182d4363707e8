"""Start the encoder from a SigLIP2 vision tower (the paper's initialisation).

SigLIP2 (transformers' ``Siglip2VisionModel``, NaFlex variant) and our encoder are the same
pre-norm ViT; the differences are handled here so that, right after import, our encoder gives
SigLIP2's features exactly:

- SigLIP2's ``p x p`` patch embedding becomes frame 0 of our ``t x p x p`` one; the other
  frames stay zero, so a still image embeds as in SigLIP2 (both flatten patches channel-last).
- separate q/k/v projections become our fused ``qkv`` (rows q, then k, then v).
- the learned position grid is kept (``pos_embed``, resized per sample as SigLIP2 does);
  every block's RoPE frequency scale is set to 0 (flavours with ``rope_scale``), so 4D RoPE
  turns nothing until training moves it.
- the attention-pooling ``head`` becomes ``pool_head``.

A file that does not fit the flavour is refused with one message listing every problem;
nothing is ever loaded partially.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from atoken_core.checkpoint import CheckpointError, listed, mismatch_lines
from atoken_core.flavors import Flavor
from atoken_core.io import read_safetensors

__all__ = [
    "ENCODER_MODULES", "SigLIP2ImportError", "convert_siglip2_state", "encoder_state_dict", "import_siglip2",
    "load_siglip2_vision_state",
]

#: AToken's top-level modules (and parameters) that make up the encoder side.
ENCODER_MODULES = ("patch_embed", "pos_embed", "encoder", "encoder_norm", "pool_head", "semantic_proj")

_VISION_PREFIX = "vision_model."
# Parts of a full Siglip2Model file that belong to the text tower or the contrastive loss.
_NOT_VISION = ("text_model.",)
_NOT_VISION_KEYS = ("logit_scale", "logit_bias")
_MAX_LISTED = 8


class SigLIP2ImportError(CheckpointError):
    pass


def load_siglip2_vision_state(path: str) -> dict[str, torch.Tensor]:
    """The vision tower's tensors from a SigLIP2 safetensors file (vision-only or full model),
    keyed as in ``Siglip2VisionModel`` (no ``vision_model.`` prefix). Read through fsspec."""
    try:
        tensors, _ = read_safetensors(path)
    except FileNotFoundError:
        raise SigLIP2ImportError(f"{path}: SigLIP2 weights not found") from None
    except ValueError as err:
        raise SigLIP2ImportError(str(err)) from None
    state = {}
    for key, value in tensors.items():
        if key.startswith(_NOT_VISION) or key in _NOT_VISION_KEYS:
            continue
        state[key.removeprefix(_VISION_PREFIX)] = value
    return state


def _layer_indices(state: dict[str, torch.Tensor]) -> set[int]:
    prefix = "encoder.layers."
    return {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)
            and k[len(prefix):].split(".", 1)[0].isdigit()}


def _architecture_problems(state: dict[str, torch.Tensor], flavor: Flavor, channels: int) -> list[str]:
    """What the file says about its architecture that contradicts the flavour, in words
    (the key and shape listing below would show the same, but far less readably)."""
    problems = []
    patch_w = state.get("embeddings.patch_embedding.weight")
    if patch_w is not None and patch_w.ndim == 2:
        width, fan_in = patch_w.shape
        p = math.isqrt(fan_in // channels)
        if p * p * channels != fan_in:
            problems.append(f"patch size: embeddings.patch_embedding.weight takes {fan_in} inputs, not "
                            f"p*p*{channels} for any patch size p")
        elif p != flavor.patch_size:
            problems.append(f"patch size: the file has {p}x{p} patches (embeddings.patch_embedding.weight "
                            f"{tuple(patch_w.shape)}), the flavour uses {flavor.patch_size}x{flavor.patch_size}")
        if width != flavor.width:
            problems.append(f"width: the file has hidden size {width}, the flavour {flavor.width}")
    layers = _layer_indices(state)
    if layers and len(layers) != flavor.depth:
        problems.append(f"depth: the file has {len(layers)} encoder layers, the flavour {flavor.depth}")
    pos = state.get("embeddings.position_embedding.weight")
    if flavor.pos_embed_grid is None:
        problems.append("position grid: the flavour has no learned position embeddings (pos_embed_grid is None); "
                        "SigLIP2's features depend on them")
    elif pos is not None and pos.ndim == 2 and pos.shape[0] != flavor.pos_embed_grid**2:
        g = math.isqrt(pos.shape[0])
        grid = f"a {g}x{g} grid" if g * g == pos.shape[0] else "not a square grid"
        problems.append(f"position grid: the file has {pos.shape[0]} positions ({grid}), the flavour "
                        f"pos_embed_grid={flavor.pos_embed_grid} needs {flavor.pos_embed_grid**2}")
    if flavor.semantic and (flavor.text_dim or flavor.width) != flavor.width:
        problems.append(f"W_s: the flavour's text_dim {flavor.text_dim} differs from the width {flavor.width}, "
                        "so it cannot start as SigLIP2's identity")
    if not flavor.semantic and any(k.startswith("head.") for k in state):
        problems.append("pooling head: the file has one (head.*) but the flavour has none (semantic is False)")
    return problems


# One rule per tensor of ours: the SigLIP2 tensors it is made from and how.
Rule = tuple[list[str], Callable[..., torch.Tensor]]


def _rules(flavor: Flavor, temporal_patch: int) -> dict[str, Rule]:
    def same(x: torch.Tensor) -> torch.Tensor:
        return x

    def patch_weight(w_df: torch.Tensor) -> torch.Tensor:
        # frame 0 gets SigLIP2's weights; frames 1.. stay zero so an image embeds exactly as before
        out = w_df.new_zeros(w_df.shape[0], temporal_patch, w_df.shape[1])
        out[:, 0] = w_df
        return out

    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat((q, k, v), dim=0)

    rules: dict[str, Rule] = {
        "patch_embed.weight": (["embeddings.patch_embedding.weight"], patch_weight),
        "patch_embed.bias": (["embeddings.patch_embedding.bias"], same),
        "encoder_norm.weight": (["post_layernorm.weight"], same),
        "encoder_norm.bias": (["post_layernorm.bias"], same),
    }
    if flavor.pos_embed_grid is not None:
        rules["pos_embed"] = (["embeddings.position_embedding.weight"], same)
    for i in range(flavor.depth):
        hf, ours = f"encoder.layers.{i}", f"encoder.{i}"
        for part in ("weight", "bias"):
            rules[f"{ours}.norm1.{part}"] = ([f"{hf}.layer_norm1.{part}"], same)
            rules[f"{ours}.norm2.{part}"] = ([f"{hf}.layer_norm2.{part}"], same)
            rules[f"{ours}.attn.qkv.{part}"] = ([f"{hf}.self_attn.{n}_proj.{part}" for n in "qkv"], fused)
            rules[f"{ours}.attn.proj.{part}"] = ([f"{hf}.self_attn.out_proj.{part}"], same)
            rules[f"{ours}.mlp.0.{part}"] = ([f"{hf}.mlp.fc1.{part}"], same)
            rules[f"{ours}.mlp.2.{part}"] = ([f"{hf}.mlp.fc2.{part}"], same)
    if flavor.semantic:
        rules["pool_head.probe"] = (["head.probe"], same)
        for name in ("attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
                     "attention.out_proj.bias", "layernorm.weight", "layernorm.bias"):
            rules[f"pool_head.{name}"] = ([f"head.{name}"], same)
        for part in ("weight", "bias"):
            rules[f"pool_head.mlp.0.{part}"] = ([f"head.mlp.fc1.{part}"], same)
            rules[f"pool_head.mlp.2.{part}"] = ([f"head.mlp.fc2.{part}"], same)
    return rules


def _expected_shapes(flavor: Flavor, channels: int) -> dict[str, tuple[int, ...]]:
    """Every SigLIP2 vision tensor this flavour needs, with its shape."""
    d, m, p = flavor.width, flavor.mlp, flavor.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.patch_embedding.weight": (d, p * p * channels),
        "embeddings.patch_embedding.bias": (d,),
        "post_layernorm.weight": (d,),
        "post_layernorm.bias": (d,),
    }
    if flavor.pos_embed_grid is not None:
        shapes["embeddings.position_embedding.weight"] = (flavor.pos_embed_grid**2, d)
    for i in range(flavor.depth):
        hf = f"encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{hf}.{norm}.weight"] = shapes[f"{hf}.{norm}.bias"] = (d,)
        for n in ("q", "k", "v", "out"):
            shapes[f"{hf}.self_attn.{n}_proj.weight"] = (d, d)
            shapes[f"{hf}.self_attn.{n}_proj.bias"] = (d,)
        shapes.update({f"{hf}.mlp.fc1.weight": (m, d), f"{hf}.mlp.fc1.bias": (m,),
                       f"{hf}.mlp.fc2.weight": (d, m), f"{hf}.mlp.fc2.bias": (d,)})
    if flavor.semantic:
        shapes.update({
            "head.probe": (1, 1, d),
            "head.attention.in_proj_weight": (3 * d, d), "head.attention.in_proj_bias": (3 * d,),
            "head.attention.out_proj.weight": (d, d), "head.attention.out_proj.bias": (d,),
            "head.layernorm.weight": (d,), "head.layernorm.bias": (d,),
            "head.mlp.fc1.weight": (m, d), "head.mlp.fc1.bias": (m,),
            "head.mlp.fc2.weight": (d, m), "head.mlp.fc2.bias": (d,),
        })
    return shapes


def convert_siglip2_state(
    state: dict[str, torch.Tensor], flavor: Flavor, *, channels: int = 3, source: str = "SigLIP2 weights"
) -> dict[str, torch.Tensor]:
    """SigLIP2 vision tensors -> our encoder-side state dict (keys as in ``AToken.state_dict()``),
    RoPE frequency scales at 0. Raises :class:`SigLIP2ImportError` listing every problem if they do not fit."""
    expected = _expected_shapes(flavor, channels)
    problems = _architecture_problems(state, flavor, channels)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs expected {expected[k]}"
              for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    problems += mismatch_lines(missing, unexpected, shapes, _MAX_LISTED)
    if problems:
        head = (f"{source}: does not fit the flavour (width {flavor.width}, depth {flavor.depth}, "
                f"patch {flavor.patch_size}):")
        raise SigLIP2ImportError("\n".join([head, *(f"  {p}" for p in problems)]))
    rules = _rules(flavor, flavor.temporal_patch)
    out = {ours: fn(*(state[k] for k in keys)) for ours, (keys, fn) in rules.items()}
    dtype = out["patch_embed.weight"].dtype
    if flavor.rope_scale:
        for i in range(flavor.depth):
            out[f"encoder.{i}.attn.rope_scale"] = torch.zeros(1, dtype=dtype)
    if flavor.semantic and flavor.text_projection:  # W_s starts as the identity: SigLIP2's pooled output is already text-aligned
        out["semantic_proj.weight"] = torch.eye(flavor.width, dtype=dtype)
        out["semantic_proj.bias"] = torch.zeros(flavor.width, dtype=dtype)
    return {k: v.contiguous() for k, v in out.items()}


def encoder_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder-side part of ``model.state_dict()`` (what SigLIP2 initialises)."""
    return {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in ENCODER_MODULES}


@torch.no_grad()
def import_siglip2(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str = "SigLIP2 weights") -> None:
    """Overwrite ``model``'s encoder side with SigLIP2's vision tower (all of it or nothing)."""
    converted = convert_siglip2_state(state, model.flavor, channels=model.spec.channels, source=source)
    own = encoder_state_dict(model)
    # The rules and the model must agree exactly; a difference is a bug here, not a bad file.
    if set(converted) != set(own) or any(converted[k].shape != own[k].shape for k in own):
        diff = sorted(set(converted) ^ set(own)) or [k for k in own if converted[k].shape != own[k].shape]
        raise RuntimeError(f"SigLIP2 key mapping out of step with AToken's encoder: {listed(diff, _MAX_LISTED)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in converted.items()}, strict=False)
