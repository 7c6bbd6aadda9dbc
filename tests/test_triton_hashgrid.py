"""The fused Triton hash grid against its slow twin, the PyTorch `HashGridEncoding`: features,
their spatial Jacobian (analytic normals), and the table gradients of both.

Both compute the cell a point falls in identically (``x * R``, floor; the kernels are compiled
without fused multiply-add), so the Jacobian, which jumps across cell faces, is compared at any
point, including points on faces and outside [0, 1].

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set per test);
without the triton package the whole file skips.
"""

import dataclasses

import pytest
import torch

from dreamfusion_trt.config import FieldConfig
from dreamfusion_trt.field.hashgrid import HashGridEncoding
from dreamfusion_trt.field.nerf import NeRFField, make_encoding

pytest.importorskip("triton", reason="the triton package is not installed (pip install triton)")

from dreamfusion_trt.field.triton_hashgrid import TritonHashGridEncoding  # noqa: E402

# 4 levels at resolutions 4, 10, 25, 64 with T = 2**12: two dense levels, two hashed ones whose
# vertex coordinates times the primes overflow 32 bits (int64 in the reference, uint32 in the kernel).
SMALL = FieldConfig(num_levels=4, level_dim=2, log2_hashmap_size=12, base_resolution=4, max_resolution=64)


@pytest.fixture
def device(monkeypatch) -> torch.device:
    """CUDA when present, else the CPU under Triton's interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def twins(num_prompts: int, cfg: FieldConfig, device: torch.device) -> tuple[HashGridEncoding, TritonHashGridEncoding]:
    """Reference and fused encodings sharing O(1) random tables (the default init is ~1e-4)."""
    reference = HashGridEncoding(num_prompts, cfg)
    with torch.no_grad():
        reference.tables.uniform_(-1.0, 1.0)
    fused = TritonHashGridEncoding(num_prompts, cfg)
    fused.load_state_dict(reference.state_dict())  # strict: same parameter names and shapes
    return reference.to(device), fused.to(device)


def random_points(k: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``[k, n, 3]`` points, slightly outside [0, 1] at times (both clamp), plus exact grid corners."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(k, n, 3, generator=gen) * 1.1 - 0.05
    x[:, :4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.25, 1.0], [1.0, 0.0, 0.75]])
    return x.to(device)


def assert_twins_agree(reference, fused, x, prompts=None, seed: int = 1, jacobian: bool = False) -> None:
    """Same features (and with `jacobian` the same ``[K, N, 3, L * F]`` Jacobian) and the same table
    gradients for arbitrary upstream gradients of each output."""
    gen = torch.Generator().manual_seed(seed)
    if jacobian:
        expected, expected_jac = reference.forward_with_jacobian(x, prompts)
        actual, actual_jac = fused.forward_with_jacobian(x, prompts)
        assert actual_jac.shape == expected_jac.shape == (*expected.shape[:2], 3, reference.output_dim)
        assert actual_jac.dtype == torch.float32
        # Entries reach R_l * |table|: float32 rounding relative to the largest.
        scale = float(expected_jac.detach().abs().max())
        torch.testing.assert_close(actual_jac, expected_jac, rtol=1e-5, atol=1e-6 * scale)
        grad_jac = torch.randn(expected_jac.shape, generator=gen).to(x.device)
    else:
        expected = reference(x, prompts)
        actual = fused(x, prompts)
    assert actual.shape == expected.shape == (x.shape[0], x.shape[1], reference.output_dim)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=gen).to(x.device)
    if jacobian:
        ((expected * grad).sum() + (expected_jac * grad_jac).sum()).backward()
        ((actual * grad).sum() + (actual_jac * grad_jac).sum()).backward()
    else:
        expected.backward(grad)
        actual.backward(grad)
    # Atomic adds sum in any order: float32 rounding relative to the largest gradient.
    atol = 1e-4 * max(1.0, float(reference.tables.grad.abs().max()) / 10.0)
    torch.testing.assert_close(fused.tables.grad, reference.tables.grad, rtol=1e-5, atol=atol)
    assert reference.tables.grad.abs().sum() > 0


@pytest.mark.parametrize("jacobian", [False, True])
def test_forward_and_table_gradients_match_reference(device, jacobian):
    reference, fused = twins(2, SMALL, device)
    assert reference.dense == [True, True, False, False]
    assert_twins_agree(reference, fused, random_points(2, 1500, device), jacobian=jacobian)


def test_jacobian_is_zero_outside_the_unit_cube(device):
    _, fused = twins(1, SMALL, device)
    x = random_points(1, 300, device, seed=2)
    with torch.no_grad():
        _, jac = fused.forward_with_jacobian(x)
    outside = (x < 0) | (x > 1)  # [1, N, 3]: per axis
    assert bool(outside.any()) and bool((jac[outside] == 0).all())
    assert bool((jac[~outside].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("jacobian", [False, True])
def test_prompt_slice_touches_only_its_tables(device, jacobian):
    reference, fused = twins(3, SMALL, device)
    x = random_points(2, 700, device, seed=3)
    assert_twins_agree(reference, fused, x, prompts=slice(1, 3), jacobian=jacobian)
    assert fused.tables.grad[0].abs().sum() == 0
    # The slice's prompt 0 is the module's prompt 1: same result as encoding it alone.
    torch.testing.assert_close(fused(x[:1], slice(1, 2)), fused(x, slice(1, 3))[:1], rtol=0, atol=0)


@pytest.mark.parametrize("jacobian", [False, True])
@pytest.mark.parametrize("level_dim", [1, 3])
def test_level_dims_that_are_not_two(device, level_dim, jacobian):
    cfg = dataclasses.replace(SMALL, level_dim=level_dim, num_levels=3)
    reference, fused = twins(2, cfg, device)
    assert_twins_agree(reference, fused, random_points(2, 300, device, seed=level_dim), jacobian=jacobian)


def test_positions_with_grad_take_the_reference_path(device):
    reference, fused = twins(1, SMALL, device)
    x_ref = random_points(1, 200, device, seed=5).requires_grad_(True)
    x_fused = x_ref.detach().clone().requires_grad_(True)
    reference(x_ref).square().sum().backward()
    fused(x_fused).square().sum().backward()
    assert x_fused.grad is not None and x_fused.grad.abs().sum() > 0
    torch.testing.assert_close(x_fused.grad, x_ref.grad)
    torch.testing.assert_close(fused.tables.grad, reference.tables.grad)
    _, jac_fused = fused.forward_with_jacobian(x_fused)  # the same fallback, Jacobian included
    _, jac_ref = reference.forward_with_jacobian(x_ref)
    torch.testing.assert_close(jac_fused, jac_ref)
    # Twice differentiable w.r.t. x there: the trilinear weights have nonzero mixed second derivatives.
    (grad_x,) = torch.autograd.grad(jac_fused.sum(), x_fused)
    assert grad_x.shape == x_fused.shape and float(grad_x.abs().sum()) > 0


def test_no_grad_and_empty_batch(device):
    reference, fused = twins(2, SMALL, device)
    x = random_points(2, 100, device)
    with torch.no_grad():
        out = fused(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference(x).detach(), rtol=1e-5, atol=1e-5)
    assert fused(x[:, :0]).shape == (2, 0, reference.output_dim)


def field_twins(cfg: FieldConfig, num_prompts: int, device: torch.device) -> tuple[NeRFField, NeRFField]:
    """NeRF fields with the PyTorch and the Triton hash grid and the same parameters (O(0.1)
    tables, so the MLP sees varied features and the normals are not just the blob's)."""
    torch.manual_seed(0)
    field_torch = NeRFField(dataclasses.replace(cfg, backend="torch"), num_prompts=num_prompts)
    with torch.no_grad():
        field_torch.encoding.tables.normal_(0.0, 0.1)
    field_triton = NeRFField(dataclasses.replace(cfg, backend="triton"), num_prompts=num_prompts)
    assert isinstance(field_triton.encoding, TritonHashGridEncoding)
    field_triton.load_state_dict(field_torch.state_dict())  # checkpoints interchange both ways
    return field_torch.to(device), field_triton.to(device)


def assert_fields_agree(field_torch, field_triton, x, seed: int = 0) -> None:
    """Same sigma, albedo and normals, and the same gradients of a render-like loss (density,
    albedo and the orientation term on the normals) w.r.t. every parameter."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(x.shape, generator=gen), dim=-1).to(x.device)
    weights = torch.rand(x.shape[:2], generator=gen).to(x.device)
    grads = []
    for field in (field_torch, field_triton):
        out = field.query(x, with_normals=True)
        facing_away = (out.normal * dirs).sum(-1).clamp_min(0.0).square()
        loss = (weights * (facing_away + out.sigma.clamp_max(50.0))).sum() + out.albedo.square().sum()
        grads.append(torch.autograd.grad(loss, list(field.parameters())))
        if field is field_torch:
            expected = out
    torch.testing.assert_close(out.sigma, expected.sigma, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.albedo, expected.albedo, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.normal, expected.normal, rtol=1e-3, atol=1e-4)
    for (name, _), g_triton, g_torch in zip(field_torch.named_parameters(), grads[1], grads[0]):
        scale = float(g_torch.abs().max())
        torch.testing.assert_close(g_triton, g_torch, rtol=1e-3, atol=1e-4 * scale, msg=name)
        assert scale > 0 or name.endswith("bias"), name


@pytest.mark.parametrize("normals", ["finite_difference", "analytic"])
def test_nerf_field_with_triton_backend_matches_torch_backend(device, normals):
    cfg = dataclasses.replace(SMALL, hidden_dim=16, num_layers=2, normals=normals)
    field_torch, field_triton = field_twins(cfg, 2, device)
    x = (random_points(2, 64, device) * 2.0 - 1.0) * cfg.bound  # finite differences and analytic: the fused path
    assert_fields_agree(field_torch, field_triton, x)


def test_triton_analytic_normals_match_pytorch_autograd_normals(device):
    """The fused analytic path against the other exact method, double backward in PyTorch."""
    cfg = dataclasses.replace(SMALL, hidden_dim=16, num_layers=2)
    field_autograd, field_triton = field_twins(dataclasses.replace(cfg, normals="autograd"), 2, device)
    field_triton.cfg = dataclasses.replace(field_triton.cfg, normals="analytic")
    assert_fields_agree(field_autograd, field_triton, (random_points(2, 64, device, seed=9) * 1.8 - 0.9) * cfg.bound)


def test_cpu_tensor_outside_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fused = TritonHashGridEncoding(1, SMALL)  # constructing on the CPU is fine (moved later)
    with pytest.raises(ValueError, match=r"runs on CUDA tensors, got a tensor on 'cpu'.*TRITON_INTERPRET=1"):
        fused(torch.rand(1, 10, 3))
    assert isinstance(make_encoding(1, dataclasses.replace(SMALL, backend="triton")), TritonHashGridEncoding)


def test_wrong_shape_is_refused(device):
    _, fused = twins(2, SMALL, device)
    with pytest.raises(ValueError, match=r"expected positions of shape \[2, N, 3\], got \(3, 10, 3\)"):
        fused(torch.rand(3, 10, 3, device=device))


@pytest.mark.gpu
def test_default_config_matches_reference_on_gpu():
    """16 levels up to resolution 2048 with T = 2**19 (the training configuration), many points."""
    cfg = FieldConfig()
    reference, fused = twins(2, cfg, torch.device("cuda"))
    assert any(reference.dense) and not all(reference.dense)
    assert_twins_agree(reference, fused, random_points(2, 200_000, torch.device("cuda"), seed=7))
    reference.tables.grad = fused.tables.grad = None
    assert_twins_agree(reference, fused, random_points(1, 50_000, torch.device("cuda"), seed=8), prompts=slice(1, 2))


@pytest.mark.gpu
def test_default_config_jacobian_matches_reference_on_gpu():
    cfg = FieldConfig()
    reference, fused = twins(2, cfg, torch.device("cuda"))
    assert_twins_agree(reference, fused, random_points(2, 100_000, torch.device("cuda"), seed=10), jacobian=True)


@pytest.mark.gpu
@pytest.mark.parametrize("normals", ["finite_difference", "analytic"])
def test_default_config_field_matches_torch_backend_on_gpu(normals):
    """The training configuration (16 levels to R = 2048, T = 2**19, 64-wide MLP), many samples."""
    field_torch, field_triton = field_twins(FieldConfig(normals=normals), 2, torch.device("cuda"))
    x = (random_points(2, 20_000, torch.device("cuda"), seed=11) * 2.0 - 1.0) * 0.9
    assert_fields_agree(field_torch, field_triton, x)


@pytest.mark.gpu
def test_gpu_default_init_no_nan_and_fp32_output():
    fused = TritonHashGridEncoding(1, FieldConfig()).cuda()
    out = fused(torch.rand(1, 10_000, 3, device="cuda"))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_auto_backend_falls_back_to_pytorch_on_the_cpu(monkeypatch):
    """field.backend=auto: the fused encoding on CUDA, its PyTorch twin for CPU positions."""
    import dataclasses

    from dreamfusion_trt.field.hashgrid import HashGridEncoding
    from dreamfusion_trt.field.nerf import make_encoding

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = dataclasses.replace(SMALL, backend="auto")
    auto = make_encoding(2, cfg)
    reference = HashGridEncoding(2, cfg)
    reference.load_state_dict(auto.state_dict())
    x = random_points(2, 500, torch.device("cpu"))
    torch.testing.assert_close(auto(x), reference(x), rtol=0, atol=0)
