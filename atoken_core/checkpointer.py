"""A run's checkpoints: one safetensors file per checkpoint in one process, a
torch.distributed.checkpoint folder under torchrun; exact resume from either; the consolidated
export a sharded run ends with; and the losses' own learnable state in both kinds."""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from atoken_core import __version__
from atoken_core.checkpoint import (
    CheckpointError,
    load_model_state,
    load_optimizer_state,
    optimizer_state_from,
    optimizer_tensors,
    read_checkpoint,
    save_checkpoint,
)
from atoken_core.distributed import barrier, full_state_dict, load_sharded, save_sharded
from atoken_core.errors import UserError
from atoken_core.interfaces import StagePlan

# step-000100.safetensors (one process) or step-000100.dcp/ (torch.distributed.checkpoint folder)
CKPT_RE = re.compile(r"step-(\d+)\.(safetensors|dcp)$")
DCP_META = "atoken.json"


class ResumeError(UserError, RuntimeError):
    pass


class Checkpointer:
    """Saves and restores what a run needs to continue exactly: the model, its optimiser, the
    EMA, the losses' parameters and optimiser, the step, the stage and (sharded) the RNG. Reads
    the run's current model and optimisers (a stage may replace them)."""

    def __init__(self, run: Any) -> None:
        self.run = run

    @property
    def folder(self) -> str:
        return f"{self.run.out_path}/checkpoints"

    def list(self) -> list[tuple[int, str]]:
        """(step, path) of every checkpoint in the run folder, oldest first."""
        fs = self.run.fs
        if not fs.exists(self.folder):
            return []
        found = []
        for path in fs.ls(self.folder, detail=False):
            m = CKPT_RE.search(path.rstrip("/"))
            if m:
                found.append((int(m.group(1)), path.rstrip("/")))
        return sorted(found)

    def save(self, step: int, plan: StagePlan, extra: dict[str, Any]) -> str:
        """Write the checkpoint of ``step`` and keep only the newest log.keep_checkpoints."""
        run = self.run
        if run.env.distributed:
            path = self._save_sharded(step, plan, extra)
        else:
            path = f"{self.folder}/step-{step:06d}.safetensors"
            save_checkpoint(run.url(path), run.model, recipe=run.recipe_dict, step=step, stage=plan.index,
                            optimizer=run.optimizer, extra_metadata=extra, ema=run.ema.shadow,
                            extra_tensors=self.loss_state())
        if run.env.is_main:
            keep = run.recipe.log.keep_checkpoints
            old = [p for s, p in self.list() if s != step and s != run.total_steps]
            for p in old[: max(0, len(old) - (keep - 1))]:
                run.fs.rm(p, recursive=True)
        barrier(run.env)
        return path

    # ------------------------------------------------------------------ the losses' state
    def loss_state(self) -> dict[str, torch.Tensor]:
        """The losses' learnable values (``loss.{i}.{name}``) and their optimiser's state
        (``loss_optim.{param index}.{name}``), in both kinds of checkpoint."""
        run = self.run
        state = {name: p.detach() for name, p in run.loss_params.items()}
        if run.loss_optimizer is not None:
            state.update(optimizer_tensors(run.loss_optimizer, "loss_optim"))
        return state

    @torch.no_grad()
    def load_loss_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Restore :meth:`loss_state` (other keys are ignored); the losses' parameters must match
        this recipe's by name and shape."""
        run = self.run
        values = {k: v for k, v in state.items() if k.split(".", 1)[0] == "loss"}
        missing = sorted(set(run.loss_params) - set(values))
        unexpected = sorted(set(values) - set(run.loss_params))
        shapes = [f"{k}: checkpoint {tuple(values[k].shape)} vs this run {tuple(p.shape)}"
                  for k, p in run.loss_params.items() if k in values and values[k].shape != p.shape]
        if missing or unexpected or shapes:
            raise CheckpointError("\n".join([f"{source}: the losses' learnable parameters do not match this recipe's",
                                             *([f"  missing: {', '.join(missing)}"] if missing else []),
                                             *([f"  unexpected: {', '.join(unexpected)}"] if unexpected else []),
                                             *(f"  shape mismatch {line}" for line in shapes)]))
        for name, p in run.loss_params.items():
            p.copy_(values[name])
        if run.loss_optimizer is not None:
            run.loss_optimizer.load_state_dict({"state": optimizer_state_from(state, "loss_optim"),
                                                "param_groups": run.loss_optimizer.state_dict()["param_groups"]})

    # ------------------------------------------------------------------ sharded (torchrun)
    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        run = self.run
        state = {"model": get_model_state_dict(run.model),
                 "optim": get_optimizer_state_dict(run.model, run.optimizer)}
        if run.ema.shadow is not None:
            state["ema"] = dict(run.ema.shadow)
        if run.loss_params:
            state["loss"] = self.loss_state()  # plain tensors, the same on every rank
        return state

    def _save_sharded(self, step: int, plan: StagePlan, extra: dict[str, Any]) -> str:
        """A torch.distributed.checkpoint folder (every rank writes its shards, any world size can
        read it) with atoken.json describing it; written under a temporary name and renamed by
        rank 0 once every rank is done, so a crash never leaves a half checkpoint."""
        run = self.run
        path = f"{self.folder}/step-{step:06d}.dcp"
        tmp = path + ".tmp"
        if run.env.is_main and run.fs.exists(tmp):
            run.fs.rm(tmp, recursive=True)
        barrier(run.env)
        state = self._sharded_state()
        save_sharded(run.url(tmp), state)
        barrier(run.env)
        if run.env.is_main:
            # the shapes of the losses' tensors: the resumed run's optimiser has no state yet to load into
            loss_state = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                          for k, v in state.get("loss", {}).items()}
            meta = {"format": "atoken-dcp-v1", "atoken_version": __version__, "recipe": run.recipe_dict,
                    "loss_state": loss_state,
                    "state": {"step": step, "stage": plan.index, "world_size": run.env.world,
                              "rng_torch": torch.get_rng_state().tolist(), **extra}}
            with run.fs.open(f"{tmp}/{DCP_META}", "w") as f:
                json.dump(meta, f)
            run.fs.mv(tmp, path, recursive=True)
        barrier(run.env)
        return path

    # ------------------------------------------------------------------ resume and export
    def resume(self, path: str) -> dict[str, Any]:
        """Load a checkpoint of either kind into the run; returns its state metadata."""
        run = self.run
        if path.endswith(".dcp"):
            if not run.env.distributed:
                raise ResumeError(f"{path}: a sharded checkpoint; resume it under torchrun (atoken run --nproc N)")
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            with run.fs.open(f"{path}/{DCP_META}", "r") as f:
                meta = json.load(f)
            run.use_stage_bottleneck(run.plans[int(meta["state"]["stage"])])
            state = self._sharded_state()
            state.pop("loss", None)
            loss_state = {k: torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]))
                          for k, spec in meta.get("loss_state", {}).items()}
            if loss_state:
                state["loss"] = loss_state
            load_sharded(run.url(path), state)
            set_model_state_dict(run.model, state["model"])
            set_optimizer_state_dict(run.model, run.optimizer, state["optim"])
            if run.ema.shadow is not None and "ema" in state:
                run.ema.shadow = state["ema"]
            self.load_loss_state(state.get("loss", {}), path)
            torch.set_rng_state(torch.tensor(meta["state"]["rng_torch"], dtype=torch.uint8))
            return meta["state"]
        if run.env.distributed:
            raise ResumeError(f"{path}: a single-process checkpoint; resume it with plain `atoken run --resume`")
        tensors, meta = read_checkpoint(run.url(path))
        run.use_stage_bottleneck(run.plans[int(meta["state"]["stage"])])
        load_model_state(run.model, tensors, path)
        load_optimizer_state(run.optimizer, tensors, meta)
        self.load_loss_state(tensors, path)
        if run.ema.shadow is not None:
            for name in run.ema.shadow:
                if f"ema.{name}" in tensors:
                    run.ema.shadow[name] = tensors[f"ema.{name}"].to(run.env.device)
        return meta["state"]

    def export(self, step: int, plan: StagePlan) -> str | None:
        """A sharded run ends with one consolidated safetensors file (model weights, recipe and
        stage in its metadata) that `atoken encode/decode/eval` read like any checkpoint."""
        run = self.run
        if not run.env.distributed:
            return None
        state = full_state_dict(run.model)
        path = f"{run.out_path}/final.safetensors"
        if run.env.is_main:
            save_checkpoint(run.url(path), run.model, recipe=run.recipe_dict, step=step, stage=plan.index,
                            model_state=state)
        barrier(run.env)
        return path
