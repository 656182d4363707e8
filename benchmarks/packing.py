"""Does a packed batch cost the sum of its samples? (native resolution without padding)

    python benchmarks/packing.py [--flavor tiny]

Encodes images of mixed sizes (a) packed into one batch, (b) one by one, and (c) as a batch
where every image is padded to the largest one (what a padded implementation would pay).
Prints seconds and the ratios packed / sum-of-singles and packed / padded.
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

SIDES = [(64, 64), (128, 96), (256, 256), (96, 512), (512, 384)]




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", default="tiny")
    args = ap.parse_args()
    flavor = FLAVORS[args.flavor]
    bottleneck = get_registries()["bottleneck"].get("kl")
    model = AToken(flavor, bottleneck.build(bottleneck.config(), in_dim=flavor.width, latent_dim=32)).eval()
    modality = ImageModality(ImageConfig())
    images = [torch.rand(3, h, w) * 2 - 1 for h, w in SIDES]
    largest = max(SIDES, key=lambda s: s[0] * s[1])
    padded = [torch.rand(3, *largest) * 2 - 1 for _ in SIDES]

    def encode(batch):
        with torch.no_grad():
            model.encode(modality.patchify(batch, model.spec).patches)

    packed = median_seconds(lambda: encode(images))
    singles = sum(median_seconds(lambda x=x: encode([x])) for x in images)
    pad = median_seconds(lambda: encode(padded))
    tokens = modality.patchify(images, model.spec).patches.num_tokens
    print(f"flavor {args.flavor}, {len(images)} images {SIDES}, {tokens} tokens packed, threads {torch.get_num_threads()}")
    print("| encode | seconds | ratio to packed |\n|---|---|---|")
    print(f"| packed batch | {packed:.3f} | 1.00 |")
    print(f"| one by one (sum) | {singles:.3f} | {singles / packed:.2f} |")
    print(f"| padded to largest {largest} | {pad:.3f} | {pad / packed:.2f} |")


if __name__ == "__main__":
    main()
