"""Camera poses and rays: DreamFusion's random training views, circular orbits for validation.

World frame: z is up; a camera at azimuth 0 sits on the +x axis and sees the object's front;
azimuth grows counter-clockwise seen from above; elevation is measured from the xy-plane.
Cameras use the OpenGL convention (looking down their own -z, y up). Poses carry a leading
prompt dimension K: one view per prompt per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .config import CameraConfig


@dataclass
class CameraBatch:
    c2w: torch.Tensor  # [K, 4, 4] camera-to-world
    fovy_deg: torch.Tensor  # [K]
    elevation_deg: torch.Tensor  # [K]
    azimuth_deg: torch.Tensor  # [K], in (-180, 180]
    radius: torch.Tensor  # [K]
    light_dir: torch.Tensor  # [K, 3] unit vector from the object towards the light

    @property
    def position(self) -> torch.Tensor:  # [K, 3]
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> "CameraBatch":
        return CameraBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def take(self, index: int | slice | torch.Tensor) -> "CameraBatch":
        """The cameras at `index`: an int gives a batch of one, a slice or index tensor a batch of them."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return CameraBatch(**{k: v[index] for k, v in self.__dict__.items()})

    def repeated(self, k: int) -> "CameraBatch":
        """A batch of one camera as `k` copies of it (one per prompt)."""
        if len(self) != 1:
            raise ValueError(f"repeated() takes a batch of one camera, got {len(self)}")
        return CameraBatch(**{n: t.expand(k, *t.shape[1:]).contiguous() for n, t in self.__dict__.items()})

    @staticmethod
    def cat(batches: "list[CameraBatch]") -> "CameraBatch":
        """The cameras of `batches`, in order."""
        return CameraBatch(**{f: torch.cat([getattr(b, f) for b in batches]) for f in batches[0].__dict__})


def look_at_origin(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Camera-to-world matrices [K, 4, 4] for cameras on a sphere looking at the origin."""
    e = torch.deg2rad(elevation_deg.double())
    a = torch.deg2rad(azimuth_deg.double())
    pos = radius.double()[:, None] * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], dim=-1)
    forward = -pos / pos.norm(dim=-1, keepdim=True)
    # The right vector follows from the azimuth alone, so it stays defined straight overhead.
    right = torch.stack([-a.sin(), a.cos(), torch.zeros_like(a)], dim=-1)
    up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(pos.shape[0], 4, 4, dtype=torch.float64)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = pos
    c2w[:, 3, 3] = 1.0
    return c2w.float()


def _uniform(lo_hi: tuple[float, float], n: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _elevations(cfg: CameraConfig, u: torch.Tensor) -> torch.Tensor:
    """Shares `u` [n] float64 in [0, 1) -> degrees in ``cfg.elevation_range``: uniform on the
    sphere's band (``sphere``, so overhead views are as rare as their solid angle) or uniform in
    degrees (``angle``)."""
    if cfg.elevation_sampling == "angle":
        lo, hi = cfg.elevation_range
        return lo + (hi - lo) * u
    if cfg.elevation_sampling != "sphere":
        raise ValueError(f"camera.elevation_sampling must be 'sphere' or 'angle', got {cfg.elevation_sampling!r}")
    lo, hi = (math.sin(math.radians(v)) for v in cfg.elevation_range)
    return torch.rad2deg(torch.asin(lo + (hi - lo) * u))


def cameras_at(cfg: CameraConfig, progress: float) -> CameraConfig:
    """The training cameras' settings at `progress` (step / iters) of a run: elevations drawn
    uniform in degrees while ``progress < cfg.angle_until``, by ``cfg.elevation_sampling`` after."""
    if not 0.0 <= cfg.angle_until <= 1.0:
        raise ValueError(f"camera.angle_until must be a share of the run's steps in [0, 1], got {cfg.angle_until!r}")
    if progress < cfg.angle_until and cfg.elevation_sampling != "angle":
        return replace(cfg, elevation_sampling="angle")
    return cfg


def sample_random_cameras(n: int, cfg: CameraConfig, generator: torch.Generator, shares: torch.Tensor | None = None) -> CameraBatch:
    """DreamFusion's training distribution; sampled on the CPU from `generator` (reproducible).
    `shares` [n, 2] in [0, 1), when given, place the cameras' elevations and azimuths in their
    ranges instead of the generator's draws (``camera.sequence stratified``: `sequence.py`); the
    generator draws them all the same, so radius, field of view and light do not change."""
    radius = _uniform(cfg.radius_range, n, generator)
    u_elevation = torch.rand(n, generator=generator, dtype=torch.float64)
    u_azimuth = torch.rand(n, generator=generator, dtype=torch.float64)
    if shares is not None:
        if shares.shape != (n, 2):
            raise ValueError(f"camera shares must be [{n}, 2] (azimuth, elevation), got {tuple(shares.shape)}")
        u_azimuth, u_elevation = shares.double().unbind(-1)
    elevation = _elevations(cfg, u_elevation)
    lo, hi = cfg.azimuth_range
    azimuth = lo + (hi - lo) * u_azimuth
    azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    fovy = _uniform(cfg.fovy_range, n, generator)
    c2w = look_at_origin(elevation, azimuth, radius)
    # A point light near the camera (DreamFusion samples it around the camera position).
    dist = _uniform(cfg.light_distance_range, n, generator)
    light = c2w[:, :3, 3].double() * dist[:, None] + 0.3 * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    light_dir = light / light.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return CameraBatch(c2w, fovy.float(), elevation.float(), azimuth.float(), radius.float(), light_dir.float())


def orbit_cameras(
    n: int,
    elevation_deg: float,
    radius: float,
    fovy_deg: float,
    light_dir: tuple[float, float, float] | None = None,
) -> CameraBatch:
    """`n` cameras evenly spaced in azimuth, starting at the front; the light follows the camera
    unless a fixed world-space `light_dir` is given (relighting)."""
    azimuth = torch.arange(n, dtype=torch.float64) * (360.0 / n)
    azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    elevation = torch.full((n,), float(elevation_deg), dtype=torch.float64)
    r = torch.full((n,), float(radius), dtype=torch.float64)
    c2w = look_at_origin(elevation, azimuth, r)
    if light_dir is None:
        light = c2w[:, :3, 3]
    else:
        light = torch.tensor(light_dir, dtype=torch.float32).expand(n, 3)
        if float(light.norm(dim=-1)[0]) == 0.0:
            raise ValueError(f"light direction {light_dir!r} has zero length")
    light = light / light.norm(dim=-1, keepdim=True)
    fovy = torch.full((n,), float(fovy_deg))
    return CameraBatch(c2w, fovy, elevation.float(), azimuth.float(), r.float(), light.float())


def get_rays(cams: CameraBatch, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions, each [K, H*W, 3], pixel centres in row-major order."""
    device = cams.c2w.device
    focal = 0.5 * height / torch.tan(torch.deg2rad(cams.fovy_deg) / 2)  # [K]
    i, j = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32) + 0.5,
        torch.arange(width, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    x = (j.reshape(-1) - width / 2)[None, :] / focal[:, None]  # [K, HW]
    y = -(i.reshape(-1) - height / 2)[None, :] / focal[:, None]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [K, HW, 3]
    rot = cams.c2w[:, :3, :3]
    dirs = torch.einsum("kij,knj->kni", rot, dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = cams.c2w[:, None, :3, 3].expand_as(dirs)
    return origins.contiguous(), dirs.contiguous()
