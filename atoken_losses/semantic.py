"""Semantic losses against a frozen image-text teacher (SigLIP2 in the paper).

- ``distill`` (images): ``KL(softmax(s_teacher / tau) || softmax(s_student / tau))`` where the
  logits ``s = t * cos(image, text) + b`` compare an image embedding with the teacher's text
  embeddings of a prompt set: the student's is ``W_s`` of the pooled encoder features, the
  teacher's is the teacher's own image embedding of the same input.
- ``sigmoid`` (video, 3D; any modality with captions): SigLIP's pairwise sigmoid loss between
  the student's embeddings and the teacher's embeddings of the samples' captions, with a
  learnable temperature and bias owned by the loss. Under torchrun each rank's images are
  compared with the captions of the whole global batch (gathered), as in one process.
- ``clip_perceptual`` (images, part of L_rec): ``1 - cos`` between the teacher's image
  embeddings of the input and of the reconstruction; gradients reach the reconstruction only.

What each loss reads from :class:`~atoken_core.interfaces.LossInputs` (a missing field is an
error naming it):

- ``distill``: ``semantic`` (B, D), ``target`` (B, C, H, W), and ``texts`` (the prompt set)
  unless the loss's config lists ``prompts``;
- ``sigmoid``: ``semantic`` (B, D) and ``texts`` (B captions, caption i describes sample i);
- ``clip_perceptual``: ``target`` and ``recon`` (B, C, H, W).

Teachers are built through the ``teacher`` registry and shared (one per spec and settings per
process), held outside the loss's module tree: a loss's ``parameters()`` and ``state_dict()``
hold only its own learnable values (``sigmoid``'s ``log_t`` and ``bias``), never the teacher.
The teacher follows the inputs' device on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atoken_core.distributed import gather_rows
from atoken_core.interfaces import Loss, LossInputs, Teacher
from atoken_core.teachers import build_teacher  # noqa: F401  (re-exported for tests and plugins)

# ----------------------------------------------------------------------------- pure functions
def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` with ``p = softmax(logits / tau)`` over the last axis, summed
    over it and averaged over the rest (per-sample KL, batch mean). Logits (B, N). The teacher's
    distribution is the reference: the student is pushed to cover every text the teacher finds likely."""
    log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    kl_b = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return kl_b.mean()


def sigmoid_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, log_t: torch.Tensor | float,
                 b: torch.Tensor | float, offset: int = 0) -> torch.Tensor:
    """SigLIP's loss (Zhai et al. 2023): pair (i, j) is positive iff i == j;
    ``-1/B * sum_ij log sigmoid(z_ij * (exp(log_t) * <x_i, y_j> + b))`` with z = +1 on the diagonal,
    -1 elsewhere. Embeddings (B, D) are L2-normalised here.

    Data parallel: ``txt_emb`` (N, D) may hold the texts of the whole global batch (N >= B), image
    i's own text being row ``offset + i``; the sum runs over the B local images and all N texts and
    is still divided by B, so the mean of the ranks' values is the global batch's loss (and the
    mean of their gradients its gradient)."""
    img_bd = F.normalize(img_emb.float(), dim=-1)
    txt_nd = F.normalize(txt_emb.float(), dim=-1)
    t = torch.as_tensor(log_t, dtype=torch.float32, device=img_bd.device).exp()
    logits_bn = t * img_bd @ txt_nd.T + torch.as_tensor(b, dtype=torch.float32, device=img_bd.device)
    n_b = logits_bn.shape[0]
    labels_bn = torch.full(logits_bn.shape, -1.0, device=logits_bn.device)
    labels_bn[:, offset:offset + n_b] = 2 * torch.eye(n_b, device=logits_bn.device) - 1
    return -F.logsigmoid(labels_bn * logits_bn).sum() / n_b


# ----------------------------------------------------------------------------- helpers
def _require(inputs: LossInputs, field: str, loss: str, what: str) -> Any:
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"loss {loss!r} needs LossInputs.{field} ({what}); it is None")
    return value


def _require_images(inputs: LossInputs, loss: str) -> None:
    for field in ("target", "recon"):
        x = getattr(inputs, field)
        if x.ndim != 4:
            raise ValueError(f"loss {loss!r} compares images (B, C, H, W); LossInputs.{field} of modality "
                             f"{inputs.modality!r} has shape {tuple(x.shape)} (limit the loss to images with "
                             "modalities = [\"image\"])")


_SEMANTIC = "the student's (B, D) embedding from AToken.semantic_embedding"


def _student(semantic: torch.Tensor, loss: str, teacher: Teacher) -> torch.Tensor:
    """The student's embeddings, checked against the teacher's size, L2-normalised in float32."""
    if semantic.ndim != 2 or semantic.shape[1] != teacher.embed_dim:
        raise ValueError(f"loss {loss!r}: LossInputs.semantic has shape {tuple(semantic.shape)}, the teacher embeds "
                         f"in {teacher.embed_dim} dimensions (set the flavour's text_dim, or the random teacher's "
                         "teacher_config.embed_dim, to match)")
    return F.normalize(semantic.float(), dim=-1)


class _TeacherLoss(Loss):
    """Holds a shared teacher outside the module tree (see the module docstring)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        # object.__setattr__ keeps the teacher out of parameters(), state_dict() and .to()
        object.__setattr__(self, "_teacher", build_teacher(config.teacher, config.teacher_config))

    def teacher_on(self, device: torch.device) -> Teacher:
        return self._teacher.to(device)

    def teacher_image(self, inputs: LossInputs) -> torch.Tensor:
        """The teacher's embedding of the target images, computed once per step and teacher."""
        teacher = self.teacher_on(inputs.target.device)
        key = f"teacher_image:{id(teacher)}:target"
        if key not in inputs.cache:
            with torch.no_grad():
                inputs.cache[key] = teacher.encode_image(inputs.target)
        return inputs.cache[key]


# ----------------------------------------------------------------------------- losses
class DistillLoss(_TeacherLoss):
    """Image distillation (reads ``semantic``, ``target``, and ``texts`` when the config has no
    ``prompts``). Returns ``{"distill": ...}``."""

    needs_semantic = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.tau = config.tau
        self.prompts = list(config.prompts)
        self.logit_scale = config.logit_scale
        self._prompt_emb: torch.Tensor | None = None  # the fixed prompt set's text embeddings, made once

    def text_embeddings(self, inputs: LossInputs, device: torch.device) -> torch.Tensor:
        teacher = self.teacher_on(device)
        if self.prompts:
            if self._prompt_emb is None or self._prompt_emb.device != device:
                self._prompt_emb = teacher.encode_text(self.prompts).to(device)
            return self._prompt_emb
        texts = _require(inputs, "texts", "distill", "the prompt set; or give the loss a prompts list")
        if not len(texts):
            raise ValueError("loss 'distill' needs at least one text in LossInputs.texts (or a prompts list)")
        return teacher.encode_text(texts).to(device)

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        _require_images(inputs, "distill")
        semantic = _require(inputs, "semantic", "distill", _SEMANTIC)
        teacher = self.teacher_on(semantic.device)
        student_bd = _student(semantic, "distill", teacher)
        if student_bd.shape[0] != inputs.target.shape[0]:
            raise ValueError(f"loss 'distill': {student_bd.shape[0]} semantic embeddings for "
                             f"{inputs.target.shape[0]} target images")
        text_nd = self.text_embeddings(inputs, student_bd.device).float()
        teacher_bd = self.teacher_image(inputs).float().to(student_bd.device)
        scale = teacher.logit_scale if self.logit_scale is None else self.logit_scale
        # the bias shifts every logit of a row equally, so it cancels in the softmax; kept so s are SigLIP's logits
        s_student = scale * student_bd @ text_nd.T + teacher.logit_bias
        s_teacher = scale * teacher_bd @ text_nd.T + teacher.logit_bias
        return {"distill": distillation_kl(s_student, s_teacher, self.tau)}


class SigmoidLoss(_TeacherLoss):
    """SigLIP's sigmoid loss (reads ``semantic`` and ``texts``: caption i describes sample i).
    ``log_t`` and ``bias`` are learnable parameters of this module. Returns ``{"sigmoid": ...}``."""

    needs_semantic = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.log_t = nn.Parameter(torch.tensor(float(config.init_log_t)))
        self.bias = nn.Parameter(torch.tensor(float(config.init_bias)))

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        semantic = _require(inputs, "semantic", "sigmoid", _SEMANTIC)
        teacher = self.teacher_on(semantic.device)
        student_bd = _student(semantic, "sigmoid", teacher)
        texts: Sequence[str] = _require(inputs, "texts", "sigmoid", "one caption per sample")
        if len(texts) != student_bd.shape[0]:
            raise ValueError(f"loss 'sigmoid': {len(texts)} texts for {student_bd.shape[0]} samples; "
                             "LossInputs.texts needs one caption per sample")
        text_bd = teacher.encode_text(texts).to(student_bd.device)
        # under torchrun every local image is also a negative of the other ranks' captions, as in
        # one process over the global batch
        text_nd, offset = gather_rows(text_bd)
        return {"sigmoid": sigmoid_loss(student_bd, text_nd, self.log_t, self.bias, offset)}


class ClipPerceptualLoss(_TeacherLoss):
    """``1 - cos(teacher(target), teacher(recon))``, batch mean (reads ``target`` and ``recon``).
    Returns ``{"clip_perceptual": ...}``."""

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        _require_images(inputs, "clip_perceptual")
        target_bd = self.teacher_image(inputs)
        recon_bd = self.teacher_on(inputs.recon.device).encode_image(inputs.recon)
        return {"clip_perceptual": (1 - (target_bd.float() * recon_bd.float()).sum(dim=-1)).mean()}
