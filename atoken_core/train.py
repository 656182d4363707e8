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

from atoken_core import __version__
from atoken_core.build import build_bottleneck, build_component, build_model, build_modality
from atoken_core.checkpoint import (
    CheckpointError,
    load_model_state,
    load_optimizer_state,
    read_checkpoint,
    save_checkpoint,
)
from atoken_core.evaluate import SSIM_SETTINGS, PCABaseline, evaluate_images, image_metrics, mean_metrics, save_grid
from atoken_core.imaging import resize_within
from atoken_core.io import url_of
from atoken_core.interfaces import LossInputs, StagePlan
from atoken_core.recipe import Recipe, recipe_to_dict
from atoken_core.registry import Registries

CKPT_RE = re.compile(r"step-(\d+)\.safetensors$")


class TrainingError(RuntimeError):
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
        self.progress = progress and recipe.log.progress
        torch.manual_seed(recipe.seed)
        self.curriculum = build_component(recipe.curriculum, "curriculum", registries)
        self.plans = self.curriculum.stages(recipe)
        self.total_steps = sum(p.steps for p in self.plans)
        names = sorted({m for p in self.plans for m in p.modalities})
        self.modalities = {m: build_modality(recipe, registries, m) for m in names}
        self.data = {m: build_component(recipe.data[m], "dataset", registries) for m in names}
        self.model = build_model(recipe, registries, self.plans[0].bottleneck, self.plans[0].latent_dim)
        self._bottleneck_spec = self.plans[0].bottleneck
        self.losses = [(spec, build_component(spec, "loss", registries)) for spec in recipe.loss]
        self.optimizer = self._optimizer()
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
        return torch.optim.AdamW(
            [{"params": params, "weight_decay": o.weight_decay if decay else 0.0,
              "lr_scale": o.encoder_lr_scale if encoder else 1.0}
             for (encoder, decay), params in sorted(groups.items())],
            lr=o.lr, betas=tuple(o.betas),
        )

    def _prepare_out_dir(self, resume: bool, create_parents: bool) -> None:
        parent = self.out_path.rsplit("/", 1)[0] if "/" in self.out_path else "."
        if parent and not create_parents and not self.fs.exists(parent):
            raise TrainingError(f"{self.out}: parent folder {parent!r} does not exist")
        if not resume and self.fs.exists(f"{self.out_path}/checkpoints") and self.fs.ls(f"{self.out_path}/checkpoints"):
            raise TrainingError(
                f"{self.out}: already holds checkpoints; pass --resume to continue that run or choose another --out"
            )
        for sub in ("", "/checkpoints", "/recon"):
            self.fs.makedirs(self.out_path + sub, exist_ok=True)

    def checkpoints(self) -> list[tuple[int, str]]:
        folder = f"{self.out_path}/checkpoints"
        if not self.fs.exists(folder):
            return []
        found = []
        for path in self.fs.ls(folder, detail=False):
            m = CKPT_RE.search(path)
            if m:
                found.append((int(m.group(1)), path))
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
        new = build_bottleneck(spec, self.registries, in_dim=self.model.flavor.width, latent_dim=latent_dim)
        self.model.replace_bottleneck(new)
        self._bottleneck_spec = spec
        self.optimizer = self._optimizer()

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
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        gen = step_generator(self.recipe.seed, step)
        schedule = self.curriculum.modality_schedule(plan, step)
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        total_value = 0.0
        finite = True
        for name in schedule:
            modality, source = self.modalities[name], self.data[name]
            samples = source.train_batch(plan.batch_size, gen)
            tokens = modality.patchify(samples, self.model.spec)
            recon_patches, bott = self.model(tokens.patches)
            recons = modality.unpatchify(tokens.patches.with_features(recon_patches), tokens.meta, self.model.spec)
            inputs = LossInputs(name, torch.stack(samples), torch.stack(recons), bott)
            loss = recon_patches.new_zeros(())
            for spec, fn in self.losses:
                if spec.modalities is not None and name not in spec.modalities:
                    continue
                for term, value in fn(inputs).items():
                    loss = loss + spec.weight * value
                    terms[f"{name}/{term}"] = float(value.detach())
            if not torch.isfinite(loss):
                finite = False
                break
            (loss / len(schedule)).backward()
            total_value += float(loss.detach()) / len(schedule)
        grad_norm = 0.0
        if finite:
            if self.recipe.optim.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip))
            if math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                finite = False
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
        return {"stage": plan.name, "loss": total_value, **terms, "lr": lr, "grad_norm": grad_norm, "finite": finite}

    def eval_samples(self, name: str) -> list[tuple[str, torch.Tensor]]:
        """Held-out samples, downscaled so the longer side is at most eval.max_side."""
        if name not in self._eval_cache:
            side = self.recipe.eval.max_side
            self._eval_cache[name] = [(n, resize_within(x, max_side=side)) for n, x in self.data[name].eval_samples()]
        return self._eval_cache[name]

    def evaluate(self) -> dict[str, Any]:
        results = {}
        self._last_recons = {}
        for name in self.data:
            metrics, recons = evaluate_images(self.model, self.modalities[name], self.eval_samples(name))
            results[name] = metrics
            self._last_recons[name] = recons
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
            pca = self.pca(name)
            samples = self.eval_samples(name)
            recons = [pca.reconstruct(x) for _, x in samples]
            per = {n: image_metrics(x, r) for (n, x), r in zip(samples, recons)}
            out[name] = {"mean": mean_metrics(list(per.values())), "per_image": per,
                         "components": pca.k, "explained_variance": pca.explained}
            self._pca_recons[name] = recons
        return out

    def save_grids(self, step: int) -> list[str]:
        paths = []
        for name in self.data:
            samples = self.eval_samples(name)[: self.recipe.eval.grid_images]
            recons = self._last_recons[name]
            rows = []
            for i, (label, x) in enumerate(samples):
                cells = [(f"{label} original", x), (f"atoken step {step}", recons[i])]
                if name in self._pca_recons:
                    cells.append((f"PCA-{self.plans[-1].latent_dim}", self._pca_recons[name][i]))
                if x.ndim == 4:  # a video: one row for its first frame, one for its last
                    rows += [[(f"{lab} frame {t}", v[t]) for lab, v in cells] for t in (0, x.shape[0] - 1)]
                else:
                    rows.append(cells)
            path = f"{self.out_path}/recon/{name}-step-{step:06d}.png"
            save_grid(rows, self._url(path))
            paths.append(path)
        return paths

    def save(self, step: int, plan: StagePlan, extra: dict[str, Any]) -> str:
        path = f"{self.out_path}/checkpoints/step-{step:06d}.safetensors"
        save_checkpoint(self._url(path), self.model, recipe=self.recipe_dict, step=step, stage=plan.index,
                        optimizer=self.optimizer, extra_metadata=extra)
        keep = self.recipe.log.keep_checkpoints
        old = [p for s, p in self.checkpoints() if s != step and s != self.total_steps]
        for p in old[: max(0, len(old) - (keep - 1))]:
            self.fs.rm(p)
        return path

    def _append_metrics(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        path = f"{self.out_path}/metrics.jsonl"
        with self.fs.open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, upto_step: int) -> None:
        """After a resume, drop rows logged past the checkpoint (they will be logged again)."""
        path = f"{self.out_path}/metrics.jsonl"
        if not self.fs.exists(path):
            return
        with self.fs.open(path, "r") as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= upto_step]
        with self.fs.open(path, "w") as f:
            f.writelines(rows)

    # ------------------------------------------------------------------ main loop
    def run(self, resume: bool = False, create_parents: bool = False) -> dict[str, Any]:
        self._prepare_out_dir(resume, create_parents)
        start, extra, resumed = 0, {}, False
        if resume:
            ckpts = self.checkpoints()
            if ckpts:
                step, path = ckpts[-1]
                tensors, meta = read_checkpoint(self._url(path))
                self.use_stage_bottleneck(self.plans[int(meta["state"]["stage"])])
                load_model_state(self.model, tensors, path)
                load_optimizer_state(self.optimizer, tensors, meta)
                start = int(meta["state"]["step"])
                extra = {k: meta["state"][k] for k in ("eval_initial", "pca_baseline", "nonfinite_steps") if k in meta["state"]}
                self._truncate_metrics(start)
                resumed = True
        if not resumed and self.recipe.model.init.startswith("siglip2:"):
            from atoken_core.siglip2 import import_siglip2, load_siglip2_vision_state

            path = self.recipe.model.init.removeprefix("siglip2:")
            import_siglip2(self.model, load_siglip2_vision_state(path), source=path)
        if not resumed and self.recipe.model.shortcut == "pca":
            pca, k = self.pca(self.plans[0].modalities[0]), self.plans[0].latent_dim
            # the PCA is fitted at the final width; its leading k components are the k-PCA
            self.model.init_shortcut(pca.mean.float(), pca.basis[:k].float(), pca.variance[:k].float())
        if "eval_initial" not in extra:
            extra["eval_initial"] = self.evaluate()
        if self.recipe.eval.pca_baseline:
            extra["pca_baseline"] = self.pca_baseline()
        extra.setdefault("nonfinite_steps", 0)

        t0 = time.perf_counter()
        pending: list[dict[str, Any]] = []
        streak = 0
        bar = tqdm(total=self.total_steps, initial=start, disable=not self.progress, desc="train", unit="step",
                   dynamic_ncols=True)
        for step in range(start, self.total_steps):
            plan = self.stage_at(step)[0]
            self.use_stage_bottleneck(plan)
            bar.set_description(f"stage {plan.index + 1}/{len(self.plans)} {plan.name}")
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
            if done % self.recipe.log.checkpoint_every == 0 or done == self.total_steps:
                self._append_metrics(pending)  # metrics first, so a resumed run never loses rows
                pending = []
                self.save(done, plan, extra)
        bar.close()
        self._append_metrics(pending)

        final = self.evaluate()
        self.save_grids(self.total_steps)
        report = {
            "atoken_version": __version__,
            "recipe": self.recipe.name,
            "steps": self.total_steps,
            "train_seconds_this_process": round(time.perf_counter() - t0, 1),
            "ssim_settings": SSIM_SETTINGS,
            "step_0": extra["eval_initial"],
            "final": final,
            "pca_baseline": extra.get("pca_baseline"),
            "nonfinite_steps": extra["nonfinite_steps"],
            "params": self.model.num_params(),
        }
        with self.fs.open(f"{self.out_path}/eval.json", "w") as f:
            json.dump(report, f, indent=2)
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
