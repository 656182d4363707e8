"""Checkpoints as safetensors (never pickle), written atomically, describing themselves.

One file holds the model (``model.*``), optionally the optimiser state (``optim.*``), RNG
state (``rng.*``) and the trainer's other tensors under their own prefixes (the losses'
learnable values ``loss.*`` and their optimiser's state ``loss_optim.*``); its metadata holds
the resolved recipe (JSON), the package version, the step and the stage, so
``atoken encode --ckpt`` can rebuild the model from the file alone (it reads ``model.*`` only).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import save as st_save

from atoken_core.errors import UserError
from atoken_core import __version__
from atoken_core.io import atomic_write_bytes, read_safetensors

FORMAT = "atoken-checkpoint-v1"


class CheckpointError(UserError, ValueError):
    pass


# prefixes save_checkpoint writes itself
RESERVED = ("model", "ema", "optim", "rng")


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as ``{prefix}.{param index}.{name}`` tensors (the same
    tensors, not copies)."""
    return {f"{prefix}.{pid}.{name}": value
            for pid, pstate in optimizer.state_dict()["state"].items()
            for name, value in pstate.items() if torch.is_tensor(value)}


def optimizer_state_from(tensors: dict[str, torch.Tensor], prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    """The inverse of :func:`optimizer_tensors`: ``{param index: {name: tensor}}`` (other keys ignored)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return state


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    *,
    recipe: dict[str, Any],
    step: int,
    stage: int,
    optimizer: torch.optim.Optimizer | None = None,
    extra_metadata: dict[str, Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """``model_state`` replaces ``model.state_dict()`` (e.g. the gathered state of a sharded
    model); ``ema`` holds the moving-average weights by parameter name (``ema.*`` tensors);
    ``extra_tensors`` are stored under their own names (which must not use the prefixes above)."""
    state = model.state_dict() if model_state is None else model_state
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in state.items()}
    for k, v in (ema or {}).items():
        tensors[f"ema.{k}"] = v.detach().contiguous().clone()
    meta: dict[str, Any] = {"step": step, "stage": stage}
    if optimizer is not None:
        tensors.update({k: v.detach().contiguous().clone() for k, v in optimizer_tensors(optimizer, "optim").items()})
        meta["optim_param_groups"] = optimizer.state_dict()["param_groups"]
        tensors["rng.torch"] = torch.get_rng_state()
    for k, v in (extra_tensors or {}).items():
        if k.split(".", 1)[0] in RESERVED or k in tensors:
            raise ValueError(f"extra checkpoint tensor {k!r} clashes with the model, EMA, optimiser or RNG state")
        tensors[k] = v.detach().contiguous().clone()
    meta.update(extra_metadata or {})
    metadata = {
        "format": FORMAT,
        "atoken_version": __version__,
        "recipe": json.dumps(recipe, sort_keys=True),
        "state": json.dumps(meta, sort_keys=True),
    }
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (tensors, metadata with 'recipe' and 'state' decoded)."""
    try:
        tensors, raw = read_safetensors(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an atoken checkpoint (metadata format={raw.get('format')!r})")
    meta = dict(raw)
    meta["recipe"] = json.loads(raw["recipe"])
    meta["state"] = json.loads(raw["state"])
    return tensors, meta


def listed(items: list[str], limit: int = 8) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def mismatch_lines(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 8) -> list[str]:
    """One line each for the missing and unexpected tensor names and for (up to ``limit``)
    shape mismatches: what every strict loader here reports, all at once."""
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {listed(missing, limit)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {listed(unexpected, limit)}")
    lines += [f"shape mismatch {line}" for line in shapes[:limit]]
    if len(shapes) > limit:
        lines.append(f"... and {len(shapes) - limit} more shape mismatches")
    return lines


# Tensors earlier versions wrote that this one does not read, with what changed.
RETIRED = {
    "attn.rope_gate": "written by atoken 0.1, whose SigLIP flavours blended RoPE in through a gate "
                      "(q + g * (rope(q) - q), attn.rope_gate); 0.2 replaced it by a frequency scale "
                      "(attn.rope_scale) that keeps attention a function of coordinate differences. The two "
                      "compute different things, so these weights cannot be carried over: import SigLIP2 again "
                      "(model.init) and retrain",
}


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``model.*`` tensors strictly; on any difference list every one of them (and say what
    changed when they come from an earlier version of atoken)."""
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        lines = mismatch_lines(missing, unexpected, shapes)
        lines += [f"{suffix}: {why}" for suffix, why in RETIRED.items()
                  if any(k.endswith("." + suffix) for k in unexpected)]
        raise CheckpointError("\n  ".join([f"{source}: checkpoint does not match this model architecture", *lines]))
    model.load_state_dict(state, strict=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    groups = meta["state"].get("optim_param_groups")
    if groups is None:
        raise CheckpointError("checkpoint holds no optimiser state (exported weights only); cannot resume from it")
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint's optimiser has {len(groups)} parameter groups, this run's has "
                              f"{len(optimizer.param_groups)} (a checkpoint of another recipe, or one written before "
                              "the losses' parameters got an optimiser of their own); cannot resume from it")
    optimizer.load_state_dict({"state": optimizer_state_from(tensors, "optim"), "param_groups": groups})
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
