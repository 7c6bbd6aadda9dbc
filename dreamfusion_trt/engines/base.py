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
