"""Volume-rendering compositing as pure PyTorch functions (the slow twin of nerfacc's kernels).

Two layouts of the same maths, with nerfacc's conventions:

- **fixed-count**: every ray has S samples, tensors ``[..., S]`` (values ``[..., S, D]``);
- **packed**: a flat list of ``N`` samples with ``ray_indices [N]`` (long, non-decreasing: the
  samples of one ray are contiguous and ordered front to back), as nerfacc's occupancy-grid
  marcher returns them; ``n_rays`` rays in all, rays without samples are allowed.

For sample i of a ray with density ``sigma_i`` over ``[t_start_i, t_end_i]``:
``alpha_i = 1 - exp(-sigma_i * delta_i)``, transmittance ``T_i = exp(-sum_{j<i} sigma_j delta_j)``,
weight ``w_i = T_i * alpha_i``; the ray's opacity is ``sum_i w_i = 1 - exp(-sum_i sigma_i delta_i)``.
"""

from __future__ import annotations

import torch


def alpha_from_density(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``alpha = 1 - exp(-sigma * (t_end - t_start))``, any shape."""
    return 1.0 - torch.exp(-sigmas * (t_ends - t_starts))


# ---------------------------------------------------------------------------------------------
# fixed-count samples [..., S]


def weights_from_density(
    t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[..., S]`` intervals and densities -> (weights, transmittance, alphas), each ``[..., S]``."""
    sigma_dt = sigmas * (t_ends - t_starts)
    alphas = 1.0 - torch.exp(-sigma_dt)
    # Exclusive cumulative sum along the samples: the optical depth in front of each sample.
    depth_before = torch.cumsum(sigma_dt, dim=-1) - sigma_dt
    trans = torch.exp(-depth_before)
    return trans * alphas, trans, alphas


def accumulate(weights: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i w_i v_i`` along the samples: weights ``[..., S]``, values ``[..., S, D]`` or None
    (accumulate the weights themselves) -> ``[..., D]`` (D = 1 for None)."""
    if values is None:
        return weights.sum(dim=-1, keepdim=True)
    if values.shape[:-1] != weights.shape:
        raise ValueError(f"values {tuple(values.shape)} do not match weights {tuple(weights.shape)} + [D]")
    return (weights[..., None] * values).sum(dim=-2)


# ---------------------------------------------------------------------------------------------
# packed samples [N] with ray_indices


def ray_starts(ray_indices: torch.Tensor, n_rays: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First sample index and sample count of every ray, each ``[n_rays]`` (nerfacc's packed_info)."""
    counts = torch.bincount(ray_indices, minlength=n_rays)
    if counts.numel() != n_rays:
        raise ValueError(f"ray_indices reach {int(ray_indices.max())} but n_rays is {n_rays}")
    starts = torch.cumsum(counts, dim=0) - counts
    return starts, counts


def weights_from_density_packed(
    t_starts: torch.Tensor,
    t_ends: torch.Tensor,
    sigmas: torch.Tensor,
    ray_indices: torch.Tensor,
    n_rays: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed ``[N]`` intervals and densities -> (weights, transmittance, alphas), each ``[N]``.

    The per-ray exclusive sum is a global cumulative sum (in float64, so long sample lists keep
    their precision) minus its value at the ray's first sample."""
    if not (t_starts.shape == t_ends.shape == sigmas.shape == ray_indices.shape) or sigmas.dim() != 1:
        raise ValueError(
            "packed samples need t_starts, t_ends, sigmas and ray_indices of one shape [N], got "
            f"{tuple(t_starts.shape)}, {tuple(t_ends.shape)}, {tuple(sigmas.shape)}, {tuple(ray_indices.shape)}"
        )
    sigma_dt = sigmas * (t_ends - t_starts)
    alphas = 1.0 - torch.exp(-sigma_dt)
    if sigmas.numel() == 0:
        return alphas, torch.ones_like(alphas), alphas
    starts, _ = ray_starts(ray_indices, n_rays)
    total = torch.cumsum(sigma_dt.double(), dim=0)
    exclusive = total - sigma_dt.double()
    depth_before = exclusive - exclusive[starts[ray_indices]]
    trans = torch.exp(-depth_before.to(sigmas.dtype))
    return trans * alphas, trans, alphas


def accumulate_packed(
    weights: torch.Tensor, values: torch.Tensor | None, ray_indices: torch.Tensor, n_rays: int
) -> torch.Tensor:
    """Scatter-add ``w_i v_i`` into rays: weights ``[N]``, values ``[N, D]`` or None -> ``[n_rays, D]``."""
    src = weights[:, None] if values is None else weights[:, None] * values
    out = torch.zeros(n_rays, src.shape[-1], device=src.device, dtype=src.dtype)
    return out.index_add(0, ray_indices, src)


def pack_fixed(
    t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-count ``[R, S]`` samples -> packed (t_starts, t_ends, sigmas, ray_indices), each ``[N]``,
    keeping the samples where ``keep [R, S]`` is True (all by default)."""
    n_rays, n_samples = sigmas.shape
    ray_indices = torch.arange(n_rays, device=sigmas.device)[:, None].expand(n_rays, n_samples)
    if keep is None:
        keep = torch.ones_like(sigmas, dtype=torch.bool)
    return t_starts[keep], t_ends[keep], sigmas[keep], ray_indices[keep]


def composite_background(rgb: torch.Tensor, opacity: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``rgb + (1 - opacity) * background``: rgb ``[..., 3]`` (premultiplied), opacity ``[..., 1]``."""
    return rgb + (1.0 - opacity) * background
