"""output.mesh_level: the level a mesh is cut at, read off the scene's own renders."""

import json

import pytest
import torch

from dreamfusion_trt.cameras import CameraBatch, get_rays
from dreamfusion_trt.config import FieldConfig, RenderConfig, RunConfig, from_dict
from dreamfusion_trt.export.artifacts import LEVEL_SUFFIX, mesh_threshold_of, write_meshes
from dreamfusion_trt.export.mesh import sample_density_grid
from dreamfusion_trt.export.mesh_level import (
    LEVEL_GRID,
    choose_level,
    level_cameras,
    opacity_levels,
    plateau_level,
    ray_max_density,
    silhouette_ious,
)
from dreamfusion_trt.field.background import Background
from dreamfusion_trt.prior.scenes import make_object
from dreamfusion_trt.render.renderer import Renderer
from dreamfusion_trt.render.sampling import ray_aabb_intersect

BOUND = 0.6


def _scene(caption: str, width: float) -> tuple[Renderer, RunConfig]:
    """A known object's density as the scene (it renders like a field), and a config whose
    validation cameras see it whole."""
    obj = make_object(caption, bound=BOUND, width=width)
    renderer = Renderer(obj, Background(FieldConfig(background="solid"), 1), RenderConfig(backend="torch", num_samples=96), bound=BOUND)
    cfg = from_dict({"field": {"bound": BOUND}, "camera": {"render_size": 32, "val_radius": 2.0, "val_fovy": 45.0},
                     "output": {"mesh_resolution": 40, "mesh_formats": ["obj"]}}, RunConfig())  # fmt: skip
    return renderer.eval(), cfg


def _grid(renderer: Renderer) -> torch.Tensor:
    field = renderer.field
    return torch.from_numpy(sample_density_grid(lambda x: field.density(x[None])[0].float(), BOUND, LEVEL_GRID))


def test_the_grid_s_ray_maxima_match_marching_the_density_itself():
    """Slow twin: the density at dense points of each ray, not its trilinear grid."""
    renderer, _ = _scene("a blue torus", 0.01)
    cams = level_cameras(15.0, 2.0, 45.0)
    one = CameraBatch(**{n: t[7:8] for n, t in cams.__dict__.items()})  # a camera of the upper ring
    rays_o, rays_d = (t[0] for t in get_rays(one, 24, 24))
    fast = ray_max_density(_grid(renderer), BOUND, rays_o, rays_d, samples=128)
    near, far, hit = ray_aabb_intersect(rays_o, rays_d, BOUND)
    u = (torch.arange(512, dtype=torch.float32) + 0.5) / 512
    x = rays_o[:, None] + (near[:, None] + (far - near)[:, None] * u)[..., None] * rays_d[:, None]
    slow = torch.where(hit, renderer.field.density(x.reshape(1, -1, 3))[0].reshape(x.shape[:2]).amax(dim=-1), torch.zeros_like(near))
    for level in (2.0, 10.0, 50.0):
        a, b = fast > level, slow > level
        assert int(b.sum()) > 20  # the torus covers part of the view
        assert int((a ^ b).sum()) <= 0.05 * int((a | b).sum()), level  # only edge pixels differ


def test_plateau_level_takes_the_middle_of_the_near_best_levels():
    assert plateau_level([1, 2, 4, 8, 16], [0.5, 0.95, 0.96, 0.955, 0.7]) == 2
    assert plateau_level([1, 2, 4, 8], [0.9, 0.95, 0.95, 0.2]) == 1  # the lower middle of two
    assert plateau_level([1, 2, 4], [0.99, 0.5, 0.1], plateau=0.0) == 0


def test_silhouette_ious_count_pixels():
    opaque = torch.tensor([True, True, False, False])
    assert silhouette_ious(torch.tensor([5.0, 20.0, 0.0, 12.0]), opaque, [1.0, 10.0, 30.0]) == [2 / 3, 1 / 3, 0.0]


def test_a_softer_density_is_cut_lower_and_its_silhouettes_then_match_the_renders():
    """A known object's density at two edge widths: the renders of the soft one reach further
    out, so its level is lower; at the level picked, silhouettes agree better than at 10."""
    cfg = None
    levels = {}
    for width in (0.003, 0.03):
        renderer, cfg = _scene("a red sphere", width)
        levels[width] = opacity_levels(renderer, cfg, [_grid(renderer)])[0]
    sharp, soft = levels[0.003], levels[0.03]
    assert sharp.mode == soft.mode == "opacity"
    assert soft.threshold < sharp.threshold
    assert soft.threshold < cfg.output.mesh_threshold
    assert soft.silhouette_iou > soft.silhouette_iou_fixed + 0.05
    assert sharp.silhouette_iou > 0.97 and soft.silhouette_iou > 0.95


def test_choose_level_falls_back_to_the_fixed_level_when_nothing_renders():
    volume = torch.zeros(8, 8, 8)
    volume[3:5, 3:5, 3:5] = 100.0
    rays_o = torch.tensor([[0.0, 0.0, 2.0]])
    rays_d = torch.tensor([[0.0, 0.0, -1.0]])
    level = choose_level(volume, BOUND, torch.zeros(1), rays_o, rays_d, 10.0)
    assert (level.threshold, level.mode) == (10.0, "fixed")
    level = choose_level(torch.zeros(8, 8, 8), BOUND, torch.ones(1), rays_o, rays_d, 10.0)  # no density anywhere
    assert (level.threshold, level.mode) == (10.0, "fixed")


def test_write_meshes_records_its_level_and_the_scorer_reads_it(tmp_path):
    renderer, cfg = _scene("a green torus", 0.03)
    fixed_dir, opacity_dir = tmp_path / "fixed", tmp_path / "opacity"
    for d in (fixed_dir, opacity_dir):
        d.mkdir()
    write_meshes(renderer, cfg, [fixed_dir])
    write_meshes(renderer, from_dict({"output": {"mesh_level": "opacity"}}, cfg), [opacity_dir])
    fixed = json.loads((fixed_dir / f"mesh{LEVEL_SUFFIX}").read_text())
    chosen = json.loads((opacity_dir / f"mesh{LEVEL_SUFFIX}").read_text())
    assert fixed["mode"] == "fixed" and fixed["threshold"] == 10.0
    assert chosen["mode"] == "opacity" and chosen["threshold"] < 10.0 and chosen["fixed_threshold"] == 10.0
    assert mesh_threshold_of(opacity_dir, cfg) == chosen["threshold"]
    assert mesh_threshold_of(tmp_path, cfg) == cfg.output.mesh_threshold  # no level file: the config's
    assert (opacity_dir / "mesh.obj").stat().st_size > (fixed_dir / "mesh.obj").stat().st_size * 0.5
    (tmp_path / f"mesh{LEVEL_SUFFIX}").write_text("{not json")
    with pytest.raises(ValueError, match="not a mesh level file"):
        mesh_threshold_of(tmp_path, cfg)


def test_the_config_refuses_an_unknown_mesh_level():
    with pytest.raises(ValueError, match="output.mesh_level"):
        from_dict({"output": {"mesh_level": "auto"}}, RunConfig())
