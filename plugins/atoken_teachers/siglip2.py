"""The frozen SigLIP2 teacher: transformers' image and text towers from a local directory.

The directory is what ``save_pretrained`` writes for a full model (``config.json``,
``model.safetensors``, the tokenizer files, optionally ``preprocessor_config.json``); it is
loaded with ``local_files_only=True`` and ``use_safetensors=True``, so nothing is fetched from
the Hub and no pickle is read. A remote fsspec URI is copied once into the atoken cache.

Both SigLIP2 variants load through ``AutoModel``: NaFlex (``Siglip2Model``, native aspect
ratio) and FixRes (``SiglipModel`` architecture, square inputs).

Images are prepared as SigLIP2's image processor does, in torch so that gradients reach them:

- NaFlex (``Siglip2ImageProcessor``): resize, keeping the aspect ratio, to the largest size
  whose sides are multiples of the patch size with at most ``max_num_patches`` patches
  (transformers' own ``get_image_size_for_max_num_patches``); cut into patches flattened
  channel-last ``(ph, pw, C)``; pad to ``max_num_patches`` with a mask and the patch grid
  in ``spatial_shapes``.
- FixRes (``SiglipImageProcessor``): resize to the processor's square size.

Resizing is ``F.interpolate`` with the processor's filter (bilinear for SigLIP2), antialiased,
``align_corners=False`` -- what torchvision's resize does for tensors. Normalisation is
``(x01 - mean) / std``; SigLIP2 uses mean = std = 0.5, i.e. ``2 * x01 - 1``, which is exactly
our [-1, 1] convention, so our images arrive already normalised. (The per-channel affine map
commutes with resizing, whose weights sum to one, so its order does not matter.)

Texts are tokenised as ``Siglip2Processor`` does: ``padding="max_length"``, ``truncation=True``,
``max_length=64`` (the text tower's position count) -- SigLIP2 was trained on fixed-length
texts and pools the last position, so the padding is part of the embedding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import einops
import fsspec
import torch
import torch.nn.functional as F

from atoken_core.errors import UserError
from atoken_core.interfaces import Teacher
from atoken_core.io import cache_dir

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "spiece.model")
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes that processors store -> F.interpolate modes
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherFilesError(UserError, FileNotFoundError):
    """A teacher directory is missing or lacks files; the message names the path."""


def local_copy(path: str) -> Path:
    """``path`` itself when local; otherwise a copy of the remote directory in the atoken cache
    (made once; a ``.complete`` marker says the copy finished)."""
    fs, fpath = fsspec.core.url_to_fs(path)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return Path(fpath)
    if not fs.isdir(fpath):
        raise TeacherFilesError(f"siglip2 teacher: {path}: no such directory")
    dest = cache_dir() / "teachers" / hashlib.sha256(path.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():
        dest.mkdir(parents=True, exist_ok=True)
        for remote in fs.find(fpath):
            target = dest / remote[len(fpath.rstrip("/")) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
        (dest / ".complete").touch()
    return dest


def check_files(local: Path, path: str) -> None:
    """Raise :class:`TeacherFilesError` naming ``path`` and every missing file."""
    if not local.is_dir():
        raise TeacherFilesError(f"siglip2 teacher: {path}: no such directory")
    missing = []
    if not (local / "config.json").is_file():
        missing.append("config.json")
    if not any((local / name).is_file() for name in _WEIGHTS):
        missing.append("model.safetensors")
    if not any((local / name).is_file() for name in _TOKENIZER):
        missing.append("tokenizer.json (or tokenizer.model / spiece.model)")
    if missing:
        raise TeacherFilesError(
            f"siglip2 teacher: {path} lacks {', '.join(missing)}; expected the directory that "
            "Siglip2Model.save_pretrained and its tokenizer's save_pretrained write (nothing is downloaded)"
        )


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput from get_*_features, 4.x returned the tensor itself
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class SigLIP2Teacher(Teacher):
    def __init__(self, config) -> None:
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise ImportError("the siglip2 teacher needs transformers>=5 (pip install 'transformers>=5')") from err
        local = local_copy(config.path)
        check_files(local, config.path)
        self.source = config.path
        model = AutoModel.from_pretrained(local, local_files_only=True, use_safetensors=True,
                                          dtype=_DTYPES[config.dtype])
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ValueError(f"siglip2 teacher: {config.path} holds a {type(model).__name__}; the teacher needs "
                             "a full image + text model (Siglip2Model or SiglipModel)")
        self.model = model
        self.tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
        text_config, vision_config = model.config.text_config, model.config.vision_config
        positions = text_config.max_position_embeddings
        self.max_text_length = config.max_text_length or positions
        if self.max_text_length > positions:
            raise ValueError(f"siglip2 teacher: max_text_length {self.max_text_length} exceeds the text tower's "
                             f"{positions} positions ({config.path})")
        self.embed_dim = vision_config.hidden_size
        text_dim = getattr(text_config, "projection_size", None) or text_config.hidden_size
        if text_dim != self.embed_dim:
            raise ValueError(f"siglip2 teacher: {config.path}: text embeddings have {text_dim} dimensions, image "
                             f"embeddings {self.embed_dim}; they must match")
        self.naflex = model.config.model_type == "siglip2"
        self._image_settings(local, vision_config)
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        self.logit_bias = float(model.logit_bias.detach().float())
        self.freeze()

    def _image_settings(self, local: Path, vision_config: Any) -> None:
        """Read the image processor's settings (its file, or its defaults for this model)."""
        from transformers import AutoImageProcessor, SiglipImageProcessor, Siglip2ImageProcessor

        if (local / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(local, local_files_only=True)
        elif self.naflex:
            processor = Siglip2ImageProcessor(patch_size=vision_config.patch_size,
                                              max_num_patches=vision_config.num_patches)
        else:
            size = vision_config.image_size
            processor = SiglipImageProcessor(size={"height": size, "width": size})
        resample = int(processor.resample)
        if resample not in _RESAMPLE:
            raise ValueError(f"siglip2 teacher: {self.source}: image processor resample={resample} is not supported "
                             f"(only {', '.join(f'{k} ({v})' for k, v in _RESAMPLE.items())})")
        self.resample = _RESAMPLE[resample]
        channels = len(processor.image_mean)
        self.register_buffer("image_mean", torch.tensor(processor.image_mean).view(channels, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(processor.image_std).view(channels, 1, 1), persistent=False)
        self.do_normalize = bool(processor.do_normalize)
        if self.naflex:
            self.patch_size, self.max_num_patches = int(processor.patch_size), int(processor.max_num_patches)
        else:
            self.image_size = (int(processor.size["height"]), int(processor.size["width"]))

    def _resize(self, x_bchw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x_bchw.shape[-2:]) == size:
            return x_bchw
        return F.interpolate(x_bchw, size=size, mode=self.resample, align_corners=False, antialias=True)

    def _normalise(self, x_bchw: torch.Tensor) -> torch.Tensor:
        x01 = (x_bchw + 1) / 2
        return (x01 - self.image_mean) / self.image_std if self.do_normalize else x01

    def encode_image(self, images_bchw: torch.Tensor) -> torch.Tensor:
        # preprocessing in float32 whatever the teacher's dtype; the towers get their own dtype
        x = images_bchw.to(self.image_mean.device, torch.float32)
        dtype = self.model.dtype
        if not self.naflex:
            pixels = self._normalise(self._resize(x, self.image_size)).to(dtype)
            return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

        b, p, n = x.shape[0], self.patch_size, self.max_num_patches
        h, w = get_image_size_for_max_num_patches(x.shape[-2], x.shape[-1], p, n)
        x = self._normalise(self._resize(x, (h, w)))
        patches_blf = einops.rearrange(x, "b c (gh ph) (gw pw) -> b (gh gw) (ph pw c)", ph=p, pw=p)
        count = patches_blf.shape[1]
        patches_blf = F.pad(patches_blf, (0, 0, 0, n - count))
        mask_bl = torch.zeros(b, n, dtype=torch.int32, device=x.device)
        mask_bl[:, :count] = 1
        shapes_b2 = torch.tensor([[h // p, w // p]] * b, device=x.device)
        out = self.model.get_image_features(pixel_values=patches_blf.to(dtype), pixel_attention_mask=mask_bl,
                                            spatial_shapes=shapes_b2)
        return F.normalize(_pooled(out).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                max_length=self.max_text_length, return_tensors="pt")
        device = self.image_mean.device
        # exactly what Siglip2Processor hands the model: input ids and, when the tokenizer makes one, the mask
        inputs = {k: tokens[k].to(device) for k in ("input_ids", "attention_mask") if k in tokens}
        return F.normalize(_pooled(self.model.get_text_features(**inputs)).float(), dim=-1)
