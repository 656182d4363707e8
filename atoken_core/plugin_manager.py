"""The one factory that builds atoken's plugin manager (pytest's pattern).

Every plugin, atoken's own included, is found through the entry points of the group ``atoken``
(atoken's are declared in its ``pyproject.toml``, exactly as a third party declares its own).
``ATOKEN_DISABLE_PLUGIN_AUTOLOAD`` loads only the entry points of atoken's own distribution.
``ATOKEN_PLUGINS=mod1,mod2`` registers extra plugin modules by import name (handy for a plugin
under development that is not installed).
"""

from __future__ import annotations

import functools
import importlib
import os

import pluggy

from atoken_core import PROJECT_NAME, hookspecs
from atoken_core.errors import UserError
from atoken_core.registry import Registries

ENTRY_POINT_GROUP = "atoken"
DISABLE_AUTOLOAD_ENV = "ATOKEN_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_PLUGINS_ENV = "ATOKEN_PLUGINS"


class PluginLoadError(UserError):
    pass


def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    origins = _load_entry_points(pm, own_only=bool(os.environ.get(DISABLE_AUTOLOAD_ENV)))
    if not pm.get_plugins():
        raise PluginLoadError(f"no atoken plugins are installed (the {ENTRY_POINT_GROUP!r} entry points of the "
                              f"{PROJECT_NAME!r} distribution are missing): install atoken with pip, e.g. "
                              "`pip install -e .` in a checkout")
    for module_name in filter(None, os.environ.get(EXTRA_PLUGINS_ENV, "").split(",")):
        module_name = module_name.strip()
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # anything its import raises
            raise PluginLoadError(f"{EXTRA_PLUGINS_ENV}: cannot import plugin module {module_name!r}: "
                                  f"{type(err).__name__}: {err}") from err
        if not pm.is_registered(module):
            pm.register(module, name=module_name)
    try:
        pm.check_pending()  # hook implementations whose name no hookspec has
    except pluggy.PluginValidationError as err:
        name = pm.get_name(err.plugin) or "?"
        raise PluginLoadError(f"{origins.get(name, f'plugin {name!r}')} does not fit atoken's hooks: {err}"
                              f"{_AUTOLOAD_HINT if name in origins else ''}") from err
    return pm


_AUTOLOAD_HINT = f"; fix or uninstall it, or set {DISABLE_AUTOLOAD_ENV}=1 to load only atoken's own plugins"


def _load_entry_points(pm: pluggy.PluginManager, own_only: bool = False) -> dict[str, str]:
    """Every installed distribution's ``atoken`` entry points (atoken's own first; only those with
    ``own_only``), as pluggy's ``load_setuptools_entrypoints`` does, except that a plugin that
    fails to import or to register is one error naming it and its distribution. Returns each
    loaded third-party plugin's description, by name."""
    import importlib.metadata

    def own(dist: importlib.metadata.Distribution) -> bool:
        return (dist.metadata["Name"] or "").lower() == PROJECT_NAME

    origins = {}
    dists = sorted(importlib.metadata.distributions(), key=lambda d: not own(d))
    seen: set[str] = set()
    for dist in dists:
        key = (dist.metadata["Name"] or "").lower()
        if key in seen or (own_only and not own(dist)):
            continue  # a distribution found twice on sys.path (an editable install) loads once
        seen.add(key)
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            where = f"plugin {ep.name!r} ({ep.value}, from {dist.metadata['Name']} {dist.version})"
            try:
                pm.register(ep.load(), name=ep.name)
            except pluggy.PluginValidationError as err:
                raise PluginLoadError(f"{where} does not fit atoken's hooks: {err}{_AUTOLOAD_HINT}") from err
            except Exception as err:  # anything its import raises
                raise PluginLoadError(f"{where} failed to import: {type(err).__name__}: {err}{_AUTOLOAD_HINT}") from err
            if not own(dist):
                origins[ep.name] = where
    return origins


@functools.cache
def _cached_plugin_manager(key: tuple[str, str]) -> pluggy.PluginManager:
    return get_plugin_manager()


@functools.cache
def _cached_registries(key: tuple[str, str]) -> Registries:
    return Registries.from_plugin_manager(_cached_plugin_manager(key))


def _environment_key() -> tuple[str, str]:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, ""), os.environ.get(EXTRA_PLUGINS_ENV, "")


def shared_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager of the current process (cached per plugin-loading environment)."""
    return _cached_plugin_manager(_environment_key())


def get_registries() -> Registries:
    """Registries for the current process (cached per plugin-loading environment)."""
    return _cached_registries(_environment_key())
