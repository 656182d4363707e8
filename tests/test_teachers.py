"""Teachers: the SigLIP2 teacher against transformers' own pipeline, the random stand-in's
determinism, and the errors a user sees for missing files or wrong names.

A tiny random ``Siglip2Model`` (and a FixRes ``SiglipModel``) saved with ``save_pretrained``,
a tiny real ``Siglip2Tokenizer`` and the real image processor stand in for SigLIP2-so400m: the
loading and preprocessing code paths are the same, only the sizes differ. The reference is
transformers' processor + ``get_image_features`` / ``get_text_features``, L2-normalised.
"""

from __future__ import annotations

import os
import string
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from transformers import (
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    Siglip2Processor,
    Siglip2Tokenizer,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

from atoken_core.interfaces import Teacher
from atoken_core.registry import RegistryError

TEXT_LEN = 16  # the tiny text tower's positions (SigLIP2: 64)
PATCH, MAX_PATCHES = 4, 16
TEXTS = ["a photo of a cat", "A CAT!", "two red cars in the rain, at night", ""]


def tiny_tokenizer() -> Siglip2Tokenizer:
    """A real Siglip2Tokenizer (Gemma-style BPE, lower-casing) over letters, digits and a few merges."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for piece in ["▁", *string.ascii_lowercase, *string.digits]:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("c", "a"), ("ca", "t"), ("▁", "r"), ("▁r", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return Siglip2Tokenizer(vocab=vocab, merges=merges)


def _text_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=TEXT_LEN)


def _randomise_logits(model: torch.nn.Module, seed: int) -> None:
    # transformers initialises logit_scale/bias to 0; random values make the checks on them meaningful
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.logit_scale.copy_(torch.rand(1, generator=g) + 1.0)
        model.logit_bias.copy_(-5 * torch.rand(1, generator=g))


def tiny_siglip2_dir(root: Path, *, seed: int = 0, processor: bool = True) -> Path:
    """save_pretrained of a tiny NaFlex Siglip2Model, its tokenizer and (optionally) image processor."""
    tokenizer = tiny_tokenizer()
    config = Siglip2Config(text_config=_text_config(len(tokenizer)),
                           vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=2, patch_size=PATCH, num_patches=MAX_PATCHES))
    torch.manual_seed(seed)
    model = Siglip2Model(config).eval()
    _randomise_logits(model, seed)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    if processor:
        Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES).save_pretrained(root)
    return root


def tiny_siglip_fixres_dir(root: Path) -> Path:
    """A FixRes SigLIP2 checkpoint has SigLIP's architecture (SiglipModel, square inputs)."""
    tokenizer = tiny_tokenizer()
    config = SiglipConfig(text_config=_text_config(len(tokenizer)),
                          vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, patch_size=PATCH, image_size=16))
    torch.manual_seed(1)
    model = SiglipModel(config).eval()
    _randomise_logits(model, 1)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root)
    return root


def build(spec: str, **options) -> Teacher:
    from atoken_losses.semantic import build_teacher

    return build_teacher(spec, options)


def images(shapes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in shapes]


def hf_reference(root: Path, model_cls, imgs: list[torch.Tensor], texts: list[str]):
    """transformers' own pipeline: the saved image processor (images given as [0, 1] floats) and
    Siglip2Processor's text defaults (padding to max_length, truncation) -> towers -> L2 norm."""
    from transformers import AutoImageProcessor

    model = model_cls.from_pretrained(root, local_files_only=True).eval()
    image_processor = AutoImageProcessor.from_pretrained(root, local_files_only=True)
    tokenizer = Siglip2Tokenizer.from_pretrained(root, local_files_only=True)
    with torch.no_grad():
        pixels = image_processor(images=[(x + 1) / 2 for x in imgs], do_rescale=False, return_tensors="pt")
        img = F.normalize(model.get_image_features(**pixels).pooler_output, dim=-1)
        tok = tokenizer(texts, **{**Siglip2Processor.text_kwargs, "max_length": TEXT_LEN}, return_tensors="pt")
        txt = F.normalize(model.get_text_features(**tok).pooler_output, dim=-1)
    return img, txt, model


# ----------------------------------------------------------------------------- SigLIP2 teacher
@pytest.mark.parametrize("shape", [(16, 16), (20, 33), (40, 12)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_siglip2_teacher_matches_transformers(tmp_path, shape):
    root = tiny_siglip2_dir(tmp_path)
    teacher = build(f"siglip2:{root}")
    imgs = images([shape, shape])
    ref_img, ref_txt, model = hf_reference(root, Siglip2Model, imgs, TEXTS)
    with torch.no_grad():
        ours_img = teacher.encode_image(torch.stack(imgs))
    torch.testing.assert_close(ours_img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.encode_text(TEXTS), ref_txt, atol=1e-5, rtol=1e-5)
    # alone, a short text is padded to max_length too (positions and the pooled last token depend on it)
    _, ref_short, _ = hf_reference(root, Siglip2Model, imgs[:1], TEXTS[:1])
    torch.testing.assert_close(teacher.encode_text(TEXTS[:1]), ref_short, atol=1e-5, rtol=1e-5)
    assert teacher.embed_dim == ours_img.shape[1] == 32
    assert teacher.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
    assert teacher.logit_bias == pytest.approx(float(model.logit_bias.detach()), rel=1e-6)
    assert teacher.logit_bias != 0.0


def test_siglip2_teacher_without_processor_file_uses_model_defaults(tmp_path):
    # No preprocessor_config.json: the patch grid comes from the vision config (num_patches).
    with_file = build(f"siglip2:{tiny_siglip2_dir(tmp_path / 'a')}")
    without = build(f"siglip2:{tiny_siglip2_dir(tmp_path / 'b', processor=False)}")
    x = torch.stack(images([(24, 36)]))
    with torch.no_grad():
        torch.testing.assert_close(without.encode_image(x), with_file.encode_image(x), atol=1e-6, rtol=1e-6)


def test_bfloat16_teacher_runs_close_to_float32(tmp_path):
    root = tiny_siglip2_dir(tmp_path)
    full, half = build(f"siglip2:{root}"), build(f"siglip2:{root}", dtype="bfloat16")
    x = torch.stack(images([(20, 24)]))
    with torch.no_grad():
        torch.testing.assert_close(half.encode_image(x), full.encode_image(x), atol=3e-2, rtol=0)
    torch.testing.assert_close(half.encode_text(TEXTS), full.encode_text(TEXTS), atol=3e-2, rtol=0)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_fixres_siglip_teacher_matches_transformers(tmp_path):
    root = tiny_siglip_fixres_dir(tmp_path)
    teacher = build(f"siglip2:{root}")
    imgs = images([(24, 40), (24, 40)])
    ref_img, ref_txt, _ = hf_reference(root, SiglipModel, imgs, TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(teacher.encode_image(torch.stack(imgs)), ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.encode_text(TEXTS), ref_txt, atol=1e-5, rtol=1e-5)


def test_teacher_is_frozen_but_passes_gradients_to_images(tmp_path):
    teacher = build(f"siglip2:{tiny_siglip2_dir(tmp_path)}")
    teacher.train()  # an owner switching to training mode must not change a teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.stack(images([(20, 20)])).requires_grad_()
    teacher.encode_image(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_siglip2_teacher_from_fsspec_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOKEN_CACHE", str(tmp_path / "cache"))
    root = tiny_siglip2_dir(tmp_path / "local", seed=3)
    fs = fsspec.filesystem("memory")
    for path in root.iterdir():
        fs.pipe(f"/teachers/tiny/{path.name}", path.read_bytes())
    remote = build("siglip2:memory://teachers/tiny")
    local = build(f"siglip2:{root}")
    x = torch.stack(images([(16, 28)]))
    with torch.no_grad():
        torch.testing.assert_close(remote.encode_image(x), local.encode_image(x), atol=0, rtol=0)
    torch.testing.assert_close(remote.encode_text(TEXTS), local.encode_text(TEXTS), atol=0, rtol=0)
    fs.rm("/teachers", recursive=True)


@pytest.mark.parametrize("remove, named", [
    ("config.json", "config.json"),
    ("model.safetensors", "model.safetensors"),
    ("tokenizer.json", "tokenizer.json"),
])
def test_missing_file_is_named_with_the_path(tmp_path, remove, named):
    root = tiny_siglip2_dir(tmp_path / "teacher")
    (root / remove).unlink()
    with pytest.raises(FileNotFoundError) as err:
        build(f"siglip2:{root}")
    assert str(root) in str(err.value) and named in str(err.value)


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-siglip2"
    with pytest.raises(FileNotFoundError, match="no such directory") as err:
        build(f"siglip2:{missing}")
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="memory://nowhere/siglip2"):
        build("siglip2:memory://nowhere/siglip2")


def test_vision_only_model_is_refused(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, patch_size=PATCH,
                                           num_patches=MAX_PATCHES)).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="full image \\+ text model"):
        build(f"siglip2:{tmp_path}")


# ----------------------------------------------------------------------------- random teacher
def test_random_teacher_is_deterministic_and_normalised():
    from atoken_teachers import RandomTeacherConfig
    from atoken_teachers.random_teacher import RandomTeacher

    a, b = RandomTeacher(RandomTeacherConfig(embed_dim=24)), RandomTeacher(RandomTeacherConfig(embed_dim=24))
    other = RandomTeacher(RandomTeacherConfig(embed_dim=24, seed=1))
    x = torch.stack(images([(20, 28), (20, 28)]))
    with torch.no_grad():
        ia, ib, io = a.encode_image(x), b.encode_image(x), other.encode_image(x)
    ta, tb, to = a.encode_text(TEXTS), b.encode_text(TEXTS), other.encode_text(TEXTS)
    torch.testing.assert_close(ia, ib, atol=0, rtol=0)
    torch.testing.assert_close(ta, tb, atol=0, rtol=0)
    assert not torch.allclose(ia, io) and not torch.allclose(ta, to)
    for emb in (ia, ta):
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb)))
    assert ia.shape == (2, 24) and ta.shape == (len(TEXTS), 24)
    # bag of lower-cased words: case and punctuation do not matter, different words do
    torch.testing.assert_close(a.encode_text(["A CAT!"]), a.encode_text(["a cat"]))
    assert not torch.allclose(a.encode_text(["a cat"]), a.encode_text(["a dog"]))


def test_random_teacher_words_do_not_depend_on_the_process():
    # Word vectors are seeded by CRC32, not Python's salted hash: another process, another
    # PYTHONHASHSEED, the same embedding.
    code = (
        "from atoken_teachers import RandomTeacherConfig\n"
        "from atoken_teachers.random_teacher import RandomTeacher\n"
        "print(RandomTeacher(RandomTeacherConfig(embed_dim=8)).encode_text(['a photo of a cat']).tolist())\n"
    )
    outs = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                           text=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1


# ----------------------------------------------------------------------------- registry
def test_teachers_are_registered_with_their_plugin():
    from atoken_core.plugin_manager import get_registries

    registries = get_registries()
    assert {"siglip2", "random"} <= set(registries["teacher"])
    assert registries["teacher"].plugin_of("random") in {"teachers", "atoken_teachers"}


def test_teacher_spec_errors():
    from atoken_losses import resolve_teacher

    with pytest.raises(RegistryError, match=r"unknown teacher 'siglip' \(did you mean 'siglip2'\?\)"):
        resolve_teacher("siglip")
    with pytest.raises(ValueError, match="takes no path"):
        resolve_teacher("random:/some/dir")
    component, config = resolve_teacher("siglip2:/models/siglip2", {"max_text_length": 32})
    assert component.name == "siglip2" and config.path == "/models/siglip2" and config.max_text_length == 32


def test_teachers_are_shared_between_losses():
    assert build("random", embed_dim=8) is build("random", embed_dim=8)
    assert build("random", embed_dim=8) is not build("random", embed_dim=8, seed=1)
