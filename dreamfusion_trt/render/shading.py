"""Per-sample shading (pure functions), applied before compositing along the ray.

Modes (DreamFusion): ``albedo`` (the raw colour), ``lambertian`` (albedo lit by a directional
light plus ambient), ``textureless`` (white material, same lighting: shape without texture),
``normal`` ((n + 1) / 2 as colour, for visualisation). Light directions point from the scene
towards the light.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

ShadingMode = Literal["albedo", "lambertian", "textureless", "normal"]
SHADING_MODES: tuple[str, ...] = ("albedo", "lambertian", "textureless", "normal")
NEEDS_NORMALS: frozenset[str] = frozenset({"lambertian", "textureless", "normal"})


def diffuse_term(normals: torch.Tensor, light_dir: torch.Tensor, ambient_ratio: float) -> torch.Tensor:
    """``ambient + (1 - ambient) * max(0, n . l)``: normals/light ``[..., 3]`` -> ``[..., 1]``."""
    n_dot_l = (normals * light_dir).sum(dim=-1, keepdim=True).clamp_min(0.0)
    return ambient_ratio + (1.0 - ambient_ratio) * n_dot_l


def lambertian(
    albedo: torch.Tensor, normals: torch.Tensor, light_dir: torch.Tensor, ambient_ratio: float
) -> torch.Tensor:
    """``albedo * (ambient + (1 - ambient) * max(0, n . l))``, all ``[..., 3]``."""
    return albedo * diffuse_term(normals, light_dir, ambient_ratio)


def textureless(normals: torch.Tensor, light_dir: torch.Tensor, ambient_ratio: float) -> torch.Tensor:
    """The lambertian term on a white material: grey levels ``[..., 3]``."""
    return diffuse_term(normals, light_dir, ambient_ratio).expand(*normals.shape[:-1], 3)


def normal_color(normals: torch.Tensor) -> torch.Tensor:
    """World normals ``[..., 3]`` in [-1, 1] mapped to colours in [0, 1]."""
    return (normals + 1.0) * 0.5


def shade(
    mode: str,
    albedo: torch.Tensor,
    normals: torch.Tensor | None,
    light_dir: torch.Tensor | None,
    ambient_ratio: float,
) -> torch.Tensor:
    """Colour ``[..., 3]`` of each sample in `mode`; `light_dir` broadcasts against `normals`."""
    if mode == "albedo":
        return albedo
    if mode not in NEEDS_NORMALS:
        raise ValueError(f"shading must be one of {', '.join(SHADING_MODES)}, got {mode!r}")
    if normals is None:
        raise ValueError(f"shading {mode!r} needs normals")
    if mode == "normal":
        return normal_color(normals)
    if light_dir is None:
        raise ValueError(f"shading {mode!r} needs a light direction")
    if not 0.0 <= ambient_ratio <= 1.0:
        raise ValueError(f"ambient_ratio must be in [0, 1], got {ambient_ratio!r}")
    if mode == "lambertian":
        return lambertian(albedo, normals, light_dir, ambient_ratio)
    return textureless(normals, light_dir, ambient_ratio)


def shade_per_prompt(
    modes: Sequence[str],
    index: torch.Tensor,
    albedo: torch.Tensor,
    normals: torch.Tensor | None,
    light_dir: torch.Tensor | None,
    ambient_ratio: float,
) -> torch.Tensor:
    """Colour ``[..., 3]`` where each sample takes ``modes[index]``: `index` (long) is the mode of
    each sample, broadcastable against ``albedo[..., 0]``. Every listed mode is evaluated and
    the choice is made on the device, so nothing waits for the host."""
    if not modes:
        raise ValueError("shade_per_prompt needs at least one mode")
    out = shade(modes[0], albedo, normals, light_dir, ambient_ratio)
    for i, mode in enumerate(modes[1:], start=1):
        out = torch.where((index == i)[..., None], shade(mode, albedo, normals, light_dir, ambient_ratio), out)
    return out
