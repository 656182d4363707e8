"""Distribution and token metrics: Fréchet distance (for rFID and rFVD), codebook usage,
Inception image features and TorchScript video features from local weights files."""

from __future__ import annotations

import math
from typing import Any

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


def frechet_distance_features(real_nd: np.ndarray, fake_md: np.ndarray) -> float:
    """``frechet_distance(*feature_stats(real), *feature_stats(fake))`` (sample means, unbiased
    covariances), computed without a D x D matrix square root when a set has no more samples than
    dimensions (an evaluation of a few images or clips with 2048- or 400-d features).

    With centred features X1 (n1, D), X2 (n2, D), S_i = X_i^T X_i / (n_i - 1), the non-zero
    eigenvalues of S1 S2 are the squared singular values of X1 X2^T / sqrt((n1 - 1)(n2 - 1)), so
    Tr((S1 S2)^(1/2)) is that matrix's nuclear norm: exact, where ``sqrtm`` of the singular
    product is slow and approximate."""
    a, b = np.asarray(real_nd, dtype=np.float64), np.asarray(fake_md, dtype=np.float64)
    n1, n2 = len(a), len(b)
    if min(n1, n2) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 samples per set, got {n1} and {n2}")
    if min(n1, n2) > a.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b))
    ac, bc = a - a.mean(0), b - b.mean(0)
    diff = a.mean(0) - b.mean(0)
    nuclear = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(diff @ diff + (ac * ac).sum() / (n1 - 1) + (bc * bc).sum() / (n2 - 1) - 2 * nuclear)


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


FVD_RESOLUTION = 224
FVD_CONVENTION = ("TorchScript called as net(x, rescale=False, resize=False, return_features=True) on clips "
                  "(B, 3, T, 224, 224) in [-1, 1]: shorter side resized to 224 (bilinear), centre crop; the "
                  "calling convention of StyleGAN-V's i3d_torchscript.pt (400-d pre-softmax I3D logits)")


class VideoFeatures:
    """Clip features for rFVD from a local TorchScript file (any fsspec path).

    The format is the one the PyTorch FVD code of StyleGAN-V, DIGAN, Latte and
    fvd-comparison (universome) shares: ``i3d_torchscript.pt``, the Kinetics-400 I3D exported to
    TorchScript, called as ``net(x, rescale=False, resize=False, return_features=True)`` on
    ``(B, 3, T, 224, 224)`` clips in [-1, 1] (shorter side resized to 224, centre crop), returning
    the 400-d logits before the softmax. Any network saved the same way works (see
    :func:`save_random_video_network`, the stand-in the tests use); the report names the file and
    its SHA-256, and the network's own ``atoken_description`` attribute when it has one.

    TorchScript archives hold code: load only files you trust. Nothing is downloaded."""

    def __init__(self, path: str, resolution: int = FVD_RESOLUTION) -> None:
        import hashlib
        import io
        import warnings

        from atoken_core.io import read_bytes

        try:
            data = read_bytes(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: video feature network not found (rFVD needs a local TorchScript file such as "
                "StyleGAN-V's i3d_torchscript.pt; pass --i3d-weights PATH; nothing is downloaded)") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but it is this file's format
                self.net = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: not a TorchScript video network ({first})") from None
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.resolution = resolution
        self.description = str(getattr(self.net, "atoken_description", "") or "") or None

    def preprocess(self, clip_tchw: torch.Tensor) -> torch.Tensor:
        """(T, 3, H, W) in [-1, 1] -> (3, T, r, r): shorter side to ``r`` (bilinear, no antialias,
        like the reference code), centre crop."""
        t, _, h, w = clip_tchw.shape
        r = self.resolution
        scale = r / min(h, w)
        size = (r, max(r, math.ceil(w * scale))) if h <= w else (max(r, math.ceil(h * scale)), r)
        x = torch.nn.functional.interpolate(clip_tchw.float(), size=size, mode="bilinear", align_corners=False)
        top, left = (size[0] - r) // 2, (size[1] - r) // 2
        return x[:, :, top : top + r, left : left + r].permute(1, 0, 2, 3).contiguous()

    @torch.no_grad()
    def __call__(self, clip_tchw: torch.Tensor) -> torch.Tensor:
        """One clip -> (1, D) features."""
        x = self.preprocess(clip_tchw)[None]
        try:
            out = self.net(x, rescale=False, resize=False, return_features=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{self.path}: the video network failed on a clip of {clip_tchw.shape[0]} frames "
                             f"(I3D needs enough frames for its temporal pooling, e.g. 16): {first}") from None
        return out.reshape(1, -1).float()

    def describe(self) -> dict[str, Any]:
        return {"network": self.description or "TorchScript video network (user-supplied, e.g. StyleGAN-V I3D)",
                "weights": self.path, "sha256": self.sha256, "convention": FVD_CONVENTION}


class RandomVideoNet(torch.nn.Module):
    """A seeded random 3D-conv network with the I3D TorchScript calling convention: a stand-in
    for tests and demos where no I3D weights can be had. Its rFVD numbers mean nothing beyond
    "same network, same clips, same number"; its ``atoken_description`` says so in every report
    (a plain string attribute, which TorchScript keeps)."""

    def __init__(self, seed: int = 0, features: int = 64) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv3d(3, 16, kernel_size=(3, 8, 8), stride=(1, 8, 8))
        self.conv2 = torch.nn.Conv3d(16, 32, kernel_size=3, stride=2, padding=1)
        self.proj = torch.nn.Linear(64, features)
        with torch.no_grad():
            for module in (self.conv1, self.conv2, self.proj):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        self.atoken_description = (f"RANDOM stand-in (atoken_core.metrics.RandomVideoNet, seed {seed}, {features}-d), "
                                   "not I3D: numbers are not FVD")

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = True) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.conv2(torch.nn.functional.gelu(self.conv1(x))))
        stats = torch.cat([h.mean(dim=(2, 3, 4)), h.std(dim=(2, 3, 4))], dim=1)
        return self.proj(stats)


def save_random_video_network(path: str, seed: int = 0, features: int = 64) -> None:
    """Write :class:`RandomVideoNet` as a TorchScript file, the format of ``i3d_torchscript.pt``."""
    import io
    import warnings

    from atoken_core.io import atomic_write_bytes

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(RandomVideoNet(seed, features).eval()), buf)
    atomic_write_bytes(path, buf.getvalue())
