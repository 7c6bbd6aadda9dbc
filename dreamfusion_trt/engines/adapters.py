"""Turn a compiled network (TensorRT engine, AOTInductor package, torch.compile) into the
`engines.base` protocols.

A runner is any callable taking the spec's inputs positionally (right dtype, device,
contiguous) and returning the first output tensor. The adapters convert what the caller passes
(long timesteps, fp32 latents, a tensor on another device) to what the spec says, without a copy
when nothing needs converting, and cast the result back to the caller's dtype. Like the eager
twins, they run without autograd; unlike `EagerImageEncoder`, an engine encoder cannot carry a
gradient back to its images.
"""

from __future__ import annotations

from typing import Callable

import torch

from .spec import NetworkSpec, TensorSpec

Runner = Callable[..., torch.Tensor]


def _to(x: torch.Tensor, t: TensorSpec, device: torch.device) -> torch.Tensor:
    return x.to(device=device, dtype=t.dtype, non_blocking=True).contiguous()


class _Adapter:
    def __init__(self, name: str, run: Runner, spec: NetworkSpec, device: torch.device | str) -> None:
        self.name = name
        self.spec = spec
        self.device = torch.device(device)
        self._run = run

    def _call(self, *xs: torch.Tensor) -> torch.Tensor:
        args = [_to(x, t, self.device) for x, t in zip(xs, self.spec.inputs)]
        self.spec.check_inputs(args)
        with torch.no_grad():
            return self._run(*args)


class NetworkNoisePredictor(_Adapter):
    """NoisePredictor over a runner of the UNet spec."""

    def __call__(self, noisy_latents: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        # noisy_latents [B, C, h, w], t [B] (any numeric dtype), text_embeddings [B, L, D] -> eps [B, C, h, w]
        eps = self._call(noisy_latents, t, text_embeddings)
        return eps if eps.dtype == noisy_latents.dtype else eps.to(noisy_latents.dtype)


class NetworkImageEncoder(_Adapter):
    """ImageEncoder over a runner of the VAE-encoder spec (no gradient to the images)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/8, W/8]
        z = self._call(images)
        return z if z.dtype == images.dtype else z.to(images.dtype)


class NetworkLatentDecoder(_Adapter):
    """LatentDecoder over a runner of the VAE-decoder spec."""

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        # scaled latents [B, C, h, w] -> images [B, 3, 8h, 8w] in [-1, 1]
        x = self._call(latents)
        return x if x.dtype == latents.dtype else x.to(latents.dtype)
