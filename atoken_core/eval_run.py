"""`atoken eval`: metrics of a checkpoint on a folder of images, videos or 3D assets, reproducibly.

- reconstruction (every modality): PSNR / SSIM / LPIPS against each sample's targets (the image;
  every frame of a clip, averaged; a 3D asset's held-out views), rFID (images) and rFVD (videos)
  from feature networks the user provides as local files, codebook usage (FSQ);
- understanding (images, videos): zero-shot top-1 over class folders, text <-> sample retrieval
  R@1/R@5 over captions, and a linear probe on frozen pooled features
  (:mod:`atoken_core.understanding`).

Everything is deterministic (posterior mean / quantised latents, no sampling; the probe's split
is drawn from ``seed``), so the same checkpoint, data and settings give identical numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from atoken_core.errors import UserError
from atoken_core import __version__
from atoken_core.build import build_modality, model_from_checkpoint
from atoken_core.evaluate import SSIM_SETTINGS, image_metrics, mean_metrics, modality_head, reconstruct_images, save_grid
from atoken_core.imaging import resize_within
from atoken_core.io import atomic_write_bytes
from atoken_core.metrics import InceptionFeatures, VideoFeatures, codebook_usage, frechet_distance_features
from atoken_core.registry import Registries
from atoken_core.understanding import DIGITS_SOURCE, DIGITS_URI

UNDERSTANDING = ("zeroshot", "retrieval", "probe")
METRICS: dict[str, tuple[str, ...]] = {
    "image": ("psnr", "ssim", "lpips", "rfid", "codebook", *UNDERSTANDING),
    "video": ("psnr", "ssim", "lpips", "rfvd", "codebook", *UNDERSTANDING),
    "3d": ("psnr", "ssim", "lpips", "codebook"),
}
RECONSTRUCTION = ("psnr", "ssim", "lpips", "rfid", "rfvd")  # metrics that need the decoded samples
EXTENSIONS = [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"]
VIDEO_EXTENSIONS = [".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif"]
DEFAULT_PROMPTS = {"image": "a photo of a {}.", "video": "a video of a {}."}


class EvalError(UserError, ValueError):
    pass


@attrs.frozen(kw_only=True)
class EvalOptions:
    """What `atoken eval` measures and how (every field is a CLI flag)."""

    modality: str = attrs.field(default="image", validator=attrs.validators.in_(list(METRICS)),
                                metadata={"doc": "image, video or 3d: how --data is read and reconstructed"})
    metrics: tuple[str, ...] = attrs.field(default=("psnr", "ssim"), converter=tuple,
                                           metadata={"doc": "metric names (see METRICS for each modality)"})
    max_side: int = attrs.field(default=512, metadata={"doc": "images and video frames are downscaled to this longer side"})
    max_frames: int = attrs.field(default=16, metadata={"doc": "frames read from the start of each video"})
    lpips_weights: str = attrs.field(default="auto", metadata={"doc": "VGG16 backbone weights for LPIPS"})
    inception_weights: str | None = attrs.field(default=None, metadata={"doc": "torchvision inception_v3 safetensors (rfid)"})
    i3d_weights: str | None = attrs.field(default=None, metadata={"doc": "TorchScript video network, I3D convention (rfvd)"})
    teacher: str | None = attrs.field(default=None, metadata={
        "doc": "text tower for zeroshot/retrieval: random | siglip2:PATH; None = the checkpoint recipe's teacher"})
    prompt: str | None = attrs.field(default=None, metadata={"doc": "zero-shot prompt template; None = per modality"})
    seed: int = attrs.field(default=0, metadata={"doc": "seed of the linear probe's train/test split"})
    probe_test_fraction: float = attrs.field(default=0.25, metadata={"doc": "share of samples the probe is tested on"})
    heldout_views: int | None = attrs.field(default=None, metadata={
        "doc": "3D: views each asset is scored on (posed views: its last N; meshes: a ring of N); None = the recipe's"})
    grid_images: int = attrs.field(default=4, metadata={"doc": "images in grid.png"})
    progress: bool = attrs.field(default=True, metadata={"doc": "progress bars"})


# ----------------------------------------------------------------------------- data
def _relative_files(data: str, extensions: Sequence[str]) -> list[tuple[str, str]]:
    """(path relative to ``data``, fsspec URL) of every file under ``data`` with one of
    ``extensions``, sorted."""
    import fsspec

    from atoken_core.io import url_of

    fs, root = fsspec.core.url_to_fs(data)
    if not fs.isdir(root):
        raise EvalError(f"{data}: folder not found")
    root = root.rstrip("/")
    exts = tuple(e.lower() for e in extensions)
    return [(f[len(root) + 1 :] if f.startswith(root + "/") else f.rsplit("/", 1)[-1], url_of(fs, f))
            for f in sorted(fs.find(root)) if f.lower().endswith(exts)]


def load_folder(data: str) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Every readable image under ``data`` (sorted, named by their path under it), and one message
    per unreadable file. ``sklearn://digits[?size=N&per_class=N]`` is scikit-learn's digits."""
    from atoken_core.understanding import digits_samples, parse_digits_uri
    from atoken_modalities.image_impl import ImageError, load_image

    if data.startswith(DIGITS_URI):
        return digits_samples(**parse_digits_uri(data)), []
    samples, skipped = [], []
    for name, url in _relative_files(data, EXTENSIONS):
        try:
            samples.append((name, load_image(url)))
        except ImageError as err:
            skipped.append(str(err))
    if not samples:
        raise EvalError(f"{data}: no readable images ({len(skipped)} unreadable)")
    return samples, skipped


def load_videos(data: str, max_frames: int, max_side: int) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """The first ``max_frames`` frames of every readable video under ``data``, downscaled to
    ``max_side``; one message per unreadable file."""
    from atoken_modalities.video_impl import VideoError, load_video

    samples, skipped = [], []
    for name, url in _relative_files(data, VIDEO_EXTENSIONS):
        try:
            samples.append((name, resize_within(load_video(url, max_frames=max_frames), max_side=max_side)))
        except VideoError as err:
            skipped.append(str(err))
    if not samples:
        raise EvalError(f"{data}: no readable videos ({len(skipped)} unreadable)")
    return samples, skipped


def load_assets(data: str, recipe: Any, modality: Any, heldout: int | None) -> tuple[list[tuple[str, Any]], list[str], dict]:
    """3D assets under ``data``: every folder holding a ``transforms.json`` (posed views; its last
    ``heldout`` views are scored, not encoded) and every mesh file outside those folders (rendered
    from the input cameras of the recipe's mesh settings, scored on a ring of ``heldout`` cameras
    25 degrees up that the input views do not include). Voxel resolution and render settings come
    from the checkpoint's recipe (``[data.3d]``), so assets are tokenised as in training."""
    from atoken_modalities.cameras import orbit_cameras, sphere_cameras
    from atoken_modalities.mesh_render import MESH_SUFFIXES, MeshError
    from atoken_modalities.objects import MeshSourceConfig, PosedViewsConfig
    from atoken_modalities.objects_impl import ThreeDError, make_asset, prepare_mesh
    from atoken_modalities.posed_views import load_posed_views

    spec = recipe.data.get("3d")
    source = spec.config if spec is not None else None
    mesh_cfg = source if isinstance(source, MeshSourceConfig) else MeshSourceConfig()
    resolution = getattr(source, "resolution", mesh_cfg.resolution)
    background = source.background if isinstance(source, PosedViewsConfig) else modality.config.background
    files = _relative_files(data, [".json", *MESH_SUFFIXES])
    folders = sorted({name.rsplit("/", 1)[0] if "/" in name else "" for name, _ in files
                      if name.rsplit("/", 1)[-1] == "transforms.json"})
    inside = tuple(f + "/" for f in folders if f)
    meshes = [(n, u) for n, u in files if n.lower().endswith(MESH_SUFFIXES) and not ("" in folders or n.startswith(inside))]
    views_heldout = heldout or getattr(source, "eval_views", None) or 2
    ring_views = heldout or getattr(source, "eval_views", None) or mesh_cfg.eval_views
    samples, skipped = [], []
    for folder in folders:
        url = data.rstrip("/") + ("/" + folder if folder else "")
        try:
            samples.append((folder or url.rsplit("/", 1)[-1], load_posed_views(url, resolution, background, views_heldout)))
        except ThreeDError as err:
            skipped.append(str(err))
    c = mesh_cfg
    cameras = sphere_cameras(c.views, c.radius, c.fov, c.size)
    ring = orbit_cameras(ring_views, c.radius, c.fov, c.size, elevation_deg=25.0)
    for name, url in meshes:
        try:
            samples.append((name, make_asset(prepare_mesh(url, c.colour_seed), cameras, resolution, ring)))
        except (MeshError, ThreeDError) as err:
            skipped.append(str(err))
    if not samples:
        raise EvalError(f"{data}: no readable 3D assets (posed-views folders with transforms.json, or mesh files "
                        f"{', '.join(MESH_SUFFIXES)}; {len(skipped)} unreadable)")
    settings = {"voxel_resolution": resolution, "posed_views_heldout": views_heldout, "background": background,
                "meshes": {"input_views": c.views, "heldout_ring_views": ring_views, "ring_elevation_deg": 25.0,
                           "size": c.size, "fov": c.fov, "radius": c.radius, "colour_seed": c.colour_seed},
                "render_settings_from": f"recipe [data.3d] ({spec.kind})" if spec is not None else "defaults"}
    return sorted(samples, key=lambda s: s[0]), skipped, settings


# ----------------------------------------------------------------------------- reconstruction
@torch.no_grad()
def reconstruct_assets(model: Any, modality: Any, assets: Sequence[Any]) -> tuple[list[torch.Tensor], list[tuple]]:
    """Renders of each decoded asset at its target cameras, and (decoded Sparse4D, meta) for saving."""
    head = modality_head(model, modality)
    renders, raw = [], []
    for asset in assets:
        tokens = modality.patchify([asset], model.spec)
        out, _ = model(tokens.patches, sample=False, head=head)
        decoded = tokens.patches.with_features(out.float())
        renders.append(modality.unpatchify(decoded, tokens.meta, model.spec)[0].clamp(-1, 1))
        raw.append((decoded, tokens.meta))
    return renders, raw


def _lpips(targets: Sequence[torch.Tensor], recons: Sequence[torch.Tensor], weights: str) -> list[float]:
    """LPIPS of each (image | clip | view set): the mean over its frames or views."""
    from atoken_core.interfaces import BottleneckOutput, LossInputs
    from atoken_losses import LPIPSConfig
    from atoken_losses.perceptual import LPIPSLoss

    lpips = LPIPSLoss(LPIPSConfig(vgg16_weights=weights))
    out = []
    with torch.no_grad():
        for t, r in zip(targets, recons):
            if min(t.shape[-2:]) < 32:
                raise EvalError(f"lpips: a sample of {t.shape[-2]}x{t.shape[-1]} pixels is too small for VGG16's five "
                                "poolings (needs at least 32 on each side); leave lpips out of --metrics")
            t4, r4 = (t[None], r[None]) if t.ndim == 3 else (t, r)
            inputs = LossInputs("image", t4, r4, BottleneckOutput(latent=torch.zeros(0)))
            out.append(float(lpips(inputs)["lpips"]))
    return out


def _check(options: EvalOptions, model: Any, data: str) -> None:
    m = options.modality
    bad = [f"--{flag} must be {rule}, got {value}" for flag, value, ok, rule in (
        ("max-side", options.max_side, options.max_side >= 8, ">= 8"),
        ("max-frames", options.max_frames, options.max_frames >= 1, ">= 1"),
        ("probe-test-fraction", options.probe_test_fraction, 0 < options.probe_test_fraction < 1, "in (0, 1)"),
        ("heldout-views", options.heldout_views, options.heldout_views is None or options.heldout_views >= 1, ">= 1"),
    ) if not ok]
    if bad:
        raise EvalError("; ".join(bad))
    if data.startswith("sklearn://") and m != "image":
        raise EvalError(f"{data}: scikit-learn's digits are images; use --modality image")
    unknown = sorted(set(options.metrics) - set(METRICS[m]))
    if unknown:
        raise EvalError(f"--metrics: unknown {', '.join(unknown)} for --modality {m}; choose from {', '.join(METRICS[m])}")
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
    if "codebook" in options.metrics and not model.bottleneck.discrete:
        raise EvalError("--metrics codebook needs a discrete (FSQ) checkpoint")


def run_eval(ckpt: str, data: str, out: str, registries: Registries, options: EvalOptions | None = None,
             **overrides: Any) -> dict[str, Any]:
    """Evaluate checkpoint ``ckpt`` on ``data``; write ``eval.json``, ``report.md`` and figures to
    ``out``; return the report. ``overrides`` are :class:`EvalOptions` fields."""
    options = attrs.evolve(options or EvalOptions(), **overrides)
    model, recipe, meta = model_from_checkpoint(ckpt, registries)
    _check(options, model, data)
    m, metrics = options.modality, set(options.metrics)
    modality = build_modality(recipe, registries, m)
    if m == "3d" and modality_head(model, modality) is None:
        raise EvalError(f"{ckpt}: this checkpoint has no 3D output head (its recipe trains no [data.3d]); "
                        "3D evaluation needs a checkpoint trained on 3D")
    video_net = None
    if "rfvd" in metrics:
        try:
            video_net = VideoFeatures(options.i3d_weights)
        except ValueError as err:
            raise EvalError(str(err)) from None
    settings: dict[str, Any] = {"modality": m, "ssim": SSIM_SETTINGS}
    if m == "image":
        samples, skipped = load_folder(data)
        samples = [(n, resize_within(x, max_side=options.max_side)) for n, x in samples]
        settings["max_side"] = options.max_side
        if data.startswith(DIGITS_URI):
            settings["data_source"] = DIGITS_SOURCE
    elif m == "video":
        samples, skipped = load_videos(data, options.max_frames, options.max_side)
        settings.update(max_side=options.max_side, max_frames=options.max_frames,
                        psnr_ssim_lpips="per frame, averaged over each clip's frames, then over clips")
    else:
        samples, skipped, settings["3d"] = load_assets(data, recipe, modality, options.heldout_views)
        settings["psnr_ssim_lpips"] = "per held-out view, averaged over each asset's views, then over assets"
    fd = sorted(metrics & {"rfid", "rfvd"})
    if fd and len(samples) < 2:
        raise EvalError(f"--metrics {','.join(fd)}: a Fréchet distance needs at least 2 samples, {data} has {len(samples)}")
    names = [n for n, _ in samples]
    inputs = [x for _, x in samples]
    targets = modality.targets(inputs, model.spec)
    shapes = {n: list(t.shape) for n, t in zip(names, targets)}

    per_sample: dict[str, dict[str, float]] = {n: {} for n in names}
    summary: dict[str, Any] = {}
    recons: list[torch.Tensor] = []
    raw3d: list[tuple] = []
    if metrics & set(RECONSTRUCTION):
        if m == "3d":
            recons, raw3d = reconstruct_assets(model, modality, tqdm(inputs, desc="reconstruct", disable=not options.progress))
        else:
            recons = reconstruct_images(model, modality, tqdm(inputs, desc="reconstruct", disable=not options.progress))
        for name, t, r in zip(names, targets, recons):
            per_sample[name].update({k: v for k, v in image_metrics(t, r).items() if k in metrics})
        if "lpips" in metrics:
            for name, value in zip(names, _lpips(targets, recons, options.lpips_weights)):
                per_sample[name]["lpips"] = value
            settings["lpips"] = f"VGG16 LPIPS v0.1, backbone weights {options.lpips_weights!r}"
        if any(per_sample.values()):
            summary.update(mean_metrics(list(per_sample.values())))
    if "rfid" in metrics:
        net = InceptionFeatures(options.inception_weights)
        with torch.no_grad():
            real = torch.cat([net(x[None]) for x in targets]).double().numpy()
            fake = torch.cat([net(r[None]) for r in recons]).double().numpy()
        summary["rfid"] = frechet_distance_features(real, fake)
        settings["rfid"] = {"network": "torchvision inception_v3 pool features (2048-d), 299x299 bilinear",
                            "weights": options.inception_weights, "samples": len(targets),
                            "note": "not comparable with TF-Inception FID numbers"}
    if "rfvd" in metrics:
        try:
            real = torch.cat([video_net(x) for x in targets]).double().numpy()
            fake = torch.cat([video_net(r) for r in recons]).double().numpy()
        except ValueError as err:
            raise EvalError(str(err)) from None
        summary["rfvd"] = frechet_distance_features(real, fake)
        settings["rfvd"] = {**video_net.describe(), "clips": len(targets), "feature_dim": int(real.shape[1]),
                            "frames_per_clip": sorted({int(x.shape[0]) for x in targets}),
                            "note": "Frechet distance of Gaussians fitted to real and reconstructed clip features; "
                                    "published FVDs use 2048+ clips, so few clips give a noisy, biased number"}
    if "codebook" in metrics:
        with torch.no_grad():
            codes = torch.cat([model.bottleneck.latent_to_codes(model.encode_latent(modality.patchify([x], model.spec).patches))
                               for x in inputs])
        summary["codebook"] = codebook_usage(codes, model.bottleneck.codebook_size)
    if metrics & set(UNDERSTANDING):
        _understanding(model, modality, recipe, registries, options, data, names, inputs, summary, settings)

    report = {
        "atoken_version": __version__, "checkpoint": ckpt, "checkpoint_step": meta["state"]["step"],
        "recipe": recipe.name, "flavor": recipe.model.flavor, "modality": m, "data": data, "seed": options.seed,
        "n_samples": len(samples), "n_skipped": len(skipped), "skipped_first": skipped[:5], "metrics": summary,
        "settings": settings, "per_sample": {n: v for n, v in per_sample.items() if v}, "shapes": shapes,
    }
    _write(out, report, names, inputs, targets, recons, raw3d, modality, model, options.grid_images)
    return report


def _understanding(model: Any, modality: Any, recipe: Any, registries: Registries, options: EvalOptions, data: str,
                   names: list[str], inputs: list[Any], summary: dict[str, Any], settings: dict[str, Any]) -> None:
    from atoken_core import understanding as u

    metrics, m = set(options.metrics), options.modality
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
            template = options.prompt or DEFAULT_PROMPTS[m]
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
    return name.replace("/", "__")


def _write(out: str, report: dict[str, Any], names: list[str], inputs: list[Any], targets: list[torch.Tensor],
           recons: list[torch.Tensor], raw3d: list[tuple], modality: Any, model: Any, grid_images: int) -> None:
    import fsspec
    from einops import rearrange

    from atoken_modalities.image_impl import save_image
    from atoken_modalities.video_impl import save_frame_strip

    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    figures: list[str] = []
    m = report["modality"]
    if recons and m == "image":
        rows = [[(f"{n} original", x), ("reconstruction", r)] for n, x, r in list(zip(names, targets, recons))[:grid_images]]
        save_grid(rows, f"{out}/grid.png")
        figures.append("![originals and reconstructions](grid.png)")
    elif recons and m == "video":
        fs.makedirs(f"{root}/strips", exist_ok=True)
        for n, x, r in zip(names, targets, recons):
            save_frame_strip(torch.cat([x, r], dim=2), f"{out}/strips/{_safe(n)}.png")  # originals above, recons below
            figures.append(f"**{n}** (top: original frames, bottom: reconstruction)\n\n![{n}](strips/{_safe(n)}.png)")
    elif recons and m == "3d":
        fs.makedirs(f"{root}/assets", exist_ok=True)
        for n, t, r, (decoded, meta) in zip(names, targets, recons, raw3d):
            prefix = f"{out}/assets/{_safe(n)}"
            modality.save_reconstruction(decoded, meta, model.spec, prefix)
            views = rearrange(torch.cat([t, r], dim=2), "v c h w -> c h (v w)")
            save_image(views, prefix + "-views.png")
            figures.append(f"**{n}**: held-out views (top: target, bottom: render of the reconstruction), turntable, "
                           f"[Gaussian splats](assets/{_safe(n)}.ply)\n\n![{n} views](assets/{_safe(n)}-views.png)\n\n"
                           f"![{n} turntable](assets/{_safe(n)}-turntable.png)")
    atomic_write_bytes(f"{out}/eval.json", json.dumps(report, indent=2, sort_keys=True).encode())
    kind = {"image": "images", "video": "clips", "3d": "assets"}[m]
    lines = [f"# atoken eval: {report['recipe']} (step {report['checkpoint_step']}), {m}", "",
             f"Checkpoint `{report['checkpoint']}` (flavour {report['flavor']}), data `{report['data']}`: "
             f"{report['n_samples']} {kind}, {report['n_skipped']} skipped.", "", "| metric | value |", "|---|---|"]
    for name, value in report["metrics"].items():
        shown = json.dumps(value) if isinstance(value, dict) else f"{value:.4f}"
        lines.append(f"| {name} | {shown} |")
    for key in ("rfid", "rfvd"):
        if key in report["settings"]:
            net = report["settings"][key]
            lines += ["", f"{key} features: {net['network']}, weights `{net['weights']}`."]
    if "teacher" in report["settings"]:
        lines += ["", f"Text tower (zero-shot, retrieval): teacher `{report['settings']['teacher']['spec']}`."]
    per = report["per_sample"]
    if per:
        cols = sorted(next(iter(per.values())))
        lines += ["", f"| {kind[:-1]} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{v[c]:.4f}" for c in cols) + " |" for n, v in per.items()]
    if figures:
        lines += ["", *[f + "\n" for f in figures]]
    lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=1, sort_keys=True), "```"]
    atomic_write_bytes(f"{out}/report.md", "\n".join(lines).encode())

