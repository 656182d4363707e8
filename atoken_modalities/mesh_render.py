"""Meshes on the CPU: loading (trimesh), normalising into the unit cube, a vertex-colour field
for meshes that carry none, a z-buffer rasteriser in torch, and surface voxelisation.

Why our own rasteriser: the views only need to be rendered once per asset, on a machine with
no GPU and no display. A z-buffer over barycentric edge functions is a few dozen lines of
torch, vectorised over faces and pixels, and gives depth maps (which back-projection needs for
occlusion) from the same pass. trimesh's ray casting is the independent reference in the
tests; pyrender/OpenGL need a display or EGL, and gsplat does not rasterise on CPU.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from atoken_core.errors import UserError
from atoken_core.io import read_input
from atoken_modalities.cameras import Cameras

MESH_SUFFIXES = (".obj", ".ply", ".glb", ".gltf", ".off", ".stl")


class MeshError(UserError, ValueError):
    """A mesh that cannot be used, with the file it came from."""


def load_mesh(uri: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Read a mesh file (obj/ply/glb/off/stl; local path or fsspec URI) into float64 vertices
    (N, 3), int64 faces (F, 3) and vertex colours (N, 3) in [0, 1] when the file has them.
    Scenes (glb) are merged into one mesh. Every failure is a :class:`MeshError` naming the file."""
    suffix = os.path.splitext(uri.split("?")[0])[1].lower()
    if suffix not in MESH_SUFFIXES:
        raise MeshError(f"{uri}: unsupported mesh format {suffix!r} (expected one of {', '.join(MESH_SUFFIXES)})")
    return mesh_from_bytes(read_input(uri, MeshError), uri, suffix)


def mesh_from_bytes(data: bytes, name: str, suffix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An encoded mesh (``suffix`` like '.glb') as checked vertices, faces and vertex colours
    (None when it has none); errors name ``name``."""
    import io

    import trimesh

    ext = suffix.lstrip(".")
    if not data:
        raise MeshError(f"{name}: file is empty (0 bytes)")
    try:
        mesh = trimesh.load(io.BytesIO(data), file_type=ext, force="mesh", process=False)
    except Exception as err:  # trimesh raises many types for malformed files
        raise MeshError(f"{name}: not a readable {ext} mesh ({type(err).__name__}: {err})") from None
    if not isinstance(mesh, trimesh.Trimesh):
        raise MeshError(f"{name}: holds no triangle mesh (got {type(mesh).__name__})")
    vertices = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float64).copy())
    faces = torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64).copy())
    colors = None
    if mesh.visual.kind == "vertex":
        rgba = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)
        colors = torch.from_numpy(rgba[:, :3] / 255.0)
    check_mesh(vertices, faces, name)
    return vertices, faces, colors


def check_mesh(vertices: torch.Tensor, faces: torch.Tensor, where: str) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
        raise MeshError(f"{where}: mesh has no vertices (shape {tuple(vertices.shape)})")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise MeshError(f"{where}: mesh has no faces")
    if not torch.isfinite(vertices).all():
        bad = int((~torch.isfinite(vertices)).any(dim=1).sum())
        raise MeshError(f"{where}: {bad} vertices are NaN or infinite")
    if int(faces.min()) < 0 or int(faces.max()) >= len(vertices):
        raise MeshError(f"{where}: faces index vertices outside 0..{len(vertices) - 1}")
    extent = vertices.max(0).values - vertices.min(0).values
    if float(extent.max()) <= 0:
        raise MeshError(f"{where}: mesh is a single point (zero extent)")


def normalise(vertices: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """Centre the bounding box at the origin and scale its longest side to ``1 - 2*margin``,
    so the mesh sits inside the unit cube [-0.5, 0.5]^3 that the voxel grid covers."""
    lo, hi = vertices.min(0).values, vertices.max(0).values
    return (vertices - (lo + hi) / 2) * ((1 - 2 * margin) / (hi - lo).max())


def colour_field(points: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A smooth synthetic colour (N, 3) in [0.15, 0.95] from positions in the unit cube, for meshes
    that carry no colour: a few seeded low-frequency sinusoids per channel, so surfaces have
    structure to reconstruct. Documented as synthetic wherever it is used."""
    g = torch.Generator().manual_seed(seed)
    freq = torch.randn(3, 3, 3, generator=g, dtype=torch.float64) * 4.0  # (channel, wave, xyz)
    phase = torch.rand(3, 3, generator=g, dtype=torch.float64) * 2 * math.pi
    waves = torch.sin(torch.einsum("cwk,nk->ncw", freq, points.double()) + phase)
    return 0.55 + 0.4 * waves.mean(-1)


LIGHTS = torch.tensor([[0.4, 0.8, 0.45], [-0.6, 0.2, -0.75]], dtype=torch.float64)


def shade(normals: torch.Tensor) -> torch.Tensor:
    """View-independent two-sided Lambert shading in [0.35, 1]: fixed world lights, so every view
    of a surface point agrees on its colour (Gaussians with plain RGB colours can then match)."""
    lights = LIGHTS / LIGHTS.norm(dim=-1, keepdim=True)
    lambert = (normals.double() @ lights.T).abs().mean(-1)
    return 0.35 + 0.65 * lambert


def _edge(a: torch.Tensor, b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Twice the signed area of the triangle (a, b, q), row-wise."""
    return (b[:, 0] - a[:, 0]) * (q[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (q[:, 0] - a[:, 0])


@torch.no_grad()
def rasterize(vertices: torch.Tensor, faces: torch.Tensor, cameras: Cameras
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Z-buffer every camera's view at pixel centres.

    Returns ``depth (V, H, W)`` (camera z; +inf where no face is hit), ``face (V, H, W)``
    (index of the visible face, -1 for background) and perspective-correct barycentrics
    ``bary (V, H, W, 3)``. Work is proportional to the pixels inside the faces' bounding
    boxes: every (face, pixel) pair in a face's box is tested once, and a scatter-min keeps
    the nearest hit per pixel. Faces with a vertex behind the camera are skipped (cameras
    here always look at the whole object from outside it)."""
    h, w = cameras.height, cameras.width
    vs, fs = vertices.double(), faces.long()
    uv_vn2, z_vn = cameras.to(torch.float64).project(vs)
    depth_out, face_out, bary_out = [], [], []
    for v in range(len(cameras)):
        tri_fc2, tz_fc = uv_vn2[v][fs], z_vn[v][fs]
        # Pixel columns j whose centre j + 0.5 lies in the face's u-range, rows likewise.
        lo = torch.ceil(tri_fc2.min(1).values - 0.5).clamp_min(0).long()
        hi = torch.floor(tri_fc2.max(1).values - 0.5).long().minimum(torch.tensor([w - 1, h - 1]))
        n_f2 = (hi - lo + 1).clamp_min(0)
        n_f2[~(tz_fc > 1e-6).all(-1)] = 0
        counts = n_f2[:, 0] * n_f2[:, 1]
        face_m = torch.repeat_interleave(torch.arange(len(fs)), counts)
        k = torch.arange(len(face_m)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        nx = n_f2[face_m, 0]
        col = lo[face_m, 0] + k % nx
        row = lo[face_m, 1] + torch.div(k, nx, rounding_mode="floor")
        q = torch.stack([col, row], dim=-1).double() + 0.5
        p0, p1, p2 = tri_fc2[face_m].unbind(1)

        # Edge functions: b_k is the signed area of the sub-triangle opposite corner k.
        area = (p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0])
        b_m3 = torch.stack([_edge(p1, p2, q), _edge(p2, p0, q), _edge(p0, p1, q)], dim=-1) / area[:, None]
        inside = (b_m3 >= 0).all(-1) & (area.abs() > 1e-12)
        face_m, b_m3, pix = face_m[inside], b_m3[inside], (row * w + col)[inside]
        tz = tz_fc[face_m]
        # Depth is not linear in screen space, 1/z is: interpolate it, then invert.
        z = 1.0 / (b_m3 / tz).sum(-1).clamp_min(1e-12)
        zbuf = torch.full((h * w,), math.inf, dtype=torch.float64).scatter_reduce(0, pix, z, "amin")
        win = z == zbuf[pix]
        face_p = torch.full((h * w,), -1, dtype=torch.long)
        face_p[pix[win]] = face_m[win]
        persp = b_m3[win] / tz[win]  # perspective-correct barycentrics
        bary_p3 = torch.zeros(h * w, 3, dtype=torch.float64)
        bary_p3[pix[win]] = persp / persp.sum(-1, keepdim=True).clamp_min(1e-12)
        depth_out.append(zbuf.reshape(h, w))
        face_out.append(face_p.reshape(h, w))
        bary_out.append(bary_p3.reshape(h, w, 3))
    return torch.stack(depth_out), torch.stack(face_out), torch.stack(bary_out)


def render_mesh(vertices: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor, cameras: Cameras,
                background: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaded views ``rgb (V, 3, H, W)`` in [0, 1] over a ``background`` grey level, and the
    depth maps ``(V, H, W)`` (+inf on background)."""
    depth, face, bary = rasterize(vertices, faces, cameras)
    vs, fs = vertices.double(), faces.long()
    normals = torch.cross(vs[fs[:, 1]] - vs[fs[:, 0]], vs[fs[:, 2]] - vs[fs[:, 0]], dim=-1)
    normals = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    face_shade = shade(normals)  # (F,)
    hit = face >= 0
    f_safe = face.clamp_min(0)
    corner_rgb = colors.double()[fs[f_safe]]  # (V, H, W, 3 corners, 3 rgb)
    rgb = (bary[..., None] * corner_rgb).sum(-2) * face_shade[f_safe][..., None]
    rgb = torch.where(hit[..., None], rgb.clamp(0, 1), torch.full_like(rgb, background))
    return rgb.permute(0, 3, 1, 2).float(), depth.float()


def surface_voxels(vertices: torch.Tensor, faces: torch.Tensor, resolution: int) -> torch.Tensor:
    """Integer coordinates (M, 3) of the voxels of a ``resolution``^3 grid over the unit cube
    that the surface passes through, sorted lexicographically (x, y, z).

    The mesh is subdivided until every edge is shorter than half a voxel (trimesh's
    subdivide_to_size, the method of trimesh's own voxelize_subdivide), so the vertices of the
    fine mesh touch every voxel the surface crosses."""
    import trimesh

    pitch = 1.0 / resolution
    fine_v, _ = trimesh.remesh.subdivide_to_size(vertices.double().numpy(), faces.long().numpy(),
                                                 max_edge=pitch / 2, max_iter=32)
    idx = np.floor((fine_v + 0.5) / pitch).astype(np.int64).clip(0, resolution - 1)
    return torch.from_numpy(np.unique(idx, axis=0))


def voxel_centres(coords_m3: torch.Tensor, resolution: int) -> torch.Tensor:
    """World centres (M, 3) of integer voxel coordinates on the unit-cube grid."""
    return (coords_m3.double() + 0.5) / resolution - 0.5
