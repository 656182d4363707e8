"""Registries and the plugin manager."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest

from atoken_core import hookimpl
from atoken_core.plugin_manager import get_plugin_manager
from atoken_core.registry import Component, Registries, Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]


@attrs.define
class Cfg:
    x: int = 1


def test_duplicate_name_names_both_plugins():
    class PluginA:
        @hookimpl
        def atoken_losses(self):
            return [Component("l1", "x:y", Cfg)]

    pm = get_plugin_manager()
    pm.register(PluginA(), name="third-party-a")
    with pytest.raises(RegistryError) as err:
        Registries.from_plugin_manager(pm)
    assert "'l1'" in str(err.value)
    assert "'losses'" in str(err.value) and "'third-party-a'" in str(err.value)


def test_unknown_name_suggests_closest():
    reg = Registry("bottleneck")
    reg.register(Component("fsq", "x:y", Cfg), "p")
    reg.register(Component("kl", "x:y", Cfg), "p")
    with pytest.raises(RegistryError, match=r"unknown bottleneck 'fsqq' \(did you mean 'fsq'\?\); registered: fsq, kl"):
        reg.get("fsqq")


def test_config_must_be_attrs_and_component_typed():
    reg = Registry("loss")
    with pytest.raises(RegistryError, match="attrs class"):
        reg.register(Component("a", "x:y", dict), "p")
    with pytest.raises(RegistryError, match="expected atoken_core.registry.Component"):
        reg.register(("a", "x:y"), "p")


def test_every_builtin_is_registered_with_its_plugin(registries):
    assert registries["modality"].plugin_of("image") == "image"
    assert {"kl", "fsq"} <= set(registries["bottleneck"])
    assert {"l1", "kl", "lpips", "gram"} <= set(registries["loss"])
    assert "sequential" in registries["curriculum"]
    assert {"packaged_photos", "image_folder"} <= set(registries["data"])


def test_first_party_plugins_come_from_entry_points_only(monkeypatch):
    """atoken's own plugins are its distribution's entry points (as a third party's are), and
    nothing else: the core keeps no list of them."""
    import importlib.metadata

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["atoken"]
    installed = {ep.name: ep.value for ep in importlib.metadata.distribution("atoken").entry_points
                 if ep.group == "atoken"}
    assert installed == declared, "reinstall atoken (pip install -e .): its entry points changed"
    monkeypatch.setenv("ATOKEN_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager()
    assert {name for name, _ in pm.list_name_plugin()} == set(declared)
    assert {name: module.__name__ for name, module in pm.list_name_plugin()} == declared


def test_builtins_stay_without_autoload(monkeypatch):
    monkeypatch.setenv("ATOKEN_DISABLE_PLUGIN_AUTOLOAD", "1")
    regs = Registries.from_plugin_manager(get_plugin_manager())
    assert "image" in regs["modality"] and "kl" in regs["bottleneck"]


def test_extra_plugin_module_by_env(monkeypatch, tmp_path):
    (tmp_path / "my_atoken_plugin.py").write_text(
        "import attrs\nfrom atoken_core import hookimpl\nfrom atoken_core.registry import Component\n"
        "@attrs.define\nclass C:\n    pass\n"
        "@hookimpl\ndef atoken_curricula():\n    return [Component('reverse', 'x:y', C, 'demo')]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ATOKEN_PLUGINS", "my_atoken_plugin")
    regs = Registries.from_plugin_manager(get_plugin_manager())
    assert regs["curriculum"].plugin_of("reverse") == "my_atoken_plugin"


def test_plugin_modules_are_cheap_to_import():
    # Entry points load eagerly: listing components and validating must not import torch.
    code = (
        "import sys\n"
        "from atoken_core.plugin_manager import get_registries\n"
        "from atoken_core.recipe import load_recipe\n"
        f"load_recipe({str(ROOT / 'recipes' / 'tiny.toml')!r}, get_registries())\n"
        "heavy = [m for m in ('torch', 'lpips', 'skimage', 'av') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
