"""The fused Triton hash grid against its slow twin, the PyTorch `HashGridEncoding`.

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


def assert_twins_agree(reference, fused, x, prompts=None, seed: int = 1) -> None:
    """Same features and same table gradients for an arbitrary upstream gradient."""
    expected = reference(x, prompts)
    actual = fused(x, prompts)
    assert actual.shape == expected.shape == (x.shape[0], x.shape[1], reference.output_dim)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
    expected.backward(grad)
    actual.backward(grad)
    torch.testing.assert_close(fused.tables.grad, reference.tables.grad, rtol=1e-5, atol=1e-4)
    assert reference.tables.grad.abs().sum() > 0


def test_forward_and_table_gradients_match_reference(device):
    reference, fused = twins(2, SMALL, device)
    assert reference.dense == [True, True, False, False]
    assert_twins_agree(reference, fused, random_points(2, 1500, device))


def test_prompt_slice_touches_only_its_tables(device):
    reference, fused = twins(3, SMALL, device)
    x = random_points(2, 700, device, seed=3)
    assert_twins_agree(reference, fused, x, prompts=slice(1, 3))
    assert fused.tables.grad[0].abs().sum() == 0
    # The slice's prompt 0 is the module's prompt 1: same result as encoding it alone.
    torch.testing.assert_close(fused(x[:1], slice(1, 2)), fused(x, slice(1, 3))[:1], rtol=0, atol=0)


@pytest.mark.parametrize("level_dim", [1, 3])
def test_level_dims_that_are_not_two(device, level_dim):
    cfg = dataclasses.replace(SMALL, level_dim=level_dim, num_levels=3)
    reference, fused = twins(2, cfg, device)
    assert_twins_agree(reference, fused, random_points(2, 300, device, seed=level_dim))


def test_positions_with_grad_take_the_reference_path(device):
    reference, fused = twins(1, SMALL, device)
    x_ref = random_points(1, 200, device, seed=5).requires_grad_(True)
    x_fused = x_ref.detach().clone().requires_grad_(True)
    reference(x_ref).square().sum().backward()
    fused(x_fused).square().sum().backward()
    assert x_fused.grad is not None and x_fused.grad.abs().sum() > 0
    torch.testing.assert_close(x_fused.grad, x_ref.grad)
    torch.testing.assert_close(fused.tables.grad, reference.tables.grad)


def test_no_grad_and_empty_batch(device):
    reference, fused = twins(2, SMALL, device)
    x = random_points(2, 100, device)
    with torch.no_grad():
        out = fused(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference(x).detach(), rtol=1e-5, atol=1e-5)
    assert fused(x[:, :0]).shape == (2, 0, reference.output_dim)


def test_nerf_field_with_triton_backend_matches_torch_backend(device):
    cfg_torch = dataclasses.replace(SMALL, hidden_dim=16, num_layers=2, backend="torch")
    torch.manual_seed(0)
    field_torch = NeRFField(cfg_torch, num_prompts=2).to(device)
    field_triton = NeRFField(dataclasses.replace(cfg_torch, backend="triton"), num_prompts=2).to(device)
    assert isinstance(field_triton.encoding, TritonHashGridEncoding)
    field_triton.load_state_dict(field_torch.state_dict())  # checkpoints interchange both ways
    x = (random_points(2, 64, device) * 2.0 - 1.0) * cfg_torch.bound
    out_torch = field_torch.query(x, with_normals=True)  # finite differences: the fused path
    out_triton = field_triton.query(x, with_normals=True)
    torch.testing.assert_close(out_triton.sigma, out_torch.sigma, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_triton.normal, out_torch.normal, rtol=1e-3, atol=1e-3)


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
