"""Encode and decode speed against diffusers' AutoencoderKL (the SD-VAE architecture), same
process, same inputs, random weights (speed does not depend on them).

    pip install diffusers   # the `bench` extra
    python benchmarks/vs_sd_vae.py [--flavors tiny,base] [--sides 256,512] [--batch 2]

Prints seconds per batch and images/s for both, and the ratio ours / theirs (time).
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_seconds

from atoken_core.flavors import FLAVORS
from atoken_core.model import AToken
from atoken_core.plugin_manager import get_registries
from atoken_modalities.image import ImageConfig
from atoken_modalities.image_impl import ImageModality




def sd_vae():
    from diffusers import AutoencoderKL

    # Stable Diffusion's VAE configuration (4 latent channels, 8x downsampling).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512,
    ).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavors", default="tiny,base")
    ap.add_argument("--sides", default="256,512")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    vae = sd_vae()
    kl = get_registries()["bottleneck"].get("kl")
    modality = ImageModality(ImageConfig())
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, fp32, no_grad")
    print("| model | side | encode s | decode s | images/s (enc+dec) | time vs SD-VAE |\n|---|---|---|---|---|---|")
    for side in map(int, args.sides.split(",")):
        x = torch.rand(args.batch, 3, side, side) * 2 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
            enc_ref = median_seconds(lambda x=x: vae.encode(x).latent_dist.mode(), args.repeats)
            dec_ref = median_seconds(lambda z=z: vae.decode(z).sample, args.repeats)
        ref = enc_ref + dec_ref
        print(f"| SD-VAE (diffusers AutoencoderKL) | {side} | {enc_ref:.3f} | {dec_ref:.3f} | {args.batch / ref:.2f} | 1.00 |")
        for name in args.flavors.split(","):
            fl = FLAVORS[name]
            model = AToken(fl, kl.build(kl.config(), in_dim=fl.width, latent_dim=32)).eval()
            tokens = modality.patchify(list(x), model.spec).patches
            with torch.no_grad():
                latent = tokens.with_features(model.encode_latent(tokens))
                enc = median_seconds(lambda t=tokens, m=model: m.encode_latent(t), args.repeats)
                dec = median_seconds(lambda z=latent, m=model: m.decode(z), args.repeats)
            print(f"| atoken {name} | {side} | {enc:.3f} | {dec:.3f} | {args.batch / (enc + dec):.2f} | "
                  f"{(enc + dec) / ref:.2f} |")


if __name__ == "__main__":
    main()
