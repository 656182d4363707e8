"""Semantic losses, each against an independent reference: scipy's entropy and torch's KLDivLoss
for the distillation KL, transformers' own SigLIP loss (``return_loss=True``) for the sigmoid
loss, transformers' image tower for the CLIP perceptual term; plus the loss modules' wiring
(which fields they read, where gradients go, what they own)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy
from transformers import AutoImageProcessor, Siglip2Model, Siglip2Processor, Siglip2Tokenizer, SiglipModel

from atoken_core.config import ConfigError
from atoken_core.interfaces import BottleneckOutput, LossInputs
from atoken_losses import ClipPerceptualConfig, DistillConfig, SigmoidConfig
from atoken_losses.semantic import (
    ClipPerceptualLoss,
    DistillLoss,
    SigmoidLoss,
    build_teacher,
    distillation_kl,
    sigmoid_loss,
)
from test_teachers import TEXT_LEN, images, tiny_siglip2_dir, tiny_siglip_fixres_dir

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
RANDOM = {"teacher": "random", "teacher_config": {"embed_dim": DIM}}


def loss_inputs(target, recon=None, **kw) -> LossInputs:
    recon = target.clone() if recon is None else recon
    return LossInputs("image", target, recon, BottleneckOutput(latent=torch.zeros(1, 1)), **kw)


def softmax_np(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- distillation KL
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_distillation_kl_matches_scipy_and_torch(tau):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    ours = float(distillation_kl(student, teacher, tau))
    p_t, p_s = softmax_np(teacher.numpy() / tau), softmax_np(student.numpy() / tau)
    # scipy.stats.entropy(p, q) = KL(p || q): the teacher's distribution is p
    assert ours == pytest.approx(np.mean([entropy(pt, ps) for pt, ps in zip(p_t, p_s)]), rel=1e-6)
    ref = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / tau, -1), F.softmax(teacher / tau, -1))
    assert ours == pytest.approx(float(ref), rel=1e-6)
    # the direction matters: KL(student || teacher) is a different number for these logits
    reverse = np.mean([entropy(ps, pt) for pt, ps in zip(p_t, p_s)])
    assert abs(ours - reverse) > 1e-3


def test_distillation_kl_is_zero_only_at_the_teacher_and_shift_invariant():
    teacher = torch.randn(3, 6)
    assert float(distillation_kl(teacher + 5.0, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_kl(teacher.flip(-1), teacher, 2.0)) > 1e-3


# ----------------------------------------------------------------------------- sigmoid loss
@pytest.mark.parametrize("model_cls, make_dir", [(Siglip2Model, tiny_siglip2_dir), (SiglipModel, tiny_siglip_fixres_dir)],
                         ids=["siglip2", "siglip"])
def test_sigmoid_loss_matches_transformers(tmp_path, model_cls, make_dir):
    root = make_dir(tmp_path)
    model = model_cls.from_pretrained(root, local_files_only=True).eval()
    tokenizer = Siglip2Tokenizer.from_pretrained(root, local_files_only=True)
    pixels = AutoImageProcessor.from_pretrained(root, local_files_only=True)(
        images=[(x + 1) / 2 for x in images([(16, 20)] * 4, seed=5)], do_rescale=False, return_tensors="pt")
    texts = ["a cat", "a red car", "two cats", "rain"]
    tokens = tokenizer(texts, **{**Siglip2Processor.text_kwargs, "max_length": TEXT_LEN}, return_tensors="pt")
    with torch.no_grad():
        out = model(**pixels, **tokens, return_loss=True)
        # unnormalised tower outputs: sigmoid_loss normalises them itself
        ours = sigmoid_loss(out.vision_model_output.pooler_output, out.text_model_output.pooler_output,
                            model.logit_scale, model.logit_bias)
    assert float(model.logit_bias.detach()) != 0.0
    torch.testing.assert_close(ours, out.loss.float(), atol=1e-5, rtol=1e-5)


def test_sigmoid_loss_matches_an_explicit_double_sum():
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    log_t, b = math.log(10.0), -10.0
    x, y = img.numpy(), txt.numpy()
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (math.exp(log_t) * float(x[i] @ y[j]) + b)))
    assert float(sigmoid_loss(img, txt, log_t, b)) == pytest.approx(total / 4, rel=1e-6)


def test_sigmoid_loss_split_over_ranks_averages_to_the_global_batch():
    """Data parallel: each of 2 "ranks" holds a strided half of the images (as train_batch_part
    slices them) and the texts of all ranks in rank order, its own starting at ``offset``; the
    mean of the ranks' values and of their gradients is the global batch's."""
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    log_t = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    full = sigmoid_loss(img, txt, log_t, b)
    full_grads = torch.autograd.grad(full, (log_t, b))
    gathered = torch.cat([txt[0::2], txt[1::2]])
    parts = [sigmoid_loss(img[r::2], gathered, log_t, b, offset=3 * r) for r in (0, 1)]
    mean = (parts[0] + parts[1]) / 2
    torch.testing.assert_close(mean, full)
    for got, want in zip(torch.autograd.grad(mean, (log_t, b)), full_grads):
        torch.testing.assert_close(got, want)
    # a rank alone with its own captions (no gathering) is a different loss
    alone = (sigmoid_loss(img[0::2], txt[0::2], log_t, b) + sigmoid_loss(img[1::2], txt[1::2], log_t, b)) / 2
    assert abs(alone.item() - full.item()) > 1e-3


def test_sigmoid_module_owns_t_and_b_and_reads_semantic_and_texts():
    loss = SigmoidLoss(SigmoidConfig(**RANDOM))
    assert dict(loss.named_parameters()).keys() == {"log_t", "bias"}
    assert set(loss.state_dict()) == {"log_t", "bias"}  # the teacher is not part of the loss's state
    assert loss.log_t.item() == pytest.approx(math.log(10.0)) and loss.bias.item() == -10.0
    texts = ["a cat", "a dog", "a car"]
    semantic = torch.randn(3, DIM, requires_grad=True)
    out = loss(loss_inputs(torch.zeros(3, 3, 8, 8), semantic=semantic, texts=texts))["sigmoid"]
    teacher = build_teacher("random", {"embed_dim": DIM})
    torch.testing.assert_close(out, sigmoid_loss(semantic, teacher.encode_text(texts), math.log(10.0), -10.0))
    out.backward()
    assert semantic.grad.abs().sum() > 0 and loss.log_t.grad is not None and loss.bias.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_sigmoid_module_errors_name_the_field():
    loss = SigmoidLoss(SigmoidConfig(**RANDOM))
    target = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"LossInputs\.semantic"):
        loss(loss_inputs(target, texts=["a", "b"]))
    with pytest.raises(ValueError, match=r"LossInputs\.texts"):
        loss(loss_inputs(target, semantic=torch.randn(2, DIM)))
    with pytest.raises(ValueError, match="one caption per sample"):
        loss(loss_inputs(target, semantic=torch.randn(2, DIM), texts=["a"]))
    with pytest.raises(ValueError, match="embeds in 16 dimensions"):
        loss(loss_inputs(target, semantic=torch.randn(2, DIM + 1), texts=["a", "b"]))


# ----------------------------------------------------------------------------- distill module
def test_distill_matches_transformers_logits(tmp_path):
    """The whole loss against a reference built from transformers alone: the teacher's logits are
    Siglip2Model's logits_per_image for the prompt set, the student's use its text embeddings."""
    root = tiny_siglip2_dir(tmp_path)
    prompts = ["a cat", "a red car", "two cats", "rain", "a photo"]
    loss = DistillLoss(DistillConfig(teacher=f"siglip2:{root}", prompts=prompts))
    imgs = images([(20, 24)] * 3, seed=7)
    semantic = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    ours = float(loss(loss_inputs(torch.stack(imgs), semantic=semantic))["distill"])

    model = Siglip2Model.from_pretrained(root, local_files_only=True).eval()
    tokens = Siglip2Tokenizer.from_pretrained(root, local_files_only=True)(
        prompts, **{**Siglip2Processor.text_kwargs, "max_length": TEXT_LEN}, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(root, local_files_only=True)(
        images=[(x + 1) / 2 for x in imgs], do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        out = model(**pixels, **tokens)
        t, b = model.logit_scale.exp(), model.logit_bias
        s_teacher = out.logits_per_image.double().numpy()
        s_student = (t * F.normalize(semantic, dim=-1) @ out.text_embeds.T + b).double().numpy()
    ref = np.mean([entropy(pt, ps) for pt, ps in zip(softmax_np(s_teacher / 2.0), softmax_np(s_student / 2.0))])
    assert ours == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_distill_is_zero_when_the_student_agrees_and_trains_only_the_student():
    loss = DistillLoss(DistillConfig(**RANDOM))
    target = torch.stack(images([(16, 16)] * 2, seed=3))
    teacher = build_teacher("random", {"embed_dim": DIM})
    with torch.no_grad():
        agree = 3.0 * teacher.encode_image(target)  # any positive scale: the loss normalises
    texts = ["a cat", "a dog", "a red car"]
    assert float(loss(loss_inputs(target, semantic=agree, texts=texts))["distill"]) == pytest.approx(0, abs=1e-6)
    semantic = torch.randn(2, DIM, requires_grad=True)
    out = loss(loss_inputs(target, semantic=semantic, texts=texts))["distill"]
    assert out.item() > 1e-4
    out.backward()
    assert semantic.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    # a fixed prompt set in the config gives the same value as the same texts per step
    fixed = DistillLoss(DistillConfig(**RANDOM, prompts=texts))
    torch.testing.assert_close(fixed(loss_inputs(target, semantic=semantic))["distill"], out)


def test_distill_errors_name_the_field():
    loss = DistillLoss(DistillConfig(**RANDOM))
    target = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"LossInputs\.semantic"):
        loss(loss_inputs(target, texts=["a"]))
    with pytest.raises(ValueError, match=r"LossInputs\.texts.*prompts"):
        loss(loss_inputs(target, semantic=torch.randn(2, DIM)))
    with pytest.raises(ValueError, match=r"images \(B, C, H, W\)"):
        loss(loss_inputs(torch.zeros(2, 3, 2, 8, 8), semantic=torch.randn(2, DIM), texts=["a"]))


# ----------------------------------------------------------------------------- CLIP perceptual
def test_clip_perceptual_matches_transformers_and_trains_only_the_recon(tmp_path):
    root = tiny_siglip2_dir(tmp_path)
    loss = ClipPerceptualLoss(ClipPerceptualConfig(teacher=f"siglip2:{root}"))
    target = torch.stack(images([(20, 28)] * 2, seed=4))
    recon = (target + 0.3 * torch.randn_like(target)).clamp(-1, 1).requires_grad_()
    out = loss(loss_inputs(target, recon))["clip_perceptual"]

    model = Siglip2Model.from_pretrained(root, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(root, local_files_only=True)
    with torch.no_grad():
        emb = [model.get_image_features(**processor(images=[(x + 1) / 2 for x in batch], do_rescale=False,
                                                    return_tensors="pt")).pooler_output
               for batch in (target, recon.detach())]
    ref = (1 - F.cosine_similarity(emb[0], emb[1], dim=-1)).mean()
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-4)
    assert out.item() > 0
    out.backward()
    assert recon.grad.abs().sum() > 0 and target.grad is None
    same = loss(loss_inputs(target, target.clone()))["clip_perceptual"]
    assert float(same) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_on_cuda_match_cpu(tmp_path):
    root = tiny_siglip2_dir(tmp_path)
    teacher = {"teacher": f"siglip2:{root}"}
    losses = [DistillLoss(DistillConfig(**teacher)), SigmoidLoss(SigmoidConfig(**teacher)),
              ClipPerceptualLoss(ClipPerceptualConfig(**teacher))]
    target = torch.stack(images([(20, 24)] * 2, seed=6))
    recon = (target + 0.2 * torch.randn_like(target)).clamp(-1, 1)
    semantic, texts = torch.randn(2, 32), ["a cat", "a red car"]

    def run(device: str) -> dict[str, float]:
        inputs = loss_inputs(target.to(device), recon.to(device), semantic=semantic.to(device), texts=texts)
        return {k: float(v) for loss in losses for k, v in loss.to(device)(inputs).items()}

    cpu, cuda = run("cpu"), run("cuda")
    assert cpu.keys() == cuda.keys() == {"distill", "sigmoid", "clip_perceptual"}
    for key in cpu:
        assert cuda[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-4), key


# ----------------------------------------------------------------------------- with the real model
def test_semantic_losses_train_the_model_semantic_head(registries):
    """AToken's semantic_embedding feeds the losses; gradients reach W_s and the pooling head."""
    from atoken_core.flavors import FLAVORS
    from atoken_modalities.image import ImageConfig
    from atoken_modalities.image_impl import ImageModality
    from conftest import make_model

    model = make_model(registries, flavor="test-siglip")
    width = FLAVORS["test-siglip"].text_dim or FLAVORS["test-siglip"].width
    imgs = images([(16, 16), (16, 16)], seed=9)
    tokens = ImageModality(ImageConfig()).patchify(imgs, model.spec).patches
    semantic = model.semantic_embedding(model.encode(tokens), tokens)
    inputs = loss_inputs(torch.stack(imgs), semantic=semantic, texts=["a cat", "a dog"])
    teacher = {"teacher": "random", "teacher_config": {"embed_dim": width}}
    total = sum(v for cls, cfg in ((DistillLoss, DistillConfig), (SigmoidLoss, SigmoidConfig))
                for v in cls(cfg(**teacher))(inputs).values())
    total.backward()
    assert model.semantic_proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pool_head.parameters())


# ----------------------------------------------------------------------------- recipes
def test_recipe_with_semantic_losses_validates_and_names_a_bad_teacher(tmp_path):
    from atoken_core.plugin_manager import get_registries
    from atoken_core.recipe import load_recipe

    regs = get_registries()
    base = (ROOT / "recipes" / "tiny.toml").read_text()
    block = textwrap.dedent("""
        [[loss]]
        kind = "distill"
        teacher = "{teacher}"
        teacher_config = {{embed_dim = 192}}
        modalities = ["image"]
        """)
    good = tmp_path / "good.toml"
    good.write_text(base + block.format(teacher="random"))
    recipe = load_recipe(str(good), regs)
    assert recipe.loss[-1].config.teacher == "random" and recipe.loss[-1].config.tau == 2.0
    bad = tmp_path / "bad.toml"
    bad.write_text(base + block.format(teacher="randm"))
    with pytest.raises(ConfigError, match=r"loss\[\d+\]\.teacher: .*did you mean 'random'"):
        load_recipe(str(bad), regs)
