"""torch.compile and AOTInductor backends against the eager twin: on the CPU in fp32 (slow:
compiling takes tens of seconds on two cores), and on a GPU in fp16."""

import pytest
import torch
from tiny_sd import make_tiny_sd_folder

from dreamfusion_trt.engines.backends import load_network
from dreamfusion_trt.engines.build import build_engines
from dreamfusion_trt.engines.eager import EagerNoisePredictor
from dreamfusion_trt.engines.inductor import aoti_compile, aoti_load, compile_network
from dreamfusion_trt.engines.spec import AxisRange, NetworkSpec, TensorSpec, make_spec
from dreamfusion_trt.engines.wrappers import wrap_network
from dreamfusion_trt.sdmodel import load_diffusion


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd") / "folder")


def _unet_inputs(model, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen).to(model.device, model.dtype)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(model.device)
    e = torch.randn(batch, 77, 32, generator=gen).to(model.device, model.dtype)
    return x, t, e


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def test_compile_mode_is_checked(folder):
    model = load_diffusion(str(folder), device="cpu", dtype="float32")
    spec = make_spec(model, "unet", [2])
    with pytest.raises(ValueError, match="unknown torch.compile mode 'fastest'"):
        compile_network(wrap_network(model, "unet"), spec, mode="fastest")
    with pytest.raises(ValueError, match=r"must end in \.pt2"):
        aoti_compile(wrap_network(model, "unet"), spec, "unet.so")
    with pytest.raises(FileNotFoundError, match="AOTInductor package not found"):
        aoti_load("missing.pt2", "cpu")


@pytest.mark.slow
def test_inductor_matches_eager_on_cpu_at_smaller_batches_too(folder):
    """Warmed up for 2 prompts (UNet batch 4), as a run of K = 2 slots builds it; when only one
    slot is busy it is called at batch 2, which compiles on first use instead of being refused
    ("batch size 2 is outside the engine's range [4, 4]")."""
    model = load_diffusion(str(folder), device="cpu", dtype="float32")
    eager = EagerNoisePredictor(model.unet)
    compiled = load_network("unet", model, "inductor", batch_sizes=(4,), compile_mode="default")
    assert compiled.name == "inductor" and compiled.spec.batch == AxisRange(2, 4, 4)
    for batch in (4, 2):
        x, t, e = _unet_inputs(model, batch, seed=batch)
        ref = eager(x, t, e)
        got = compiled(x, t, e)  # long timesteps are converted to the spec's fp32
        assert got.dtype == ref.dtype
        # fp32 on both sides; only the order of the compiled reductions differs
        assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    with pytest.raises(ValueError, match=r"batch size 6 is outside the engine's range \[2, 4\]"):
        compiled(*_unet_inputs(model, 6))


class _Double(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x):
        return x * self.w


def test_compiled_runner_compiles_every_batch_of_its_range_past_the_recompile_limit(monkeypatch):
    """dynamo stops recompiling a function after `recompile_limit` (8) shapes and runs it
    eagerly from then on, without an error; the runner lifts the limit while a new batch
    compiles, so all 10 batches of [1, 10] get their own graph. (dynamo's "eager" backend
    stands in for Inductor: the limit is dynamo's, and it keeps the test fast.)"""
    from torch._dynamo.utils import counters

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, mode, dynamic: real(m, backend="eager", dynamic=dynamic))
    spec = NetworkSpec("double", (TensorSpec("x", torch.float32, ("B", 3)),), (TensorSpec("y", torch.float32, ("B", 3)),),
                       (("B", AxisRange(1, 10, 10)),), torch.float32)  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    run = compile_network(_Double(), spec, mode="default", batch_sizes=(10,))
    for b in range(1, 11):
        x = torch.arange(3 * b, dtype=torch.float32).view(b, 3)
        torch.testing.assert_close(run(x), 2 * x)
    assert counters["stats"]["unique_graphs"] == 10


@pytest.mark.slow
def test_aotinductor_package_round_trip_on_cpu(folder, tmp_path, caplog):
    model = load_diffusion(str(folder), device="cpu", dtype="float32")
    report = build_engines(model, tmp_path, batch_sizes=[2, 4], networks=["unet"], backends=["aotinductor"],
                           aoti_configs={"aot_inductor.compile_wrapper_opt_level": "O0"})  # fmt: skip
    assert [(i.backend, i.status) for i in report.items] == [("aotinductor", "built")]
    package = report.folder / report.items[0].file
    assert package.suffix == ".pt2" and ".b2-4-4.torch" in package.name and package.name.endswith(".cpu.pt2")

    # loaded without recompiling, through the registry; the batch range [2, 4] is dynamic
    predictor = load_network("unet", model, "aotinductor", tmp_path, batch_sizes=(2, 4))
    eager = EagerNoisePredictor(model.unet)
    for batch in (2, 3, 4):
        x, t, e = _unet_inputs(model, batch, seed=batch)
        ref = eager(x, t, e)
        assert (predictor(x, t, e) - ref).abs().max() < 1e-4 * ref.abs().max()
    with pytest.raises(ValueError, match="batch size 6 is outside"):
        predictor(*_unet_inputs(model, 6))

    # auto picks the package when there is one; a second build does nothing
    caplog.set_level("INFO", logger="dreamfusion_trt.engines.backends")
    assert load_network("unet", model, "auto", tmp_path, batch_sizes=(2,)).name == "aotinductor"
    assert "backend auto -> aotinductor" in caplog.text
    again = build_engines(model, tmp_path, batch_sizes=[2, 4], networks=["unet"], backends=["aotinductor"])
    assert [i.status for i in again.items] == ["up to date"]
    with pytest.raises(FileNotFoundError, match="no aotinductor file for vae_decoder"):
        load_network("vae_decoder", model, "aotinductor", tmp_path)


# ---------------------------------------------------------------------------------------------
# GPU, fp16 (run on the lent GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # max-autotune: see the benchmark
def test_inductor_fp16_matches_eager_on_gpu(folder, mode):
    model = load_diffusion(str(folder), device="cuda", dtype="float16")
    eager = EagerNoisePredictor(model.unet)
    x, t, e = _unet_inputs(model, 4)
    ref = eager(x, t, e).clone()
    # warmed up at batch 4 only, as a run of two slots builds it
    predictor = load_network("unet", model, "inductor", batch_sizes=(4,), compile_mode=mode)
    got = predictor(x, t, e).clone()
    assert not got.isnan().any()
    assert _cosine(got, ref) >= 0.999
    # one busy slot: batch 2 compiles (and, with CUDA graphs, records) on first use, and equals
    # the matching rows of the larger batch
    for _ in range(3):
        small = predictor(x[:2], t[:2], e[:2]).clone()
    assert _cosine(small, got[:2]) >= 0.999


@pytest.mark.gpu
def test_aotinductor_fp16_matches_eager_on_gpu(folder, tmp_path):
    model = load_diffusion(str(folder), device="cuda", dtype="float16")
    report = build_engines(model, tmp_path, batch_sizes=[2, 8], networks=["unet", "vae_decoder"], backends=["aotinductor"])
    assert {i.status for i in report.items} == {"built"}, report.summary()
    predictor = load_network("unet", model, "aotinductor", tmp_path, batch_sizes=(2, 8))
    x, t, e = _unet_inputs(model, 8)
    assert _cosine(predictor(x, t, e), EagerNoisePredictor(model.unet)(x, t, e)) >= 0.999
    decoder = load_network("vae_decoder", model, "aotinductor", tmp_path, batch_sizes=(1, 4))
    z = torch.randn(4, 4, 8, 8, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = wrap_network(model, "vae_decoder")(z)
    assert _cosine(decoder(z), ref) >= 0.999


def test_aoti_smoke_check_reports_a_package_that_cannot_run(tmp_path):
    from dreamfusion_trt.engines.inductor import aoti_smoke_check

    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"not a package")
    reason = aoti_smoke_check(broken, {"sample": torch.zeros(2, 4, 8, 8)}, timeout_s=120)
    assert reason is not None and reason.startswith("its first call failed")
