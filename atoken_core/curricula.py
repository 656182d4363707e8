"""First-party curriculum registration (implementation: :mod:`atoken_core.sequential`)."""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component


@attrs.define(kw_only=True)
class SequentialConfig:
    pass


@hookimpl
def atoken_curricula() -> list[Component]:
    return [Component("sequential", "atoken_core.sequential:Sequential", SequentialConfig,
                      "stages in recipe order, modalities mixed round-robin")]
