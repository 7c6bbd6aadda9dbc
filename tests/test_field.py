"""Hash grid, NeRF field and background: shapes, gradients, invariants, hand-computed indices."""

import dataclasses

import pytest
import torch

from dreamfusion_trt.config import FieldConfig
from dreamfusion_trt.field import Background, HashGridEncoding, NeRFField, density_blob, level_resolutions
from dreamfusion_trt.field.nerf import autograd_gradient, finite_difference_gradient, normals_from_gradient

# 4 levels of 4, 8, 16, 32 cells: the first two fit densely in T = 1024 entries, the others hash.
SMALL = FieldConfig(
    num_levels=4,
    level_dim=2,
    log2_hashmap_size=10,
    base_resolution=4,
    max_resolution=32,
    hidden_dim=16,
    num_layers=3,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _unit_dirs(k, n):
    d = torch.randn(k, n, 3)
    return d / d.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# hash grid


def test_level_resolutions_are_geometric_from_base_to_max():
    assert level_resolutions(SMALL) == [4, 8, 16, 32]
    cfg = FieldConfig()  # 16 levels, 16 -> 2048
    res = level_resolutions(cfg)
    assert len(res) == 16 and res[0] == 16 and res[-1] == 2048
    assert all(b > a for a, b in zip(res, res[1:]))


def test_hashgrid_output_shape_for_two_prompts():
    enc = HashGridEncoding(2, SMALL)
    assert enc.tables.shape == (2, 4, 1024, 2)
    assert float(enc.tables.detach().abs().max()) <= 1e-4
    out = enc(torch.rand(2, 37, 3))
    assert out.shape == (2, 37, 8)
    assert out.dtype == torch.float32


def test_hashgrid_rejects_wrong_shape():
    enc = HashGridEncoding(2, SMALL)
    with pytest.raises(ValueError, match=r"\[2, N, 3\]"):
        enc(torch.rand(3, 5, 3))


def test_hashgrid_dense_and_hashed_levels():
    enc = HashGridEncoding(1, SMALL)
    assert enc.dense == [True, True, False, False]  # 5^3, 9^3 <= 1024 < 17^3, 33^3

    # A dense level maps its (R+1)^3 vertices one-to-one onto the first (R+1)^3 rows.
    side = enc.resolutions[1] + 1
    g = torch.arange(side)
    verts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
    rows = enc.vertex_index(verts, 1)
    assert sorted(rows.tolist()) == list(range(side**3))
    assert int(enc.vertex_index(torch.tensor([2, 3, 4]), 1)) == 2 + 3 * 9 + 4 * 81

    # A hashed level uses Instant-NGP's XOR of coordinates times primes, modulo T.
    for v in ([0, 0, 0], [1, 0, 0], [5, 7, 11], [16, 16, 16], [3, 12, 9]):
        expected = (v[0] * 1 ^ v[1] * 2654435761 ^ v[2] * 805459861) % 1024
        assert int(enc.vertex_index(torch.tensor(v), 2)) == expected


def test_hashgrid_matches_corner_by_corner_reference():
    enc = HashGridEncoding(2, SMALL)
    with torch.no_grad():
        enc.tables.normal_()
    x = torch.rand(2, 20, 3)
    ref = []
    for level, res in enumerate(enc.resolutions):
        pos = x * res
        cell = pos.floor().clamp(0, res - 1)
        frac = pos - cell
        acc = torch.zeros(2, 20, 2)
        for c in range(8):
            bits = torch.tensor([c & 1, (c >> 1) & 1, (c >> 2) & 1])
            w = torch.where(bits.bool(), frac, 1 - frac).prod(dim=-1)
            rows = enc.vertex_index(cell.long() + bits, level)
            vals = torch.stack([enc.tables[k, level][rows[k]] for k in range(2)])
            acc += w[..., None] * vals
        ref.append(acc)
    torch.testing.assert_close(enc(x), torch.cat(ref, dim=-1), atol=1e-5, rtol=1e-5)


def test_hashgrid_gradient_only_at_touched_entries():
    enc = HashGridEncoding(2, SMALL)
    x = torch.tensor([[[0.31, 0.52, 0.77]], [[0.12, 0.93, 0.44]]])  # one point per prompt, off grid lines
    enc(x).sum().backward()
    grad = enc.tables.grad
    for k in range(2):
        for level, res in enumerate(enc.resolutions):
            cell = (x[k, 0] * res).floor().long()
            corners = torch.tensor([[c & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)])
            touched = set(enc.vertex_index(cell + corners, level).tolist())
            nonzero = set(torch.nonzero(grad[k, level].abs().sum(-1)).flatten().tolist())
            assert nonzero == touched, (k, level)
            if enc.dense[level]:
                assert len(touched) == 8


def test_hashgrid_is_differentiable_wrt_positions():
    enc = HashGridEncoding(1, SMALL)
    with torch.no_grad():
        enc.tables.normal_()
    x = torch.rand(1, 10, 3, requires_grad=True)
    enc(x).square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_hashgrid_batch_of_one_equals_row_of_three():
    enc3 = HashGridEncoding(3, SMALL)
    with torch.no_grad():
        enc3.tables.normal_()
    enc1 = HashGridEncoding(1, SMALL)
    with torch.no_grad():
        enc1.tables.copy_(enc3.tables[1:2])
    x = torch.rand(1, 50, 3)
    out3 = enc3(torch.cat([torch.rand(1, 50, 3), x, torch.rand(1, 50, 3)]))
    torch.testing.assert_close(enc1(x), out3[1:2], atol=0, rtol=0)
    torch.testing.assert_close(enc3(x, prompts=slice(1, 2)), out3[1:2], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# NeRF field


def test_field_shapes_and_ranges():
    field = NeRFField(SMALL, num_prompts=2)
    x = torch.rand(2, 64, 3) * 2 - 1
    sigma, albedo = field(x)
    assert sigma.shape == (2, 64) and albedo.shape == (2, 64, 3)
    assert bool((sigma >= 0).all()) and bool(((albedo > 0) & (albedo < 1)).all())
    assert field.density(x).shape == (2, 64)
    assert field.normals(x).shape == (2, 64, 3)


def test_field_batch_of_one_equals_row_of_three():
    f3 = NeRFField(SMALL, num_prompts=3)
    with torch.no_grad():
        f3.encoding.tables.normal_(0, 0.1)
    f1 = NeRFField(SMALL, num_prompts=1)
    f1.load_state_dict({k: v[1:2] for k, v in f3.state_dict().items()})
    x = torch.rand(3, 40, 3) * 2 - 1
    s3, a3 = f3(x)
    s1, a1 = f1(x[1:2])
    torch.testing.assert_close(s1, s3[1:2])
    torch.testing.assert_close(a1, a3[1:2])
    torch.testing.assert_close(f3.density(x[1:2], prompts=slice(1, 2)), s3[1:2])


@pytest.mark.parametrize("activation", ["exp", "softplus"])
def test_blob_is_denser_at_centre_than_near_boundary(activation):
    field = NeRFField(dataclasses.replace(SMALL, density_activation=activation), num_prompts=2)
    with torch.no_grad():
        centre = field.density(torch.zeros(2, 1, 3))
        near_boundary = field.density(0.9 * torch.eye(3).expand(2, 3, 3).contiguous())
    assert bool((centre > 100 * near_boundary.max(dim=1, keepdim=True).values).all())
    assert bool((centre > 5).all())  # blob_density 10 at r = 0, network output small


def test_density_blob_formula():
    x = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(density_blob(x, 10.0, 0.5), torch.tensor([10.0, 5.0, 0.0, -10.0]))


def test_zero_density_outside_bound():
    field = NeRFField(dataclasses.replace(SMALL, bound=1.0), num_prompts=2)
    with torch.no_grad():  # a positive density everywhere the field is defined
        field.mlp.layers[-1].bias.fill_(30.0)
    outside = torch.tensor([[1.2, 0.0, 0.0], [0.0, -1.01, 0.5], [3.0, 3.0, 3.0]]).expand(2, 3, 3).contiguous()
    inside = torch.tensor([[0.99, 0.0, 0.0], [0.0, -0.95, 0.5], [0.9, 0.9, 0.9]]).expand(2, 3, 3).contiguous()
    assert bool((field.density(outside) == 0).all())
    assert bool((field.density(inside) > 0).all())


def test_finite_differences_agree_with_autograd_on_analytic_density():
    centre = torch.tensor([0.1, -0.2, 0.05])

    def density(x):  # a smooth anisotropic bump with a ripple
        d = x - centre
        bump = torch.exp(-(d[..., 0] ** 2 + 2 * d[..., 1] ** 2 + 0.5 * d[..., 2] ** 2) / 0.3)
        return 20 * bump + torch.sin(3 * x[..., 0])

    x = torch.rand(2, 100, 3) * 1.6 - 0.8
    n_fd = normals_from_gradient(finite_difference_gradient(density, x, 1e-2))
    n_ad = normals_from_gradient(autograd_gradient(density, x))
    cos = (n_fd * n_ad).sum(-1)
    assert float(cos.detach().min()) > 0.99


def test_field_normals_fd_and_autograd_agree_and_point_outward():
    f_fd = NeRFField(SMALL, num_prompts=2)
    f_ad = NeRFField(dataclasses.replace(SMALL, normals="autograd"), num_prompts=2)
    f_ad.load_state_dict(f_fd.state_dict())
    dirs = _unit_dirs(2, 100)
    x = dirs * (0.1 + 0.7 * torch.rand(2, 100, 1))
    with torch.no_grad():
        n_fd, n_ad = f_fd.normals(x), f_ad.normals(x)
    torch.testing.assert_close(n_fd.norm(dim=-1), torch.ones(2, 100))
    assert float((n_fd * n_ad).sum(-1).min()) > 0.99
    assert float((n_fd * dirs).sum(-1).min()) > 0.99  # the blob's normals point away from the centre


@pytest.mark.parametrize("method", ["finite_difference", "autograd"])
def test_normals_backprop_to_parameters(method):
    field = NeRFField(dataclasses.replace(SMALL, normals=method), num_prompts=2)
    x = _unit_dirs(2, 30) * 0.4
    field.normals(x)[..., 0].sum().backward()
    assert float(field.encoding.tables.grad.abs().sum()) > 0
    assert float(field.mlp.layers[0].weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("method", ["finite_difference", "autograd"])
def test_query_matches_separate_calls(method):
    field = NeRFField(dataclasses.replace(SMALL, normals=method), num_prompts=2)
    with torch.no_grad():
        field.encoding.tables.normal_(0, 0.05)
    x = torch.rand(2, 25, 3) * 1.4 - 0.7
    out = field.query(x, with_normals=True)
    sigma, albedo = field(x)
    torch.testing.assert_close(out.sigma, sigma)
    torch.testing.assert_close(out.albedo, albedo)
    torch.testing.assert_close(out.normal, field.normals(x), atol=1e-5, rtol=1e-4)
    assert field.query(x, with_normals=False).normal is None
    with torch.no_grad():  # autograd normals still work when the caller disabled gradients
        torch.testing.assert_close(field.query(x, with_normals=True).normal, out.normal.detach(), atol=1e-5, rtol=1e-4)


def test_field_config_errors_name_the_value():
    with pytest.raises(ValueError, match="'sqrt'"):
        NeRFField(dataclasses.replace(SMALL, density_activation="sqrt")).density(torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="-1.0"):
        NeRFField(dataclasses.replace(SMALL, bound=-1.0))
    with pytest.raises(ValueError, match="'grid'"):
        NeRFField(dataclasses.replace(SMALL, backend="grid"))


# ---------------------------------------------------------------------------------------------
# background


def test_mlp_background_shape_range_and_direction_dependence():
    bg = Background(SMALL, num_prompts=2)
    dirs = _unit_dirs(2, 16)
    rgb = bg(dirs)
    assert rgb.shape == (2, 16, 3)
    assert bool(((rgb > 0) & (rgb < 1)).all())
    assert float((rgb[:, 0] - rgb[:, 1]).detach().abs().max()) > 0  # depends on the direction
    torch.testing.assert_close(bg(dirs * 3.0), rgb)  # only on the direction, not its length
    rgb.sum().backward()
    assert float(bg.mlp.layers[0].weight.grad.abs().sum()) > 0


def test_solid_background_is_the_configured_colour():
    bg = Background(dataclasses.replace(SMALL, background="solid", background_color=(0.2, 0.4, 0.6)), 2)
    rgb = bg(_unit_dirs(2, 5))
    torch.testing.assert_close(rgb, torch.tensor([0.2, 0.4, 0.6]).expand(2, 5, 3))


def test_random_background_one_colour_per_prompt_and_reproducible():
    bg = Background(dataclasses.replace(SMALL, background="random"), 3)
    dirs = _unit_dirs(3, 7)
    a = bg(dirs, generator=torch.Generator().manual_seed(1))
    b = bg(dirs, generator=torch.Generator().manual_seed(1))
    c = bg(dirs, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, 7, 3)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert bool((a == a[:, :1]).all())  # one colour across the rays of a prompt
    assert not torch.equal(a[0, 0], a[1, 0])  # independent between prompts
    assert list(bg.state_dict()) == []


def test_background_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'sky'"):
        Background(dataclasses.replace(SMALL, background="sky"))
