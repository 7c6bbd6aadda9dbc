"""Scoring runs against their known objects: IoU, Chamfer, colour, six-face share; and the
nearest-neighbour features the prior's self-check uses."""

import json
import logging

import numpy as np
import pytest
import torch
import trimesh

from dreamfusion_trt.cameras import orbit_cameras
from dreamfusion_trt.checkpoint import save_checkpoint, Checkpoint
from dreamfusion_trt.config import FieldConfig, RenderConfig, RunConfig, from_dict
from dreamfusion_trt.export.mesh import extract_mesh, save_mesh
from dreamfusion_trt.field.background import Background
from dreamfusion_trt.prior.scenes import PALETTE, SIX_COLORED_CAPTION, make_object
from dreamfusion_trt.prior.score import (
    _features,
    face_color_share,
    grid_axes,
    mesh_occupancy,
    score_field,
    score_mesh,
    score_run,
    true_silhouette,
)
from dreamfusion_trt.render.renderer import Renderer
from dreamfusion_trt.scene import build_scene


def analytic_mesh(caption: str, resolution: int = 48, color_caption: str | None = None) -> trimesh.Trimesh:
    """Marching cubes of the object's own density at its surface level, coloured by `color_caption`'s
    true surface colours (default: its own)."""
    obj = make_object(caption)
    paint = make_object(color_caption or caption)
    return extract_mesh(
        lambda x: obj.density(x[None])[0],
        paint.surface_color,
        bound=1.0,
        resolution=resolution,
        threshold=obj.density_scale / 2,
    )


@pytest.fixture(scope="module")
def six_mesh():
    return analytic_mesh(SIX_COLORED_CAPTION)


def test_mesh_occupancy_of_a_box_matches_the_analytic_box():
    box = trimesh.creation.box(extents=(0.8, 0.6, 0.4))  # 12 large triangles, closed
    axes = grid_axes(1.0, 40)
    inside = mesh_occupancy(np.asarray(box.vertices), np.asarray(box.faces), *axes)
    x, y, z = np.meshgrid(*axes, indexing="ij")
    truth = (np.abs(x) < 0.4) & (np.abs(y) < 0.3) & (np.abs(z) < 0.2)
    assert truth.sum() > 1000
    assert np.array_equal(inside, truth)


def test_the_objects_own_mesh_scores_near_perfect(six_mesh):
    obj = make_object(SIX_COLORED_CAPTION)
    s = score_mesh(six_mesh, obj, bound=1.0, resolution=64, surface_samples=8000)
    assert s["iou"] > 0.9
    assert s["chamfer"] < 0.01
    assert s["color_error"] < 0.05
    assert s["face_color_share"] == 1.0
    assert s["face_colors"] == {"+x": "red", "-x": "green", "+y": "blue", "-y": "yellow", "+z": "magenta", "-z": "cyan"}
    torus = make_object("a blue torus")
    t = score_mesh(analytic_mesh("a blue torus"), torus, bound=1.0, resolution=64, surface_samples=8000)
    assert t["iou"] > 0.9 and t["chamfer"] < 0.01 and t["color_error"] < 0.01
    assert t["face_color_share"] is None  # only for the six-colored cube


def test_a_shifted_mesh_and_a_wrong_colour_score_clearly_worse(six_mesh):
    obj = make_object(SIX_COLORED_CAPTION)
    good = score_mesh(six_mesh, obj, bound=1.0, resolution=48, surface_samples=4000)
    shifted = six_mesh.copy()
    shifted.apply_translation((0.2, 0.0, 0.0))
    bad = score_mesh(shifted, obj, bound=1.0, resolution=48, surface_samples=4000)
    assert bad["iou"] < 0.7 < good["iou"]
    assert bad["chamfer"] > 5 * good["chamfer"]
    # a green sphere's mesh painted red: right shape, wrong colour
    sphere = make_object("a green sphere")
    red = score_mesh(analytic_mesh("a green sphere", color_caption="a red sphere"), sphere, 1.0, 48, 4000)
    right = score_mesh(analytic_mesh("a green sphere"), sphere, 1.0, 48, 4000)
    assert red["iou"] == right["iou"]
    assert red["color_error"] > 0.8 > 0.05 > right["color_error"]
    # a cone scored as a cylinder: wrong shape
    wrong = score_mesh(analytic_mesh("a red cone"), make_object("a red cylinder"), 1.0, 48, 4000)
    assert wrong["iou"] < 0.6 and wrong["chamfer"] > 0.03


def test_a_janus_cube_loses_the_faces_it_repeats(six_mesh):
    """The back (-x) face showing the front's red, as a multi-faced NeRF would."""
    janus = six_mesh.copy()
    colors = np.asarray(janus.visual.vertex_colors).copy()
    back = janus.vertices[:, 0] < -0.39
    colors[back, :3] = (np.array(PALETTE["red"]) * 255).round()
    janus.visual = trimesh.visual.ColorVisuals(mesh=janus, vertex_colors=colors)
    s = score_mesh(janus, make_object(SIX_COLORED_CAPTION), bound=1.0, resolution=32, surface_samples=6000)
    assert s["face_color_share"] == pytest.approx(5 / 6)
    assert s["face_colors"]["-x"] == "red"
    # a region with no surface at all counts as wrong
    pts = np.array([[0.4, 0, 0], [0, 0.4, 0]])
    share, names = face_color_share(pts, np.array([PALETTE["red"], PALETTE["blue"]]), (0.4, 0.4, 0.4))
    assert share == pytest.approx(2 / 6) and names["-z"] is None


# A small scene (a fresh field: its initial blob) so the field scores run in a few seconds.
_SMALL = {"field": {"num_levels": 4, "log2_hashmap_size": 12, "max_resolution": 64, "hidden_dim": 16},
          "camera": {"render_size": 16}, "render": {"num_samples": 16}}  # fmt: skip


def _fake_run(tmp_path, prompt, mesh=None, name="mesh.glb"):
    cfg = from_dict({**_SMALL, "prompt": {"text": prompt}}, RunConfig())
    torch.manual_seed(0)
    scene = build_scene(cfg)
    save_checkpoint(Checkpoint(step=1, config=cfg, model=scene.state_dict()), tmp_path)
    if mesh is not None:
        save_mesh(mesh, tmp_path / name)
    return tmp_path


def test_score_run_reads_the_prompt_and_mesh_and_writes_score_json(tmp_path, caplog):
    run = _fake_run(tmp_path, "A red cube, front view", analytic_mesh("a red cube", 40), name="mesh.ply")
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt.prior.score"):
        result = score_run(run, resolution=40, surface_samples=3000)
    # the log line alone says which way a run misses: its volume over the truth's
    ratio = result["mesh_volume_fraction"] / result["true_volume_fraction"]
    assert f"volume {ratio:.2f}x the truth's" in caplog.text and 0.9 < ratio < 1.1
    assert result["object"] == "a red cube" and result["mesh"] == "mesh.ply"
    assert result["iou"] > 0.9 and result["color_error"] < 0.02
    saved = json.loads((run / "score.json").read_text())
    assert saved["iou"] == result["iou"] and saved["prompt"] == "A red cube, front view"
    # the field scores come from the checkpoint's scene (a fresh blob, not the mesh above)
    assert saved["best_iou"] == max(saved["iou_by_threshold"].values()) >= saved["field_iou"]
    assert saved["iou_by_threshold"][f"{saved['best_threshold']:g}"] == saved["best_iou"]
    assert 0.0 <= saved["opacity_off_object"] <= 1.0 and 0.0 <= saved["opacity_on_object"] <= 1.0
    assert saved["opacity_views"] == 4 and saved["opacity_size"] == 16
    mesh_only = score_run(run, resolution=40, surface_samples=3000, write=False, field=False)
    assert "best_iou" not in mesh_only and mesh_only["iou"] == result["iou"]


def test_a_cone_saved_as_glb_scores_in_the_world_frame(tmp_path):
    """GLB files are written in glTF's frame (y up); the score reads them back z up, so a cone
    (not symmetric under the swap) still matches itself."""
    run = _fake_run(tmp_path, "a red cone", analytic_mesh("a red cone", 40), name="mesh.glb")
    result = score_run(run, resolution=40, surface_samples=3000, write=False, field=False)
    assert result["mesh"] == "mesh.glb" and result["iou"] > 0.9


def _field_scores(field, truth, views=2):
    renderer = Renderer(field, Background(FieldConfig(background="solid")), RenderConfig(backend="torch", num_samples=48), bound=0.6)
    return score_field(renderer, truth, 0.6, 10.0, orbit_cameras(views, 15.0, 2.0, 45.0), size=24, resolution=32)


def test_a_faint_right_shape_and_a_wrong_shape_read_differently():
    """Analytic fields, no training: the true cube, the same cube at 1/200 of its density (no
    surface at the mesh threshold of 10, half the light through), and an opaque torus."""
    truth = make_object("a red cube", bound=0.6)
    right = _field_scores(make_object("a red cube", bound=0.6), truth)
    faint = _field_scores(make_object("a red cube", bound=0.6, density_scale=1.0), truth)
    wrong = _field_scores(make_object("a red torus", bound=0.6), truth)
    assert right["best_iou"] > 0.9 and right["field_iou"] > 0.8 and right["opacity_on_object"] > 0.99
    # at the mesh's own threshold the faint cube is nothing, and worse than the wrong shape...
    assert faint["field_iou"] < 0.01 < 0.2 < wrong["field_iou"]
    # ...but over thresholds it is the right shape, seen through: half opaque on the object
    assert faint["best_iou"] > 0.9 > 0.5 > wrong["best_iou"]
    assert faint["best_threshold"] < 1.0 and 0.2 < faint["opacity_on_object"] < 0.7
    assert faint["opacity_off_object"] < 0.01  # nothing outside the true silhouette
    assert faint["iou_by_threshold"]["10"] == faint["field_iou"]


def test_true_silhouette_is_the_analytic_projection():
    """A sphere of radius r seen from distance d covers the pixels within angle asin(r / d)."""
    sphere = make_object("a blue sphere", bound=1.0)
    radius = float(sphere.shape.half_extent[0])
    cam = orbit_cameras(1, 0.0, 2.0, 45.0)
    size = 64
    hit = true_silhouette(sphere, cam, size, bound=1.0).reshape(size, size)
    from dreamfusion_trt.cameras import get_rays

    _, d = get_rays(cam, size, size)
    forward = -cam.c2w[0, :3, 3] / cam.c2w[0, :3, 3].norm()
    angle = torch.acos((d[0] @ forward).clamp(-1, 1)).reshape(size, size)
    expect = angle < np.arcsin(radius / 2.0)
    assert expect.sum() > 200
    assert (hit != expect).float().mean() < 0.01  # the rim pixels may round either way
    with pytest.raises(ValueError, match="one-prompt scene, got 2"):
        score_field(Renderer(sphere.with_prompts(2), Background(FieldConfig(background="solid"), num_prompts=2),
                             RenderConfig(backend="torch")), sphere, 1.0, 10.0, cam)  # fmt: skip


def test_score_run_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.json"):
        score_run(tmp_path / "nowhere")
    run = _fake_run(tmp_path / "burger", "a hamburger", analytic_mesh("a red cube", 24))
    with pytest.raises(ValueError, match="'a hamburger' is not one of .*'a red cube'"):
        score_run(run)
    empty = _fake_run(tmp_path / "empty", "a blue cone")
    with pytest.raises(ValueError, match="no mesh in .*mesh.glb, mesh.obj, mesh.ply"):
        score_run(empty)
    assert not (empty / "score.json").exists()


def test_nearest_neighbour_features_ignore_the_background_colour():
    obj = make_object("a red cone")
    cams = orbit_cameras(1, elevation_deg=20.0, radius=1.6, fovy_deg=50.0)
    images = []
    for color in ((1.0, 1.0, 1.0), (0.1, 0.3, 0.8)):
        bg = Background(FieldConfig(background="solid", background_color=color))
        renderer = Renderer(obj, bg, RenderConfig(backend="torch", num_samples=48)).eval()
        images.append(renderer.render_image(cams, 32, 32, shading="albedo")["rgb"].permute(0, 3, 1, 2))
    white, blue = images
    f_white, f_blue = _features(white), _features(blue)
    same = (f_white - f_blue).norm()  # only the anti-aliased silhouette differs
    assert same < 0.2 * (white - blue).norm()  # the raw images differ over the whole backdrop
    for other in ("a green cone", "a red sphere"):  # another colour, another shape
        assert same < 0.5 * (f_blue - _features(make_object_render(other, cams))).norm()


def make_object_render(caption, cams):
    bg = Background(FieldConfig(background="solid"))
    renderer = Renderer(make_object(caption), bg, RenderConfig(backend="torch", num_samples=48)).eval()
    return renderer.render_image(cams, 32, 32, shading="albedo")["rgb"].permute(0, 3, 1, 2)


def test_score_command_prints_the_scores_and_fails_in_one_line(tmp_path, capsys):
    from dreamfusion_trt import cli

    run = _fake_run(tmp_path / "run", "a green sphere", analytic_mesh("a green sphere", 40))
    assert cli.main(["score", str(run), "--resolution", "40"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["object"] == "a green sphere" and printed["iou"] > 0.9
    burger = _fake_run(tmp_path / "burger", "a hamburger", analytic_mesh("a red cube", 24))
    assert cli.main(["score", str(burger)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dreamfusion-trt: error: ") and "a hamburger" in err[0]


def test_radial_error_reads_a_uniform_offset_as_uniform_and_a_ball_for_a_cube_as_cut_corners():
    """Analytic fields: a cube's own density at the mesh level lies a fixed distance outside the
    true surface (200 sigmoid(-sdf / 0.01) = 10 at sdf = 0.01 ln 19), so every ray reads at least
    that much, faces and edges alike; a sphere scored as a cube misses the corners by far more
    than the faces; the torus has no radial profile."""
    from dreamfusion_trt.prior.score import radial_error

    pixel = 0.0259
    cube = make_object("a red cube", bound=0.6)
    offset = 0.01 * np.log(19.0) / pixel  # in pixels
    same = radial_error(cube, cube, 10.0, pixel, directions=400)
    assert same["sharp"]["rays"] > 0 and same["sharp"]["rays"] + same["smooth"]["rays"] == 400
    for part in ("sharp", "smooth"):  # oblique rays cross the offset shell over a longer path
        assert offset - 0.1 < same[part]["q25_px"] <= same[part]["median_px"] < offset + 0.8
    ball = radial_error(make_object("a red sphere", bound=0.6), cube, 10.0, pixel, directions=400)
    assert ball["sharp"]["median_px"] < ball["smooth"]["median_px"] - 2 and ball["sharp"]["median_px"] < -3
    assert radial_error(make_object("a red torus", bound=0.6), make_object("a red torus", bound=0.6), 10.0, pixel) is None
    with pytest.raises(ValueError, match="pixel > 0"):
        radial_error(cube, cube, 10.0, 0.0)
