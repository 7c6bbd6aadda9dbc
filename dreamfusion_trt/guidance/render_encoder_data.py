"""Training and held-out images for the distilled render encoder, made on the fly.

Nothing is downloaded: every image is either a render of a random scene by the project's own
`Renderer` or a procedural picture, all ``[n, 3, size, size]`` in [0, 1].

- Analytic objects (`prior.scenes`: cube, sphere, cone, torus, cylinder, with one random colour
  or six random face colours) seen from `sample_random_cameras`, in every shading mode
  (albedo, lambertian, textureless, normal) over a random solid background.
- Random NeRFs (`scene.build_scene` with a small hash grid whose table and MLP are drawn at a
  random scale, so the initial density blob gets texture and a random background MLP), rendered
  by `Renderer.render_image` in every shading mode.
- Procedural images: linear and radial two-colour gradients, anti-aliased discs and boxes over
  a gradient, and value noise at several scales (from 2x2 up to full resolution).

The renderer and scenes live beside `guidance/`, not below it; this module is the only place
that imports them, and only the fit needs it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F

ImageSource = Literal["renders", "mixed"]
SHADINGS = ("albedo", "lambertian", "textureless", "normal")
SHAPES = ("cube", "sphere", "cone", "torus", "cylinder")


def _uniform(gen: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen)


# ---------------------------------------------------------------------------------------------
# procedural pictures (CPU, from `gen`)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return xs, ys  # [size, size] each, in (-0.5, 0.5)


def gradients(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Linear (half) and radial (half) gradients between two random colours -> [n, 3, size, size]."""
    xs, ys = _grid(size)
    c0, c1 = _uniform(gen, 2, n, 3, 1, 1)
    angle = _uniform(gen, n, 1, 1, hi=2 * math.pi)
    linear = xs * angle.cos() + ys * angle.sin() + 0.5
    centre = _uniform(gen, n, 2, 1, 1, lo=-0.5, hi=0.5)
    radial = ((xs - centre[:, 0]).square() + (ys - centre[:, 1]).square()).sqrt() * _uniform(gen, n, 1, 1, lo=1, hi=3)
    s = torch.where(torch.arange(n)[:, None, None] % 2 == 0, linear, radial).clamp(0, 1)[:, None]
    return c0 + (c1 - c0) * s


def shapes(n: int, size: int, gen: torch.Generator, max_shapes: int = 4) -> torch.Tensor:
    """One to `max_shapes` discs or boxes with anti-aliased edges over a gradient -> [n, 3, size, size]."""
    xs, ys = _grid(size)
    out = gradients(n, size, gen)
    soft = 1.0 / size  # one pixel of edge
    for _ in range(max_shapes):
        present = (_uniform(gen, n, 1, 1, 1) < 0.75).float()
        cx, cy = _uniform(gen, 2, n, 1, 1, lo=-0.4, hi=0.4)
        rx, ry = _uniform(gen, 2, n, 1, 1, lo=0.05, hi=0.35)
        disc = ((xs - cx) / rx).square() + ((ys - cy) / ry).square() - 1.0
        box = torch.maximum((xs - cx).abs() - rx, (ys - cy).abs() - ry) / rx.minimum(ry)
        sdf = torch.where(_uniform(gen, n, 1, 1) < 0.5, disc, box) * rx.minimum(ry)
        alpha = torch.sigmoid(-sdf / soft)[:, None] * present
        color = _uniform(gen, n, 3, 1, 1)
        out = out * (1 - alpha) + color * alpha
    return out


def value_noise(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields with a random coarsest scale (2x2 .. size x size), plus finer
    octaves of decreasing amplitude -> [n, 3, size, size]."""
    scales = [2**k for k in range(1, int(math.log2(size)) + 1)]
    start = torch.randint(0, len(scales), (n,), generator=gen)
    out = torch.zeros(n, 3, size, size)
    for i, s in enumerate(scales):
        amp = torch.where(start <= i, 0.6 ** (i - start).clamp_min(0).float(), torch.zeros(n))
        field = torch.randn(n, 3, s, s, generator=gen)
        out += amp[:, None, None, None] * F.interpolate(field, size=(size, size), mode="bilinear", align_corners=False)
    contrast = _uniform(gen, n, 1, 1, 1, lo=0.5, hi=2.5)
    return torch.sigmoid(out * contrast + _uniform(gen, n, 3, 1, 1, lo=-1, hi=1))


def procedural(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """A mix of `gradients`, `shapes`, `value_noise` and shapes textured with noise -> [n, 3, size, size]."""
    parts = [n // 4 + (i < n % 4) for i in range(4)]
    textured = shapes(parts[3], size, gen)
    textured = (textured * (0.5 + value_noise(parts[3], size, gen))).clamp(0, 1)
    return torch.cat([gradients(parts[0], size, gen), shapes(parts[1], size, gen), value_noise(parts[2], size, gen), textured])


# ---------------------------------------------------------------------------------------------
# renders


def _shadings(k: int, offset: int) -> list[str]:
    return [SHADINGS[(offset + j) % len(SHADINGS)] for j in range(k)]


@torch.no_grad()
def object_renders(
    n: int, size: int, gen: torch.Generator, device: torch.device, num_samples: int, chunk: int = 8
) -> torch.Tensor:
    """Analytic objects with random colours seen by random cameras over solid backgrounds, the
    shading modes cycling through `SHADINGS`; `chunk` views of one object per renderer call
    -> [n, 3, size, size] on `device`."""
    from ..cameras import get_rays, sample_random_cameras
    from ..config import CameraConfig, FieldConfig, RenderConfig
    from ..field.background import Background
    from ..prior.scenes import PALETTE, AnalyticObject, ObjectSpec
    from ..render.renderer import Renderer

    render_cfg = RenderConfig(backend="torch", num_samples=num_samples)
    cam_cfg = CameraConfig(radius_range=(1.4, 2.4), fovy_range=(35.0, 65.0))
    out = []
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        shape = SHAPES[int(torch.randint(0, len(SHAPES), (1,), generator=gen))]
        six = shape == "cube" and bool(torch.rand(1, generator=gen) < 0.3)
        names = tuple(PALETTE)
        colors = names if six else (names[int(torch.randint(0, len(names), (1,), generator=gen))],)
        obj = AnalyticObject(ObjectSpec("random", shape, colors), num_prompts=k).to(device)
        if not six:  # any colour, not only the palette's
            obj.colors.copy_(torch.rand(1, 3, generator=gen).to(device))
        renderer = Renderer(obj, Background(FieldConfig(background="solid"), k), render_cfg, bound=obj.bound).eval()
        cams = sample_random_cameras(k, cam_cfg, gen).to(device)
        rays_o, rays_d = get_rays(cams, size, size)  # [k, size*size, 3]
        white = torch.rand(k, 1, 1, generator=gen) < 0.3
        bg = torch.where(white, torch.ones(k, 1, 3), torch.rand(k, 1, 3, generator=gen))
        result = renderer.render(rays_o, rays_d, cams.light_dir, shading=_shadings(k, s),
                                 ambient_ratio=float(_uniform(gen, 1, lo=0.05, hi=0.4)), stratified=False,
                                 background=bg.to(device))  # fmt: skip
        out.append(result.rgb.reshape(k, size, size, 3).permute(0, 3, 1, 2))
    return torch.cat(out).clamp(0, 1) if out else torch.zeros(0, 3, size, size, device=device)


@torch.no_grad()
def nerf_renders(
    n: int, size: int, gen: torch.Generator, device: torch.device, num_samples: int, chunk: int = 8
) -> torch.Tensor:
    """Random NeRFs (a small hash grid with a random table scale, MLPs scaled up, an MLP
    background) seen by random cameras, the shading modes cycling through `SHADINGS`; `chunk`
    independent scenes per renderer call -> [n, 3, size, size] on `device`."""
    from ..cameras import get_rays, sample_random_cameras
    from ..config import RunConfig
    from ..scene import build_scene

    base = RunConfig()
    out = []
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        field = replace(base.field, backend="torch", num_levels=4, log2_hashmap_size=12, max_resolution=64, normals="analytic",
                        hidden_dim=32, background="mlp", blob_density=float(_uniform(gen, 1, lo=5, hi=20)))  # fmt: skip
        cfg = replace(base, field=field, render=replace(base.render, backend="torch", num_samples=num_samples))
        with torch.random.fork_rng(devices=[]):  # the modules' own init, seeded, the caller's generator untouched
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            renderer = build_scene(cfg, num_prompts=k, device=device).eval()
            for name, p in renderer.named_parameters():
                if "encoding" in name:  # the hash table: texture at every level
                    scale = 0.1 * float(_uniform(gen, 1, lo=0.5, hi=4.0))
                    p.copy_((torch.rand(p.shape, generator=gen) * 2.0 - 1.0) * scale)  # drawn on the CPU: any device, same scene
                else:  # MLPs: sharper colours and a livelier background
                    p.mul_(float(_uniform(gen, 1, lo=1.0, hi=2.5)))
        cams = sample_random_cameras(k, cfg.camera, gen).to(device)
        rays_o, rays_d = get_rays(cams, size, size)
        result = renderer.render(rays_o, rays_d, cams.light_dir, shading=_shadings(k, s),
                                 ambient_ratio=float(_uniform(gen, 1, lo=0.05, hi=0.4)), stratified=False)  # fmt: skip
        out.append(result.rgb.reshape(k, size, size, 3).permute(0, 3, 1, 2))
    return torch.cat(out).clamp(0, 1) if out else torch.zeros(0, 3, size, size, device=device)


def make_images(
    n: int,
    size: int,
    seed: int,
    device: torch.device | str,
    source: ImageSource = "mixed",
    num_samples: int = 48,
) -> torch.Tensor:
    """`n` images [n, 3, size, size] in [0, 1] on `device`, reproducible from `seed`.

    "renders": two thirds analytic objects, one third random NeRFs. "mixed": half renders (in
    those proportions), half procedural. Each kind is drawn from its own generator, so the
    renders of a seed do not depend on how many procedural images come with them.
    """
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 images of size >= 8, got n={n!r}, size={size!r}")
    if source not in ("renders", "mixed"):
        raise ValueError(f"image source must be 'renders' or 'mixed', got {source!r}")
    device = torch.device(device)
    n_proc = n // 2 if source == "mixed" else 0
    n_nerf = (n - n_proc) // 3
    n_obj = n - n_proc - n_nerf
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(3)]
    parts = [
        object_renders(n_obj, size, gens[0], device, num_samples),
        nerf_renders(n_nerf, size, gens[1], device, num_samples),
        procedural(n_proc, size, gens[2]).to(device),
    ]
    return torch.cat(parts).float().contiguous()
