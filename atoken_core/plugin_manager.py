"""The one factory that builds atoken's plugin manager (pytest's pattern).

Built-in plugins are registered from :data:`DEFAULT_PLUGINS`; then every distribution's
entry points in the group ``atoken`` are loaded, unless ``ATOKEN_DISABLE_PLUGIN_AUTOLOAD``
is set. ``ATOKEN_PLUGINS=mod1,mod2`` registers extra plugin modules by import name (handy
for a plugin under development that is not installed).
"""

from __future__ import annotations

import functools
import importlib
import os

import pluggy

from atoken_core.errors import UserError
from atoken_core import PROJECT_NAME, hookspecs
from atoken_core.registry import Registries

ENTRY_POINT_GROUP = "atoken"
DISABLE_AUTOLOAD_ENV = "ATOKEN_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_PLUGINS_ENV = "ATOKEN_PLUGINS"

# Plugin name -> module. The same pairs are declared as entry points in pyproject.toml, so
# first-party plugins are found exactly as a third party's are; listing them here keeps
# them available when autoloading is disabled. A test keeps the two lists in step.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("image", "atoken_modalities.image"),
    ("video", "atoken_modalities.video"),
    ("photos", "atoken_modalities.photos"),
    ("clips", "atoken_modalities.clips"),
    ("objects", "atoken_modalities.objects"),
    ("shards", "atoken_modalities.shards"),
    ("bottlenecks", "atoken_bottlenecks"),
    ("teachers", "atoken_teachers"),
    ("losses", "atoken_losses"),
    ("curricula", "atoken_core.curricula"),
    ("official", "atoken_official"),
)


class PluginLoadError(UserError):
    pass


def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name, module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=name)
    for module_name in filter(None, os.environ.get(EXTRA_PLUGINS_ENV, "").split(",")):
        module_name = module_name.strip()
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # anything its import raises
            raise PluginLoadError(f"{EXTRA_PLUGINS_ENV}: cannot import plugin module {module_name!r}: "
                                  f"{type(err).__name__}: {err}") from err
        if not pm.is_registered(module):
            pm.register(module, name=module_name)
    origins = _load_entry_points(pm) if not os.environ.get(DISABLE_AUTOLOAD_ENV) else {}
    try:
        pm.check_pending()  # hook implementations whose name no hookspec has
    except pluggy.PluginValidationError as err:
        name = pm.get_name(err.plugin) or "?"
        raise PluginLoadError(f"{origins.get(name, f'plugin {name!r}')} does not fit atoken's hooks: {err}"
                              f"{_AUTOLOAD_HINT if name in origins else ''}") from err
    return pm


_AUTOLOAD_HINT = f"; fix or uninstall it, or set {DISABLE_AUTOLOAD_ENV}=1 to load only atoken's own plugins"


def _load_entry_points(pm: pluggy.PluginManager) -> dict[str, str]:
    """Every installed distribution's ``atoken`` entry points (names already registered, the
    built-ins, are skipped), as pluggy's ``load_setuptools_entrypoints`` does, except that a
    plugin that fails to import or to register is one error naming it and its distribution.
    Returns each loaded plugin's description, by name."""
    import importlib.metadata

    origins = {}
    for dist in list(importlib.metadata.distributions()):
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
