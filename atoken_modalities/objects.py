"""The 3D modality: surface voxels of a cube grid, points (0, x, y, z) of the shared 4D space,
and mesh data sources. Registration only; torch code is in :mod:`atoken_modalities.objects_impl`.

Following TRELLIS-SLAT (as the paper does): an asset is seen through posed views; each view is
patchified like an image and every patch is back-projected onto the occupied voxels it sees;
a voxel's token is the mean of those patches. The decoder's 3D head turns every voxel token
into K Gaussians, rendered with a differentiable rasteriser and compared with the views.
"""

from __future__ import annotations

import attrs

from atoken_core import hookimpl
from atoken_core.registry import Component

_ge = attrs.validators.ge


@attrs.define(kw_only=True)
class ThreeDConfig:
    gaussians_per_voxel: int = attrs.field(default=4, validator=_ge(1),
                                           metadata={"doc": "K: Gaussians each voxel token decodes to"})
    depth_tolerance: float = attrs.field(
        default=1.0, validator=_ge(0.0),
        metadata={"doc": "a voxel counts as seen by a view when its centre is at most this many voxel "
                         "diagonals behind the rendered surface depth (occlusion test of back-projection)"},
    )
    background: float = attrs.field(default=1.0, metadata={"doc": "grey level behind the object, in [0, 1]"})
    backend: str = attrs.field(
        default="auto", validator=attrs.validators.in_(["auto", "torch", "gsplat"]),
        metadata={"doc": "Gaussian rasteriser: gsplat on CUDA when installed (auto), or atoken's pure-torch one"},
    )


PYVISTA = "pkg://pyvista/examples/"


@attrs.define(kw_only=True)
class MeshSourceConfig:
    train: list[str] = attrs.field(
        factory=lambda: [PYVISTA + "airplane.ply", PYVISTA + "ant.ply", "primitive://torus",
                         "primitive://capsule", "primitive://box", "primitive://cone"],
        metadata={"doc": "training meshes: fsspec paths, pkg://PACKAGE/path, or primitive://NAME "
                         "(a synthetic trimesh primitive: box, icosphere, torus, cylinder, cone, capsule)"},
    )
    eval: list[str] = attrs.field(
        factory=lambda: [PYVISTA + "nut.ply", "primitive://icosphere"],
        metadata={"doc": "held-out meshes; each is also scored on held-out camera views"},
    )
    folder: str | None = attrs.field(
        default=None,
        metadata={"doc": "a folder of mesh files (fsspec); when set, its meshes are the training set "
                         "and the last eval_count of them (sorted by name) are held out"},
    )
    eval_count: int = attrs.field(default=1, validator=_ge(1), metadata={"doc": "held-out meshes of a folder"})
    resolution: int = attrs.field(default=64, validator=_ge(4), metadata={"doc": "voxel grid side (the paper: 64)"})
    views: int = attrs.field(default=8, validator=_ge(1), metadata={"doc": "input views per asset (Fibonacci sphere)"})
    eval_views: int = attrs.field(default=4, validator=_ge(1),
                                  metadata={"doc": "held-out views per eval asset (a ring the input cameras miss)"})
    size: int = attrs.field(default=64, validator=_ge(8), metadata={"doc": "rendered view side in pixels"})
    fov: float = attrs.field(default=40.0, metadata={"doc": "camera field of view in degrees"})
    radius: float = attrs.field(default=2.0, metadata={"doc": "camera distance from the object centre"})
    rotate: bool = attrs.field(default=True, metadata={"doc": "random rotation of each training asset (augmentation)"})
    colour_seed: int = attrs.field(default=0, metadata={"doc": "seed of the synthetic colour field for uncoloured meshes"})

    def train_sample_shape(self) -> tuple[int]:
        # A closed surface crosses about 2.5 r^2 voxels of an r^3 grid (a sphere of diameter
        # 0.9 r: 4 pi (0.45 r)^2); used only for --dry-run cost estimates.
        return (int(2.5 * self.resolution**2),)


@attrs.define(kw_only=True)
class PosedViewsConfig:
    train: list[str] = attrs.field(metadata={"doc": "posed-views folders (transforms.json + RGBA images), fsspec"})
    eval: list[str] = attrs.field(metadata={"doc": "held-out posed-views folders"})
    eval_views: int = attrs.field(default=2, validator=_ge(1),
                                  metadata={"doc": "last views of each held-out folder kept out of the input and scored"})
    resolution: int = attrs.field(default=64, validator=_ge(4), metadata={"doc": "voxel grid side"})
    background: float = attrs.field(default=1.0, metadata={"doc": "background grey level (keys out RGB views without alpha)"})

    def train_sample_shape(self) -> tuple[int]:
        return (int(2.5 * self.resolution**2),)


@hookimpl
def atoken_modalities() -> list[Component]:
    return [
        Component("3d", "atoken_modalities.objects_impl:ThreeDModality", ThreeDConfig,
                  "3D assets as posed views + surface voxels: coords (0, x, y, z), decoded to Gaussian splats"),
    ]


@hookimpl
def atoken_data() -> list[Component]:
    return [
        Component("packaged_meshes", "atoken_modalities.objects_impl:MeshSource", MeshSourceConfig,
                  "real meshes from the pyvista wheel + synthetic trimesh primitives, rendered on the CPU; "
                  "or any folder of obj/ply/glb/off meshes"),
        Component("posed_views", "atoken_modalities.posed_views:PosedViewsSource", PosedViewsConfig,
                  "pre-rendered views + transforms.json (NeRF/TRELLIS layout); occupancy from the visual hull"),
    ]
