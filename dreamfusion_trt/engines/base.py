"""The interfaces every frozen-network backend implements.

Eager PyTorch, torch.compile/AOTInductor and TensorRT engines are interchangeable behind these
protocols, so SDS guidance and the trainer never know which one runs. Shapes are given with
B = batch (classifier-free guidance already doubled), h, w = latent size, D = text width.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class NoisePredictor(Protocol):
    """Predicts the noise in `noisy_latents` [B, C, h, w] at timesteps `t` [B] given
    `text_embeddings` [B, 77, D]; returns eps [B, C, h, w] in the latents' dtype.

    Implementations run without autograd (SDS never backpropagates through the UNet). The
    returned tensor may be a buffer the predictor owns and overwrites on its next call: callers
    that keep it across calls must clone it.
    """

    name: str

    def __call__(self, noisy_latents: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ImageEncoder(Protocol):
    """VAE encoder: images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/8, W/8]."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LatentDecoder(Protocol):
    """VAE decoder: scaled latents [B, C, h, w] -> images [B, 3, 8h, 8w] in [-1, 1]."""

    name: str

    def __call__(self, latents: torch.Tensor) -> torch.Tensor: ...


def guided_noise(
    predictor: NoisePredictor,
    noisy_latents: torch.Tensor,  # [K, C, h, w]
    t: torch.Tensor,  # [K] integer timesteps
    cond: torch.Tensor,  # [K, L, D]
    uncond: torch.Tensor,  # [K, L, D]
    guidance_scale: float | torch.Tensor,  # one scale, or one per prompt [K]
) -> torch.Tensor:
    """Classifier-free guidance, the one place it is written: one predictor call on the doubled
    batch (unconditional first), eps_hat = eps_u + s (eps_c - eps_u) [K, C, h, w] in float32.
    SDS, image-space SDS and the ONNX parity check all call this."""
    eps = predictor(torch.cat([noisy_latents, noisy_latents]), torch.cat([t, t]), torch.cat([uncond, cond]))
    return cfg_combine(eps, guidance_scale)


def cfg_combine(eps: torch.Tensor, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """A CFG-doubled noise prediction [2K, ...] (unconditional first) -> eps_hat [K, ...], float32;
    `guidance_scale` one float or one per prompt [K]."""
    eps_u, eps_c = eps.float().chunk(2)
    if isinstance(guidance_scale, torch.Tensor):
        guidance_scale = guidance_scale.to(eps_u.device, torch.float32).view(-1, *([1] * (eps_u.dim() - 1)))
    return eps_u + guidance_scale * (eps_c - eps_u)
