"""Small MLPs whose weights are stacked over K prompts and applied with batched matmuls."""

from __future__ import annotations

import math

import torch
from torch import nn


class StackedLinear(nn.Module):
    """K independent linear layers: ``[K, N, in] -> [K, N, out]`` with weights ``[K, in, out]``.

    Initialised like `nn.Linear` (uniform in +-1/sqrt(in)), independently per prompt.
    """

    def __init__(self, num_prompts: int, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num_prompts, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_prompts, 1, out_dim).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        weight = self.weight if prompts is None else self.weight[prompts]
        if x.dim() != 3 or x.shape[0] != weight.shape[0] or x.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"expected input of shape [{weight.shape[0]}, N, {weight.shape[1]}], got {tuple(x.shape)}"
            )
        if self.bias is None:
            return torch.bmm(x, weight.to(x.dtype))
        bias = self.bias if prompts is None else self.bias[prompts]
        return torch.baddbmm(bias.to(x.dtype), x, weight.to(x.dtype))

    def extra_repr(self) -> str:
        k, i, o = self.weight.shape
        return f"prompts={k}, in={i}, out={o}, bias={self.bias is not None}"


class StackedMLP(nn.Module):
    """ReLU MLP of `num_layers` stacked linear layers: ``[K, N, in] -> [K, N, out]``."""

    def __init__(self, num_prompts: int, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"an MLP needs at least one layer, got num_layers={num_layers!r}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(StackedLinear(num_prompts, a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, prompts)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def forward_with_input_gradient(
        self, x: torch.Tensor, prompts: slice | None = None, output: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [K, N, in]`` -> (``out [K, N, out]``, ``d out[..., output] / d x [K, N, in]``).

        The gradient is one reverse-mode pass written out (ReLU masks, transposed weights), with
        ordinary ops: itself differentiable w.r.t. the weights, biases and `x`, so a loss on it
        (e.g. on normals) trains the MLP without double backward. The ReLU derivative is taken as
        ``pre > 0``, as autograd does.
        """
        masks = []
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, prompts)
            if i < len(self.layers) - 1:
                masks.append(h > 0)
                h = torch.relu(h)
        weights = [layer.weight if prompts is None else layer.weight[prompts] for layer in self.layers]
        g = weights[-1][:, None, :, output].to(h.dtype)  # [K, 1, in_last]
        for mask, weight in zip(reversed(masks), reversed(weights[:-1])):
            g = g * mask  # [K, N, out_i]
            g = torch.bmm(g, weight.transpose(1, 2).to(g.dtype))  # [K, N, in_i]
        if g.shape[1] != x.shape[1]:  # a single layer: the gradient is the weight row for every point
            g = g.expand(-1, x.shape[1], -1)
        return h, g
