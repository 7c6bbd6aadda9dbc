"""The full VAE encoder of the RGB phase, compiled: the fast twin of `EagerImageEncoder`.

`CompiledImageEncoder` satisfies the same `engines.base.ImageEncoder` protocol as the eager one
(images [B, 3, H, W] in [-1, 1] -> scaled posterior-mean latents [B, C, H/8, W/8], with
autograd), so it drops into `guidance.latents.encode_rgb` unchanged. ``torch.compile`` traces
the encode function once per input shape and AOT autograd compiles its backward with it, so
the RGB phase's forward *and* backward through the encoder run as compiled code. The eager
encoder stays the reference it is tested against, and the fallback.

Backends (`compiled.compile_static`): "inductor" (the fast path), "aot_eager" (traces forward
and backward like inductor but runs them eagerly: quick to compile, for tests; on the CPU it
fails at batch 1 with a group-norm contiguity error that inductor does not have), "eager"
(dynamo only).

`TinyVaeImageEncoder` puts TAESD (diffusers' `AutoencoderTiny`) behind the same protocol.

On CUDA the VAE's attention is switched to fused SDPA and its weights to channels_last, as
`engines.inductor.compile_network` does for the UNet.
"""

from __future__ import annotations

import logging

import torch

from ..engines.eager import _check_4d
from .compiled import compile_static

logger = logging.getLogger(__name__)


def _prepare(vae: torch.nn.Module) -> None:
    if next(vae.parameters()).device.type != "cuda":
        return
    from ..engines.inductor import use_fused_attention

    use_fused_attention(vae)
    vae.to(memory_format=torch.channels_last)


class CompiledImageEncoder:
    """``torch.compile`` of `EagerImageEncoder`'s function: images [B, 3, H, W] in [-1, 1] ->
    latents [B, C, H/8, W/8], differentiable; outputs are fresh tensors (no CUDA graphs)."""

    name = "compiled"

    def __init__(
        self, vae: torch.nn.Module, scaling_factor: float, backend: str = "inductor", mode: str | None = None
    ) -> None:
        _prepare(vae)
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.dtype = vae.dtype
        self._fn = compile_static(self._encode, backend, mode)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images.to(self.dtype)).latent_dist.mean * self.scaling_factor

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_4d("images", images, 3)
        return self._fn(images).to(images.dtype)


class TinyVaeImageEncoder:
    """TAESD (diffusers `AutoencoderTiny`) behind the same protocol: images [B, 3, H, W] in
    [-1, 1] -> latents [B, C, H/8, W/8], differentiable. TAESD is trained to produce SD's
    *scaled* latents directly; its config's `scaling_factor` (1.0 for the SD 1.x/2.x TAESD) is
    applied as the diffusers pipelines do."""

    name = "taesd"

    def __init__(self, taesd: torch.nn.Module, scaling_factor: float | None = None) -> None:
        self.vae = taesd
        self.scaling_factor = float(taesd.config.scaling_factor if scaling_factor is None else scaling_factor)
        self.dtype = taesd.dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_4d("images", images, 3)
        return (self.vae.encode(images.to(self.dtype)).latents * self.scaling_factor).to(images.dtype)


def load_taesd(source: str, device: torch.device | str, dtype: torch.dtype) -> TinyVaeImageEncoder:
    """TAESD from a hub id (e.g. ``madebyollin/taesd`` for SD 1.x/2.x) or a local folder, frozen."""
    from diffusers import AutoencoderTiny

    try:
        taesd = AutoencoderTiny.from_pretrained(source, torch_dtype=dtype)
    except Exception as exc:
        raise ValueError(f"could not load TAESD from {source!r}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    return TinyVaeImageEncoder(taesd.to(device).eval().requires_grad_(False))
