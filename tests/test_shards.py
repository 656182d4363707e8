"""WebDataset-style tar shards: the index and ranged reads against tarfile, batches as a function
of the step's generator (resume, worker processes, prefetch), memory:// URIs, corrupt members,
captions, and video / 3D members."""

from __future__ import annotations

import io
import logging
import tarfile
import uuid

import attrs
import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from atoken_core.config import structure
from atoken_core.train import step_generator
from atoken_modalities.shards import TarShardsConfig, atoken_data
from atoken_modalities import shards_impl
from atoken_core.tarshards import ShardError, ShardNotFound, expand_braces, read_parts, write_shards
from atoken_modalities.shards_impl import TarShards


def png(value: int, size: tuple[int, int] = (40, 48)) -> bytes:
    """A solid-grey PNG: every pixel of sample i is 10 * i, so a crop tells which sample it came from."""
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def value_of(x: torch.Tensor) -> int:
    return round(float(x.mean()) * 127.5 + 127.5)


def records(n: int, start: int = 0) -> list[tuple[str, dict]]:
    return [(f"{i:06d}", {"png": png(10 * i), "txt": f"sample {i}", "cls": i % 3}) for i in range(start, start + n)]


@pytest.fixture
def image_shards(tmp_path):
    """12 training samples over 3 local shards (5, 5, 2), 3 held-out ones."""
    train = write_shards(records(12), str(tmp_path / "train-%06d.tar"), 5)
    write_shards(records(3, start=20), str(tmp_path / "val-%06d.tar"), 5)
    return TarShardsConfig(shards=[str(tmp_path / "train-{000000..000002}.tar")], eval_shards=[str(tmp_path / "val-*.tar")],
                           crop=16), train


BAD_KEYS = {"000003", "000008"}


@pytest.fixture
def flawed_shards(tmp_path):
    """image_shards with two corrupt members (not the first: the probe stops there)."""
    train = records(12)
    train[3][1]["png"] = b"not an image"
    train[8][1]["png"] = png(80)[:60]  # a truncated PNG
    write_shards(train, str(tmp_path / "train-%06d.tar"), 5)
    write_shards(records(3, start=20), str(tmp_path / "val-%06d.tar"), 5)
    return TarShardsConfig(shards=[str(tmp_path / "train-{000000..000002}.tar")], eval_shards=[str(tmp_path / "val-*.tar")],
                           crop=16)


def memory_root() -> str:
    return f"memory://shards-{uuid.uuid4().hex[:8]}"


def test_expand_braces():
    assert expand_braces("s3://b/train-{000008..000011}.tar") == [
        f"s3://b/train-{i:06d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x{y}z") == ["x{y}z"]


def test_config_is_registered_and_strict():
    (component,) = atoken_data()
    assert component.name == "tar_shards" and component.config is TarShardsConfig
    video = structure({"shards": ["a.tar"], "eval_shards": ["b.tar"], "modality": "video"}, TarShardsConfig, "data.video")
    assert video.media == ["mp4", "webm"] and video.train_sample_shape() == (8, 3, 64, 64)
    with pytest.raises(Exception, match="colour"):
        structure({"shards": [], "eval_shards": [], "colour": 1}, TarShardsConfig, "data.image")


def test_index_and_ranged_reads_match_tarfile(image_shards):
    config, urls = image_shards
    source = TarShards(config)
    assert len(source) == 12 and source.index.urls == urls
    seen = set()
    for i in range(len(source)):
        ref = source.index[i]
        with tarfile.open(ref.url) as tar:
            expected = {role: tar.extractfile(f"{ref.key}.{ext}").read()
                        for role, ext in (("media", ref.ext), ("caption", "txt"), ("label", "cls"))}
        assert read_parts(ref) == expected
        seen.add(ref.key)
    assert seen == {f"{i:06d}" for i in range(12)}


def test_batch_depends_only_on_the_step(image_shards):
    """Same (seed, step) -> same batch and captions; a fresh source resumed at step k gives the
    straight run's step k, and leaves the generator in the same state."""
    config, _ = image_shards
    straight = TarShards(config)
    run = []
    for step in range(5):
        g = step_generator(7, step)
        run.append((*straight.train_batch_texts(6, g), g.get_state()))
    resumed = TarShards(config)
    g = step_generator(7, 3)
    samples, texts = resumed.train_batch_texts(6, g)
    assert texts == run[3][1]
    assert all(torch.equal(a, b) for a, b in zip(samples, run[3][0]))
    assert torch.equal(g.get_state(), run[3][2])
    assert run[3][1] != run[4][1]  # and steps do differ


def test_workers_and_prefetch_give_the_in_process_batches(image_shards, tmp_path):
    """workers=2 (local shards read in the workers, memory:// ones read here) with speculative
    prefetch returns exactly the workers=0 batches, and the prefetched ones are used."""
    config, _ = image_shards
    root = memory_root()
    write_shards(records(3, start=20), root + "/val-%06d.tar", 5)
    config.eval_shards = [root + "/val-000000.tar"]
    inline = TarShards(config)
    pooled = TarShards(structure({**{k: getattr(config, k) for k in ("shards", "eval_shards", "crop")},
                                  "workers": 2, "prefetch": 2}, TarShardsConfig, "data.image"))
    try:
        for step in range(4):
            a, ta = inline.train_batch_texts(5, step_generator(0, step))
            b, tb = pooled.train_batch_texts(5, step_generator(0, step))
            assert ta == tb and all(torch.equal(x, y) for x, y in zip(a, b))
        assert pooled.prefetch_hits == 3  # steps 1..3 were decoded ahead
        assert [n for n, _ in pooled.eval_samples()] == [n for n, _ in inline.eval_samples()]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(pooled.eval_samples(), inline.eval_samples()))
    finally:
        pooled.close()


def test_memory_uris_captions_and_labels():
    root = memory_root()
    write_shards(records(12), root + "/train-%06d.tar", 4)
    write_shards(records(3, start=20), root + "/val-%06d.tar", 4)
    source = TarShards(TarShardsConfig(shards=[root + "/train-{000000..000002}.tar"],
                                       eval_shards=[root + "/val-000000.tar"], crop=16))
    samples, texts = source.train_batch_texts(24, torch.Generator().manual_seed(1))
    assert len(samples) == 24 and all(x.shape == (3, 16, 16) for x in samples)
    assert all(t == f"sample {value_of(x) // 10}" for x, t in zip(samples, texts))  # captions line up
    assert len({t for t in texts}) > 5
    evals = source.eval_samples()
    assert [n for n, _ in evals] == ["000020.png", "000021.png", "000022.png"]
    assert all(x.shape == (3, 40, 48) for _, x in evals)
    assert source.labels == {"000020.png": "2", "000021.png": "0", "000022.png": "1"}


def test_no_caption_key_means_no_texts(image_shards):
    config, _ = image_shards
    config.caption = ""
    assert TarShards(config).train_batch_texts(2, torch.Generator().manual_seed(0))[1] is None


def test_corrupt_members_are_skipped_counted_and_replaced(tmp_path, caplog):
    good = records(6)
    good[2][1]["png"] = b"not an image"
    good[4][1]["png"] = png(40)[:60]  # a truncated PNG
    write_shards(good, str(tmp_path / "train-%06d.tar"), 6)
    # a shard cut short inside its last member's data: that member's ranged read comes back short
    write_shards(records(2, start=10), str(tmp_path / "cut-%06d.tar"), 2)
    data = (tmp_path / "cut-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "cut-000000.tar") as tar:
        last = tar.getmember("000011.png")
    (tmp_path / "cut-000000.tar").write_bytes(data[: last.offset_data + 20])
    write_shards(records(1, start=20), str(tmp_path / "val-%06d.tar"), 1)
    config = TarShardsConfig(shards=[str(tmp_path / "train-000000.tar"), str(tmp_path / "cut-000000.tar")],
                             eval_shards=[str(tmp_path / "val-000000.tar")], crop=16)
    source = TarShards(config)
    assert len(source) == 8
    with caplog.at_level(logging.WARNING):
        batches = [source.train_batch_texts(16, step_generator(0, s)) for s in range(4)]
    bad_values = {20, 40, 110}
    for samples, texts in batches:
        assert len(samples) == 16 and len(texts) == 16
        assert not {value_of(x) for x in samples} & bad_values
        assert all(t == f"sample {value_of(x) // 10}" for x, t in zip(samples, texts))
    assert source.n_skipped == 4  # the cut shard, reported when indexed, and three members
    joined = " ".join(source.skipped)
    assert "cut-000000.tar: tar breaks off" in joined and "000011.png: truncated member" in joined
    assert "000002.png" in joined and "000004.png" in joined
    assert "000002.png" in caplog.text
    # The replacement draws are part of the step: a fresh source (decoding the corrupt members
    # instead of knowing them) gives the same batch.
    again = TarShards(config).train_batch_texts(16, step_generator(0, 3))
    assert again[1] == batches[3][1] and all(torch.equal(a, b) for a, b in zip(again[0], batches[3][0]))


def test_nothing_decodable_is_an_error_naming_the_shards(tmp_path):
    garbage = [(f"{i:06d}", {"jpg": b"\xff\xd8 garbage", "txt": "x"}) for i in range(3)]
    urls = write_shards(garbage, str(tmp_path / "bad-%06d.tar"), 2)
    write_shards(records(1), str(tmp_path / "val-%06d.tar"), 1)
    val = [str(tmp_path / "val-000000.tar")]
    with pytest.raises(ShardError, match="no training sample could be decoded") as err:
        TarShards(TarShardsConfig(shards=[str(tmp_path / "bad-*.tar")], eval_shards=val))
    assert all(u in str(err.value) for u in urls)
    write_shards([("000000", {"txt": "only a caption"})], str(tmp_path / "empty-%06d.tar"), 1)
    with pytest.raises(ShardError, match="hold no sample with a jpg/jpeg/png/webp member.*empty-000000.tar"):
        TarShards(TarShardsConfig(shards=[str(tmp_path / "empty-000000.tar")], eval_shards=val))
    with pytest.raises(ShardNotFound, match="missing.tar"):
        TarShards(TarShardsConfig(shards=[str(tmp_path / "missing.tar")], eval_shards=val))


def test_video_members_decode(tmp_path):
    from atoken_modalities.video_impl import save_video

    clip = torch.linspace(-1, 1, 6 * 3 * 24 * 32).reshape(6, 3, 24, 32)
    save_video(clip, str(tmp_path / "clip.mp4"))
    mp4 = (tmp_path / "clip.mp4").read_bytes()
    root = memory_root()
    write_shards([("a", {"mp4": mp4, "txt": "a ramp"}), ("b", {"mp4": b"not a video"})], root + "/train-%06d.tar", 2)
    write_shards([("c", {"mp4": mp4})], root + "/val-%06d.tar", 2)
    source = TarShards(TarShardsConfig(modality="video", shards=[root + "/train-000000.tar"],
                                       eval_shards=[root + "/val-000000.tar"], frames=4, crop=16, eval_frames=5))
    samples, texts = source.train_batch_texts(3, torch.Generator().manual_seed(0))
    assert all(x.shape == (4, 3, 16, 16) for x in samples) and texts == ["a ramp"] * 3
    ((name, x),) = source.eval_samples()
    assert name == "c.mp4" and x.shape == (5, 3, 24, 32)
    assert source.n_skipped == 1 and "b.mp4" in source.skipped[0]


def test_mesh_members_decode():
    import trimesh

    from atoken_modalities.objects_impl import Asset3D

    root = memory_root()
    glb = trimesh.creation.box().export(file_type="glb")
    with fsspec.open(root + "/box.obj", "w") as f:
        f.write(trimesh.creation.icosphere(subdivisions=1).export(file_type="obj"))
    with fsspec.open(root + "/box.obj", "rb") as f:
        obj = f.read()
    write_shards([("box", {"glb": glb, "txt": "a box"}), ("ball", {"obj": obj, "txt": "a ball"})],
                 root + "/train-%06d.tar", 2)
    write_shards([("box", {"glb": glb, "cls": 4})], root + "/val-%06d.tar", 2)
    source = TarShards(TarShardsConfig(modality="3d", shards=[root + "/train-000000.tar"],
                                       eval_shards=[root + "/val-000000.tar"], resolution=8, views=2, size=16,
                                       eval_views=2))
    assets, texts = source.train_batch_texts(2, torch.Generator().manual_seed(0))
    assert all(isinstance(a, Asset3D) and a.views.shape == (2, 3, 16, 16) and len(a.voxels) for a in assets)
    assert set(texts) <= {"a box", "a ball"}
    ((name, asset),) = source.eval_samples()
    assert name == "box.glb" and asset.target_views.shape == (2, 3, 16, 16) and source.labels == {"box.glb": "4"}


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (3, 0), (2, 1)])
def test_rank_parts_interleave_to_the_single_process_batch(flawed_shards, world, workers):
    """Under torchrun each rank (a source of its own) gets samples rank::world of the single-process
    batch, tensor for tensor, with the same captions, corrupt members replaced alike without a
    word between the ranks, and leaves the step's generator in the single-process state; with a
    worker process, each rank's next parts are decoded ahead."""
    single = TarShards(flawed_shards)
    expected = []
    for step in range(4):
        g = step_generator(5, step)
        expected.append((*single.train_batch_texts(7, g), g.get_state()))
    assert single.n_skipped == 2  # both corrupt members were drawn (and replaced)
    ranks = [TarShards(attrs.evolve(flawed_shards, workers=workers, prefetch=2)) for _ in range(world)]
    try:
        for step, (samples, texts, state) in enumerate(expected):
            merged_samples, merged_texts = [None] * len(samples), [None] * len(texts)
            for rank, source in enumerate(ranks):
                g = step_generator(5, step)
                merged_samples[rank::world], merged_texts[rank::world] = source.train_batch_part(7, g, rank, world)
                assert torch.equal(g.get_state(), state)
            assert merged_texts == texts
            assert all(torch.equal(a, b) for a, b in zip(merged_samples, samples))
        assert sum(source.n_skipped for source in ranks) >= 2  # each counts what it decoded
        assert [source.prefetch_hits for source in ranks] == [3 if workers else 0] * world
    finally:
        for source in ranks:
            source.close()


def test_a_rank_decodes_only_its_own_samples(flawed_shards, monkeypatch):
    """A rank reads and decodes only its positions of the batch: with the corrupt member drawn
    only at the other rank's positions, this rank decodes its own three and skips nothing."""
    decoded = []
    decode_ref = shards_impl.decode_ref

    def counting(config, mode, ref, blobs, u, modality=None):
        decoded.append(ref.key)
        return decode_ref(config, mode, ref, blobs, u, modality)

    monkeypatch.setattr(shards_impl, "decode_ref", counting)
    single = TarShards(flawed_shards)
    for step in range(100):  # a step whose batch draws a corrupt member at odd positions only
        g = step_generator(0, step)
        keys = [single.index[single._draw(g)[0]].key for _ in range(6)]
        bad = [pos for pos, key in enumerate(keys) if key in BAD_KEYS]
        if bad and all(pos % 2 for pos in bad):
            break
    else:
        pytest.fail("no step draws a corrupt member at odd positions only")
    expected = TarShards(flawed_shards).train_batch_texts(6, step_generator(0, step))
    parts = []
    for rank in (0, 1):
        source = TarShards(flawed_shards)
        decoded.clear()
        parts.append(source.train_batch_part(6, step_generator(0, step), rank, 2))
        assert decoded[:3] == keys[rank::2]
        if rank == 0:
            assert decoded == keys[0::2] and source.n_skipped == 0 and source.skipped == []
        else:
            assert source.n_skipped == len({keys[pos] for pos in bad}) and set(decoded) & BAD_KEYS
    assert parts[0][1] + parts[1][1] == expected[1][0::2] + expected[1][1::2]
