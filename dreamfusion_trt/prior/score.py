"""Numbers for the known-answer prior: how well a run recovered its object, and how well the
prior itself draws the objects it was trained on.

`score_run(run_dir)` compares a finished run's exported mesh with the analytic object its prompt
names, all in world units on the run's box ``[-bound, bound]^3``:

- ``iou``: volumetric IoU on a ``resolution^3`` grid of cell centres. The mesh's inside is found
  by casting one ray per grid column along +z and counting surface crossings above each point
  (even-odd rule; exact for the closed meshes `export.mesh` writes). Columns are offset by a
  tiny irrational fraction of a cell so they never run exactly along mesh edges.
- ``best_iou`` / ``best_threshold``: the run's density itself (from its checkpoint), voxelised
  on the same kind of grid (`FIELD_RESOLUTION`^3 at most) at each of `THRESHOLD_FACTORS` times
  the config's fixed level (``output.mesh_threshold``) and compared with the true occupancy; the
  best of those IoUs and its threshold. ``field_iou`` is the same at the level the mesh was cut
  at (``mesh_threshold``, from the run's ``mesh_level.json``; the voxel twin of ``iou``, without
  cavity filling). A right but faint
  shape has a low ``iou`` and a high ``best_iou``; a wrong shape has both low.
- ``opacity_on_object`` / ``opacity_off_object``: the run's scene rendered (albedo, no jitter)
  from `OPACITY_VIEWS` validation cameras around the object at the run's render size; the mean
  ray opacity over the pixels whose rays hit the true object, and over those that miss it. A
  translucent shell reads low on the object; a shape too big reads high off it.
- ``radial_error`` (not for the torus): along `RADIAL_DIRECTIONS` rays from the centre, how far
  the field's surface at the mesh's level lies outside (+) or inside (−) the true one, in pixels
  of the images the prior sees (``train.encode_size`` at the cameras' mean radius and field of
  view), apart where the true surface turns sharply (its normal by more than 8° within 2 pixels:
  edges, corners, rims, apexes, and a cone's tightly curved top) and elsewhere: a rounded cube
  reads negative at its edges, a bulging one positive on its faces.
- ``chamfer``: the mean of the two mean point-to-surface distances: from area-uniform samples of
  the mesh to the true surface (|sdf|, exact) and from area-uniform samples of the true surface
  to the mesh (closest point on the nearest triangles); also given per direction.
- ``color_error``: mean Euclidean RGB distance (colours in [0, 1], so at most sqrt(3)) between the
  mesh's vertex colour, interpolated at the surface samples, and the true colour of the nearest
  true surface point.
- ``face_color_share`` (six-colored cube only): the mesh surface is split into the six face
  regions by the dominant axis of each sample; a region's mean colour is classified as the
  nearest of the six true face colours; the share of regions that get their own colour. 1.0 is
  a cube with every face right; a "Janus" cube that repeats its front face scores lower.

`evaluate_prior_samples(folder, ...)` draws DDIM samples (classifier-free guidance) for every
caption text of a prior folder and labels each with its nearest reference render.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..cameras import CameraBatch, get_rays, orbit_cameras
from ..export.mesh import load_mesh_world
from ..guidance.text import VIEWS
from ..render.renderer import Renderer
from ..render.sampling import ray_aabb_intersect
from .dataset import PLAIN, SHADINGS, DatasetConfig, RenderedDataset, caption_texts, render_dataset
from .scenes import (
    FACES,
    KNOWN_CAPTIONS,
    KNOWN_OBJECTS,
    PALETTE,
    SIX_COLORED_CAPTION,
    SIX_FACE_COLORS,
    TORUS_MAJOR,
    TORUS_MINOR,
    AnalyticObject,
    face_index,
    resolve_caption,
)

logger = logging.getLogger(__name__)

MESH_NAMES = ("mesh.glb", "mesh.obj", "mesh.ply")
SCORE_NAME = "score.json"
_COLUMN_OFFSET = (0.1234567, 0.2345678)  # fractions of a grid cell, x and y
THRESHOLD_FACTORS = tuple(2.0**k for k in range(-6, 3))  # best_iou: density thresholds / the mesh's
OPACITY_VIEWS = 4  # validation cameras for opacity_on_object (front, sides, back)
FIELD_RESOLUTION = 64  # grid per axis for best_iou (the field is slow to query on a CPU)
_SILHOUETTE_SAMPLES = 256  # per ray through the box, for the true silhouette


# ---------------------------------------------------------------------------------------------
# run scoring


def score_run(
    run_dir: str | Path,
    resolution: int = 96,
    surface_samples: int = 20000,
    seed: int = 0,
    write: bool = True,
    field: bool = True,
) -> dict[str, Any]:
    """Score the mesh of the run in `run_dir` against its known object; writes ``score.json``.

    Reads the prompt and the field bound from ``run_dir/checkpoint.json`` (a trailing view
    suffix such as ", front view" is ignored) and the mesh from ``mesh.glb``, else ``mesh.obj``,
    else ``mesh.ply``; with `field`, also scores the density and renders of the scene in its
    checkpoint (`score_checkpoint`). Raises FileNotFoundError without a run folder or
    checkpoint.json (or, with `field`, its tensors), and ValueError when the prompt is not a known
    object (the message lists them), there is no mesh, or the checkpoint does not fit its config.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / "checkpoint.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no run at '{run_dir}': '{meta_path}' does not exist")
    try:
        config = json.loads(meta_path.read_text())["config"]
        prompt = config["prompt"]["text"]
        bound = float(config["field"]["bound"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"'{meta_path}' is not a dreamfusion-trt checkpoint header: {exc}") from exc
    spec = resolve_caption(prompt)
    mesh_path = next((run_dir / n for n in MESH_NAMES if (run_dir / n).is_file()), None)
    if mesh_path is None:
        raise ValueError(
            f"no mesh in '{run_dir}' (looked for {', '.join(MESH_NAMES)}); "
            f"write one with: dreamfusion-trt export-mesh {run_dir}"
        )
    mesh = load_mesh_world(mesh_path)  # world frame (z up) whichever frame the file was written in
    obj = spec.build(bound=bound)
    result = {
        "prompt": prompt,
        "object": spec.caption,
        "mesh": mesh_path.name,
        **score_mesh(mesh, obj, bound, resolution, surface_samples, seed),
    }
    if field:
        result.update(score_checkpoint(run_dir, obj, min(resolution, FIELD_RESOLUTION)))
    if write:
        atomic_write_text(run_dir / SCORE_NAME, json.dumps(result, indent=2) + "\n")
    mesh_v, true_v = result.get("mesh_volume_fraction"), result.get("true_volume_fraction")
    logger.info(
        "%s: IoU %.3f (best over thresholds %s, opacity on the object %s), Chamfer %.4f, colour error %s, volume %s the truth's",
        spec.caption, result["iou"], _opt(result.get("best_iou")), _opt(result.get("opacity_on_object")),
        result["chamfer"], _opt(result["color_error"]), "n/a" if mesh_v is None or not true_v else f"{mesh_v / true_v:.2f}x",
    )  # fmt: skip
    return result


def _opt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_score(out_dir: str | Path) -> Path | None:
    """The built-in prior's `Scorer`: score a finished run folder into ``score.json`` and return
    its path; None (with a warning) when the run left nothing to score."""
    try:
        result = score_run(out_dir)
    except ValueError as exc:  # e.g. a run that left no surface to mesh
        logger.warning("the run could not be scored: %s", exc)
        return None
    logger.info("score against the true %r: IoU %.3f, Chamfer %.4f (score.json)", result["object"], result["iou"], result["chamfer"])
    return Path(out_dir) / SCORE_NAME


def score_mesh(
    mesh, obj: AnalyticObject, bound: float, resolution: int = 96, surface_samples: int = 20000, seed: int = 0
) -> dict[str, Any]:
    """IoU, Chamfer distance, colour error and (six-colored cube) face colour share of a
    `trimesh.Trimesh` in world units against `obj`; see the module docstring."""
    import trimesh

    if resolution < 2 or surface_samples < 1 or bound <= 0:
        raise ValueError(f"need resolution >= 2, surface_samples >= 1, bound > 0; got {resolution!r}, {surface_samples!r}, {bound!r}")
    axes = grid_axes(bound, resolution)
    inside_mesh = mesh_occupancy(np.asarray(mesh.vertices), np.asarray(mesh.faces), *axes)
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    inside_true = obj.occupancy(torch.as_tensor(pts, dtype=torch.float32)).numpy().reshape(inside_mesh.shape)
    iou = occupancy_iou(torch.from_numpy(inside_mesh), torch.from_numpy(inside_true))

    samples, face_idx = trimesh.sample.sample_surface(mesh, surface_samples, seed=seed)
    samples = np.asarray(samples, dtype=np.float64)
    true_pts = obj.sample_surface(surface_samples, torch.Generator().manual_seed(seed)).double().numpy()
    # Point-to-surface distances, not sample-to-sample ones (those never fall below the sample spacing):
    # |sdf| is the exact distance to the true surface; the mesh side uses its nearest triangles.
    d_mesh = obj.sdf(torch.as_tensor(samples, dtype=torch.float32)).abs().double().numpy()
    d_true = distance_to_mesh(mesh, true_pts)
    out: dict[str, Any] = {
        "iou": iou,
        "chamfer": float(0.5 * (d_mesh.mean() + d_true.mean())),
        "chamfer_mesh_to_true": float(d_mesh.mean()),
        "chamfer_true_to_mesh": float(d_true.mean()),
        "mesh_volume_fraction": float(inside_mesh.mean()),
        "true_volume_fraction": float(inside_true.mean()),
        "resolution": resolution,
        "surface_samples": surface_samples,
        "color_error": None,
        "face_color_share": None,
        "face_colors": None,
    }
    colors = mesh_surface_colors(mesh, samples, face_idx)
    if colors is None:
        return out
    truth = obj.surface_color(torch.as_tensor(samples, dtype=torch.float32)).double().numpy()
    out["color_error"] = float(np.linalg.norm(colors - truth, axis=-1).mean())
    if obj.spec.multicolored:
        share, names = face_color_share(samples, colors, obj.shape.half_extent)
        out["face_color_share"], out["face_colors"] = share, names
    return out


def score_checkpoint(run_dir: str | Path, obj: AnalyticObject, resolution: int = FIELD_RESOLUTION) -> dict[str, Any]:
    """`score_field` of the one-prompt scene in `run_dir`'s checkpoint, at the level its mesh
    was cut at, its render size and validation cameras."""
    from ..checkpoint import load_checkpoint
    from ..export.artifacts import mesh_threshold_of
    from ..scene import scene_from_checkpoint

    ckpt = load_checkpoint(run_dir)
    renderer = scene_from_checkpoint(ckpt, "cpu")
    cfg = ckpt.config
    cams = orbit_cameras(OPACITY_VIEWS, cfg.camera.val_elevation, cfg.camera.val_radius, cfg.camera.val_fovy)
    seen = cfg.train.encode_size or cfg.camera.render_size  # the pixels the model sees
    pixel = pixel_footprint(sum(cfg.camera.radius_range) / 2, sum(cfg.camera.fovy_range) / 2, seen)
    return score_field(renderer, obj, cfg.field.bound, cfg.output.mesh_threshold, cams, cfg.camera.render_size, resolution,
                       mesh_threshold=mesh_threshold_of(Path(run_dir), cfg), pixel=pixel)  # fmt: skip


@torch.no_grad()
def score_field(
    renderer: Renderer,
    obj: AnalyticObject,
    bound: float,
    threshold: float,
    cams: CameraBatch,
    size: int = 64,
    resolution: int = FIELD_RESOLUTION,
    chunk: int = 2**16,
    mesh_threshold: float | None = None,
    pixel: float | None = None,
) -> dict[str, Any]:
    """Scores of a one-prompt scene's density against `obj` (see the module docstring):
    ``best_iou``, ``best_threshold`` and the IoU at every threshold tried (`THRESHOLD_FACTORS`
    times `threshold`, the config's fixed level), ``field_iou`` (at `mesh_threshold`, the level
    the mesh was cut at; `threshold` when None), on the ``resolution^3`` grid of `grid_axes`;
    ``opacity_on_object`` and ``opacity_off_object`` over `cams` (N cameras) rendered at
    ``size x size``; with `pixel` (world units), ``radial_error`` at the mesh's level."""
    if renderer.num_prompts != 1:
        raise ValueError(f"score_field scores a one-prompt scene, got {renderer.num_prompts} prompts")
    if threshold <= 0 or size < 1 or resolution < 2:
        raise ValueError(f"need threshold > 0, size >= 1, resolution >= 2; got {threshold!r}, {size!r}, {resolution!r}")
    renderer = renderer.eval()
    device = next(renderer.field.parameters()).device
    axes = grid_axes(bound, resolution)
    pts = torch.as_tensor(np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3), dtype=torch.float32)
    sigma = torch.cat([renderer.field.density(p[None].to(device))[0].float().cpu() for p in pts.split(chunk)])  # [R^3]
    inside_true = obj.occupancy(pts)  # [R^3]
    thresholds = [threshold * f for f in THRESHOLD_FACTORS]
    ious = [occupancy_iou(sigma > t, inside_true) for t in thresholds]
    best = int(np.argmax(ious))

    level = threshold if mesh_threshold is None else mesh_threshold
    inside = sigma > level
    true_count = int(inside_true.sum())
    on, off = [], []
    for i in range(len(cams)):
        cam = cams.take(i)
        opacity = renderer.render_image(cam, size, size, shading="albedo")["opacity"].reshape(-1).cpu()  # [H*W]
        hit = true_silhouette(obj, cam, size, bound)  # [H*W]
        on.append(opacity[hit])
        off.append(opacity[~hit])
    on_all, off_all = torch.cat(on), torch.cat(off)
    return {
        "best_iou": ious[best],
        "best_threshold": thresholds[best],
        "field_iou": occupancy_iou(inside, inside_true),
        "mesh_threshold": level,
        "field_volume_ratio": int(inside.sum()) / true_count if true_count else None,
        **({"hole_fill": hole_fill(inside, pts)} if obj.spec.shape == "torus" else {}),
        "field_resolution": resolution,
        "iou_by_threshold": {f"{t:g}": iou for t, iou in zip(thresholds, ious)},
        "opacity_on_object": float(on_all.mean()) if len(on_all) else None,
        "opacity_off_object": float(off_all.mean()) if len(off_all) else None,
        "opacity_views": len(cams),
        "opacity_size": size,
        **({} if pixel is None else {"radial_error": radial_error(renderer.field, obj, level, pixel)}),
    }


def hole_fill(inside: torch.Tensor, pts: torch.Tensor) -> float:
    """The torus's hole: the share of the grid points `pts` [N, 3] inside the cylinder that the
    hole leaves open (radius under major − minor, |z| under the tube's radius) that `inside`
    [N] (bool: the field above its level there) fills. 0 is an open hole, 1 a disc."""
    hole = (pts[:, :2].norm(dim=-1) < TORUS_MAJOR - TORUS_MINOR) & (pts[:, 2].abs() < TORUS_MINOR)
    return float(inside[hole].float().mean()) if hole.any() else 0.0


@torch.no_grad()
def albedo_scores(renderer: Renderer, obj: AnalyticObject, samples: int = 4096, seed: int = 0) -> dict[str, Any]:
    """How right a one-prompt field's own albedo is on the true surface: at `samples` points of
    `obj`'s surface (drawn from `seed`), ``albedo_error`` is the mean RGB distance of the field's
    albedo from the true colour; for the six-colored cube also ``albedo_face_share`` and
    ``albedo_face_colors`` (`face_color_share` of those points) and ``albedo_face_rgb`` (each
    face's mean albedo: a face named after its nearest colour may still be near grey). Unlike
    ``color_error`` it needs no mesh: it says what colour the field puts where the object is,
    even while its shape is wrong or faint."""
    device = next(renderer.field.parameters()).device
    pts = obj.sample_surface(samples, generator=torch.Generator().manual_seed(seed)).cpu()  # [S, 3]
    _, albedo = renderer.field(pts[None].to(device))
    albedo = albedo[0].float().cpu()  # [S, 3]
    out: dict[str, Any] = {"albedo_error": float((albedo - obj.surface_color(pts)).norm(dim=-1).mean())}
    if obj.spec.multicolored:
        share, names = face_color_share(pts.numpy(), albedo.numpy(), obj.shape.half_extent)
        out["albedo_face_share"], out["albedo_face_colors"] = share, names
        region = face_index(pts, obj.shape.half_extent)
        out["albedo_face_rgb"] = {face: [round(float(c), 3) for c in albedo[region == i].mean(0)] if (region == i).any() else None
                                  for i, face in enumerate(FACES)}  # fmt: skip
    return out


TRACE_RESOLUTION = 48  # grid per axis of a trace row's IoUs
TRACE_SIZE = 32  # render size of a trace row's opacities
# score_field's keys a trace row keeps; albedo_scores' follow them
TRACE_KEYS = ("field_iou", "best_iou", "best_threshold", "field_volume_ratio", "hole_fill", "opacity_on_object",
              "opacity_off_object")  # fmt: skip


def trace_scores(renderer: Renderer, cfg: Any) -> dict[str, Any]:
    """One row of a run's ``trace.jsonl`` (`train.trace_every`): the known-answer scores of the
    one-prompt scene `renderer` of a run of `cfg` mid-training, cheap enough to take every few
    hundred steps (`TRACE_RESOLUTION`^3 grid, `OPACITY_VIEWS` renders of `TRACE_SIZE`^2): the
    field's IoU at the mesh level and the best over levels, its volume against the truth's, the
    torus's hole fill, the opacity on and off the object, and the field albedo's colour error
    (and the six-colored cube's faces: the colour each got, and its mean RGB). ValueError when
    the prompt is not a known object."""
    obj = resolve_caption(cfg.prompt.text).build(bound=cfg.field.bound)
    cams = orbit_cameras(OPACITY_VIEWS, cfg.camera.val_elevation, cfg.camera.val_radius, cfg.camera.val_fovy)
    field = score_field(renderer, obj, cfg.field.bound, cfg.output.mesh_threshold, cams, TRACE_SIZE, TRACE_RESOLUTION)
    row = {k: field[k] for k in TRACE_KEYS if k in field}
    row.update(albedo_scores(renderer, obj))
    return row


RADIAL_DIRECTIONS = 1000  # rays from the centre for `radial_error` in score.json
RADIAL_STEPS = 500  # radii per ray out to the box's corners: 0.002 world units on the prior's box, under a tenth of its pixel


@torch.no_grad()
def radial_error(density: Any, obj: AnalyticObject, level: float, pixel: float, directions: int = RADIAL_DIRECTIONS,
                 steps: int = RADIAL_STEPS, chunk: int = 2**16) -> dict[str, Any] | None:  # fmt: skip
    """Where a field's surface {density > level} is off from `obj`'s, along `directions` rays from
    the centre: the outermost point of each against the true surface's, in pixels of `pixel`
    world units. Quartiles and mean |error| over all rays, over the rays whose true surface
    point lies where the surface turns sharply (`sharp_directions` over 2 pixels: edges,
    corners, rims, apexes and tightly curved parts, ``sharp``) and over the others (faces and
    gently curved sides, ``smooth``). None for shapes that are not star-shaped from their
    centre (the torus). `density` is a field module whose ``density`` maps points [1, N, 3] to
    [1, N]."""
    if obj.spec.shape == "torus":
        return None
    if pixel <= 0 or level <= 0:
        raise ValueError(f"radial_error needs pixel > 0 and level > 0, got {pixel!r} and {level!r}")
    dirs = fibonacci_directions(directions)
    reach = obj.bound * math.sqrt(3.0)  # the box's corners: a cube's corners lie beyond radius `bound`
    r_true = radial_surface(lambda x: obj.sdf(x) < 0, dirs, reach, steps)

    device = next(density.parameters()).device

    def inside(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, 3).float()
        sigma = torch.cat([density.density(c[None].to(device))[0].float().cpu() for c in flat.split(chunk)])
        in_box = flat.abs().amax(dim=-1) <= obj.bound  # renders never sample outside the box
        return ((sigma > level) & in_box).reshape(x.shape[:-1])

    error = (radial_surface(inside, dirs, reach, steps) - r_true) / pixel
    sharp = sharp_directions(obj.sdf, dirs * r_true[:, None], 2 * pixel)
    return {"pixel": pixel, "all": _spread(error), "sharp": _spread(error[sharp]), "smooth": _spread(error[~sharp])}


def _spread(e: torch.Tensor) -> dict[str, float] | None:
    if e.numel() == 0:
        return None
    q = torch.quantile(e, torch.tensor([0.25, 0.5, 0.75], dtype=e.dtype))
    return {"rays": int(e.numel()), "median_px": float(q[1]), "q25_px": float(q[0]), "q75_px": float(q[2]),
            "mean_abs_px": float(e.abs().mean())}  # fmt: skip


def pixel_footprint(radius: float, fovy_deg: float, render_size: int) -> float:
    """The world length one pixel spans at the object's centre, seen from `radius` with a
    vertical field of view of `fovy_deg` over `render_size` pixels."""
    return 2.0 * radius * math.tan(math.radians(fovy_deg) / 2.0) / render_size


def fibonacci_directions(n: int) -> torch.Tensor:
    """`n` unit vectors [n, 3] spread evenly over the sphere (a Fibonacci lattice)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = (1.0 - z * z).sqrt()
    return torch.stack([r * phi.cos(), r * phi.sin(), z], dim=-1)


def radial_surface(inside: Any, directions: torch.Tensor, r_max: float, steps: int = RADIAL_STEPS) -> torch.Tensor:
    """Per direction [n, 3] from the origin, the outermost radius in (0, r_max] where `inside`
    (points [..., 3] -> bool [...]) holds, on `steps` equal steps [n] (0 where it never does)."""
    radii = torch.linspace(r_max / steps, r_max, steps, dtype=torch.float64)
    pts = directions[:, None, :] * radii[None, :, None]  # [n, steps, 3]
    hit = inside(pts)  # [n, steps]
    last = torch.where(hit, torch.arange(steps)[None, :], torch.full_like(hit, -1, dtype=torch.long)).amax(dim=1)
    return torch.where(last >= 0, radii[last.clamp(min=0)], torch.zeros(()))


def sharp_directions(sdf: Any, surface: torch.Tensor, spread: float, cos_min: float = 0.99) -> torch.Tensor:
    """Bool [n]: does the true surface turn sharply at points `surface` [n, 3] (an edge, corner,
    rim or apex, or a tight curve): does its normal turn by more than acos(cos_min) (8° by
    default) between the point and a point `spread` away along any axis."""

    def normal(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(sdf(x).sum(), x)
        return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    n0 = normal(surface)
    out = torch.zeros(surface.shape[0], dtype=torch.bool)
    for axis in torch.eye(3, dtype=surface.dtype):
        for sign in (-1.0, 1.0):
            moved = surface + sign * spread * axis
            out |= (normal(moved) * n0).sum(-1) < cos_min
    return out


def occupancy_iou(inside: torch.Tensor, truth: torch.Tensor) -> float:
    """IoU of two bool occupancies of one shape (0.0 when both are empty)."""
    union = int((inside | truth).sum())
    return float(int((inside & truth).sum()) / union) if union else 0.0


def true_silhouette(obj: AnalyticObject, cam: CameraBatch, size: int, bound: float) -> torch.Tensor:
    """Bool ``[size * size]``: does each pixel's ray (of the one camera `cam`, `get_rays`'
    order) meet the true solid inside the box ``[-bound, bound]^3`` (dense samples of its SDF)."""
    rays_o, rays_d = get_rays(cam.to("cpu"), size, size)  # [1, H*W, 3]
    near, far, _ = ray_aabb_intersect(rays_o[0], rays_d[0], bound)  # [H*W]
    u = (torch.arange(_SILHOUETTE_SAMPLES, dtype=torch.float32) + 0.5) / _SILHOUETTE_SAMPLES  # [S]
    t = near[:, None] + (far - near)[:, None] * u  # [H*W, S]
    x = rays_o[0][:, None] + t[..., None] * rays_d[0][:, None]  # [H*W, S, 3]
    return (obj.sdf(x) < 0).any(dim=-1) & (far > near)


def distance_to_mesh(mesh, points: np.ndarray, candidates: int = 16) -> np.ndarray:
    """Distance from each of `points` [N, 3] to the mesh surface -> [N]: the closest point on
    each of the `candidates` triangles with the nearest centroids (all triangles of small meshes)."""
    import trimesh
    from scipy.spatial import cKDTree

    tris = np.asarray(mesh.triangles, dtype=np.float64)  # [F, 3, 3]
    k = min(candidates, len(tris))
    _, near = cKDTree(tris.mean(axis=1)).query(points, k=k)  # [N, k]
    near = near.reshape(len(points), k)
    closest = trimesh.triangles.closest_point(tris[near.ravel()], np.repeat(points, k, axis=0))
    return np.linalg.norm(closest - np.repeat(points, k, axis=0), axis=-1).reshape(-1, k).min(axis=1)


def grid_axes(bound: float, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell centres along x, y, z of a resolution^3 grid over [-bound, bound]^3; x and y are
    nudged by a fraction of a cell (see `mesh_occupancy`)."""
    cell = 2.0 * bound / resolution
    centres = -bound + (np.arange(resolution) + 0.5) * cell
    return centres + _COLUMN_OFFSET[0] * cell, centres + _COLUMN_OFFSET[1] * cell, centres


def mesh_occupancy(vertices: np.ndarray, faces: np.ndarray, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """Inside test of a closed triangle mesh (vertices [V, 3], faces [F, 3]) on the grid
    ``xs x ys x zs`` -> bool [X, Y, Z]: each (x, y) column is a ray along +z; a point is inside
    when an odd number of triangles cross its column above it."""
    tri = vertices[faces].astype(np.float64)  # [F, 3, 3]
    nx, ny = len(xs), len(ys)
    lo_x = np.searchsorted(xs, tri[:, :, 0].min(1), side="left")
    hi_x = np.searchsorted(xs, tri[:, :, 0].max(1), side="right")
    lo_y = np.searchsorted(ys, tri[:, :, 1].min(1), side="left")
    hi_y = np.searchsorted(ys, tri[:, :, 1].max(1), side="right")
    wy = np.maximum(hi_y - lo_y, 0)
    counts = np.maximum(hi_x - lo_x, 0) * wy  # columns under each triangle's bounding box
    f = np.repeat(np.arange(len(tri)), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    ix = lo_x[f] + k // wy[f]
    iy = lo_y[f] + k % wy[f]
    a, b, c = tri[f, 0], tri[f, 1], tri[f, 2]
    px, py = xs[ix], ys[iy]
    det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    safe = np.where(det == 0, 1.0, det)
    l1 = ((b[:, 1] - c[:, 1]) * (px - c[:, 0]) + (c[:, 0] - b[:, 0]) * (py - c[:, 1])) / safe
    l2 = ((c[:, 1] - a[:, 1]) * (px - c[:, 0]) + (a[:, 0] - c[:, 0]) * (py - c[:, 1])) / safe
    l3 = 1.0 - l1 - l2
    hit = (det != 0) & (l1 >= 0) & (l2 >= 0) & (l3 >= 0)
    z_hit = (l1 * a[:, 2] + l2 * b[:, 2] + l3 * c[:, 2])[hit]
    col_hit = (ix * ny + iy)[hit]
    # One sorted key per crossing: column first, then height; count the crossings above each point.
    z_lo = min(float(zs.min()), float(z_hit.min()) if len(z_hit) else 0.0)
    span = max(float(zs.max()), float(z_hit.max()) if len(z_hit) else 0.0) - z_lo + 1.0
    keys = np.sort(col_hit * span + (z_hit - z_lo))
    col_end = np.cumsum(np.bincount(col_hit, minlength=nx * ny))  # [X*Y]
    cols = np.arange(nx * ny)
    q = cols[:, None] * span + (zs[None, :] - z_lo)  # [X*Y, Z]
    above = col_end[:, None] - np.searchsorted(keys, q.ravel(), side="right").reshape(q.shape)
    return (above % 2 == 1).reshape(nx, ny, len(zs))


def mesh_surface_colors(mesh, points: np.ndarray, face_idx: np.ndarray) -> np.ndarray | None:
    """Vertex colours of `mesh` interpolated at surface `points` [N, 3] lying on faces
    `face_idx` [N] -> RGB [N, 3] in [0, 1]; None when the mesh has no vertex colours."""
    import trimesh

    if getattr(mesh.visual, "kind", None) != "vertex":
        return None
    vc = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0  # [V, 3]
    bary = trimesh.triangles.points_to_barycentric(mesh.triangles[face_idx], points)  # [N, 3]
    corner = vc[mesh.faces[face_idx]]  # [N, 3 corners, 3 channels]
    return np.clip(np.einsum("nk,nkc->nc", bary, corner), 0.0, 1.0)


def face_color_share(
    points: np.ndarray, colors: np.ndarray, half_extent: tuple[float, float, float]
) -> tuple[float, dict[str, str | None]]:
    """Share of the six cube face regions whose mean colour is nearest to their own true colour,
    and the colour name each region got (None for a region without samples)."""
    palette = np.array([PALETTE[c] for c in SIX_FACE_COLORS])  # [6, 3]
    region = face_index(torch.as_tensor(points, dtype=torch.float32), half_extent).numpy()
    names: dict[str, str | None] = {}
    right = 0
    for i, face in enumerate(FACES):
        sel = region == i
        if not sel.any():
            names[face] = None
            continue
        guess = int(np.linalg.norm(palette - colors[sel].mean(0), axis=-1).argmin())
        names[face] = SIX_FACE_COLORS[guess]
        right += guess == i
    return right / len(FACES), names


# ---------------------------------------------------------------------------------------------
# prior self-check


def _features(images: torch.Tensor, size: int = 32, threshold: float = 0.1) -> torch.Tensor:
    """Background-neutral thumbnails for nearest-neighbour labels: images [N, 3, H, W] in [0, 1]
    -> [N, 3 * size * size]. The background colour (median of the border pixels) is replaced by
    grey wherever a pixel is within `threshold` of it, so the backdrop does not decide the match."""
    x = F.adaptive_avg_pool2d(images.float(), size)
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # [N, 3, 4 * size]
    bg = border.median(dim=-1).values[..., None, None]  # [N, 3, 1, 1]
    is_bg = (x - bg).abs().amax(dim=1, keepdim=True) < threshold
    return torch.where(is_bg, torch.full_like(x, 0.5), x).flatten(1)


def _nearest(queries: torch.Tensor, refs: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Index of the nearest row of `refs` [M, D] for each row of `queries` [N, D] -> [N]."""
    return torch.cat([torch.cdist(q, refs).argmin(dim=1) for q in queries.split(chunk)])


@torch.no_grad()
def evaluate_prior_samples(
    folder: str | Path,
    n_per_caption: int = 16,
    device: torch.device | str = "cpu",
    *,
    reference: RenderedDataset | None = None,
    steps: int = 50,
    guidance_scale: float = 5.0,
    seed: int = 0,
    reference_per_object: int = 200,
    batch: int = 256,
) -> dict[str, Any]:
    """Sample the prior in `folder` and check what it draws.

    For every caption text (each known caption with its four view suffixes, and bare), draw
    `n_per_caption` images from pure noise with DDIM (`steps` steps, classifier-free guidance
    `guidance_scale`, the folder's scheduler config), decode them, and label each with its nearest
    `reference` render (default: `reference_per_object` fresh renders per object). A sample counts
    as the right object when that render shows the caption's object, or, if the render is
    textureless (colour unknowable), the caption's shape. Returns accuracies (object, shape,
    view for view captions, view for the six-colored cube) and a per-text breakdown.
    """
    from diffusers import DDIMScheduler

    from ..sdmodel import load_diffusion

    if n_per_caption < 1 or steps < 1:
        raise ValueError(f"need n_per_caption >= 1 and steps >= 1, got {n_per_caption!r} and {steps!r}")
    folder = Path(folder)
    device = torch.device(device)
    model = load_diffusion(str(folder), device=device, dtype=torch.float32)
    prompts_file = folder / "prompts.json"
    captions = tuple(json.loads(prompts_file.read_text())["captions"]) if prompts_file.is_file() else KNOWN_CAPTIONS
    texts = caption_texts(captions)
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    latent_size = int(model.unet.config.sample_size)
    size = latent_size * factor
    if reference is None:
        reference = render_dataset(
            DatasetConfig(images_per_object=reference_per_object, image_size=size, seed=seed + 7919, captions=captions),
            device,
        )
    if reference.captions != captions or reference.images.shape[-1] != size:
        raise ValueError(f"reference renders ({reference.images.shape[-1]} px of {len(reference.captions)} objects) "
                         f"do not match the prior ({size} px, {len(captions)} objects)")  # fmt: skip

    ids = model.tokenizer([*texts, ""], padding="max_length", max_length=model.max_length, truncation=True,
                          return_tensors="pt").input_ids.to(device)  # fmt: skip
    emb = model.text_encoder(ids)[0]  # [T + 1, 77, D]
    cond_all, uncond = emb[:-1], emb[-1:]
    scheduler = DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler", set_alpha_to_one=False)
    gen = torch.Generator(device=device).manual_seed(seed)
    text_of = torch.arange(len(texts), device=device).repeat_interleave(n_per_caption)  # [S]
    images = []
    for chunk in text_of.split(batch):
        b = len(chunk)
        x = torch.randn(b, model.latent_channels, latent_size, latent_size, generator=gen, device=device)
        x = x * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps, device=device)
        context = torch.cat([uncond.expand(b, -1, -1), cond_all[chunk]])
        for t in scheduler.timesteps:
            eps_u, eps_c = model.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
        decoded = model.vae.decode(x / model.vae_scaling_factor).sample
        images.append(((decoded + 1.0) / 2.0).clamp(0, 1))
    samples = torch.cat(images)  # [S, 3, H, W]

    nearest = _nearest(_features(samples), _features(reference.float_images()))
    ref_obj = reference.object_index[nearest].cpu()
    ref_view = reference.view_index[nearest].cpu()
    ref_flat = (reference.shading_index[nearest] == SHADINGS.index("textureless")).cpu()
    obj_of = (text_of // (len(VIEWS) + 1)).cpu()
    view_of = (text_of % (len(VIEWS) + 1)).cpu()
    shape_name = [KNOWN_OBJECTS[c].shape for c in captions]
    same_shape = torch.tensor([shape_name[a] == shape_name[b] for a, b in zip(ref_obj.tolist(), obj_of.tolist())])
    obj_ok = (ref_obj == obj_of) | (ref_flat & same_shape)
    has_view = view_of != PLAIN
    view_ok = ref_view == view_of
    six = captions.index(SIX_COLORED_CAPTION) if SIX_COLORED_CAPTION in captions else -1
    six_sel = has_view & (obj_of == six)

    per_text = {}
    for i, text in enumerate(texts):
        sel = text_of.cpu() == i
        got = Counter(captions[j] + (" (textureless)" if f else "") for j, f in zip(ref_obj[sel].tolist(), ref_flat[sel].tolist()))
        entry = {"object_accuracy": float(obj_ok[sel].float().mean()), "nearest": dict(got.most_common())}
        if view_of[sel][0] != PLAIN:
            entry["view_accuracy"] = float(view_ok[sel].float().mean())
        per_text[text] = entry
    return {
        "object_accuracy": float(obj_ok.float().mean()),
        "shape_accuracy": float(same_shape.float().mean()),
        "view_accuracy": float(view_ok[has_view].float().mean()),
        "six_colored_view_accuracy": float(view_ok[six_sel].float().mean()) if six_sel.any() else None,
        "textureless_share": float(ref_flat.float().mean()),
        "chance_object_accuracy": 1.0 / len(captions),
        "n_per_caption": n_per_caption,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "reference_images": len(reference),
        "seed": seed,
        "per_text": per_text,
    }

