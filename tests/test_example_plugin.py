"""The example third-party plugin (plugins/atoken-example-plugin), installed as its own
distribution, is found through the ``atoken`` entry-point group by the real CLI."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atoken_core.interfaces import BottleneckOutput, LossInputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def installed() -> None:
    # A missing install would make every check below meaningless, so fail loudly.
    try:
        importlib.metadata.distribution("atoken-example-plugin")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the example plugin is not installed: run `pip install -e plugins/atoken-example-plugin`")


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    # Start from a plugin-loading environment the test controls, whatever the caller's is.
    base = {k: v for k, v in os.environ.items() if k not in ("ATOKEN_DISABLE_PLUGIN_AUTOLOAD", "ATOKEN_PLUGINS")}
    return subprocess.run([sys.executable, "-m", "atoken_core.cli", *args], capture_output=True, text=True,
                          env={**base, **env}, cwd=REPO, timeout=120)


def test_cli_lists_charbonnier_from_example_plugin() -> None:
    result = cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = [r for r in json.loads(result.stdout) if r["name"] == "charbonnier"]
    assert [(r["kind"], r["plugin"]) for r in rows] == [("loss", "example")]


def test_charbonnier_value(monkeypatch) -> None:
    from atoken_core.plugin_manager import get_plugin_manager

    monkeypatch.delenv("ATOKEN_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    from atoken_core.registry import Registries

    component = Registries.from_plugin_manager(get_plugin_manager())["loss"].get("charbonnier")
    config = component.config(eps=0.1)
    g = torch.Generator().manual_seed(0)
    target, recon = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    out = component.build(config)(LossInputs("image", target, recon, BottleneckOutput(latent=torch.zeros(1, 1))))
    expected = torch.sqrt((recon - target) ** 2 + 0.1**2).mean()
    assert out.keys() == {"charbonnier"}
    torch.testing.assert_close(out["charbonnier"], expected)


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_charbonnier.toml"
    path.write_text((REPO / "recipes/tiny.toml").read_text() + '\n[[loss]]\nkind = "charbonnier"\neps = 0.01\n')
    return path


def test_recipe_using_plugin_loss_validates(recipe: Path) -> None:
    result = cli("validate", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "charbonnier" in result.stdout


def test_recipe_fails_when_autoload_disabled(recipe: Path) -> None:
    result = cli("validate", str(recipe), ATOKEN_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode != 0
    assert "charbonnier" in result.stderr and "unknown" in result.stderr, result.stderr


def _installed_distribution(root: Path, name: str, module_source: str) -> None:
    """A distribution as pip leaves one (a module and its dist-info with an ``atoken`` entry point)."""
    (root / f"{name}.py").write_text(module_source)
    info = root / f"{name}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[atoken]\n{name.removesuffix('_plugin')} = {name}\n")


@pytest.mark.parametrize("source, problem", [
    ("import not_a_module_anywhere\n", "failed to import: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("raise RuntimeError('boom at import')\n", "failed to import: RuntimeError: boom at import"),
    ("from atoken_core import hookimpl\n\n@hookimpl\ndef atoken_losess():\n    return []\n", "does not fit atoken's hooks"),
])
def test_a_broken_installed_plugin_is_one_line_naming_it(tmp_path: Path, source: str, problem: str) -> None:
    _installed_distribution(tmp_path, "broken_plugin", source)
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    for args in (["plugins"], ["validate", str(REPO / "recipes/tiny.toml")]):
        result = cli(*args, PYTHONPATH=pythonpath)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and problem in line, line
        assert "plugin 'broken' (broken_plugin, from broken_plugin 0.3)" in line
        assert "ATOKEN_DISABLE_PLUGIN_AUTOLOAD=1" in line
    # the way out the message names works
    assert cli("plugins", PYTHONPATH=pythonpath, ATOKEN_DISABLE_PLUGIN_AUTOLOAD="1").returncode == 0
