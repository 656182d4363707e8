"""`atoken eval`: metrics of a checkpoint on a folder of samples of any registered modality, reproducibly.

- reconstruction: PSNR / SSIM against each sample's targets (the image; every frame of a clip,
  averaged; a 3D asset's held-out views), any registered loss as a metric (its mean term, e.g.
  ``lpips``), rFID and rFVD from feature networks the user provides as local files, codebook
  usage (FSQ);
- understanding: zero-shot top-1 over class folders, text <-> sample retrieval R@1/R@5 over
  captions, and a linear probe on frozen pooled features (:mod:`atoken_core.understanding`).

The modality decides how ``--data`` is read (:meth:`Modality.load_eval`), which metrics apply
(:attr:`Modality.eval_metrics`) and what the figures show (:meth:`Modality.figure`,
:meth:`Modality.save_reconstruction`). Everything is deterministic (posterior mean / quantised
latents, no sampling; the probe's split is drawn from ``seed``), so the same checkpoint, data and
settings give identical numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from atoken_core import __version__
from atoken_core.build import build_modality, checkpoint_modalities, model_from_checkpoint
from atoken_core.errors import UserError
from atoken_core.evaluate import SSIM_SETTINGS, image_metrics, mean_metrics, modality_head, preview_rows, reconstruct, save_grid
from atoken_core.imaging import save_png
from atoken_core.interfaces import EvalRequest
from atoken_core.io import atomic_write_bytes
from atoken_core.metrics import InceptionFeatures, VideoFeatures, codebook_usage, frechet_distance_features
from atoken_core.registry import Registries

UNDERSTANDING = ("zeroshot", "retrieval", "probe")
#: metrics computed here; any other name a modality lists (or a user asks for) is a registered loss
BUILTIN = ("psnr", "ssim", "rfid", "rfvd", "codebook", *UNDERSTANDING)
FRECHET = ("rfid", "rfvd")


class EvalError(UserError, ValueError):
    pass


@attrs.frozen(kw_only=True)
class EvalOptions:
    """What `atoken eval` measures and how (every field is a CLI flag)."""

    modality: str | None = attrs.field(default=None, metadata={
        "doc": "a registered modality the checkpoint was trained on; None = the checkpoint's only one, or image"})
    metrics: tuple[str, ...] = attrs.field(default=("psnr", "ssim"), converter=tuple,
                                           metadata={"doc": "metric names (the modality's eval_metrics, or loss names)"})
    max_side: int = attrs.field(default=512, metadata={"doc": "images and video frames are downscaled to this longer side"})
    max_frames: int = attrs.field(default=16, metadata={"doc": "frames read from the start of each video"})
    metric_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, metadata={
        "doc": "settings of loss-backed metrics, {metric: {key: value}} (e.g. the LPIPS backbone weights)"})
    inception_weights: str | None = attrs.field(default=None, metadata={"doc": "torchvision inception_v3 safetensors (rfid)"})
    i3d_weights: str | None = attrs.field(default=None, metadata={"doc": "TorchScript video network, I3D convention (rfvd)"})
    teacher: str | None = attrs.field(default=None, metadata={
        "doc": "text tower for zeroshot/retrieval: NAME or NAME:PATH of a registered teacher; None = the checkpoint recipe's"})
    prompt: str | None = attrs.field(default=None, metadata={"doc": "zero-shot prompt template; None = the modality's"})
    seed: int = attrs.field(default=0, metadata={"doc": "seed of the linear probe's train/test split"})
    probe_test_fraction: float = attrs.field(default=0.25, metadata={"doc": "share of samples the probe is tested on"})
    heldout_views: int | None = attrs.field(default=None, metadata={
        "doc": "3D: views each asset is scored on (posed views: its last N; meshes: a ring of N); None = the recipe's"})
    grid_images: int = attrs.field(default=4, metadata={"doc": "samples shown in grid.png and saved under samples/"})
    progress: bool = attrs.field(default=True, metadata={"doc": "progress bars"})


def parse_metric_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["lpips.vgg16_weights=PATH", ...]`` -> {"lpips": {"vgg16_weights": "PATH"}}; values are
    TOML scalars when they parse as one (numbers, booleans, quoted strings), else strings."""
    import tomllib

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        metric, dot, field = key.strip().partition(".")
        if not (sep and dot and metric and field):
            raise EvalError(f"--metric-option {item!r}: expected METRIC.KEY=VALUE")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        out.setdefault(metric, {})[field] = parsed
    return out


# ----------------------------------------------------------------------------- metrics
def _loss_metric(name: str, modality: Any, targets: Sequence[torch.Tensor], recons: Sequence[torch.Tensor],
                 registries: Registries, options: EvalOptions) -> tuple[list[float], dict[str, Any]]:
    """A registered loss as a metric: its term ``name`` (else the sum of its terms) for each
    (target, reconstruction), built from its defaults and ``--metric-option name.KEY=VALUE``."""
    from atoken_core.config import structure
    from atoken_core.interfaces import BottleneckOutput, LossInputs

    component = registries["loss"].get(name)
    config = structure(dict(options.metric_options.get(name, {})), component.config, f"--metric-option {name}")
    loss = component.build(config)
    if getattr(loss, "needs_semantic", False):
        raise EvalError(f"--metrics {name}: a semantic loss compares embeddings with texts, not a reconstruction")
    out = []
    with torch.no_grad():
        for t, r in zip(targets, recons):
            t4, r4 = (t[None], r[None]) if t.ndim == 3 else (t, r)  # frames / views as the batch
            terms = loss(LossInputs(modality.name, t4, r4, BottleneckOutput(latent=torch.zeros(0))))
            out.append(float(terms[name] if name in terms else sum(terms.values())))
    return out, {"loss": name, "plugin": registries["loss"].plugin_of(name), "config": attrs.asdict(config),
                 "per_sample": "the loss with frames / views as its batch"}


def _check(options: EvalOptions, model: Any, modality: Any, registries: Registries) -> None:
    bad = [f"--{flag} must be {rule}, got {value}" for flag, value, ok, rule in (
        ("max-side", options.max_side, options.max_side >= 8, ">= 8"),
        ("max-frames", options.max_frames, options.max_frames >= 1, ">= 1"),
        ("probe-test-fraction", options.probe_test_fraction, 0 < options.probe_test_fraction < 1, "in (0, 1)"),
        ("heldout-views", options.heldout_views, options.heldout_views is None or options.heldout_views >= 1, ">= 1"),
        ("grid-images", options.grid_images, options.grid_images >= 0, ">= 0"),
    ) if not ok]
    if bad:
        raise EvalError("; ".join(bad))
    allowed = modality.eval_metrics
    unknown = sorted(m for m in options.metrics
                     if m not in allowed and (m in BUILTIN or m not in registries["loss"]))
    if unknown:
        raise EvalError(f"--metrics: unknown {', '.join(unknown)} for --modality {modality.name}; choose from "
                        f"{', '.join(allowed)} (or the name of any registered loss)")
    if "rfid" in options.metrics and not options.inception_weights:
        raise EvalError("--metrics rfid needs --inception-weights PATH (a safetensors file of torchvision's "
                        "inception_v3 state dict); nothing is downloaded")
    if "rfvd" in options.metrics and not options.i3d_weights:
        raise EvalError("--metrics rfvd needs --i3d-weights PATH (a TorchScript video network such as StyleGAN-V's "
                        "i3d_torchscript.pt); nothing is downloaded")
    needs_text = sorted({"zeroshot", "retrieval"} & set(options.metrics))
    if needs_text and model.pool_head is None:
        raise EvalError(f"--metrics {','.join(needs_text)} needs a checkpoint whose flavour has the semantic head "
                        f"(flavor.semantic, e.g. so400m); this one's has none")
    if "zeroshot" in options.metrics and not (options.prompt or modality.prompt_template):
        raise EvalError(f"--metrics zeroshot: modality {modality.name!r} has no default prompt; pass --prompt "
                        "'a ... of a {}.'")
    if "codebook" in options.metrics and not model.bottleneck.discrete:
        raise EvalError("--metrics codebook needs a discrete (FSQ) checkpoint")


def pick_eval_modality(requested: str | None, trained: Sequence[str], ckpt: str, data: str,
                       suffixes: Callable[[str], Sequence[str]]) -> str:
    """``--modality``, refused unless the checkpoint was trained on it; else the checkpoint's only
    modality, or the only one of its modalities with files (by their suffixes) under ``data``."""
    if requested is not None:
        if requested not in trained:
            raise EvalError(f"{ckpt}: trained on {', '.join(trained)}, not on {requested!r}; its decoder was never "
                            f"taught {requested} (pass --modality {' or '.join(trained)})")
        return requested
    if len(trained) == 1:
        return trained[0]
    from atoken_core.io import files_under

    owners = []
    for name in trained:
        try:
            if files_under(data, suffixes(name)):
                owners.append(name)
        except (OSError, ValueError):  # not a folder (a URI a modality reads itself): cannot tell
            pass
    if len(owners) == 1:
        return owners[0]
    found = f"{data} holds files of {', '.join(owners)}" if owners else f"cannot tell what {data} holds"
    raise EvalError(f"{ckpt}: trained on {', '.join(trained)}; {found}; pass --modality")


def run_eval(ckpt: str, data: str, out: str, registries: Registries, options: EvalOptions | None = None,
             **overrides: Any) -> dict[str, Any]:
    """Evaluate checkpoint ``ckpt`` on ``data``; write ``eval.json``, ``report.md`` and figures to
    ``out``; return the report. ``overrides`` are :class:`EvalOptions` fields."""
    options = attrs.evolve(options or EvalOptions(), **overrides)
    model, recipe, meta = model_from_checkpoint(ckpt, registries)
    m = pick_eval_modality(options.modality, checkpoint_modalities(recipe), ckpt, data,
                           lambda name: build_modality(recipe, registries, name).suffixes)
    modality = build_modality(recipe, registries, m)
    _check(options, model, modality, registries)
    metrics = set(options.metrics)
    video_net = None
    if "rfvd" in metrics:
        try:
            video_net = VideoFeatures(options.i3d_weights)
        except ValueError as err:
            raise EvalError(str(err)) from None
    found = modality.load_eval(data, EvalRequest(recipe=recipe, max_side=options.max_side,
                                                 max_frames=options.max_frames, heldout_views=options.heldout_views))
    samples, skipped = found.samples, found.skipped
    settings: dict[str, Any] = {"modality": m, "ssim": SSIM_SETTINGS, **found.settings}
    fd = sorted(metrics & set(FRECHET))
    if fd and len(samples) < 2:
        raise EvalError(f"--metrics {','.join(fd)}: a Fréchet distance needs at least 2 samples, {data} has {len(samples)}")
    names = [n for n, _ in samples]
    inputs = [x for _, x in samples]
    targets = modality.targets(inputs, model.spec)
    shapes = {n: list(t.shape) for n, t in zip(names, targets)}

    per_sample: dict[str, dict[str, float]] = {n: {} for n in names}
    summary: dict[str, Any] = {}
    recons: list[Any] = []
    decoded = metrics - set(BUILTIN) | (metrics & {"psnr", "ssim", *FRECHET})
    if decoded:
        recons = reconstruct(model, modality, tqdm(inputs, desc="reconstruct", disable=not options.progress))
        images = [r.sample for r in recons]
        for name, t, r in zip(names, targets, images):
            per_sample[name].update({k: v for k, v in image_metrics(t, r).items() if k in metrics})
        for loss_name in sorted(metrics - set(BUILTIN)):
            values, settings[loss_name] = _loss_metric(loss_name, modality, targets, images, registries, options)
            for name, value in zip(names, values):
                per_sample[name][loss_name] = value
        if any(per_sample.values()):
            summary.update(mean_metrics(list(per_sample.values())))
    if "rfid" in metrics:
        net = InceptionFeatures(options.inception_weights)
        with torch.no_grad():
            real = torch.cat([net(modality.preview(x)[None]) for x in targets]).double().numpy()
            fake = torch.cat([net(modality.preview(r.sample)[None]) for r in recons]).double().numpy()
        summary["rfid"] = frechet_distance_features(real, fake)
        settings["rfid"] = {"network": "torchvision inception_v3 pool features (2048-d), 299x299 bilinear",
                            "weights": options.inception_weights, "samples": len(targets),
                            "note": "not comparable with TF-Inception FID numbers"}
    if "rfvd" in metrics:
        try:
            real = torch.cat([video_net(modality.preview(x)) for x in targets]).double().numpy()
            fake = torch.cat([video_net(modality.preview(r.sample)) for r in recons]).double().numpy()
        except ValueError as err:
            raise EvalError(str(err)) from None
        summary["rfvd"] = frechet_distance_features(real, fake)
        settings["rfvd"] = {**video_net.describe(), "clips": len(targets), "feature_dim": int(real.shape[1]),
                            "frames_per_clip": sorted({int(x.shape[0]) for x in targets}),
                            "note": "Frechet distance of Gaussians fitted to real and reconstructed clip features; "
                                    "published FVDs use 2048+ clips, so few clips give a noisy, biased number"}
    if "codebook" in metrics:
        head = modality_head(model, modality)
        with torch.no_grad():
            codes = torch.cat([model.bottleneck.latent_to_codes(
                model.encode_latent(modality.patchify([x], model.spec).patches, head)) for x in inputs])
        summary["codebook"] = codebook_usage(codes, model.bottleneck.codebook_size)
    if metrics & set(UNDERSTANDING):
        _understanding(model, modality, recipe, registries, options, data, names, inputs, summary, settings)

    report = {
        "atoken_version": __version__, "checkpoint": ckpt, "checkpoint_step": meta["state"]["step"],
        "recipe": recipe.name, "flavor": recipe.model.flavor, "modality": m, "unit": modality.noun, "data": data,
        "seed": options.seed, "n_samples": len(samples), "n_skipped": len(skipped), "skipped_first": skipped[:5],
        "metrics": summary, "settings": settings, "per_sample": {n: v for n, v in per_sample.items() if v},
        "shapes": shapes,
    }
    _write(out, report, names, targets, recons, modality, model, options.grid_images)
    return report


def _understanding(model: Any, modality: Any, recipe: Any, registries: Registries, options: EvalOptions, data: str,
                   names: list[str], inputs: list[Any], summary: dict[str, Any], settings: dict[str, Any]) -> None:
    from atoken_core import understanding as u

    metrics, m = set(options.metrics), modality.name
    try:
        pooled, semantic, pool_kind = u.embed_samples(model, modality, inputs)
        teacher = None
        if metrics & {"zeroshot", "retrieval"}:
            teacher, spec, teacher_options = u.load_teacher(options.teacher, recipe, registries)
            if semantic.shape[1] != teacher.embed_dim:
                raise EvalError(f"teacher {spec!r} embeds texts in {teacher.embed_dim} dimensions but the checkpoint's "
                                f"W_s outputs {semantic.shape[1]}; use the teacher it was trained with")
            settings["teacher"] = {"spec": spec, "options": teacher_options, "embed_dim": teacher.embed_dim,
                                   "sample_side": "the checkpoint's W_s(attention pool) embedding, cosine similarity"}
        if "zeroshot" in metrics:
            classes, labels = u.labels_of(names)
            template = options.prompt or modality.prompt_template
            text = u.text_embeddings(teacher, [u.class_prompt(template, c) for c in classes])
            summary["zeroshot_top1"] = u.top1_accuracy(u.cosine(semantic, text), labels)
            settings["zeroshot"] = {"prompt": template, "classes": len(classes), "samples": len(names),
                                    "class_names": classes, "chance": 1 / len(classes)}
        if "retrieval" in metrics:
            captions = u.read_captions(data, names)
            sim_ts = u.cosine(u.text_embeddings(teacher, captions), semantic)  # (texts, samples)
            for direction, sim in ((f"text_to_{m}", sim_ts), (f"{m}_to_text", sim_ts.T)):
                for k, v in u.recall_at_k(sim, (1, 5)).items():
                    summary[f"{direction}_{k}"] = v
            settings["retrieval"] = {"pairs": len(names), "captions": "captions.json or STEM.txt beside each file",
                                     "ties": "a candidate scored equal to the correct one ranks ahead of it"}
        if "probe" in metrics:
            _, labels = u.labels_of(names)
            probe = u.linear_probe(pooled, labels, seed=options.seed, test_fraction=options.probe_test_fraction)
            summary["probe_top1"] = probe.pop("accuracy")
            settings["probe"] = {**probe, "features": f"{pool_kind}, {pooled.shape[1]}-d, frozen",
                                 "classifier": "StandardScaler + LogisticRegression(C=1, lbfgs, max_iter=2000), "
                                               "stratified train_test_split"}
    except u.UnderstandingError as err:
        raise EvalError(str(err)) from None


# ----------------------------------------------------------------------------- report
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("/", "__"))


def _write(out: str, report: dict[str, Any], names: list[str], targets: list[torch.Tensor], recons: list[Any],
           modality: Any, model: Any, grid_images: int) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    figures: list[str] = []
    shown = list(zip(names, targets, recons))[:grid_images]
    if shown:
        rows = [row for n, t, r in shown
                for row in preview_rows(modality, [(f"{n} original", t), ("reconstruction", r.sample)])]
        save_grid(rows, f"{out}/grid.png")
        figures.append("![originals and reconstructions](grid.png)")
        fs.makedirs(f"{root}/samples", exist_ok=True)
    for n, t, r in shown:
        stem = f"samples/{_safe(n)}"
        save_png(modality.figure(t, r.sample), f"{out}/{stem}.png")
        written = modality.save_reconstruction(r.tokens, r.meta, model.spec, f"{out}/{stem}")
        links = [w[len(out.rstrip("/")) + 1 :] for w in written if w.startswith(out.rstrip("/") + "/")]
        line = f"**{n}** (top: original, bottom: reconstruction)\n\n![{n}]({stem}.png)"
        pictures = [f"![{n} {w.rsplit('/', 1)[-1]}]({w})" for w in links if w.lower().endswith(".png")]
        files = [f"[{w.rsplit('/', 1)[-1]}]({w})" for w in links if not w.lower().endswith(".png")]
        figures.append("\n\n".join([line, *pictures] + ([" ".join(files)] if files else [])))
    atomic_write_bytes(f"{out}/eval.json", json.dumps(report, indent=2, sort_keys=True).encode())
    kind = report["unit"]
    lines = [f"# atoken eval: {report['recipe']} (step {report['checkpoint_step']}), {report['modality']}", "",
             f"Checkpoint `{report['checkpoint']}` (flavour {report['flavor']}), data `{report['data']}`: "
             f"{report['n_samples']} {kind}, {report['n_skipped']} skipped.", "", "| metric | value |", "|---|---|"]
    for name, value in report["metrics"].items():
        shown_value = json.dumps(value) if isinstance(value, dict) else f"{value:.4f}"
        lines.append(f"| {name} | {shown_value} |")
    for key in FRECHET:
        if key in report["settings"]:
            net = report["settings"][key]
            lines += ["", f"{key} features: {net['network']}, weights `{net['weights']}`."]
    if "teacher" in report["settings"]:
        lines += ["", f"Text tower (zero-shot, retrieval): teacher `{report['settings']['teacher']['spec']}`."]
    per = report["per_sample"]
    if per:
        cols = sorted(next(iter(per.values())))
        lines += ["", "| sample | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{v[c]:.4f}" for c in cols) + " |" for n, v in per.items()]
    if figures:
        lines += ["", *[f + "\n" for f in figures]]
    lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=1, sort_keys=True), "```"]
    atomic_write_bytes(f"{out}/report.md", "\n".join(lines).encode())
