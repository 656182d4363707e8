"""The training engine: stages from the curriculum, round-robin modalities with gradient
accumulation, AdamW with warm-up + cosine, and the loop. Its parts live beside it:
:mod:`atoken_core.checkpointer` (save, exact resume, export), :mod:`atoken_core.ema`,
:mod:`atoken_core.runlog` (metrics.jsonl, eval.jsonl, TensorBoard) and
:mod:`atoken_core.heldout` (evaluation, PCA baseline, grids and saved reconstructions)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import fsspec
import torch
from tqdm.auto import tqdm

from atoken_core import __version__
from atoken_core.build import build_bottleneck, build_component, build_data, build_model, build_modality
from atoken_core.checkpoint import CheckpointError, load_model_state, read_checkpoint
from atoken_core.checkpointer import Checkpointer
from atoken_core.distributed import (
    DistEnv,
    all_true,
    apply_to_full_model,
    average_gradients,
    barrier,
    build_sharded,
    full_state_dict,
    init_distributed,
    mean_over_ranks_tensor,
)
from atoken_core.ema import EMA
from atoken_core.errors import UserError
from atoken_core.evaluate import SSIM_SETTINGS, modality_head
from atoken_core.heldout import HeldOut
from atoken_core.interfaces import LossInputs, StagePlan
from atoken_core.io import url_of
from atoken_core.recipe import Recipe, recipe_to_dict
from atoken_core.registry import Registries
from atoken_core.runlog import RunLog


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
        if self.env.device.type == "cuda":  # TF32 matmuls and convolutions for what runs in fp32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
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
        self.data = {m: build_data(recipe, registries, m, self.modalities[m]) for m in names}
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
        self.ema = EMA(self.model, recipe.optim.ema_decay)
        self.recipe_dict = recipe_to_dict(recipe)
        self.log = RunLog(self.fs, self.out_path, is_main=self.env.is_main, tensorboard=recipe.log.tensorboard)
        self.checkpointer = Checkpointer(self)
        self.heldout = HeldOut(self)

    # ------------------------------------------------------------------ setup
    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW with four groups: (encoder | rest) x (decayed matrices | undecayed vectors, learned
        positions and the pooling probe, as timm's ``no_weight_decay``). The encoder's learning
        rate is scaled by optim.encoder_lr_scale (the paper: 0.1x for the pretrained SigLIP2
        encoder)."""
        from atoken_core.siglip2 import ENCODER_MODULES

        o = self.recipe.optim
        keep = self.model.no_weight_decay()
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                decay = p.ndim >= 2 and name not in keep
                groups.setdefault((name.split(".", 1)[0] in ENCODER_MODULES, decay), []).append(p)
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
        self.ema.reset(self.model)

    def _autocast(self) -> Any:
        """bf16 autocast for a single GPU process (FSDP2's policy does the casting when sharded)."""
        import contextlib

        if self.recipe.parallel.mixed_precision == "bf16" and not self.env.distributed and self.env.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare_out_dir(self, resume: bool, create_parents: bool) -> None:
        parent = self.out_path.rsplit("/", 1)[0] if "/" in self.out_path else "."
        if parent and not create_parents and not self.fs.exists(parent):
            raise TrainingError(f"{self.out}: parent folder {parent!r} does not exist")
        if not resume and self.fs.exists(self.checkpointer.folder) and self.fs.ls(self.checkpointer.folder):
            raise TrainingError(
                f"{self.out}: already holds checkpoints; pass --resume to continue that run or choose another --out"
            )
        if self.env.is_main:
            for sub in ("", "/checkpoints", "/recon"):
                self.fs.makedirs(self.out_path + sub, exist_ok=True)
        barrier(self.env)

    def url(self, path: str) -> str:
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
        self.ema.reset(self.model)  # a new parameter set: the average starts again

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
        env, device = self.env, self.env.device
        # Loss values stay on the device: the step reads the host once, for the one decision it
        # needs (is everything finite?), and the logged values are read when they are logged.
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=device)
        # W_s(pool(features)) only when a loss reads it (Loss.needs_semantic; a plugin's loss that
        # does not subclass Loss reads none)
        semantic = any(getattr(fn, "needs_semantic", False) for _, fn in self.losses)
        for i, name in enumerate(schedule):
            if env.distributed:  # FSDP2 reduce-scatters the accumulated gradients once, after the last micro-step
                self.model.set_requires_gradient_sync(i == len(schedule) - 1)
            modality, source = self.modalities[name], self.data[name]
            # The global batch is drawn identically on every rank; each takes its own slice.
            samples, texts = source.train_batch_part(plan.batch_size, gen, env.rank, env.world)
            tokens = modality.patchify(samples, self.model.spec)
            # the perceptual networks and the teacher run under the recipe's mixed precision too
            with self._autocast():
                out = self.model.forward_all(tokens.patches.to(device), head=modality_head(self.model, modality),
                                             semantic=semantic)
                recons = modality.unpatchify(tokens.patches.with_features(out.recon.float()), tokens.meta,
                                             self.model.spec)
                target = torch.stack(modality.targets(samples, self.model.spec)).to(device)
                inputs = LossInputs(name, target, torch.stack(recons), out.bottleneck, semantic=out.semantic,
                                    texts=texts)
                loss = target.new_zeros(())
                for spec, fn in self.losses:
                    if spec.modalities is not None and name not in spec.modalities:
                        continue
                    for term, value in fn(inputs).items():
                        loss = loss + spec.weight * value.float()
                        terms[f"{name}/{term}"] = value.detach().float()
            loss = loss * plan.weights.get(name, 1.0)
            (loss / len(schedule)).backward()  # a non-finite loss is caught below, once per step
            total = total + loss.detach().float() / len(schedule)
        # clip_grad_norm_ of non-finite gradients is non-finite too: one check covers both
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip
                                              if self.recipe.optim.grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: the global norm
        finite = all_true(bool(torch.isfinite(total) & torch.isfinite(norm)), env)
        if finite:
            # FSDP2 averaged the model's gradients over the ranks; the losses' are averaged here
            average_gradients(list(self.loss_params.values()), env)
            for optimizer in self._optimizers():
                optimizer.step()
            self.ema.update(self.model)
        else:
            for optimizer in self._optimizers():
                optimizer.zero_grad(set_to_none=True)
        # Every rank saw its own slice: the logged values are the global batch's means.
        keys = sorted(terms)
        values = mean_over_ranks_tensor(torch.stack([total, *(terms[k] for k in keys)]), env)
        return {"stage": plan.name, "values": dict(zip(["loss", *keys], values)), "lr": lr,
                "grad_norm": norm.detach().float() if self.recipe.optim.grad_clip > 0 else None, "finite": finite}

    @staticmethod
    def log_row(step: int, row: dict[str, Any], seconds: float) -> dict[str, Any]:
        """A step's metrics.jsonl row: its device values read to the host in one transfer."""
        grad = row["grad_norm"]
        read = torch.stack([*row["values"].values(), *([grad] if grad is not None else [])]).double().cpu().tolist()
        return {"step": step, "stage": row["stage"], **dict(zip(row["values"], read)), "lr": row["lr"],
                "grad_norm": read[-1] if grad is not None else 0.0, "seconds": round(seconds, 3)}

    # ------------------------------------------------------------------ main loop
    def run(self, resume: bool = False, create_parents: bool = False) -> dict[str, Any]:
        self._prepare_out_dir(resume, create_parents)
        start, extra, resumed = 0, {}, False
        if resume:
            ckpts = self.checkpointer.list()
            if ckpts:
                state = self.checkpointer.resume(ckpts[-1][1])
                start = int(state["step"])
                extra = {k: state[k] for k in ("eval_initial", "pca_baseline", "nonfinite_steps") if k in state}
                self.log.truncate(start)
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
                pca, k = self.heldout.pca(self.plans[0].modalities[0]), self.plans[0].latent_dim
                # the PCA is fitted at the final width; its leading k components are the k-PCA
                model.init_shortcut(pca.mean.float(), pca.basis[:k].float(), pca.variance[:k].float())

            self._edit_model(init_shortcut)
        self.log.open()
        if "eval_initial" not in extra:
            extra["eval_initial"] = self.heldout.evaluate()
            self.log.evaluation(0, extra["eval_initial"])
        if self.recipe.eval.pca_baseline:
            extra["pca_baseline"] = self.heldout.pca_baseline()
        extra.setdefault("nonfinite_steps", 0)

        t0 = time.perf_counter()
        pending: list[dict[str, Any]] = []
        streak = 0
        bar, bar_stage = None, None
        try:
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
                        last = self.checkpointer.list()
                        raise TrainingError(f"{streak} non-finite losses in a row at step {step + 1}; stopping. "
                                            f"Last good checkpoint: {last[-1][1] if last else 'none'}")
                else:
                    streak = 0
                done = step + 1
                bar.update(1)
                if done % self.recipe.log.every == 0 or done == self.total_steps:
                    pending.append(self.log_row(done, row, time.perf_counter() - t0))
                    bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}")
                every = self.recipe.eval.every
                if every and done % every == 0 and done != self.total_steps:
                    self.log.evaluation(done, self.heldout.evaluate())
                    self.heldout.save_grids(done)
                if done % self.recipe.log.checkpoint_every == 0 or done == self.total_steps:
                    rows, pending = pending, []
                    self.log.metrics(rows)  # metrics first, so a resumed run never loses rows
                    self.checkpointer.save(done, plan, extra)
        finally:  # a crash or Ctrl-C keeps the rows logged since the last checkpoint (a resume truncates them)
            if bar is not None:
                bar.close()
            self.log.metrics(pending)

        final = self.heldout.evaluate()
        self.log.evaluation(self.total_steps, final)
        self.heldout.save_grids(self.total_steps)
        self.heldout.save_reconstructions()
        export = self.checkpointer.export(self.total_steps, self.plans[-1])
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
        self.log.close()
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
