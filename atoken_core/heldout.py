"""Evaluation during training: held-out metrics per modality (with the EMA weights when the
recipe keeps them), the PCA baseline, reconstruction grids and the modalities' own files, all
through the one encode-decode path of :func:`atoken_core.evaluate.reconstruct`."""

from __future__ import annotations

import re
from typing import Any

import torch

from atoken_core.evaluate import PCABaseline, evaluate_images, preview_rows, reconstruct, save_grid, score


class HeldOut:
    """Reads the run's current model (a stage may replace it), modalities, data and EMA."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self._samples: dict[str, list[tuple[str, Any]]] = {}
        self._pca: dict[str, PCABaseline] = {}
        self._pca_recons: dict[str, list[torch.Tensor]] = {}
        self._last_recons: dict[str, list[torch.Tensor]] = {}

    def samples(self, name: str) -> list[tuple[str, Any]]:
        """Held-out samples, downscaled so the longer side is at most eval.max_side."""
        if name not in self._samples:
            side, modality = self.run.recipe.eval.max_side, self.run.modalities[name]
            self._samples[name] = [(n, modality.downscale(x, side)) for n, x in self.run.data[name].eval_samples()]
        return self._samples[name]

    def evaluate(self) -> dict[str, Any]:
        """PSNR/SSIM of every held-out sample's reconstruction against its targets, per modality.
        Every rank runs it (a sharded model needs them all); only rank 0 writes anything."""
        run, results = self.run, {}
        with run.ema.applied(run.model):
            for name, modality in run.modalities.items():
                results[name], self._last_recons[name] = evaluate_images(run.model, modality, self.samples(name))
        return results

    def pca(self, name: str) -> PCABaseline:
        """PCA of the training patches of one modality, fitted once per run."""
        if name not in self._pca:
            run = self.run
            pca = PCABaseline(run.modalities[name], run.model.spec, run.plans[-1].latent_dim)
            self._pca[name] = pca.fit(run.data[name].train_pool())
        return self._pca[name]

    def pca_baseline(self) -> dict[str, Any]:
        out = {}
        for name, modality in self.run.modalities.items():
            if not modality.has_pca_baseline(self.run.model.spec):
                continue  # e.g. PCA of patch pixels has nothing to say about rendered 3D views
            pca = self.pca(name)
            samples = self.samples(name)
            recons = [pca.reconstruct(x) for _, x in samples]
            out[name] = {**score(modality, self.run.model.spec, samples, recons),
                         "components": pca.k, "explained_variance": pca.explained}
            self._pca_recons[name] = recons
        return out

    def save_grids(self, step: int) -> list[str]:
        """recon/NAME-step-NNNNNN.png per modality: originals, the last evaluation's
        reconstructions and the PCA baseline's, as the modality previews them."""
        run = self.run
        if not run.env.is_main:
            return []
        paths = []
        for name, modality in run.modalities.items():
            samples = self.samples(name)[: run.recipe.eval.grid_images]
            recons = self._last_recons[name]
            unit = "frame" if modality.has_pca_baseline(run.model.spec) else "view"
            rows = []
            for i, (label, x) in enumerate(samples):
                cells = [(f"{label} original", modality.targets([x], run.model.spec)[0]),
                         (f"atoken step {step}", recons[i])]
                if name in self._pca_recons:
                    cells.append((f"PCA-{run.plans[-1].latent_dim}", self._pca_recons[name][i]))
                rows += preview_rows(modality, cells, unit)
            path = f"{run.out_path}/recon/{name}-step-{step:06d}.png"
            save_grid(rows, run.url(path))
            paths.append(path)
        return paths

    def save_reconstructions(self) -> list[str]:
        """Each modality's own formats for the first eval.grid_images held-out samples (videos as
        .mp4, 3D assets as .ply + turntable), under recon/."""
        run, written = self.run, []
        with run.ema.applied(run.model):
            for name, modality in run.modalities.items():
                shown = self.samples(name)[: run.recipe.eval.grid_images]
                recons = reconstruct(run.model, modality, [x for _, x in shown])  # every rank: a sharded model
                if not run.env.is_main:
                    continue
                for (label, _), r in zip(shown, recons):
                    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label.rsplit(".", 1)[0])
                    written += modality.save_reconstruction(r.tokens, r.meta, run.model.spec,
                                                            run.url(f"{run.out_path}/recon/{name}-{stem}"))
        return written
