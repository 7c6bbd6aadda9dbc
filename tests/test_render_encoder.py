"""The distilled render encoder against the tiny VAE, its storage, and the compiled VAE twin.

Everything runs on the CPU in fp32 with one thread (the fit is a few hundred small steps; one
thread keeps it from fighting other processes for the cores, and keeps it deterministic).
Tolerances: the compiled encoder reorders float32 reductions (group norms, attention), so it
matches the eager one to ~1e-6 of the output's scale, not bit for bit; 1e-4 of the scale leaves
two orders of magnitude.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny_sd import _perturb_

from dreamfusion_trt.engines.eager import EagerImageEncoder
from dreamfusion_trt.guidance import render_encoder as re_
from dreamfusion_trt.guidance.latents import encode_rgb
from dreamfusion_trt.guidance.render_encoder import (
    DistilledRenderEncoder,
    EncoderArch,
    FitOptions,
    ParityThreshold,
    encoder_filename,
    load_or_fit,
    load_render_encoder,
    save_render_encoder,
)
from dreamfusion_trt.guidance.render_encoder_data import SHADINGS, make_images
from dreamfusion_trt.guidance.vae_encode import (
    CompiledImageEncoder,
    TinyVaeImageEncoder,
)

RENDER, ENCODE = 16, 64  # the teacher upsamples 16 -> 64; the prior's VAE makes 16 x 16 latents of that
KEY = "tiny-render-encoder-test"
TINY_OPTIONS = FitOptions(steps=150, batch=12, train_images=64, eval_images=24, width=32, blocks=2,
                          teacher_batch=16, render_samples=24, lr=3e-3, seed=0)  # fmt: skip
# Measured with TINY_OPTIONS against the prior's VAE: latent rel. error 0.227 (p95 0.342),
# gradient cosine mean 0.909, 5th percentile 0.817. The bounds leave room below that.
TINY_THRESHOLD = ParityThreshold(max_latent_rel_err_mean=0.3, min_grad_cos_mean=0.8, min_grad_cos_p5=0.6)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae(seed: int = 0):
    """The tiny SD VAE of tests/tiny_sd.py (4 levels, so images are 8x the latents), random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
    )  # fmt: skip
    _perturb_(vae, seed * 10 + 1)
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def trained_vae():
    """The built-in prior's trained VAE (3 levels: 64 x 64 images -> 16 x 16 latents), shipped with
    the package. The fit is checked against trained weights: a random VAE's group norms blow
    sub-pixel differences up to O(1) features (flat-colour images give latents as varied as any
    image's), which no small network, and no SD VAE, reproduces."""
    from diffusers import AutoencoderKL

    from dreamfusion_trt.prior import WEIGHTS_DIR

    return AutoencoderKL.from_pretrained(WEIGHTS_DIR / "vae").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def fitted(trained_vae):
    return re_.fit_render_encoder(trained_vae, trained_vae.config.scaling_factor, RENDER, ENCODE, options=TINY_OPTIONS)


# ---------------------------------------------------------------------------------------------
# the network and its fit


def test_encoder_maps_renders_to_latents_and_passes_gradients():
    enc = DistilledRenderEncoder(EncoderArch(RENDER, ENCODE, width=16, blocks=1)).requires_grad_(False)
    x = torch.rand(3, 3, RENDER, RENDER, requires_grad=True)
    z = enc(x)
    assert z.shape == (3, 4, ENCODE // 8, ENCODE // 8)
    (g,) = torch.autograd.grad(z.square().sum(), x)
    assert g.abs().sum() > 0
    # batch of one equals the matching row of a larger batch (group norms are per image)
    torch.testing.assert_close(enc(x[1:2]), z[1:2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"images must be \[n, 3, 16, 16\], got shape \(3, 3, 32, 32\)"):
        enc(torch.rand(3, 3, 32, 32))
    # a render larger than the latent grid by a non-power of two is resized first
    odd = DistilledRenderEncoder(EncoderArch(24, ENCODE, width=16, blocks=1))
    assert odd(torch.rand(2, 3, 24, 24)).shape == (2, 4, 8, 8)
    up = DistilledRenderEncoder(EncoderArch(4, ENCODE, width=16, blocks=1))  # render smaller than the latents
    assert up(torch.rand(2, 3, 4, 4)).shape == (2, 4, 8, 8)


def test_training_images_cover_renders_and_procedural_pictures():
    x = make_images(10, 16, seed=3, device="cpu", source="mixed", num_samples=12)
    assert x.shape == (10, 3, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    torch.testing.assert_close(x, make_images(10, 16, seed=3, device="cpu", source="mixed", num_samples=12))
    assert not torch.equal(x, make_images(10, 16, seed=4, device="cpu", source="mixed", num_samples=12))
    assert x.flatten(1).std(dim=1).min() > 0.005  # no blank images
    assert len(SHADINGS) == 4
    with pytest.raises(ValueError, match="image source must be 'renders' or 'mixed', got 'photos'"):
        make_images(2, 16, seed=0, device="cpu", source="photos")


def test_fit_schedule_and_draws_are_the_recipe_s():
    """The fit's own learning-rate schedule is the warm-up + cosine LambdaLR it replaced, step by
    step, and its up-front draws are the per-step draws of one generator in the same order."""
    steps, base = 200, 2e-3
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: re_.lr_factor(s, steps))
    for s in range(steps):
        assert opt.param_groups[0]["lr"] == base * re_.lr_factor(s, steps)
        opt.step()
        sched.step()
    assert re_.lr_factor(0, steps) == pytest.approx(0.1) and re_.lr_factor(steps, steps) == pytest.approx(0.0)
    options = FitOptions(steps=5, batch=3, cotangents_per_image=2)
    idx, coeff = re_.fit_draws(options, 50, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    for s in range(5):
        assert torch.equal(idx[s], torch.randint(0, 50, (3,), generator=gen))
        assert torch.equal(coeff[s], torch.randn(3, 2, generator=gen) / 2**0.5)
    assert re_.fit_graph_choice(FitOptions(), torch.device("cpu")) is False
    with pytest.raises(ValueError, match="cuda_graph='on' needs CUDA, got cpu"):
        re_.fit_graph_choice(FitOptions(cuda_graph="on"), torch.device("cpu"))


def test_bf16_nhwc_fit_steps_track_the_fp32_ones():
    """bfloat16 autocast and NHWC change how the student's steps run, not what they fit: from the
    same student and draws, 30 steps of each reach losses within a few percent of fp32's."""
    gen = torch.Generator().manual_seed(0)
    n, m = 24, 2
    train = re_.TeacherTargets(torch.rand(n, 3, RENDER, RENDER, generator=gen), torch.randn(n, 4, 8, 8, generator=gen),
                               torch.randn(n, m, 4, 8, 8, generator=gen), torch.randn(n, m, 3, RENDER, RENDER, generator=gen))  # fmt: skip
    base = replace(TINY_OPTIONS, steps=30, batch=6, width=16, blocks=1)
    idx, coeff = re_.fit_draws(base, n, gen)
    losses = {}
    for name, options in {"fp32": base, "bf16": replace(base, precision="bf16", channels_last=True)}.items():
        torch.manual_seed(0)
        fit = re_.FitStep(DistilledRenderEncoder(EncoderArch(RENDER, ENCODE, width=16, blocks=1)), train, options)
        assert fit.amp == (name == "bf16")
        first = None
        for s in range(options.steps):
            fit(s, idx[s], coeff[s])
            first = first if first is not None else float(fit.out_loss + fit.vjp_loss)
        losses[name] = (first, float(fit.out_loss + fit.vjp_loss))
    assert losses["fp32"][1] < 0.9 * losses["fp32"][0]  # the steps fit something
    assert losses["bf16"][1] == pytest.approx(losses["fp32"][1], rel=0.05), losses
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):
        re_.FitStep(DistilledRenderEncoder(EncoderArch(RENDER, ENCODE, width=16, blocks=1)), train, replace(base, precision="fp16"))


def test_fit_reaches_parity_with_the_trained_vae(trained_vae, fitted):
    encoder, report = fitted
    p = report.parity
    assert p["images"] == TINY_OPTIONS.eval_images and p["gradients"] == TINY_OPTIONS.eval_images
    assert encoder.arch.latent_size == 16 and encoder.work_size == RENDER
    assert TINY_THRESHOLD.failures(p) == [], p
    # The fit matters: the colour path alone (the least-squares colour -> latent map the fit
    # starts from) falls short of the threshold.
    teacher = re_.vae_teacher(trained_vae, trained_vae.config.scaling_factor, ENCODE)
    held = re_.teacher_targets(teacher, make_images(16, RENDER, 99, "cpu", "renders", 24), 1,
                               torch.Generator().manual_seed(5), 16)  # fmt: skip
    colour_only = lambda x: encoder.colour(x * 2 - 1)
    baseline = re_.measure_parity(colour_only, held)
    assert TINY_THRESHOLD.failures(baseline), baseline
    again = re_.measure_parity(encoder, held)  # other held-out renders: the same league
    assert again["grad_cos_mean"] > baseline["grad_cos_mean"] + 0.2
    assert again["latent_rel_err_mean"] < baseline["latent_rel_err_mean"]


def test_threshold_failures_name_the_number():
    t = ParityThreshold(max_latent_rel_err_mean=0.1, min_grad_cos_mean=0.9, min_grad_cos_p5=0.8)
    ok = {"latent_rel_err_mean": 0.05, "grad_cos_mean": 0.95, "grad_cos_p5": 0.85}
    assert t.failures(ok) == []
    bad = t.failures({**ok, "grad_cos_p5": 0.5, "latent_rel_err_mean": float("nan")})
    assert bad == ["latent_rel_err_mean = nan is above the threshold 0.1", "grad_cos_p5 = 0.5 is below the threshold 0.8"]
    assert t.failures({}) == ["latent_rel_err_mean missing", "grad_cos_mean missing", "grad_cos_p5 missing"]


# ---------------------------------------------------------------------------------------------
# storage


def test_save_load_round_trip_and_manifest_entry(fitted, tmp_path):
    encoder, report = fitted
    path = save_render_encoder(encoder, report, tmp_path, KEY)
    assert path == tmp_path / KEY / encoder_filename(RENDER, ENCODE) == tmp_path / KEY / "render_encoder.r16e64.v1.safetensors"
    manifest = json.loads((tmp_path / KEY / "manifest.json").read_text())
    entry = manifest["files"][path.name]
    assert manifest["model_key"] == KEY
    assert (entry["backend"], entry["network"], entry["render_size"], entry["encode_size"]) == ("distilled", "render_encoder", 16, 64)
    assert entry["recipe_version"] == re_.RECIPE_VERSION and entry["parity"] == report.parity
    assert entry["sha256"] == re_.sha256_file(path)
    assert path.read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # not a pickle: safetensors starts with its header length
    loaded, got_entry = load_render_encoder(tmp_path, KEY, RENDER, ENCODE, threshold=TINY_THRESHOLD)
    assert got_entry == entry and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(4, 3, RENDER, RENDER)
    torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)


def test_loader_refuses_a_changed_file_and_a_missing_one(fitted, tmp_path):
    encoder, report = fitted
    path = save_render_encoder(encoder, report, tmp_path, KEY)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one weight byte
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 of render encoder '.*render_encoder\.r16e64\.v1\.safetensors' differs"):
        load_render_encoder(tmp_path, KEY, RENDER, ENCODE, threshold=TINY_THRESHOLD)
    with pytest.raises(FileNotFoundError, match=r"no render encoder 'render_encoder\.r32e64\.v1\.safetensors' is recorded"):
        load_render_encoder(tmp_path, KEY, 32, ENCODE, threshold=TINY_THRESHOLD)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="is in the manifest but the file is missing"):
        load_render_encoder(tmp_path, KEY, RENDER, ENCODE, threshold=TINY_THRESHOLD)


def test_loader_refuses_parity_below_the_threshold(fitted, tmp_path, monkeypatch):
    encoder, report = fitted
    save_render_encoder(encoder, report, tmp_path, KEY)
    strict = replace(TINY_THRESHOLD, min_grad_cos_p5=0.9999)
    want = rf"below the parity threshold: grad_cos_p5 = {report.parity['grad_cos_p5']!r} is below the threshold 0.9999"
    with pytest.raises(re_.BelowThresholdError, match=want.replace(".", r"\.")):
        load_render_encoder(tmp_path, KEY, RENDER, ENCODE, threshold=strict)
    # load_or_fit does not refit an intact encoder of this recipe that fails: same recipe, same fit
    monkeypatch.setattr(re_, "fit_render_encoder", lambda *a, **k: pytest.fail("refitted a failing encoder"))
    with pytest.raises(re_.BelowThresholdError, match="below the parity threshold"):
        load_or_fit(None, 0.18215, KEY, tmp_path, RENDER, ENCODE, threshold=strict)


def test_load_or_fit_loads_an_intact_encoder_and_refits_a_changed_one(fitted, tmp_path, monkeypatch, caplog):
    encoder, report = fitted
    calls = []

    def fake_fit(vae, scaling, render_size, encode_size, **kwargs):
        calls.append((render_size, encode_size))
        return encoder, report

    monkeypatch.setattr(re_, "fit_render_encoder", fake_fit)
    caplog.set_level("INFO", logger=re_.__name__)
    first, _ = load_or_fit(None, 0.18215, KEY, tmp_path, RENDER, ENCODE, threshold=TINY_THRESHOLD, progress=False)
    assert calls == [(RENDER, ENCODE)] and "fitting a render encoder for tiny-render-encoder-test" in caplog.text
    second, _ = load_or_fit(None, 0.18215, KEY, tmp_path, RENDER, ENCODE, threshold=TINY_THRESHOLD, progress=False)
    assert calls == [(RENDER, ENCODE)]  # loaded, not refitted
    x = torch.rand(2, 3, RENDER, RENDER)
    torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)
    path = tmp_path / KEY / encoder_filename(RENDER, ENCODE)
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    load_or_fit(None, 0.18215, KEY, tmp_path, RENDER, ENCODE, threshold=TINY_THRESHOLD, progress=False)
    assert len(calls) == 2 and "differs from the manifest" in caplog.text


# ---------------------------------------------------------------------------------------------
# the full VAE's fast twin, and TAESD


def _fwd_vjp(fn, x, g):
    x = x.clone().requires_grad_(True)
    z = fn(x)
    (v,) = torch.autograd.grad(z, x, g)
    return z.detach(), v


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_vae_encoder_matches_the_eager_one_forward_and_backward(vae, backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, RENDER, RENDER, generator=gen)
    g = torch.randn(2, 4, 8, 8, generator=gen)
    eager = EagerImageEncoder(vae, vae.config.scaling_factor)
    ref_z, ref_v = _fwd_vjp(lambda i: encode_rgb(i, eager, ENCODE), x, g)
    compiled = CompiledImageEncoder(vae, vae.config.scaling_factor, backend=backend)
    z, v = _fwd_vjp(lambda i: encode_rgb(i, compiled, ENCODE), x, g)
    torch.testing.assert_close(z, ref_z, rtol=0, atol=1e-4 * float(ref_z.abs().max()))
    torch.testing.assert_close(v, ref_v, rtol=0, atol=1e-4 * float(ref_v.abs().max()))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\], got shape \(2, 4, 64, 64\)"):
        compiled(torch.rand(2, 4, 64, 64))
    with pytest.raises(ValueError, match="unknown torch.compile backend 'fast'"):
        CompiledImageEncoder(vae, 1.0, backend="fast")


def test_taesd_encoder_fits_the_same_interface():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).eval().requires_grad_(False)  # fmt: skip
    enc = TinyVaeImageEncoder(taesd)
    x = torch.rand(2, 3, RENDER, RENDER, requires_grad=True)
    z = encode_rgb(x, enc, ENCODE)
    assert z.shape == (2, 4, 8, 8)
    (g,) = torch.autograd.grad(z.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.gpu
def test_compiled_vae_encoder_fp16_matches_the_eager_one_on_gpu():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, RENDER, RENDER, generator=gen).cuda()
    g = torch.randn(2, 4, 8, 8, generator=gen).cuda()
    ref_vae, vae = tiny_vae().cuda().half(), tiny_vae().cuda().half()  # compiling switches `vae` to channels_last / SDPA
    ref_z, ref_v = _fwd_vjp(lambda i: encode_rgb(i, EagerImageEncoder(ref_vae, 0.18215), ENCODE), x, g)
    z, v = _fwd_vjp(lambda i: encode_rgb(i, CompiledImageEncoder(vae, 0.18215), ENCODE), x, g)
    # fp16 activations: a few units in the last place of the largest values
    torch.testing.assert_close(z, ref_z, rtol=0, atol=2e-2 * float(ref_z.abs().max()))
    torch.testing.assert_close(v, ref_v, rtol=0, atol=2e-2 * float(ref_v.abs().max()))


@pytest.mark.gpu
def test_graphed_fit_steps_match_eager_fit_steps_on_gpu():
    """The fit's CUDA graph (3 warm-up steps, a capture, replays) against eager steps from the same
    student and draws: same parameters after 8 steps, up to cuDNN's choice of algorithms."""
    gen = torch.Generator().manual_seed(0)
    n, m, options = 24, 2, replace(TINY_OPTIONS, steps=8, batch=6, width=16, blocks=1)
    train = re_.TeacherTargets(torch.rand(n, 3, RENDER, RENDER, generator=gen).cuda(), torch.randn(n, 4, 8, 8, generator=gen).cuda(),
                               torch.randn(n, m, 4, 8, 8, generator=gen).cuda(),
                               torch.randn(n, m, 3, RENDER, RENDER, generator=gen).cuda())  # fmt: skip
    idx, coeff = (t.cuda() for t in re_.fit_draws(options, n, gen))
    params = []
    for graphed in (False, True):
        torch.manual_seed(0)
        student = DistilledRenderEncoder(EncoderArch(RENDER, ENCODE, width=16, blocks=1)).cuda()
        fit = re_.FitStep(student, train, options, capturable=graphed)
        runner = re_.GraphedFitStep(fit) if graphed else fit
        for s in range(options.steps):
            runner(s, idx[s], coeff[s])
        if graphed:
            assert runner.graph is not None and not runner.failed
        torch.cuda.synchronize()
        params.append([p.detach().clone() for p in student.parameters()])
    for eager, graph in zip(*params):
        torch.testing.assert_close(graph, eager, rtol=1e-3, atol=1e-5)
