"""Plain-tensor modules around the frozen networks, for export (ONNX, torch.export) and compile.

Each wrapper's forward takes the spec's inputs positionally and returns its one output tensor,
so tracers never see diffusers' output dataclasses or keyword plumbing:

- `UNetWrapper`:        sample [B, C, h, w], timestep [B] fp32, encoder_hidden_states [B, L, D] -> noise_pred [B, C, h, w]
- `VaeEncoderWrapper`:  images [B, 3, H, W] in [-1, 1] -> scaled posterior mean latents [B, C, h, w]
- `VaeDecoderWrapper`:  scaled latents [B, C, h, w] -> images [B, 3, H, W] clamped to [-1, 1]
- `TextEncoderWrapper`: input_ids [B, L] int64 -> last_hidden_state [B, L, D]

They compute exactly what the eager backends in `eager.py` compute.

`fp32_islands(module)` is the fp16/bf16 export policy: inside it every GroupNorm and LayerNorm
normalises in fp32 (their sums of squares overflow fp16), and nothing else changes. Attention
keeps the network's own SDPA processors, which the exporter writes as the default SDPA pattern
(Q and K scaled by sqrt(scale) *before* the first MatMul, then Softmax and the second MatMul,
all in the network's dtype): the pattern TensorRT's fused attention kernels match, which an
fp32 softmax island (``MatMul -> Mul -> Cast -> Softmax -> Cast -> MatMul``) would block; the
fused kernels accumulate the softmax in fp32 themselves. A TensorRT build is strongly typed, so
the casts around the norms are what keeps them in fp32 there. A VAE that overflows even so is
exported whole in fp32 (`build_engines(vae_dtype=torch.float32)`, ``--vae-dtype float32``).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeEncoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(scaling_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.scaling_factor


class VaeDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0].clamp(-1.0, 1.0)


class TextEncoderWrapper(nn.Module):
    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


def wrap_network(model: Any, network: str) -> nn.Module:
    """The wrapper of `network` around a `DiffusionModel`'s component (shared, not copied)."""
    if network == "unet":
        return UNetWrapper(model.unet).eval()
    if network == "vae_encoder":
        return VaeEncoderWrapper(model.vae, model.vae_scaling_factor).eval()
    if network == "vae_decoder":
        return VaeDecoderWrapper(model.vae, model.vae_scaling_factor).eval()
    if network == "text_encoder":
        try:
            text_encoder = model.require_text_encoder()  # loads a deferred one
        except ValueError:
            raise ValueError("text_encoder: the model's text encoder was freed (free_text_encoder())") from None
        return TextEncoderWrapper(text_encoder).eval()
    raise ValueError(f"unknown network {network!r} (expected unet, vae_encoder, vae_decoder, text_encoder)")


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _group_norm_fp32(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    w = self.weight.float() if self.weight is not None else None
    b = self.bias.float() if self.bias is not None else None
    return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _layer_norm_fp32(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    w = self.weight.float() if self.weight is not None else None
    b = self.bias.float() if self.bias is not None else None
    return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def use_fused_attention(module: nn.Module) -> list[tuple[nn.Module, Any]]:
    """Swap diffusers' classic attention processors for SDPA ones (the same maths); returns
    (attention module, previous processor) for each one changed."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    changed = []
    for m in module.modules():
        if isinstance(m, Attention) and type(m.processor) is AttnProcessor:
            changed.append((m, m.processor))
            m.set_processor(AttnProcessor2_0())
    return changed


@contextlib.contextmanager
def fp32_islands(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `module`'s group and layer norms compute in fp32 and its diffusers
    attention runs as SDPA (see the module docstring). Restores everything on exit; the norms
    are left alone in an fp32 module."""
    swapped = use_fused_attention(module)
    patched = []
    try:
        if module_dtype(module) != torch.float32:
            for m in module.modules():
                if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                    m.forward = types.MethodType(_group_norm_fp32 if isinstance(m, nn.GroupNorm) else _layer_norm_fp32, m)
                    patched.append(m)
        yield module
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
        for m, processor in swapped:
            m.set_processor(processor)
