"""Analytic objects with known answers: shapes from signed distance functions, colours by name.

Each object is a `AnalyticObject`, a drop-in for `NeRFField` (``num_prompts``, ``bound``,
``density``, ``forward``, ``normals``, ``query``), so the project's own `Renderer` renders it and
the training renders of the built-in prior come out of the same code path as a NeRF's. The K
"prompts" all show the same object: build it with ``num_prompts=K`` to render K cameras at once.

- Shapes (z is up, centred at the origin, inside ``[-0.5, 0.5]^3``): cube, sphere, cone (apex up),
  torus (lying in the xy-plane), cylinder (axis z). Their SDFs are exact Euclidean distances, so
  ``x - sdf(x) * grad sdf(x)`` is the nearest surface point.
- Density: ``density_scale * sigmoid(-(sdf + offset) / width)``: a sharp shell, ``density_scale / 2``
  on the surface itself (``offset`` 0) or ``offset`` inside it. A ray that grazes the object runs a
  long way through the soft edge, so its rendered silhouette lies outside the surface (by about a
  pixel of the prior's renders at width 0.01); an ``offset`` moves the density in by that much, so
  the renders show the object at its own size. The solid (``sdf``, ``occupancy``) is the same at
  any offset. Outside ``[-bound, bound]^3`` the density is zero, as in `NeRFField`.
- Albedo: one colour, or for the six-colored cube one colour per face, picked by the dominant
  axis of the point (``FACES`` order: +x, -x, +y, -y, +z, -z). The camera at azimuth 0 (the
  front view) looks at the +x face, the back view at -x, overhead at +z.
- Normals: the normalised SDF gradient (exact, by autograd through the SDF), outward.

`KNOWN_OBJECTS` maps captions (``"a red cube"``) to `ObjectSpec`; `resolve_caption` turns a run's
prompt into one of them (ValueError listing the known captions otherwise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..field.nerf import FieldOutput

SdfFn = Callable[[torch.Tensor], torch.Tensor]  # [..., 3] -> [...]

# Colours in [0, 1]: saturated but away from 0/1, where a sigmoid albedo head can reach them.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.12, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
FACES = ("+x", "-x", "+y", "-y", "+z", "-z")
SIX_FACE_COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")  # per entry of FACES
SIX_COLORED_CAPTION = "a six-colored cube"

DEFAULT_DENSITY_SCALE = 200.0  # sigma deep inside; sigma * 0.02 (a march step) ~ 4, nearly opaque
DEFAULT_WIDTH = 0.01  # world units over which the density falls from ~73 % to ~27 % of the scale


# ---------------------------------------------------------------------------------------------
# signed distance functions (pure), x [..., 3] -> [...]


def sd_box(x: torch.Tensor, half: tuple[float, float, float]) -> torch.Tensor:
    q = x.abs() - x.new_tensor(half)
    outside = q.clamp_min(0.0).norm(dim=-1)
    inside = q.amax(dim=-1).clamp_max(0.0)
    return outside + inside


def sd_sphere(x: torch.Tensor, radius: float) -> torch.Tensor:
    return x.norm(dim=-1) - radius


def _segment_distance(p: torch.Tensor, a: tuple[float, float], b: tuple[float, float]) -> torch.Tensor:
    """Distance from 2D points ``p [..., 2]`` to the segment a-b."""
    a_t, b_t = p.new_tensor(a), p.new_tensor(b)
    ab = b_t - a_t
    s = ((p - a_t) * ab).sum(dim=-1, keepdim=True) / (ab * ab).sum()
    return (p - a_t - s.clamp(0.0, 1.0) * ab).norm(dim=-1)


def _radial(x: torch.Tensor) -> torch.Tensor:
    # sqrt of a clamped square: finite gradient on the axis
    return (x[..., 0].square() + x[..., 1].square()).clamp_min(1e-12).sqrt()


def sd_cone(x: torch.Tensor, radius: float, half_height: float) -> torch.Tensor:
    """Solid cone, base disc of `radius` at z = -half_height, apex at z = +half_height: the
    distance in the (radial, z) half-plane to its base segment and slanted side."""
    rho, z = _radial(x), x[..., 2]
    p = torch.stack([rho, z], dim=-1)
    h = half_height
    d = torch.minimum(_segment_distance(p, (0.0, -h), (radius, -h)), _segment_distance(p, (radius, -h), (0.0, h)))
    inside = (z >= -h) & (rho <= radius * (h - z) / (2.0 * h))
    return torch.where(inside, -d, d)


def sd_torus(x: torch.Tensor, major: float, minor: float) -> torch.Tensor:
    """Torus around the z axis (lying in the xy-plane)."""
    q = torch.stack([_radial(x) - major, x[..., 2]], dim=-1)
    return q.norm(dim=-1) - minor


def sd_cylinder(x: torch.Tensor, radius: float, half_height: float) -> torch.Tensor:
    """Capped cylinder with axis z."""
    d = torch.stack([_radial(x) - radius, x[..., 2].abs() - half_height], dim=-1)
    return d.amax(dim=-1).clamp_max(0.0) + d.clamp_min(0.0).norm(dim=-1)


@dataclass(frozen=True)
class ShapeSpec:
    sdf: SdfFn
    half_extent: tuple[float, float, float]  # axis-aligned bounding box of the solid


TORUS_MAJOR, TORUS_MINOR = 0.34, 0.14  # the torus's ring radius and tube radius, world units

SHAPES: dict[str, ShapeSpec] = {
    "cube": ShapeSpec(lambda x: sd_box(x, (0.4, 0.4, 0.4)), (0.4, 0.4, 0.4)),
    "sphere": ShapeSpec(lambda x: sd_sphere(x, 0.45), (0.45, 0.45, 0.45)),
    "cone": ShapeSpec(lambda x: sd_cone(x, 0.45, 0.45), (0.45, 0.45, 0.45)),
    "torus": ShapeSpec(lambda x: sd_torus(x, TORUS_MAJOR, TORUS_MINOR), (0.48, 0.48, 0.14)),
    "cylinder": ShapeSpec(lambda x: sd_cylinder(x, 0.35, 0.45), (0.35, 0.35, 0.45)),
}


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class ObjectSpec:
    """One known object: a shape and either one colour name or six (per entry of `FACES`)."""

    caption: str
    shape: str
    colors: tuple[str, ...]

    @property
    def multicolored(self) -> bool:
        return len(self.colors) > 1

    def color_values(self) -> torch.Tensor:  # [C, 3]
        return torch.tensor([PALETTE[c] for c in self.colors], dtype=torch.float32)

    def build(self, num_prompts: int = 1, **kwargs) -> "AnalyticObject":
        return AnalyticObject(self, num_prompts=num_prompts, **kwargs)


def _registry() -> dict[str, ObjectSpec]:
    out = {}
    for shape in ("cube", "sphere", "cone", "torus", "cylinder"):
        for color in ("red", "green", "blue"):
            caption = f"a {color} {shape}"
            out[caption] = ObjectSpec(caption, shape, (color,))
    out[SIX_COLORED_CAPTION] = ObjectSpec(SIX_COLORED_CAPTION, "cube", SIX_FACE_COLORS)
    return out


KNOWN_OBJECTS: dict[str, ObjectSpec] = _registry()
KNOWN_CAPTIONS: tuple[str, ...] = tuple(KNOWN_OBJECTS)

_VIEW_SUFFIX = re.compile(r",?\s*(front|side|back|overhead)\s+view\s*$")


def normalize_caption(text: str) -> str:
    """Lower case, single spaces, no trailing full stop or view suffix (", front view")."""
    text = " ".join(text.strip().lower().split()).rstrip(".").strip()
    return _VIEW_SUFFIX.sub("", text).strip()


def resolve_caption(text: str) -> ObjectSpec:
    """The known object a prompt names; ValueError quoting the prompt and listing the known ones."""
    key = normalize_caption(text)
    if key not in KNOWN_OBJECTS:
        known = ", ".join(repr(c) for c in KNOWN_CAPTIONS)
        raise ValueError(f"prompt {text!r} is not one of the built-in prior's known objects: {known}")
    return KNOWN_OBJECTS[key]


def face_index(x: torch.Tensor, half_extent: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Which cube face region points ``x [..., 3]`` are in: the dominant axis of ``x / half_extent``
    and its sign, as an index into `FACES` -> LongTensor ``[...]``."""
    scaled = x / x.new_tensor(half_extent)
    axis = scaled.abs().argmax(dim=-1)
    negative = torch.gather(scaled, -1, axis[..., None])[..., 0] < 0
    return 2 * axis + negative.long()


# ---------------------------------------------------------------------------------------------
# the field


class AnalyticObject(nn.Module):
    """A known object as a density/albedo field for K identical prompts.

    ``density(x [K, N, 3]) -> [K, N]``, ``forward(x) -> (sigma [K, N], albedo [K, N, 3])``,
    ``normals(x) -> [K, N, 3]``, ``query(x, with_normals) -> FieldOutput``; `prompts` is accepted
    and ignored (every prompt sees the same object). Also ``sdf``, ``occupancy``,
    ``surface_color`` and ``sample_surface`` over world points of any leading shape.
    """

    def __init__(
        self,
        spec: ObjectSpec,
        num_prompts: int = 1,
        bound: float = 1.0,
        density_scale: float = DEFAULT_DENSITY_SCALE,
        width: float = DEFAULT_WIDTH,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if spec.shape not in SHAPES:
            raise ValueError(f"unknown shape {spec.shape!r} (known: {', '.join(SHAPES)})")
        if len(spec.colors) not in (1, len(FACES)):
            raise ValueError(f"an object has 1 colour or {len(FACES)} face colours, got {spec.colors!r}")
        if spec.multicolored and spec.shape != "cube":
            raise ValueError(f"per-face colours need a cube, got shape {spec.shape!r}")
        if density_scale <= 0 or width <= 0 or bound <= 0:
            raise ValueError(f"density_scale, width and bound must be positive, got {density_scale!r}, {width!r}, {bound!r}")
        if not 0.0 <= offset < 0.1:
            raise ValueError(f"density offset must be in [0, 0.1) world units, got {offset!r}")
        self.spec = spec
        self.caption = spec.caption
        self.num_prompts = int(num_prompts)
        self.bound = float(bound)
        self.density_scale = float(density_scale)
        self.width = float(width)
        self.offset = float(offset)
        self.shape = SHAPES[spec.shape]
        self.register_buffer("colors", spec.color_values())  # [C, 3]
        # The Renderer finds its device through the field's parameters; this empty one moves with
        # .to() and carries no state.
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def with_prompts(self, num_prompts: int) -> "AnalyticObject":
        """The same object for another number of prompts, on the same device."""
        other = AnalyticObject(self.spec, num_prompts, self.bound, self.density_scale, self.width, self.offset)
        return other.to(self.colors.device)

    # -- geometry over any leading shape ----------------------------------------------------------

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        """Signed distance ``[...]`` at world points ``x [..., 3]`` (negative inside)."""
        return self.shape.sdf(x.float())

    def occupancy(self, x: torch.Tensor) -> torch.Tensor:
        """Bool ``[...]``: is ``x [..., 3]`` inside the solid."""
        return self.sdf(x) < 0.0

    def surface_color(self, x: torch.Tensor) -> torch.Tensor:
        """The true colour ``[..., 3]`` of the surface point nearest to ``x [..., 3]`` (for the
        six-colored cube: the face of the dominant axis, which is the nearest face)."""
        colors = self.colors.to(x.device)
        if not self.spec.multicolored:
            return colors[0].expand(*x.shape[:-1], 3)
        return colors[face_index(x.float(), self.shape.half_extent)]

    def sdf_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """Exact gradient ``[..., 3]`` of the SDF (autograd through the analytic formula)."""
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.shape.sdf(xg).sum(), xg)
        return grad

    @torch.no_grad()
    def sample_surface(
        self, n: int, generator: torch.Generator | None = None, shell: float = 4e-3, batch: int = 2**18
    ) -> torch.Tensor:
        """``n`` points ``[n, 3]`` on the surface, close to uniform by area: uniform points in a
        thin shell ``|sdf| < shell`` around it, moved onto it along the SDF gradient. Drawn on the
        CPU from `generator`; returned on the object's device."""
        if n < 1:
            raise ValueError(f"number of surface samples must be positive, got {n!r}")
        half = torch.tensor(self.shape.half_extent) + 2 * shell
        found: list[torch.Tensor] = []
        count, rounds = 0, 0
        while count < n:
            rounds += 1
            if rounds > 10_000:
                raise RuntimeError(f"surface sampling of {self.caption!r} found only {count} of {n} points")
            x = (torch.rand(batch, 3, generator=generator) * 2.0 - 1.0) * half
            d = self.sdf(x)
            keep = x[d.abs() < shell]
            if len(keep):
                for _ in range(2):  # exact SDF: one step lands on the surface; the second polishes
                    g = self.sdf_gradient(keep)
                    keep = keep - self.sdf(keep)[:, None] * g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                found.append(keep)
                count += len(keep)
        return torch.cat(found)[:n].to(self.colors.device)

    # -- the NeRFField interface ------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"expected positions of shape [K, N, 3], got {tuple(x.shape)}")

    def _density_from_sdf(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        sigma = self.density_scale * torch.sigmoid(-(d + self.offset) / self.width)
        inside = (x.abs() <= self.bound).all(dim=-1)
        return torch.where(inside, sigma, torch.zeros_like(sigma))

    def density(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        """``x [K, N, 3]`` -> sigma ``[K, N]``."""
        self._check(x)
        return self._density_from_sdf(x, self.sdf(x))

    def forward(self, x: torch.Tensor, prompts: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [K, N, 3]`` -> (sigma ``[K, N]``, albedo ``[K, N, 3]``)."""
        return self.density(x), self.surface_color(x)

    def normals(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        """Unit outward normals ``[K, N, 3]`` (normalised SDF gradient) at ``x [K, N, 3]``."""
        self._check(x)
        g = self.sdf_gradient(x)
        return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def query(self, x: torch.Tensor, with_normals: bool, prompts: slice | None = None) -> FieldOutput:
        self._check(x)
        sigma = self.density(x)
        normal = self.normals(x) if with_normals else None
        return FieldOutput(sigma=sigma, albedo=self.surface_color(x), normal=normal)

    def extra_repr(self) -> str:
        return (f"caption={self.caption!r}, prompts={self.num_prompts}, scale={self.density_scale:g}, "
                f"width={self.width:g}, offset={self.offset:g}")


def make_object(caption: str, num_prompts: int = 1, device: torch.device | str = "cpu", **kwargs) -> AnalyticObject:
    """The `AnalyticObject` for a known caption (view suffixes and case are ignored)."""
    return resolve_caption(caption).build(num_prompts, **kwargs).to(device)

