"""Pinhole cameras shared by the mesh renderer, voxel back-projection and the Gaussian
rasteriser.

Convention (OpenCV, the one gsplat uses): camera x right, y down, z forward (the camera looks
along +z); ``w2c`` maps world points to camera space; intrinsics ``K`` are in pixels with
pixel ``(row i, col j)`` centred at ``(u, v) = (j + 0.5, i + 0.5)``. World space: +y up.
NeRF/TRELLIS ``transforms.json`` files store OpenGL camera-to-world matrices (y up, z back);
:func:`cameras_from_transforms` converts them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch


@attrs.frozen
class Cameras:
    K: torch.Tensor  # (V, 3, 3) intrinsics in pixels
    w2c: torch.Tensor  # (V, 4, 4) world -> camera (OpenCV axes)
    height: int
    width: int

    def __attrs_post_init__(self) -> None:
        v = self.K.shape[0]
        if self.K.shape != (v, 3, 3) or self.w2c.shape != (v, 4, 4):
            raise ValueError(f"cameras: expected K (V, 3, 3) and w2c (V, 4, 4), got {tuple(self.K.shape)} "
                             f"and {tuple(self.w2c.shape)}")

    def __len__(self) -> int:
        return self.K.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> Cameras:
        if isinstance(index, int):
            index = [index]
        return Cameras(self.K[index], self.w2c[index], self.height, self.width)

    def to(self, *args, **kwargs) -> Cameras:
        return Cameras(self.K.to(*args, **kwargs), self.w2c.to(*args, **kwargs), self.height, self.width)

    def project(self, points_n3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """World points -> pixel coordinates (V, N, 2) as (u, v) and camera depth (V, N)."""
        cam = torch.einsum("vij,nj->vni", self.w2c[:, :3, :3], points_n3) + self.w2c[:, None, :3, 3]
        depth = cam[..., 2]
        uv = torch.einsum("vij,vnj->vni", self.K, cam)[..., :2] / depth.clamp_min(1e-9)[..., None]
        return uv, depth

    def centres(self) -> torch.Tensor:
        """(V, 3) camera positions in world space."""
        rot, trans = self.w2c[:, :3, :3], self.w2c[:, :3, 3]
        return -torch.einsum("vji,vj->vi", rot, trans)


def intrinsics(fov_deg: float, height: int, width: int) -> torch.Tensor:
    """(3, 3) K of a camera whose horizontal field of view is ``fov_deg`` (square pixels)."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: Sequence[float] = (0.0, 1.0, 0.0)) -> torch.Tensor:
    """(4, 4) w2c of a camera at ``eye`` looking at ``target`` (default the origin)."""
    eye = eye.double()
    target = torch.zeros(3, dtype=torch.float64) if target is None else target.double()
    forward = target - eye
    forward = forward / forward.norm()
    up_t = torch.tensor(up, dtype=torch.float64)
    if torch.cross(forward, up_t, dim=0).norm() < 1e-6:  # looking straight up or down
        up_t = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    right = torch.cross(forward, up_t, dim=0)
    right = right / right.norm()
    down = torch.cross(forward, right, dim=0)
    rot = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = rot
    w2c[:3, 3] = -rot @ eye
    return w2c


def sphere_directions(n: int) -> torch.Tensor:
    """(n, 3) unit vectors spread evenly over the sphere (Fibonacci lattice): every side of an
    object is seen by some view, which back-projection to surface voxels needs."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    y = 1 - 2 * i / n
    r = (1 - y * y).clamp_min(0).sqrt()
    phi = math.pi * (3 - math.sqrt(5)) * i
    return torch.stack([r * torch.cos(phi), y, r * torch.sin(phi)], dim=-1)


def sphere_cameras(n: int, radius: float, fov_deg: float, size: int) -> Cameras:
    """``n`` square ``size`` x ``size`` cameras on a sphere of ``radius`` around the origin."""
    eyes = sphere_directions(n) * radius
    w2c = torch.stack([look_at(e) for e in eyes])
    return Cameras(intrinsics(fov_deg, size, size).expand(n, 3, 3).float(), w2c.float(), size, size)


def orbit_cameras(n: int, radius: float, fov_deg: float, size: int, elevation_deg: float = 20.0) -> Cameras:
    """A turntable: ``n`` cameras circling the +y axis at one elevation."""
    az = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    el = math.radians(elevation_deg)
    eyes = torch.stack([torch.sin(az) * math.cos(el), torch.full_like(az, math.sin(el)),
                        torch.cos(az) * math.cos(el)], dim=-1) * radius
    w2c = torch.stack([look_at(e) for e in eyes])
    return Cameras(intrinsics(fov_deg, size, size).expand(n, 3, 3).float(), w2c.float(), size, size)


# OpenGL camera axes (x right, y up, z back) -> OpenCV (x right, y down, z forward)
_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def cameras_from_transforms(data: dict, height: int, width: int, where: str) -> Cameras:
    """Cameras from a NeRF/TRELLIS ``transforms.json`` dict (``camera_angle_x`` and per-frame
    OpenGL camera-to-world ``transform_matrix``). ``where`` names the file in errors."""
    try:
        fov_x = float(data["camera_angle_x"])
        frames = data["frames"]
        c2w_gl = torch.tensor([f["transform_matrix"] for f in frames], dtype=torch.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: not a transforms.json camera file ({type(err).__name__}: {err})") from None
    if c2w_gl.ndim != 3 or c2w_gl.shape[1:] != (4, 4):
        raise ValueError(f"{where}: every transform_matrix must be 4x4, got {tuple(c2w_gl.shape[1:])}")
    w2c = torch.linalg.inv(c2w_gl @ _GL_TO_CV)
    k = intrinsics(math.degrees(fov_x), height, width)
    return Cameras(k.expand(len(frames), 3, 3).float(), w2c.float(), height, width)
