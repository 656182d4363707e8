from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests run the real model; keep them bounded on 2 CI cores and never time them.
settings.register_profile("atoken", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "atoken"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def registries():
    from atoken_core.plugin_manager import get_registries

    return get_registries()


def make_model(registries, bottleneck: str = "kl", latent_dim: int = 8, flavor: str = "test", shortcut: bool = False,
               **params):
    from atoken_core.flavors import FLAVORS
    from atoken_core.model import AToken

    component = registries["bottleneck"].get(bottleneck)
    config = component.config(**params)
    width = FLAVORS[flavor].width
    return AToken(FLAVORS[flavor], component.build(config, in_dim=width, latent_dim=latent_dim), shortcut=shortcut)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One ATOKEN_CACHE for the CLI runs of a session (the converted VGG16 weights are made once)."""
    return tmp_path_factory.mktemp("atoken-cache")
