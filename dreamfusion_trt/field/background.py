"""What a ray sees when it leaves the scene: a colour per view direction, stacked over K prompts.

- ``mlp``: a small MLP (sigmoid output) of a frequency encoding of the unit view direction,
  one per prompt, trained with the field (DreamFusion's environment map).
- ``solid``: ``cfg.background_color`` everywhere.
- ``random``: one uniformly random colour per prompt per call (from `generator` when given),
  which keeps the field from baking the background into the object.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import FieldConfig
from .mlp import StackedMLP


def frequency_encoding(x: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """``[..., D] -> [..., D * (1 + 2 * num_frequencies)]``: x, then sin/cos(2^i * pi * x)."""
    if num_frequencies == 0:
        return x
    freqs = (2.0 ** torch.arange(num_frequencies, device=x.device, dtype=x.dtype)) * math.pi  # [F]
    angles = x[..., None, :] * freqs[:, None]  # [..., F, D]
    enc = torch.cat([angles.sin(), angles.cos()], dim=-2).flatten(-2)
    return torch.cat([x, enc], dim=-1)


class Background(nn.Module):
    """``forward(dirs [K, R, 3], generator=None) -> rgb [K, R, 3]`` in [0, 1]."""

    def __init__(
        self,
        cfg: FieldConfig,
        num_prompts: int = 1,
        num_frequencies: int = 4,
        hidden_dim: int = 32,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        if cfg.background not in ("mlp", "solid", "random"):
            raise ValueError(f"field.background must be 'mlp', 'solid' or 'random', got {cfg.background!r}")
        self.kind = cfg.background
        self.num_prompts = num_prompts
        self.num_frequencies = num_frequencies
        self.register_buffer("color", torch.tensor(cfg.background_color, dtype=torch.float32), persistent=False)
        if self.kind == "mlp":
            in_dim = 3 * (1 + 2 * num_frequencies)
            self.mlp = StackedMLP(num_prompts, in_dim, hidden_dim, 3, num_layers)
        else:
            self.mlp = None

    def forward(self, dirs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if dirs.dim() != 3 or dirs.shape[-1] != 3 or dirs.shape[0] != self.num_prompts:
            raise ValueError(f"expected directions of shape [{self.num_prompts}, R, 3], got {tuple(dirs.shape)}")
        k, r = dirs.shape[0], dirs.shape[1]
        if self.kind == "solid":
            return self.color.to(dirs.device).expand(k, r, 3)
        if self.kind == "random":
            gen_device = generator.device if generator is not None else dirs.device
            rgb = torch.rand(k, 1, 3, generator=generator, device=gen_device).to(dirs.device)
            return rgb.expand(k, r, 3)
        d = dirs.float() / dirs.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.sigmoid(self.mlp(frequency_encoding(d, self.num_frequencies)).float())
