"""Teachers by name: ``"NAME"`` or ``"NAME:PATH"`` through the ``teacher`` registry.

Losses (which learn from a teacher) and ``atoken eval`` (whose zero-shot and retrieval read a
teacher's text tower) both find teachers here, so neither knows any teacher by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from atoken_core.registry import Component

_TEACHERS: dict[tuple[str, str, str], Any] = {}


def resolve_teacher(spec: str, options: Mapping[str, Any] | None = None, registries: Any = None) -> tuple[Component, Any]:
    """``"NAME"`` or ``"NAME:PATH"`` plus the teacher's own options -> (its registry component, its
    structured config). ``PATH`` fills the teacher config's ``path`` field. Torch-free, so recipes
    validate it without loading anything; :func:`build_teacher` builds it."""
    from atoken_core.config import structure

    if registries is None:
        from atoken_core.plugin_manager import get_registries

        registries = get_registries()
    name, sep, path = spec.partition(":")
    component = registries["teacher"].get(name)
    params = dict(options or {})
    if sep:
        if "path" not in attrs.fields_dict(component.config):
            raise ValueError(f"teacher {name!r} takes no path, got {spec!r}")
        if "path" in params:
            raise ValueError(f"teacher {spec!r}: give the path once, not also as teacher_config.path")
        params["path"] = path
    return component, structure(params, component.config, "teacher_config")


def build_teacher(spec: str, options: Mapping[str, Any] | None = None, registries: Any = None) -> Any:
    """The frozen teacher ``spec`` names, built once per process for each (spec, settings) and
    shared by every loss and evaluation that asks for it."""
    from atoken_core.interfaces import Teacher

    component, config = resolve_teacher(spec, options, registries)
    key = (str(component.factory), spec, json.dumps(attrs.asdict(config), sort_keys=True, default=str))
    if key not in _TEACHERS:
        teacher = component.build(config)
        if not isinstance(teacher, Teacher):
            raise TypeError(f"teacher {spec!r} built a {type(teacher).__name__}, not an atoken_core.interfaces.Teacher")
        _TEACHERS[key] = teacher.freeze()
    return _TEACHERS[key]
