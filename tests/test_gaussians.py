"""The Gaussian-splatting renderer against independent references: gsplat's own pure-torch
projection, a per-pixel brute-force compositor, finite differences and the closed-form profile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atoken_modalities.cameras import Cameras, intrinsics, look_at, sphere_cameras
from atoken_modalities.gaussians import (
    GAUSSIAN_PARAMS,
    PLY_PROPERTIES,
    SCALE_RANGE_VOXELS,
    Gaussians,
    gaussians_from_raw,
    load_ply,
    project,
    render,
    save_ply,
    turntable,
)

ALPHA_THRESHOLD, MAX_ALPHA, MIN_TRANSMITTANCE = 1 / 255, 0.999, 1e-4  # gsplat's kernel constants


def random_gaussians(n: int, seed: int, *, spread: float = 0.5, scale=(0.03, 0.2), opacity=(0.2, 0.95),
                     dtype=torch.float64) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=dtype)  # noqa: E731
    return Gaussians(
        means=(rand(n, 3) * 2 - 1) * spread,
        colors=rand(n, 3),
        opacities=opacity[0] + (opacity[1] - opacity[0]) * rand(n),
        scales=scale[0] + (scale[1] - scale[0]) * rand(n, 3),
        quats=torch.nn.functional.normalize(torch.randn(n, 4, generator=gen, dtype=dtype), dim=-1),
    )


def cameras_around(n: int, size: tuple[int, int], radius: float = 3.0, fov: float = 40.0, dtype=torch.float64) -> Cameras:
    cams = sphere_cameras(n, radius, fov, size[1])
    return Cameras(intrinsics(fov, size[0], size[1]).expand(n, 3, 3).to(dtype), cams.w2c.to(dtype), size[0], size[1])


# ---------------------------------------------------------------- projection vs gsplat's torch reference


def test_projection_matches_gsplat_torch_reference():
    ref = pytest.importorskip("gsplat.cuda._torch_impl", reason="gsplat not installed")
    # Points behind the cameras, off-screen (the clamped Jacobian) and big splats straddling the border.
    g = random_gaussians(400, seed=1, spread=3.0, scale=(0.01, 0.6))
    cams = cameras_around(5, (48, 64), radius=2.5)
    covars, _ = ref._quat_scale_to_covar_preci(g.quats, g.scales, compute_preci=False)
    for eps2d, near in [(0.3, 0.01), (0.0, 0.5)]:
        radii, means2d, depths, conics, _ = ref._fully_fused_projection(
            g.means, covars, cams.w2c, cams.K, cams.width, cams.height, eps2d=eps2d, near_plane=near)
        ours = project(g, cams, near=near, eps2d=eps2d, opacity_aware=False)
        drawn = (radii > 0).all(-1)
        assert 0 < drawn.sum() < drawn.numel()  # both cases occur
        assert torch.equal(ours.radii, radii.int())
        torch.testing.assert_close(ours.depths, depths, rtol=0, atol=1e-12)
        in_front = depths > near
        assert (~in_front).any()
        torch.testing.assert_close(ours.means2d[in_front], means2d[in_front], rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(ours.conics[in_front], conics[in_front], rtol=1e-10, atol=1e-12)


def test_opacity_aware_radii_are_tighter_and_drop_faint_gaussians():
    g = random_gaussians(200, seed=2, opacity=(0.001, 1.0))
    cams = cameras_around(2, (32, 32))
    loose = project(g, cams, opacity_aware=False).radii
    tight = project(g, cams).radii
    assert (tight <= loose).all() and (tight < loose).any()
    faint = g.opacities < ALPHA_THRESHOLD
    assert faint.any() and (tight[:, faint] == 0).all()


# ---------------------------------------------------------------- compositing vs a brute-force reference


def textbook_splats(g: Gaussians, K: torch.Tensor, w2c: torch.Tensor, near: float, eps2d: float) -> list[tuple]:
    """(depth, mean2d, inverse 2D covariance, opacity, colour) per Gaussian in front of the camera,
    nearest first: rotation by Rodrigues' formula, Sigma = R S^2 R^T, EWA with the perspective Jacobian.
    (gsplat clamps the Jacobian's x/z, y/z to 1.3x the field of view; the scenes given here stay inside it.)"""
    rot_w, trans_w = w2c[:3, :3].numpy(), w2c[:3, 3].numpy()
    fx, fy, cx, cy = K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item()
    splats = []
    for n in range(len(g)):
        x, y, z = rot_w @ g.means[n].numpy() + trans_w
        if z <= near:
            continue
        q = g.quats[n].numpy() / np.linalg.norm(g.quats[n].numpy())
        angle = 2 * math.acos(min(1.0, max(-1.0, q[0])))
        axis = q[1:] / max(np.linalg.norm(q[1:]), 1e-300)
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = np.eye(3) * math.cos(angle) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(axis, axis)
        sigma = rot @ np.diag(g.scales[n].numpy() ** 2) @ rot.T
        jac = np.array([[fx / z, 0, -fx * x / z**2], [0, fy / z, -fy * y / z**2]])
        cov2d = jac @ rot_w @ sigma @ rot_w.T @ jac.T + eps2d * np.eye(2)
        mean2d = np.array([fx * x / z + cx, fy * y / z + cy])
        splats.append((z, mean2d, np.linalg.inv(cov2d), g.opacities[n].item(), g.colors[n].numpy()))
    return sorted(splats, key=lambda s: s[0])


def brute_force_pixel(splats, i: int, j: int, background: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """Front-to-back blending at pixel (row i, col j), with gsplat's skip (alpha < 1/255) and stop
    (transmittance would reach 1e-4) rules. Returns (rgb, alpha, stopped)."""
    colour, transmittance = np.zeros(3), 1.0
    for _, mean2d, conic, opacity, rgb in splats:
        d = np.array([j + 0.5, i + 0.5]) - mean2d
        alpha = min(MAX_ALPHA, opacity * math.exp(-0.5 * d @ conic @ d))
        if alpha < ALPHA_THRESHOLD:
            continue
        if transmittance * (1 - alpha) <= MIN_TRANSMITTANCE:
            return colour + transmittance * background, 1 - transmittance, True
        colour = colour + transmittance * alpha * rgb
        transmittance *= 1 - alpha
    return colour + transmittance * background, 1 - transmittance, False


def test_compositing_matches_brute_force_per_pixel():
    # Dense and opaque enough that some pixels hit the transmittance stop.
    g = random_gaussians(80, seed=3, scale=(0.05, 0.25), opacity=(0.5, 0.99))
    cams = cameras_around(3, (14, 11))
    background = torch.tensor([[0.2, 0.5, 0.9], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rgb, alpha = render(g, cams, background=background, backend="torch", tile_size=4)
    stops = 0
    for v in range(len(cams)):
        splats = textbook_splats(g, cams.K[v], cams.w2c[v], near=0.01, eps2d=0.3)
        for i in range(cams.height):
            for j in range(cams.width):
                want_rgb, want_alpha, stopped = brute_force_pixel(splats, i, j, background[v].numpy())
                stops += stopped
                np.testing.assert_allclose(rgb[v, :, i, j].numpy(), want_rgb, rtol=0, atol=1e-9)
                np.testing.assert_allclose(alpha[v, 0, i, j].item(), want_alpha, rtol=0, atol=1e-9)
    assert stops > 0
    assert ((alpha > 0.05) & (alpha < 0.95)).any()  # partial coverage is tested too


def test_gaussians_behind_the_near_plane_are_dropped():
    g = random_gaussians(20, seed=4, spread=0.2)
    cams = cameras_around(1, (16, 16), radius=3.0)
    eye = cams.centres()[0]
    behind = Gaussians(g.means + 2 * eye, g.colors, g.opacities, g.scales, g.quats)  # beyond the eye
    rgb, alpha = render(behind, cams, background=(0.3, 0.6, 0.9), backend="torch")
    assert (alpha == 0).all()
    torch.testing.assert_close(rgb[0], torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)[:, None, None].expand(3, 16, 16))
    # ... and the same Gaussians in front are drawn
    assert (render(g, cams, backend="torch")[1] > 0.5).any()
    # Gaussians exactly in the camera plane (z = 0: x / z is inf or nan) and behind it leave no
    # NaN in the gradients of those in front.
    axis_cam = Cameras(cams.K, look_at(torch.tensor([0.0, 0.0, -3.0]))[None], 16, 16)
    plane = torch.tensor([[0.0, 0.0, -3.0], [0.2, -0.1, -3.0], [0.1, 0.1, -3.5]], dtype=torch.float64)
    means = torch.cat([g.means[:10], plane]).requires_grad_(True)
    mixed = Gaussians(means, *(torch.cat([t[:10], t[:3]]) for t in (g.colors, g.opacities, g.scales, g.quats)))
    assert (project(mixed, axis_cam).depths[0, 10:12] == 0).all()
    rgb, alpha = render(mixed, axis_cam, backend="torch")
    (rgb.sum() + alpha.sum()).backward()
    assert torch.isfinite(means.grad).all() and means.grad[:10].abs().sum() > 0


# ---------------------------------------------------------------- gradients


# one step, autograd keeps everything; a group per tile and 2 depth chunks, checkpointed (fast_mode: a
# random direction instead of the full Jacobian, since every backward pass recomputes)
@pytest.mark.parametrize(("tile_size", "max_elements"), [(4, 1 << 21), (3, 20)])
def test_gradcheck_through_render(tile_size, max_elements):
    g = random_gaussians(4, seed=5, spread=0.2, scale=(0.15, 0.3), opacity=(0.3, 0.8))
    cams = cameras_around(2, (5, 6), radius=2.0, fov=25.0)

    def fn(means, colors, opacities, scales, quats):
        rgb, alpha = render(Gaussians(means, colors, opacities, scales, quats), cams,
                            background=(0.1, 0.4, 0.7), backend="torch", tile_size=tile_size, max_elements=max_elements)
        return rgb, alpha

    inputs = tuple(t.clone().requires_grad_(True) for t in (g.means, g.colors, g.opacities, g.scales, g.quats))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=max_elements < 100)
    # not vacuous: every parameter moves the image
    rgb, alpha = fn(*inputs)
    grads = torch.autograd.grad((rgb.sum() + alpha.sum()), inputs)
    assert all(gr.abs().sum() > 0 for gr in grads)


# ---------------------------------------------------------------- closed form, tiling


@pytest.mark.parametrize(("eps2d", "opacity"), [(0.0, 0.8), (0.3, 0.8), (0.3, 0.99999)])
def test_isotropic_gaussian_head_on_is_the_closed_form_profile(eps2d, opacity):
    size, fov, depth, sigma_px = 33, 30.0, 4.0, 4.0
    K = intrinsics(fov, size, size)
    f = K[0, 0].item()
    # a world std s seen at distance z is f s / z pixels; eps2d adds to the variance
    s = depth * math.sqrt(sigma_px**2 - eps2d) / f
    g = Gaussians(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 0.5, 0.25]], dtype=torch.float64),
                  torch.tensor([opacity], dtype=torch.float64), torch.full((1, 3), s, dtype=torch.float64),
                  torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    cams = Cameras(K[None], look_at(torch.tensor([0.0, 0.0, -depth]))[None], size, size)
    rgb, alpha = render(g, cams, background=0.0, eps2d=eps2d, backend="torch")
    centre = size // 2  # its pixel centre is the principal point (size / 2)
    # alpha = o exp(-r^2 / 2 sigma^2), capped at 0.999 as in 3DGS/gsplat
    profile = lambda r: min(MAX_ALPHA, opacity * math.exp(-0.5 * r**2 / sigma_px**2))  # noqa: E731
    for (di, dj) in [(0, 0), (0, 4), (4, 0), (-4, 0), (0, -4), (3, 4)]:
        want = profile(math.hypot(di, dj))
        assert alpha[0, 0, centre + di, centre + dj].item() == pytest.approx(want, abs=1e-9)
        torch.testing.assert_close(rgb[0, :, centre + di, centre + dj], g.colors[0] * want, rtol=0, atol=1e-9)


def test_tiling_and_chunking_do_not_change_the_image():
    g = Gaussians.cat([random_gaussians(150, seed=6, scale=(0.01, 0.05), opacity=(0.5, 0.99)),
                       random_gaussians(10, seed=7, scale=(0.2, 0.5))])
    cams = cameras_around(2, (23, 29))
    one_tile = render(g, cams, backend="torch", tile_size=64, max_elements=1 << 30)
    for tile_size, max_elements in [(1, 1 << 30), (3, 1 << 30), (5, 7), (64, 64 * 64 * 3)]:
        rgb, alpha = render(g, cams, backend="torch", tile_size=tile_size, max_elements=max_elements)
        torch.testing.assert_close(rgb, one_tile[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(alpha, one_tile[1], rtol=0, atol=1e-12)
    assert (one_tile[1] > 1 - 2 * MIN_TRANSMITTANCE).any()  # the stop across depth chunks is exercised


# ---------------------------------------------------------------- ply


def test_ply_round_trip_and_standard_header(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    g = random_gaussians(50, seed=8, dtype=torch.float32)
    for path in [str(tmp_path / "scene.ply"), "memory://gaussians/scene.ply"]:
        if path.startswith("memory://"):
            import fsspec

            fsspec.filesystem("memory").mkdirs("gaussians", exist_ok=True)
        save_ply(g, path)
        back = load_ply(path)
        for name in ("means", "colors", "opacities", "scales", "quats"):
            torch.testing.assert_close(getattr(back, name), getattr(g, name), rtol=1e-5, atol=1e-6, msg=name)
    ply = plyfile.PlyData.read(str(tmp_path / "scene.ply"))
    assert [p.name for p in ply["vertex"].properties] == list(PLY_PROPERTIES) == [
        "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
        "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert not ply.text and ply.byte_order == "<"
    assert all(p.val_dtype in ("f4", "float32") for p in ply["vertex"].properties)
    assert ply["vertex"].count == len(g)
    # the stored numbers follow the 3DGS encoding, not just a private round trip
    vertex = ply["vertex"]
    stored = lambda *keys: torch.from_numpy(np.stack([vertex[k] for k in keys], 1))  # noqa: E731
    torch.testing.assert_close(stored("f_dc_0", "f_dc_1", "f_dc_2"), (g.colors - 0.5) / 0.28209479177387814)
    torch.testing.assert_close(stored("opacity")[:, 0], torch.logit(g.opacities))
    torch.testing.assert_close(stored("scale_0", "scale_1", "scale_2"), torch.log(g.scales))
    torch.testing.assert_close(stored("rot_0", "rot_1", "rot_2", "rot_3"), g.quats)
    torch.testing.assert_close(stored("x", "y", "z"), g.means)
    assert (tmp_path / "scene.ply").read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.ply"]  # no temporary left behind


def test_load_ply_rejects_other_files(tmp_path):
    (tmp_path / "bad.ply").write_bytes(b"not a ply")
    with pytest.raises(ValueError, match="bad.ply"):
        load_ply(str(tmp_path / "bad.ply"))


# ---------------------------------------------------------------- gaussians_from_raw

FLOAT32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(raw=st.lists(FLOAT32, min_size=3 * 2 * GAUSSIAN_PARAMS, max_size=3 * 2 * GAUSSIAN_PARAMS),
       centres=st.lists(st.floats(-1, 1, width=32), min_size=9, max_size=9),
       voxel=st.floats(1e-3, 1.0))
def test_gaussians_from_raw_stays_in_its_voxel_and_valid(raw, centres, voxel):
    raw_lkp = torch.tensor(raw, dtype=torch.float32).reshape(3, 2 * GAUSSIAN_PARAMS)
    centres_l3 = torch.tensor(centres, dtype=torch.float32).reshape(3, 3)
    g = gaussians_from_raw(raw_lkp, centres_l3, voxel)
    assert len(g) == 6
    offset = g.means - centres_l3.repeat_interleave(2, dim=0)
    assert (offset.abs() <= voxel * (1 + 1e-6) + 1e-6).all()
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(6), rtol=0, atol=1e-5)
    lo, hi = SCALE_RANGE_VOXELS
    assert torch.isfinite(g.scales).all() and (g.scales >= lo * voxel * (1 - 1e-5)).all()
    assert (g.scales <= hi * voxel * (1 + 1e-5)).all()
    for t in (g.colors, g.opacities):
        assert torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()


def test_gaussians_from_raw_layout_and_neutral_raw():
    centres = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    raw = torch.zeros(2, 3 * GAUSSIAN_PARAMS)
    raw[1, GAUSSIAN_PARAMS + 10] = -1.0  # second Gaussian of voxel 1: rotation raw w cancels the identity bias
    g = gaussians_from_raw(raw, centres, voxel_size=0.1)
    torch.testing.assert_close(g.means, centres.repeat_interleave(3, dim=0))  # voxel-major order
    assert ((g.scales > 0.25 * 0.1) & (g.scales < 0.1)).all()  # raw 0: a fraction of a voxel
    torch.testing.assert_close(g.quats, torch.tensor([[1.0, 0, 0, 0]]).expand(6, 4))  # incl. the all-zero fallback
    raw[0, 0] = 100.0  # offset x of voxel 0's first Gaussian saturates at one voxel
    assert gaussians_from_raw(raw, centres, 0.1).means[0, 0].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="K\\*14"):
        gaussians_from_raw(torch.zeros(2, 15), centres, 0.1)


# ---------------------------------------------------------------- misc


def test_turntable_and_bad_arguments():
    g = Gaussians.cat([random_gaussians(30, seed=9, spread=0.3),
                       Gaussians(torch.tensor([[0.6, 0.0, 0.0]]).double(), torch.zeros(1, 3).double(),
                                 torch.ones(1).double() * 0.9, torch.full((1, 3), 0.1).double(),
                                 torch.tensor([[1.0, 0, 0, 0]]).double())])
    frames = turntable(g, n_frames=4, radius=3.0, fov_deg=40.0, size=24)
    assert frames.shape == (4, 3, 24, 24) and (frames >= 0).all() and (frames <= 1).all()
    assert not torch.allclose(frames[0], frames[1])  # the asymmetric scene turns
    cams = cameras_around(2, (8, 8))
    with pytest.raises(ValueError, match="backend"):
        render(g, cams, backend="opengl")
    with pytest.raises(ValueError, match="background"):
        render(g, cams, background=torch.ones(3, 2))
    with pytest.raises(ValueError, match="CUDA|gsplat"):
        render(g, cams, backend="gsplat")
    with pytest.raises(ValueError, match="quats"):
        Gaussians(g.means, g.colors, g.opacities, g.scales, g.quats[:, :3])


# ---------------------------------------------------------------- GPU


def test_torch_backend_matches_gsplat_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from atoken_modalities.gaussians import _gsplat

    if _gsplat()[0] is None:
        pytest.skip(_gsplat()[1])
    g = random_gaussians(3000, seed=10, scale=(0.005, 0.08), dtype=torch.float32).to("cuda")
    cams = cameras_around(3, (64, 80), dtype=torch.float32).to("cuda")
    bg = torch.tensor([0.1, 0.5, 0.9], device="cuda")
    ours = render(g, cams, background=bg, backend="torch")
    theirs = render(g, cams, background=bg, backend="gsplat")
    # float32 on both sides (gsplat with fast math): where rounding flips the 1/255 skip of one
    # Gaussian a pixel moves by up to 1/255, so the bound on the worst pixel is loose and the
    # mean carries the comparison.
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
        assert (a - b).abs().mean() < 1e-5
