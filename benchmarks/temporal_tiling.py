"""Peak memory of encoding + decoding a video as its duration grows, with and without
temporal tiling (KV cache of the previous tile).

    python benchmarks/temporal_tiling.py [--flavor tiny] [--side 128] [--frames 17]

Each (mode, duration) runs in a fresh process; its peak resident memory above what the
process held once the model and the video were loaded is reported (ru_maxrss high-water
mark). Durations: 1x, 4x and 16x ``--frames``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(flavor: str, side: int, frames: int, tile: int) -> None:
    import torch

    from atoken_core.flavors import FLAVORS
    from atoken_core.model import AToken
    from atoken_core.plugin_manager import get_registries
    from atoken_modalities.video import VideoConfig
    from atoken_modalities.video_impl import VideoModality

    torch.manual_seed(0)
    fl = FLAVORS[flavor]
    kl = get_registries()["bottleneck"].get("kl")
    model = AToken(fl, kl.build(kl.config(), in_dim=fl.width, latent_dim=32)).eval()
    video = torch.rand(frames, 3, side, side) * 2 - 1
    tokens = VideoModality(VideoConfig()).patchify([video], model.spec).patches
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad():
        if tile:
            latent = tokens.with_features(model.bottleneck.encode_project(model.encode_tiled(tokens, tile)))
            model.decode_tiled(latent, tile, model.spec.temporal_patch)
        else:
            latent = tokens.with_features(model.encode_latent(tokens))
            model.decode(latent, model.spec.temporal_patch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": tokens.num_tokens, "extra_mib": (peak - base) / 1024,
                      "seconds": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--tile", type=int, default=2, help="temporal blocks per tile")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        flavor, side, frames, tile = args.child
        child(flavor, int(side), int(frames), int(tile))
        return
    rows = {}
    for mode, tile in (("untiled", 0), ("tiled", args.tile)):
        for mult in (1, 4, 16):
            out = subprocess.run([sys.executable, __file__, "--child", args.flavor, str(args.side),
                                  str(args.frames * mult), str(tile)], capture_output=True, text=True, check=True)
            rows[mode, mult] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"flavor {args.flavor}, {args.side}x{args.side} frames, tile = {args.tile} temporal blocks, encode + decode")
    print("| duration | tokens | untiled extra MiB | tiled extra MiB | untiled s | tiled s |\n|---|---|---|---|---|---|")
    for mult in (1, 4, 16):
        u, t = rows["untiled", mult], rows["tiled", mult]
        print(f"| {mult}x ({args.frames * mult} frames) | {u['tokens']} | {u['extra_mib']:.0f} | {t['extra_mib']:.0f} "
              f"| {u['seconds']:.2f} | {t['seconds']:.2f} |")
    r = rows["tiled", 16]["extra_mib"] / max(rows["tiled", 1]["extra_mib"], 1e-9)
    print(f"tiled peak 16x / 1x: {r:.2f}; untiled: {rows['untiled', 16]['extra_mib'] / max(rows['untiled', 1]['extra_mib'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
