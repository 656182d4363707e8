"""First-party teachers: the real SigLIP2 (from a local directory) and a seeded random stand-in.

A teacher is the frozen image-text model the semantic losses learn from (the paper distils
SigLIP2). Losses name one as ``teacher = "random"`` or ``teacher = "siglip2:PATH"``.

Registration only; torch and transformers are imported by ``siglip2.py`` /
``random_teacher.py`` when a loss builds a teacher.
"""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component


def _doc(text: str, **kwargs):
    return attrs.field(metadata={"doc": text}, **kwargs)


@attrs.define(kw_only=True)
class SigLIP2TeacherConfig:
    path: str = _doc(
        "Hugging Face style directory (local path or fsspec URI) of a full SigLIP2 model, image and text "
        "towers: config.json, model.safetensors, tokenizer files, optionally preprocessor_config.json "
        "(what save_pretrained writes). Never downloaded from the Hub; a remote URI is copied to the atoken cache"
    )
    max_text_length: int | None = _doc(
        "tokens per text, padded to this length as SigLIP2 was trained; None = the text tower's "
        "max_position_embeddings (64 for SigLIP2)",
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1)),
    )
    dtype: str = _doc("dtype the teacher runs in", default="float32",
                      validator=attrs.validators.in_(["float32", "bfloat16", "float16"]))


@attrs.define(kw_only=True)
class RandomTeacherConfig:
    embed_dim: int = _doc("embedding size; must equal the student's text_dim (the flavour's text_dim or width)",
                          default=64, validator=attrs.validators.ge(1))
    seed: int = _doc("seeds every weight and every word vector", default=0)
    width: int = _doc("channels of the random conv image tower", default=32, validator=attrs.validators.ge(1))
    logit_scale: float = _doc("multiplier of cosine similarities (SigLIP's initial t = 10)", default=10.0)
    logit_bias: float = _doc("bias of the logits (SigLIP's initial b = -10)", default=-10.0)


@hookimpl
def atoken_teachers() -> list[Component]:
    return [
        Component("siglip2", "atoken_teachers.siglip2:SigLIP2Teacher", SigLIP2TeacherConfig,
                  "frozen SigLIP2 (or SigLIP) image + text towers from a local Hugging Face directory"),
        Component("random", "atoken_teachers.random_teacher:RandomTeacher", RandomTeacherConfig,
                  "seeded random stand-in for tests and CPU demos (no meaningful semantics)"),
    ]
