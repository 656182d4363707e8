"""3D assets given as pre-rendered posed views: a folder with ``transforms.json`` (the NeRF /
TRELLIS layout: ``camera_angle_x`` and ``frames[i].file_path`` + OpenGL ``transform_matrix``)
and RGBA images (alpha = object mask; RGB images are masked by their background colour).

With no mesh at hand, occupancy comes from the views themselves: the visual hull (a voxel is
occupied when its centre falls inside the object mask of every view that sees it). Depth maps
for back-projection's occlusion test are rendered from the hull's surface (marching cubes,
then the same rasteriser the mesh path uses). The hull is exact for convex objects and a
superset of the object otherwise, the usual price of space carving.
"""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import torch

from atoken_modalities.cameras import Cameras, cameras_from_transforms
from atoken_modalities.mesh_render import rasterize, surface_voxels, voxel_centres
from atoken_core.interfaces import DataSource
from atoken_modalities.objects_impl import Asset3D, ThreeDError


def _read_rgba(url: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
        img = Image.open(io.BytesIO(data))
        img.load()
    except FileNotFoundError:
        raise ThreeDError(f"{url}: view image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ThreeDError(f"{url}: not a readable image ({type(err).__name__}: {err})") from None
    return np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0


def _join(root: str, rel: str) -> str:
    rel = rel.removeprefix("./")
    return f"{root.rstrip('/')}/{rel}"


def visual_hull(masks_vhw: torch.Tensor, cameras: Cameras, resolution: int) -> torch.Tensor:
    """(R, R, R) bool occupancy of the unit-cube grid carved by the object masks."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
    uv, z = cameras.project(voxel_centres(idx, resolution).float())
    col, row = uv[..., 0].floor().long(), uv[..., 1].floor().long()
    h, w = masks_vhw.shape[-2:]
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h) & (z > 0)
    view_ix = torch.arange(len(cameras))[:, None].expand_as(col)
    in_mask = masks_vhw[view_ix, row.clamp(0, h - 1), col.clamp(0, w - 1)]
    # A view that does not see a voxel (outside its image) cannot carve it away.
    occupied = (in_mask | ~inside).all(0) & inside.any(0)
    return occupied.reshape(resolution, resolution, resolution)


def hull_surface(occupancy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hull's boundary as a triangle mesh in unit-cube coordinates (scikit-image's marching
    cubes) and its surface voxels, found exactly as for a mesh file (the voxels the boundary
    crosses), so both kinds of input give tokens on the same kind of shell."""
    from skimage.measure import marching_cubes

    res = occupancy.shape[0]
    padded = torch.nn.functional.pad(occupancy.float()[None, None], (1, 1, 1, 1, 1, 1))[0, 0]
    verts, faces, _, _ = marching_cubes(padded.numpy(), level=0.5)
    # padded index i is voxel i - 1, whose centre is at (i - 1 + 0.5) / res - 0.5
    verts = (torch.from_numpy(verts.copy()).double() - 0.5) / res - 0.5
    faces = torch.from_numpy(faces.copy()).long()
    return surface_voxels(verts, faces, res), verts, faces


def load_posed_views(root: str, resolution: int, background: float = 1.0, heldout: int = 0) -> Asset3D:
    """One asset from a posed-views folder. The last ``heldout`` frames are kept out of the
    input views and become the target views a reconstruction is scored on."""
    where = _join(root, "transforms.json")
    try:
        with fsspec.open(where, "r") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ThreeDError(f"{where}: not found (a posed-views folder needs transforms.json)") from None
    except json.JSONDecodeError as err:
        raise ThreeDError(f"{where}: not valid JSON ({err})") from None
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise ThreeDError(f"{where}: no 'frames' list")
    try:
        paths = [_join(root, fr["file_path"]) for fr in frames]
    except (KeyError, TypeError):
        raise ThreeDError(f"{where}: every frame needs a file_path") from None
    files = {p.rsplit("/", 1)[-1] for p in paths}
    fs, folder = fsspec.core.url_to_fs(root)
    images_on_disk = [p for p in fs.ls(folder, detail=False) if p.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))]
    if len(images_on_disk) != len(paths):
        raise ThreeDError(f"{where}: describes {len(paths)} views but the folder holds {len(images_on_disk)} images")
    missing = sorted(p for p in paths if p.rsplit("/", 1)[-1] not in {q.rsplit('/', 1)[-1] for q in images_on_disk})
    if missing or len(files) != len(paths):
        raise ThreeDError(f"{where}: views listed but not in the folder: {missing[:3] or 'duplicate file_path'}")
    # NeRF-synthetic file_paths often omit the extension
    rgba = np.stack([_read_rgba(p if "." in p.rsplit("/", 1)[-1] else p + ".png") for p in paths])
    if heldout >= len(paths):
        raise ThreeDError(f"{where}: {len(paths)} views cannot hold out {heldout}")
    h, w = rgba.shape[1:3]
    cameras = cameras_from_transforms(meta, h, w, where)
    rgb = torch.from_numpy(rgba[..., :3]).permute(0, 3, 1, 2)
    alpha = torch.from_numpy(rgba[..., 3])
    if bool((alpha > 0.99).all()):  # no alpha channel: key out the background colour
        mask = (rgb - background).abs().amax(1) > 2 / 255
    else:
        mask = alpha > 0.5
        rgb = rgb * alpha[:, None] + background * (1 - alpha[:, None])  # composite onto the background
    n_in = len(paths) - heldout
    occupancy = visual_hull(mask[:n_in], cameras[list(range(n_in))], resolution)
    if not bool(occupancy.any()):
        raise ThreeDError(f"{root}: the views' object masks carve away every voxel (cameras and images disagree?)")
    voxels, verts, faces = hull_surface(occupancy)
    inputs = cameras[list(range(n_in))]
    depth, _, _ = rasterize(verts, faces, inputs)
    views = rgb * 2 - 1
    target_views = views[n_in:] if heldout else None
    target_cams = cameras[list(range(n_in, len(paths)))] if heldout else None
    return Asset3D(root.rstrip("/").rsplit("/", 1)[-1], views[:n_in], depth.float(), inputs, voxels, resolution,
                   target_views, target_cams)


def write_posed_views(folder: str, views_v3hw: torch.Tensor, cameras: Cameras, alpha_vhw: torch.Tensor | None = None) -> None:
    """Write views (in [-1, 1]) and cameras as a transforms.json folder (the inverse of
    :func:`load_posed_views`; OpenGL camera-to-world matrices, PNG images)."""
    import math

    from PIL import Image

    from atoken_core.io import atomic_write_bytes
    from atoken_modalities.cameras import _GL_TO_CV

    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    c2w = torch.linalg.inv(cameras.w2c.double()) @ _GL_TO_CV.inverse()
    fov_x = 2 * math.atan(cameras.width / (2 * float(cameras.K[0, 0, 0])))
    frames = []
    for i, view in enumerate(views_v3hw):
        rgb = ((view.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        if alpha_vhw is not None:
            a = (alpha_vhw[i].clamp(0, 1) * 255).round().byte().numpy()[..., None]
            img = Image.fromarray(np.concatenate([rgb, a], -1), "RGBA")
        else:
            img = Image.fromarray(rgb)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(_join(folder, f"view_{i:03d}.png"), buf.getvalue())
        frames.append({"file_path": f"./view_{i:03d}.png", "transform_matrix": c2w[i].tolist()})
    data = json.dumps({"camera_angle_x": fov_x, "frames": frames}, indent=1).encode()
    atomic_write_bytes(_join(folder, "transforms.json"), data)


class PosedViewsSource(DataSource):
    """Assets from posed-views folders (see the module docstring). Held-out assets keep their
    last ``eval_views`` views out of the input and are scored on them. Unreadable folders are
    skipped, counted in ``skipped`` and reported; an empty set is an error."""

    def __init__(self, config) -> None:
        self.config = config
        self.skipped: list[str] = []
        self.train = self._load(config.train, 0, "training")
        self.evals = self._load(config.eval, config.eval_views, "held-out")

    def _load(self, roots: list[str], heldout: int, what: str) -> list[Asset3D]:
        assets = []
        for root in roots:
            try:
                assets.append(load_posed_views(root, self.config.resolution, self.config.background, heldout))
            except ThreeDError as err:
                self.skipped.append(str(err))
        if not assets:
            raise ThreeDError(f"the {what} posed-views set is empty: " + ("; ".join(self.skipped) or "no folders listed"))
        return assets

    def train_batch(self, batch_size: int, generator: torch.Generator) -> list[Asset3D]:
        return [self.train[int(torch.randint(len(self.train), (1,), generator=generator))] for _ in range(batch_size)]

    def eval_samples(self) -> list[tuple[str, Asset3D]]:
        return [(a.name, a) for a in self.evals]
