"""Plain-tensor modules around the frozen networks, for export (ONNX, torch.export) and compile.

Each wrapper's forward takes the spec's inputs positionally and returns its one output tensor,
so tracers never see diffusers' output dataclasses or keyword plumbing:

- `UNetWrapper`:        sample [B, C, h, w], timestep [B] fp32, encoder_hidden_states [B, L, D] -> noise_pred [B, C, h, w]
- `VaeEncoderWrapper`:  images [B, 3, H, W] in [-1, 1] -> scaled posterior mean latents [B, C, h, w]
- `VaeDecoderWrapper`:  scaled latents [B, C, h, w] -> images [B, 3, H, W] clamped to [-1, 1]
- `TextEncoderWrapper`: input_ids [B, L] int64 -> last_hidden_state [B, L, D]

They compute exactly what the eager backends in `eager.py` compute.

`fp32_islands(module)` is the fp16 export policy. Inside it every GroupNorm and LayerNorm
normalises in fp32 (their sums of squares overflow fp16); diffusers attention computes its
softmax in fp32 (the classic `AttnProcessor` with ``upcast_softmax``: Cast -> Softmax -> Cast in
the graph); CLIP uses an eager attention that casts to fp32 before its softmax (fp16 loses the
small logits). A TensorRT build is strongly typed, so these casts are what keeps those ops in
fp32 there. A VAE that overflows even so is exported whole in fp32
(`build_engines(vae_dtype=torch.float32)`, ``--vae-dtype float32``).
"""

from __future__ import annotations

import contextlib
import sys
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
        if model.text_encoder is None:
            raise ValueError("text_encoder: the model's text encoder was freed (free_text_encoder())")
        return TextEncoderWrapper(model.text_encoder).eval()
    raise ValueError(f"unknown network {network!r} (expected unet, vae_encoder, vae_decoder, text_encoder)")


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _group_norm_fp32(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    w = self.weight.float() if self.weight is not None else None
    b = self.bias.float() if self.bias is not None else None
    return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _eager_attention_fp32_softmax(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention (q, k, v [B, heads, L, d] -> [B, L, heads, d]) with the
    softmax input cast to fp32 before the softmax, so the exported graph computes it in fp32."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _layer_norm_fp32(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    w = self.weight.float() if self.weight is not None else None
    b = self.bias.float() if self.bias is not None else None
    return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


@contextlib.contextmanager
def fp32_islands(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `module`'s group/layer norms and attention softmaxes compute in fp32 (see
    the module docstring). Restores everything on exit; a no-op for an fp32 module."""
    if module_dtype(module) == torch.float32:
        yield module
        return
    from diffusers.models.attention_processor import Attention, AttnProcessor

    undo: list[Any] = []
    try:
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.forward = types.MethodType(_group_norm_fp32 if isinstance(m, nn.GroupNorm) else _layer_norm_fp32, m)
                undo.append(lambda m=m: m.__dict__.pop("forward", None))
            elif isinstance(m, Attention):
                processor, upcast = m.processor, m.upcast_softmax
                m.set_processor(AttnProcessor())
                m.upcast_softmax = True
                undo.append(lambda m=m, p=processor, u=upcast: (m.set_processor(p), setattr(m, "upcast_softmax", u)))
            elif hasattr(m, "set_attn_implementation") and hasattr(m, "config"):  # a transformers model
                previous = m.config._attn_implementation
                m.set_attn_implementation("eager")
                undo.append(lambda m=m, p=previous: m.set_attn_implementation(p))
                # Its eager attention calls softmax(dtype=float32), which the TorchScript exporter
                # writes as Softmax-then-Cast (an fp16 softmax); swap in one that casts first.
                home = sys.modules[type(m).__module__]
                if hasattr(home, "eager_attention_forward"):
                    original = home.eager_attention_forward
                    home.eager_attention_forward = _eager_attention_fp32_softmax
                    undo.append(lambda h=home, f=original: setattr(h, "eager_attention_forward", f))
        yield module
    finally:
        for fn in reversed(undo):
            fn()
