"""Regularisers as pure functions, one value per prompt.

Each is a sum over a prompt's own rays with weights 1/R_k (R_k = that prompt's ray count, zero
on the padding rays of prompts rendered smaller than the step's largest render), so K prompts
trained together get the gradients each would get alone.
"""

from __future__ import annotations

import torch


def ray_weights(arange_r: torch.Tensor, ray_count: torch.Tensor, inv_ray_count: torch.Tensor) -> torch.Tensor:
    """[K, R] weights: 1/R_k on a prompt's first R_k rays, 0 after. `arange_r` is arange(R),
    `ray_count` and `inv_ray_count` are [K, 1] float (R_k and 1/R_k)."""
    return (arange_r[None, :] < ray_count).float() * inv_ray_count


def opacity_entropy(opacity: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Binary entropy of each ray's opacity [K, R] (pushes rays to fully opaque or empty) -> [K]."""
    o = opacity.float().clamp(1e-5, 1 - 1e-5)
    return (weight * -(o * o.log() + (1 - o) * (1 - o).log())).sum(dim=1)


def opacity_sparsity(opacity: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean ray opacity [K, R] -> [K] (penalises density that is not needed)."""
    return (weight * opacity.float().clamp(1e-5, 1 - 1e-5)).sum(dim=1)


def orientation(orientation_rays: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """Ref-NeRF's orientation penalty per ray [K, R] (visible normals facing away from the camera)
    -> [K]; zeros when the renderer computed none."""
    if orientation_rays is None:
        return torch.zeros(weight.shape[0], device=weight.device)
    return (weight * orientation_rays.float()).sum(dim=1)
