"""The 3D modality: mesh rasteriser, surface voxels, back-projection, tokens, Gaussian head, data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_model
from hypothesis import given
from hypothesis import strategies as st

from atoken_core.interfaces import PatchSpec
from atoken_core.sparse import Sparse4D
from atoken_modalities.cameras import Cameras, intrinsics, look_at, sphere_cameras
from atoken_modalities.mesh_render import (
    MeshError,
    load_mesh,
    normalise,
    rasterize,
    render_mesh,
    surface_voxels,
    voxel_centres,
)
from atoken_modalities.objects import MeshSourceConfig, ThreeDConfig
from atoken_modalities.objects_impl import (
    Asset3D,
    MeshSource,
    ThreeDError,
    ThreeDModality,
    back_project,
    make_asset,
    prepare_mesh,
    primitive,
)

SPEC = PatchSpec(8, 2)


def small_asset(name: str = "primitive://icosphere", resolution: int = 12, views: int = 6, size: int = 32) -> Asset3D:
    mesh = prepare_mesh(name, colour_seed=0)
    return make_asset(mesh, sphere_cameras(views, 2.0, 40.0, size), resolution)


# ---------------------------------------------------------------- rasteriser and voxels


def test_rasterizer_depth_matches_trimesh_ray_casting():
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("rtree")  # trimesh's ray-triangle intersector needs its R-tree
    v, f = primitive("torus")
    v = normalise(v)
    cams = sphere_cameras(3, 1.6, 45.0, 24)
    depth, face, _ = rasterize(v, f, cams)
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    for i in range(len(cams)):
        c2w = torch.linalg.inv(cams.w2c[i].double())
        k = cams.K[i].double()
        rows, cols = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(24) + 0.5, indexing="ij")
        dirs_cam = torch.stack([(cols - k[0, 2]) / k[0, 0], (rows - k[1, 2]) / k[1, 1], torch.ones_like(rows)], -1)
        dirs = dirs_cam.reshape(-1, 3).double() @ c2w[:3, :3].T
        origins = c2w[:3, 3].expand_as(dirs)
        loc, ray_ix, _ = mesh.ray.intersects_location(origins.numpy(), dirs.numpy(), multiple_hits=False)
        ref = torch.full((24 * 24,), math.inf, dtype=torch.float64)
        ref[torch.from_numpy(ray_ix)] = ((torch.from_numpy(loc) - c2w[:3, 3]) @ c2w[:3, :3])[:, 2]
        ours = depth[i].reshape(-1).double()
        hit_ref, hit_ours = torch.isfinite(ref), torch.isfinite(ours)
        # Pixel centres exactly on a silhouette edge may go either way; allow a couple.
        assert int((hit_ref != hit_ours).sum()) <= 2
        both = hit_ref & hit_ours
        assert int(both.sum()) > 50
        torch.testing.assert_close(ours[both], ref[both], atol=1e-6, rtol=1e-6)
        assert bool(((face[i].reshape(-1) >= 0) == hit_ours).all())


def test_render_colours_come_from_the_visible_surface():
    # A red square in front of a blue one: the camera in front sees red where they overlap.
    quad = torch.tensor([[-0.3, -0.3, 0.0], [0.3, -0.3, 0.0], [0.3, 0.3, 0.0], [-0.3, 0.3, 0.0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    v = torch.cat([quad + torch.tensor([0, 0, 0.2]), quad - torch.tensor([0, 0, 0.2])])
    f = torch.cat([faces, faces + 4])
    colors = torch.tensor([[1.0, 0, 0]] * 4 + [[0, 0, 1.0]] * 4, dtype=torch.float64)
    cam = Cameras(intrinsics(40, 16, 16)[None].float(), look_at(torch.tensor([0.0, 0, 2.0]))[None].float(), 16, 16)
    rgb, depth = render_mesh(v, f, colors, cam)
    centre = rgb[0, :, 8, 8]
    assert centre[0] > 0.3 and centre[2] == 0
    assert abs(float(depth[0, 8, 8]) - 1.8) < 1e-5
    assert float(rgb[0, :, 0, 0].min()) == 1.0  # background


def test_surface_voxels_touch_the_surface_and_stay_in_bounds():
    v, f = primitive("icosphere")
    v = normalise(v)
    res = 16
    vox = surface_voxels(v, f, res)
    assert vox.dtype == torch.long and int(vox.min()) >= 0 and int(vox.max()) < res
    assert len(torch.unique(vox, dim=0)) == len(vox)
    # Every voxel's centre is within one voxel diagonal of the sphere surface (radius 0.45)...
    dist = (voxel_centres(vox, res).norm(dim=-1) - 0.45).abs()
    assert float(dist.max()) <= math.sqrt(3) / res
    # ...and the count is what a sphere's surface area predicts (within 35%).
    expected = 4 * math.pi * (0.45 * res) ** 2 * 1.5  # a voxelised surface is ~1.5 voxels thick on average
    assert 0.65 * expected < len(vox) < 1.35 * expected


# ---------------------------------------------------------------- back-projection and tokens


@given(st.integers(6, 20), st.integers(1, 8), st.floats(-1, 1))
def test_constant_feature_field_aggregates_to_that_constant(resolution, views, value):
    asset = small_asset(resolution=resolution, views=views, size=16)
    const = torch.full_like(asset.views, value)
    tokens = ThreeDModality(ThreeDConfig()).patchify([Asset3D(**{**vars_of(asset), "views": const})], SPEC)
    torch.testing.assert_close(tokens.patches.features, torch.full_like(tokens.patches.features, value))


def vars_of(asset: Asset3D) -> dict:
    import attrs

    return attrs.asdict(asset, recurse=False)


@given(st.lists(st.sampled_from(["icosphere", "torus", "box", "cone"]), min_size=1, max_size=3), st.integers(6, 16))
def test_3d_tokens_live_in_xyz_unique_in_bounds_and_count(names, resolution):
    assets = [small_asset(f"primitive://{n}", resolution=resolution, views=4, size=16) for n in names]
    tokens = ThreeDModality(ThreeDConfig()).patchify(assets, SPEC)
    for sample, asset, meta in zip(tokens.patches.split(), assets, tokens.meta):
        c = sample.coords
        assert bool((c[:, 0] == 0).all())
        assert int(c[:, 1:].min()) >= 0 and int(c[:, 1:].max()) < resolution
        assert len(torch.unique(c, dim=0)) == len(c)
        # one token per seen voxel: occupied = tokens + unseen
        assert len(c) + meta["unseen_voxels"] == len(asset.voxels)
        assert sample.features.shape[1] == SPEC.frame_dim


def test_occluded_voxels_are_not_painted_by_the_occluder():
    # Two squares, red in front (z = +0.2) and blue behind (z = -0.2), seen by one camera in
    # front and one behind: with the depth test every voxel gets only its own square's colour.
    quad = torch.tensor([[-0.3, -0.3, 0.0], [0.3, -0.3, 0.0], [0.3, 0.3, 0.0], [-0.3, 0.3, 0.0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    v = torch.cat([quad + torch.tensor([0, 0, 0.2]), quad - torch.tensor([0, 0, 0.2])])
    f = torch.cat([faces, faces + 4])
    colors = torch.tensor([[1.0, 0, 0]] * 4 + [[0, 0, 1.0]] * 4, dtype=torch.float64)
    w2c = torch.stack([look_at(torch.tensor([0.0, 0, 2.0])), look_at(torch.tensor([0.0, 0, -2.0]))]).float()
    cams = Cameras(intrinsics(40, 64, 64).expand(2, 3, 3).float(), w2c, 64, 64)
    rgb, depth = render_mesh(v, f, colors, cams)
    res = 16
    vox = surface_voxels(v, f, res)
    centres = voxel_centres(vox, res).float()
    pixels = rgb.permute(0, 2, 3, 1)[:, :, :, None, :].reshape(2, 64, 64, 3)  # patch = 1 pixel
    tol = math.sqrt(3) / res
    feats, seen = back_project(pixels, cams, depth, centres, 1, tol)
    front = centres[:, 2] > 0
    assert bool((seen > 0).all())
    assert float(feats[front, 2].max()) == 0.0  # no blue on the red square
    assert float(feats[~front, 0].max()) == 0.0  # no red on the blue square
    # Without the occlusion test the front camera's red leaks onto the back square.
    leaky, _ = back_project(pixels, cams, depth, centres, 1, 10.0)
    assert float(leaky[~front, 0].max()) > 0.1


def test_bad_assets_fail_with_their_name():
    a = small_asset(views=4, size=16)
    with pytest.raises(ThreeDError, match="icosphere: 3 views and 4 depth maps for 4 cameras"):
        ThreeDModality(ThreeDConfig()).patchify([Asset3D(**{**vars_of(a), "views": a.views[:3], "depth": a.depth})],
                                                SPEC)
    with pytest.raises(ThreeDError, match="voxel coordinates outside"):
        ThreeDModality(ThreeDConfig()).patchify([Asset3D(**{**vars_of(a), "voxels": a.voxels + 100})], SPEC)


# ---------------------------------------------------------------- meshes on disk


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("content, message", [
    ("", "file is empty"),
    ("OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n", "no faces"),
    ("OFF\n3 1 0\n0 0 0\nnan 0 0\n0 1 0\n3 0 1 2\n", "NaN or infinite"),
    ("this is not a mesh at all", "not a readable off mesh|no faces|no vertices"),
])
def test_bad_meshes_name_the_file(tmp_path, content, message):
    path = write(tmp_path / "bad.off", content)
    with pytest.raises(MeshError, match=message) as err:
        load_mesh(path)
    assert str(path) in str(err.value)


def test_missing_and_unsupported_meshes(tmp_path):
    with pytest.raises(MeshError, match="file not found"):
        load_mesh(str(tmp_path / "gone.obj"))
    with pytest.raises(MeshError, match="unsupported mesh format '.txt'"):
        load_mesh(write(tmp_path / "mesh.txt", "v 0 0 0"))


def test_mesh_folder_skips_bad_files_and_reports_them(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    for i, mesh in enumerate([trimesh.creation.box(), trimesh.creation.icosphere(1), trimesh.creation.cone(0.5, 1.0)]):
        mesh.export(tmp_path / f"m{i}.glb")
    write(tmp_path / "m0_broken.off", "OFF\n3 1 0\n0 0 0\nnan 0 0\n0 1 0\n3 0 1 2\n")
    source = MeshSource(MeshSourceConfig(folder=str(tmp_path), resolution=8, views=2, eval_views=1, size=16))
    assert len(source.train) == 2 and [m.name for m in source.evals] == ["m2.glb"]
    assert len(source.skipped) == 1 and "m0_broken.off" in source.skipped[0]
    batch = source.train_batch(2, torch.Generator().manual_seed(0))
    assert all(isinstance(a, Asset3D) and len(a.voxels) for a in batch)


def test_mesh_source_with_only_bad_files_is_a_clear_error(tmp_path):
    bad = write(tmp_path / "bad.off", "OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n")
    with pytest.raises(MeshError, match="the training mesh set is empty: .*bad.off"):
        MeshSource(MeshSourceConfig(train=[bad], eval=["primitive://box"], resolution=8))


def test_packaged_meshes_are_real_and_ship_with_packages():
    import importlib.util

    # pyvista is installed --no-deps (noxfile) only for the files its wheel carries; importing it would need vtk.
    assert importlib.util.find_spec("pyvista") is not None, "pyvista's wheel must be installed (see noxfile)"
    source = MeshSource(MeshSourceConfig(resolution=8, views=2, eval_views=2, size=16))
    assert not source.skipped
    names = [m.name for m in source.train] + [m.name for m in source.evals]
    assert {"airplane.ply", "ant.ply", "nut.ply"} <= set(names)
    assert len(source.train[0].faces) > 1000  # the airplane: a real scanned/modelled mesh, not a primitive
    name, asset = source.eval_samples()[0]
    assert asset.target_views.shape == (2, 3, 16, 16)
    # held-out cameras are not input cameras
    assert not any(torch.allclose(a, b) for a in asset.target_cameras.w2c for b in asset.cameras.w2c)


# ---------------------------------------------------------------- model head and packing


def test_3d_head_decodes_gaussians_and_packs_with_images(registries):
    from atoken_modalities.image import ImageConfig
    from atoken_modalities.image_impl import ImageModality

    torch.manual_seed(0)
    model = make_model(registries).eval()
    mod = ThreeDModality(ThreeDConfig(gaussians_per_voxel=2))
    model.add_head("3d", mod.head_dim(model.spec))
    asset = small_asset(views=3, size=16, resolution=8)
    tokens_3d = mod.patchify([asset], model.spec).patches
    tokens_img = ImageModality(ImageConfig()).patchify([torch.rand(3, 12, 8) * 2 - 1], model.spec).patches
    packed = Sparse4D.pack([tokens_img, tokens_3d])
    with torch.no_grad():
        together = model.encode(packed).split(packed.lengths.tolist())
        alone = [model.encode(tokens_img), model.encode(tokens_3d)]
        raw, _ = model(tokens_3d, sample=False, head="3d")
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert raw.shape == (tokens_3d.num_tokens, 2 * 14)
    views = mod.unpatchify(tokens_3d.with_features(raw), mod.patchify([asset], model.spec).meta, model.spec)[0]
    assert views.shape == asset.views.shape and float(views.min()) >= -1 and float(views.max()) <= 1


def test_3d_reconstruction_files(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    mod = ThreeDModality(ThreeDConfig(gaussians_per_voxel=1))
    asset = small_asset(views=2, size=16, resolution=6)
    tokens = mod.patchify([asset], SPEC)
    raw = torch.zeros(tokens.patches.num_tokens, mod.head_dim(SPEC))
    written = mod.save_reconstruction(tokens.patches.with_features(raw), tokens.meta, SPEC, str(tmp_path / "asset"))
    assert [p.rsplit("/", 1)[-1] for p in written] == ["asset.ply", "asset-turntable.png"]
    ply = plyfile.PlyData.read(str(tmp_path / "asset.ply"))
    assert ply["vertex"].count == tokens.patches.num_tokens
    centres = np.stack([ply["vertex"][k] for k in "xyz"], -1)
    np.testing.assert_allclose(centres, tokens.meta[0]["centres"].numpy(), atol=1e-6)  # raw 0: at the voxel centres


# ---------------------------------------------------------------- posed-views folders


def posed_folder(tmp_path, name="icosphere", views=12, size=32):
    from atoken_modalities.posed_views import write_posed_views

    mesh = prepare_mesh(f"primitive://{name}", colour_seed=0)
    cams = sphere_cameras(views, 2.0, 40.0, size)
    rgb, depth = render_mesh(mesh.vertices, mesh.faces, mesh.colors, cams)
    folder = tmp_path / name
    write_posed_views(str(folder), rgb * 2 - 1, cams, torch.isfinite(depth).float())
    return folder, mesh, cams, rgb


def test_posed_views_round_trip_cameras_and_carve_the_object(tmp_path):
    from atoken_modalities.posed_views import load_posed_views

    folder, mesh, cams, rgb = posed_folder(tmp_path)
    asset = load_posed_views(str(folder), resolution=12, heldout=2)
    assert len(asset.cameras) == 10 and len(asset.target_cameras) == 2
    torch.testing.assert_close(asset.cameras.w2c, cams.w2c[:10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(asset.cameras.K, cams.K[:10], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((asset.views + 1) / 2, rgb[:10], atol=1 / 255, rtol=0)
    # The visual hull of a convex object from 10 views: its surface voxels mostly coincide
    # with the mesh's own surface voxels.
    truth = {tuple(v) for v in surface_voxels(mesh.vertices, mesh.faces, 12).tolist()}
    carved = {tuple(v) for v in asset.voxels.tolist()}
    assert len(truth & carved) / len(truth | carved) > 0.5
    tokens = ThreeDModality(ThreeDConfig()).patchify([asset], SPEC)
    assert tokens.meta[0]["unseen_voxels"] < 0.2 * len(asset.voxels)


def test_posed_views_camera_count_mismatch_names_the_file(tmp_path):
    import json

    from atoken_modalities.posed_views import load_posed_views

    folder, *_ = posed_folder(tmp_path, views=4, size=16)
    meta = json.loads((folder / "transforms.json").read_text())
    meta["frames"] = meta["frames"][:3]
    (folder / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(ThreeDError, match=r"transforms.json: describes 3 views but the folder holds 4 images"):
        load_posed_views(str(folder), resolution=8)
    (folder / "transforms.json").write_text("{not json")
    with pytest.raises(ThreeDError, match="transforms.json: not valid JSON"):
        load_posed_views(str(folder), resolution=8)


@given(st.permutations(["image", "video", "3d"]), st.integers(0, 2**31 - 1))
def test_packing_images_videos_and_3d_leaves_each_sample_unchanged(registries, order, seed):
    # Any order of one image, one video and one 3D asset in one packed batch: every sample's
    # encoder output is what it gets alone (block-diagonal attention, zero-padded frame slots).
    from atoken_modalities.image import ImageConfig
    from atoken_modalities.image_impl import ImageModality
    from atoken_modalities.video import VideoConfig
    from atoken_modalities.video_impl import VideoModality

    g = torch.Generator().manual_seed(seed)
    model = make_model(registries).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.patch_embed.weight, std=0.05, generator=g)  # trained temporal weights
    spec = model.spec
    parts = {
        "image": ImageModality(ImageConfig()).patchify([torch.rand(3, 12, 8, generator=g) * 2 - 1], spec).patches,
        "video": VideoModality(VideoConfig()).patchify([torch.rand(3, 3, 8, 8, generator=g) * 2 - 1], spec).patches,
        "3d": ThreeDModality(ThreeDConfig()).patchify([small_asset(views=2, size=16, resolution=6)], spec).patches,
    }
    samples = [parts[name] for name in order]
    packed = Sparse4D.pack(samples)
    with torch.no_grad():
        together = model.encode(packed).split(packed.lengths.tolist())
        for a, s in zip(together, samples):
            torch.testing.assert_close(a, model.encode(s), atol=1e-5, rtol=1e-5)


def test_mesh_source_ranks_render_only_their_slice_of_the_same_batch():
    source = MeshSource(MeshSourceConfig(train=["primitive://box", "primitive://cone", "primitive://torus"],
                                         eval=["primitive://icosphere"], resolution=6, views=2, size=16))
    whole, texts = source.train_batch_texts(4, torch.Generator().manual_seed(3))
    for rank in (0, 1):
        part, part_texts = source.train_batch_part(4, torch.Generator().manual_seed(3), rank, 2)
        assert part_texts == texts[rank::2]
        for a, b in zip(part, whole[rank::2]):
            torch.testing.assert_close(a.views, b.views)
            assert torch.equal(a.voxels, b.voxels)
