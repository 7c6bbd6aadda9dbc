"""The density level at which a prompt's mesh is cut (``output.mesh_level``).

A NeRF's density has no level that is its surface: the renders show a surface wherever a ray's
accumulated opacity passes one half, and how dense the field is there depends on how sharp it
grew. A fixed level (``output.mesh_threshold``, 10 by default) that lies in the soft outer
edge of a field makes a mesh larger than what the renders show.

With ``mesh_level: opacity`` each prompt's level is read off its own renders: the scene is
rendered from `VIEWS_PER_RING` cameras on each of two rings (the validation elevation and
`TOP_ELEVATION_DEG`), and every candidate level (`LEVEL_STEPS` times ``mesh_threshold``) is scored
by how well the silhouettes of ``{density > level}`` (rays that meet such a point, cast through
a `LEVEL_GRID`^3 grid of the density) agree with the rendered ones (rays of opacity above one
half), as an IoU over all pixels. The levels within `PLATEAU` of the best IoU form a plateau (a
sharp field agrees at many levels); the mesh is cut at the plateau's middle. Nothing about the
prompt's object is known here: the level depends only on the field and its renders.

`silhouette_ious` (the densities' side) has a slow twin in the tests that marches the field
itself rather than its grid.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cameras import CameraBatch, get_rays, orbit_cameras
from ..config import MeshLevelMode
from ..render.sampling import ray_aabb_intersect

log = logging.getLogger(__name__)

MESH_LEVEL_MODES = typing.get_args(MeshLevelMode)
LEVEL_STEPS = tuple(2.0 ** (k / 4) for k in range(-24, 17))  # candidate levels over output.mesh_threshold: 1/64 .. 16
LEVEL_GRID = 64  # density grid per axis through which the level's silhouettes are cast
VIEWS_PER_RING = 6
TOP_ELEVATION_DEG = 60.0  # the second ring looks down on the object (a torus's hole, a cone's tip)
PLATEAU = 0.01  # levels whose silhouette IoU is within this of the best one
OPAQUE = 0.5  # a rendered pixel is in the silhouette above this opacity


@dataclass
class MeshLevel:
    """The level one prompt's mesh is cut at, and why."""

    threshold: float
    mode: str  # "fixed" or "opacity"
    fixed_threshold: float  # output.mesh_threshold
    silhouette_iou: float | None = None  # at `threshold` (opacity mode)
    silhouette_iou_fixed: float | None = None  # at `fixed_threshold` (opacity mode)
    ious: dict[str, float] = field(default_factory=dict)  # candidate level -> silhouette IoU

    def as_dict(self) -> dict:
        return {
            "threshold": self.threshold, "mode": self.mode, "fixed_threshold": self.fixed_threshold,
            "silhouette_iou": self.silhouette_iou, "silhouette_iou_fixed": self.silhouette_iou_fixed,
            "silhouette_iou_by_level": self.ious,
        }  # fmt: skip


def level_cameras(val_elevation: float, radius: float, fovy: float) -> CameraBatch:
    """The `2 * VIEWS_PER_RING` cameras the level is matched from."""
    rings = [orbit_cameras(VIEWS_PER_RING, e, radius, fovy) for e in (val_elevation, TOP_ELEVATION_DEG)]
    return CameraBatch.cat(rings)


def ray_max_density(volume: torch.Tensor, bound: float, rays_o: torch.Tensor, rays_d: torch.Tensor, samples: int) -> torch.Tensor:
    """The largest density along each ray ``[R, 3]`` through the box, trilinear in `volume`
    (``[G, G, G]`` indexed ``[ix, iy, iz]`` at `mesh.grid_coordinates`), from `samples` evenly
    spaced points between the ray's entry and exit -> ``[R]``; 0 for rays that miss the box."""
    near, far, hit = ray_aabb_intersect(rays_o, rays_d, bound)  # [R]
    u = (torch.arange(samples, dtype=torch.float32, device=rays_o.device) + 0.5) / samples
    t = near[:, None] + (far - near)[:, None] * u  # [R, S]
    x = rays_o[:, None] + t[..., None] * rays_d[:, None]  # [R, S, 3]
    grid = (x / bound).clamp(-1.0, 1.0)[None, None]  # [1, 1, R, S, 3], (x, y, z) order
    vol = volume.permute(2, 1, 0)[None, None].float()  # [1, 1, D=z, H=y, W=x]
    sigma = F.grid_sample(vol, grid, mode="bilinear", align_corners=True)[0, 0, 0]  # [R, S]
    return torch.where(hit, sigma.amax(dim=-1), torch.zeros_like(near))


def silhouette_ious(max_density: torch.Tensor, opaque: torch.Tensor, levels: list[float]) -> list[float]:
    """Per level, the IoU of the rays that meet ``{density > level}`` (`max_density` [R]) with
    the rays rendered opaque (`opaque` [R] bool)."""
    out = []
    for level in levels:
        hit = max_density > level
        union = int((hit | opaque).sum())
        out.append(int((hit & opaque).sum()) / union if union else 0.0)
    return out


def plateau_level(levels: list[float], ious: list[float], plateau: float = PLATEAU) -> int:
    """Index of the level in the middle of those whose IoU is within `plateau` of the best
    (levels ascending; with an even count, the lower middle)."""
    best = max(ious)
    near_best = [i for i, v in enumerate(ious) if v >= best - plateau]
    return near_best[(len(near_best) - 1) // 2]


def choose_level(volume: torch.Tensor, bound: float, opacity: torch.Tensor, rays_o: torch.Tensor, rays_d: torch.Tensor,
                 fixed_threshold: float) -> MeshLevel:  # fmt: skip
    """`MeshLevel` of one prompt from its density grid `volume` [G, G, G] and its renders'
    opacity [R] along rays ``[R, 3]``. Falls back to `fixed_threshold` when nothing renders
    opaque or no candidate level crosses the grid's density range."""
    lo, hi = float(volume.min()), float(volume.max())
    levels = [fixed_threshold * s for s in LEVEL_STEPS if lo < fixed_threshold * s <= hi]
    opaque = opacity > OPAQUE
    if not levels or not bool(opaque.any()):
        log.warning("mesh level: %s; cutting at the fixed level %g",
                    "nothing renders opaque" if levels else "the density never crosses a candidate level", fixed_threshold)  # fmt: skip
        return MeshLevel(fixed_threshold, "fixed", fixed_threshold)
    max_density = ray_max_density(volume, bound, rays_o, rays_d, samples=2 * volume.shape[0])
    ious = silhouette_ious(max_density, opaque, levels)
    best = plateau_level(levels, ious)
    at_fixed = silhouette_ious(max_density, opaque, [fixed_threshold])[0]
    return MeshLevel(levels[best], "opacity", fixed_threshold, ious[best], at_fixed,
                     {f"{v:.4g}": iou for v, iou in zip(levels, ious)})  # fmt: skip


@torch.no_grad()
def opacity_levels(renderer, cfg, density_grids: list[torch.Tensor]) -> list[MeshLevel]:
    """Per prompt of `renderer`'s scene, `choose_level` from its density grid (`LEVEL_GRID`^3,
    on the scene's box) and its albedo renders from `level_cameras` at ``camera.render_size``."""
    k, size, bound = renderer.num_prompts, cfg.camera.render_size, cfg.field.bound
    cams = level_cameras(cfg.camera.val_elevation, cfg.camera.val_radius, cfg.camera.val_fovy)
    device = next(renderer.parameters()).device
    opacity, rays_o, rays_d = [], [], []
    for i in range(len(cams)):
        one = cams.take(i)
        out = renderer.render_image(one.repeated(k).to(device), size, size, shading="albedo", ambient_ratio=cfg.render.ambient_ratio)
        opacity.append(out["opacity"].reshape(k, -1).float().cpu())  # [K, H*W]
        o, d = get_rays(one, size, size)  # [1, H*W, 3]
        rays_o.append(o[0].float())
        rays_d.append(d[0].float())
    opacity_all, o_all, d_all = torch.cat(opacity, dim=1), torch.cat(rays_o), torch.cat(rays_d)
    return [choose_level(density_grids[p].cpu(), bound, opacity_all[p], o_all, d_all, cfg.output.mesh_threshold) for p in range(k)]
