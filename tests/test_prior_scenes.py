"""The known objects: SDF, density, colours, surface samples, and rendering through the Renderer."""

import pytest
import torch

from dreamfusion_trt.cameras import get_rays, orbit_cameras
from dreamfusion_trt.config import FieldConfig, RenderConfig
from dreamfusion_trt.field.background import Background
from dreamfusion_trt.field.nerf import FieldOutput
from dreamfusion_trt.prior.scenes import (
    FACES,
    KNOWN_CAPTIONS,
    KNOWN_OBJECTS,
    PALETTE,
    SIX_COLORED_CAPTION,
    SIX_FACE_COLORS,
    make_object,
    normalize_caption,
    resolve_caption,
)
from dreamfusion_trt.render.renderer import Renderer


def test_registry_has_every_shape_in_three_colours_and_the_six_colored_cube():
    assert len(KNOWN_CAPTIONS) == 16
    for shape in ("cube", "sphere", "cone", "torus", "cylinder"):
        for color in ("red", "green", "blue"):
            spec = KNOWN_OBJECTS[f"a {color} {shape}"]
            assert spec.shape == shape and spec.colors == (color,)
    assert KNOWN_OBJECTS[SIX_COLORED_CAPTION].colors == SIX_FACE_COLORS


@pytest.mark.parametrize("caption", KNOWN_CAPTIONS)
def test_occupancy_matches_density_and_the_object_fits_the_box(caption):
    obj = make_object(caption)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(1, 20000, 3, generator=gen) * 2 - 1) * 0.8
    sdf = obj.sdf(x)[0]
    sigma = obj.density(x)[0]
    away = sdf.abs() > 5 * obj.width  # the shell where the sigmoid is in between
    inside = obj.occupancy(x)[0]
    assert inside[away].any() and (~inside[away]).any()
    assert torch.equal(inside[away], sigma[away] > obj.density_scale / 2)
    assert (sigma[inside & away] > 0.99 * obj.density_scale).all()
    assert (sigma[~inside & away] < 0.01 * obj.density_scale).all()
    # density is zero outside the box, like NeRFField's
    assert obj.density(torch.tensor([[[1.2, 0.0, 0.0]]]))[0, 0] == 0
    # the surface keeps well inside the default bound
    pts = obj.sample_surface(2000, gen)
    assert pts.abs().max() < 0.6


def test_an_offset_moves_the_density_inside_and_leaves_the_solid_as_it_is():
    """``offset`` centres the soft edge that far inside the surface: half the scale at sdf =
    -offset, the same solid (sdf, occupancy), and a smaller rendered silhouette."""
    plain, moved = make_object("a blue cube"), make_object("a blue cube", offset=0.03)
    x = torch.tensor([[[0.4, 0.0, 0.0], [0.37, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]])
    assert torch.allclose(plain.density(x)[0, 0], torch.tensor(plain.density_scale / 2))
    assert torch.allclose(moved.density(x)[0, 1], torch.tensor(moved.density_scale / 2))
    assert moved.density(x)[0, 0] < 0.1 * moved.density_scale  # the surface is 3 widths outside the edge now
    assert torch.allclose(moved.density(x)[0, 2], plain.density(x)[0, 2])  # deep inside: the full scale
    assert torch.equal(moved.sdf(x), plain.sdf(x)) and torch.equal(moved.occupancy(x), plain.occupancy(x))
    assert moved.with_prompts(3).offset == 0.03

    cams = orbit_cameras(4, elevation_deg=20.0, radius=2.0, fovy_deg=45.0)
    areas = []
    for obj in (plain, moved):
        renderer = Renderer(obj.with_prompts(4), Background(FieldConfig(background="solid"), 4),
                            RenderConfig(backend="torch", num_samples=96), bound=0.6).eval()  # fmt: skip
        rays_o, rays_d = get_rays(cams, 32, 32)
        with torch.no_grad():
            areas.append(float((renderer.render(rays_o, rays_d, cams.light_dir, shading="albedo").opacity > 0.5).sum()))
    assert areas[1] < 0.95 * areas[0], areas
    with pytest.raises(ValueError, match="offset"):
        make_object("a blue cube", offset=-0.01)


@pytest.mark.parametrize("caption", ["a red cube", "a red cone", "a red torus", "a red cylinder", "a red sphere"])
def test_surface_samples_lie_on_the_surface_and_cover_it(caption):
    obj = make_object(caption)
    pts = obj.sample_surface(4000, torch.Generator().manual_seed(0))
    assert pts.shape == (4000, 3)
    assert obj.sdf(pts).abs().max() < 1e-4
    # the SDF is a true distance: |sdf| at random points equals the distance to the nearest sample
    dense = obj.sample_surface(60000, torch.Generator().manual_seed(1))
    q = (torch.rand(300, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 0.7
    nearest = torch.cdist(q, dense).min(dim=1).values
    assert (nearest - obj.sdf(q).abs()).abs().max() < 0.02


def test_cylinder_samples_are_area_uniform():
    obj = make_object("a green cylinder")
    pts = obj.sample_surface(40000, torch.Generator().manual_seed(0))
    r, h = 0.35, 0.45
    caps = (pts[:, 2].abs() > h - 1e-4).float().mean()
    expected = 2 * r * r / (2 * r * r + 2 * r * 2 * h)  # cap area / total area
    assert abs(float(caps) - expected) < 0.02


def test_six_colored_cube_has_one_colour_per_face_in_face_order():
    obj = make_object(SIX_COLORED_CAPTION)
    centres = torch.tensor([[0.4, 0, 0], [-0.4, 0, 0], [0, 0.4, 0], [0, -0.4, 0], [0, 0, 0.4], [0, 0, -0.4]])
    colors = obj.surface_color(centres)
    expected = torch.tensor([PALETTE[c] for c in SIX_FACE_COLORS])
    assert torch.allclose(colors, expected)
    assert len(FACES) == 6
    surface = obj.surface_color(obj.sample_surface(3000, torch.Generator().manual_seed(0)))
    assert len(torch.unique(surface, dim=0)) == 6
    # a single-colour object is one colour everywhere
    red = make_object("a red cone")
    assert len(torch.unique(red.surface_color(red.sample_surface(500)), dim=0)) == 1


def test_query_matches_the_nerf_field_interface_and_normals_are_analytic():
    obj = make_object("a blue sphere", num_prompts=2)
    x = torch.tensor([[[0.45, 0.0, 0.0], [0.0, 0.0, -0.45]], [[0.0, 0.45, 0.0], [0.3, 0.3, 0.0]]])
    out = obj.query(x, with_normals=True, prompts=slice(0, 2))
    assert isinstance(out, FieldOutput)
    assert out.sigma.shape == (2, 2) and out.albedo.shape == (2, 2, 3) and out.normal.shape == (2, 2, 3)
    assert torch.allclose(out.normal, x / x.norm(dim=-1, keepdim=True), atol=1e-5)
    sigma, albedo = obj(x)
    assert torch.equal(sigma, out.sigma) and torch.equal(albedo, out.albedo)
    assert torch.allclose(albedo, torch.tensor(PALETTE["blue"]).expand(2, 2, 3))
    cube = make_object("a red cube")
    n = cube.normals(torch.tensor([[[0.1, 0.05, 0.4], [-0.4, 0.1, 0.0]]]))
    assert torch.allclose(n, torch.tensor([[[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]]))
    with pytest.raises(ValueError, match=r"\[K, N, 3\]"):
        obj.density(torch.zeros(5, 3))


def test_renderer_renders_a_red_sphere_red_in_the_middle_and_background_at_the_corners():
    obj = make_object("a red sphere")
    background = Background(FieldConfig(background="solid", background_color=(1.0, 1.0, 1.0)))
    renderer = Renderer(obj, background, RenderConfig(backend="torch", num_samples=64)).eval()
    cams = orbit_cameras(1, elevation_deg=15.0, radius=1.5, fovy_deg=50.0)
    out = renderer.render_image(cams, 24, 24, shading="albedo")
    rgb = out["rgb"][0]  # [H, W, 3]
    assert torch.allclose(rgb[12, 12], torch.tensor(PALETTE["red"]), atol=0.02)
    assert out["opacity"][0, 12, 12, 0] > 0.99
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert torch.allclose(rgb[i, j], torch.ones(3), atol=1e-3)
    # lit from the camera, the centre is still red-dominated, and darker at the silhouette
    lit = renderer.render_image(cams, 24, 24, shading="lambertian")["rgb"][0]
    assert lit[12, 12, 0] > 2 * lit[12, 12, 1]
    assert lit[12, 12].sum() > lit[12, 4].sum()


def test_front_view_of_the_six_colored_cube_shows_its_plus_x_face():
    obj = make_object(SIX_COLORED_CAPTION)
    background = Background(FieldConfig(background="solid"))
    renderer = Renderer(obj, background, RenderConfig(backend="torch", num_samples=64)).eval()
    for azimuth_index, face in ((0, "+x"), (2, "-x")):  # 4-view orbit: 0 = front, 180 = back
        cams = orbit_cameras(4, elevation_deg=0.0, radius=1.5, fovy_deg=40.0)
        one = type(cams)(**{k: v[azimuth_index : azimuth_index + 1] for k, v in cams.__dict__.items()})
        rgb = renderer.render_image(one, 16, 16, shading="albedo")["rgb"][0, 8, 8]
        assert torch.allclose(rgb, torch.tensor(PALETTE[SIX_FACE_COLORS[FACES.index(face)]]), atol=0.02)


def test_captions_resolve_with_view_suffixes_and_unknown_prompts_list_the_known_ones():
    assert normalize_caption("  A Red Cube, front view. ") == "a red cube"
    assert resolve_caption("a six-colored cube, overhead view").caption == SIX_COLORED_CAPTION
    with pytest.raises(ValueError, match="'a hamburger' is not one of") as info:
        resolve_caption("a hamburger")
    assert "'a red cube'" in str(info.value) and f"'{SIX_COLORED_CAPTION}'" in str(info.value)
