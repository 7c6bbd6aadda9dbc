"""Where along a ray to sample: ray/box intersection and stratified samples (pure functions)."""

from __future__ import annotations

import torch


def ray_aabb_intersect(
    rays_o: torch.Tensor, rays_d: torch.Tensor, bound: float, near_plane: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit of rays ``[..., 3]`` through the box ``[-bound, bound]^3`` (slab test).

    Returns (near ``[...]``, far ``[...]``, hit ``[...]`` bool). The entry is clamped to
    `near_plane` (a camera inside the box starts there); rays that miss the box, or whose box lies
    behind them, have ``hit`` False and ``near == far == near_plane``."""
    tiny = 1e-9
    d = torch.where(rays_d.abs() < tiny, torch.full_like(rays_d, tiny) * torch.where(rays_d < 0, -1.0, 1.0), rays_d)
    inv = 1.0 / d
    t0 = (-bound - rays_o) * inv
    t1 = (bound - rays_o) * inv
    t_enter = torch.minimum(t0, t1).amax(dim=-1)
    t_exit = torch.maximum(t0, t1).amin(dim=-1)
    near = t_enter.clamp_min(near_plane)
    hit = t_exit > near
    near = torch.where(hit, near, torch.full_like(near, near_plane))
    far = torch.where(hit, t_exit, near)
    return near, far, hit


def stratified_intervals(
    near: torch.Tensor,
    far: torch.Tensor,
    num_samples: int,
    jitter: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``[near, far]`` (each ``[...]``) into `num_samples` equal bins.

    Returns (t_starts, t_ends, t_samples), each ``[..., S]``: the bins, and one sample per bin, at
    its centre or, with `jitter`, uniformly inside it (random numbers from `generator`, on the
    generator's device, when given)."""
    if num_samples < 1:
        raise ValueError(f"render.num_samples must be at least 1, got {num_samples!r}")
    u = torch.linspace(0.0, 1.0, num_samples + 1, device=near.device, dtype=near.dtype)
    edges = near[..., None] + (far - near)[..., None] * u  # [..., S + 1]
    t_starts, t_ends = edges[..., :-1], edges[..., 1:]
    if jitter:
        shape = t_starts.shape
        gen_device = generator.device if generator is not None else near.device
        r = torch.rand(shape, generator=generator, device=gen_device, dtype=near.dtype).to(near.device)
    else:
        r = torch.full_like(t_starts, 0.5)
    return t_starts, t_ends, t_starts + (t_ends - t_starts) * r
