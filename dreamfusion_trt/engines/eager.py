"""Plain PyTorch backends: the reference twin every compiled or TensorRT engine is tested against.

Each wraps one frozen diffusers network and satisfies a protocol of `engines.base` structurally
(NoisePredictor, ImageEncoder, LatentDecoder). Inputs are cast to the network's dtype and outputs
cast back to the caller's dtype, so an fp16 network serves fp32 callers. Outputs are fresh
tensors (the caller owns them).
"""

from __future__ import annotations

import torch


def _check_4d(name: str, x: torch.Tensor, channels: int | None = None) -> None:
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        want = f"[B, {channels}, H, W]" if channels is not None else "[B, C, H, W]"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")


class EagerNoisePredictor:
    """UNet eps prediction without autograd (SDS never backpropagates through the UNet)."""

    name = "eager"

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.dtype = unet.dtype
        self.in_channels = int(unet.config.in_channels)

    def __call__(self, noisy_latents: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        # noisy_latents [B, C, h, w], t [B] integer timesteps, text_embeddings [B, 77, D] -> eps [B, C, h, w]
        _check_4d("noisy_latents", noisy_latents, self.in_channels)
        b = noisy_latents.shape[0]
        if t.shape != (b,) or text_embeddings.ndim != 3 or text_embeddings.shape[0] != b:
            raise ValueError(
                f"expected t [{b}] and text_embeddings [{b}, L, D] for {b} latents, got "
                f"{tuple(t.shape)} and {tuple(text_embeddings.shape)}"
            )
        # no_grad, not inference_mode: callers mix the output with tensors that require grad.
        with torch.no_grad():
            eps = self.unet(
                noisy_latents.to(self.dtype), t, encoder_hidden_states=text_embeddings.to(self.dtype), return_dict=False
            )[0]
        return eps.to(noisy_latents.dtype)


class EagerImageEncoder:
    """VAE encoder mean, scaled: images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/8, W/8].

    Runs with autograd: the RGB phase backpropagates the SDS gradient through it to the render.
    """

    name = "eager"

    def __init__(self, vae: torch.nn.Module, scaling_factor: float) -> None:
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.dtype = vae.dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_4d("images", images, 3)
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        return (posterior.mean * self.scaling_factor).to(images.dtype)


class EagerLatentDecoder:
    """VAE decoder without autograd: latents [B, C, h, w] -> images [B, 3, 8h, 8w] in [-1, 1]."""

    name = "eager"

    def __init__(self, vae: torch.nn.Module, scaling_factor: float) -> None:
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.dtype = vae.dtype

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        _check_4d("latents", latents)
        with torch.no_grad():
            images = self.vae.decode(latents.to(self.dtype) / self.scaling_factor, return_dict=False)[0]
        return images.clamp(-1.0, 1.0).to(latents.dtype)
