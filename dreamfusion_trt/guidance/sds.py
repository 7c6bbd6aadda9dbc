"""Score Distillation Sampling (DreamFusion, Poole et al. 2022): renders in, one loss per prompt out.

For the model input x of each prompt's render (latents, or the VAE's input image in image space)
and that prompt's own t and eps: x_t = sqrt(a_t) x + sqrt(1 - a_t) eps, the noise is predicted
with classifier-free guidance (`engines.base.guided_noise`, the one place CFG is written), and
w(t) (eps_hat - eps) is the gradient of the loss with respect to x, skipping the UNet's Jacobian.
With ``sds.estimator ism`` (interval score matching) x_t is instead the render's own DDIM
inversion and the unconditional prediction at an earlier timestep replaces eps.
The noise predictor is injected (eager, compiled or TensorRT) and so is the strategy that turns a
render into x (`inputs.py`), so this file is the same on every backend and in every phase.
Nothing here synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..config import SDSConfig
from ..engines.base import NoisePredictor, guided_noise
from .image_sds import image_sds
from .inputs import ImageSpace, RenderInput


def sds_weight(alphas_cumprod_t: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) from a_t = alphas_cumprod[t] (any shape): 1 - a_t (DreamFusion's sigma_t^2),
    sqrt(1 - a_t), or 1."""
    if weighting == "one_minus_alpha":
        return 1.0 - alphas_cumprod_t
    if weighting == "sqrt_one_minus_alpha":
        return (1.0 - alphas_cumprod_t).sqrt()
    if weighting == "uniform":
        return torch.ones_like(alphas_cumprod_t)
    raise ValueError(f"unknown SDS weighting {weighting!r} (expected one_minus_alpha, sqrt_one_minus_alpha, uniform)")


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (either direction) of x [K, ...] with predicted noise eps
    from cumulative alphas `alpha_from` [K] to `alpha_to` [K]: the predicted x_0 re-noised with
    the same eps. Equal alphas give x back."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    a0, a1 = alpha_from.view(shape), alpha_to.view(shape)
    x0 = (x - (1.0 - a0).sqrt() * eps) / a0.sqrt()
    return a1.sqrt() * x0 + (1.0 - a1).sqrt() * eps


def sds_surrogate(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-prompt surrogate losses [K] whose gradient with respect to `latents` [K, ...] is
    exactly `grad` and whose values are 0.5 * ||grad_k||^2 (what the usual
    0.5 * ||x - (x - grad).detach()||^2 is, up to rounding: that form's gradient x - (x - grad)
    loses the low bits of grad)."""
    grad = grad.detach()
    dot = (latents.float() * grad.float()).flatten(1).sum(dim=1)
    return dot - dot.detach() + 0.5 * grad.float().square().flatten(1).sum(dim=1)


@dataclass
class RenderPart:
    """The renders of the prompts in one phase: `images` [n, 3, R, R] in [0, 1] of the prompts
    at positions `slots` [n] (long, on the device) = `members` (the same, on the host)."""

    phase: str
    images: torch.Tensor
    slots: torch.Tensor
    members: list[int]


class SDSGuidance:
    """Renders -> per-prompt SDS losses. Built once from the config with the noise predictor,
    the scheduler's alphas_cumprod and one `RenderInput` strategy per phase."""

    def __init__(
        self,
        predictor: NoisePredictor,
        alphas_cumprod: torch.Tensor,  # [T]
        cfg: SDSConfig,
        inputs: Mapping[str, RenderInput] | None = None,
    ) -> None:
        if not 0.0 <= cfg.t_min <= cfg.t_max <= 1.0 or not 0.0 <= cfg.t_max_final <= 1.0:
            raise ValueError(f"SDS timestep fractions must satisfy 0 <= t_min <= t_max <= 1, got {cfg}")
        if cfg.high_noise_guidance_scale < 0 or not 0.0 <= cfg.high_noise_t <= 1.0:
            raise ValueError(f"sds.high_noise_guidance_scale must be >= 0 and sds.high_noise_t in [0, 1], got "
                             f"{cfg.high_noise_guidance_scale!r} and {cfg.high_noise_t!r}")  # fmt: skip
        if not 0.0 <= cfg.high_noise_share <= 1.0 or (cfg.high_noise_share > 0 and not cfg.high_noise_t < cfg.high_noise_t_max <= 1.0):
            raise ValueError(f"sds.high_noise_share must be in [0, 1], and with a share sds.high_noise_t < sds.high_noise_t_max <= 1; "
                             f"got {cfg.high_noise_share!r}, {cfg.high_noise_t!r} and {cfg.high_noise_t_max!r}")  # fmt: skip
        sds_weight(alphas_cumprod[:1], cfg.weighting)  # rejects an unknown weighting now
        if cfg.estimator not in ("sds", "ism"):
            raise ValueError(f"unknown sds.estimator {cfg.estimator!r} (expected sds or ism)")
        if cfg.estimator == "ism":
            if not 0.0 < cfg.ism_interval < 1.0 or cfg.ism_inversion_steps < 1:
                raise ValueError(f"sds.ism_interval must be in (0, 1) and sds.ism_inversion_steps >= 1, got "
                                 f"{cfg.ism_interval!r} and {cfg.ism_inversion_steps!r}")  # fmt: skip
            if any(isinstance(s, ImageSpace) for s in (inputs or {}).values()):
                raise ValueError("sds.estimator ism works on latents: it needs sds.rgb_mode latent")
        self.predictor = predictor
        self.alphas_cumprod = alphas_cumprod.float()  # [T]
        self.cfg = cfg
        self.num_timesteps = alphas_cumprod.shape[0]
        self.inputs = dict(inputs or {})

    def t_range(self, progress: float) -> tuple[int, int]:
        """Inclusive timestep range at training progress in [0, 1]; t_max moves towards
        t_max_final linearly or as sqrt(progress) when annealing, and never below t_min."""
        p = min(max(float(progress), 0.0), 1.0)
        ramp = {"none": 0.0, "linear": p, "sqrt": p**0.5}[self.cfg.t_anneal]
        t_max = self.cfg.t_max + (self.cfg.t_max_final - self.cfg.t_max) * ramp
        last = self.num_timesteps - 1
        lo = min(round(self.cfg.t_min * self.num_timesteps), last)
        return lo, min(max(round(t_max * self.num_timesteps), lo), last)

    def guidance_scales(self, t: torch.Tensor) -> float | torch.Tensor:
        """The CFG scale for timesteps `t` [K]: `guidance_scale`, or per prompt [K] float32 with
        `high_noise_guidance_scale` above `high_noise_t` (computed on t's device, no sync)."""
        if self.cfg.high_noise_guidance_scale <= 0:
            return self.cfg.guidance_scale
        low = torch.full(t.shape, self.cfg.guidance_scale, device=t.device, dtype=torch.float32)
        return torch.where(t > self.high_noise_split, torch.full_like(low, self.cfg.high_noise_guidance_scale), low)

    @property
    def high_noise_split(self) -> int:
        """The last timestep that is not "high noise": `high_noise_t` of the schedule."""
        return round(self.cfg.high_noise_t * self.num_timesteps)

    def geometry_grad(self, t: torch.Tensor) -> torch.Tensor | None:
        """How much of the SDS gradient reaches the density per prompt [K] float32 for timesteps
        `t` [K]: 0 above `high_noise_t` with `high_noise_colour_only`, else 1; None when the option
        is off (computed on t's device, no sync)."""
        if not self.cfg.high_noise_colour_only:
            return None
        return (t <= self.high_noise_split).to(torch.float32)

    def high_noise_range(self) -> tuple[int, int]:
        """Inclusive timestep range of the `high_noise_share` steps: above `high_noise_t`, up to `high_noise_t_max`."""
        last = self.num_timesteps - 1
        lo = min(self.high_noise_split + 1, last)
        return lo, min(max(round(self.cfg.high_noise_t_max * self.num_timesteps), lo), last)

    def sample_t(self, progress: float, generator: torch.Generator, device: torch.device, share: float | None = None) -> torch.Tensor:
        """One timestep [1] (long) uniformly from `t_range(progress)`, inclusive; with
        `high_noise_share`, from `high_noise_range` with that probability (drawn on the device,
        after the schedule's draw, so a share of 0 draws exactly as before). `share` in [0, 1)
        (``sds.t_sequence`` stratified or decreasing) places the timestep in the range instead of the draw; the
        generator draws it all the same, so the noise that follows does not change."""
        lo, hi = self.t_range(progress)
        t = torch.randint(lo, hi + 1, (1,), generator=generator, device=device)
        if share is not None:
            if not 0.0 <= share < 1.0:
                raise ValueError(f"a timestep share must be in [0, 1), got {share!r}")
            t = torch.full((1,), lo + min(int(share * (hi - lo + 1)), hi - lo), dtype=torch.long, device=device)
        if self.cfg.high_noise_share <= 0:
            return t
        hlo, hhi = self.high_noise_range()
        high = torch.randint(hlo, hhi + 1, (1,), generator=generator, device=device)
        pick = torch.rand((1,), generator=generator, device=device) < self.cfg.high_noise_share
        return torch.where(pick, high, t)

    @torch.no_grad()
    def grad(
        self,
        latents: torch.Tensor,  # [K, C, h, w]
        t: torch.Tensor,  # [K] long
        noise: torch.Tensor,  # [K, C, h, w]
        cond: torch.Tensor,  # [K, 77, D]
        uncond: torch.Tensor,  # [K, 77, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The SDS gradient w(t) (eps_hat - eps) [K, C, h, w] for given timesteps and noise, and
        the guided prediction eps_hat: one predictor call on the CFG-doubled batch, never
        through autograd."""
        k = latents.shape[0]
        if latents.ndim != 4 or t.shape != (k,) or cond.shape[0] != k or uncond.shape != cond.shape:
            raise ValueError(f"expected latents [K,C,h,w], t [K] and cond, uncond [K,77,D]; got {tuple(latents.shape)}, "
                             f"{tuple(t.shape)}, {tuple(cond.shape)}, {tuple(uncond.shape)}")  # fmt: skip
        a = self.alphas_cumprod.to(latents.device)[t].view(k, 1, 1, 1)
        if self.cfg.estimator == "ism":
            x_t, target = self.ism_inversion(latents, t, uncond)
        else:
            x_t, target = (a.sqrt() * latents + (1.0 - a).sqrt() * noise).to(latents.dtype), noise
        eps_hat = guided_noise(self.predictor, x_t, t, cond, uncond, self.guidance_scales(t))
        grad = torch.nan_to_num(sds_weight(a, self.cfg.weighting) * (eps_hat - target)).to(latents.dtype)
        return grad, eps_hat

    def ism_interval_start(self, t: torch.Tensor) -> torch.Tensor:
        """s = t - ism_interval of the schedule, at least 0, per prompt [K] (long)."""
        return (t - max(round(self.cfg.ism_interval * self.num_timesteps), 1)).clamp(min=0)

    @torch.no_grad()
    def ism_inversion(self, latents: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interval score matching's noisy input and target (LucidDreamer, Liang et al. 2024).

        Deterministic DDIM inversion with the unconditional prediction, in `ism_inversion_steps`
        equal steps from timestep 0 to s = `ism_interval_start(t)` (per prompt), then one step
        from s to t with eps_u(x_s, s). Returns x_t [K, C, h, w] in the latents' dtype and the
        target eps_u(x_s, s) [K, C, h, w] float32: the gradient is w(t) (eps_hat(x_t) - target),
        so the render is matched along its own inverted trajectory instead of against fresh
        noise. Costs `ism_inversion_steps` + 1 predictor calls on K renders."""
        ac = self.alphas_cumprod.to(latents.device)
        s = self.ism_interval_start(t)
        n = self.cfg.ism_inversion_steps
        x = latents.float()
        here = torch.zeros_like(t)
        for i in range(1, n + 2):  # n steps 0 -> s, then s -> t
            there = torch.div(s * i, n, rounding_mode="floor") if i <= n else t
            eps = self.predictor(x.to(latents.dtype), here, uncond).float().clone()
            x = ddim_step(x, eps, ac[here], ac[there])
            here = there
        return x.to(latents.dtype), eps

    def __call__(
        self,
        parts: Sequence[RenderPart],
        t: torch.Tensor,  # [K] long, each prompt's timestep
        noise: Sequence[torch.Tensor],  # K tensors [1, C, h, w], each prompt's noise for its phase
        cond: torch.Tensor,  # [K, 77, D], each prompt's (view-dependent) text embedding
        uncond: torch.Tensor,  # [K, 77, D]
    ) -> torch.Tensor:
        """Per-prompt losses [K] whose gradient with respect to each prompt's model input is its
        SDS gradient. Phases whose inputs have one shape share one noise-predictor call."""
        k = t.shape[0]
        xs = [self.inputs[p.phase](p.images) for p in parts]
        strategies = [self.inputs[p.phase] for p in parts]
        merged = len(parts) > 1 and len({(x.shape[1:], s.space) for x, s in zip(xs, strategies)}) == 1
        if len(parts) == 1 or merged:  # one call, prompts back in slot order
            x = xs[0]
            if merged:
                stacked = torch.cat([x_i.to(xs[0].dtype) for x_i in xs])
                x = torch.zeros_like(stacked).index_copy(0, torch.cat([p.slots for p in parts]), stacked)
            return self._loss(strategies[0], x, t, torch.cat(list(noise)), cond, uncond)
        loss = torch.zeros(k, device=t.device)
        for p, x, s in zip(parts, xs, strategies):
            part_noise = torch.cat([noise[i] for i in p.members])
            loss = loss.index_copy(0, p.slots, self._loss(s, x, t[p.slots], part_noise, cond[p.slots], uncond[p.slots]))
        return loss

    def _loss(self, strategy: RenderInput, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor,
              uncond: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """SDS per prompt for model inputs `x` [n, ...] with their t [n] and noise [n, C, h, w]."""
        # One memory layout whatever produced the input (the VAE may return channels-last, a mix
        # of phases comes back through index_copy): convolutions pick their algorithm by layout,
        # and a prompt's numbers must not depend on which others share the step.
        x = x.contiguous()
        if isinstance(strategy, ImageSpace):
            w = sds_weight(self.alphas_cumprod.to(x.device)[t], self.cfg.weighting)  # [n]
            return image_sds(x, t, noise, cond, uncond, encoder=strategy.encoder, predictor=self.predictor,
                             decoder=strategy.decoder, alphas_cumprod=self.alphas_cumprod, weight=w,
                             guidance_scale=self.guidance_scales(t)).per_prompt  # fmt: skip
        grad, _ = self.grad(x, t, noise.to(x.dtype), cond, uncond)
        return sds_surrogate(x, grad)
