"""Analytic normals (``field.normals = "analytic"``) against their twins, in the PyTorch encoding.

The encoding's Jacobian is checked against autograd of the features and against central differences;
the field's density gradient, normals and the orientation loss's gradients w.r.t. the hash tables and
the MLP against ``normals="autograd"`` (the same exact gradient, by double backward) and against
``normals="finite_difference"``; `gradcheck` in float64 on a tiny field. The trilinear features are
continuous across cell faces but their derivative jumps there, so comparisons with finite
differences use points at least `MARGIN` (in cells) away from every face of every level, which keeps
each probe in its point's cell. The fused Triton twin is tested in `test_triton_hashgrid.py`.
"""

import dataclasses

import pytest
import torch
from torch.func import functional_call

from dreamfusion_trt.config import FieldConfig
from dreamfusion_trt.field import HashGridEncoding, NeRFField
from dreamfusion_trt.field.mlp import StackedMLP

from test_field import SMALL  # noqa: E402  (4 levels of 4..32 cells: two dense, two hashed)
# For gradcheck: levels of 2 and 5 cells in T = 32 entries (one dense, one hashed), a 2-layer MLP.
TINY = FieldConfig(
    num_levels=2, level_dim=2, log2_hashmap_size=5, base_resolution=2, max_resolution=5, hidden_dim=8, num_layers=2
)
MARGIN = 0.02  # cells; finite-difference probes move by at most 1e-5 world units (5e-5 cells at R = 32)


def interior_points(k: int, n: int, resolutions: list[int], seed: int, low: float = 0.0, high: float = 1.0):
    """``[k, n, 3]`` float64 points in [low, high] (unit coordinates), each at least `MARGIN` cells
    away from every cell face of every level."""
    gen = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(8 * k * n, 3, generator=gen, dtype=torch.float64)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    for res in resolutions:
        frac = x * res - (x * res).floor()
        keep &= ((frac > MARGIN) & (frac < 1.0 - MARGIN)).all(dim=-1)
    x = x[keep]
    assert x.shape[0] >= k * n, "too few interior points; lower MARGIN"
    return x[: k * n].reshape(k, n, 3)


def twin_fields(cfg: FieldConfig, k: int, dtype=torch.float64, **kinds) -> dict[str, NeRFField]:
    """Fields with identical parameters (O(0.1) tables so the MLP sees varied features), one per
    normals mode named in `kinds` (name -> mode)."""
    torch.manual_seed(0)
    fields = {}
    for name, mode in kinds.items():
        fields[name] = NeRFField(dataclasses.replace(cfg, normals=mode), num_prompts=k).to(dtype)
    first = next(iter(fields.values()))
    with torch.no_grad():
        first.encoding.tables.normal_(0.0, 0.1)
    for f in fields.values():
        f.load_state_dict(first.state_dict())
    return fields


def orientation_loss(normal: torch.Tensor, dirs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The renderer's Ref-NeRF term: weights * max(0, n . d)^2, summed."""
    return (weights * (normal * dirs).sum(-1).clamp_min(0.0).square()).sum()


def world(unit: torch.Tensor, bound: float) -> torch.Tensor:
    return unit * (2.0 * bound) - bound


# ---------------------------------------------------------------------------------------------
# encoding


def test_encoding_jacobian_matches_autograd_of_the_features():
    enc = HashGridEncoding(2, SMALL).double()
    with torch.no_grad():
        enc.tables.normal_()
    # Some points outside [0, 1]: the clamp makes the Jacobian zero along those axes.
    x = (torch.rand(2, 60, 3, dtype=torch.float64) * 1.2 - 0.1).requires_grad_(True)
    feats, jac = enc.forward_with_jacobian(x)
    assert feats.shape == (2, 60, 8) and jac.shape == (2, 60, 3, 8)
    torch.testing.assert_close(feats, enc(x), rtol=0, atol=0)
    for d in range(enc.output_dim):  # points are independent: d sum_n f[n, d] / dx[n] = jac[n, :, d]
        (grad,) = torch.autograd.grad(feats[..., d].sum(), x, retain_graph=True)
        torch.testing.assert_close(jac[..., d], grad, rtol=1e-12, atol=1e-12)
    outside = (x < 0) | (x > 1)
    assert bool(outside.any()) and bool((jac.detach()[outside] == 0).all())


def test_encoding_jacobian_matches_central_differences():
    enc = HashGridEncoding(1, SMALL).double()
    with torch.no_grad():
        enc.tables.normal_()
    x = interior_points(1, 200, enc.resolutions, seed=1)
    _, jac = enc.forward_with_jacobian(x)
    eps = 1e-6
    for j in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[j] = eps
        fd = (enc(x + step) - enc(x - step)) / (2 * eps)  # exact up to rounding: linear within a cell
        torch.testing.assert_close(jac.detach()[:, :, j], fd.detach(), rtol=1e-6, atol=1e-6)
    assert float(jac.detach().abs().max()) > 1.0  # the finest level scales table values by R = 32


def test_encoding_jacobian_float32_matches_float64():
    enc = HashGridEncoding(2, SMALL)
    with torch.no_grad():
        enc.tables.normal_()
    x = interior_points(2, 100, enc.resolutions, seed=2)
    _, jac32 = enc.forward_with_jacobian(x.float())
    _, jac64 = enc.double().forward_with_jacobian(x)
    assert jac32.dtype == torch.float32
    torch.testing.assert_close(jac32.double(), jac64, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# MLP input gradient


@pytest.mark.parametrize("num_layers", [1, 3])
def test_mlp_input_gradient_matches_autograd(num_layers):
    mlp = StackedMLP(3, 8, 16, 4, num_layers).double()
    x = torch.randn(2, 50, 8, dtype=torch.float64, requires_grad=True)
    out, grad = mlp.forward_with_input_gradient(x, prompts=slice(1, 3), output=0)
    torch.testing.assert_close(out, mlp(x, prompts=slice(1, 3)), rtol=0, atol=0)
    (expected,) = torch.autograd.grad(out[..., 0].sum(), x, retain_graph=True)
    assert grad.shape == (2, 50, 8)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    # The gradient itself trains the weights: its own gradient equals double backward's.
    (grad * torch.randn_like(grad)).sum().backward()
    assert float(mlp.layers[0].weight.grad[1:].abs().sum()) > 0
    assert float(mlp.layers[0].weight.grad[0].abs().sum()) == 0  # prompt 0 is not in the slice


# ---------------------------------------------------------------------------------------------
# field


@pytest.mark.parametrize("activation", ["exp", "softplus"])
def test_analytic_density_gradient_equals_autograd(activation):
    cfg = dataclasses.replace(SMALL, density_activation=activation)
    fields = twin_fields(cfg, 2, analytic="analytic", autograd="autograd")
    # Points inside and outside the box (zero density and zero gradient outside).
    x = torch.rand(2, 80, 3, dtype=torch.float64) * 2.4 - 1.2
    x[0, 0] = 0.0  # the blob's centre, where its gradient is defined as zero
    grad_an = fields["analytic"].density_gradient(x)
    grad_ad = fields["autograd"].density_gradient(x)
    assert grad_an.shape == (2, 80, 3)
    torch.testing.assert_close(grad_an, grad_ad, rtol=1e-10, atol=1e-10)
    outside = (x.abs() > 1.0).any(dim=-1)
    assert bool(outside.any()) and bool((grad_an[outside] == 0).all())
    assert float(grad_an[~outside].detach().norm(dim=-1).min()) > 0


def test_analytic_normals_match_finite_differences():
    # A small fd_eps so the central difference is in each point's cell at every level.
    fields = twin_fields(
        dataclasses.replace(SMALL, fd_eps=1e-5), 2, analytic="analytic", fd="finite_difference"
    )
    resolutions = fields["analytic"].encoding.resolutions
    x = world(interior_points(2, 150, resolutions, seed=3, low=0.1, high=0.9), SMALL.bound)
    with torch.no_grad():
        g_an = fields["analytic"].density_gradient(x)
        g_fd = fields["fd"].density_gradient(x)
        n_an, n_fd = fields["analytic"].normals(x), fields["fd"].normals(x)
    torch.testing.assert_close(g_an, g_fd, rtol=1e-5, atol=1e-5 * float(g_an.abs().max()))
    torch.testing.assert_close(n_an, n_fd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n_an.norm(dim=-1), torch.ones(2, 150, dtype=torch.float64))


def test_orientation_loss_gradients_match_autograd_and_finite_differences():
    """The orientation loss's gradient w.r.t. every parameter (tables and MLP) is the same through
    analytic normals as through double backward, and as through finite-difference normals."""
    fields = twin_fields(
        dataclasses.replace(SMALL, fd_eps=1e-6), 2, analytic="analytic", autograd="autograd", fd="finite_difference"
    )
    resolutions = fields["analytic"].encoding.resolutions
    x = world(interior_points(2, 100, resolutions, seed=4, low=0.1, high=0.9), SMALL.bound)
    gen = torch.Generator().manual_seed(5)
    dirs = torch.nn.functional.normalize(torch.randn(2, 100, 3, generator=gen, dtype=torch.float64), dim=-1)
    weights = torch.rand(2, 100, generator=gen, dtype=torch.float64)
    grads = {}
    for name, field in fields.items():
        out = field.query(x, with_normals=True)
        loss = orientation_loss(out.normal, dirs, weights) + (out.sigma * weights).sum() + out.albedo.sum()
        params = dict(field.named_parameters())
        grads[name] = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for pname, expected in grads["autograd"].items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(grads["analytic"][pname], expected, rtol=1e-9, atol=1e-9 * scale, msg=pname)
        # Finite differences of step 1e-6 in float64: within a cell the field is smooth, so the
        # central difference is exact to ~eps^2 and rounding ~1e-16 / 1e-6.
        torch.testing.assert_close(grads["fd"][pname], expected, rtol=1e-5, atol=1e-5 * scale, msg=pname)
    assert float(grads["analytic"]["encoding.tables"].abs().sum()) > 0
    assert float(grads["analytic"]["mlp.layers.0.weight"].abs().sum()) > 0


class _NormalsAndLoss(torch.nn.Module):
    """``x -> (analytic normals [K, N, 3], orientation loss)``, so `functional_call` can swap the
    field's parameters for gradcheck's inputs."""

    def __init__(self, field: NeRFField, dirs: torch.Tensor) -> None:
        super().__init__()
        self.field, self.dirs = field, dirs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.field.query(x, with_normals=True)
        return out.normal, orientation_loss(out.normal, self.dirs, out.sigma)


def test_gradcheck_normals_wrt_tables_and_mlp():
    field = twin_fields(TINY, 1, analytic="analytic")["analytic"]
    x = world(interior_points(1, 12, field.encoding.resolutions, seed=6, low=0.15, high=0.85), TINY.bound)
    dirs = torch.nn.functional.normalize(torch.randn(1, 12, 3, dtype=torch.float64), dim=-1)
    module = _NormalsAndLoss(field, dirs)
    names = [name for name, _ in module.named_parameters()]
    assert "field.encoding.tables" in names and "field.mlp.layers.0.weight" in names

    def fn(*params):
        return functional_call(module, dict(zip(names, params)), (x,))

    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_analytic_query_matches_separate_calls_and_prompt_slices():
    field = twin_fields(SMALL, 3, dtype=torch.float32, analytic="analytic")["analytic"]
    x = torch.rand(3, 40, 3) * 1.6 - 0.8
    out = field.query(x, with_normals=True)
    sigma, albedo = field(x)
    torch.testing.assert_close(out.sigma, sigma, rtol=0, atol=0)
    torch.testing.assert_close(out.albedo, albedo, rtol=0, atol=0)
    torch.testing.assert_close(out.normal, field.normals(x), rtol=0, atol=0)
    assert out.normal.requires_grad  # the training step's orientation loss needs the graph
    with torch.no_grad():
        nograd = field.query(x, with_normals=True)
    assert not nograd.normal.requires_grad
    torch.testing.assert_close(nograd.normal, out.normal.detach(), rtol=0, atol=0)
    # The slice's prompt 0 is the field's prompt 1; same values as from the full stack (up to the
    # batched matmul's blocking, which may differ between batch shapes: 1e-6 in float32).
    part = field.query(x[1:3], with_normals=True, prompts=slice(1, 3))
    torch.testing.assert_close(part.normal, out.normal[1:3], rtol=1e-5, atol=1e-6)


def test_analytic_float32_agrees_with_autograd_and_points_outward():
    fields = twin_fields(SMALL, 2, dtype=torch.float32, analytic="analytic", autograd="autograd")
    d = torch.nn.functional.normalize(torch.randn(2, 100, 3), dim=-1)
    x = d * (0.1 + 0.7 * torch.rand(2, 100, 1))
    with torch.no_grad():
        n_an, n_ad = fields["analytic"].normals(x), fields["autograd"].normals(x)
    torch.testing.assert_close(n_an, n_ad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # default (tiny) tables: the blob dominates, normals point away from the centre
        fresh = NeRFField(dataclasses.replace(SMALL, normals="analytic"), num_prompts=2)
        assert float((fresh.normals(x) * d).sum(-1).min()) > 0.99


def test_unknown_normals_mode_names_the_value():
    field = NeRFField(dataclasses.replace(SMALL, normals="sobel"), num_prompts=1)
    with pytest.raises(ValueError, match=r"field.normals must be one of \('analytic'.*got 'sobel'"):
        field.query(torch.zeros(1, 2, 3), with_normals=True)
    with pytest.raises(ValueError, match="'sobel'"):
        field.normals(torch.zeros(1, 2, 3))
