"""3D assets: posed views -> voxel tokens (TRELLIS-style back-projection) -> Gaussians -> views."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from einops import rearrange

from atoken_core.errors import UserError
from atoken_core.interfaces import DataSource, EvalData, EvalRequest, Modality, PatchSpec, Tokens
from atoken_core.sparse import Sparse4D
from atoken_modalities.cameras import Cameras, orbit_cameras, sphere_cameras
from atoken_modalities.mesh_render import (
    MESH_SUFFIXES,
    MeshError,
    check_mesh,
    colour_field,
    load_mesh,
    normalise,
    render_mesh,
    surface_voxels,
    voxel_centres,
)
from atoken_modalities.video_impl import pad_spatial


@attrs.frozen
class Asset3D:
    """One 3D sample: input views with their cameras and depth maps, the occupied voxels of a
    ``resolution``^3 grid over the unit cube, and the views a reconstruction is scored on
    (the input views themselves in training; held-out cameras in evaluation)."""

    name: str
    views: torch.Tensor  # (V, 3, H, W) in [-1, 1]
    depth: torch.Tensor  # (V, H, W) camera z of the visible surface, +inf on background
    cameras: Cameras
    voxels: torch.Tensor  # (M, 3) int64 (x, y, z) grid coordinates
    resolution: int
    target_views: torch.Tensor | None = None  # (V', 3, H', W') in [-1, 1]
    target_cameras: Cameras | None = None

    @property
    def targets(self) -> tuple[torch.Tensor, Cameras]:
        if self.target_views is None:
            return self.views, self.cameras
        return self.target_views, self.target_cameras


class ThreeDError(UserError, ValueError):
    """A 3D sample that cannot be used, naming where it came from."""


def check_asset(a: Asset3D) -> None:
    v = len(a.cameras)
    if a.views.ndim != 4 or a.views.shape[1] != 3:
        raise ThreeDError(f"{a.name}: views must be (V, 3, H, W), got {tuple(a.views.shape)}")
    if a.views.shape[0] != v or a.depth.shape[0] != v:
        raise ThreeDError(f"{a.name}: {a.views.shape[0]} views and {a.depth.shape[0]} depth maps for {v} cameras")
    if tuple(a.views.shape[-2:]) != (a.cameras.height, a.cameras.width) or a.depth.shape[-2:] != a.views.shape[-2:]:
        raise ThreeDError(f"{a.name}: view size {tuple(a.views.shape[-2:])}, depth {tuple(a.depth.shape[-2:])} and "
                          f"camera size {(a.cameras.height, a.cameras.width)} differ")
    if a.voxels.ndim != 2 or a.voxels.shape[1] != 3 or len(a.voxels) == 0:
        raise ThreeDError(f"{a.name}: no occupied voxels (voxels shape {tuple(a.voxels.shape)})")
    if int(a.voxels.min()) < 0 or int(a.voxels.max()) >= a.resolution:
        raise ThreeDError(f"{a.name}: voxel coordinates outside 0..{a.resolution - 1}")


def back_project(patches_vghgwd: torch.Tensor, cameras: Cameras, depth_vhw: torch.Tensor, centres_m3: torch.Tensor,
                 patch: int, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Average, for every voxel centre, the features of the patches that see it.

    A view sees a centre when it projects inside the image and lies at most ``tolerance``
    (world units) behind the depth the view recorded at that pixel: occluded voxels are not
    painted with the occluder's patch. Returns ``features (M, D)`` (zero where unseen) and
    ``views_seen (M,)``, the number of views that contributed."""
    v, gh, gw, d = patches_vghgwd.shape
    h, w = depth_vhw.shape[-2:]
    uv_vm2, z_vm = cameras.project(centres_m3.to(cameras.K.dtype))
    col, row = uv_vm2[..., 0].floor().long(), uv_vm2[..., 1].floor().long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h) & (z_vm > 0)
    col_s, row_s = col.clamp(0, w - 1), row.clamp(0, h - 1)
    view_ix = torch.arange(v)[:, None].expand_as(col_s)
    surface = depth_vhw[view_ix, row_s, col_s]
    seen_vm = inside & (z_vm <= surface + tolerance)
    feats_vmd = patches_vghgwd[view_ix, row_s // patch, col_s // patch]
    weight_vm = seen_vm.to(patches_vghgwd.dtype)
    count_m = weight_vm.sum(0)
    summed = torch.einsum("vm,vmd->md", weight_vm, feats_vmd)
    return summed / count_m.clamp_min(1)[:, None], count_m.long()


class ThreeDModality(Modality):
    """3D assets as tokens on their seen surface voxels; decoded by a Gaussian head."""

    name = "3d"
    subspace = ("x", "y", "z")
    noun = "assets"
    eval_metrics = ("psnr", "ssim", "lpips", "codebook")

    def __init__(self, config: Any) -> None:
        self.config = config

    def example(self, spec: PatchSpec, generator: torch.Generator) -> Asset3D:
        """A box seen from 2 views of 2x2 patches, on an 8^3 grid."""
        size = 2 * spec.patch_size
        mesh = prepare_mesh("primitive://box", int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        return make_asset(mesh, sphere_cameras(2, 2.5, 40.0, size), 8)

    def load_eval(self, data: str, request: EvalRequest) -> EvalData:
        """3D assets under ``data``: every folder holding a ``transforms.json`` (posed views; its last
        ``heldout`` views are scored, not encoded) and every mesh file outside those folders (rendered
        from the input cameras of the recipe's mesh settings, scored on a ring of ``heldout`` cameras
        25 degrees up that the input views do not include). Voxel resolution and render settings come
        from the checkpoint's recipe (its data table for this modality), so assets are tokenised as in
        training."""
        from atoken_core.io import files_under
        from atoken_modalities.objects import MeshSourceConfig, PosedViewsConfig
        from atoken_modalities.posed_views import load_posed_views

        spec = request.recipe.data.get(self.name) if request.recipe is not None else None
        source = spec.config if spec is not None else None
        mesh_cfg = source if isinstance(source, MeshSourceConfig) else MeshSourceConfig()
        resolution = getattr(source, "resolution", mesh_cfg.resolution)
        background = source.background if isinstance(source, PosedViewsConfig) else self.config.background
        heldout = request.heldout_views
        files = files_under(data, [".json", *MESH_SUFFIXES])
        folders = sorted({name.rsplit("/", 1)[0] if "/" in name else "" for name, _ in files
                          if name.rsplit("/", 1)[-1] == "transforms.json"})
        inside = tuple(f + "/" for f in folders if f)
        meshes = [(n, u) for n, u in files
                  if n.lower().endswith(MESH_SUFFIXES) and not ("" in folders or n.startswith(inside))]
        views_heldout = heldout or getattr(source, "eval_views", None) or 2
        ring_views = heldout or getattr(source, "eval_views", None) or mesh_cfg.eval_views
        samples, skipped = [], []
        for folder in folders:
            url = data.rstrip("/") + ("/" + folder if folder else "")
            try:
                samples.append((folder or url.rsplit("/", 1)[-1],
                                load_posed_views(url, resolution, background, views_heldout)))
            except ThreeDError as err:
                skipped.append(str(err))
        c = mesh_cfg
        cameras = sphere_cameras(c.views, c.radius, c.fov, c.size)
        ring = orbit_cameras(ring_views, c.radius, c.fov, c.size, elevation_deg=25.0)
        for name, url in meshes:
            try:
                samples.append((name, make_asset(prepare_mesh(url, c.colour_seed), cameras, resolution, ring)))
            except (MeshError, ThreeDError) as err:
                skipped.append(str(err))
        if not samples:
            raise ThreeDError(f"{data}: no readable 3D assets (posed-views folders with transforms.json, or mesh "
                              f"files {', '.join(MESH_SUFFIXES)}; {len(skipped)} unreadable)")
        settings = {"3d": {
            "voxel_resolution": resolution, "posed_views_heldout": views_heldout, "background": background,
            "meshes": {"input_views": c.views, "heldout_ring_views": ring_views, "ring_elevation_deg": 25.0,
                       "size": c.size, "fov": c.fov, "radius": c.radius, "colour_seed": c.colour_seed},
            "render_settings_from": f"recipe [data.{self.name}] ({spec.kind})" if spec is not None else "defaults"},
            "psnr_ssim_lpips": "per held-out view, averaged over each asset's views, then over assets"}
        return EvalData(sorted(samples, key=lambda s: s[0]), skipped, settings)

    def head_dim(self, spec: PatchSpec) -> int:
        from atoken_modalities.gaussians import GAUSSIAN_PARAMS

        return self.config.gaussians_per_voxel * GAUSSIAN_PARAMS

    def num_tokens(self, shape: Sequence[int], spec: PatchSpec) -> int:
        """Tokens of an asset with ``shape[0]`` occupied voxels (at most one token per voxel)."""
        return int(shape[0])

    def targets(self, samples: Sequence[Asset3D], spec: PatchSpec) -> list[torch.Tensor]:
        return [a.targets[0] for a in samples]

    def patchify(self, samples: Sequence[Asset3D], spec: PatchSpec) -> Tokens:
        p = spec.patch_size
        parts, meta = [], []
        for a in samples:
            check_asset(a)
            views = pad_spatial(a.views, p, "replicate")
            patches = rearrange(views, "v c (gh ph) (gw pw) -> v gh gw (ph pw c)", ph=p, pw=p)
            voxel_size = 1.0 / a.resolution
            centres = voxel_centres(a.voxels, a.resolution).to(a.views.dtype)
            feats, seen = back_project(patches, a.cameras, a.depth, centres, p,
                                       self.config.depth_tolerance * math.sqrt(3) * voxel_size)
            keep = seen > 0
            if not bool(keep.any()):
                raise ThreeDError(f"{a.name}: no occupied voxel is seen by any view (are the cameras aimed at the "
                                  "object in the unit cube?)")
            vox = a.voxels[keep]
            coords = torch.cat([torch.zeros(len(vox), 1, dtype=torch.long), vox.long()], dim=1)
            parts.append(Sparse4D.single(feats[keep], coords.to(a.views.device)))
            target_views, target_cams = a.targets
            meta.append({"name": a.name, "centres": centres[keep], "voxel_size": voxel_size,
                         "cameras": target_cams, "unseen_voxels": int((~keep).sum()),
                         "size": tuple(target_views.shape[-2:])})
        return Tokens(Sparse4D.cat(parts), meta)

    def gaussians(self, patches: Sparse4D, meta: list[dict[str, Any]]) -> list[Any]:
        """The decoder head's outputs as one set of Gaussians per asset."""
        from atoken_modalities.gaussians import gaussians_from_raw

        return [gaussians_from_raw(s.features, m["centres"].to(s.features), m["voxel_size"])
                for s, m in zip(patches.split(), meta)]

    def unpatchify(self, patches: Sparse4D, meta: list[dict[str, Any]], spec: PatchSpec) -> list[torch.Tensor]:
        """Render each asset's Gaussians at its target cameras: (V, 3, H, W) in [-1, 1]."""
        from atoken_modalities.gaussians import render

        out = []
        for g, m in zip(self.gaussians(patches, meta), meta):
            rgb, _ = render(g, m["cameras"].to(g.means), background=(self.config.background,) * 3,
                            backend=self.config.backend)
            out.append(rgb * 2 - 1)
        return out


    def save_reconstruction(self, recon: Sparse4D, meta: list[dict[str, Any]], spec: PatchSpec,
                            prefix: str) -> list[str]:
        """The decoded asset as a .ply in the standard 3D Gaussian Splatting layout (the one the
        INRIA code and SuperSplat read; not yet opened in either here) and a PNG turntable of
        8 views around it."""
        from atoken_modalities.gaussians import save_ply, turntable
        from atoken_modalities.video_impl import save_frame_strip

        g = self.gaussians(recon, meta)[0]
        cams = meta[0]["cameras"]
        fov = math.degrees(2 * math.atan(cams.width / (2 * float(cams.K[0, 0, 0]))))
        radius = float(cams.centres()[0].norm())
        frames = turntable(g, 8, radius, fov, max(cams.height, cams.width))
        save_ply(g, prefix + ".ply")
        save_frame_strip(frames * 2 - 1, prefix + "-turntable.png")
        return [prefix + ".ply", prefix + "-turntable.png"]


# ---------------------------------------------------------------------------- data


def primitive(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic trimesh primitive (``primitive://NAME``)."""
    import trimesh

    makers = {
        "box": lambda: trimesh.creation.box(extents=(1.0, 0.6, 0.8)),
        "icosphere": lambda: trimesh.creation.icosphere(subdivisions=3),
        "torus": lambda: trimesh.creation.torus(major_radius=1.0, minor_radius=0.35),
        "cylinder": lambda: trimesh.creation.cylinder(radius=0.5, height=1.2, sections=32),
        "cone": lambda: trimesh.creation.cone(radius=0.6, height=1.2, sections=32),
        "capsule": lambda: trimesh.creation.capsule(height=1.0, radius=0.4, count=(16, 16)),
    }
    if name not in makers:
        raise MeshError(f"primitive://{name}: unknown primitive (choose from {', '.join(sorted(makers))})")
    mesh = makers[name]()
    return torch.from_numpy(mesh.vertices.copy()), torch.from_numpy(mesh.faces.copy()).long()


def read_mesh(uri: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    from atoken_modalities.photos_impl import resolve_package_path

    if uri.startswith("primitive://"):
        v, f = primitive(uri.removeprefix("primitive://"))
        return v, f, None
    return load_mesh(resolve_package_path(uri))


def rotation_y(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float64)


@attrs.frozen
class Mesh:
    name: str
    vertices: torch.Tensor  # (N, 3) float64, normalised into the unit cube
    faces: torch.Tensor
    colors: torch.Tensor  # (N, 3) in [0, 1]

    def rotated(self, rot_33: torch.Tensor) -> Mesh:
        # The colour stays attached to the surface: only the geometry turns.
        return attrs.evolve(self, vertices=self.vertices @ rot_33.T)


def prepare_mesh(uri: str, colour_seed: int) -> Mesh:
    from atoken_modalities.photos_impl import basename

    vertices, faces, colors = read_mesh(uri)
    check_mesh(vertices, faces, uri)
    vertices = normalise(vertices)
    if colors is None:
        colors = colour_field(vertices, colour_seed)
    return Mesh(basename(uri), vertices, faces, colors)


def make_asset(mesh: Mesh, cameras: Cameras, resolution: int, target_cameras: Cameras | None = None) -> Asset3D:
    """Render a mesh's views (and held-out target views) and voxelise its surface."""
    rgb, depth = render_mesh(mesh.vertices, mesh.faces, mesh.colors, cameras)
    targets = None
    if target_cameras is not None:
        targets = render_mesh(mesh.vertices, mesh.faces, mesh.colors, target_cameras)[0] * 2 - 1
    return Asset3D(mesh.name, rgb * 2 - 1, depth, cameras, surface_voxels(mesh.vertices, mesh.faces, resolution),
                   resolution, targets, target_cameras)


def list_meshes(root: str) -> list[str]:
    import fsspec

    from atoken_core.io import url_of

    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        raise MeshError(f"{root}: folder not found")
    return [url_of(fs, f) for f in sorted(fs.find(path)) if f.lower().endswith(MESH_SUFFIXES)]


class MeshSource(DataSource):
    """Meshes rendered on the CPU into posed views. Training assets are re-rendered under a random
    rotation for every sample (fresh views of the same surface); held-out assets are encoded from
    the usual input cameras and scored on a ring of cameras the input views do not include.

    Unreadable meshes are skipped, counted in ``skipped`` and reported; a source left with no
    training or held-out mesh is an error naming the files."""

    def __init__(self, config: Any) -> None:
        self.config = config
        if config.folder is not None:
            files = list_meshes(config.folder)
            if len(files) <= config.eval_count:
                raise MeshError(f"{config.folder}: {len(files)} mesh files; need more than eval_count="
                                f"{config.eval_count} to keep a training set")
            train_uris, eval_uris = files[: -config.eval_count], files[-config.eval_count:]
        else:
            train_uris, eval_uris = config.train, config.eval
        self.skipped: list[str] = []
        self.train = self._load(train_uris, "training")
        self.evals = self._load(eval_uris, "held-out")
        self.cameras = sphere_cameras(config.views, config.radius, config.fov, config.size)
        self._eval_assets: list[tuple[str, Asset3D]] | None = None

    def _load(self, uris: list[str], what: str) -> list[Mesh]:
        meshes = []
        for uri in uris:
            try:
                meshes.append(prepare_mesh(uri, self.config.colour_seed))
            except MeshError as err:
                self.skipped.append(str(err))
        if not meshes:
            raise MeshError(f"the {what} mesh set is empty: " + ("; ".join(self.skipped) or "no files listed"))
        return meshes

    def train_batch(self, batch_size: int, generator: torch.Generator) -> list[Asset3D]:
        return self.train_batch_texts(batch_size, generator)[0]

    def train_batch_texts(self, batch_size: int, generator: torch.Generator) -> tuple[list[Asset3D], list[str]]:
        """Assets with weak captions from their file names ('a 3D model of airplane')."""
        return self.train_batch_part(batch_size, generator, 0, 1)

    def train_batch_part(self, batch_size: int, generator: torch.Generator, rank: int,
                         world: int) -> tuple[list[Asset3D], list[str]]:
        """Every rank draws the whole batch's meshes and rotations (the same random numbers) but
        renders only its own samples ``rank::world``: rendering is the costly part."""
        from atoken_modalities.photos_impl import caption_from_name

        out, texts = [], []
        for i in range(batch_size):
            mesh = self.train[int(torch.randint(len(self.train), (1,), generator=generator))]
            angle = float(torch.rand((), generator=generator)) * 2 * math.pi if self.config.rotate else 0.0
            if i % world != rank:
                continue
            texts.append(caption_from_name("a 3D model of", mesh.name))
            out.append(make_asset(mesh.rotated(rotation_y(angle)) if self.config.rotate else mesh,
                                  self.cameras, self.config.resolution))
        return out, texts

    def eval_samples(self) -> list[tuple[str, Asset3D]]:
        if self._eval_assets is None:
            c = self.config
            # A ring 25 degrees up: positions none of the Fibonacci input cameras takes.
            ring = orbit_cameras(c.eval_views, c.radius, c.fov, c.size, elevation_deg=25.0)
            self._eval_assets = [(m.name, make_asset(m, self.cameras, c.resolution, ring)) for m in self.evals]
        return self._eval_assets

    def train_pool(self):
        raise NotImplementedError("3D assets have no PCA baseline (their tokens are back-projected view "
                                  "patches, their outputs rendered views)")
