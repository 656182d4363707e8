"""`atoken eval` understanding metrics: zero-shot top-1, retrieval R@K and the linear probe
against independent references (explicit loops, scikit-learn), scikit-learn's digits as the
labelled set, and an end-to-end run that reproduces its own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import top_k_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from test_eval import make_checkpoint

from atoken_core import understanding as u
from atoken_core.eval_run import EvalError, run_eval
from atoken_core.interfaces import EvalRequest

ROOT_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml")


# ----------------------------------------------------------------------------- metric math
def test_top1_matches_loop_and_sklearn():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(50, 7)), rng.integers(0, 7, 50)
    loop = sum(int(max(range(7), key=lambda c: scores[i, c]) == labels[i]) for i in range(50)) / 50
    assert u.top1_accuracy(scores, labels) == loop == top_k_accuracy_score(labels, scores, k=1, labels=np.arange(7))


@pytest.mark.parametrize("n", [3, 12])
def test_recall_at_k_matches_loop_and_sklearn(n):
    rng = np.random.default_rng(n)
    sim = rng.normal(size=(n, n))
    sim[np.arange(n) % 3 == 0] += 2 * np.eye(n)[np.arange(n) % 3 == 0]  # some easy queries
    got = u.recall_at_k(sim, (1, 5))
    for k in (1, 5):
        loop = np.mean([sorted(range(n), key=lambda j: -sim[i, j]).index(i) < k for i in range(n)])
        assert got[f"R@{k}"] == pytest.approx(loop)
        if k < n:
            assert got[f"R@{k}"] == pytest.approx(top_k_accuracy_score(np.arange(n), sim, k=k, labels=np.arange(n)))
    assert u.recall_at_k(np.eye(4))["R@1"] == 1.0 and u.recall_at_k(np.ones((4, 4)))["R@1"] == 0.0  # ties: pessimistic


def test_linear_probe_matches_sklearn_directly():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    feats = rng.normal(size=(60, 8)) + labels[:, None] * rng.normal(size=8) * 0.7
    got = u.linear_probe(feats, labels, seed=3, test_fraction=0.25)
    train, test = train_test_split(np.arange(60), test_size=0.25, random_state=3, stratify=labels)
    scaler = StandardScaler().fit(feats[train])
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(feats[train]), labels[train])
    assert got["accuracy"] == clf.score(scaler.transform(feats[test]), labels[test])
    assert (got["train_samples"], got["test_samples"], got["classes"]) == (45, 15, 4)
    with pytest.raises(u.UnderstandingError, match="at least 2 samples per class"):
        u.linear_probe(feats[:16], labels[:16])


def test_digits_are_real_labelled_data():
    samples = u.digits_samples(size=16, per_class=30)
    assert len(samples) == 300 and samples[0][1].shape == (3, 16, 16)
    names, labels = u.labels_of([n for n, _ in samples])
    assert names == sorted(u.DIGIT_NAMES) and np.bincount(labels).tolist() == [30] * 10
    # raw pixels: a linear probe reads the digits well (the labels are right)
    pixels = np.stack([x[0].flatten().numpy() for _, x in samples])
    assert u.linear_probe(pixels, labels, seed=0)["accuracy"] > 0.85
    assert u.parse_digits_uri("sklearn://digits?per_class=3") == {"per_class": 3, "size": 32}
    with pytest.raises(u.UnderstandingError, match="unknown option"):
        u.parse_digits_uri("sklearn://digits?colour=1")


def test_write_digits_folder_round_trips(tmp_path, registries):
    assert u.write_digits_folder(str(tmp_path / "digits"), size=16, per_class=2) == 20
    image = registries["modality"].get("image")
    found = image.build(image.config()).load_eval(str(tmp_path / "digits"), EvalRequest())
    loaded, skipped = found.samples, found.skipped
    expected = u.digits_samples(size=16, per_class=2)
    assert not skipped and [n for n, _ in loaded] == [n for n, _ in expected]
    assert max(float((a - b).abs().max()) for (_, a), (_, b) in zip(loaded, expected)) <= 1 / 127.5 + 1e-6


def test_read_captions_json_then_sidecars(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "captions.json").write_text(json.dumps({"a/x.mp4": "a red car", "y.mp4": "a dog"}))
    (tmp_path / "z.txt").write_text("  a cat \n")
    assert u.read_captions(str(tmp_path), ["a/x.mp4", "b/y.mp4", "z.mp4"]) == ["a red car", "a dog", "a cat"]
    with pytest.raises(u.UnderstandingError, match="no caption for 1 sample"):
        u.read_captions(str(tmp_path), ["w.mp4"])


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base = ["model.latent_dim=8"]
    return (make_checkpoint(root / "siglip.safetensors", ROOT_RECIPE, ['model.flavor="test-siglip"', *base]),
            make_checkpoint(root / "plain.safetensors", ROOT_RECIPE, ['model.flavor="test"', *base]))


DIGITS = "sklearn://digits?size=16&per_class=12"


def test_zero_shot_and_probe_on_digits_reproduce(checkpoints, registries, tmp_path, capsys):
    from atoken_core.cli import main

    ckpt = checkpoints[0]
    assert main(["eval", "--ckpt", ckpt, "--data", DIGITS, "--out", str(tmp_path / "a"), "--metrics", "zeroshot,probe",
                 "--teacher", "random", "--seed", "1", "--prompt", "a photo of a {}.", "--no-progress"]) == 0
    assert "120 images (0 skipped): zeroshot_top1" in capsys.readouterr().out
    b = run_eval(ckpt, DIGITS, str(tmp_path / "b"), registries, metrics=["zeroshot", "probe"], teacher="random",
                 progress=False, seed=1)
    assert (tmp_path / "a" / "eval.json").read_bytes() == (tmp_path / "b" / "eval.json").read_bytes()
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert a["metrics"] == b["metrics"] and a["settings"]["probe"] == b["settings"]["probe"]
    s = a["settings"]
    assert a["n_samples"] == 120 and s["zeroshot"]["classes"] == 10 and s["teacher"]["spec"] == "random"
    assert (s["probe"]["train_samples"], s["probe"]["test_samples"], s["probe"]["seed"]) == (90, 30, 1)
    assert "CC BY 4.0" in s["data_source"] and "| zeroshot_top1 |" in (tmp_path / "a" / "report.md").read_text()

    # Independent recomputation: embed every digit alone (no packing), prompts through the teacher,
    # argmax by an explicit loop; and the probe with scikit-learn on those features.
    from atoken_core.build import build_modality, model_from_checkpoint
    from atoken_losses.semantic import build_teacher

    model, recipe, _ = model_from_checkpoint(ckpt, registries)
    modality = build_modality(recipe, registries, "image")
    samples = u.digits_samples(size=16, per_class=12)
    with torch.no_grad():
        sem, pooled = [], []
        for _, x in samples:
            p = modality.patchify([x], model.spec).patches
            v = model.pool(model.encode(p), p)
            pooled.append(v[0].double().numpy())
            sem.append(model.semantic_proj(v)[0].double().numpy())
    classes = sorted(u.DIGIT_NAMES)
    text = build_teacher("random", {}, registries).encode_text([f"a photo of a {c}." for c in classes]).double().numpy()
    truth = [classes.index(n.split("/")[0]) for n, _ in samples]
    hits = [int(np.argmax([np.dot(e, t) / np.linalg.norm(e) for t in text]) == y) for e, y in zip(sem, truth)]
    assert a["metrics"]["zeroshot_top1"] == pytest.approx(np.mean(hits), abs=1 / 120 + 1e-9)
    train, test = train_test_split(np.arange(120), test_size=0.25, random_state=1, stratify=truth)
    x, y = np.stack(pooled), np.array(truth)
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(x[train]), y[train])
    assert a["metrics"]["probe_top1"] == pytest.approx(clf.score(scaler.transform(x[test]), y[test]), abs=1 / 30 + 1e-9)


def test_understanding_needs_semantic_head_but_probe_does_not(checkpoints, registries, tmp_path, monkeypatch):
    siglip, plain = checkpoints
    kw = dict(metrics=["zeroshot"], progress=False)
    with pytest.raises(EvalError, match="semantic head"):
        run_eval(plain, DIGITS, str(tmp_path / "z"), registries, teacher="random", **kw)
    with pytest.raises(EvalError, match="need a text tower"):  # the tiny recipe trains against no teacher
        run_eval(siglip, DIGITS, str(tmp_path / "t"), registries, **kw)
    # a teacher whose text space is not the checkpoint's W_s space
    from atoken_losses.semantic import build_teacher

    monkeypatch.setattr(u, "load_teacher", lambda spec, recipe, regs: (
        build_teacher("random", {"embed_dim": 32}, regs), "random", {"embed_dim": 32}))
    with pytest.raises(EvalError, match="embeds texts in 32 dimensions but the checkpoint's W_s outputs 64"):
        run_eval(siglip, DIGITS, str(tmp_path / "m"), registries, teacher="random", **kw)
    report = run_eval(plain, DIGITS, str(tmp_path / "p"), registries, metrics=["probe"], progress=False)
    assert report["settings"]["probe"]["features"].startswith("mean of encoder output tokens, 32-d")
