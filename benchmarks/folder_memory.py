"""Peak memory of an image folder data source against the folder's size.

    python benchmarks/folder_memory.py [--small 100] [--large 5000] [--side 96] [--batches 10]

Writes two folders of random PNGs (``--small`` and ``--large`` files of ``--side`` pixels), then,
each in a fresh process (so one's peak cannot hide the other's), builds the ``image_folder``
source over each, draws ``--batches`` training batches of 16 crops and reads the held-out set,
and reports the process's peak resident memory (``ru_maxrss``). For reference the same is
measured for the eager pattern the source replaced (every training image decoded into float32 at
start-up). The issue's target: the large folder within 1.2x of the small one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
import torch
from atoken_modalities.photos import ImageFolderConfig
from atoken_modalities.photos_impl import image_folder
from atoken_modalities.image_impl import load_image
from atoken_core.io import files_under

root, held, mode, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "stream":
    source = image_folder(ImageFolderConfig(root=root, eval_root=held, crop=64))
    for step in range(batches):
        source.train_batch(16, torch.Generator().manual_seed(step))
    source.eval_samples()
else:  # what the folder source did before: every training image in memory as float32
    kept = [load_image(url) for _, url in files_under(root, [".png"])]
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "after_imports_kib": before}))
"""


def write_folder(root: Path, n: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / f"{i:06d}.png")


def peak(root: Path, held: Path, mode: str, batches: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(held), mode, str(batches)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=100)
    p.add_argument("--large", type=int, default=5000)
    p.add_argument("--side", type=int, default=96)
    p.add_argument("--batches", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        held = Path(tmp) / "held"
        write_folder(held, 4, args.side)
        rows = {}
        for n in (args.small, args.large):
            write_folder(Path(tmp) / f"train{n}", n, args.side)
            for mode in ("stream", "eager"):
                rows[(mode, n)] = peak(Path(tmp) / f"train{n}", held, mode, args.batches)
    print(f"image_folder, {args.side}x{args.side} PNGs, {args.batches} batches of 16 crops of 64 + the held-out set")
    print(f"{'source':<34} {args.small:>8} files {args.large:>8} files   ratio")
    for mode, label in (("stream", "streaming (this code)"), ("eager", "every image decoded (before)")):
        a, b = rows[(mode, args.small)]["peak_kib"], rows[(mode, args.large)]["peak_kib"]
        print(f"{label:<34} {a / 1024:>10.0f} MiB {b / 1024:>10.0f} MiB   {b / a:5.2f}x")


if __name__ == "__main__":
    main()
