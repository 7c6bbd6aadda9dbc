"""Export: marching cubes on analytic densities, mesh files, PNG grids and MP4 videos (CPU, fast)."""

from __future__ import annotations

import logging
import math

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from dreamfusion_trt.export.media import image_grid, side_by_side, to_uint8, write_png, write_video
from dreamfusion_trt.export.mesh import (
    extract_mesh,
    grid_coordinates,
    load_mesh_world,
    mesh_file_frame,
    sample_density_grid,
    sample_density_near_surface,
    save_mesh,
    save_meshes,
)

R0 = 0.5


def sphere_density(center=(0.0, 0.0, 0.0), radius=R0, scale=20.0):
    c = torch.tensor(center, dtype=torch.float32)

    def fn(x: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N], positive inside
        return scale * (radius - (x - c).norm(dim=-1))

    return fn


def box_density(center, half):
    """Piecewise-linear box: 1 - max_i |x_i - c_i| / h_i, zero on the box faces."""
    c = torch.tensor(center, dtype=torch.float32)
    h = torch.tensor(half, dtype=torch.float32)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return 1.0 - ((x - c).abs() / h).max(dim=-1).values

    return fn


def red_blue(x: torch.Tensor) -> torch.Tensor:
    """Red where x > 0, blue where x < 0: [N, 3] -> [N, 3]."""
    pos = (x[:, 0] > 0).float()
    return torch.stack([pos, torch.zeros_like(pos), 1.0 - pos], dim=-1)


@pytest.fixture(scope="module")
def colored_sphere() -> trimesh.Trimesh:
    return extract_mesh(sphere_density(), red_blue, bound=1.0, resolution=64, threshold=0.0)


# ---------------------------------------------------------------------------------------------
# marching cubes


def test_sphere_meshes_to_watertight_sphere_of_right_radius(colored_sphere):
    mesh = colored_sphere
    assert mesh.is_watertight
    assert mesh.is_winding_consistent
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radius.mean() - R0) < 0.02 * R0
    assert np.abs(radius - R0).max() < 0.01  # a third of a voxel at 64^3 over [-1, 1]
    assert mesh.volume == pytest.approx(4.0 / 3.0 * math.pi * R0**3, rel=0.03)
    centre = mesh.triangles_center
    outward = np.einsum("fi,fi->f", mesh.face_normals, centre / np.linalg.norm(centre, axis=1, keepdims=True))
    assert outward.mean() > 0.9
    assert outward.min() > 0.0


def test_denser_outside_still_orients_away_from_dense_side():
    """Density high outside a ball: the mesh is the box shell with a ball cavity, normals away from density."""
    mesh = extract_mesh(sphere_density(scale=-20.0), None, bound=1.0, resolution=32, threshold=0.0, fill_cavities=False)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(8.0 - 4.0 / 3.0 * math.pi * R0**3, rel=0.02)
    inner = np.linalg.norm(mesh.triangles_center, axis=1) < 0.9
    c = mesh.triangles_center[inner]
    dots = np.einsum("fi,fi->f", mesh.face_normals[inner], c / np.linalg.norm(c, axis=1, keepdims=True))
    assert dots.mean() < -0.9  # the cavity's normals point towards the centre, i.e. into the empty ball


def test_enclosed_cavity_is_filled_unless_asked_to_keep_it():
    """A hollow ball (dense only between radii 0.3 and 0.6): by default the mesh is the solid
    ball a viewer sees; with fill_cavities=False it is the shell with its inner surface."""

    def shell(x: torch.Tensor) -> torch.Tensor:
        r = x.norm(dim=-1)
        return 20.0 * torch.minimum(r - 0.3, 0.6 - r)

    solid = extract_mesh(shell, None, bound=1.0, resolution=48, threshold=0.0)
    hollow = extract_mesh(shell, None, bound=1.0, resolution=48, threshold=0.0, fill_cavities=False)
    assert solid.is_watertight and hollow.is_watertight
    assert solid.volume == pytest.approx(4.0 / 3.0 * math.pi * 0.6**3, rel=0.03)
    assert hollow.volume == pytest.approx(4.0 / 3.0 * math.pi * (0.6**3 - 0.3**3), rel=0.05)
    assert np.linalg.norm(solid.vertices, axis=1).min() > 0.5  # no inner surface left


def test_off_centre_box_lands_at_its_world_position():
    """Asymmetric box: any axis swap, flip or off-by-one in index -> world fails the bounds check."""
    center, half = (0.31, -0.22, 0.13), (0.2, 0.1, 0.15)  # faces fall between grid points
    mesh = extract_mesh(box_density(center, half), None, bound=1.0, resolution=41, threshold=0.0)
    expected = np.array([np.subtract(center, half), np.add(center, half)])
    # the density is linear across each face, so face vertices interpolate exactly
    np.testing.assert_allclose(mesh.bounds, expected, atol=1e-5)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(8 * np.prod(half), rel=0.15)  # edges and corners get chamfered


def test_world_mapping_scales_with_bound():
    """Same sphere meshed in a box of bound 2 lands at the same place (spacing, not index, units)."""
    mesh = extract_mesh(sphere_density(center=(0.6, -0.4, 0.2)), None, bound=2.0, resolution=80, threshold=0.0)
    np.testing.assert_allclose(mesh.vertices.mean(axis=0), [0.6, -0.4, 0.2], atol=5e-3)
    assert abs(np.linalg.norm(mesh.vertices - [0.6, -0.4, 0.2], axis=1).mean() - R0) < 0.02 * R0


def test_grid_coordinates_and_sampling_order():
    axis = grid_coordinates(1.5, 7)
    assert axis[0] == -1.5 and axis[-1] == 1.5
    np.testing.assert_allclose(np.diff(axis), 0.5)
    grid = sample_density_grid(lambda x: x[:, 0] + 10 * x[:, 1] + 100 * x[:, 2], 1.5, 7, chunk=5)
    assert grid.shape == (7, 7, 7)
    i, j, k = 1, 4, 6
    assert grid[i, j, k] == pytest.approx(axis[i] + 10 * axis[j] + 100 * axis[k], abs=1e-4)


def test_chunk_size_does_not_change_the_mesh():
    calls = []

    def density(x):
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return sphere_density()(x)

    small = extract_mesh(density, None, bound=1.0, resolution=24, threshold=0.0, chunk=1000)
    assert max(n for n, _ in calls) <= 1000
    assert not any(g for _, g in calls)
    big = extract_mesh(sphere_density(), None, bound=1.0, resolution=24, threshold=0.0)
    # The density is per point, so chunking cannot change it beyond float rounding in the norm's
    # vectorised reduction; grid values sit well away from the threshold, so faces are identical.
    np.testing.assert_allclose(small.vertices, big.vertices, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(small.faces, big.faces)


@pytest.mark.parametrize(
    "density, resolution",
    [
        (sphere_density(), 64),
        (box_density((0.31, -0.22, 0.13), (0.2, 0.1, 0.15)), 61),  # 61: the last coarse cell is short
        (sphere_density(center=(0.8, 0.0, 0.0)), 64),  # capped on the box face
    ],
)
def test_coarse_to_fine_sampling_gives_the_same_mesh_with_fewer_queries(density, resolution):
    counted = []

    def counting(x):
        counted.append(len(x))
        return density(x)

    kwargs = dict(bound=1.0, resolution=resolution, threshold=0.0)
    full = extract_mesh(density, red_blue, **kwargs)
    fast = extract_mesh(counting, red_blue, coarse_stride=4, **kwargs)
    np.testing.assert_array_equal(fast.faces, full.faces)
    np.testing.assert_array_equal(fast.vertices, full.vertices)  # the same values where it matters
    np.testing.assert_array_equal(fast.visual.vertex_colors, full.visual.vertex_colors)
    assert sum(counted) < 0.4 * resolution**3  # density queries (colours go to red_blue directly)


def test_coarse_to_fine_grid_is_exact_near_the_surface():
    fn = sphere_density()
    full = sample_density_grid(fn, 1.0, 33)
    fast = sample_density_near_surface(fn, 1.0, 33, threshold=0.0, stride=4)
    assert ((fast > 0) == (full > 0)).all()  # the same side everywhere
    near = np.abs(full) < 20 * 0.15  # within 0.15 of the radius
    np.testing.assert_array_equal(fast[near], full[near])
    np.testing.assert_array_equal(sample_density_near_surface(fn, 1.0, 9, 0.0, stride=1), sample_density_grid(fn, 1.0, 9))
    with pytest.raises(ValueError, match="stride"):
        sample_density_near_surface(fn, 1.0, 9, 0.0, stride=0)


def test_density_sampling_logs_progress(monkeypatch, caplog):
    from dreamfusion_trt.export import mesh as mesh_mod

    monkeypatch.setattr(mesh_mod, "PROGRESS_EVERY_S", 0.0)  # a line after every chunk
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt.export.mesh"):
        sample_density_grid(sphere_density(), 1.0, 16, chunk=1024)  # 4096 points in 4 chunks
    lines = [r.getMessage() for r in caplog.records]
    progress = [m for m in lines if "% (" in m]
    assert [m.split(":")[1].split("%")[0].strip() for m in progress] == ["25", "50", "75"]
    assert all("points/s" in m and "s left" in m for m in progress)
    assert "density on the 16^3 grid: 0.0M points in" in lines[-1]


def test_surface_touching_the_box_is_capped_on_the_box_face():
    mesh = extract_mesh(sphere_density(center=(0.8, 0.0, 0.0)), None, bound=1.0, resolution=64, threshold=0.0)
    assert mesh.is_watertight
    assert mesh.bounds[1, 0] == pytest.approx(1.0)
    h = 0.3  # the cap of height 0.3 past x = 1 is cut off
    cut = 4.0 / 3.0 * math.pi * R0**3 - math.pi * h**2 * (3 * R0 - h) / 3
    assert mesh.volume == pytest.approx(cut, rel=0.03)


def test_vertex_colors_come_from_color_fn(colored_sphere):
    colors = colored_sphere.visual.vertex_colors  # [V, 4] uint8
    x = colored_sphere.vertices[:, 0]
    right, left = x > 0.02, x < -0.02
    assert right.sum() > 100 and left.sum() > 100
    assert (colors[right] == [255, 0, 0, 255]).all()
    assert (colors[left] == [0, 0, 255, 255]).all()


def test_floaters_dropped_by_fraction_or_largest_component():
    big, small = sphere_density(radius=0.5), sphere_density(center=(0.8, 0.8, 0.8), radius=0.1)

    def two(x):
        return torch.maximum(big(x), small(x))

    kwargs = dict(bound=1.0, resolution=48, threshold=0.0)
    everything = extract_mesh(two, None, min_component_fraction=0.0, **kwargs)
    assert len(everything.split(only_watertight=False)) == 2
    # the small ball has about 4 % of the faces: kept by the default, dropped at 10 %
    assert len(extract_mesh(two, None, **kwargs).faces) == len(everything.faces)
    for mesh in (
        extract_mesh(two, red_blue, min_component_fraction=0.1, **kwargs),
        extract_mesh(two, red_blue, components="largest", **kwargs),
    ):
        assert len(mesh.split(only_watertight=False)) == 1
        assert np.linalg.norm(mesh.vertices, axis=1).max() < 0.51
        assert len(mesh.visual.vertex_colors) == len(mesh.vertices)


def test_no_surface_raises_with_density_range():
    with pytest.raises(ValueError, match=r"no surface at threshold 25.*ranges from -24.64\d* to 10,"):
        extract_mesh(sphere_density(radius=0.5), None, bound=1.0, resolution=21, threshold=25.0)
    with pytest.raises(ValueError, match="everywhere reaches"):
        extract_mesh(lambda x: torch.full((x.shape[0],), 5.0), None, bound=1.0, resolution=8, threshold=1.0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="resolution"):
        extract_mesh(sphere_density(), None, bound=1.0, resolution=1, threshold=0.0)
    with pytest.raises(ValueError, match="bound"):
        extract_mesh(sphere_density(), None, bound=0.0, resolution=8, threshold=0.0)
    with pytest.raises(ValueError, match=r"density_fn must return \[N\]"):
        extract_mesh(lambda x: x, None, bound=1.0, resolution=8, threshold=0.0)
    with pytest.raises(ValueError, match="NaN"):
        extract_mesh(lambda x: torch.full((x.shape[0],), float("nan")), None, bound=1.0, resolution=8, threshold=0.0)
    with pytest.raises(ValueError, match=r"color_fn must return \[N, 3\]"):
        extract_mesh(sphere_density(), lambda x: x[:, :2], bound=1.0, resolution=16, threshold=0.0)


# ---------------------------------------------------------------------------------------------
# mesh files


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_mesh_round_trip(colored_sphere, tmp_path, fmt):
    path = save_mesh(colored_sphere, tmp_path / f"sphere.{fmt}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"sphere.{fmt}"]  # no temp or .mtl files
    loaded = load_mesh_world(path)
    assert len(loaded.vertices) == len(colored_sphere.vertices)
    assert len(loaded.faces) == len(colored_sphere.faces)
    # GLB and PLY store float32, OBJ 8 decimals: 1e-6 absolute for coordinates within [-1, 1]
    np.testing.assert_allclose(loaded.vertices, colored_sphere.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, colored_sphere.faces)
    colors = np.asarray(loaded.visual.vertex_colors)
    np.testing.assert_array_equal(colors[:, :3], colored_sphere.visual.vertex_colors[:, :3])


def _figure() -> trimesh.Trimesh:
    """World frame: a body tall along z (up), a nose towards +x (the front the azimuth-0 camera
    sees), a marker low on +y."""
    body = trimesh.creation.box(extents=(0.4, 0.4, 1.2))
    nose = trimesh.creation.box(extents=(0.3, 0.1, 0.1))
    nose.apply_translation((0.35, 0.0, 0.3))
    marker = trimesh.creation.box(extents=(0.1, 0.2, 0.1))
    marker.apply_translation((0.0, 0.3, -0.4))
    return trimesh.util.concatenate([body, nose, marker])


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_mesh_files_open_upright_in_a_y_up_viewer(tmp_path, fmt):
    """glTF (and what Blender, three.js assume for OBJ): +Y up, the front faces +Z, the asset's
    right is -X, so a viewer looking at its front sees +X on the right."""
    world = _figure()
    path = save_mesh(world, tmp_path / f"figure.{fmt}")
    seen = trimesh.load(path, force="mesh", process=False)  # raw coordinates, as a viewer reads them
    np.testing.assert_allclose(seen.bounds, [[-0.2, -0.6, -0.2], [0.4, 0.6, 0.5]], atol=1e-6)
    assert np.argmax(seen.extents) == 1  # tall along +Y: upright
    nose = seen.vertices[seen.vertices[:, 2] > 0.45]  # the part furthest towards the viewer (+Z)
    assert len(nose) and (nose[:, 1] > 0.2).all()  # ... is the nose, high up
    marker = seen.vertices[seen.vertices[:, 0] > 0.25]
    assert len(marker) and (marker[:, 1] < -0.3).all()  # the marker: low, on the viewer's right
    assert seen.volume > 0  # faces still wound outward after the rotation
    back = load_mesh_world(path)
    np.testing.assert_allclose(back.vertices, world.vertices, atol=1e-6)
    assert mesh_file_frame(path) == "gltf_y_up"


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_untagged_mesh_of_an_older_version_reads_as_world_frame(tmp_path, fmt):
    world = _figure()
    path = tmp_path / f"old.{fmt}"
    data = world.export(file_type=fmt)  # what versions before the Y-up change wrote
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    assert mesh_file_frame(path) == "world"
    np.testing.assert_allclose(load_mesh_world(path).vertices, world.vertices, atol=1e-6)


def test_load_mesh_world_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mesh not found"):
        load_mesh_world(tmp_path / "none.glb")
    (tmp_path / "bad.glb").write_bytes(b"not a glb at all")
    with pytest.raises(ValueError, match="could not read mesh"):
        load_mesh_world(tmp_path / "bad.glb")


def test_save_meshes_writes_each_format(colored_sphere, tmp_path):
    paths = save_meshes(colored_sphere, tmp_path / "out", "thing", ["glb", ".PLY"])
    assert [p.name for p in paths] == ["thing.glb", "thing.ply"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_bad_mesh_suffix_raises_and_writes_nothing(colored_sphere, tmp_path):
    with pytest.raises(ValueError, match=r"'\.stl'.*allowed: \.glb, \.obj, \.ply"):
        save_mesh(colored_sphere, tmp_path / "sphere.stl")
    with pytest.raises(ValueError, match="'fbx'"):
        save_meshes(colored_sphere, tmp_path, "sphere", ["glb", "fbx"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# images and video


def test_to_uint8_from_torch_and_numpy():
    x = torch.tensor([[[[0.0, 0.5, 1.0], [-1.0, 2.0, float("nan")]]]])  # [1, 1, 2, 3]
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [[0, 128, 255], [0, 255, 0]])
    np.testing.assert_array_equal(to_uint8(x.numpy().astype(np.float64)), out)
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 3\]"):
        to_uint8(np.zeros((4, 4, 4), np.float32))


def test_image_grid_shape_and_placement():
    images = np.stack([np.full((10, 12, 3), i * 40, np.uint8) for i in range(5)])  # [5, 10, 12, 3]
    grid = image_grid(images, cols=3, pad=2)
    assert grid.shape == (2 * 10 + 2, 3 * 12 + 2 * 2, 3)
    assert (grid[0:10, 14:26] == 40).all()  # image 1: row 0, col 1
    assert (grid[12:22, 14:26] == 160).all()  # image 4: row 1, col 1
    assert (grid[12:22, 28:40] == 255).all()  # empty last cell
    assert (grid[10:12] == 255).all()  # padding row
    assert image_grid(torch.rand(4, 8, 8, 3), pad=0).shape == (16, 16, 3)  # default cols = 2


def test_side_by_side_frames():
    a, b = np.zeros((4, 6, 5, 3), np.uint8), torch.ones(4, 6, 7, 3)
    out = side_by_side([a, b], pad=1)
    assert out.shape == (4, 6, 5 + 1 + 7, 3)
    assert (out[..., :5, :] == 0).all() and (out[..., 6:, :] == 255).all()
    with pytest.raises(ValueError, match="leading dims"):
        side_by_side([a, np.zeros((3, 6, 5, 3), np.uint8)])


def test_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    path = write_png(image, tmp_path / "grid.png")
    np.testing.assert_array_equal(imageio.imread(path), image)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with pytest.raises(ValueError, match="jpg"):
        write_png(image, tmp_path / "grid.jpg")


def test_video_round_trip_odd_size(tmp_path):
    frames = np.stack([np.full((31, 29, 3), i / 7, np.float32) for i in range(8)])  # [8, 31, 29, 3]
    path = write_video(iter(frames), tmp_path / "turntable.mp4", fps=10)
    assert [p.name for p in tmp_path.iterdir()] == ["turntable.mp4"]
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        back = np.stack(list(reader.iter_data()))
    finally:
        reader.close()
    assert back.shape == (8, 32, 30, 3)  # padded to even sizes
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == pytest.approx(10)
    np.testing.assert_allclose(back.reshape(8, -1).mean(axis=1), np.arange(8) / 7 * 255, atol=4)


def test_failing_video_write_leaves_nothing(tmp_path):
    frames = [np.zeros((16, 16, 3), np.uint8)] * 3 + [np.zeros((18, 16, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"frame 3 has shape \(18, 16, 3\)"):
        write_video(frames, tmp_path / "bad.mp4", fps=5)
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "empty.mp4", fps=5)
    assert list(tmp_path.iterdir()) == []
