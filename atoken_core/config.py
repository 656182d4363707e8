"""Typed configs from TOML: a strict cattrs converter and errors that carry the TOML path.

Every config is an attrs class. Structuring forbids unknown keys, does not coerce types
(``"3"`` is not an int, ``3.5`` is not an int, a string is not a list) and reports *all*
problems at once, each as ``dotted.path[index].key: what is wrong``.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
from cattrs.cols import is_sequence, list_structure_factory
from cattrs.errors import ForbiddenExtraKeysError

from atoken_core.errors import UserError


class ConfigError(UserError):
    """One or more problems in a config; ``problems`` holds one ``path: message`` line each."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        if len(problems) == 1:
            super().__init__(head + problems[0])
        else:
            super().__init__(head + f"{len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", repr(tp))
    args = ", ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    return f"{getattr(origin, '__name__', repr(origin))}[{args}]"


class _WrongType(TypeError):
    def __init__(self, expected: Any, value: Any) -> None:
        super().__init__(f"expected {type_name(expected)}, got {value!r}")


def _strict_scalar(expected: type):
    def hook(value: Any, _: Any) -> Any:
        if expected is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
        raise _WrongType(expected, value)

    return hook


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for tp in (int, float, str, bool):
        conv.register_structure_hook(tp, _strict_scalar(tp))

    def list_factory(tp: Any, c: cattrs.Converter):
        inner = list_structure_factory(tp, c)

        def hook(value: Any, t: Any) -> Any:
            if not isinstance(value, (list, tuple)):
                raise _WrongType(tp, value)
            return inner(value, t)

        return hook

    conv.register_structure_hook_factory(is_sequence, list_factory)
    return conv


converter = make_converter()


def _format_exception(exc: BaseException, tp: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        parts = []
        for key in sorted(exc.extra_fields):
            hint = difflib.get_close_matches(key, known, n=1)
            parts.append(f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return "; ".join(parts) + (f"; allowed keys: {', '.join(known)}" if known else "")
    if isinstance(exc, KeyError):
        return "required key is missing"
    if isinstance(exc, _WrongType):
        return str(exc)
    if isinstance(exc, (ValueError, TypeError)):
        # Raised by attrs validators or by a converter: its text says what is wrong.
        return f"invalid value: {exc}" if str(exc) else "invalid value"
    return f"{type(exc).__name__}: {exc}"


def _clean_path(path: str) -> str:
    path = path.removeprefix("$").removeprefix(".")
    return re.sub(r"\['([^']*)'\]", r".\1", path).lstrip(".")


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + ("" if path.startswith("[") else ".") + path


def structure(data: Any, cls: type, path: str = "") -> Any:
    """Structure ``data`` into ``cls``; raise :class:`ConfigError` with every problem."""
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # cattrs raises ExceptionGroups; transform_error flattens them
        problems = []
        for line in cattrs.transform_error(exc, path="$", format_exception=_format_exception):
            message, _, where = line.rpartition(" @ ")
            where = _join(path, _clean_path(where))
            # attrs validators name the field first ("'steps' must be >= 1: 0"): put it in the path.
            m = re.match(r"invalid value: '(\w+)' (.*)", message)
            if m:
                where, message = _join(where, m.group(1)), f"invalid value: {m.group(2)}"
            problems.append(f"{where}: {message}" if where else message)
        raise ConfigError(problems) from None


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)


# ----------------------------------------------------------------------------- TOML + --set


def load_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"not valid TOML: {err}"], source) from None


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_path(dotted: str) -> list[str | int]:
    """``stage[1].bottleneck.levels`` (or ``stage.1.bottleneck.levels``) ->
    ``['stage', 1, 'bottleneck', 'levels']``."""
    out: list[str | int] = []
    pos = 0
    for m in _SEGMENT.finditer(dotted):
        between = dotted[pos : m.start()]
        if between not in ("", "."):
            raise ValueError(f"cannot parse key path {dotted!r}")
        index = m.group(2) if m.group(2) is not None else (m.group(1) if m.group(1).isdigit() else None)
        out.append(int(index) if index is not None else m.group(1))
        pos = m.end()
    if not out or pos != len(dotted):
        raise ValueError(f"cannot parse key path {dotted!r}")
    return out


def parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-4``, ``[8, 5, 5]``, ``true``, ``"x"``), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b[0].c=value`` to the raw TOML data, in place. An index one past
    the end of a list appends (``--set stage[1]={name = "b", steps = 5}`` adds a stage)."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ConfigError([f"--set {assignment!r}: expected KEY=VALUE"])
    try:
        path = parse_path(key.strip())
    except ValueError as err:
        raise ConfigError([f"--set {assignment!r}: {err}"]) from None
    node: Any = data
    for i, seg in enumerate(path[:-1]):
        where = key.strip()
        nxt = path[i + 1]
        if isinstance(seg, int):
            if not isinstance(node, list) or seg > len(node):
                raise ConfigError([f"--set {where}: index [{seg}] does not exist"])
            if seg == len(node):
                node.append([] if isinstance(nxt, int) else {})
            node = node[seg]
        else:
            if not isinstance(node, Mapping):
                raise ConfigError([f"--set {where}: {seg!r} is not inside a table"])
            node = node.setdefault(seg, [] if isinstance(nxt, int) else {})
    last = path[-1]
    value = parse_value(raw.strip())
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise ConfigError([f"--set {key.strip()}: index [{last}] does not exist"])
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        if not isinstance(node, dict):
            raise ConfigError([f"--set {key.strip()}: {last!r} is not inside a table"])
        node[last] = value
