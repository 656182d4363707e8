"""How close atoken comes to Apple's inference code: the largest absolute difference of every
output against the golden fixtures of tests/official/ (written by Apple's code), per model.

    python benchmarks/official_parity.py

Converts each fixture with the real ``import-official`` command into a temporary folder, then
runs the fixtures' packed batch (image, 8-frame clip, 26-frame clip) and 3D voxel sample
through the converted model. The tests assert 1e-4; this prints what is actually reached.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "official" / "fixtures"


def main() -> None:
    import atoken
    from atoken_core.cli import main as cli
    from atoken_core.sparse import Sparse4D

    torch.set_grad_enabled(False)
    inputs = load_file(FIXTURES / "inputs.safetensors")
    pixels = {k: rearrange(inputs[k], "... h w c -> ... c h w").float() / 127.5 - 1 for k in ("image", "clip8", "clip26")}
    xyz = inputs["voxel_xyz"].long()
    voxels = Sparse4D.single(inputs["voxel_colours"] * 2 - 1,
                             torch.stack([torch.zeros_like(xyz[:, 0]), xyz[:, 1], xyz[:, 0], xyz[:, 2]], 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("soc", "sod", "s1"):
            out = f"{tmp}/{name}.safetensors"
            if cli(["import-official", str(FIXTURES / f"{name}.pt"), "--config", str(FIXTURES / f"{name}.yaml"),
                    "-o", out]):
                sys.exit(1)
            ref = load_file(FIXTURES / f"{name}-outputs.safetensors")
            tok = atoken.load(out, device="cpu")
            model, spec = tok.model, tok.model.spec
            from atoken_modalities.video import VideoConfig
            from atoken_modalities.video_impl import VideoModality

            image = tok.modality("image").patchify([pixels["image"]], spec).patches
            clips = VideoModality(VideoConfig(size_policy="crop")).patchify([pixels["clip8"], pixels["clip26"]], spec)
            for label, tokens, prefix in (("batch", Sparse4D.pack([image, *clips.patches.split()]), ""),
                                          ("3d", voxels, "voxel_")):
                features = model.encode(tokens)
                out_b = model.bottleneck(features, sample=False)
                diffs = {"features": features - ref[prefix + "features"],
                         "pooled": F.normalize(model.semantic_embedding(features, tokens), dim=-1) - ref[prefix + "pooled"]}
                recon = model.decode(tokens.with_features(out_b.latent), frames=4 if label == "batch" else 1)
                if tok.discrete:
                    diffs["quantised"] = out_b.latent - ref[prefix + "quantized"]
                    diffs["reconstruction"] = recon - ref[prefix + "recon_quantized"]
                    codes = "identical" if torch.equal(out_b.codes, ref[prefix + "codes"]) else "DIFFER"
                else:
                    post = out_b.aux["posterior"]
                    diffs["mean"] = post.mean - ref[prefix + "mean"]
                    diffs["logvar"] = post.logvar - ref[prefix + "logvar"]
                    diffs["reconstruction"] = recon - ref[prefix + "recon_mean"]
                    codes = "-"
                rows.append((name, label, tokens.num_tokens, {k: float(v.abs().max()) for k, v in diffs.items()}, codes))
    keys = ["features", "pooled", "mean", "logvar", "quantised", "reconstruction"]
    print(f"{'model':<5} {'input':<6} {'tokens':>6}  " + "  ".join(f"{k:>14}" for k in keys) + "  FSQ codes")
    for name, label, n, diffs, codes in rows:
        cells = "  ".join(f"{diffs[k]:>14.2e}" if k in diffs else f"{'-':>14}" for k in keys)
        print(f"{name:<5} {label:<6} {n:>6}  {cells}  {codes}")
    print(f"max over everything: {max(max(d.values()) for *_, d, _ in rows):.2e} (tests assert 1e-4)")


if __name__ == "__main__":
    main()
