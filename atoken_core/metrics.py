"""Distribution and token metrics: Fréchet distance (for rFID), codebook usage, Inception
features from a local weights file."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the distance FID reports between two
    Gaussians fitted to feature sets (Heusel et al., 2017). A tiny ridge is added when the
    product is singular, as reference implementations do."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(features_nd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features_nd.mean(0), np.cov(features_nd, rowvar=False)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Utilisation (fraction of the codebook used at least once) and perplexity (exp of the
    entropy of the code histogram; equals the codebook size for uniform use)."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {
        "codebook_size": codebook_size,
        "utilisation": float((counts > 0).sum() / codebook_size),
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
        "tokens": int(counts.sum()),
    }


class InceptionFeatures(torch.nn.Module):
    """2048-d pool features of torchvision's Inception-v3, weights from a local file.

    Note: the standard FID uses the TF-Inception graph (pytorch-fid's port); torchvision's
    Inception-v3 with its ImageNet weights gives numbers on a different scale. eval.json names
    the weights file so numbers are only compared with numbers from the same network."""

    def __init__(self, weights: str) -> None:
        super().__init__()
        import torchvision

        from atoken_core.io import read_safetensors

        self.net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        try:
            state, _ = read_safetensors(weights)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{weights}: Inception-v3 weights not found (rFID needs a local safetensors file of "
                "torchvision's inception_v3 state dict; pass --inception-weights)"
            ) from None
        self.net.load_state_dict(state)
        self.net.fc = torch.nn.Identity()
        self.net.eval()

    @torch.no_grad()
    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> (B, 2048)."""
        x = torch.nn.functional.interpolate((x_bchw + 1) / 2, size=(299, 299), mode="bilinear",
                                            align_corners=False, antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return self.net((x - mean) / std)
