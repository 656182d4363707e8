"""Small, strict registries: a name maps to a factory and the attrs class of its config.

Registries are filled from the plugin manager (see :mod:`atoken_core.plugin_manager`);
each knows which plugin provided each name, so duplicates and unknown names produce
errors a user can act on.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from atoken_core.errors import UserError

KINDS: dict[str, str] = {
    # registry kind -> hook that fills it
    "modality": "atoken_modalities",
    "bottleneck": "atoken_bottlenecks",
    "loss": "atoken_losses",
    "curriculum": "atoken_curricula",
    "data": "atoken_data",
    "teacher": "atoken_teachers",
}


#: how messages name a kind's components where the kind's name alone reads badly
LABELS = {"data": "data source"}


class RegistryError(UserError):
    """A name is missing from, or claimed twice in, a registry."""


@attrs.frozen
class Component:
    """One buildable thing a plugin provides.

    ``factory`` is either a callable or a ``"package.module:attribute"`` string resolved on
    first use, so that the plugin module itself never imports torch.
    ``config`` is an attrs class; the recipe's table for this component (minus ``kind``) is
    structured into it, so unknown keys and wrong types fail before anything is built.
    """

    name: str
    factory: Callable[..., Any] | str
    config: type
    doc: str = ""

    def resolve(self) -> Callable[..., Any]:
        if callable(self.factory):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        module = importlib.import_module(module_name)
        try:
            return getattr(module, attr)
        except AttributeError as err:
            raise RegistryError(
                f"component {self.name!r}: factory {self.factory!r} does not exist"
            ) from err

    def build(self, config: Any, **kwargs: Any) -> Any:
        return self.resolve()(config, **kwargs)


@attrs.frozen
class Entry:
    component: Component
    plugin: str


class Registry:
    """Components of one kind by name, each remembered with the plugin that provided it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.label = LABELS.get(kind, kind)
        self._entries: dict[str, Entry] = {}

    def register(self, component: Component, plugin: str) -> None:
        if not isinstance(component, Component):
            raise RegistryError(
                f"plugin {plugin!r} returned {component!r} from its {KINDS[self.kind]} hook; "
                "expected atoken_core.registry.Component"
            )
        if not attrs.has(component.config):
            raise RegistryError(
                f"{self.label} {component.name!r} from plugin {plugin!r}: config must be an attrs class"
            )
        previous = self._entries.get(component.name)
        if previous is not None:
            raise RegistryError(
                f"{self.label} {component.name!r} is registered twice: by plugin "
                f"{previous.plugin!r} and by plugin {plugin!r}"
            )
        self._entries[component.name] = Entry(component, plugin)

    def get(self, name: str) -> Component:
        try:
            return self._entries[name].component
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        by_lower = {k.lower(): k for k in known}
        hint = [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=1)]
        msg = f"unknown {self.label} {name!r}"
        if hint:
            msg += f" (did you mean {hint[0]!r}?)"
        return msg + f"; registered: {', '.join(known) or 'none'}"

    def plugin_of(self, name: str) -> str:
        return self._entries[name].plugin

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def list(self) -> list[Entry]:
        return [self._entries[name] for name in sorted(self._entries)]


class Registries:
    """One registry per kind, filled from a plugin manager."""

    def __init__(self) -> None:
        self.by_kind = {kind: Registry(kind) for kind in KINDS}

    def __getitem__(self, kind: str) -> Registry:
        return self.by_kind[kind]

    @classmethod
    def from_plugin_manager(cls, pm: Any) -> Registries:
        registries = cls()
        for kind, hook_name in KINDS.items():
            # Each implementation is called on its own so every component is attributed to
            # the plugin that returned it (pluggy's collected results lose that).
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                for component in impl.function() or []:
                    registries[kind].register(component, impl.plugin_name)
        return registries
