"""The training engine: stages from the curriculum, round-robin modalities with gradient
accumulation, AdamW with warm-up + cosine, atomic checkpoints, exact resume, evaluation."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import fsspec
import torch
from tqdm.auto import tqdm

from atoken_core.errors import UserError
from atoken_core import __version__
from atoken_core.build import build_bottleneck, build_component, build_model, build_modality
from atoken_core.checkpoint import (
    CheckpointError,
    load_model_state,
    load_optimizer_state,
    optimizer_state_from,
    optimizer_tensors,
    read_checkpoint,
    save_checkpoint,
)
from atoken_core.distributed import (
    DistEnv,
    all_true,
    apply_to_full_model,
    as_float,
    average_gradients,
    barrier,
    build_sharded,
    full_state_dict,
    init_distributed,
    load_sharded,
    local,
    mean_over_ranks,
    save_sharded,
)
from atoken_core.evaluate import (
    SSIM_SETTINGS,
    PCABaseline,
    evaluate_images,
    image_metrics,
    mean_metrics,
    modality_head,
    preview_rows,
    reconstruct,
    save_grid,
)
from atoken_core.imaging import resize_within
from atoken_core.io import url_of
from atoken_core.interfaces import LossInputs, StagePlan
from atoken_core.recipe import Recipe, recipe_to_dict
from atoken_core.registry import Registries

# step-000100.safetensors (one process) or step-000100.dcp/ (torch.distributed.checkpoint folder)
CKPT_RE = re.compile(r"step-(\d+)\.(safetensors|dcp)$")
DCP_META = "atoken.json"


class TrainingError(UserError, RuntimeError):
    pass


def lr_at(step_in_stage: int, stage: StagePlan, recipe: Recipe) -> float:
    warmup = recipe.optim.warmup_steps
    if warmup and step_in_stage < warmup:
        return stage.lr * (step_in_stage + 1) / warmup
    progress = (step_in_stage - warmup) / max(1, stage.steps - warmup)
    floor = recipe.optim.min_lr_ratio
    return stage.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_generator(seed: int, step: int) -> torch.Generator:
    """Data for step ``step`` depends only on (seed, step): resuming needs no sampler state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Run:
    def __init__(self, recipe: Recipe, registries: Registries, out_dir: str, *, progress: bool = True) -> None:
        self.recipe = recipe
        self.registries = registries
        self.out = out_dir.rstrip("/")
        self.fs, self.out_path = fsspec.core.url_to_fs(self.out)
        self.env: DistEnv = init_distributed()
        self.progress = progress and recipe.log.progress and self.env.is_main
        torch.manual_seed(recipe.seed)
        self.curriculum = build_component(recipe.curriculum, "curriculum", registries)
        self.plans = self.curriculum.stages(recipe)
        self.total_steps = sum(p.steps for p in self.plans)
        for plan in self.plans:
            if plan.batch_size % self.env.world:
                raise TrainingError(f"stage {plan.name!r}: batch_size {plan.batch_size} does not split evenly over "
                                    f"{self.env.world} processes (each process takes batch_size / processes samples)")
        names = sorted({m for p in self.plans for m in p.modalities})
        self.modalities = {m: build_modality(recipe, registries, m) for m in names}
        self.data = {m: build_component(recipe.data[m], "dataset", registries) for m in names}
        self._bottleneck_spec = self.plans[0].bottleneck
        self.model = self._build_model(lambda: build_model(recipe, registries, self.plans[0].bottleneck,
                                                           self.plans[0].latent_dim))
        self.losses = [(spec, build_component(spec, "loss", registries).to(self.env.device)) for spec in recipe.loss]
        # Losses may learn too (the sigmoid loss's temperature and bias): named loss.{i}.{name}
        # after their place in recipe.loss; replicated (never sharded) under torchrun.
        self.loss_params: dict[str, torch.nn.Parameter] = {
            f"loss.{i}.{name}": p for i, (_, fn) in enumerate(self.losses)
            for name, p in fn.named_parameters() if p.requires_grad}
        self.optimizer = self._optimizer()
        self.loss_optimizer = self._loss_optimizer()
        self.ema = self._fresh_ema()
        self.tb = None
        self.recipe_dict = recipe_to_dict(recipe)
        self._eval_cache: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self._pca: dict[str, PCABaseline] = {}
        self._pca_recons: dict[str, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ setup
    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW with four groups: (encoder | rest) x (decayed matrices | undecayed vectors). The
        encoder's learning rate is scaled by optim.encoder_lr_scale (the paper: 0.1x for the
        pretrained SigLIP2 encoder)."""
        from atoken_core.siglip2 import ENCODER_MODULES

        o = self.recipe.optim
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault((name.split(".", 1)[0] in ENCODER_MODULES, p.ndim >= 2), []).append(p)
        param_groups = [{"params": params, "weight_decay": o.weight_decay if decay else 0.0,
                         "lr_scale": o.encoder_lr_scale if encoder else 1.0}
                        for (encoder, decay), params in sorted(groups.items())]
        return torch.optim.AdamW(param_groups, lr=o.lr, betas=tuple(o.betas))

    def _loss_optimizer(self) -> torch.optim.Optimizer | None:
        """AdamW of its own for the losses' parameters (no decay, as in SigLIP; the model's learning
        rate schedule): they live outside the (possibly FSDP-sharded) model, so the model's
        optimiser, and FSDP's optimiser-state helpers, only ever see model parameters."""
        if not self.loss_params:
            return None
        o = self.recipe.optim
        return torch.optim.AdamW([{"params": list(self.loss_params.values()), "weight_decay": 0.0, "lr_scale": 1.0}],
                                 lr=o.lr, betas=tuple(o.betas))

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.loss_optimizer] if self.loss_optimizer is not None else [])

    def _build_model(self, build: Any, build_meta: Any = None) -> torch.nn.Module:
        """One process: build, move to the device. Under torchrun: FSDP2 over the process group
        (built on the meta device, filled from rank 0). Then activation checkpointing and
        torch.compile as the recipe asks."""
        par = self.recipe.parallel
        if self.env.distributed:
            model = build_sharded(build, self.env, par.mixed_precision, build_meta)
        else:
            model = build().to(self.env.device)
        model.activation_checkpointing = par.activation_checkpointing
        if par.compile:
            model.compile_blocks()
        return model

    def _edit_model(self, edit: Any) -> None:
        """An in-place edit of the whole model before training (SigLIP2 import, PCA shortcut),
        the same in one process and under torchrun, where rank 0 alone runs it on a gathered
        copy at the current stage's architecture and the shards are refilled from it. The EMA
        restarts from the edited weights."""
        spec, latent_dim = self._bottleneck_spec, self.model.bottleneck.latent_dim
        apply_to_full_model(self.model, edit, lambda: build_model(self.recipe, self.registries, spec, latent_dim),
                            self.env)
        self.ema = self._fresh_ema()

    def _autocast(self) -> Any:
        """bf16 autocast for a single GPU process (FSDP2's policy does the casting when sharded)."""
        import contextlib

        if self.recipe.parallel.mixed_precision == "bf16" and not self.env.distributed and self.env.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _fresh_ema(self) -> dict[str, torch.Tensor] | None:
        if not self.recipe.optim.ema_decay:
            return None
        return {n: local(p.detach()).clone() for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        params = dict(self.model.named_parameters())
        names = list(self.ema)
        torch._foreach_lerp_([self.ema[n] for n in names], [local(params[n].detach()) for n in names],
                             1.0 - self.recipe.optim.ema_decay)

    def _swap_ema(self) -> None:
        """Exchange the live weights and the EMA weights (twice restores them)."""
        if self.ema is None:
            return
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                live = local(p.detach()).clone()
                local(p.detach()).copy_(self.ema[name])
                self.ema[name] = live

    def _prepare_out_dir(self, resume: bool, create_parents: bool) -> None:
        parent = self.out_path.rsplit("/", 1)[0] if "/" in self.out_path else "."
        if parent and not create_parents and not self.fs.exists(parent):
            raise TrainingError(f"{self.out}: parent folder {parent!r} does not exist")
        if not resume and self.fs.exists(f"{self.out_path}/checkpoints") and self.fs.ls(f"{self.out_path}/checkpoints"):
            raise TrainingError(
                f"{self.out}: already holds checkpoints; pass --resume to continue that run or choose another --out"
            )
        if self.env.is_main:
            for sub in ("", "/checkpoints", "/recon"):
                self.fs.makedirs(self.out_path + sub, exist_ok=True)
        barrier(self.env)

    def checkpoints(self) -> list[tuple[int, str]]:
        folder = f"{self.out_path}/checkpoints"
        if not self.fs.exists(folder):
            return []
        found = []
        for path in self.fs.ls(folder, detail=False):
            m = CKPT_RE.search(path.rstrip("/"))
            if m:
                found.append((int(m.group(1)), path.rstrip("/")))
        return sorted(found)

    def _url(self, path: str) -> str:
        return url_of(self.fs, path)

    # ------------------------------------------------------------------ pieces
    def use_stage_bottleneck(self, plan: StagePlan) -> None:
        """Switch to a stage's bottleneck (KL -> FSQ) or latent width (32 -> 48): a new W_r on the
        same encoder and decoder (grown in place when only the width changes), and a fresh
        optimiser for the new parameter set."""
        spec, latent_dim = plan.bottleneck, plan.latent_dim
        same_spec = (spec.kind, spec.params) == (self._bottleneck_spec.kind, self._bottleneck_spec.params)
        if same_spec and latent_dim == self.model.bottleneck.latent_dim:
            return
        width = self.model.flavor.width
        if not self.env.distributed:
            new = build_bottleneck(spec, self.registries, in_dim=width, latent_dim=latent_dim).to(self.env.device)
            self.model.replace_bottleneck(new)
        else:
            # A sharded model is not edited in place: rank 0 rebuilds the previous stage's model
            # from the gathered weights, swaps the bottleneck, and the result is sharded again.
            state = full_state_dict(self.model)
            old_spec, old_dim = self._bottleneck_spec, self.model.bottleneck.latent_dim

            def build() -> torch.nn.Module:
                # Rebuilding the old architecture must not consume random numbers: the new
                # bottleneck then draws exactly what it draws in a single process.
                with torch.random.fork_rng():
                    model = build_model(self.recipe, self.registries, old_spec, old_dim)
                if state:
                    model.load_state_dict(state)
                model.replace_bottleneck(build_bottleneck(spec, self.registries, in_dim=width, latent_dim=latent_dim))
                return model

            # the grown/switched model has exactly a fresh build's architecture at the new stage
            self.model = self._build_model(build, lambda: build_model(self.recipe, self.registries, spec, latent_dim))
        self._bottleneck_spec = spec
        self.optimizer = self._optimizer()
        self.loss_optimizer = self._loss_optimizer()
        self.ema = self._fresh_ema()  # a new parameter set: the average starts again

    def stage_at(self, step: int) -> tuple[StagePlan, int]:
        start = 0
        for plan in self.plans:
            if step < start + plan.steps:
                return plan, step - start
            start += plan.steps
        return self.plans[-1], self.plans[-1].steps

    def train_step(self, step: int) -> dict[str, Any]:
        plan, in_stage = self.stage_at(step)
        lr = lr_at(in_stage, plan, self.recipe)
        for optimizer in self._optimizers():
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            optimizer.zero_grad(set_to_none=True)
        gen = step_generator(self.recipe.seed, step)
        schedule = self.curriculum.modality_schedule(plan, step)
        terms: dict[str, float] = {}
        total_value = 0.0
        finite = True
        env, device = self.env, self.env.device
        # W_s(pool(features)) only when a loss reads it (Loss.needs_semantic; a plugin's loss that
        # does not subclass Loss reads none)
        semantic = any(getattr(fn, "needs_semantic", False) for _, fn in self.losses)
        for name in schedule:
            modality, source = self.modalities[name], self.data[name]
            # The global batch is drawn identically on every rank; each takes its own slice.
            samples, texts = source.train_batch_part(plan.batch_size, gen, env.rank, env.world)
            tokens = modality.patchify(samples, self.model.spec)
            with self._autocast():
                out = self.model.forward_all(tokens.patches.to(device), head=modality_head(self.model, modality),
                                             semantic=semantic)
            recons = modality.unpatchify(tokens.patches.with_features(out.recon.float()), tokens.meta, self.model.spec)
            target = torch.stack(modality.targets(samples, self.model.spec)).to(device)
            inputs = LossInputs(name, target, torch.stack(recons), out.bottleneck, semantic=out.semantic, texts=texts)
            loss = target.new_zeros(())
            for spec, fn in self.losses:
                if spec.modalities is not None and name not in spec.modalities:
                    continue
                for term, value in fn(inputs).items():
                    loss = loss + spec.weight * value
                    terms[f"{name}/{term}"] = float(value.detach())
            if not all_true(bool(torch.isfinite(loss)), env):
                finite = False
                break
            loss = loss * plan.weights.get(name, 1.0)
            (loss / len(schedule)).backward()
            total_value += float(loss.detach()) / len(schedule)
        grad_norm = 0.0
        if finite:
            if self.recipe.optim.grad_clip > 0:
                grad_norm = as_float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip))
            if math.isfinite(grad_norm):
                # FSDP2 averaged the model's gradients over the ranks; the losses' are averaged here
                average_gradients(list(self.loss_params.values()), env)
                for optimizer in self._optimizers():
                    optimizer.step()
                self._update_ema()
            else:
                finite = False
        if not finite:
            for optimizer in self._optimizers():
                optimizer.zero_grad(set_to_none=True)
        # Every rank saw its own slice: log the global-batch means.
        keys = sorted(terms)
        averaged = mean_over_ranks([total_value, *(terms[k] for k in keys)], env)
        total_value, terms = averaged[0], dict(zip(keys, averaged[1:]))
        return {"stage": plan.name, "loss": total_value, **terms, "lr": lr, "grad_norm": grad_norm, "finite": finite}

    def eval_samples(self, name: str) -> list[tuple[str, torch.Tensor]]:
        """Held-out samples, downscaled so the longer side is at most eval.max_side."""
        if name not in self._eval_cache:
            side = self.recipe.eval.max_side
            self._eval_cache[name] = [(n, resize_within(x, max_side=side) if torch.is_tensor(x) else x)
                                      for n, x in self.data[name].eval_samples()]
        return self._eval_cache[name]

    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics per modality (with the EMA weights when the recipe keeps them). Every
        rank runs it (a sharded model needs them all); only rank 0 writes anything."""
        results = {}
        self._last_recons = {}
        self._swap_ema()
        try:
            for name in self.data:
                metrics, recons = evaluate_images(self.model, self.modalities[name], self.eval_samples(name))
                results[name] = metrics
                self._last_recons[name] = recons
        finally:
            self._swap_ema()
        return results

    def pca(self, name: str) -> PCABaseline:
        """PCA of the training patches of one modality, fitted once per run."""
        if name not in self._pca:
            pca = PCABaseline(self.modalities[name], self.model.spec, self.plans[-1].latent_dim)
            self._pca[name] = pca.fit(self.data[name].train_pool())
        return self._pca[name]

    def pca_baseline(self) -> dict[str, Any]:
        out = {}
        for name in self.data:
            if not self.modalities[name].has_pca_baseline(self.model.spec):
                continue  # e.g. PCA of patch pixels has nothing to say about rendered 3D views
            pca = self.pca(name)
            samples = self.eval_samples(name)
            recons = [pca.reconstruct(x) for _, x in samples]
            per = {n: image_metrics(x, r) for (n, x), r in zip(samples, recons)}
            out[name] = {"mean": mean_metrics(list(per.values())), "per_image": per,
                         "components": pca.k, "explained_variance": pca.explained}
            self._pca_recons[name] = recons
        return out

    def save_grids(self, step: int) -> list[str]:
        if not self.env.is_main:
            return []
        paths = []
        for name in self.data:
            samples = self.eval_samples(name)[: self.recipe.eval.grid_images]
            recons = self._last_recons[name]
            rows = []
            modality = self.modalities[name]
            unit = "frame" if modality.has_pca_baseline(self.model.spec) else "view"
            for i, (label, x) in enumerate(samples):
                x = modality.targets([x], self.model.spec)[0]
                cells = [(f"{label} original", x), (f"atoken step {step}", recons[i])]
                if name in self._pca_recons:
                    cells.append((f"PCA-{self.plans[-1].latent_dim}", self._pca_recons[name][i]))
                rows += preview_rows(modality, cells, unit)
            path = f"{self.out_path}/recon/{name}-step-{step:06d}.png"
            save_grid(rows, self._url(path))
            paths.append(path)
        return paths

    @torch.no_grad()
    def save_reconstructions(self) -> list[str]:
        """Each modality's own formats for the first eval.grid_images held-out samples (videos as
        .mp4, 3D assets as .ply + turntable), under recon/."""
        written = []
        self._swap_ema()
        try:
            for name, modality in self.modalities.items():
                shown = self.eval_samples(name)[: self.recipe.eval.grid_images]
                recons = reconstruct(self.model, modality, [x for _, x in shown])  # every rank: a sharded model
                if not self.env.is_main:
                    continue
                for (label, _), r in zip(shown, recons):
                    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label.rsplit(".", 1)[0])
                    written += modality.save_reconstruction(r.tokens, r.meta, self.model.spec,
                                                            self._url(f"{self.out_path}/recon/{name}-{stem}"))
        finally:
            self._swap_ema()
        return written

    def save(self, step: int, plan: StagePlan, extra: dict[str, Any]) -> str:
        if self.env.distributed:
            path = self._save_sharded(step, plan, extra)
        else:
            path = f"{self.out_path}/checkpoints/step-{step:06d}.safetensors"
            save_checkpoint(self._url(path), self.model, recipe=self.recipe_dict, step=step, stage=plan.index,
                            optimizer=self.optimizer, extra_metadata=extra, ema=self.ema,
                            extra_tensors=self._loss_state())
        if self.env.is_main:
            keep = self.recipe.log.keep_checkpoints
            old = [p for s, p in self.checkpoints() if s != step and s != self.total_steps]
            for p in old[: max(0, len(old) - (keep - 1))]:
                self.fs.rm(p, recursive=True)
        barrier(self.env)
        return path

    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": get_model_state_dict(self.model),
                 "optim": get_optimizer_state_dict(self.model, self.optimizer)}
        if self.ema is not None:
            state["ema"] = dict(self.ema)
        if self.loss_params:
            state["loss"] = self._loss_state()  # plain tensors, the same on every rank
        return state

    def _loss_state(self) -> dict[str, torch.Tensor]:
        """The losses' learnable values (``loss.{i}.{name}``) and their optimiser's state
        (``loss_optim.{param index}.{name}``), in both kinds of checkpoint."""
        state = {name: p.detach() for name, p in self.loss_params.items()}
        if self.loss_optimizer is not None:
            state.update(optimizer_tensors(self.loss_optimizer, "loss_optim"))
        return state

    @torch.no_grad()
    def _load_loss_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Restore :meth:`_loss_state` (other keys are ignored); the losses' parameters must match
        this recipe's by name and shape."""
        values = {k: v for k, v in state.items() if k.split(".", 1)[0] == "loss"}
        missing = sorted(set(self.loss_params) - set(values))
        unexpected = sorted(set(values) - set(self.loss_params))
        shapes = [f"{k}: checkpoint {tuple(values[k].shape)} vs this run {tuple(p.shape)}"
                  for k, p in self.loss_params.items() if k in values and values[k].shape != p.shape]
        if missing or unexpected or shapes:
            raise CheckpointError("\n".join([f"{source}: the losses' learnable parameters do not match this recipe's",
                                             *([f"  missing: {', '.join(missing)}"] if missing else []),
                                             *([f"  unexpected: {', '.join(unexpected)}"] if unexpected else []),
                                             *(f"  shape mismatch {line}" for line in shapes)]))
        for name, p in self.loss_params.items():
            p.copy_(values[name])
        if self.loss_optimizer is not None:
            self.loss_optimizer.load_state_dict({"state": optimizer_state_from(state, "loss_optim"),
                                                 "param_groups": self.loss_optimizer.state_dict()["param_groups"]})

    def _save_sharded(self, step: int, plan: StagePlan, extra: dict[str, Any]) -> str:
        """A torch.distributed.checkpoint folder (every rank writes its shards, any world size can
        read it) with atoken.json describing it; written under a temporary name and renamed by
        rank 0 once every rank is done, so a crash never leaves a half checkpoint."""
        path = f"{self.out_path}/checkpoints/step-{step:06d}.dcp"
        tmp = path + ".tmp"
        if self.env.is_main and self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)
        barrier(self.env)
        state = self._sharded_state()
        save_sharded(self._url(tmp), state)
        barrier(self.env)
        if self.env.is_main:
            # the shapes of the losses' tensors: the resumed run's optimiser has no state yet to load into
            loss_state = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                          for k, v in state.get("loss", {}).items()}
            meta = {"format": "atoken-dcp-v1", "atoken_version": __version__, "recipe": self.recipe_dict,
                    "loss_state": loss_state,
                    "state": {"step": step, "stage": plan.index, "world_size": self.env.world,
                              "rng_torch": torch.get_rng_state().tolist(), **extra}}
            with self.fs.open(f"{tmp}/{DCP_META}", "w") as f:
                json.dump(meta, f)
            self.fs.mv(tmp, path, recursive=True)
        barrier(self.env)
        return path

    def _resume_from(self, path: str) -> dict[str, Any]:
        """Load a checkpoint of either kind into this run; returns its state metadata."""
        if path.endswith(".dcp"):
            if not self.env.distributed:
                raise TrainingError(f"{path}: a sharded checkpoint; resume it under torchrun (atoken run --nproc N)")
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            with self.fs.open(f"{path}/{DCP_META}", "r") as f:
                meta = json.load(f)
            self.use_stage_bottleneck(self.plans[int(meta["state"]["stage"])])
            state = self._sharded_state()
            state.pop("loss", None)
            loss_state = {k: torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]))
                          for k, spec in meta.get("loss_state", {}).items()}
            if loss_state:
                state["loss"] = loss_state
            load_sharded(self._url(path), state)
            set_model_state_dict(self.model, state["model"])
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
            if self.ema is not None and "ema" in state:
                self.ema = state["ema"]
            self._load_loss_state(state.get("loss", {}), path)
            torch.set_rng_state(torch.tensor(meta["state"]["rng_torch"], dtype=torch.uint8))
            return meta["state"]
        if self.env.distributed:
            raise TrainingError(f"{path}: a single-process checkpoint; resume it with plain `atoken run --resume`")
        tensors, meta = read_checkpoint(self._url(path))
        self.use_stage_bottleneck(self.plans[int(meta["state"]["stage"])])
        load_model_state(self.model, tensors, path)
        load_optimizer_state(self.optimizer, tensors, meta)
        self._load_loss_state(tensors, path)
        if self.ema is not None:
            for name in self.ema:
                if f"ema.{name}" in tensors:
                    self.ema[name] = tensors[f"ema.{name}"].to(self.env.device)
        return meta["state"]

    def export(self, step: int, plan: StagePlan) -> str | None:
        """A sharded run ends with one consolidated safetensors file (model weights, recipe and
        stage in its metadata) that `atoken encode/decode/eval` read like any checkpoint."""
        if not self.env.distributed:
            return None
        state = full_state_dict(self.model)
        path = f"{self.out_path}/final.safetensors"
        if self.env.is_main:
            save_checkpoint(self._url(path), self.model, recipe=self.recipe_dict, step=step, stage=plan.index,
                            model_state=state)
        barrier(self.env)
        return path

    def _append_metrics(self, rows: list[dict[str, Any]]) -> None:
        if not rows or not self.env.is_main:
            return
        if self.tb is not None:
            for row in rows:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "step":
                        self.tb.add_scalar(key, value, row["step"])
            self.tb.flush()
        path = f"{self.out_path}/metrics.jsonl"
        with self.fs.open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, upto_step: int) -> None:
        """After a resume, drop rows logged past the checkpoint (they will be logged again)."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = f"{self.out_path}/{name}"
            if not self.fs.exists(path):
                continue
            with self.fs.open(path, "r") as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= upto_step]
            with self.fs.open(path, "w") as f:
                f.writelines(rows)

    # ------------------------------------------------------------------ main loop
    def _open_tensorboard(self) -> None:
        """TensorBoard event files under tb/ beside metrics.jsonl, when the optional tensorboard
        package is installed and the output folder is on the local file system."""
        if not (self.recipe.log.tensorboard and self.env.is_main and self.fs.protocol in ("file", ("file", "local"))):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(f"{self.out_path}/tb")

    def _log_eval(self, step: int, results: dict[str, Any]) -> None:
        """Held-out means per modality to eval.jsonl (and TensorBoard), one row per evaluation."""
        if not self.env.is_main:
            return
        with self.fs.open(f"{self.out_path}/eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{name: r["mean"] for name, r in results.items()}}) + "\n")
        if self.tb is not None:
            for name, r in results.items():
                for metric, value in r["mean"].items():
                    self.tb.add_scalar(f"eval/{name}/{metric}", value, step)

    def run(self, resume: bool = False, create_parents: bool = False) -> dict[str, Any]:
        self._prepare_out_dir(resume, create_parents)
        start, extra, resumed = 0, {}, False
        if resume:
            ckpts = self.checkpoints()
            if ckpts:
                state = self._resume_from(ckpts[-1][1])
                start = int(state["step"])
                extra = {k: state[k] for k in ("eval_initial", "pca_baseline", "nonfinite_steps") if k in state}
                if self.env.is_main:
                    self._truncate_metrics(start)
                resumed = True
        if not resumed and self.recipe.model.init.startswith("siglip2:"):
            from atoken_core.siglip2 import import_siglip2, load_siglip2_vision_state

            path = self.recipe.model.init.removeprefix("siglip2:")
            self._edit_model(lambda model: import_siglip2(model, load_siglip2_vision_state(path), source=path))
        if not resumed and self.recipe.model.init.startswith("checkpoint:"):
            path = self.recipe.model.init.removeprefix("checkpoint:")
            # read where the edit runs (rank 0 alone under torchrun; its errors reach every rank)
            self._edit_model(lambda model: load_model_state(model, read_checkpoint(path)[0], path))
        if not resumed and self.recipe.model.shortcut == "pca":
            def init_shortcut(model: torch.nn.Module) -> None:
                pca, k = self.pca(self.plans[0].modalities[0]), self.plans[0].latent_dim
                # the PCA is fitted at the final width; its leading k components are the k-PCA
                model.init_shortcut(pca.mean.float(), pca.basis[:k].float(), pca.variance[:k].float())

            self._edit_model(init_shortcut)
        self._open_tensorboard()
        if "eval_initial" not in extra:
            extra["eval_initial"] = self.evaluate()
            self._log_eval(0, extra["eval_initial"])
        if self.recipe.eval.pca_baseline:
            extra["pca_baseline"] = self.pca_baseline()
        extra.setdefault("nonfinite_steps", 0)

        t0 = time.perf_counter()
        pending: list[dict[str, Any]] = []
        streak = 0
        bar, bar_stage = None, None
        for step in range(start, self.total_steps):
            plan, in_stage = self.stage_at(step)
            self.use_stage_bottleneck(plan)
            if plan.index != bar_stage:  # one progress bar (with its own ETA) per stage
                if bar is not None:
                    bar.close()
                bar = tqdm(total=plan.steps, initial=in_stage, disable=not self.progress, unit="step",
                           desc=f"stage {plan.index + 1}/{len(self.plans)} {plan.name}", dynamic_ncols=True)
                bar_stage = plan.index
            row = self.train_step(step)
            if not row.pop("finite"):
                extra["nonfinite_steps"] += 1
                streak += 1
                if streak >= 10:
                    self._append_metrics(pending)
                    raise TrainingError(
                        f"{streak} non-finite losses in a row at step {step + 1}; stopping. "
                        f"Last good checkpoint: {self.checkpoints()[-1][1] if self.checkpoints() else 'none'}"
                    )
            else:
                streak = 0
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if done % self.recipe.log.every == 0 or done == self.total_steps:
                pending.append({"step": done, **row, "seconds": round(time.perf_counter() - t0, 3)})
            every = self.recipe.eval.every
            if every and done % every == 0 and done != self.total_steps:
                self._log_eval(done, self.evaluate())
                self.save_grids(done)
            if done % self.recipe.log.checkpoint_every == 0 or done == self.total_steps:
                self._append_metrics(pending)  # metrics first, so a resumed run never loses rows
                pending = []
                self.save(done, plan, extra)
        if bar is not None:
            bar.close()
        self._append_metrics(pending)

        final = self.evaluate()
        self._log_eval(self.total_steps, final)
        self.save_grids(self.total_steps)
        self.save_reconstructions()
        export = self.export(self.total_steps, self.plans[-1])
        report = {
            "atoken_version": __version__,
            "recipe": self.recipe.name,
            "steps": self.total_steps,
            "processes": self.env.world,
            "train_seconds_this_process": round(time.perf_counter() - t0, 1),
            "ssim_settings": SSIM_SETTINGS,
            "ema_decay": self.recipe.optim.ema_decay,
            "step_0": extra["eval_initial"],
            "final": final,
            "pca_baseline": extra.get("pca_baseline"),
            "nonfinite_steps": extra["nonfinite_steps"],
            "params": self.model.num_params(),
            "export": export,
            # unreadable samples each data source skipped (counted; the first few named)
            "data": {name: {"n_skipped": src.n_skipped, "skipped_first": list(src.skipped[:5])}
                     for name, src in self.data.items()},
        }
        if self.env.is_main:
            with self.fs.open(f"{self.out_path}/eval.json", "w") as f:
                json.dump(report, f, indent=2)
        if self.tb is not None:
            self.tb.close()
        return report


def run_recipe(recipe: Recipe, registries: Registries, out_dir: str | None = None, *, resume: bool = False,
               progress: bool = True) -> dict[str, Any]:
    """Train and evaluate. An explicit ``out_dir`` must have an existing parent (a typo should
    not scatter folders); the recipe's own ``output_dir`` is created with its parents."""
    run = Run(recipe, registries, out_dir or recipe.resolved_output_dir(), progress=progress)
    try:
        return run.run(resume=resume, create_parents=out_dir is None)
    except CheckpointError as err:
        raise TrainingError(str(err)) from None
