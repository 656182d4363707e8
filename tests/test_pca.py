"""The PCA baseline and the PCA-initialised shortcut, against scikit-learn's PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model
from sklearn.decomposition import PCA

from atoken_core.evaluate import PCABaseline
from atoken_modalities.image import ImageConfig
from atoken_modalities.image_impl import ImageModality, load_image
from atoken_modalities.photos_impl import resolve_package_path


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    names = ["astronaut.png", "coffee.png", "chelsea.png"]
    imgs = [load_image(resolve_package_path(f"pkg://skimage/data/{n}")) for n in names]
    return [x[:, :96, :120] for x in imgs]


def sklearn_reference(photos, spec, k):
    modality = ImageModality(ImageConfig())
    patches = torch.cat([modality.patchify([x], spec).patches.features for x in photos]).double().numpy()
    return PCA(n_components=k, svd_solver="full").fit(patches), modality


def test_pca_baseline_matches_sklearn(photos, registries):
    spec = make_model(registries).spec  # 4x4x3 patches
    ref, modality = sklearn_reference(photos[:2], spec, 8)
    ours = PCABaseline(modality, spec, 8).fit(iter(photos[:2]))
    np.testing.assert_allclose(ours.mean.numpy(), ref.mean_, atol=1e-10)
    np.testing.assert_allclose(ours.variance.numpy(), ref.explained_variance_, rtol=1e-8)
    assert abs(ours.explained - ref.explained_variance_ratio_.sum()) < 1e-10
    held_out = photos[2]
    patches = modality.patchify([held_out], spec).patches.features.double().numpy()
    expected = ref.inverse_transform(ref.transform(patches))
    got = modality.patchify([ours.reconstruct(held_out)], spec).patches.features.double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_shortcut_starts_at_the_pca_solution(photos, registries):
    model = make_model(registries, shortcut=True, logvar_init=-8.0).eval()
    spec = model.spec
    ref, modality = sklearn_reference(photos[:2], spec, 8)
    pca = PCABaseline(modality, spec, 8).fit(iter(photos[:2]))
    model.init_shortcut(pca.mean.float(), pca.basis.float(), pca.variance.float())
    tokens = modality.patchify([photos[2]], spec)
    with torch.no_grad():
        recon, bott = model(tokens.patches, sample=False)
        latent = model.encode_latent(tokens.patches)
    expected = ref.inverse_transform(ref.transform(tokens.patches.features.double().numpy()))
    np.testing.assert_allclose(recon.double().numpy(), expected, atol=1e-4)
    # the latent is the whitened PCA coefficients (sign of each component is arbitrary)
    coeffs = ref.transform(tokens.patches.features.double().numpy()) / np.sqrt(ref.explained_variance_)
    np.testing.assert_allclose(np.abs(latent.double().numpy()), np.abs(coeffs), atol=1e-4)
    torch.testing.assert_close(latent, bott.latent)


def test_shortcut_needs_a_matching_basis(registries):
    model = make_model(registries, shortcut=True)
    with pytest.raises(ValueError, match="does not fit latent_dim"):
        model.init_shortcut(torch.zeros(48), torch.zeros(4, 48), torch.ones(4))
    with pytest.raises(ValueError, match="built without a shortcut"):
        make_model(registries).init_shortcut(torch.zeros(48), torch.zeros(8, 48), torch.ones(8))
