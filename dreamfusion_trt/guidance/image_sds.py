"""Image-space SDS with engine-only encoder and decoder (no gradient through the VAE).

Latent SDS backpropagates w(t)(eps_hat - eps) through the VAE encoder to the render, which needs
the encoder's autograd graph (eager only). This variant keeps every network inference-only, so
the encoder, UNet and decoder can all be TensorRT engines:

    z      = E(x)                                       (no grad)
    x_t    = sqrt(a) z + sqrt(1 - a) eps
    eps^   = eps_u + s (eps_c - eps_u)                  (one CFG noise prediction)
    z0^    = (x_t - sqrt(1 - a) eps^) / sqrt(a)         (the denoised latent)
    x^     = D(z0^)                                     (no grad)
    loss   = 0.5 * sum_k w_k ||x_k - x^_k||^2,   so  d loss / d x = w (x - x^)

`x` is what the encoder sees (the render resized to the encoder's size, in [-1, 1]); the
gradient reaches the render through that resize. The timesteps, noise and weights come from the
caller, so this stays a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engines.base import ImageEncoder, LatentDecoder, NoisePredictor, guided_noise


@dataclass
class ImageSDSOutput:
    per_prompt: torch.Tensor  # [K] 0.5 * w_k ||x_k - target_k||^2
    target: torch.Tensor  # [K, 3, H, W] decoded denoised latents, detached
    latents: torch.Tensor  # [K, C, h, w] E(x)
    denoised: torch.Tensor  # [K, C, h, w] z0^


def image_sds(
    images: torch.Tensor,  # [K, 3, H, W] in [-1, 1], requires grad
    t: torch.Tensor,  # [K] integer timesteps
    noise: torch.Tensor,  # [K, C, h, w]
    cond: torch.Tensor,  # [K, L, D]
    uncond: torch.Tensor,  # [K, L, D]
    *,
    encoder: ImageEncoder,
    predictor: NoisePredictor,
    decoder: LatentDecoder,
    alphas_cumprod: torch.Tensor,  # [T]
    weight: torch.Tensor,  # [K] w(t)
    guidance_scale: float | torch.Tensor,  # one, or one per prompt [n]
) -> ImageSDSOutput:
    k = images.shape[0]
    if images.ndim != 4 or t.shape != (k,) or weight.shape != (k,) or cond.shape[0] != k or uncond.shape != cond.shape:
        raise ValueError(
            f"expected images [K,3,H,W], t [K], weight [K], cond/uncond [K,L,D]; got {tuple(images.shape)}, "
            f"{tuple(t.shape)}, {tuple(weight.shape)}, {tuple(cond.shape)}, {tuple(uncond.shape)}"
        )
    with torch.no_grad():
        z = encoder(images.detach())
        if noise.shape != z.shape:
            raise ValueError(f"noise must have the latents' shape {tuple(z.shape)}, got {tuple(noise.shape)}")
        a = alphas_cumprod.to(z.device, torch.float32)[t.long()].view(k, 1, 1, 1)
        x_t = (a.sqrt() * z.float() + (1 - a).sqrt() * noise.float()).to(z.dtype)
        eps_hat = guided_noise(predictor, x_t, t, cond, uncond, guidance_scale)
        z0 = ((x_t.float() - (1 - a).sqrt() * eps_hat) / a.sqrt()).to(z.dtype)
        target = decoder(z0).to(images.dtype)
    w = weight.to(images.device, torch.float32)
    per_prompt = 0.5 * w * (images.float() - target.float()).square().flatten(1).sum(dim=1)
    return ImageSDSOutput(per_prompt=per_prompt, target=target, latents=z, denoised=z0)
