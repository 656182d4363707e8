"""How fast is the pure-torch Gaussian rasteriser, and how does it scale?

    python benchmarks/gaussian_render.py

Gaussians decoded (gaussians_from_raw with random raw outputs) on the surface voxels of a
sphere at several grid sizes, rendered into one square view; prints the median seconds of a
forward pass and of forward + backward, and the cost per Gaussian relative to the smallest
case (flat = the tiling keeps work proportional to what each tile sees).
"""

from __future__ import annotations

import functools

import torch
from _timing import median_seconds

from atoken_modalities.cameras import sphere_cameras
from atoken_modalities.gaussians import GAUSSIAN_PARAMS, gaussians_from_raw, render
from atoken_modalities.mesh_render import normalise, surface_voxels, voxel_centres
from atoken_modalities.objects_impl import primitive

CASES = [(16, 64, 2), (32, 64, 2), (64, 64, 1), (64, 256, 1)]  # (voxel grid, view side, Gaussians per voxel)


def forward(raw: torch.Tensor, centres: torch.Tensor, res: int, cams) -> torch.Tensor:
    return render(gaussians_from_raw(raw, centres, 1.0 / res), cams, backend="torch")[0]


def forward_backward(raw: torch.Tensor, centres: torch.Tensor, res: int, cams) -> None:
    raw.grad = None
    forward(raw, centres, res, cams).mean().backward()


def main() -> None:
    torch.manual_seed(0)
    v, f = primitive("icosphere")
    v = normalise(v)
    base = None
    print(f"{'grid':>5} {'view':>5} {'gaussians':>9} {'fwd s':>7} {'fwd+bwd s':>9} {'us/gaussian (fwd+bwd)':>22} {'vs first':>8}")
    for res, side, k in CASES:
        vox = surface_voxels(v, f, res)
        centres = voxel_centres(vox, res).float()
        raw = (torch.randn(len(vox), k * GAUSSIAN_PARAMS) * 0.5).requires_grad_()
        cams = sphere_cameras(1, 2.0, 40.0, side)

        with torch.no_grad():
            t_fwd = median_seconds(functools.partial(forward, raw, centres, res, cams), repeats=3)
        t_fb = median_seconds(functools.partial(forward_backward, raw, centres, res, cams), repeats=3)
        n = len(vox) * k
        per = t_fb / n * 1e6
        base = base or per
        print(f"{res:>4}^3 {side:>5} {n:>9} {t_fwd:>7.3f} {t_fb:>9.3f} {per:>22.1f} {per / base:>8.2f}")


if __name__ == "__main__":
    main()
