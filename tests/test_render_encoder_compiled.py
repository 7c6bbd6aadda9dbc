"""The distilled render encoder's compiled twin against the eager module, its fallback to eager
when the compiler fails, and ``train.compile_rgb_encoder`` choosing it.

The twin is compiled with the "aot_eager" backend: it traces forward and backward through AOT
autograd like inductor but runs the traced graphs eagerly, so it is quick to compile on a CPU.
Float32 throughout; the tolerances (rtol 1e-4, atol 1e-5 on values of order 0.1-1) hold
whatever the thread count, as a reordered float32 reduction differs by ~1e-7 of the scale.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from dreamfusion_trt.config import from_dict
from dreamfusion_trt.guidance import render_encoder as re_
from dreamfusion_trt.guidance.inputs import DistilledEncoding
from dreamfusion_trt.guidance.render_encoder import CompiledRenderEncoder, DistilledRenderEncoder, EncoderArch
from dreamfusion_trt.train.frozen import compiled_render_encoder, rgb_encoding

ENCODE = 64  # latents [n, 4, 8, 8]
WARNING = "the distilled render encoder did not compile"


def tiny_encoder(render_size: int, seed: int = 0) -> DistilledRenderEncoder:
    """A small encoder whose every layer contributes: the zero-initialised residual and head
    convolutions (which a fresh one has, so only its colour path would be exercised) get noise."""
    torch.manual_seed(seed)
    enc = DistilledRenderEncoder(EncoderArch(render_size, ENCODE, width=16, blocks=2))
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc.eval().requires_grad_(False)


def fwd_vjp(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    z = fn(x)
    (v,) = torch.autograd.grad(z, x, g)
    return z, v


def _bad_compile(error: str):
    """A stand-in for `compile_static` whose compiled function fails the way Inductor does, in
    the forward or, as AOT autograd lowers the backward lazily, in the first backward."""
    calls = []

    def failure() -> Exception:
        return torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("LoweringException: simulated\nmore"), None)

    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise failure()

    def compile_static(fn, backend="inductor", mode=None):
        def compiled(images):
            calls.append(images.shape)
            if error == "forward":
                raise failure()
            return FailingBackward.apply(fn(images))

        return compiled

    return compile_static, calls


# ---------------------------------------------------------------------------------------------
# the compiled twin


@pytest.mark.parametrize("render, n", [(16, 2), (24, 1)])  # stride-2 stage to the 8 x 8 grid; resize 24 -> 16 first, batch of one
def test_compiled_encoder_matches_the_eager_one_forward_and_backward(render, n):
    enc = tiny_encoder(render)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, render, render, generator=gen)
    g = torch.randn(n, 4, ENCODE // 8, ENCODE // 8, generator=gen)
    ref_z, ref_v = fwd_vjp(enc, x, g)
    graphs = counters["aot_autograd"]["total"]
    twin = CompiledRenderEncoder(enc, backend="aot_eager")
    z, v = fwd_vjp(twin, x, g)
    assert z.grad_fn.name() == "CompiledFunctionBackward"  # forward and backward ran as the compiled graph
    assert twin.compiled and twin.arch == enc.arch
    assert ref_v.abs().max() > 1e-2  # a gradient worth comparing
    torch.testing.assert_close(z, ref_z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v, ref_v, rtol=1e-4, atol=1e-5)
    # a second step at the same shape, from a non-leaf like a render, runs the same graphs
    torch.testing.assert_close(fwd_vjp(lambda i: twin(i * 1.0), x, g)[1], ref_v, rtol=1e-4, atol=1e-5)
    assert counters["aot_autograd"]["total"] - graphs == 1  # the first call's backward probe compiled nothing extra
    with torch.no_grad():
        torch.testing.assert_close(twin(x), ref_z.detach(), rtol=1e-4, atol=1e-5)


def test_compiled_encoder_keeps_the_shape_check_and_the_backend_check():
    twin = CompiledRenderEncoder(tiny_encoder(16), backend="aot_eager")
    with pytest.raises(ValueError, match=r"images must be \[n, 3, 16, 16\], got shape \(2, 3, 8, 8\)"):
        twin(torch.rand(2, 3, 8, 8))
    assert twin.compiled  # a wrong input is the caller's error, not a compiler failure
    with pytest.raises(ValueError, match="unknown torch.compile backend 'fast'"):
        CompiledRenderEncoder(tiny_encoder(16), backend="fast")


@pytest.mark.parametrize("error", ["forward", "backward"])
def test_a_compiler_failure_falls_back_to_the_eager_module_with_one_warning(error, monkeypatch, caplog):
    compile_static, calls = _bad_compile(error)
    monkeypatch.setattr(re_, "compile_static", compile_static)
    enc = tiny_encoder(16)
    twin = CompiledRenderEncoder(enc)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    g = torch.randn(2, 4, 8, 8, generator=gen)
    ref_z, ref_v = fwd_vjp(enc, x, g)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # the caller's backward never meets the failing compiled graph
            z, v = fwd_vjp(twin, x, g)
            torch.testing.assert_close(z, ref_z, rtol=0, atol=0)
            torch.testing.assert_close(v, ref_v, rtol=0, atol=0)
    warnings = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(warnings) == 1 and "LoweringException: simulated" in warnings[0], warnings
    assert calls == [(2, 3, 16, 16)] and not twin.compiled  # the compiler is not asked again


# ---------------------------------------------------------------------------------------------
# train.compile_rgb_encoder


@pytest.mark.parametrize("knob, device, compiled", [("auto", "cpu", False), ("auto", "cuda", True), ("on", "cpu", True),
                                                     ("off", "cuda", False)])  # fmt: skip
def test_compile_rgb_encoder_chooses_the_compiled_twin(knob, device, compiled, monkeypatch, tmp_path):
    enc = tiny_encoder(16)
    monkeypatch.setattr(re_, "load_or_fit", lambda *a, **k: (enc, {"parity": {"grad_cos_mean": 0.97}}))
    cfg = from_dict({"model": {"engines_dir": str(tmp_path)}, "camera": {"render_size": 16},
                     "train": {"rgb_encoder": "distilled", "compile_rgb_encoder": knob}})  # fmt: skip
    model = SimpleNamespace(vae=None, vae_scaling_factor=1.0, key="tiny", device=torch.device(device))  # what rgb_encoding reads
    strategy = rgb_encoding(model, cfg, None, ENCODE, (4, 8, 8))
    assert isinstance(strategy, DistilledEncoding)
    if compiled:
        assert isinstance(strategy.encoder, CompiledRenderEncoder) and strategy.encoder.encoder is enc
    else:
        assert strategy.encoder is enc
    with pytest.raises(ValueError, match="compile_rgb_encoder"):
        from_dict({"train": {"compile_rgb_encoder": "yes"}})


# ---------------------------------------------------------------------------------------------
# on the GPU, as the RGB phase runs it: fp32 weights under the trainer's fp16 autocast


@pytest.mark.gpu
def test_inductor_compiled_encoder_matches_the_eager_one_under_autocast_on_gpu():
    enc = tiny_encoder(64).cuda()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 64, 64, generator=gen).cuda()
    g = torch.randn(1, 4, ENCODE // 8, ENCODE // 8, generator=gen).cuda()
    twin = CompiledRenderEncoder(enc)  # inductor
    with torch.autocast("cuda", dtype=torch.float16):
        ref_z, ref_v = fwd_vjp(enc, x, g)
        z, v = fwd_vjp(twin, x, g)
        z2, v2 = fwd_vjp(twin, x, g)  # the second step runs the cached graphs
    assert twin.compiled and z.grad_fn.name() == "CompiledFunctionBackward"
    # fp16 activations on both sides, fused differently: within 2% of the largest value
    for got, ref in ((z, ref_z), (v, ref_v), (z2, ref_z), (v2, ref_v)):
        torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=2e-2 * float(ref.float().abs().max()))


def test_bench_train_and_the_trainer_share_the_knob():
    enc = tiny_encoder(16)
    on = from_dict({"train": {"compile_rgb_encoder": "on"}})
    assert isinstance(compiled_render_encoder(enc, on, torch.device("cpu")), CompiledRenderEncoder)
    assert compiled_render_encoder(enc, from_dict({}), torch.device("cpu")) is enc  # auto: eager on the CPU
