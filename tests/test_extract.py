"""`atoken encode DATA -o OUT`: batch latent extraction into shards, checked against the Python
API sample by sample, with statistics recomputed independently, resume, tar input, two processes
and one-line errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_eval import make_checkpoint as make_recipe_checkpoint

from atoken_core.cli import main
from atoken_core.extract import combine_moments, is_batch_input, load_latents, rank_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.toml")
TEST_MODEL = ["model.flavor=test", "model.latent_dim=8", "data.image.video_frames=0"]
FSQ = ['bottleneck={kind="fsq", levels=[5, 4]}', "model.latent_dim=4"]
SIZES = {"a.png": (32, 48), "b.png": (40, 40), "sub/c.png": (33, 47), "d.png": (24, 20), "e.png": (16, 36)}


def make_checkpoint(path: Path, overrides: list[str], seed: int = 0) -> str:
    """A freshly initialised model of the tiny recipe at test size, saved as a step-7 checkpoint."""
    return make_recipe_checkpoint(path, TINY, overrides, seed, step=7)


def png_bytes(h: int, w: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("extract")


@pytest.fixture(scope="module")
def ckpt(root) -> str:
    return make_checkpoint(root / "kl.safetensors", TEST_MODEL)


@pytest.fixture(scope="module")
def data(root) -> Path:
    """Five small images of odd sizes (one in a subfolder), a file that is not an image but has
    an image suffix (skipped), and a text file (not a sample)."""
    folder = root / "images"
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png_bytes(h, w, i))
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    return folder


def extract(data, out, ckpt, *extra: str, capsys=None) -> str:
    rc = main(["encode", *map(str, data if isinstance(data, list) else [data]), "-o", str(out), "--ckpt", ckpt,
               "--no-progress", "--shard-samples", "2", *extra])
    assert rc == 0
    return capsys.readouterr().out if capsys else ""


@pytest.fixture(scope="module")
def extracted(root, data, ckpt) -> Path:
    out = root / "out"
    extract(data, out, ckpt)
    return out


@pytest.fixture(scope="module")
def tok(ckpt):
    from atoken_core.api import load

    return load(ckpt, device="cpu")


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("part-*.safetensors"))


def all_means(out: Path) -> torch.Tensor:
    return torch.cat([enc.mean for _, enc in load_latents(str(out))])


# ----------------------------------------------------------------------------- units


def test_work_split_is_round_robin_then_cut_in_order():
    assert rank_shards(7, 0, 2, 2) == [[0, 2], [4, 6]]
    assert rank_shards(7, 1, 2, 2) == [[1, 3], [5]]
    assert rank_shards(0, 0, 1, 5) == []
    every = sorted(i for r in range(3) for shard in rank_shards(10, r, 3, 4) for i in shard)
    assert every == list(range(10))


def test_combined_moments_equal_those_of_the_union():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, generator=g, dtype=torch.float64) * 5 + 2 for n in (1, 7, 0, 30)]
    moments = [(len(x), x.mean(0).tolist() if len(x) else [0.0] * 3, ((x - x.mean(0)) ** 2).sum(0).tolist()
                if len(x) else [0.0] * 3) for x in parts]
    n, mean, m2 = combine_moments(moments)
    union = torch.cat(parts)
    assert n == 38
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), union.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(m2, dtype=torch.float64) / n, union.var(0, unbiased=False), rtol=1e-12, atol=0)


def test_batch_mode_is_chosen_by_the_input(data):
    assert is_batch_input([str(data)]) and is_batch_input(["x/shard.tar"]) and is_batch_input(["s/{000..009}.tar"])
    assert is_batch_input(["a.tar", "b.tar"])
    assert not is_batch_input([str(data / "a.png")]) and not is_batch_input(["missing.png"])


# ----------------------------------------------------------------------------- a folder


def test_every_sample_equals_the_api_encoding_and_decodes_like_reconstruct(extracted, data, tok):
    got = dict(load_latents(str(extracted)))
    assert sorted(got) == sorted(SIZES)
    for name, enc in got.items():
        ref = tok.encode(str(data / name))
        assert enc.modality == "image" and enc.codes is None and enc.frames == ref.frames
        assert torch.equal(enc.coords, ref.coords) and enc.coords.dtype == torch.int64
        assert torch.equal(enc.mean, ref.mean) and enc.mean.dtype == torch.float32
        assert torch.equal(tok.decode(enc), tok.reconstruct(str(data / name))), name


def test_shards_are_laid_out_and_described(extracted, ckpt):
    # 6 image files (one unreadable) in sorted order, one process, 2 per shard -> 3 shards
    assert shard_files(extracted) == [f"part-00000-0000{i}.safetensors" for i in range(3)]
    names, skipped = [], []
    for f in shard_files(extracted):
        with safe_open(str(extracted / f), "pt") as st:
            meta = st.metadata()
            offsets, coords, mean = st.get_tensor("offsets"), st.get_tensor("coords"), st.get_tensor("mean")
            assert "codes" not in st.keys()
        assert meta["format"] == "atoken-latents-v1" and meta["modality"] == "image"
        assert meta["checkpoint"] == "kl.safetensors" and meta["checkpoint_step"] == "7"
        assert meta["recipe"] == "tiny" and meta["latent_dim"] == "8" and meta["discrete"] == "false"
        n = len(json.loads(meta["names"]))
        assert offsets.dtype == torch.int64 and offsets.shape == (n + 1,) and int(offsets[0]) == 0
        assert int(offsets[-1]) == coords.shape[0] == mean.shape[0] and mean.shape[1] == 8
        assert len(json.loads(meta["metas"])) == len(json.loads(meta["frames"])) == n
        names += json.loads(meta["names"])
        skipped += json.loads(meta["skipped"])
    assert names == ["a.png", "b.png", "d.png", "e.png", "sub/c.png"]
    assert [s[0] for s in skipped] == ["broken.png"] and "broken.png" in skipped[0][1]
    settings = json.loads((extracted / "extract.json").read_text())
    assert settings["world_size"] == 1 and settings["shard_samples"] == 2 and settings["samples"] == 6
    assert settings["modality"] == "image" and settings["checkpoint"] == os.path.abspath(ckpt)


def test_stats_are_the_population_mean_and_std_over_all_tokens(extracted):
    x = all_means(extracted).to(torch.float64)
    stats = json.loads((extracted / "stats.json").read_text())
    assert stats["tokens"] == x.shape[0] and stats["samples"] == 5 and stats["skipped"] == 1
    assert stats["channels"] == 8
    torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), x.mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(stats["std"], dtype=torch.float64), x.std(0, unbiased=False),
                               rtol=1e-9, atol=1e-12)
    assert stats["global"]["std"] == pytest.approx(float(x.std(unbiased=False)), rel=1e-9)
    assert stats["global"]["mean"] == pytest.approx(float(x.mean()), rel=1e-9)
    index = json.loads((extracted / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == shard_files(extracted)
    assert [s["samples"] for s in index["shards"]] == [2, 1, 2] and index["skipped"] == 1
    assert sum(s["tokens"] for s in index["shards"]) == x.shape[0]


def test_fsq_checkpoint_stores_codes(root, data, tmp_path):
    from atoken_core.api import load

    ckpt = make_checkpoint(tmp_path / "fsq.safetensors", [*TEST_MODEL, *FSQ])
    extract(data, tmp_path / "out", ckpt)
    tok = load(ckpt, device="cpu")
    got = dict(load_latents(str(tmp_path / "out")))
    assert len(got) == 5
    for name, enc in got.items():
        ref = tok.encode(str(data / name))
        assert enc.codes.dtype == torch.int64 and enc.codes.shape == (enc.num_tokens, 2)
        assert torch.equal(enc.codes, ref.codes) and torch.equal(enc.mean, ref.mean)
    with safe_open(str(tmp_path / "out" / "part-00000-00000.safetensors"), "pt") as st:
        assert st.metadata()["discrete"] == "true" and "codes" in st.keys()


# ----------------------------------------------------------------------------- resume


def test_resume_redoes_only_the_missing_shard_and_refuses_other_settings(extracted, data, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(extracted, out)
    before = {f: (out / f).read_bytes() for f in shard_files(out)}
    stamp = {f: (out / f).stat().st_mtime_ns for f in before}
    # a kill during the write of shard 1: no shard file, a temporary file from atomic_write_bytes
    (out / "part-00000-00001.safetensors").unlink()
    (out / "part-00000-00001.safetensors.tmp-deadbeef").write_bytes(b"partial")
    (out / "stats.json").unlink()
    printed = extract(data, out, ckpt, capsys=capsys)
    assert "5 samples (1 skipped: see index.json)" in printed and "3 shards" in printed and "stats.json" in printed
    assert {f: (out / f).read_bytes() for f in shard_files(out)} == before
    assert (out / "part-00000-00000.safetensors").stat().st_mtime_ns == stamp["part-00000-00000.safetensors"]
    assert not list(out.glob("*.tmp-*"))
    assert (out / "stats.json").read_text() == (extracted / "stats.json").read_text()
    # finished: nothing to do
    assert "nothing to do" in extract(data, out, ckpt, capsys=capsys)
    assert {f: (out / f).stat().st_mtime_ns for f in before if f != "part-00000-00001.safetensors"} == \
        {f: t for f, t in stamp.items() if f != "part-00000-00001.safetensors"}
    # other settings into the same folder: one line naming what changed
    rc = main(["encode", str(data), "-o", str(out), "--ckpt", ckpt, "--no-progress", "--shard-samples", "3"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("atoken: error:") and err.count("\n") == 1
    assert "shard_samples 2 -> 3" in err
    (data / "new.png").write_bytes(png_bytes(8, 8, 99))
    try:
        assert extract(data, tmp_path / "fresh", ckpt) == ""  # another folder is fine
        rc = main(["encode", str(data), "-o", str(out), "--ckpt", ckpt, "--no-progress", "--shard-samples", "2"])
        err = capsys.readouterr().err
        assert rc == 1 and "samples 6 -> 7" in err and "names_sha256" in err
    finally:
        (data / "new.png").unlink()


# ----------------------------------------------------------------------------- tar shards


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, raw in members:
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_tar_shards_give_the_latents_of_the_same_files(extracted, data, ckpt, tmp_path):
    files = sorted(SIZES)
    # WebDataset layout: members grouped by key; the png is the sample, the txt a caption
    for k, chunk in enumerate((files[:3], files[3:])):
        members = []
        for name in chunk:
            key = name.rsplit(".", 1)[0]
            members += [(f"{key}.txt", b"a caption"), (f"{key}.png", (data / name).read_bytes())]
        write_tar(tmp_path / f"shard-{k:03d}.tar", members)
    out = tmp_path / "out"
    extract(str(tmp_path / "shard-{000..001}.tar"), out, ckpt)
    got = dict(load_latents(str(out)))
    folder = dict(load_latents(str(extracted)))
    assert sorted(n.split("#", 1)[1] for n in got) == sorted(folder)
    assert all(n.startswith(("shard-000.tar#", "shard-001.tar#")) for n in got)
    for name, enc in got.items():
        ref = folder[name.split("#", 1)[1]]
        assert torch.equal(enc.coords, ref.coords) and torch.equal(enc.mean, ref.mean), name
    assert json.loads((out / "stats.json").read_text())["samples"] == 5


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_under_torchrun_split_the_samples_and_agree(extracted, data, ckpt, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "atoken_core.cli", "encode", str(data), "-o", str(out),
                           "--ckpt", ckpt, "--no-progress", "--shard-samples", "2", "--nproc", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("5 samples (1 skipped") == 1  # rank 0 alone reports
    # 6 files: rank 0 gets 0, 2, 4 (a, broken, d -> 2 shards), rank 1 gets 1, 3, 5 (b, e, c)
    assert shard_files(out) == ["part-00000-00000.safetensors", "part-00000-00001.safetensors",
                                "part-00001-00000.safetensors", "part-00001-00001.safetensors"]
    assert json.loads((out / "extract.json").read_text())["world_size"] == 2
    one, two = dict(load_latents(str(extracted))), dict(load_latents(str(out)))
    assert sorted(one) == sorted(two)
    for name in one:  # torchrun runs each rank on one thread: float32 sums may round differently
        assert torch.equal(one[name].coords, two[name].coords)
        torch.testing.assert_close(two[name].mean, one[name].mean, rtol=1e-5, atol=1e-6)
    s1, s2 = (json.loads((o / "stats.json").read_text()) for o in (extracted, out))
    assert (s1["tokens"], s1["samples"], s1["skipped"]) == (s2["tokens"], s2["samples"], s2["skipped"])
    torch.testing.assert_close(torch.tensor(s2["mean"]), torch.tensor(s1["mean"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(s2["std"]), torch.tensor(s1["std"]), rtol=1e-5, atol=1e-6)
    # the same command again continues (here: finds everything done)
    again = subprocess.run(proc.args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case, message", [
    ("modality", "not on 'video'"),
    ("empty", "no image samples"),
    ("file-output", "is a file"),
    ("nproc-one-file", "--nproc applies to a data folder"),
    ("missing-tar", "shard not found"),
    ("foreign-out", "holds latent shards but no extract.json"),
])
def test_user_errors_are_one_line(case, message, data, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["encode", str(data), "-o", str(out), "--ckpt", ckpt, "--no-progress"]
    if case == "modality":
        args += ["--modality", "video"]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif case == "file-output":
        out.write_text("x")
    elif case == "nproc-one-file":
        args = ["encode", str(data / "a.png"), "-o", str(tmp_path / "t.safetensors"), "--ckpt", ckpt, "--nproc", "2"]
    elif case == "missing-tar":
        args[1] = str(tmp_path / "nothing-{0..1}.tar")
    elif case == "foreign-out":
        out.mkdir()
        (out / "part-00000-00000.safetensors").write_bytes(b"x")
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("atoken: error:") and err.count("\n") == 1, err
    assert message in err, err


def test_load_latents_needs_a_finished_extraction(tmp_path):
    from atoken_core.extract import ExtractError

    with pytest.raises(ExtractError, match="not a finished latent extraction"):
        next(load_latents(str(tmp_path)))
