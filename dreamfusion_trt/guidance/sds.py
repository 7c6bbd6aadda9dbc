"""Score Distillation Sampling (DreamFusion, Poole et al. 2022).

For latents x of K renders: draw t ~ U{t_lo..t_hi} and eps ~ N(0, I) per prompt, noise
x_t = sqrt(a_t) x + sqrt(1 - a_t) eps, predict the noise with classifier-free guidance and use
w(t) (eps_hat - eps) as the gradient of the loss with respect to x, skipping the UNet's Jacobian.
The noise predictor is injected (eager, compiled or TensorRT), so this file is the same on every
backend. Nothing here synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SDSConfig
from ..engines.base import NoisePredictor


@dataclass
class SDSOutput:
    loss: torch.Tensor  # scalar, 0.5 * ||grad||^2; d loss / d latents == grad
    grad: torch.Tensor  # [K, C, h, w], detached
    t: torch.Tensor  # [K] long timesteps used
    noise_pred: torch.Tensor | None = None  # [K, C, h, w] guided eps_hat


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


def sds_surrogate(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-prompt surrogate losses [K] whose gradient with respect to `latents` [K, ...] is
    exactly `grad` and whose values are 0.5 * ||grad_k||^2 (what the usual
    0.5 * ||x - (x - grad).detach()||^2 is, up to rounding: that form's gradient x - (x - grad)
    loses the low bits of grad)."""
    grad = grad.detach()
    dot = (latents.float() * grad.float()).flatten(1).sum(dim=1)
    return dot - dot.detach() + 0.5 * grad.float().square().flatten(1).sum(dim=1)


def sds_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`sds_surrogate` summed over prompts: a scalar whose gradient is exactly `grad`."""
    return sds_surrogate(latents, grad).sum()


class SDSGuidance:
    def __init__(self, predictor: NoisePredictor, alphas_cumprod: torch.Tensor, cfg: SDSConfig) -> None:
        if not 0.0 <= cfg.t_min <= cfg.t_max <= 1.0 or not 0.0 <= cfg.t_max_final <= 1.0:
            raise ValueError(f"SDS timestep fractions must satisfy 0 <= t_min <= t_max <= 1, got {cfg}")
        sds_weight(alphas_cumprod[:1], cfg.weighting)  # rejects an unknown weighting now
        self.predictor = predictor
        self.alphas_cumprod = alphas_cumprod.float()  # [T]
        self.cfg = cfg
        self.num_timesteps = alphas_cumprod.shape[0]

    def t_range(self, progress: float) -> tuple[int, int]:
        """Inclusive timestep range at training progress in [0, 1]; t_max moves towards
        t_max_final linearly or as sqrt(progress) when annealing, and never below t_min."""
        p = min(max(float(progress), 0.0), 1.0)
        ramp = {"none": 0.0, "linear": p, "sqrt": p**0.5}[self.cfg.t_anneal]
        t_max = self.cfg.t_max + (self.cfg.t_max_final - self.cfg.t_max) * ramp
        last = self.num_timesteps - 1
        lo = min(round(self.cfg.t_min * self.num_timesteps), last)
        return lo, min(max(round(t_max * self.num_timesteps), lo), last)

    def __call__(
        self,
        latents: torch.Tensor,  # [K, C, h, w], requires grad
        cond: torch.Tensor,  # [K, 77, D]
        uncond: torch.Tensor,  # [K, 77, D]
        progress: float,
        generator: torch.Generator | None = None,  # on the latents' device
    ) -> SDSOutput:
        k = latents.shape[0]
        if latents.ndim != 4 or cond.shape[0] != k or uncond.shape != cond.shape:
            raise ValueError(f"expected latents [K,C,h,w] with cond, uncond [K,77,D]; got {tuple(latents.shape)}, "
                             f"{tuple(cond.shape)}, {tuple(uncond.shape)}")  # fmt: skip
        lo, hi = self.t_range(progress)
        device = latents.device
        t = torch.randint(lo, hi + 1, (k,), generator=generator, device=device)
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        grad, eps_hat = self.grad(latents, t, noise, cond, uncond)
        return SDSOutput(loss=sds_loss(latents, grad), grad=grad, t=t, noise_pred=eps_hat)

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
        the guided prediction eps_hat: one predictor call on the CFG-doubled batch (uncond first),
        never through autograd."""
        k = latents.shape[0]
        a = self.alphas_cumprod.to(latents.device)[t].view(k, 1, 1, 1)
        x_t = (a.sqrt() * latents + (1.0 - a).sqrt() * noise).to(latents.dtype)
        eps = self.predictor(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
        eps_u, eps_c = eps.chunk(2)
        eps_hat = eps_u + self.cfg.guidance_scale * (eps_c - eps_u)
        grad = torch.nan_to_num(sds_weight(a, self.cfg.weighting) * (eps_hat - noise)).to(latents.dtype)
        return grad, eps_hat
