"""Understanding metrics of a checkpoint's semantic branch (W_s of the attention-pooled encoder
features): zero-shot classification, text <-> sample retrieval and a linear probe; plus
scikit-learn's handwritten digits as a small labelled evaluation set that needs no download.

The metric functions take plain arrays, so tests check them against explicit loops and
scikit-learn's own implementations; :func:`embed_samples` turns samples into the arrays.

Conventions:

- zero-shot: class ``c`` of a sample is the first folder of its path under the data root
  (``DATA/CLASS/x.png``); its prompt is ``template.format(name)`` with ``_`` and ``-`` read as
  spaces; a sample is predicted as the argmax over classes of cos(W_s(sample), text(prompt_c))
  (ties go to the class first in sorted order).
- retrieval: sample ``i`` and caption ``i`` form the only correct pair; R@K is the fraction of
  queries whose correct item is among the K most similar candidates (cosine), ranking a
  candidate with a score equal to the correct one's ahead of it (the pessimistic rule).
- linear probe: a stratified train/test split by ``seed``; features standardised with the
  training mean and deviation; multinomial logistic regression (L2, C=1, lbfgs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atoken_core.errors import UserError

DIGITS_URI = "sklearn://digits"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_SOURCE = ("scikit-learn's load_digits: the test set of UCI 'Optical Recognition of Handwritten Digits' "
                 "(Alpaydin & Kaynak, 1998), 1797 8x8 images with 17 grey levels, 10 classes; shipped inside "
                 "the scikit-learn wheel (BSD-3-Clause), data listed by the UCI repository under CC BY 4.0")


class UnderstandingError(UserError, ValueError):
    """Data or a checkpoint that cannot be evaluated for understanding, saying why."""


# ----------------------------------------------------------------------------- metrics
def top1_accuracy(scores_nc: np.ndarray, labels_n: np.ndarray) -> float:
    """Fraction of rows whose highest score is at the true label's column."""
    scores_nc, labels_n = np.asarray(scores_nc), np.asarray(labels_n)
    return float((scores_nc.argmax(1) == labels_n).mean())


def recall_at_k(sim_qc: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Query ``i``'s only correct candidate is candidate ``i`` (a square similarity matrix).
    R@K = fraction of queries with fewer than K candidates scored at least as high as the correct
    one, apart from itself. K larger than the number of candidates counts every query as found."""
    sim_qc = np.asarray(sim_qc, dtype=np.float64)
    if sim_qc.ndim != 2 or sim_qc.shape[0] != sim_qc.shape[1]:
        raise ValueError(f"retrieval needs a square similarity matrix, got {sim_qc.shape}")
    correct = np.diag(sim_qc)[:, None]
    rank = (sim_qc >= correct).sum(1) - 1  # candidates ahead of the correct one (ties count as ahead)
    return {f"R@{k}": float((rank < k).mean()) for k in ks}


def linear_probe(features_nd: np.ndarray, labels_n: np.ndarray, *, seed: int = 0,
                 test_fraction: float = 0.25) -> dict[str, Any]:
    """Top-1 accuracy of a logistic-regression probe on frozen features (see the module
    docstring), with the split's sizes. Raises :class:`UnderstandingError` when a stratified
    split is impossible (a class with fewer than two samples, or a test set smaller than the
    number of classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features_nd, dtype=np.float64)
    y = np.asarray(labels_n)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise UnderstandingError("the linear probe needs at least two classes")
    if counts.min() < 2:
        raise UnderstandingError(f"the linear probe needs at least 2 samples per class for a stratified split; "
                                 f"class {classes[counts.argmin()]!r} has {counts.min()}")
    try:
        train, test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError as err:
        raise UnderstandingError(f"linear probe split: {err}") from None
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    probe.fit(x[train], y[train])
    return {"accuracy": float(probe.score(x[test], y[test])), "train_samples": len(train), "test_samples": len(test),
            "classes": len(classes), "seed": seed, "test_fraction": test_fraction}


# ----------------------------------------------------------------------------- labels, prompts, captions
def class_of(name: str) -> str:
    """A sample's class: the first folder of its path relative to the data root."""
    if "/" not in name:
        raise UnderstandingError(f"{name}: not inside a class folder (zero-shot and probe read classes from "
                                 "DATA/CLASS/file)")
    return name.split("/", 1)[0]


def class_prompt(template: str, cls: str) -> str:
    return template.format(re.sub(r"[_-]+", " ", cls).strip())


def labels_of(names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(sorted class names, label index per sample)."""
    classes = [class_of(n) for n in names]
    ordered = sorted(set(classes))
    if len(ordered) < 2:
        raise UnderstandingError(f"found {len(ordered)} class folder(s) ({', '.join(ordered)}); need at least two")
    index = {c: i for i, c in enumerate(ordered)}
    return ordered, np.array([index[c] for c in classes])


def read_captions(root: str, names: Sequence[str]) -> list[str]:
    """One caption per sample: ``captions.json`` at the data root ({relative path or file name:
    caption}) first, else a ``STEM.txt`` beside the sample. Missing captions are an error listing
    (up to five of) them."""
    import json

    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    table: dict[str, str] = {}
    if fs.exists(f"{base}/captions.json"):
        with fs.open(f"{base}/captions.json", "r") as f:
            try:
                table = json.load(f)
            except json.JSONDecodeError as err:
                raise UnderstandingError(f"{root}/captions.json: not valid JSON ({err})") from None
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise UnderstandingError(f"{root}/captions.json: expected {{file: caption}} with string captions")
    out, missing = [], []
    for name in names:
        caption = table.get(name, table.get(name.rsplit("/", 1)[-1]))
        if caption is None:
            sidecar = f"{base}/{name.rsplit('.', 1)[0]}.txt"
            if fs.exists(sidecar):
                with fs.open(sidecar, "r") as f:
                    caption = f.read().strip()
        if not caption:
            missing.append(name)
        out.append(caption or "")
    if missing:
        raise UnderstandingError(f"{root}: no caption for {len(missing)} sample(s), e.g. {', '.join(missing[:5])} "
                                 "(give captions.json {file: caption} or a STEM.txt beside each file)")
    return out


# ----------------------------------------------------------------------------- digits
def parse_digits_uri(uri: str) -> dict[str, int]:
    """``sklearn://digits[?size=32&per_class=N]`` -> {"size": .., "per_class": ..}."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    if f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/") != DIGITS_URI:
        raise UnderstandingError(f"{uri}: not {DIGITS_URI}[?size=N&per_class=N]")
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"size", "per_class"})
    if unknown:
        raise UnderstandingError(f"{uri}: unknown option(s) {', '.join(unknown)} (size, per_class)")
    try:
        opts = {k: int(v[-1]) for k, v in query.items()}
    except ValueError:
        raise UnderstandingError(f"{uri}: size and per_class must be integers") from None
    opts.setdefault("size", 32)
    if opts["size"] < 8 or opts.get("per_class", 1) < 1:
        raise UnderstandingError(f"{uri}: size must be >= 8 and per_class >= 1")
    return opts


def digits_samples(size: int = 32, per_class: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """The digits as (``CLASS/NNNN.png``, (3, size, size) in [-1, 1]) pairs, sorted by name:
    ink dark on white, upscaled from 8x8 with bilinear interpolation; ``per_class`` keeps the
    first N of each class (in the dataset's order)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen = {c: 0 for c in range(10)}
    out = []
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        if per_class is not None and seen[int(label)] >= per_class:
            continue
        seen[int(label)] += 1
        x = torch.from_numpy(1.0 - img / 16.0).float()[None, None]  # 0..16 ink -> white paper, black ink
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0]
        out.append((f"{DIGIT_NAMES[int(label)]}/{i:04d}.png", (x * 2 - 1).clamp(-1, 1).expand(3, -1, -1).contiguous()))
    return sorted(out, key=lambda item: item[0])


def write_digits_folder(folder: str, size: int = 32, per_class: int | None = None) -> int:
    """Write the digits as ``folder/CLASS/NNNN.png`` (a class-folder dataset for ``atoken eval``
    and any other tool); returns the number of files written."""
    import fsspec

    from atoken_core.imaging import save_png

    fs, path = fsspec.core.url_to_fs(folder)
    samples = digits_samples(size, per_class)
    for cls in {n.split("/", 1)[0] for n, _ in samples}:
        fs.makedirs(f"{path.rstrip('/')}/{cls}", exist_ok=True)
    for name, x in samples:
        save_png(x, f"{folder.rstrip('/')}/{name}")
    return len(samples)


# ----------------------------------------------------------------------------- embeddings
@torch.no_grad()
def embed_samples(model: Any, modality: Any, samples: Sequence[Any], batch_size: int = 32
                  ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(pooled features (N, width), W_s embeddings (N, text_dim) or None, what "pooled" means).

    With a semantic head the pooled vector is its attention pool (SigLIP2's MAP head); without
    one it is the mean of the encoder's output tokens and there is no W_s embedding. Samples
    run in packed batches of ``batch_size`` (attention stays within each sample)."""
    from atoken_core.evaluate import modality_head

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pooled, semantic = [], []
    for start in range(0, len(samples), batch_size):
        tokens = modality.patchify(list(samples[start : start + batch_size]), model.spec).patches.to(device)
        feats_ld = model.encode(tokens, modality_head(model, modality))
        if model.pool_head is not None:
            pooled_bd = model.pool(feats_ld, tokens)
            semantic.append(model.semantic_proj(pooled_bd).float().cpu())
        else:
            ids = tokens.sample_ids()
            sums = torch.zeros(tokens.batch_size, feats_ld.shape[1], device=device, dtype=feats_ld.dtype)
            pooled_bd = sums.index_add_(0, ids, feats_ld) / tokens.lengths.clamp_min(1)[:, None].to(feats_ld.dtype)
        pooled.append(pooled_bd.float().cpu())
    model.train(was_training)
    kind = "attention pool (semantic head)" if model.pool_head is not None else "mean of encoder output tokens"
    return (torch.cat(pooled).double().numpy(), torch.cat(semantic).double().numpy() if semantic else None, kind)


def recipe_teacher(recipe: Any) -> tuple[str, dict[str, Any]] | None:
    """(teacher spec, teacher options) of the first semantic loss in ``recipe`` that names one."""
    for loss in recipe.loss:
        config = loss.config
        if config is not None and getattr(config, "teacher", None):
            return config.teacher, dict(getattr(config, "teacher_config", None) or {})
    return None


def load_teacher(spec: str | None, recipe: Any, registries: Any) -> tuple[Any, str, dict[str, Any]]:
    """The text tower for zero-shot and retrieval: ``spec`` (``random``, ``siglip2:PATH``) or, when
    None, the teacher the checkpoint's recipe trained against (with its options)."""
    from atoken_core.teachers import build_teacher

    from_recipe = recipe_teacher(recipe)
    if spec is None:
        if from_recipe is None:
            raise UnderstandingError("zero-shot and retrieval need a text tower: pass --teacher random|siglip2:PATH "
                                     "(the checkpoint's recipe names no teacher)")
        spec, options = from_recipe
    else:
        options = from_recipe[1] if from_recipe is not None and from_recipe[0] == spec else {}
    try:
        teacher = build_teacher(spec, options, registries)
    except (KeyError, ValueError) as err:
        raise UnderstandingError(f"--teacher {spec!r}: {err}") from None
    return teacher, spec, options


def text_embeddings(teacher: Any, texts: Sequence[str]) -> np.ndarray:
    with torch.no_grad():
        return F.normalize(teacher.encode_text(list(texts)).float(), dim=-1).cpu().double().numpy()


def cosine(a_nd: np.ndarray, b_md: np.ndarray) -> np.ndarray:
    a = a_nd / np.linalg.norm(a_nd, axis=1, keepdims=True).clip(1e-12)
    b = b_md / np.linalg.norm(b_md, axis=1, keepdims=True).clip(1e-12)
    return a @ b.T
