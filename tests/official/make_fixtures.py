"""Golden outputs of Apple's official AToken inference code, for the parity tests.

Not run by the tests or CI: it needs a copy of the official repository, which atoken does not
vendor. Run it by hand when the official code or the fixtures' shapes change:

    git clone https://github.com/apple/ml-atoken /tmp/ml-atoken     # commit 3f5afdc was used
    pip install diffusers pyyaml                                     # the official model's imports
    python tests/official/make_fixtures.py --official /tmp/ml-atoken

Official commit: 3f5afdc ("add multiview packing"), apple/ml-atoken, read 2026-12-03.
Run on CPU with torch 2.14.1 (fp32), diffusers 0.42.1.

What it does: builds the official ``AutoencoderKL`` for reduced So/C-, So/D- and s1-shaped
configurations (width 32, 2 heads, 2 + 2 blocks; the real patch [4, 16, 16], latent, norms,
biases, QK-norm, RoPE and FSQ settings of ``configs/atoken-*.yaml``) with seeded random
weights, moves every norm weight, QK-norm gain and bias away from 1 / 0 (so a loader that
drops one is caught), and runs the official preprocessing (``image_to_sparse``: centre crop
to multiples of 16, frames cut to multiples of 4, an image zero-padded to 4 frames), encoder
(16-frame chunks), pooling head, KL projection, FSQ and decoder on one packed batch of
an image, an 8-frame clip and a 26-frame clip, and on a 20-voxel 3D sample at token level.
It writes into ``tests/official/fixtures/``: each configuration's state dict as the official
``.pt`` layout with its YAML, the inputs, and every intermediate output.

The official attention modules import ``flash_attn`` at import time and have no fallback;
:class:`_FlashAttnStandIn` below is this script's own exact-softmax replacement of the calls
they make. Data-loading packages the model code imports but never calls (webdataset, decord,
ftfy) are replaced by empty modules when missing.
"""

from __future__ import annotations

import argparse
import copy
import importlib.machinery
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures"
SEED = 20251203

# The official configs' arch_cfg, reduced in width and depth only.
BASE_ARCH = {
    "patch_size": [4, 16, 16],
    "in_channels": 3072,
    "out_channels": 3072,
    "latent_channels": 48,
    "encoder_model_channels": 32,
    "encoder_num_blocks": 2,
    "encoder_num_heads": 2,
    "encoder_mlp_channels": 80,
    "encoder_attn_mode": "full",
    "encoder_pe_mode": "joint",
    "encoder_qk_rms_norm": False,
    "encoder_use_bias": True,
    "encoder_use_rms_norm": False,
    "decoder_model_channels": 32,
    "decoder_num_blocks": 2,
    "decoder_num_heads": 2,
    "decoder_mlp_channels": 80,
    "decoder_attn_mode": "full",
    "decoder_pe_mode": "joint",
    "decoder_qk_rms_norm": True,
    "decoder_use_bias": False,
    "decoder_use_rms_norm": True,
    "use_decoder": True,
}
FSQ_ARCH = {
    "use_quantizer": True,
    "quantizer_type": "fsq",
    "quantizer_codebook_size": 4096,
    "quantizer_feature_dim": 48,
    "quantizer_num_codebooks": 8,
    "quantizer_chunk_size": 1,
}
CONFIGS = {
    "soc": BASE_ARCH,
    "sod": {**BASE_ARCH, **FSQ_ARCH},
    "s1": {**BASE_ARCH, "latent_channels": 32},
}


class _FlashAttnStandIn(types.ModuleType):
    """The four ``flash_attn`` calls the official attention modules make, as exact softmax
    attention (float64 inside) over each ``cu_seqlens`` segment; ``softcap`` as flash-attn
    defines it (``softcap * tanh(scores / softcap)``)."""

    def __init__(self) -> None:
        super().__init__("flash_attn")
        # a spec without a file or version: transformers' availability probes then say "absent"
        self.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)

    @staticmethod
    def _attend(q, k, v, softmax_scale=None, softcap=0.0):  # (Lq, H, D), (Lk, H, D), (Lk, H, Dv)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())
        return out.to(q.dtype)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                               dropout_p=0.0, softmax_scale=None, causal=False, softcap=0.0, **_):
        assert not causal and not dropout_p
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(cq) - 1):
            if cq[i + 1] > cq[i]:
                out[cq[i]:cq[i + 1]] = self._attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]],
                                                    softmax_scale, softcap)
        return out

    def flash_attn_varlen_kvpacked_func(self, q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                                        max_seqlen_k=None, **kw):
        return self.flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, **kw)

    def flash_attn_varlen_qkvpacked_func(self, qkv, cu_seqlens, max_seqlen=None, **kw):
        return self.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, **kw)

    def flash_attn_qkvpacked_func(self, qkv, dropout_p=0.0, softmax_scale=None, causal=False, softcap=0.0, **_):
        assert not causal and not dropout_p
        return torch.stack([self._attend(s[:, 0], s[:, 1], s[:, 2], softmax_scale, softcap) for s in qkv])


def _install_stand_ins() -> None:
    # diffusers probes optional packages by their import specs: let it look before the stand-ins exist
    import diffusers.models.modeling_utils  # noqa: F401

    sys.modules["flash_attn"] = _FlashAttnStandIn()
    for name in ("webdataset", "decord", "ftfy"):
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module
            if name == "webdataset":
                sub = types.ModuleType("webdataset.pytorch")
                sub.IterableDataset = torch.utils.data.IterableDataset
                module.pytorch = sub
                sys.modules["webdataset.pytorch"] = sub


@torch.no_grad()
def _perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights and QK-norm gains to 1 +- 0.2, biases to +-0.1 (never exactly 1 or 0)."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if name.endswith(".bias"):
            p.copy_(0.1 * noise)
        elif "norm" in name or name.endswith("gamma"):
            p.copy_(1.0 + 0.2 * noise)


def _photo_inputs() -> dict[str, torch.Tensor]:
    """uint8 crops of scikit-image's astronaut photograph (public domain): a 50x70 image (cropped
    to 48x64 by the official preprocessing), an 8-frame 32x32 pan, a 26-frame 18x33 pan (cut to
    24 frames, cropped to 16x32)."""
    from skimage import data

    photo = torch.from_numpy(data.astronaut())  # (512, 512, 3) uint8
    image = photo[100:150, 150:220]
    clip8 = torch.stack([photo[180 + 2 * t: 212 + 2 * t, 200 + 3 * t: 232 + 3 * t] for t in range(8)])
    clip26 = torch.stack([photo[60 + t: 78 + t, 300 - 2 * t: 333 - 2 * t] for t in range(26)])
    return {"image": image.contiguous(), "clip8": clip8.contiguous(), "clip26": clip26.contiguous()}


def _voxel_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """20 distinct voxels of a 64^3 grid with 768 colour values each in [0, 1] (a 16x16 RGB patch)."""
    flat = torch.randperm(64**3, generator=generator)[:20].sort().values
    xyz = torch.stack([flat // 4096, flat // 64 % 64, flat % 64], dim=1).int()
    return {"voxel_xyz": xyz, "voxel_colours": torch.rand(20, 768, generator=generator)}


def _run(model, sparse_cls, x, use_quantizer: bool) -> dict[str, torch.Tensor]:
    """What ``ATokenWrapper.inference`` computes, with the posterior mean instead of a sample."""
    from atoken_inference.model.utils import DiagonalGaussianDistribution

    z, pooled, features = model.encode(x, normalize=True)
    posterior = DiagonalGaussianDistribution(z)
    out = {"features": features.feats, "pooled": pooled, "mean": posterior.mean, "logvar": posterior.logvar}
    if use_quantizer:
        quantized, indices, _ = model.quantizer(z.feats[:, : model.quantizer_feature_dim])
        out.update(quantized=quantized, codes=indices.long())
        out["recon_quantized"] = model.decode(z.replace(quantized), training=False).sample.feats
    else:
        out["recon_mean"] = model.decode(z.replace(posterior.mean), training=False).sample.feats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of apple/ml-atoken")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.official).resolve()))
    _install_stand_ins()
    from atoken_inference.model.autoencoder_kl import AutoencoderKL
    from atoken_inference.model.basic import SparseTensor
    from atoken_inference.model.utils import image_to_sparse

    torch.set_grad_enabled(False)
    OUT.mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(SEED)
    inputs = {**_photo_inputs(), **_voxel_inputs(generator)}
    save_file(inputs, OUT / "inputs.safetensors", metadata={"official_commit": "3f5afdc"})

    # The official wrapper's image_video_to_sparse_tensor: per sample image_to_sparse on
    # [-1, 1] pixels, a batch index in front, samples concatenated.
    feats, coords = [], []
    for i, name in enumerate(("image", "clip8", "clip26")):
        f, c = image_to_sparse(inputs[name].float() / 127.5 - 1.0, [4, 16, 16])
        feats.append(f)
        coords.append(torch.cat([torch.full_like(c[:, :1], i), c], dim=1))
    batch = SparseTensor(feats=torch.cat(feats), coords=torch.cat(coords).int())
    # 3D through the main model (ATokenWrapper.inference_3d): colours * 2 - 1, zero-padded to
    # 3072 values, coordinates (batch, t, X, Y, Z).
    xyz = inputs["voxel_xyz"]
    voxels = SparseTensor(
        feats=torch.nn.functional.pad(inputs["voxel_colours"] * 2 - 1, (0, 3072 - 768)),
        coords=torch.cat([torch.zeros_like(xyz[:, :2]), xyz], dim=1).int(),
    )

    for name, arch in CONFIGS.items():
        torch.manual_seed(SEED + len(name))
        model = AutoencoderKL(**arch).eval()
        _perturb(model, generator)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if name == "soc":  # a training wrapper's LPIPS tensors, which a loader must ignore by name
            state["lpips_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1, generator=generator)
        torch.save(state, OUT / f"{name}.pt")
        config = {"model": {"class_name": "models.pretrained.autoencoder_kl.AutoencoderKLTrain",
                            "model_cfg": {"disentangle_itc_rec": True, "arch_cfg": copy.deepcopy(arch)}}}
        (OUT / f"{name}.yaml").write_text(f"# reduced {name} configuration of make_fixtures.py\n---\n"
                                          + yaml.safe_dump(config, sort_keys=False))
        use_q = arch.get("use_quantizer", False)
        results = {"official_coords": batch.coords.long()}
        results.update(_run(model, SparseTensor, batch, use_q))
        for key, value in _run(model, SparseTensor, voxels, use_q).items():
            if key.startswith("recon"):
                value = value[:, :768]  # the main decoder's 3D output: the first 768 values per voxel
            results[f"voxel_{key}"] = value
        results = {k: v.contiguous() for k, v in results.items()}
        save_file(results, OUT / f"{name}-outputs.safetensors",
                  metadata={"official_commit": "3f5afdc", "torch": torch.__version__})
        sizes = sum((OUT / f).stat().st_size for f in (f"{name}.pt", f"{name}-outputs.safetensors"))
        print(f"{name}: {sum(v.numel() for v in model.state_dict().values()):,} parameters, "
              f"{batch.coords.shape[0]} + {xyz.shape[0]} tokens, {sizes / 1e6:.2f} MB")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
