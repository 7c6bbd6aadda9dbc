"""SDS math against hand-computed values, and the two ways a render becomes latents."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.config import SDSConfig
from dreamfusion_trt.engines.eager import EagerImageEncoder, EagerNoisePredictor
from dreamfusion_trt.guidance.latents import LinearLatentMap, encode_rgb, fit_rgb_to_latent
from dreamfusion_trt.guidance.sds import RenderPart, SDSGuidance, sds_surrogate, sds_weight
from dreamfusion_trt.sdmodel import load_diffusion

K, C, H, W, D = 3, 4, 8, 8, 32


@pytest.fixture(scope="module")
def model(tiny_sd_paths):
    return load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="auto")


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class RecordingPredictor:
    """A NoisePredictor whose output depends on all three inputs, recording every call."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, emb):
        self.calls.append((x.clone(), t.clone(), emb.clone()))
        return self.eps(x, t, emb)

    @staticmethod
    def eps(x, t, emb):
        return 0.3 * x + 1e-3 * t.view(-1, 1, 1, 1).to(x.dtype) + emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(K, C, H, W, generator=gen).requires_grad_(True)
    cond = torch.randn(K, 77, D, generator=gen)
    uncond = torch.randn(K, 77, D, generator=gen)
    return latents, cond, uncond


class Identity:
    """A latent-space render strategy that hands its input through (the test's latents)."""

    space = "latent"

    def __init__(self, shape):
        self.render_size, self.latent_shape = shape[-1], shape

    def __call__(self, images):
        return images


def _guidance(pred, ac, cfg, shape=(C, H, W)):
    return SDSGuidance(pred, ac, cfg, {"latent": Identity(shape), "rgb": Identity(shape)})


def _one_part(latents, phase="latent"):
    k = latents.shape[0]
    return [RenderPart(phase, latents, torch.arange(k), list(range(k)))]


def test_sds_loss_gradient_is_exactly_grad():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16):
        latents = (100 * torch.randn(2, 4, 16, 16, generator=gen)).to(dtype).requires_grad_(True)
        grad = (1e-3 * torch.randn(2, 4, 16, 16, generator=gen)).to(dtype)
        loss = sds_surrogate(latents, grad).sum()
        loss.backward()
        assert latents.grad.dtype == dtype
        assert torch.equal(latents.grad, grad)
        assert loss.item() == pytest.approx(0.5 * grad.double().square().sum().item(), rel=1e-5)


def test_sds_matches_hand_computed_cfg():
    ac = sd_alphas_cumprod()
    cfg = SDSConfig(guidance_scale=7.5, weighting="one_minus_alpha")
    pred = RecordingPredictor()
    sds = _guidance(pred, ac, cfg)
    latents, cond, uncond = inputs()
    gen = torch.Generator().manual_seed(7)
    t = torch.randint(20, 981, (K,), generator=gen)
    noise = torch.randn(K, C, H, W, generator=gen)
    loss = sds(_one_part(latents), t, list(noise[:, None]), cond, uncond)  # [K]
    a = ac[t].view(K, 1, 1, 1)
    x_t = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
    assert len(pred.calls) == 1
    x_in, t_in, emb_in = pred.calls[0]
    assert x_in.shape == (2 * K, C, H, W)
    torch.testing.assert_close(x_in[:K], x_t)
    torch.testing.assert_close(x_in[K:], x_t)
    assert torch.equal(t_in, torch.cat([t, t]))
    assert torch.equal(emb_in[:K], uncond) and torch.equal(emb_in[K:], cond)  # uncond first
    eps_u = RecordingPredictor.eps(x_t, t, uncond)
    eps_c = RecordingPredictor.eps(x_t, t, cond)
    eps_hat = eps_u + 7.5 * (eps_c - eps_u)
    grad, got_eps_hat = sds.grad(latents, t, noise, cond, uncond)
    torch.testing.assert_close(got_eps_hat, eps_hat)
    torch.testing.assert_close(grad, (1 - a) * (eps_hat - noise))
    assert not grad.requires_grad
    assert loss.shape == (K,)
    torch.testing.assert_close(loss.detach(), 0.5 * grad.square().flatten(1).sum(1))
    loss.sum().backward()
    torch.testing.assert_close(latents.grad, grad, rtol=0, atol=0)


def test_high_noise_guidance_applies_above_its_timestep_only():
    """sds.high_noise_guidance_scale: prompts whose t is above high_noise_t get that scale, the
    others guidance_scale, in one predictor call; each row equals a run at its own scale."""
    ac = sd_alphas_cumprod()
    latents, cond, uncond = inputs()
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(K, C, H, W, generator=gen)
    t = torch.tensor([100, 900] * (K // 2) + [600] * (K % 2))  # 600 is not above round(0.6 * 1000)
    mixed = _guidance(RecordingPredictor(), ac, SDSConfig(guidance_scale=7.5, high_noise_guidance_scale=2.0, high_noise_t=0.6))
    scales = mixed.guidance_scales(t)
    assert torch.equal(scales, torch.where(t > 600, 2.0, 7.5).float())
    grad, eps_hat = mixed.grad(latents, t, noise, cond, uncond)
    for scale in (7.5, 2.0):
        alone = _guidance(RecordingPredictor(), ac, SDSConfig(guidance_scale=scale))
        g, e = alone.grad(latents, t, noise, cond, uncond)
        rows = scales == scale
        torch.testing.assert_close(grad[rows], g[rows])
        torch.testing.assert_close(eps_hat[rows], e[rows])
    assert _guidance(RecordingPredictor(), ac, SDSConfig(guidance_scale=7.5)).guidance_scales(t) == 7.5  # off: a float
    with pytest.raises(ValueError, match="high_noise_guidance_scale"):
        _guidance(RecordingPredictor(), ac, SDSConfig(high_noise_guidance_scale=-1.0))


def test_high_noise_colour_only_stops_the_geometry_gradient_above_its_timestep():
    """sds.high_noise_colour_only: prompts whose t is above high_noise_t get geometry_grad 0, the
    others 1; off, there is no geometry_grad at all (the renderer's plain path)."""
    ac = sd_alphas_cumprod()
    t = torch.tensor([100, 900, 600, 601])
    on = _guidance(RecordingPredictor(), ac, SDSConfig(high_noise_t=0.6, high_noise_colour_only=True))
    assert on.geometry_grad(t).tolist() == [1.0, 0.0, 1.0, 0.0] and on.geometry_grad(t).dtype == torch.float32
    assert _guidance(RecordingPredictor(), ac, SDSConfig(high_noise_t=0.6)).geometry_grad(t) is None


def test_a_high_noise_share_draws_that_share_of_steps_above_high_noise_t_whatever_the_schedule():
    """sds.high_noise_share: about that share of draws lands in (high_noise_t, high_noise_t_max]
    even late in an annealed schedule, the rest in the schedule's range; a share of 0 draws the
    same timesteps as before from the same generator state; bad shares and ranges are refused."""
    ac = sd_alphas_cumprod()
    cfg = SDSConfig(t_max=0.6, t_anneal="linear", t_max_final=0.3, high_noise_t=0.6, high_noise_t_max=0.98, high_noise_share=0.25)
    sds = _guidance(RecordingPredictor(), ac, cfg)
    assert sds.high_noise_range() == (601, 980)
    gen = torch.Generator().manual_seed(0)
    ts = torch.cat([sds.sample_t(0.9, gen, torch.device("cpu")) for _ in range(2000)])
    lo, hi = sds.t_range(0.9)
    high = ts > 600
    assert 0.21 < float(high.float().mean()) < 0.29
    assert int(ts[high].min()) >= 601 and int(ts[high].max()) <= 980
    assert int(ts[~high].min()) >= lo and int(ts[~high].max()) <= hi
    plain = _guidance(RecordingPredictor(), ac, SDSConfig(t_max=0.6))
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    off = [plain.sample_t(0.5, a, torch.device("cpu")) for _ in range(20)]
    ref = [torch.randint(*(lambda r: (r[0], r[1] + 1))(plain.t_range(0.5)), (1,), generator=b) for _ in range(20)]
    assert torch.equal(torch.cat(off), torch.cat(ref))
    for bad in (SDSConfig(high_noise_share=1.5), SDSConfig(high_noise_share=0.2, high_noise_t=0.6, high_noise_t_max=0.5)):
        with pytest.raises(ValueError, match="high_noise_share"):
            _guidance(RecordingPredictor(), ac, bad)


def test_phases_of_one_latent_shape_share_one_call_and_keep_their_slots():
    """Two render groups whose inputs have one shape go through the predictor once, in slot
    order; groups of different shapes get a call each. Each prompt's loss is what it gets alone."""
    ac = sd_alphas_cumprod()
    cfg = SDSConfig(guidance_scale=7.5)
    latents, cond, uncond = inputs()
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(20, 981, (K,), generator=gen)
    noise = list(torch.randn(K, 1, C, H, W, generator=gen))
    alone = torch.stack([_guidance(RecordingPredictor(), ac, cfg)(_one_part(latents[k : k + 1]), t[k : k + 1], [noise[k]],
                                                                   cond[k : k + 1], uncond[k : k + 1])[0] for k in range(K)])  # fmt: skip
    pred = RecordingPredictor()
    parts = [RenderPart("rgb", latents[[1]], torch.tensor([1]), [1]), RenderPart("latent", latents[[0, 2]], torch.tensor([0, 2]), [0, 2])]
    together = _guidance(pred, ac, cfg)(parts, t, noise, cond, uncond)
    assert len(pred.calls) == 1 and torch.equal(pred.calls[0][1][:K], t)  # one call, slot order
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    small = latents[[1], :, :4, :4]
    split = SDSGuidance(pred, ac, cfg, {"latent": Identity((C, H, W)), "rgb": Identity((C, 4, 4))})
    pred.calls.clear()
    parts[0] = RenderPart("rgb", small, torch.tensor([1]), [1])
    noise[1] = noise[1][..., :4, :4]
    loss = split(parts, t, noise, cond, uncond)
    assert len(pred.calls) == 2 and loss.shape == (K,)
    torch.testing.assert_close(loss[[0, 2]], alone[[0, 2]], rtol=1e-5, atol=1e-6)


def test_no_gradient_reaches_the_unet(model):
    unet = model.unet
    unet.requires_grad_(True)  # even if someone unfroze it, SDS must not build a graph through it
    try:
        sds = _guidance(EagerNoisePredictor(unet), model.alphas_cumprod, SDSConfig())
        latents, cond, uncond = inputs()
        t = torch.tensor([20, 500, 980])
        noise = torch.randn(K, C, H, W, generator=torch.Generator().manual_seed(0))
        sds(_one_part(latents), t, list(noise[:, None]), cond, uncond).sum().backward()
        assert all(p.grad is None for p in unet.parameters())
        grad, _ = sds.grad(latents.detach(), t, noise, cond, uncond)
        assert torch.equal(latents.grad, grad)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        unet.requires_grad_(False)


def test_nan_predictions_give_a_finite_gradient():
    class NaNPredictor:
        name = "nan"

        def __call__(self, x, t, emb):
            return torch.full_like(x, float("nan"))

    latents, cond, uncond = inputs()
    loss = _guidance(NaNPredictor(), sd_alphas_cumprod(), SDSConfig())(_one_part(latents), torch.full((K,), 500),
                                                                       list(torch.zeros(K, 1, C, H, W)), cond, uncond)  # fmt: skip
    loss.sum().backward()
    assert torch.isfinite(latents.grad).all() and torch.isfinite(loss).all()


def test_weightings():
    a = torch.tensor([0.25, 0.64])
    torch.testing.assert_close(sds_weight(a, "one_minus_alpha"), torch.tensor([0.75, 0.36]))
    torch.testing.assert_close(sds_weight(a, "sqrt_one_minus_alpha"), torch.tensor([math.sqrt(0.75), 0.6]))
    torch.testing.assert_close(sds_weight(a, "uniform"), torch.ones(2))
    with pytest.raises(ValueError, match="'sigma'"):
        sds_weight(a, "sigma")
    with pytest.raises(ValueError, match="'sigma'"):
        SDSGuidance(RecordingPredictor(), sd_alphas_cumprod(), SDSConfig(weighting="sigma"))


def test_t_range_annealing():
    ac = sd_alphas_cumprod()
    fixed = SDSGuidance(RecordingPredictor(), ac, SDSConfig(t_min=0.02, t_max=0.98))
    assert fixed.t_range(0.0) == fixed.t_range(1.0) == (20, 980)
    lin = SDSGuidance(RecordingPredictor(), ac, SDSConfig(t_anneal="linear", t_max_final=0.5))
    assert [lin.t_range(p) for p in (0.0, 0.5, 1.0, 2.0)] == [(20, 980), (20, 740), (20, 500), (20, 500)]
    sq = SDSGuidance(RecordingPredictor(), ac, SDSConfig(t_anneal="sqrt", t_max_final=0.5))
    assert sq.t_range(0.25) == (20, 740)
    low = SDSGuidance(RecordingPredictor(), ac, SDSConfig(t_min=0.3, t_anneal="linear", t_max_final=0.1))
    assert low.t_range(1.0) == (300, 300)  # never below t_min
    with pytest.raises(ValueError, match="t_min <= t_max"):
        SDSGuidance(RecordingPredictor(), ac, SDSConfig(t_min=0.9, t_max=0.5))


def test_sampled_t_covers_the_range_inclusively():
    sds = SDSGuidance(RecordingPredictor(), sd_alphas_cumprod(), SDSConfig(t_min=0.1, t_max=0.105))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sds.sample_t(0.0, gen, torch.device("cpu"))) for _ in range(500)}
    assert draws == set(range(100, 106))


def test_shape_errors():
    latents, cond, uncond = inputs()
    sds = SDSGuidance(RecordingPredictor(), sd_alphas_cumprod(), SDSConfig())
    with pytest.raises(ValueError, match="cond, uncond"):
        sds.grad(latents, torch.zeros(K, dtype=torch.long), latents, cond[:2], uncond[:2])


# ---------------------------------------------------------------------------------------------
# renders -> latents


class AffineEncoder:
    """An exactly per-pixel-affine 'VAE': mean colour of each 8x8 patch through W, b."""

    name = "affine"

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def __call__(self, images):  # [-1, 1] -> latents
        colors = F.avg_pool2d((images + 1) / 2, 8)
        return torch.einsum("cj,kjhw->kchw", self.weight, colors) + self.bias.view(1, -1, 1, 1)


def test_fit_recovers_an_affine_encoder():
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    enc = AffineEncoder(weight, bias)
    fitted = fit_rgb_to_latent(enc, "cpu", torch.float32, n_colors=16, size=64)
    torch.testing.assert_close(fitted.weight, weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fitted.bias, bias, rtol=1e-4, atol=1e-4)
    assert fitted.r2.item() > 0.9999
    # It reproduces the encoder on flat colours.
    colors = torch.rand(5, 3, 1, 1, generator=gen)
    expected = enc(colors.expand(5, 3, 64, 64) * 2 - 1)
    torch.testing.assert_close(fitted(colors.expand(5, 3, 8, 8)), expected, atol=1e-4, rtol=1e-4)


def test_fit_on_the_tiny_vae_is_the_least_squares_optimum(model, caplog):
    enc = EagerImageEncoder(model.vae, model.vae_scaling_factor)
    with caplog.at_level("INFO", logger="dreamfusion_trt.guidance.latents"):
        fitted = fit_rgb_to_latent(enc, "cpu", torch.float32, n_colors=8, size=64, seed=0)
    assert "R^2 =" in caplog.text
    # The reported R^2 is the fit's own: recompute it from what the encoder was shown.
    seen = []

    class Recording:
        def __call__(self, images):
            seen.append(images.clone())
            return enc(images)

    again = fit_rgb_to_latent(Recording(), "cpu", torch.float32, n_colors=8, size=64, seed=0)
    images = (torch.cat(seen) + 1) / 2
    with torch.no_grad():
        z = enc(torch.cat(seen)).double()[..., 1:-1, 1:-1]
        pred = again(F.avg_pool2d(images, 8)).double()[..., 1:-1, 1:-1]
    r2 = 1 - (z - pred).square().sum() / (z - z.mean(dim=(0, 2, 3), keepdim=True)).square().sum()
    assert again.r2.item() == pytest.approx(float(r2), abs=1e-4) and again.r2.item() == pytest.approx(fitted.r2.item())
    # Flat colours, interior latent pixels: the fitted map beats any perturbation of itself.
    colors = torch.rand(8, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = enc(colors.expand(8, 3, 64, 64) * 2 - 1)[..., 1:-1, 1:-1]

    def err(m):
        return (m(colors.expand(8, 3, 6, 6)) - target).square().mean().item()

    base = err(fitted)
    for delta in (0.05, -0.05):
        worse = LinearLatentMap(fitted.weight + delta, fitted.bias, fitted.r2)
        assert err(worse) > base


def test_linear_latent_map_is_differentiable_and_saves():
    gen = torch.Generator().manual_seed(0)
    m = LinearLatentMap(torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen), 0.9).double()
    images = torch.rand(2, 3, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(m, (images,))
    out = m(images)
    assert out.shape == (2, 4, 5, 5)
    torch.testing.assert_close(out[1, :, 2, 3], m.weight @ images[1, :, 2, 3] + m.bias)

    state = m.float().state_dict()
    assert set(state) == {"weight", "bias", "r2"}
    loaded = LinearLatentMap(torch.zeros(4, 3), torch.zeros(4))
    loaded.load_state_dict(state)
    assert torch.equal(loaded.weight, m.weight) and loaded.r2.item() == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"\[K, 3, h, w\]"):
        m(images[:, :2])


def test_encode_rgb_resizes_and_backpropagates(model):
    enc = EagerImageEncoder(model.vae, model.vae_scaling_factor)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    latents = encode_rgb(images, enc, size=64)
    assert latents.shape == (2, 4, 8, 8)
    up = F.interpolate(images.detach(), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(latents.detach(), enc(up * 2 - 1).detach())
    sds_surrogate(latents, torch.ones_like(latents)).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_the_trainer_renders_each_slot_with_its_own_geometry_grad(tmp_path, tiny_sd_paths):  # noqa: F811
    """With sds.high_noise_colour_only the trainer hands the renderer geometry_grad 1 for slots
    whose step drew t at or below high_noise_t and 0 above it; off, it hands None."""
    import dataclasses

    from test_coarse_to_fine import two_prompt_trainer

    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder)
    seen, plans = [], []
    real_render, real_plan = trainer._render, trainer.plan
    trainer._render = lambda *a, **kw: (seen.append(kw["geometry_grad"]), real_render(*a, **kw))[1]
    trainer.plan = lambda: (plans.append(p := real_plan()), p)[1]
    trainer.train_step()
    assert seen[-1] is None
    trainer.guidance.cfg = dataclasses.replace(trainer.guidance.cfg, t_min=0.02, t_max=0.98, high_noise_t=0.5, high_noise_colour_only=True)
    for _ in range(3):
        trainer.train_step()
        assert torch.equal(seen[-1], (plans[-1].t <= 500).float())
    drawn = torch.cat([p.t for p in plans[1:]])
    assert (drawn > 500).any() and (drawn <= 500).any()  # both kinds of step were taken
    assert all(r.finite for r in trainer.poll())


# ---------------------------------------------------------------------------------------------
# interval score matching


def _ism_reference(pred, ac, latents, t, cond, uncond, scale, interval, steps):
    """ISM for one prompt at a time in float64, written from the paper's equations: DDIM inversion
    with eps_u from 0 to s = t - interval in `steps` equal steps, one more to t, then
    w(t) (eps_hat(x_t) - eps_u(x_s, s))."""
    ac = ac.double()
    out = []
    for k in range(latents.shape[0]):
        x, tk = latents[k : k + 1].double(), int(t[k])
        s = max(tk - interval, 0)
        taus = [s * i // steps for i in range(steps + 1)] + [tk]
        for a, b in zip(taus[:-1], taus[1:]):
            eps = pred.eps(x, torch.tensor([a]), uncond[k : k + 1].double())
            x0 = (x - (1 - ac[a]).sqrt() * eps) / ac[a].sqrt()
            x = ac[b].sqrt() * x0 + (1 - ac[b]).sqrt() * eps
        tt = torch.tensor([tk])
        eps_u = pred.eps(x, tt, uncond[k : k + 1].double())
        eps_c = pred.eps(x, tt, cond[k : k + 1].double())
        out.append((1 - ac[tk]) * (eps_u + scale * (eps_c - eps_u) - eps))
    return torch.cat(out)


def test_ism_matches_a_per_prompt_float64_reference():
    ac = sd_alphas_cumprod()
    cfg = SDSConfig(guidance_scale=7.5, estimator="ism", ism_interval=0.05, ism_inversion_steps=3)
    pred = RecordingPredictor()
    sds = _guidance(pred, ac, cfg)
    latents, cond, uncond = inputs()
    t = torch.tensor([30, 400, 977])  # the first one's s clamps to 0
    noise = torch.randn(K, C, H, W, generator=torch.Generator().manual_seed(3))
    grad, _ = sds.grad(latents.detach(), t, noise, cond, uncond)
    want = _ism_reference(RecordingPredictor, ac, latents.detach(), t, cond, uncond, 7.5, 50, 3)
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5)
    # 3 steps to s and one to t, each one unconditional call on the K renders, then one CFG call
    assert [c[0].shape[0] for c in pred.calls] == [K, K, K, K, 2 * K]
    assert all(torch.equal(c[2], uncond) for c in pred.calls[:4])
    s = torch.tensor([0, 350, 927])
    assert torch.equal(pred.calls[0][1], torch.zeros(K, dtype=torch.long))
    assert torch.equal(pred.calls[3][1], s)  # eps_u(x_s, s), the target
    assert torch.equal(pred.calls[4][1], torch.cat([t, t]))
    # the drawn noise plays no part: ISM is deterministic given the render and t
    grad2, _ = sds.grad(latents.detach(), t, torch.zeros_like(noise), cond, uncond)
    torch.testing.assert_close(grad2, grad, rtol=0, atol=0)
    # and it differs from SDS's estimate for the same inputs
    plain, _ = _guidance(RecordingPredictor(), ac, SDSConfig(guidance_scale=7.5)).grad(latents.detach(), t, noise, cond, uncond)
    assert (plain - grad).abs().max() > 1e-2


def test_ism_loss_backpropagates_its_gradient_to_the_render():
    ac = sd_alphas_cumprod()
    sds = _guidance(RecordingPredictor(), ac, SDSConfig(guidance_scale=7.5, estimator="ism"))
    latents, cond, uncond = inputs(1)
    t = torch.tensor([100, 500, 900])
    noise = torch.randn(K, C, H, W, generator=torch.Generator().manual_seed(4))
    loss = sds(_one_part(latents), t, list(noise[:, None]), cond, uncond)
    grad, _ = sds.grad(latents.detach(), t, noise, cond, uncond)
    loss.sum().backward()
    torch.testing.assert_close(latents.grad, grad, rtol=0, atol=0)


def test_ddim_step_inverts_itself_and_keeps_x_at_equal_alphas():
    from dreamfusion_trt.guidance.sds import ddim_step

    ac = sd_alphas_cumprod().double()
    gen = torch.Generator().manual_seed(5)
    x, eps = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    a, b = ac[torch.tensor([10, 200])], ac[torch.tensor([300, 900])]
    torch.testing.assert_close(ddim_step(ddim_step(x, eps, a, b), eps, b, a), x)
    torch.testing.assert_close(ddim_step(x, eps, a, a), x)


def test_ism_settings_are_checked():
    ac = sd_alphas_cumprod()
    with pytest.raises(ValueError, match="ism_interval"):
        _guidance(RecordingPredictor(), ac, SDSConfig(estimator="ism", ism_interval=0.0))
    with pytest.raises(ValueError, match="ism_inversion_steps"):
        _guidance(RecordingPredictor(), ac, SDSConfig(estimator="ism", ism_inversion_steps=0))
    with pytest.raises(ValueError, match="estimator"):
        _guidance(RecordingPredictor(), ac, SDSConfig(estimator="vsd"))
    from dreamfusion_trt.guidance.inputs import ImageSpace

    image = ImageSpace(None, None, 64, 64, (4, 8, 8))
    with pytest.raises(ValueError, match="rgb_mode latent"):
        SDSGuidance(RecordingPredictor(), ac, SDSConfig(estimator="ism"), {"rgb": image})


def test_the_trainer_takes_ism_steps(tmp_path, tiny_sd_paths):  # noqa: F811
    """A trainer built with sds.estimator ism trains with finite losses and calls the predictor
    ism_inversion_steps + 2 times a step."""
    import dataclasses

    from test_coarse_to_fine import two_prompt_trainer

    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder)
    trainer.guidance.cfg = dataclasses.replace(trainer.guidance.cfg, estimator="ism", ism_inversion_steps=2)
    calls = []
    real = trainer.guidance.predictor
    trainer.guidance.predictor = lambda *a: (calls.append(a[0].shape[0]), real(*a))[1]
    trainer.train_step()
    assert calls == [2, 2, 2, 4]  # two prompts: 2 steps to s, one to t, one CFG call
    assert all(r.finite for r in trainer.poll())
