"""What one training step does for each of K slots, decided before it runs: the typed step plan.

The host decides each slot's phase, render size, camera, shading and view from the slot's CPU
generator; the numbers the device needs go up in one pinned, non-blocking copy and come back as
named views (`StepPlan`); then each slot's device generator draws, always in this order, its ray
jitter, background, timestep and noise. Empty slots get placeholders (static shapes) and draw
nothing. Slots rendered smaller than the step's largest render are padded with rays that miss
the scene.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..cameras import CameraBatch, cameras_at, get_rays, orbit_cameras, sample_random_cameras
from ..config import RunConfig
from ..guidance.text import view_indices
from ..render.renderer import to_device_async
from ..render.shading import SHADING_MODES

# The per-slot numbers uploaded each step, in this order, with their widths.
_UPLOAD = (("c2w", 16), ("fovy", 1), ("elevation", 1), ("azimuth", 1), ("radius", 1), ("light", 3),
           ("view_row", 1), ("shading", 1), ("inv_rays", 1), ("rays", 1), ("order", 1))  # fmt: skip


@dataclass
class RenderGroup:
    """Slots rendered at one size in one phase: `members` (slot order), at positions start:stop of `order`."""

    phase: str
    size: int
    start: int
    stop: int
    members: list[int]


@dataclass
class HostPlan:
    """The host's choices for one step; `upload` packs the numbers the device needs [K, 28]."""

    phases: list[str]  # [K]
    shadings: list[str]  # [K]
    sizes: list[int]  # [K] render size of each slot
    groups: list[RenderGroup]
    rays: int  # R: rays per slot this step (the largest render's pixel count)
    upload: torch.Tensor  # [K, 28] CPU, columns named by _UPLOAD


@dataclass
class StepPlan:
    phases: list[str]  # [K] host side
    shadings: list[str]  # [K]
    groups: list[RenderGroup]
    rays: int  # R: rays per slot this step (the largest render's pixel count)
    cameras: CameraBatch  # [K] on the device
    view_row: torch.Tensor  # [K] long, row of each slot's text embedding in the cond table
    shading: torch.Tensor  # [K] long, index into SHADING_MODES
    ray_count: torch.Tensor  # [K, 1] float, R_k
    inv_ray_count: torch.Tensor  # [K, 1] float, 1 / R_k
    order: torch.Tensor  # [K] long, slots group by group (the groups' concatenated members)
    jitter: list[torch.Tensor] | None  # K draws [1, R_k, S] (torch renderer), else None
    background: torch.Tensor | None  # [K, 1, 3] (random background), else None
    t: torch.Tensor  # [K] long
    noise: list[torch.Tensor]  # K draws [1, C, h, w], each in its phase's latent shape


def _pack(columns: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    pack = torch.empty(k, sum(w for _, w in _UPLOAD))
    col = 0
    for name, width in _UPLOAD:
        pack[:, col : col + width] = columns[name].reshape(k, width)
        col += width
    return pack


def _unpack(pack: torch.Tensor) -> dict[str, torch.Tensor]:
    out, col = {}, 0
    for name, width in _UPLOAD:
        out[name] = pack[:, col : col + width]
        col += width
    return out


def host_plan(slots: Sequence, cfg: RunConfig, phase_of: Callable, shading_of: Callable, render_size: dict[str, int],
              num_views: int) -> HostPlan:  # fmt: skip
    """Host-side choices of one step, from the slots' CPU generators only."""
    k_all = len(slots)
    busy = [s for s in slots if s is not None]
    idle_phase = phase_of(busy[0]) if busy else "latent"
    phases, cams, shadings = [], [], []
    for slot in slots:
        if slot is None:
            phases.append(idle_phase)
            cams.append(orbit_cameras(1, cfg.camera.val_elevation, cfg.camera.val_radius, cfg.camera.val_fovy))
            shadings.append("albedo")
            continue
        phases.append(phase_of(slot))
        shares = torch.tensor([slot.sequence_point()[:2]], dtype=torch.float64) if cfg.camera.sequence == "stratified" else None
        cams.append(sample_random_cameras(1, cameras_at(cfg.camera, slot.step / slot.iters), slot.cpu_gen, shares))
        shadings.append(shading_of(slot))
    sizes = [render_size[p] for p in phases]
    rays = max(sizes) ** 2
    groups, order = [], []
    for phase in ("latent", "rgb"):
        members = [k for k in range(k_all) if phases[k] == phase]
        if members:
            groups.append(RenderGroup(phase, render_size[phase], len(order), len(order) + len(members), members))
            order += members
    cam = CameraBatch.cat(cams)
    views = view_indices(cam.elevation_deg, cam.azimuth_deg, cfg.prompt)
    pack = _pack({
        "c2w": cam.c2w, "fovy": cam.fovy_deg, "elevation": cam.elevation_deg, "azimuth": cam.azimuth_deg,
        "radius": cam.radius, "light": cam.light_dir, "view_row": torch.arange(k_all) * num_views + views,
        "shading": torch.tensor([float(SHADING_MODES.index(s)) for s in shadings]),
        "inv_rays": torch.tensor([1.0 / (s * s) for s in sizes], dtype=torch.float32),
        "rays": torch.tensor([float(s * s) for s in sizes]), "order": torch.tensor(order, dtype=torch.float32),
    }, k_all)  # fmt: skip
    return HostPlan(phases, shadings, sizes, groups, rays, pack)


def device_plan(host: HostPlan, slots: Sequence, device: torch.device, num_samples: int, jitter: bool, random_background: bool,
                noise_shape: dict[str, tuple[int, int, int]], sample_t: Callable, placeholder_t: int,
                t_sequence: str = "random") -> StepPlan:  # fmt: skip
    """`host_plan`'s numbers uploaded in one non-blocking copy, plus each slot's device draws
    (each slot's timestep placed in its range as `t_sequence`, ``sds.t_sequence``, says)."""
    phases = host.phases
    cols = _unpack(to_device_async(host.upload, device))
    k_all = len(slots)
    cam = CameraBatch(cols["c2w"].reshape(k_all, 4, 4), cols["fovy"][:, 0], cols["elevation"][:, 0], cols["azimuth"][:, 0],
                      cols["radius"][:, 0], cols["light"])  # fmt: skip
    jitters, backgrounds, ts, noises = [], [], [], []
    for k, slot in enumerate(slots):
        r_k = host.sizes[k] ** 2
        shape = (1, *noise_shape[phases[k]])
        if slot is None:
            jitters.append(torch.full((1, r_k, num_samples), 0.5, device=device))
            backgrounds.append(torch.full((1, 1, 3), 0.5, device=device))
            ts.append(torch.full((1,), placeholder_t, dtype=torch.long, device=device))
            noises.append(torch.zeros(shape, device=device))
            continue
        g = slot.dev_gen
        if jitter:
            jitters.append(torch.rand((1, r_k, num_samples), generator=g, device=device))
        if random_background:
            backgrounds.append(torch.rand((1, 1, 3), generator=g, device=device))
        ts.append(sample_t(slot.step / slot.iters, g, device, share=_t_share(slot, t_sequence)))
        noises.append(torch.randn(shape, generator=g, device=device))
    return StepPlan(
        phases=phases, shadings=host.shadings, groups=host.groups, rays=host.rays, cameras=cam, view_row=cols["view_row"][:, 0].long(),
        shading=cols["shading"][:, 0].long(), ray_count=cols["rays"], inv_ray_count=cols["inv_rays"],
        order=cols["order"][:, 0].long(), jitter=jitters if jitter else None,
        background=torch.cat(backgrounds) if random_background else None, t=torch.cat(ts), noise=noises,
    )  # fmt: skip


def _t_share(slot, t_sequence: str) -> float | None:
    """Where in its range the slot's timestep lies this step (``sds.t_sequence``): None for a
    draw (random), its low-discrepancy point (stratified), or falling from the top at the first
    step to the bottom at the last (decreasing)."""
    if t_sequence == "random":
        return None
    if t_sequence == "stratified":
        return slot.sequence_point()[2]
    if t_sequence == "decreasing":
        return (slot.iters - 1 - min(slot.step, slot.iters - 1)) / slot.iters
    raise ValueError(f"unknown sds.t_sequence {t_sequence!r} (expected random, stratified or decreasing)")


def plan_rays(plan: StepPlan, pad_ray: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rays [K, R, 3] (origins, directions; slots rendered smaller than R padded with `pad_ray`
    [2, 3], a ray that misses the scene) and the jitter [K, R, S] (None without jitter)."""
    cam, k_all, rays = plan.cameras, plan.order.shape[0], plan.rays
    groups = plan.groups
    if len(groups) == 1 and groups[0].size**2 == rays:  # every slot at one size, in slot order
        rays_o, rays_d = get_rays(cam, groups[0].size, groups[0].size)
        return rays_o, rays_d, torch.cat(plan.jitter) if plan.jitter is not None else None
    rays_o = pad_ray[0].expand(k_all, rays, 3).clone()
    rays_d = pad_ray[1].expand(k_all, rays, 3).clone()
    for g in groups:
        idx = plan.order[g.start : g.stop]
        sub = CameraBatch(*(getattr(cam, f.name)[idx] for f in dataclasses.fields(CameraBatch)))
        o, d = get_rays(sub, g.size, g.size)
        rays_o[:, : g.size**2].index_copy_(0, idx, o)
        rays_d[:, : g.size**2].index_copy_(0, idx, d)
    jitter = None
    if plan.jitter is not None:
        jitter = torch.full((k_all, rays, num_samples), 0.5, device=rays_o.device)
        for k, draw in enumerate(plan.jitter):
            jitter[k, : draw.shape[1]] = draw[0]
    return rays_o, rays_d, jitter


_PLAN_TENSORS = ("view_row", "shading", "ray_count", "inv_ray_count", "order", "t")


def plan_tensors(plan: StepPlan) -> list[torch.Tensor]:
    """Every device tensor of a plan, in a fixed order: the cameras' fields, the named tensors,
    then the jitter draws, the background and the noise draws (those present)."""
    out = [getattr(plan.cameras, f.name) for f in dataclasses.fields(CameraBatch)]
    out += [getattr(plan, name) for name in _PLAN_TENSORS]
    out += list(plan.jitter or [])
    out += [plan.background] if plan.background is not None else []
    return out + list(plan.noise)


def with_tensors(plan: StepPlan, tensors: Sequence[torch.Tensor]) -> StepPlan:
    """`plan` with its device tensors replaced by `tensors` (in `plan_tensors`' order); the
    host side (phases, shadings, groups, rays) stays."""
    it = iter(tensors)
    cameras = CameraBatch(*(next(it) for _ in dataclasses.fields(CameraBatch)))
    named = {name: next(it) for name in _PLAN_TENSORS}
    jitter = [next(it) for _ in plan.jitter] if plan.jitter is not None else None
    background = next(it) if plan.background is not None else None
    noise = [next(it) for _ in plan.noise]
    if next(it, None) is not None:
        raise ValueError(f"expected {len(plan_tensors(plan))} plan tensors, got {len(tensors)}")
    return dataclasses.replace(plan, cameras=cameras, jitter=jitter, background=background, noise=noise, **named)
