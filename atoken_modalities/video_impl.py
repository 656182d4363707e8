"""Video patchify/unpatchify and video file I/O (PyAV)."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from atoken_core.errors import UserError
from atoken_core.imaging import resize_within
from atoken_core.interfaces import EvalData, EvalRequest, Modality, PatchSpec, Tokens
from atoken_core.sparse import Sparse4D
from atoken_modalities.image_impl import center_crop, save_image


class VideoError(UserError, ValueError):
    """A video that cannot be used, with the file (or sample) it came from."""


def check_video_tensor(x: torch.Tensor, where: str, channels: int) -> None:
    if x.ndim != 4:
        raise VideoError(f"{where}: expected a video tensor (T, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise VideoError(f"{where}: expected {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[0] == 0:
        raise VideoError(f"{where}: video has zero frames")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise VideoError(f"{where}: video has zero size {tuple(x.shape[2:])}")


def pad_spatial(x_tchw: torch.Tensor, multiple: int, mode: str) -> torch.Tensor:
    """Pad H and W (bottom/right) up to multiples of ``multiple``, every frame alike."""
    h, w = x_tchw.shape[-2:]
    pad = (0, -w % multiple, 0, -h % multiple)
    if not any(pad):
        return x_tchw
    if mode == "reflect" and (pad[1] >= w or pad[3] >= h):
        mode = "replicate"  # reflect needs the frame to be larger than the pad (as for images)
    return F.pad(x_tchw, pad, mode=mode)


def pad_frames(x_tchw: torch.Tensor, multiple: int, mode: str) -> torch.Tensor:
    """Pad T up to a multiple of ``multiple`` so the last temporal block is whole."""
    missing = -x_tchw.shape[0] % multiple
    if not missing:
        return x_tchw
    last = x_tchw[-1:] if mode == "replicate" else torch.zeros_like(x_tchw[-1:])
    return torch.cat([x_tchw, last.expand(missing, -1, -1, -1)])


class VideoModality(Modality):
    """Videos cut into ``tp x p x p`` blocks. Each token's features are laid out as
    ``(frame, ph, pw, C)`` frame-major, so its first ``p*p*C`` numbers are exactly the image
    modality's patch of the block's first frame: with the patch embedding's zero-initialised
    temporal weights a still video starts out embedded like its image."""

    name = "video"
    subspace = ("t", "x", "y")
    suffixes = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")
    noun = "clips"
    eval_metrics = ("psnr", "ssim", "lpips", "rfvd", "codebook", "zeroshot", "retrieval", "probe")
    prompt_template = "a video of a {}."

    def read(self, path: str) -> torch.Tensor:
        return load_video(path)

    def read_bytes(self, data: bytes, name: str) -> torch.Tensor:
        return video_from_bytes(data, name, os.path.splitext(name)[1])

    def example(self, spec: PatchSpec, generator: torch.Generator) -> torch.Tensor:
        """(T, 3, H, W) with T one frame more than a temporal patch."""
        p = spec.patch_size
        return torch.rand(spec.temporal_patch + 1, self.channels, 2 * p, 2 * p - 1, generator=generator) * 2 - 1

    def read_eval(self, url: str, request: EvalRequest) -> torch.Tensor:
        """The first ``request.max_frames`` frames of a clip, downscaled to ``request.max_side``."""
        return resize_within(load_video(url, max_frames=request.max_frames), max_side=request.max_side)

    def load_eval(self, data: str, request: EvalRequest) -> EvalData:
        found = super().load_eval(data, request)
        return EvalData(found.samples, found.skipped, {
            "max_side": request.max_side, "max_frames": request.max_frames,
            "psnr_ssim_lpips": "per frame, averaged over each clip's frames, then over clips"})

    def figure(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Up to 8 evenly spaced frames side by side: the original above, the reconstruction below."""
        idx = torch.linspace(0, target.shape[0] - 1, min(target.shape[0], 8)).round().long()
        return rearrange(torch.cat([target[idx], recon[idx]], dim=2), "t c h w -> c h (t w)")

    def write(self, sample: torch.Tensor, url: str) -> list[str]:
        """An H.264 .mp4 (any other suffix is refused: that is the one container written)."""
        if not url.lower().endswith(".mp4"):
            raise VideoError(f"{url}: videos are written as .mp4")
        save_video_url(sample, url)
        return [url]

    def __init__(self, config: Any) -> None:
        self.config = config

    @staticmethod
    def grid(frames: int, height: int, width: int, spec: PatchSpec) -> tuple[int, int, int]:
        p = spec.patch_size
        return math.ceil(frames / spec.temporal_patch), math.ceil(height / p), math.ceil(width / p)

    def num_tokens(self, shape: Sequence[int], spec: PatchSpec) -> int:
        """Tokens of one (T, C, H, W) video."""
        return math.prod(self.grid(shape[0], shape[-2], shape[-1], spec))

    def _fit(self, x: torch.Tensor, where: str, spec: PatchSpec) -> torch.Tensor:
        """The clip as it is tokenised: itself, or (size_policy = 'crop') its first whole
        temporal patches, centre-cropped to whole spatial patches."""
        check_video_tensor(x, where, spec.channels)
        if self.config.size_policy != "crop":
            return x
        t, tp = x.shape[0], spec.temporal_patch
        if t < tp:
            raise VideoError(f"{where}: {t} frame(s), shorter than one temporal patch ({tp} frames), so cutting to "
                             "whole patches leaves nothing; give it to the image modality, or use size_policy = 'pad'")
        return center_crop(x[: t // tp * tp], spec.patch_size, where, VideoError)

    def targets(self, samples: Sequence[torch.Tensor], spec: PatchSpec) -> list[torch.Tensor]:
        return [self._fit(x, f"sample {i}", spec) for i, x in enumerate(samples)]

    def patchify(self, samples: Sequence[torch.Tensor], spec: PatchSpec) -> Tokens:
        p, tp = spec.patch_size, spec.temporal_patch
        parts, meta = [], []
        for i, x in enumerate(samples):
            x = self._fit(x, f"sample {i}", spec)
            t, _, h, w = x.shape
            x = pad_frames(pad_spatial(x, p, self.config.pad_mode), tp, self.config.frame_pad)
            gt, gh, gw = self.grid(t, h, w, spec)
            patches = rearrange(x, "(gt ft) c (gh ph) (gw pw) -> (gt gh gw) (ft ph pw c)", ft=tp, ph=p, pw=p)
            # Same (gt, gh, gw) order as the rearrange above: token k sits at grid cell k.
            tt, rows, cols = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
            coords = torch.stack([tt, cols, rows, torch.zeros_like(tt)], dim=-1).reshape(-1, 4)
            parts.append(Sparse4D.single(patches, coords.to(x.device)))
            meta.append({"frames": t, "height": h, "width": w, "grid": (gt, gh, gw)})
        return Tokens(Sparse4D.cat(parts), meta)

    def unpatchify(self, patches: Sparse4D, meta: list[dict[str, Any]], spec: PatchSpec) -> list[torch.Tensor]:
        p = spec.patch_size
        out = []
        for sample, m in zip(patches.split(), meta):
            gt, gh, gw = m["grid"]
            x = rearrange(sample.features, "(gt gh gw) (ft ph pw c) -> (gt ft) c (gh ph) (gw pw)",
                          gt=gt, gh=gh, gw=gw, ph=p, pw=p, c=spec.channels)
            out.append(x[: m["frames"], :, : m["height"], : m["width"]])  # drop frame and pixel padding
        return out


    def save_reconstruction(self, recon: Sparse4D, meta: list[dict[str, Any]], spec: PatchSpec,
                            prefix: str) -> list[str]:
        """The decoded clip as an H.264 .mp4 and a PNG strip of its frames."""
        frames = self.unpatchify(recon, meta, spec)[0].clamp(-1, 1)
        save_video_url(frames, prefix + ".mp4")
        save_frame_strip(frames, prefix + "-frames.png")
        return [prefix + ".mp4", prefix + "-frames.png"]


def save_video_url(frames: torch.Tensor, url: str, fps: float = 25) -> None:
    """:func:`save_video` to any fsspec URL (PyAV writes a local file; it is then copied in one
    atomic write)."""
    import tempfile

    from atoken_core.io import atomic_write_bytes

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "video.mp4")
        save_video(frames, local, fps=fps)
        with open(local, "rb") as f:
            atomic_write_bytes(url, f.read())


def load_video(path: str, max_frames: int | None = None) -> torch.Tensor:
    """Decode a video file into (T, 3, H, W) float in [-1, 1]. Local paths are read directly;
    other fsspec URIs (s3://, memory://, ...) through a temporary local copy, since FFmpeg
    decodes files.

    Reads the first ``max_frames`` frames (all when None). Every failure (missing file, not a
    video, corrupt or truncated data, no decodable frame) is a :class:`VideoError` naming the file.
    """
    if "://" in path and not path.startswith("file://"):
        return _load_remote_video(path, max_frames)
    path = path.removeprefix("file://")
    import av

    if max_frames is not None and max_frames < 1:
        raise VideoError(f"{path}: max_frames must be >= 1, got {max_frames}")
    if not os.path.exists(path):
        raise VideoError(f"{path}: file not found")
    if os.path.isdir(path):
        raise VideoError(f"{path}: is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: file is empty (0 bytes)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            decoded = container.decode(video=0)
            frames = [f.to_ndarray(format="rgb24") for f in itertools.islice(decoded, max_frames)]
    except av.error.InvalidDataError:
        raise VideoError(f"{path}: not a video file FFmpeg can read (or truncated)") from None
    except (av.error.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: corrupt or unreadable video: {err}") from None
    if not frames:
        raise VideoError(f"{path}: no decodable video frames")
    arr = rearrange(np.stack(frames), "t h w c -> t c h w")
    return torch.from_numpy(arr).float() / 127.5 - 1.0


def _load_remote_video(url: str, max_frames: int | None) -> torch.Tensor:
    """FFmpeg decodes local files: copy a remote one (s3://, memory://, ...) to a temporary file."""
    from atoken_core.io import read_input

    return video_from_bytes(read_input(url, VideoError), url, os.path.splitext(url)[1], max_frames)


def video_from_bytes(data: bytes, name: str, suffix: str, max_frames: int | None = None) -> torch.Tensor:
    """An encoded video (``suffix`` like '.mp4') as (T, 3, H, W) in [-1, 1]. FFmpeg decodes files,
    so the bytes go through a temporary one; errors name ``name``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "video." + suffix.lstrip("."))
        with open(local, "wb") as f:
            f.write(data)
        try:
            return load_video(local, max_frames)
        except VideoError as err:
            raise VideoError(str(err).replace(local, name)) from None


def save_video(frames: torch.Tensor, path: str, fps: float = 25, crf: int = 18) -> None:
    """Write (T, 3, H, W) frames in [-1, 1] to a local H.264 mp4 (libx264, yuv420p).

    yuv420p stores colour at half resolution, so H and W must be even: odd sizes are padded by
    one replicated row/column, and the file is then one pixel larger than ``frames``.
    """
    import av

    check_video_tensor(frames, path, 3)
    x = pad_spatial(frames.detach().float().cpu(), 2, "replicate")
    arr = rearrange(((x.clamp(-1, 1) + 1) * 127.5).round().byte(), "t c h w -> t h w c").numpy()
    try:
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(10000))
            stream.width, stream.height = arr.shape[2], arr.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in arr:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed (B-)frames
    except (av.error.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: cannot write video: {err}") from None


def save_frame_strip(frames: torch.Tensor, path: str, max_frames: int = 8) -> None:
    """Save up to ``max_frames`` evenly spaced frames side by side as one image (format from
    the extension, e.g. PNG): a quick look at a video or its reconstruction."""
    check_video_tensor(frames, path, 3)
    if max_frames < 1:
        raise VideoError(f"{path}: max_frames must be >= 1, got {max_frames}")
    t = frames.shape[0]
    # Spacing >= 1 frame, so the rounded indices are distinct.
    idx = torch.linspace(0, t - 1, min(t, max_frames)).round().long()
    save_image(rearrange(frames[idx], "t c h w -> c h (t w)"), path)
