"""3D Gaussians for the 3D decoder head, and a differentiable splatting renderer.

The decoder emits ``GAUSSIAN_PARAMS`` raw numbers per Gaussian, ``K`` Gaussians per occupied
voxel (paper, pipeline item 4); :func:`gaussians_from_raw` turns them into :class:`Gaussians`,
:func:`render` draws them into camera views (:mod:`atoken_modalities.cameras` conventions), and
:func:`save_ply` / :func:`load_ply` exchange them with common 3DGS viewers.

Two render backends with one set of conventions (those of gsplat 1.5, ``rasterize_mode="classic"``,
``packed=False``):

* ``"torch"``: ours, plain torch, runs anywhere (CPU included), differentiable through autograd.
  EWA projection as in 3DGS/gsplat (``cov2d = J W cov3d W^T J^T + eps2d I``, Jacobian evaluated at
  the mean clamped to 1.3x the field of view), depth-sorted front-to-back compositing with
  ``alpha = min(0.999, opacity * exp(-d^T conic d / 2))``; like gsplat's kernel it skips
  ``alpha < 1/255`` and stops a pixel before the Gaussian that would bring its transmittance to
  ``<= 1e-4``, so both backends compute the same function (up to float rounding), not just a
  similar one. Pixels are processed tile by tile; each tile only sees the Gaussians whose
  opacity-aware bounding box (gsplat's) touches it, and a tile's Gaussians are composited in
  depth chunks carrying the transmittance, so one step never holds more than ``max_elements``
  pixel x Gaussian pairs; a view that needs more than one step is checkpointed, its backward
  pass recomputing chunk by chunk instead of keeping every chunk's intermediates, so memory stays
  bounded by ``max_elements`` (plus a few numbers per tile pixel and depth chunk).
* ``"gsplat"``: ``gsplat.rasterization`` (CUDA tensors, gsplat's compiled kernels).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence

import attrs
import fsspec
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from atoken_core.io import atomic_write_bytes
from atoken_modalities.cameras import Cameras, orbit_cameras

GAUSSIAN_PARAMS = 14  # 3 offset + 3 colour + 1 opacity + 3 scale + 4 rotation

# gsplat's rasteriser constants (RasterizeToPixels3DGSFwd.cu, ProjectionEWA3DGSFused.cu)
ALPHA_THRESHOLD = 1.0 / 255.0  # fainter contributions are skipped
MAX_ALPHA = 0.999  # one Gaussian never fully hides what is behind it (keeps 1 - alpha > 0)
MIN_TRANSMITTANCE = 1e-4  # a pixel stops before the Gaussian that would make it this opaque
MAX_EXTENT = 3.33  # bounding box half-size in standard deviations (before the opacity-aware cut)

SH_C0 = 0.28209479177387814  # degree-0 spherical harmonic: .ply colours are f_dc = (rgb - 0.5) / SH_C0
PLY_PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                  "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")

# gaussians_from_raw: raw 0 gives a Gaussian of standard deviation half a voxel (its 3-sigma
# footprint spans ~3 voxels, so neighbours overlap and a surface starts without holes), and the
# log-scale is clamped to [1/100, 4] voxels: below, a Gaussian is far under a pixel of any view we
# render (eps2d dominates, it only wastes work); above, one Gaussian smears over a large part of a
# 64^3 object and every tile of the rasteriser has to visit it.
SCALE_INIT_VOXELS = 0.5
SCALE_RANGE_VOXELS = (0.01, 4.0)


@attrs.frozen(eq=False)
class Gaussians:
    """``N`` 3D Gaussians in world space. ``quats`` are (w, x, y, z); the renderer normalises them."""

    means: torch.Tensor  # (N, 3)
    colors: torch.Tensor  # (N, 3) RGB in [0, 1]
    opacities: torch.Tensor  # (N,) in (0, 1)
    scales: torch.Tensor  # (N, 3) standard deviations along the local axes, world units, > 0
    quats: torch.Tensor  # (N, 4) unit quaternions (w, x, y, z)

    def __attrs_post_init__(self) -> None:
        n = self.means.shape[0] if self.means.ndim == 2 else -1
        expected = {"means": (n, 3), "colors": (n, 3), "opacities": (n,), "scales": (n, 3), "quats": (n, 4)}
        got = {name: tuple(getattr(self, name).shape) for name in expected}
        if n < 0 or got != expected:
            raise ValueError(f"gaussians: expected means (N, 3), colors (N, 3), opacities (N,), scales (N, 3), "
                             f"quats (N, 4), got {got}")

    def __len__(self) -> int:
        return self.means.shape[0]

    def _map(self, fn) -> Gaussians:
        return Gaussians(*(fn(getattr(self, f.name)) for f in attrs.fields(Gaussians)))

    def detach(self) -> Gaussians:
        return self._map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> Gaussians:
        return self._map(lambda t: t.to(*args, **kwargs))

    @classmethod
    def cat(cls, parts: Sequence[Gaussians]) -> Gaussians:
        if not parts:
            raise ValueError("Gaussians.cat: nothing to concatenate")
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in attrs.fields(cls)))


def gaussians_from_raw(raw_lkp: torch.Tensor, centres_l3: torch.Tensor, voxel_size: float) -> Gaussians:
    """Decoder output ``(L, K * GAUSSIAN_PARAMS)`` for ``L`` voxels with centres ``(L, 3)`` ->
    ``L * K`` Gaussians (voxel-major). Per Gaussian: offset 3, colour 3, opacity 1, scale 3, rotation 4."""
    if raw_lkp.ndim != 2 or raw_lkp.shape[1] % GAUSSIAN_PARAMS or centres_l3.shape != (raw_lkp.shape[0], 3):
        raise ValueError(f"gaussians_from_raw: expected raw (L, K*{GAUSSIAN_PARAMS}) and centres (L, 3), "
                         f"got {tuple(raw_lkp.shape)} and {tuple(centres_l3.shape)}")
    if not voxel_size > 0:
        raise ValueError(f"gaussians_from_raw: voxel_size must be positive, got {voxel_size}")
    raw = rearrange(raw_lkp, "l (k p) -> l k p", p=GAUSSIAN_PARAMS)
    offset, colour, opacity, scale, rot = raw.split([3, 3, 1, 3, 4], dim=-1)
    # The paper's x = p + tanh(o) in voxel units: a Gaussian can never leave its voxel's
    # neighbourhood, so the sparse structure the encoder saw stays where the decoder draws.
    means = centres_l3[:, None, :].to(raw.dtype) + voxel_size * torch.tanh(offset)
    # Log-scale squashed smoothly into the allowed range (a sigmoid, not a clamp): a clamp's zero
    # gradient would leave a Gaussian that once shrank to the floor stuck there as a dot.
    lo, hi = (math.log(s) for s in SCALE_RANGE_VOXELS)
    at_init = (math.log(SCALE_INIT_VOXELS) - lo) / (hi - lo)
    log_scale = lo + (hi - lo) * torch.sigmoid(scale + math.log(at_init / (1 - at_init)))
    scales = voxel_size * torch.exp(log_scale)
    # Raw 0 is the identity rotation. Dividing by the largest component first keeps the squares in
    # the norm from overflowing on extreme inputs; an all-zero quaternion falls back to identity.
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=raw.dtype, device=raw.device)
    quat = rot + identity
    quat = quat / quat.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny)
    norm = quat.norm(dim=-1, keepdim=True)
    quats = torch.where(norm > 1e-6, quat / norm.clamp_min(1e-6), identity)
    flat = lambda t: rearrange(t, "l k c -> (l k) c")  # noqa: E731
    return Gaussians(flat(means), flat(torch.sigmoid(colour)), flat(torch.sigmoid(opacity))[:, 0], flat(scales),
                     flat(quats))


def quat_to_rotmat(quats_n4: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotation matrices of (w, x, y, z) quaternions (normalised here, like gsplat)."""
    w, x, y, z = F.normalize(quats_n4, dim=-1).unbind(-1)
    rows = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return rearrange(torch.stack(rows, dim=-1), "n (i j) -> n i j", i=3)


@attrs.frozen(eq=False)
class Projection:
    """Gaussians seen by ``V`` cameras, gsplat's ``fully_fused_projection`` outputs."""

    means2d: torch.Tensor  # (V, N, 2) pixel coordinates (u, v)
    depths: torch.Tensor  # (V, N) camera z
    conics: torch.Tensor  # (V, N, 3) upper triangle (a, b, c) of the inverse 2D covariance
    radii: torch.Tensor  # (V, N, 2) int32 bounding-box half sizes in pixels; 0 = not drawn


def project(gaussians: Gaussians, cameras: Cameras, *, near: float = 0.01, eps2d: float = 0.3,
            opacity_aware: bool = True) -> Projection:
    """EWA splatting projection, as gsplat's (pinhole, classic). ``opacity_aware`` shrinks the
    3.33-sigma box to where ``alpha >= 1/255`` and drops Gaussians fainter than that, as gsplat's
    CUDA kernel does when given opacities; without it the radii are those of gsplat's torch
    reference ``_fully_fused_projection``."""
    dtype = gaussians.means.dtype
    K, w2c = cameras.K.to(dtype), cameras.w2c.to(dtype)
    rot_v33, trans_v3 = w2c[:, :3, :3], w2c[:, :3, 3]
    m_n33 = quat_to_rotmat(gaussians.quats) * gaussians.scales[:, None, :]  # R S
    cov_n33 = m_n33 @ m_n33.transpose(1, 2)
    mean_c = torch.einsum("vij,nj->vni", rot_v33, gaussians.means) + trans_v3[:, None]
    cov_c = torch.einsum("vij,njk,vlk->vnil", rot_v33, cov_n33, rot_v33)
    tx, ty, tz = mean_c.unbind(-1)
    in_depth = tz > near
    # Behind-the-camera Gaussians are dropped below; a safe z keeps their NaNs out of the gradients.
    z = torch.where(in_depth, tz, torch.ones_like(tz))
    fx, fy, cx, cy = (K[:, 0, 0, None], K[:, 1, 1, None], K[:, 0, 2, None], K[:, 1, 2, None])
    # gsplat evaluates the Jacobian at the mean clamped to 1.3x the field of view, which keeps the
    # footprint of Gaussians far off-screen (where the linearisation is poor) from blowing up.
    lim_x, lim_y = 0.3 * 0.5 * cameras.width / fx, 0.3 * 0.5 * cameras.height / fy
    jx = z * torch.clamp(tx / z, min=-(cx / fx + lim_x), max=(cameras.width - cx) / fx + lim_x)
    jy = z * torch.clamp(ty / z, min=-(cy / fy + lim_y), max=(cameras.height - cy) / fy + lim_y)
    zero = torch.zeros_like(z)
    jac = rearrange(torch.stack([fx / z, zero, -fx * jx / z**2, zero, fy / z, -fy * jy / z**2], -1),
                    "v n (i j) -> v n i j", i=2)
    cov2d = jac @ cov_c @ jac.transpose(-1, -2) + eps2d * torch.eye(2, dtype=dtype, device=z.device)
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = a * c - b * b
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)
    means2d = torch.stack([fx * tx / z + cx, fy * ty / z + cy], dim=-1)

    with torch.no_grad():
        extent = torch.full_like(z, MAX_EXTENT)
        visible = in_depth & (det > 0)
        if opacity_aware:
            op = gaussians.opacities.detach()[None].expand_as(z)
            visible &= op >= ALPHA_THRESHOLD
            # Beyond this Mahalanobis radius alpha < 1/255 (arXiv 2402.00525, B.2).
            extent = extent.clamp_max(torch.sqrt(2 * torch.log(op.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)))
        radii = torch.ceil(extent[..., None] * torch.stack([a, c], -1).clamp_min(0).sqrt())
        u, v = means2d.unbind(-1)
        visible &= ((u + radii[..., 0] > 0) & (u - radii[..., 0] < cameras.width)
                    & (v + radii[..., 1] > 0) & (v - radii[..., 1] < cameras.height))
        radii = torch.where(visible[..., None], radii, torch.zeros_like(radii)).int()
    return Projection(means2d, tz, conics, radii)


def _background_v3(background, n_views: int, dtype, device) -> torch.Tensor:
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.ndim == 0:
        bg = bg.expand(3)
    if bg.shape not in ((3,), (n_views, 3)):
        raise ValueError(f"render: background must be a float, (3,) or (V, 3) = ({n_views}, 3), got {tuple(bg.shape)}")
    return bg.expand(n_views, 3)


def render(gaussians: Gaussians, cameras: Cameras, *, background: float | Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
           backend: str = "auto", near: float = 0.01, eps2d: float = 0.3, tile_size: int | None = None,
           max_elements: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``gaussians`` into every camera: ``(rgb (V, 3, H, W), alpha (V, 1, H, W))``, rgb blended
    over ``background`` (a float, (3,) or (V, 3)). ``backend``: "torch", "gsplat" (CUDA) or "auto"
    (gsplat for CUDA tensors when it and its CUDA extension load, else torch). ``tile_size``
    (default 8 for torch: voxel-sized splats cover few pixels, and smaller tiles cull more; 16 for
    gsplat, its own default) and ``max_elements`` (pixel x Gaussian pairs per step, torch only)
    change speed and memory, not the image."""
    if backend not in ("auto", "torch", "gsplat"):
        raise ValueError(f"render: backend must be 'auto', 'torch' or 'gsplat', got {backend!r}")
    if not isinstance(gaussians, Gaussians) or not isinstance(cameras, Cameras):
        raise ValueError(f"render: expected Gaussians and Cameras, got {type(gaussians).__name__} and "
                         f"{type(cameras).__name__}")
    if (tile_size is not None and tile_size < 1) or max_elements < 1 or cameras.height < 1 or cameras.width < 1:
        raise ValueError(f"render: tile_size, max_elements and the image size must be positive, got {tile_size}, "
                         f"{max_elements}, {cameras.height}x{cameras.width}")
    means = gaussians.means
    bg_v3 = _background_v3(background, len(cameras), means.dtype, means.device)
    if backend == "auto":
        backend = "gsplat" if means.is_cuda and _gsplat()[0] is not None else "torch"
    if backend == "gsplat":
        return _render_gsplat(gaussians, cameras, bg_v3, near=near, eps2d=eps2d, tile_size=tile_size or 16)
    tile_size = tile_size or 8
    proj = project(gaussians, cameras.to(means.device), near=near, eps2d=eps2d)
    rgb, alpha = [], []
    for v in range(len(cameras)):
        color_hwc, trans_hw = _rasterize_view(proj.means2d[v], proj.conics[v], gaussians.colors, gaussians.opacities,
                                              proj.depths[v], proj.radii[v], cameras.height, cameras.width,
                                              tile_size, max_elements)
        rgb.append(color_hwc + trans_hw[..., None] * bg_v3[v])
        alpha.append(1 - trans_hw)
    return rearrange(torch.stack(rgb), "v h w c -> v c h w"), rearrange(torch.stack(alpha), "v h w -> v 1 h w")


def _rasterize_view(means2d_n2, conics_n3, colors_n3, opacities_n, depths_n, radii_n2, height: int, width: int,
                    tile_size: int, max_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back compositing of one view: (colour without background (H, W, 3), transmittance (H, W))."""
    dtype, device = means2d_n2.dtype, means2d_n2.device
    ts, tiles_x, tiles_y = tile_size, -(-width // tile_size), -(-height // tile_size)
    n_tiles, n_pix = tiles_x * tiles_y, tile_size * tile_size
    with torch.no_grad():
        # Visible Gaussians in depth order, then the (tile, Gaussian) pairs their boxes cover, grouped
        # by tile with depth order kept (a stable sort): gsplat's isect_tiles + sort.
        ids = (radii_n2 > 0).all(-1).nonzero()[:, 0]
        ids = ids[torch.argsort(depths_n[ids], stable=True)]
        centre, radius = means2d_n2[ids].detach(), radii_n2[ids].to(dtype)
        tile_max = torch.tensor([tiles_x, tiles_y], device=device)
        lo = torch.minimum(torch.floor((centre - radius) / ts).long().clamp_min(0), tile_max)
        hi = torch.minimum(torch.ceil((centre + radius) / ts).long().clamp_min(0), tile_max)
        span = hi - lo
        counts = span.prod(-1)
        pair_g = torch.repeat_interleave(torch.arange(len(ids), device=device), counts)
        local = torch.arange(len(pair_g), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        pair_tile = ((lo[pair_g, 1] + local // span[pair_g, 0]) * tiles_x + lo[pair_g, 0] + local % span[pair_g, 0])
        pair_tile, order = torch.sort(pair_tile, stable=True)
        pair_g = ids[pair_g[order]]  # index into the view's N Gaussians
        per_tile = torch.bincount(pair_tile, minlength=n_tiles)
        tile_start = per_tile.cumsum(0) - per_tile
        busy = torch.argsort(per_tile, descending=True, stable=True)
        busy = busy[per_tile[busy] > 0].tolist()
        offs = torch.arange(ts, device=device, dtype=dtype) + 0.5  # pixel centres inside a tile
        pix_p2 = torch.stack(torch.meshgrid(offs, offs, indexing="xy"), -1).reshape(n_pix, 2)

    color_tp3 = torch.zeros(n_tiles, n_pix, 3, dtype=dtype, device=device)
    trans_tp = torch.ones(n_tiles, n_pix, dtype=dtype, device=device)
    # Tiles go busiest first, so the first tile of a group has the most Gaussians: the group is as
    # many tiles as fit the budget at that count, composited in depth chunks if even one tile does not.
    plan, i = [], 0
    while i < len(busy):
        most = int(per_tile[busy[i]])
        plan.append((busy[i:i + max(1, max_elements // (n_pix * most))], most))
        i += len(plan[-1][0])
    # Autograd keeps ~20 tensors per (pixel, Gaussian) pair until the backward pass; when a view
    # needs more than one step, checkpointing keeps only each chunk's inputs and recomputes the
    # rest chunk by chunk in the backward pass (~1.5x the time), so memory stays at one step's worth.
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means2d_n2, conics_n3, colors_n3, opacities_n))
    recompute = grad and sum(len(tiles) * n_pix * most for tiles, most in plan) > max_elements
    done_tiles, done_color, done_trans = [], [], []
    for tiles, most in plan:
        group = torch.tensor(tiles, device=device)
        chunk = max(1, min(most, max_elements // (len(group) * n_pix)))
        slot_gs = torch.arange(most, device=device)[None]
        in_tile_gs = slot_gs < per_tile[group, None]
        gauss_gs = pair_g[(tile_start[group, None] + slot_gs).clamp_max(len(pair_g) - 1)]
        origin = torch.stack([group % tiles_x, group // tiles_x], -1).to(dtype) * ts
        px, py = (origin[:, None, :] + pix_p2).unbind(-1)  # (G, P)
        color, trans = _composite(px, py, gauss_gs, in_tile_gs, means2d_n2, conics_n3, colors_n3, opacities_n, chunk,
                                  recompute)
        done_tiles.append(group)
        done_color.append(color)
        done_trans.append(trans)
    if done_tiles:
        tiles = torch.cat(done_tiles)
        color_tp3 = color_tp3.index_copy(0, tiles, torch.cat(done_color))
        trans_tp = trans_tp.index_copy(0, tiles, torch.cat(done_trans))
    image = lambda t: rearrange(t, "(ty tx) (py px) ... -> (ty py) (tx px) ...", tx=tiles_x, px=ts)  # noqa: E731
    return image(color_tp3)[:height, :width], image(trans_tp)[:height, :width]


def _composite(px_gp, py_gp, gauss_gs, in_tile_gs, means2d_n2, conics_n3, colors_n3, opacities_n, chunk: int,
               recompute: bool):
    """Composite each tile's depth-sorted Gaussians ``gauss_gs`` over its pixels, ``chunk``
    Gaussians at a time (checkpointed if ``recompute``): (colour (G, P, 3), transmittance (G, P))."""
    n_group, n_pix = px_gp.shape
    trans_gp = torch.ones_like(px_gp)
    color_gp3 = torch.zeros(n_group, n_pix, 3, dtype=px_gp.dtype, device=px_gp.device)
    done_gp = torch.zeros(n_group, n_pix, dtype=torch.bool, device=px_gp.device)
    for s0 in range(0, gauss_gs.shape[1], chunk):
        g_gs, live_gs = gauss_gs[:, s0:s0 + chunk], in_tile_gs[:, s0:s0 + chunk]
        args = (px_gp, py_gp, means2d_n2[g_gs], conics_n3[g_gs], opacities_n[g_gs], colors_n3[g_gs], live_gs, trans_gp,
                done_gp)
        if recompute:
            color_add, trans_gp, done_gp = checkpoint(_composite_chunk, *args, use_reentrant=False)
        else:
            color_add, trans_gp, done_gp = _composite_chunk(*args)
        color_gp3 = color_gp3 + color_add
    return color_gp3, trans_gp


def _composite_chunk(px_gp, py_gp, mean_gs2, conic_gs3, opacity_gs, color_gs3, live_gs, trans_gp, done_gp):
    """One depth chunk ``S`` of every tile of a group, in front of what has been composited so far
    (transmittance ``trans_gp``; ``done_gp`` pixels have stopped): (colour added (G, P, 3),
    transmittance after, done after)."""
    dx = px_gp[:, :, None] - mean_gs2[:, None, :, 0]  # (G, P, S)
    dy = py_gp[:, :, None] - mean_gs2[:, None, :, 1]
    a, b, c = (conic_gs3[:, None, :, k] for k in range(3))
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = (opacity_gs[:, None, :] * torch.exp(-sigma)).clamp_max(MAX_ALPHA)
    keep = live_gs[:, None, :] & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD) & ~done_gp[..., None]
    alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
    with torch.no_grad():
        # gsplat stops a pixel *before* the Gaussian that would take its transmittance to
        # <= 1e-4; transmittance only falls, so the Gaussians kept are a prefix per pixel.
        going = trans_gp.detach()[..., None] * torch.cumprod(1 - alpha.detach(), -1) > MIN_TRANSMITTANCE
        done_gp = done_gp | ~going[..., -1]
    alpha = torch.where(going, alpha, torch.zeros_like(alpha))
    trans_incl = torch.cumprod(1 - alpha, dim=-1)
    trans_excl = trans_gp[..., None] * torch.cat([torch.ones_like(trans_incl[..., :1]), trans_incl[..., :-1]], -1)
    color_gp3 = torch.einsum("gps,gsc->gpc", alpha * trans_excl, color_gs3)
    return color_gp3, trans_gp * trans_incl[..., -1], done_gp


@functools.cache
def _gsplat():
    """(gsplat.rasterization or None, why not). Importing gsplat's backend may JIT-build its CUDA
    extension (minutes, once); a failed build leaves ``_C`` None, and rasterization would fail late."""
    try:
        from gsplat import rasterization
        from gsplat.cuda._backend import _C
    except Exception as err:  # an import or a failed build: either way gsplat is unusable here
        return None, f"gsplat does not load ({type(err).__name__}: {err}); pip install gsplat"
    if _C is None:
        return None, "gsplat's CUDA extension is not built and cannot be built here (no CUDA toolkit)"
    return rasterization, ""


def _render_gsplat(gaussians: Gaussians, cameras: Cameras, bg_v3: torch.Tensor, *, near: float, eps2d: float,
                   tile_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not gaussians.means.is_cuda:
        raise ValueError("render: backend 'gsplat' needs CUDA tensors; use backend='torch' on CPU")
    rasterization, why = _gsplat()
    if rasterization is None:
        raise ValueError(f"render: backend 'gsplat' is unavailable: {why}")
    g, dev = gaussians.to(torch.float32), gaussians.means.device
    rgb_vhw3, alpha_vhw1, _ = rasterization(
        g.means, g.quats, g.scales, g.opacities, g.colors, viewmats=cameras.w2c.to(dev, torch.float32),
        Ks=cameras.K.to(dev, torch.float32), width=cameras.width, height=cameras.height, near_plane=near,
        eps2d=eps2d, tile_size=tile_size, backgrounds=bg_v3.float(), packed=False, rasterize_mode="classic")
    dtype = gaussians.means.dtype
    return (rearrange(rgb_vhw3, "v h w c -> v c h w").to(dtype), rearrange(alpha_vhw1, "v h w c -> v c h w").to(dtype))


def save_ply(gaussians: Gaussians, path: str) -> None:
    """Write the standard 3D Gaussian Splatting .ply (binary little endian, SH degree 0) that
    SuperSplat and the INRIA viewer open, to any fsspec path, atomically."""
    import numpy as np
    from plyfile import PlyData, PlyElement

    g = gaussians.detach().to("cpu", torch.float64)
    opacity = g.opacities.clamp(1e-7, 1 - 1e-7)  # logit stays finite
    columns = [g.means, torch.zeros_like(g.means), (g.colors - 0.5) / SH_C0, torch.logit(opacity)[:, None],
               torch.log(g.scales.clamp_min(1e-30)), F.normalize(g.quats, dim=-1)]
    table = torch.cat(columns, dim=1).numpy().astype(np.float32)
    vertices = np.empty(len(table), dtype=[(name, "<f4") for name in PLY_PROPERTIES])
    for k, name in enumerate(PLY_PROPERTIES):
        vertices[name] = table[:, k]
    buffer = io.BytesIO()
    PlyData([PlyElement.describe(vertices, "vertex")], text=False, byte_order="<").write(buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_ply(path: str) -> Gaussians:
    """Gaussians of a 3DGS .ply (float32). Only the degree-0 colour is read: higher spherical
    harmonics (``f_rest_*``) are ignored, and colours are clamped to [0, 1]."""
    import numpy as np
    from plyfile import PlyData, PlyParseError

    with fsspec.open(path, "rb") as f:
        data = f.read()
    try:
        vertex = PlyData.read(io.BytesIO(data))["vertex"]
        names = [p.name for p in vertex.properties]
    except (PlyParseError, KeyError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"{path}: not a readable .ply file with a vertex element ({err})") from None
    missing = [n for n in PLY_PROPERTIES if n not in names and not n.startswith("n")]
    if missing:
        raise ValueError(f"{path}: not a Gaussian-splatting .ply, missing vertex properties {missing}")
    column = lambda *keys: torch.from_numpy(np.stack([np.asarray(vertex[k], dtype=np.float32) for k in keys], 1))  # noqa: E731
    return Gaussians(
        means=column("x", "y", "z"),
        colors=(column("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5).clamp(0, 1),
        opacities=torch.sigmoid(column("opacity")[:, 0]),
        scales=torch.exp(column("scale_0", "scale_1", "scale_2")),
        quats=F.normalize(column("rot_0", "rot_1", "rot_2", "rot_3"), dim=-1),
    )


def turntable(gaussians: Gaussians, n_frames: int, radius: float, fov_deg: float, size: int,
              elevation_deg: float = 20.0, **render_kwargs) -> torch.Tensor:
    """``(T, 3, size, size)`` frames of a camera circling the +y axis (white background by default)."""
    cameras = orbit_cameras(n_frames, radius, fov_deg, size, elevation_deg).to(gaussians.means.device)
    return render(gaussians, cameras, **render_kwargs)[0]
