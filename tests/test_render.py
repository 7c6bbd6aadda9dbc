"""Compositing against hand-computed values and nerfacc; the renderer's shapes, shading and gradients."""

import dataclasses
import math

import nerfacc
import pytest
import torch

from dreamfusion_trt.cameras import get_rays, orbit_cameras
from dreamfusion_trt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dreamfusion_trt.config import FieldConfig, RenderConfig, RunConfig
from dreamfusion_trt.field import Background, NeRFField
from dreamfusion_trt.render import Renderer, shade
from dreamfusion_trt.render import renderer as renderer_mod
from dreamfusion_trt.render import volrend
from dreamfusion_trt.render.sampling import ray_aabb_intersect, stratified_intervals

FIELD = FieldConfig(
    num_levels=4, level_dim=2, log2_hashmap_size=10, base_resolution=4, max_resolution=32, hidden_dim=16
)
SOLID = dataclasses.replace(FIELD, background="solid", background_color=(0.2, 0.4, 0.6))
RENDER = RenderConfig(backend="torch", num_samples=24, grid_resolution=8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _renderer(k=2, field_cfg=SOLID, render_cfg=RENDER, flat=False):
    """A fresh blob field; with `flat`, the network output is constant (density = pure blob)."""
    field = NeRFField(field_cfg, num_prompts=k)
    if flat:
        with torch.no_grad():
            field.mlp.layers[-1].weight.zero_()
    return Renderer(field, Background(field_cfg, k), render_cfg)


def _rays_to_centre(k, r, radius=3.0):
    """Rays from random points on a sphere towards points near the centre, [K, R, 3] each."""
    d = torch.randn(k, r, 3)
    origins = radius * d / d.norm(dim=-1, keepdim=True)
    target = 0.2 * (torch.rand(k, r, 3) - 0.5)
    dirs = target - origins
    return origins, dirs / dirs.norm(dim=-1, keepdim=True)


def _random_packed(n_rays, max_samples, device="cpu"):
    counts = torch.randint(0, max_samples + 1, (n_rays,))
    counts[0] = max_samples  # at least one full ray
    ray_indices = torch.repeat_interleave(torch.arange(n_rays), counts)
    gaps = torch.rand(len(ray_indices)) * 0.1
    lengths = torch.rand(len(ray_indices)) * 0.1 + 0.01
    t_starts = torch.zeros_like(gaps)
    pos = 0
    for c in counts.tolist():  # monotone intervals per ray
        seg = slice(pos, pos + c)
        t_starts[seg] = torch.cumsum(gaps[seg] + lengths[seg], 0) - lengths[seg]
        pos += c
    t_ends = t_starts + lengths
    sigmas = torch.rand(len(ray_indices)) * 5
    return [t.to(device) for t in (t_starts, t_ends, sigmas, ray_indices)]


# ---------------------------------------------------------------------------------------------
# volrend: hand-computed values


@pytest.mark.parametrize("packed", [False, True])
def test_constant_slab_has_analytic_transmittance(packed):
    sigma, a, b = 1.7, 1.0, 2.25
    edges = torch.linspace(0.0, 3.0, 121)  # bin width 0.025 puts a and b on bin edges
    t_starts, t_ends = edges[:-1], edges[1:]
    mid = (t_starts + t_ends) / 2
    sigmas = torch.where((mid > a) & (mid < b), sigma, 0.0)
    if packed:
        ray_indices = torch.zeros(120, dtype=torch.long)
        weights, trans, _ = volrend.weights_from_density_packed(t_starts, t_ends, sigmas, ray_indices, 1)
        opacity = volrend.accumulate_packed(weights, None, ray_indices, 1)[0, 0]
    else:
        weights, trans, _ = volrend.weights_from_density(t_starts, t_ends, sigmas)
        opacity = volrend.accumulate(weights)[0]
    expected = 1.0 - math.exp(-sigma * (b - a))
    assert abs(float(opacity) - expected) < 1e-5
    assert abs(float(trans[-1]) - math.exp(-sigma * (b - a))) < 1e-5  # behind the slab
    assert float(trans[int(a / 0.025)]) == pytest.approx(1.0)  # in front of it


def test_weights_sum_to_opacity():
    t_starts, t_ends, sigmas, _ = _random_packed(1, 50)
    t_starts, t_ends, sigmas = (x.view(1, 50).expand(4, 50) * torch.rand(4, 1) for x in (t_starts, t_ends, sigmas))
    weights, trans, alphas = volrend.weights_from_density(t_starts, t_ends, sigmas)
    opacity = volrend.accumulate(weights)[..., 0]
    torch.testing.assert_close(opacity, 1.0 - torch.exp(-(sigmas * (t_ends - t_starts)).sum(-1)))
    torch.testing.assert_close(weights, trans * alphas)


def test_packed_and_fixed_count_agree():
    r, s = 6, 10
    t = torch.sort(torch.rand(r, s + 1) * 4, dim=-1).values
    t_starts, t_ends = t[:, :-1], t[:, 1:]
    sigmas = torch.rand(r, s) * 3
    keep = torch.rand(r, s) > 0.3
    keep[2] = False  # a ray with no samples
    values = torch.rand(r, s, 3)
    # Dropping a sample from the packed list equals giving it zero density in the fixed layout.
    w_fixed, _, _ = volrend.weights_from_density(t_starts, t_ends, torch.where(keep, sigmas, 0.0))
    ps, pe, psig, ri = volrend.pack_fixed(t_starts, t_ends, sigmas, keep)
    w_packed, _, _ = volrend.weights_from_density_packed(ps, pe, psig, ri, r)
    torch.testing.assert_close(w_packed, w_fixed[keep])
    torch.testing.assert_close(
        volrend.accumulate_packed(w_packed, values[keep], ri, r), volrend.accumulate(w_fixed, values)
    )
    torch.testing.assert_close(volrend.accumulate_packed(w_packed, None, ri, r), volrend.accumulate(w_fixed))


def test_compositing_matches_nerfacc_batched_on_cpu():
    r, s = 16, 32
    t = torch.sort(torch.rand(r, s + 1) * 3, dim=-1).values
    t_starts, t_ends = t[:, :-1], t[:, 1:]
    sigmas = (torch.rand(r, s) * 4).requires_grad_(True)
    rgbs = torch.rand(r, s, 3).requires_grad_(True)
    bg = torch.tensor([0.3, 0.5, 0.7])

    w_ref, trans_ref, alpha_ref = nerfacc.render_weight_from_density(t_starts, t_ends, sigmas)
    w, trans, alpha = volrend.weights_from_density(t_starts, t_ends, sigmas)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(trans, trans_ref)
    torch.testing.assert_close(alpha, alpha_ref)

    colors_ref, opacity_ref, depth_ref, _ = nerfacc.rendering(
        t_starts, t_ends, rgb_sigma_fn=lambda *_: (rgbs, sigmas), render_bkgd=bg
    )
    opacity = volrend.accumulate(w)
    colors = volrend.composite_background(volrend.accumulate(w, rgbs), opacity, bg)
    depth = volrend.accumulate(w, ((t_starts + t_ends) / 2)[..., None]) / opacity
    torch.testing.assert_close(colors, colors_ref)
    torch.testing.assert_close(opacity, opacity_ref)
    torch.testing.assert_close(depth, depth_ref)

    probe = torch.rand(r, 3)
    grads_ref = torch.autograd.grad((colors_ref * probe).sum(), (sigmas, rgbs))
    grads = torch.autograd.grad((colors * probe).sum(), (sigmas, rgbs))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.gpu
def test_packed_compositing_matches_nerfacc_cuda():
    t_starts, t_ends, sigmas, ray_indices = _random_packed(64, 40, device="cuda")
    sigmas.requires_grad_(True)
    values = torch.rand(len(sigmas), 3, device="cuda")
    w_ref, trans_ref, alpha_ref = nerfacc.render_weight_from_density(
        t_starts, t_ends, sigmas, ray_indices=ray_indices, n_rays=64
    )
    w, trans, alpha = volrend.weights_from_density_packed(t_starts, t_ends, sigmas, ray_indices, 64)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trans, trans_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alpha, alpha_ref)
    acc_ref = nerfacc.accumulate_along_rays(w_ref, values, ray_indices=ray_indices, n_rays=64)
    acc = volrend.accumulate_packed(w, values, ray_indices, 64)
    torch.testing.assert_close(acc, acc_ref, atol=1e-5, rtol=1e-4)
    (g_ref,) = torch.autograd.grad(acc_ref.sum(), sigmas)
    (g,) = torch.autograd.grad(acc.sum(), sigmas)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# sampling and shading


def test_ray_box_intersection():
    o = torch.tensor([[-3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.2, 0.1, 0.0], [3.0, 0.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    near, far, hit = ray_aabb_intersect(o, d, bound=1.0)
    assert hit.tolist() == [True, False, True, False]  # the last one points away from the box
    torch.testing.assert_close(near, torch.tensor([2.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(far, torch.tensor([4.0, 0.0, 1.0, 0.0]))  # a camera inside starts at 0


def test_stratified_samples_stay_in_their_bins():
    near, far = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])
    t0, t1, t = stratified_intervals(near, far, 8, jitter=True, generator=torch.Generator().manual_seed(0))
    assert bool(((t >= t0) & (t <= t1)).all())
    torch.testing.assert_close(t1[0] - t0[0], torch.full((8,), 0.25))
    assert float((t1[1] - t0[1]).abs().max()) == 0  # an empty interval has empty bins
    _, _, t_mid = stratified_intervals(near, far, 8, jitter=False)
    torch.testing.assert_close(t_mid, (t0 + t1) / 2)


def test_shading_functions():
    albedo = torch.rand(5, 3)
    n = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    torch.testing.assert_close(shade("lambertian", albedo, n, n, 0.1), albedo)  # light along the normal
    torch.testing.assert_close(shade("lambertian", albedo, n, -n, 0.1), 0.1 * albedo)  # lit from behind
    grey = shade("textureless", albedo, n, torch.tensor([0.0, 0.0, 1.0]), 0.2)
    assert bool((grey == grey[:, :1]).all())
    torch.testing.assert_close(shade("normal", albedo, n, None, 0.0), (n + 1) / 2)
    with pytest.raises(ValueError, match="'phong'"):
        shade("phong", albedo, n, n, 0.1)
    with pytest.raises(ValueError, match="needs normals"):
        shade("lambertian", albedo, None, n, 0.1)


# ---------------------------------------------------------------------------------------------
# renderer


def test_render_shapes():
    renderer = _renderer(k=2)
    o, d = _rays_to_centre(2, 10)
    out = renderer.render(o, d, torch.tensor([[0.0, 0.0, 1.0]] * 2), shading="albedo")
    assert out.rgb.shape == (2, 10, 3) and out.opacity.shape == (2, 10) and out.depth.shape == (2, 10)
    assert out.background.shape == (2, 10, 3)
    assert out.normal is None and out.orientation is None
    out = renderer.render(o, d, torch.tensor([[0.0, 0.0, 1.0]] * 2), shading="albedo", need_normals=True)
    assert out.normal.shape == (2, 10, 3) and out.orientation.shape == (2,)
    assert out.num_samples == 2 * 10 * RENDER.num_samples
    # The blob is opaque at the centre; depth lies between the camera and the far side of the box.
    assert float(out.opacity.detach().min()) > 0.99
    assert bool(((out.depth > 3.0 - 0.5) & (out.depth < 3.0)).all())


def test_render_rejects_mismatched_shapes():
    renderer = _renderer(k=2)
    o, d = _rays_to_centre(3, 4)
    with pytest.raises(ValueError, match=r"\[2, R, 3\]"):
        renderer.render(o, d, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="'phong'"):
        renderer.render(o[:2], d[:2], torch.zeros(2, 3), shading="phong")


@pytest.mark.parametrize("bg_kind", ["solid", "mlp"])
def test_background_shows_where_rays_miss(bg_kind):
    renderer = _renderer(k=2, field_cfg=dataclasses.replace(SOLID, background=bg_kind))
    o = torch.tensor([[0.0, 0.0, 5.0], [0.0, 3.0, 3.0], [3.0, 0.0, 0.0]]).expand(2, 3, 3).contiguous()
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]).expand(2, 3, 3).contiguous()
    out = renderer.render(o, d, torch.tensor([[0.0, 0.0, 1.0]] * 2))
    assert float(out.opacity[:, :2].detach().abs().max()) == 0  # the first two rays miss the box
    torch.testing.assert_close(out.rgb[:, :2], out.background[:, :2])
    if bg_kind == "solid":
        torch.testing.assert_close(out.rgb[:, :2], torch.tensor([0.2, 0.4, 0.6]).expand(2, 2, 3))
    assert float(out.opacity[:, 2].detach().min()) > 0.99  # the third goes through the blob


def test_lambertian_with_light_along_normal_equals_albedo():
    renderer = _renderer(k=2, flat=True).eval()
    # Rays along the x axis towards the centre: every sample's normal is +x (prompt 0) / -x (prompt 1).
    o = torch.tensor([[[3.0, 0.0, 0.0]] * 4, [[-3.0, 0.0, 0.0]] * 4])
    d = -o / 3.0
    towards = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    albedo = renderer.render(o, d, towards, shading="albedo").rgb
    lit = renderer.render(o, d, towards, shading="lambertian", ambient_ratio=0.1)
    torch.testing.assert_close(lit.rgb, albedo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lit.normal, -d * lit.opacity[..., None], atol=1e-4, rtol=1e-4)
    behind = renderer.render(o, d, -towards, shading="lambertian", ambient_ratio=0.1).rgb
    bg = torch.tensor([0.2, 0.4, 0.6])
    opacity = lit.opacity[..., None]
    torch.testing.assert_close(behind - (1 - opacity) * bg, 0.1 * (albedo - (1 - opacity) * bg), atol=1e-5, rtol=1e-4)


def test_textureless_is_greyscale():
    cfg = dataclasses.replace(SOLID, background_color=(0.5, 0.5, 0.5))
    renderer = _renderer(k=2, field_cfg=cfg).eval()
    cams = orbit_cameras(2, elevation_deg=20.0, radius=2.5, fovy_deg=50.0)
    img = renderer.render_image(cams, 12, 12, shading="textureless", ambient_ratio=0.2)["rgb"]
    torch.testing.assert_close(img[..., 0], img[..., 1])
    torch.testing.assert_close(img[..., 1], img[..., 2])
    albedo = renderer.render_image(cams, 12, 12, shading="albedo")["rgb"]
    assert float((albedo[..., 0] - albedo[..., 1]).abs().max()) > 1e-3  # the albedo itself is coloured


def test_orientation_penalty_is_small_for_outward_normals_and_large_for_inward():
    o, d = _rays_to_centre(2, 16)
    light = torch.tensor([[0.0, 0.0, 1.0]] * 2)
    out = _renderer(k=2).eval().render(o, d, light, need_normals=True)
    inverted = _renderer(k=2, field_cfg=dataclasses.replace(SOLID, blob_density=-10.0)).eval()
    out_inv = inverted.render(o, d, light, need_normals=True)
    assert bool((out.orientation >= 0).all())
    assert float(out.orientation.detach().max()) < 0.01
    assert float(out_inv.orientation.detach().min()) > 0.1


def test_backward_through_render_reaches_field_and_background():
    renderer = _renderer(k=2, field_cfg=FIELD).train()
    o, d = _rays_to_centre(2, 12)
    d[:, :3] = -d[:, :3]  # some rays leave the box, so the background contributes
    out = renderer.render(o, d, torch.tensor([[0.0, 0.6, 0.8]] * 2), shading="lambertian", need_normals=True)
    (out.rgb.square().sum() + out.orientation.sum() + out.opacity.sum()).backward()
    for name, p in renderer.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("packed", [False, True])
def test_geometry_grad_zero_keeps_the_colour_s_gradient_off_the_density(monkeypatch, packed):
    """`geometry_grad` [K]: the render's values are unchanged; with 0 for prompt 0 the colour's
    gradient reaches that prompt's albedo as before but neither its density nor its shading
    normals; prompt 1 (1.0) gets exactly the plain render's gradients; the opacity keeps its
    gradient to the density. Torch sampler and the packed (nerfacc-style) path alike."""
    cfg = dataclasses.replace(RENDER, backend="auto", num_samples=16, batched_marching=False)
    renderer = _renderer(k=2, field_cfg=FIELD, render_cfg=cfg).eval()  # fixed samples: every render sees the same points
    with torch.no_grad():
        renderer.field.encoding.tables.normal_(0, 0.3)
    if packed:
        _packed_on_cpu(monkeypatch, renderer)
    field = renderer.field
    real_query, seen = field.query, []

    def query(x, with_normals, prompts=None):
        fo = real_query(x, with_normals=with_normals, prompts=prompts)
        for v in (fo.sigma, fo.albedo, fo.normal):
            v.retain_grad()
        seen.append(fo)
        return fo

    monkeypatch.setattr(field, "query", query)
    o, d = _rays_to_centre(2, 16)
    light = torch.nn.functional.normalize(torch.randn(2, 3), dim=-1)
    w = torch.rand(2, 16, 3)

    def grads(geometry_grad, on="rgb"):
        seen.clear()
        out = renderer.render(o, d, light, shading="lambertian", geometry_grad=geometry_grad)
        loss = (out.rgb * w).sum() if on == "rgb" else out.opacity.sum()
        loss.backward()
        fo = seen[-1]
        return out, [torch.zeros_like(v) if v.grad is None else v.grad.detach().clone() for v in (fo.sigma, fo.albedo, fo.normal)]

    plain, (ps, pa, pn) = grads(None)
    split, (ss, sa, sn) = grads(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(split.rgb, plain.rgb, rtol=0, atol=0)
    torch.testing.assert_close(split.opacity, plain.opacity, rtol=0, atol=0)
    assert ps[0].abs().sum() > 0 and pn[0].abs().sum() > 0  # the plain colour's gradient reaches both
    assert ss[0].abs().sum() == 0 and sn[0].abs().sum() == 0
    torch.testing.assert_close(ss[1], ps[1])
    torch.testing.assert_close(sn[1], pn[1])
    torch.testing.assert_close(sa, pa)
    _, (os_, _, _) = grads(torch.tensor([0.0, 1.0]), on="opacity")
    assert os_.abs().sum() > 0
    with pytest.raises(ValueError, match="geometry_grad"):
        renderer.render(o, d, light, geometry_grad=torch.ones(3))


def test_eval_mode_is_deterministic_and_training_jitter_follows_the_generator():
    renderer = _renderer(k=2, field_cfg=FIELD)
    o, d = _rays_to_centre(2, 8)
    light = torch.tensor([[0.0, 0.0, 1.0]] * 2)
    renderer.eval()
    a = renderer.render(o, d, light, shading="lambertian")
    b = renderer.render(o, d, light, shading="lambertian")
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.depth, b.depth)
    renderer.train()
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    c = renderer.render(o, d, light, generator=g(1)).depth
    assert torch.equal(c, renderer.render(o, d, light, generator=g(1)).depth)
    assert not torch.equal(c, renderer.render(o, d, light, generator=g(2)).depth)


def test_render_image_is_chunk_independent_and_matches_render():
    renderer = _renderer(k=2, field_cfg=FIELD).eval()
    cams = orbit_cameras(2, elevation_deg=10.0, radius=2.5, fovy_deg=45.0)
    full = renderer.render_image(cams, 8, 10, shading="normal", chunk=1000)
    chunked = renderer.render_image(cams, 8, 10, shading="normal", chunk=7)
    assert full["rgb"].shape == (2, 8, 10, 3) and full["opacity"].shape == (2, 8, 10, 1)
    assert full["depth"].shape == (2, 8, 10, 1) and full["normal"].shape == (2, 8, 10, 3)
    # Chunks are different batch sizes through the field's float32 MLP, whose CPU GEMMs sum in a
    # batch- and thread-dependent order (~1e-6 apart); values are O(1) colours, opacities and
    # depths, and a chunk stitched in the wrong place moves them by order 0.1.
    for key in full:
        torch.testing.assert_close(chunked[key], full[key], atol=1e-5, rtol=1e-4)
    o, d = get_rays(cams, 8, 10)
    out = renderer.render(o, d, cams.light_dir, shading="normal")
    torch.testing.assert_close(full["rgb"].reshape(2, 80, 3), out.rgb, atol=1e-5, rtol=1e-4)
    assert not full["rgb"].requires_grad  # evaluation images carry no graph


def test_one_pass_gives_every_shading_as_separate_renders_do(monkeypatch):
    """issue 11 item 3: one field query per chunk serves all shadings of the outputs."""
    renderer = _renderer(k=2, field_cfg=FIELD).eval()
    with torch.no_grad():
        renderer.field.encoding.tables.normal_(0, 0.5)
    cams = orbit_cameras(2, elevation_deg=20.0, radius=2.5, fovy_deg=45.0)
    modes = ["albedo", "lambertian", "textureless", "normal"]
    singles = {m: renderer.render_image(cams, 6, 7, shading=m, need_normals=True, chunk=16) for m in modes}
    calls = []
    query = renderer.field.query
    monkeypatch.setattr(renderer.field, "query", lambda *a, **kw: calls.append(1) or query(*a, **kw))
    many = renderer.render_image_shadings(cams, 6, 7, modes, chunk=16)
    assert len(calls) == math.ceil(42 / 16)  # one query per chunk, not one per chunk and mode
    assert list(many) == modes
    for m in modes:  # the same computation at float32 precision
        assert many[m].keys() == singles[m].keys() == {"rgb", "opacity", "depth", "normal"}
        for key in singles[m]:
            torch.testing.assert_close(many[m][key], singles[m][key])
    assert not torch.allclose(many["albedo"]["rgb"], many["normal"]["rgb"])
    with pytest.raises(ValueError, match="shading must be one of"):
        renderer.render_image_shadings(cams, 4, 4, ["albedo", "glossy"])


def test_state_dict_round_trip_renders_the_same_image():
    cfg = dataclasses.replace(RENDER, backend="auto")
    a = _renderer(k=2, field_cfg=FIELD, render_cfg=cfg).eval()
    with torch.no_grad():
        a.field.encoding.tables.normal_(0, 0.5)
    state = a.state_dict()
    assert any(key.startswith("estimators.1.") for key in state)  # occupancy grids are saved too
    b = _renderer(k=2, field_cfg=FIELD, render_cfg=cfg).eval()
    b.load_state_dict(state)
    cams = orbit_cameras(2, elevation_deg=30.0, radius=2.0, fovy_deg=50.0)
    torch.testing.assert_close(b.render_image(cams, 6, 6)["rgb"], a.render_image(cams, 6, 6)["rgb"])


def _without_nerfacc(monkeypatch):
    """Build renderers as on a machine where nerfacc does not import."""
    monkeypatch.setattr(renderer_mod, "_nerfacc", lambda: None)


@pytest.mark.parametrize("saved_with", ["nerfacc", "no-nerfacc"])
def test_scene_saved_with_or_without_nerfacc_opens_with_either(monkeypatch, tmp_path, saved_with):
    """Item 0 of issue 14: a checkpoint must not depend on whether nerfacc was importable. Both
    renderer variants (nerfacc's OccGridEstimator, the stand-in) are built here on the CPU; the
    scene goes through a real checkpoint file and opens strictly in the other variant."""
    cfg = dataclasses.replace(RENDER, backend="auto")
    with_nerfacc = _renderer(k=2, field_cfg=FIELD, render_cfg=cfg).eval()
    with monkeypatch.context() as m:
        _without_nerfacc(m)
        without = _renderer(k=2, field_cfg=FIELD, render_cfg=cfg).eval()
    assert isinstance(with_nerfacc.estimators[0], nerfacc.OccGridEstimator)
    assert isinstance(without.estimators[0], renderer_mod.OccupancyGrid)
    a, b = with_nerfacc.state_dict(), without.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    assert {k for k in a if k.startswith("estimators.")} == {f"estimators.{i}.{n}" for i in (0, 1) for n in ("occs", "binaries")}

    src, dst = (with_nerfacc, without) if saved_with == "nerfacc" else (without, with_nerfacc)
    with torch.no_grad():
        src.field.encoding.tables.normal_(0, 0.5)
        for est in src.estimators:  # a trained grid: some cells empty, running values set
            est.occs.uniform_(0, 1)
            est.binaries.copy_((est.occs > 0.3).view(est.binaries.shape))
    save_checkpoint(Checkpoint(step=1, config=RunConfig(), model=src.state_dict(), state={"num_prompts": 2}), tmp_path)
    back = load_checkpoint(tmp_path)
    dst.load_state_dict(back.model)  # strict
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    cams = orbit_cameras(2, elevation_deg=30.0, radius=2.0, fovy_deg=50.0)
    # Every tensor is equal (above); the image is the same computation at float32 precision.
    torch.testing.assert_close(dst.render_image(cams, 6, 6)["rgb"], src.render_image(cams, 6, 6)["rgb"])


def test_scenes_saved_by_older_versions_still_load(monkeypatch):
    """Before issue 14 a nerfacc scene also saved each grid's `resolution` and `aabbs`, and a scene
    without nerfacc saved no grid at all."""
    cfg = dataclasses.replace(RENDER, backend="auto")
    renderer = _renderer(k=1, field_cfg=FIELD, render_cfg=cfg)
    state = renderer.state_dict()
    old_nerfacc = dict(state, **{"estimators.0.resolution": torch.tensor([8, 8, 8], dtype=torch.int32),
                                 "estimators.0.aabbs": torch.tensor([[-1.0, -1, -1, 1, 1, 1]])})  # fmt: skip
    old_torch = {k: v for k, v in state.items() if not k.startswith("estimators.")}
    with monkeypatch.context() as m:
        _without_nerfacc(m)
        stand_in = _renderer(k=1, field_cfg=FIELD, render_cfg=cfg)
    for target in (_renderer(k=1, field_cfg=FIELD, render_cfg=cfg), stand_in):
        target.load_state_dict(old_nerfacc)
        target.load_state_dict(old_torch)
        assert bool(target.estimators[0].binaries.all()) and float(target.estimators[0].occs.abs().sum()) == 0.0
    with pytest.raises(RuntimeError, match="estimators.0.occs"):  # one grid tensor missing is still an error
        renderer.load_state_dict({k: v for k, v in state.items() if k != "estimators.0.occs"})


class _RecordingGrid(torch.nn.Module):
    """Stands in for a nerfacc estimator: records the steps its refresh is called with."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def update_every_n_steps(self, step, occ_eval_fn, occ_thre, n):
        self.steps.append(step)


def test_grid_warmup_delays_each_prompt_s_first_occupancy_refresh(monkeypatch):
    """render.grid_warmup: no refresh during a prompt's first N steps (its grid stays as it is,
    fully occupied on a fresh scene), then nerfacc's schedule from its step 0 (its all-cell
    warm-up included); per prompt, None skipping one. Our calling code only: a recording
    stand-in for nerfacc's estimator."""
    renderer = _renderer(k=2, render_cfg=dataclasses.replace(RENDER, backend="auto", grid_warmup=100)).train()
    grids = torch.nn.ModuleList([_RecordingGrid(), _RecordingGrid()])
    monkeypatch.setattr(renderer, "estimators", grids)
    monkeypatch.setattr(renderer, "_marcher", True)
    monkeypatch.setattr(renderer, "backend_for", lambda device: "nerfacc")
    for step in (0, 99, 100, 116):
        renderer.update_occupancy(step)
    renderer.update_occupancy([150, None])
    renderer.update_occupancy([99, 300])
    assert grids[0].steps == [0, 16, 50] and grids[1].steps == [0, 16, 200]
    assert [renderer.grid_refresh_step(s) for s in (None, 0, 99, 100, 357)] == [None, None, None, 0, 257]
    plain = _renderer(k=1, render_cfg=dataclasses.replace(RENDER, backend="auto"))
    assert [plain.grid_refresh_step(s) for s in (0, 16)] == [0, 16]  # 0: as before
    with pytest.raises(ValueError, match="render.grid_warmup must be >= 0 steps, got -1"):
        _renderer(k=1, render_cfg=dataclasses.replace(RENDER, grid_warmup=-1))


def test_backend_choice_on_cpu():
    auto = _renderer(k=1, render_cfg=dataclasses.replace(RENDER, backend="auto"))
    assert auto.backend_for(torch.device("cpu")) == "torch"
    before = auto.estimators[0].binaries.clone()
    auto.train().update_occupancy(0)  # a no-op while the torch sampler is in use
    assert torch.equal(auto.estimators[0].binaries, before)
    forced = _renderer(k=1, render_cfg=dataclasses.replace(RENDER, backend="nerfacc"))
    o, d = _rays_to_centre(1, 2)
    with pytest.raises(ValueError, match="'cpu'"):
        forced.render(o, d, torch.zeros(1, 3))


def _packed_on_cpu(monkeypatch, renderer):
    """The nerfacc code path on the CPU: nerfacc's CUDA-only pieces replaced by their PyTorch
    twins and the marcher by the torch sampler's bins (every sample of a ray that hits the box)."""
    n = renderer.cfg.num_samples

    def fake_sampling(rays_o, rays_d, sigma_fn=None, render_step_size=None, stratified=False, **_):
        near, far, hit = ray_aabb_intersect(rays_o, rays_d, renderer.bound)
        t0, t1, _ = stratified_intervals(near, far, n, jitter=False)
        keep = hit[:, None].expand_as(t0)
        ts, te, _, ri = volrend.pack_fixed(t0, t1, t0, keep)
        assert sigma_fn(ts, te, ri).shape == ts.shape
        return ri.int(), ts, te

    for est in renderer.estimators:
        monkeypatch.setattr(est, "sampling", fake_sampling)
    monkeypatch.setattr(renderer, "backend_for", lambda device: "nerfacc")
    monkeypatch.setattr(
        nerfacc,
        "render_weight_from_density",
        lambda t0, t1, s, ray_indices, n_rays: volrend.weights_from_density_packed(t0, t1, s, ray_indices, n_rays),
    )
    monkeypatch.setattr(
        nerfacc,
        "accumulate_along_rays",
        lambda w, v, ray_indices, n_rays: volrend.accumulate_packed(w, v, ray_indices, n_rays),
    )


def test_packed_path_with_pytorch_kernels_matches_torch_renderer(monkeypatch):
    """The nerfacc code path (marching per prompt, padding, packed compositing) on the CPU, with
    nerfacc's CUDA-only pieces replaced by their PyTorch twins and the marcher replaced by the torch
    sampler's bins: it must reproduce the torch renderer exactly."""
    cfg = dataclasses.replace(RENDER, backend="auto", num_samples=16, batched_marching=False)  # the per-prompt march
    renderer = _renderer(k=3, field_cfg=FIELD, render_cfg=cfg).eval()
    with torch.no_grad():
        renderer.field.encoding.tables.normal_(0, 0.3)
    o, d = _rays_to_centre(3, 9)
    o[1, :4] = torch.tensor([0.0, 0.0, 5.0])  # rays that miss: prompts get different sample counts
    d[1, :4] = torch.tensor([1.0, 0.0, 0.0])
    light = torch.nn.functional.normalize(torch.randn(3, 3), dim=-1)
    expected = renderer.render(o, d, light, shading="lambertian", need_normals=True)

    _packed_on_cpu(monkeypatch, renderer)
    got = renderer.render(o, d, light, shading="lambertian", need_normals=True)
    assert got.num_samples < expected.num_samples
    for name in ("rgb", "opacity", "depth", "normal", "orientation"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-4)
    # Several shadings from one packed pass equal the packed renders one mode at a time.
    many = renderer.render_shadings(o, d, light, ["normal", "lambertian", "albedo"])
    torch.testing.assert_close(many["lambertian"].rgb, got.rgb)
    for mode in ("normal", "albedo"):
        torch.testing.assert_close(many[mode].rgb, renderer.render(o, d, light, shading=mode, need_normals=True).rgb)


@pytest.mark.gpu
def test_nerfacc_and_torch_renderers_draw_the_same_blob():
    device = torch.device("cuda")
    field = NeRFField(SOLID, num_prompts=2).to(device)
    background = Background(SOLID, 2).to(device)
    torch_r = Renderer(field, background, dataclasses.replace(RENDER, backend="torch", num_samples=512)).eval()
    # A conservative pruning threshold: cells are dropped only where one march step's alpha is
    # below 1e-4. (With the default 0.01 the blob's faint tail, sigma < 1.5, is skipped on
    # purpose, which visibly thins its silhouette: a speed/fidelity trade, not a bug.)
    acc_r = Renderer(
        field, background,
        dataclasses.replace(RENDER, backend="nerfacc", num_samples=512, grid_resolution=64, occupancy_threshold=1e-4),
    ).to(device)  # fmt: skip
    assert acc_r.backend_for(device) == "nerfacc"
    cams = orbit_cameras(2, elevation_deg=20.0, radius=2.5, fovy_deg=50.0)
    ref = torch_r.render_image(cams, 32, 32, shading="lambertian", ambient_ratio=0.2)
    for update, tol in ((False, 1e-3), (True, 5e-3)):
        if update:  # prune empty cells; the image must not change beyond the pruned alpha
            acc_r.train().update_occupancy(0)
            assert max(acc_r.occupied_fraction()) < 0.5
        got = acc_r.eval().render_image(cams, 32, 32, shading="lambertian", ambient_ratio=0.2)
        assert float((got["opacity"] - ref["opacity"]).abs().mean()) < tol
        assert float((got["rgb"] - ref["rgb"]).abs().mean()) < tol
    # Training through the nerfacc path reaches the field parameters.
    acc_r.train()
    o, d = _rays_to_centre(2, 64)
    out = acc_r.render(o.to(device), d.to(device), cams.light_dir.to(device), shading="lambertian", need_normals=True)
    (out.rgb.sum() + out.orientation.sum()).backward()
    assert float(field.encoding.tables.grad.abs().sum()) > 0



def _reference_traverse(rays_o, rays_d, binaries, aabbs, near_planes, far_planes, step_size, cone_angle=0.0):
    """A PyTorch reading of nerfacc's `traverse_grids` for one grid and a constant step: each ray
    marches the lattice ``near_plane + i * step`` inside the grid's box and between its near and
    far planes, keeping the samples whose midpoint lies in an occupied cell (`intervals` and
    `samples` as nerfacc returns them, for the fields the renderer reads)."""
    assert cone_angle == 0.0 and binaries.shape[0] == 1
    lo, hi = aabbs[0, :3], aabbs[0, 3:]
    res = torch.tensor(binaries.shape[1:])
    inv = 1.0 / torch.where(rays_d.abs() < 1e-9, torch.full_like(rays_d, 1e-9), rays_d)
    t0, t1 = (lo - rays_o) * inv, (hi - rays_o) * inv
    tmin = torch.maximum(torch.minimum(t0, t1).amax(-1), near_planes)
    tmax = torch.minimum(torch.maximum(t0, t1).amin(-1), far_planes)
    first = torch.ceil((tmin - near_planes) / step_size - 0.5).clamp_min(0)
    steps = int(((tmax - near_planes) / step_size).max().ceil().clamp_min(0)) + 2
    i = first[:, None] + torch.arange(steps)[None]
    start = near_planes[:, None] + i * step_size
    mid = start + 0.5 * step_size
    x = rays_o[:, None] + rays_d[:, None] * mid[..., None]
    cell = ((x - lo) / (hi - lo) * res).floor().long()
    inside = ((cell >= 0) & (cell < res)).all(-1)
    cell = torch.minimum(cell.clamp_min(0), res - 1)
    keep = (mid < tmax[:, None]) & (tmin[:, None] < tmax[:, None]) & inside & binaries[0][cell[..., 0], cell[..., 1], cell[..., 2]]
    counts = keep.sum(1)
    starts, ends = start[keep], (start + step_size)[keep]
    vals = torch.stack([starts, ends], 1).reshape(-1)
    left = torch.tensor([True, False]).repeat(len(starts))
    packed = torch.stack([torch.cumsum(counts, 0) - counts, counts], 1)
    intervals = type("Intervals", (), {"vals": vals, "is_left": left, "is_right": ~left})
    samples = type("Samples", (), {"ray_indices": torch.arange(len(rays_o)).repeat_interleave(counts).int(), "packed_info": packed})
    return intervals, samples, None


def _reference_visibility(t_starts, t_ends, sigmas, packed_info, early_stop_eps, alpha_thre=0.0):
    """nerfacc's `render_visibility_from_density` for packed samples: transmittance before each
    sample >= `early_stop_eps`."""
    tau = sigmas * (t_ends - t_starts)
    ray = torch.arange(len(packed_info)).repeat_interleave(packed_info[:, 1])
    before = torch.cumsum(tau, 0) - tau
    before = before - (torch.cumsum(tau, 0) - tau)[packed_info[ray, 0]]
    return torch.exp(-before) >= early_stop_eps


def test_marching_all_prompts_together_matches_each_alone_with_reference_kernels(monkeypatch):
    """`render.batched_marching` on the CPU, with nerfacc's CUDA traversal and visibility replaced
    by PyTorch readings of them: the boxes moved side by side, each ray's lattice and its own box's
    faces, and the stacked early-stop probe give every prompt the samples its own march gives it.
    The prompts' grids differ (random cells), so samples taken in a neighbour's cells would show."""
    cfg = dataclasses.replace(RENDER, backend="auto", num_samples=32, grid_resolution=8)
    renderer = _renderer(k=3, field_cfg=FIELD, render_cfg=cfg).eval()
    with torch.no_grad():
        renderer.field.encoding.tables.normal_(0, 0.5)
        for est in renderer.estimators:
            est.binaries.copy_(torch.rand(est.binaries.shape) < 0.6)
    monkeypatch.setattr(nerfacc.grid, "traverse_grids", _reference_traverse)
    monkeypatch.setattr(nerfacc.volrend, "render_visibility_from_density", _reference_visibility)

    def lone_sampling(est):  # OccGridEstimator.sampling on the reference kernels (near plane 0)
        def sampling(rays_o, rays_d, sigma_fn=None, render_step_size=None, early_stop_eps=1e-4, stratified=False, **_):
            assert not stratified
            b = renderer.bound
            aabb = torch.tensor([[-b, -b, -b, b, b, b]])
            n = len(rays_o)
            iv, sm, _ = _reference_traverse(rays_o, rays_d, est.binaries, aabb, torch.zeros(n), torch.full((n,), 1e10), render_step_size)
            ts, te, ri = iv.vals[iv.is_left], iv.vals[iv.is_right], sm.ray_indices
            keep = _reference_visibility(ts, te, sigma_fn(ts, te, ri.long()), sm.packed_info, early_stop_eps)
            return ri[keep], ts[keep], te[keep]
        return sampling

    for est in renderer.estimators:
        monkeypatch.setattr(est, "sampling", lone_sampling(est))
    o, d = _rays_to_centre(3, 40, radius=1.6)  # cameras 1.6 from the centre: inside a neighbour's shifted box
    o[1, :4] = torch.tensor([0.0, 0.0, 5.0])  # rays that miss
    d[1, :4] = torch.tensor([1.0, 0.0, 0.0])
    flat_o, flat_d = o.reshape(-1, 3), d.reshape(-1, 3)
    each = renderer._march_each(flat_o, flat_d, 3, 40, False)
    together = renderer._march_together(flat_o, flat_d, 3, 40, False)
    assert each[3] == together[3] and min(each[3]) > 0  # the same sample count for every prompt
    assert torch.equal(each[0], together[0])  # the same rays
    torch.testing.assert_close(together[1], each[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[2], each[2], atol=1e-5, rtol=0)
    # A lattice that strays one step into a neighbour's cells (the first sample's midpoint
    # outside the box) is what the start rule prevents: every midpoint lies in its own box.
    mid = flat_o[together[0]] + flat_d[together[0]] * ((together[1] + together[2]) / 2)[:, None]
    assert float(mid.abs().max()) <= renderer.bound + 1e-5


def test_bucket_sizes_cover_every_count_with_little_padding_and_few_shapes():
    from dreamfusion_trt.render.renderer import bucket_size

    sizes = set()
    for n in range(0, 300_000, 7):
        b = bucket_size(n)
        assert b >= max(n, 256) and (n <= 256 or b <= n * 1.125 + 1), (n, b)
        sizes.add(b)
    assert bucket_size(4096) == 4096 and bucket_size(4097) == 4608
    assert len(sizes) <= 8 * 11 + 1  # 8 sizes per power of two from 256 to 2^19


@pytest.mark.gpu
def test_nerfacc_render_with_bucketed_sample_counts_equals_the_unpadded_render(monkeypatch):
    """The marcher's samples padded to a bucket size (the fast path) against exact counts (the
    slow twin): the same pixels, orientation and parameter gradients."""
    from dreamfusion_trt.render import renderer as renderer_mod

    device = torch.device("cuda")
    field = NeRFField(SOLID, num_prompts=2).to(device)
    background = Background(SOLID, 2).to(device)
    r = Renderer(field, background, dataclasses.replace(RENDER, backend="nerfacc", num_samples=128, grid_resolution=64)).to(device)
    cams = orbit_cameras(2, elevation_deg=20.0, radius=2.5, fovy_deg=50.0)
    o, d = _rays_to_centre(2, 64)
    results = []
    for exact in (False, True):
        if exact:
            monkeypatch.setattr(renderer_mod, "bucket_size", lambda n, per_octave=8: max(n, 1))
        field.zero_grad()
        out = r.train().render(o.to(device), d.to(device), cams.light_dir.to(device), shading="lambertian",
                               need_normals=True, stratified=False)  # fmt: skip
        (out.rgb.square().sum() + out.orientation.sum()).backward()
        results.append((out.rgb.detach(), out.opacity.detach(), out.orientation.detach(),
                        [p.grad.clone() for p in field.parameters() if p.grad is not None]))  # fmt: skip
    (rgb0, op0, or0, g0), (rgb1, op1, or1, g1) = results
    torch.testing.assert_close(rgb0, rgb1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(op0, op1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(or0, or1, atol=1e-6, rtol=1e-4)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("stratified", [False, True])
def test_marching_all_prompts_together_equals_marching_each_alone(stratified):
    """`render.batched_marching` (one nerfacc traversal with the prompts' boxes side by side)
    against one march per prompt (the twin): three prompts with different fields and pruned
    grids, so a ray that strayed into a neighbour's cells would show; the same pixels and
    gradients, and without jitter the same number of samples."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    field = NeRFField(SOLID, num_prompts=3).to(device)
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the prompts' fields differ
    background = Background(SOLID, 3).to(device)
    cfg = dataclasses.replace(RENDER, backend="nerfacc", num_samples=128, grid_resolution=32)
    together = Renderer(field, background, dataclasses.replace(cfg, batched_marching=True)).to(device)
    each = Renderer(field, background, dataclasses.replace(cfg, batched_marching=False)).to(device)
    together.train().update_occupancy(0)
    each.load_state_dict(together.state_dict())
    assert max(together.occupied_fraction()) < 1.0
    cams = orbit_cameras(3, elevation_deg=20.0, radius=2.0, fovy_deg=60.0)
    o, d = _rays_to_centre(3, 64)
    results = []
    for r in (together, each):
        field.zero_grad()
        if stratified:
            torch.manual_seed(1)
        out = r.train().render(o.to(device), d.to(device), cams.light_dir.to(device), shading="lambertian",
                               need_normals=True, stratified=stratified)  # fmt: skip
        (out.rgb.square().sum() + out.orientation.sum()).backward()
        results.append((out, [p.grad.clone() for p in field.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = results
    tol = 2e-2 if stratified else 1e-4  # jittered: the two draw their jitter differently
    for name in ("rgb", "opacity", "depth"):
        diff = float((getattr(a, name) - getattr(b, name)).detach().abs().mean())
        assert diff < tol, (name, diff)
    if not stratified:
        assert abs(a.num_samples - b.num_samples) <= max(2, b.num_samples // 1000)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-2)
