"""Marching cubes over a density field, and writing the mesh as GLB, OBJ or PLY.

Pure functions over world-space callables, so any field (or an analytic test density) can be
meshed: ``density_fn(x [N, 3]) -> [N]`` and ``color_fn(x [N, 3]) -> [N, 3]`` in [0, 1].

Conventions:
- The grid samples ``resolution`` points per axis from ``-bound`` to ``+bound`` inclusive, so grid
  index ``i`` sits at ``i * spacing - bound`` with ``spacing = 2 * bound / (resolution - 1)``; the
  array axes are (x, y, z), and marching-cubes vertices are mapped back with that exact formula.
- The grid is padded by one empty voxel on every side before meshing, so a surface that reaches
  the box is capped on the box faces rather than left open: every mesh is closed.
- Faces are oriented outward, away from the dense side (density above ``threshold`` is inside).
- With ``fill_cavities`` (the default), empty pockets that no path of empty voxels connects to the
  outside are filled before meshing. SDS only constrains what cameras see, so a NeRF is often a
  closed shell around an unconstrained inside; its mesh should be the solid a viewer sees, not
  a shell with an invisible inner surface.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import torch
import trimesh

from ..atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

MESH_FORMATS = ("glb", "obj", "ply")

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # [N, 3] world points -> [N] density
ColorFn = Callable[[torch.Tensor], torch.Tensor]  # [N, 3] world points -> [N, 3] RGB in [0, 1]

# Stand-in for "infinitely empty" outside the box; finite so marching-cubes interpolation stays
# finite, large so the interpolated cap vertex lands on the box face itself.
_EMPTY = -1e30


def grid_coordinates(bound: float, resolution: int) -> np.ndarray:
    """World coordinate of each grid index along one axis: [resolution], from -bound to +bound."""
    spacing = 2.0 * bound / (resolution - 1)
    return np.arange(resolution, dtype=np.float64) * spacing - bound


def default_chunk(device: torch.device | str | None) -> int:
    """Points per density query: 2^20 on a GPU (fewer, fuller launches), 2^18 elsewhere."""
    return 2**20 if device is not None and torch.device(device).type == "cuda" else 2**18


@torch.no_grad()
def sample_density_grid(
    density_fn: DensityFn,
    bound: float,
    resolution: int,
    chunk: int | None = None,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Evaluate `density_fn` on the resolution^3 grid over [-bound, bound]^3.

    Returns float32 [R, R, R] indexed [ix, iy, iz]. Points are sent in chunks of at most `chunk`
    rows (default: `default_chunk(device)`), as float32 on `device` (CPU when None). Progress
    (share done, points/s, time left) is logged every `PROGRESS_EVERY_S` seconds.
    """
    chunk = default_chunk(device) if chunk is None else chunk
    _check_grid_args(bound, resolution, chunk)
    total = resolution**3
    out = np.empty(total, dtype=np.float32)
    _query_grid(density_fn, bound, resolution, None, out, chunk, device, f"density on the {resolution}^3 grid")
    return out.reshape(resolution, resolution, resolution)


def _query_grid(
    density_fn: DensityFn,
    bound: float,
    resolution: int,
    flat: np.ndarray | None,
    out: np.ndarray,
    chunk: int,
    device: torch.device | str | None,
    what: str,
) -> None:
    """out[i] = density at flat grid index i (ix * R^2 + iy * R + iz) for every i in `flat`
    (every index when None), `chunk` points per call, with progress lines."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    axis = torch.as_tensor(grid_coordinates(bound, resolution), dtype=torch.float32, device=device)
    total = resolution**3 if flat is None else len(flat)
    progress = _Progress(what, total)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        if flat is None:
            idx = torch.arange(start, stop, device=device)
        else:
            idx = torch.as_tensor(flat[start:stop], device=device)
        ix = idx // (resolution * resolution)
        iy = (idx // resolution) % resolution
        iz = idx % resolution
        pts = torch.stack([axis[ix], axis[iy], axis[iz]], dim=-1)  # [n, 3]
        sigma = density_fn(pts)
        if sigma.shape not in ((len(idx),), (len(idx), 1)):
            raise ValueError(
                f"density_fn must return [N] (or [N, 1]) for N={len(idx)} points, got shape {tuple(sigma.shape)}"
            )
        values = sigma.reshape(-1).float().cpu().numpy()
        if flat is None:
            out[start:stop] = values
        else:
            out[flat[start:stop]] = values
        progress.update(stop)
    progress.done()


@torch.no_grad()
def sample_density_near_surface(
    density_fn: DensityFn,
    bound: float,
    resolution: int,
    threshold: float,
    stride: int,
    chunk: int | None = None,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """`sample_density_grid`, querying the density exactly only near the surface.

    A coarse grid (every `stride`-th fine point per axis, and the last) is evaluated first; a
    coarse cell is near the surface when its corners lie on both sides of `threshold`, and so
    are its 26 neighbours. Fine points of those cells are queried exactly; every other fine point
    gets a value on its cell's side of the threshold (the cell's corner minimum when all above,
    maximum when all below), so marching cubes finds the same surface there as the full grid,
    with the same vertices. What it can miss: a piece of surface that crosses no coarse edge
    (thinner than about `stride` voxels and lying between coarse points). Returns float32
    [R, R, R] like `sample_density_grid`; ``stride=1`` is exactly `sample_density_grid`.
    """
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    chunk = default_chunk(device) if chunk is None else chunk
    _check_grid_args(bound, resolution, chunk)
    if stride == 1 or resolution <= 2 * stride:
        return sample_density_grid(density_fn, bound, resolution, chunk, device)
    from scipy.ndimage import binary_dilation

    r = resolution
    coarse = np.arange(0, r, stride)
    if coarse[-1] != r - 1:
        coarse = np.append(coarse, r - 1)
    n = len(coarse)
    out = np.empty(r**3, dtype=np.float32)
    cflat = ((coarse[:, None, None] * r + coarse[None, :, None]) * r + coarse[None, None, :]).reshape(-1)
    _query_grid(density_fn, bound, r, cflat, out, chunk, device, f"coarse density ({n}^3 of the {r}^3 grid)")
    vc = out[cflat].reshape(n, n, n)
    corners = [vc[a : a + n - 1, b : b + n - 1, c : c + n - 1] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    cmin, cmax = np.minimum.reduce(corners), np.maximum.reduce(corners)  # [n-1]^3 per coarse cell
    near = binary_dilation((cmin <= threshold) & (cmax > threshold), structure=np.ones((3, 3, 3), bool))
    # Fine point f along an axis lies in cells cell_lo[f] and cell_hi[f] (the same one unless f
    # is a coarse point, which borders two cells).
    f = np.arange(r)
    cell_hi = np.clip(np.searchsorted(coarse, f, side="right") - 1, 0, n - 2)
    cell_lo = np.clip(np.searchsorted(coarse, f, side="left") - 1, 0, n - 2)
    needed = np.zeros((r, r, r), dtype=bool)
    for a in (cell_lo, cell_hi):
        for b in (cell_lo, cell_hi):
            for c in (cell_lo, cell_hi):
                needed |= near[np.ix_(a, b, c)]
    fill = np.where(cmin > threshold, cmin, cmax)[np.ix_(cell_hi, cell_hi, cell_hi)]  # a value on the cell's side
    out = out.reshape(r, r, r)
    exact = np.zeros((r, r, r), dtype=bool)
    exact[np.ix_(coarse, coarse, coarse)] = True
    out[~exact] = fill[~exact]
    todo = np.flatnonzero(needed & ~exact)
    flat_out = out.reshape(-1)
    _query_grid(density_fn, bound, r, todo, flat_out, chunk, device,
                f"density near the surface ({len(todo) / r**3:.0%} of the {r}^3 grid)")  # fmt: skip
    logger.info("coarse-to-fine density at %d^3 (stride %d): %.1fM of %.1fM points queried",
                r, stride, (len(todo) + len(cflat)) / 1e6, r**3 / 1e6)  # fmt: skip
    return out


PROGRESS_EVERY_S = 5.0


class _Progress:
    """Log lines for a long loop over `total` points: at most one per `PROGRESS_EVERY_S`."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        logger.info(
            "%s: %d%% (%.1fM of %.1fM points, %.2fM points/s, about %.0f s left)",
            self.what, 100 * done // self.total, done / 1e6, self.total / 1e6, rate / 1e6, (self.total - done) / rate,
        )  # fmt: skip

    def done(self) -> None:
        elapsed = time.perf_counter() - self.t0
        level = logging.INFO if elapsed >= PROGRESS_EVERY_S else logging.DEBUG
        logger.log(level, "%s: %.1fM points in %.1f s (%.2fM points/s)", self.what, self.total / 1e6, elapsed,
                   self.total / 1e6 / max(elapsed, 1e-9))  # fmt: skip


def extract_mesh(
    density_fn: DensityFn,
    color_fn: ColorFn | None,
    bound: float,
    resolution: int,
    threshold: float,
    chunk: int | None = None,
    device: torch.device | str | None = None,
    components: Literal["all", "largest"] = "all",
    min_component_fraction: float = 1e-3,
    fill_cavities: bool = True,
    coarse_stride: int = 1,
) -> trimesh.Trimesh:
    """Mesh the iso-surface ``density == threshold`` of a world-space density field.

    Args:
        density_fn: world points [N, 3] -> density [N]; called under no_grad.
        color_fn: world points [N, 3] -> RGB [N, 3] in [0, 1] (clamped), queried at the mesh
            vertices for uint8 vertex colors; None leaves the mesh uncoloured.
        bound: the grid covers [-bound, bound]^3 (world units).
        resolution: grid points per axis (>= 2); vertices are exact world coordinates.
        threshold: density iso-level; denser than this is inside.
        chunk: points per call of `density_fn` / `color_fn` (default: `default_chunk(device)`).
        device: where query points are created (CPU when None).
        components: "all" keeps every connected piece (minus tiny floaters, below); "largest"
            keeps only the piece with the most faces.
        min_component_fraction: with components="all", pieces with fewer faces than this fraction
            of all faces are dropped as floaters (default 0.1 %: specks only; 0 keeps everything).
        fill_cavities: fill enclosed empty pockets (set to the grid's maximum density) so the
            mesh has no inner surfaces.
        coarse_stride: above 1, query the density exactly only near the surface found on a grid
            `coarse_stride` times coarser (`sample_density_near_surface`): about
            ``coarse_stride^2`` times fewer queries on a closed surface, the same mesh unless
            a feature is thinner than about `coarse_stride` voxels. 1 queries every point.

    Returns:
        A `trimesh.Trimesh` in world coordinates with outward faces and, when `color_fn` is
        given, RGBA uint8 vertex colors.

    Raises:
        ValueError: bad arguments, a density with NaNs, or no surface at `threshold` (the message
            quotes the density range found).
    """
    from skimage.measure import marching_cubes

    chunk = default_chunk(device) if chunk is None else chunk
    t_start = time.perf_counter()
    if components not in ("all", "largest"):
        raise ValueError(f"components must be 'all' or 'largest', got {components!r}")
    if not 0.0 <= min_component_fraction < 1.0:
        raise ValueError(f"min_component_fraction must be in [0, 1), got {min_component_fraction!r}")
    _check_grid_args(bound, resolution, chunk)
    if coarse_stride == 1:
        volume = sample_density_grid(density_fn, bound, resolution, chunk, device)  # [R, R, R]
    else:
        volume = sample_density_near_surface(density_fn, bound, resolution, threshold, coarse_stride, chunk, device)
    t_sampled = time.perf_counter()

    n_nan = int(np.isnan(volume).sum())
    if n_nan:
        raise ValueError(f"density_fn returned {n_nan} NaN values on the {resolution}^3 grid")
    np.clip(volume, -1e30, 1e30, out=volume)  # +-inf would turn interpolated vertices into NaN
    lo, hi = float(volume.min()), float(volume.max())
    if not lo < threshold <= hi:
        where = "nowhere reaches" if hi < threshold else "everywhere reaches"
        raise ValueError(
            f"no surface at threshold {threshold:g}: the density on the {resolution}^3 grid over "
            f"[-{bound:g}, {bound:g}]^3 ranges from {lo:.6g} to {hi:.6g}, so it {where} the threshold; "
            f"pick a threshold inside that range"
        )

    if fill_cavities:
        fill_enclosed_cavities(volume, threshold)
    padded = np.pad(volume, 1, mode="constant", constant_values=_EMPTY)
    spacing = 2.0 * bound / (resolution - 1)
    verts, faces, _, _ = marching_cubes(padded, level=threshold, allow_degenerate=False)
    # padded index p is grid index p - 1, at world (p - 1) * spacing - bound
    verts = (verts.astype(np.float64) - 1.0) * spacing - bound
    # caps land on the box faces up to float rounding; keep them inside the box exactly
    verts = np.clip(verts, -bound, bound)
    faces = faces.astype(np.int64)
    if len(faces) == 0:
        raise ValueError(
            f"marching cubes found no faces at threshold {threshold:g} (density range {lo:.6g} to {hi:.6g}); "
            f"the surface is thinner than one voxel at resolution {resolution}"
        )
    if _outward_vote(padded, verts, faces, spacing, bound) < 0:
        faces = faces[:, ::-1].copy()

    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=False)
    mesh = _filter_components(mesh, components, min_component_fraction)

    if color_fn is not None:
        rgb = _query_colors(color_fn, mesh.vertices, chunk, device)  # [V, 3] uint8
        rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
        mesh.visual = trimesh.visual.ColorVisuals(mesh=mesh, vertex_colors=rgba)
    t_end = time.perf_counter()
    logger.info(
        "marching cubes at %d^3, threshold %g: %d vertices, %d faces in %.1f s (%.1f s querying the density)",
        resolution,
        threshold,
        len(mesh.vertices),
        len(mesh.faces),
        t_end - t_start,
        t_sampled - t_start,
    )
    return mesh


def fill_enclosed_cavities(volume: np.ndarray, threshold: float) -> int:
    """In place: voxels at or below `threshold` that no face-connected path of such voxels links
    to the grid's border get the grid's maximum density. Returns how many were filled."""
    from scipy.ndimage import binary_fill_holes

    inside = volume > threshold
    cavities = binary_fill_holes(inside) & ~inside
    count = int(cavities.sum())
    if count:
        volume[cavities] = volume.max()
    return count


# Mesh files are in glTF's frame: +Y up, the object's front (what the azimuth-0 camera on the
# world's +x axis sees) facing +Z, so (x, y, z) in the world (z up) is (y, z, x) in the file. A
# proper rotation (a cyclic permutation of the axes): winding and outward faces are kept.
WORLD_TO_FILE = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
FILE_FRAME = "gltf_y_up"  # the tag our files carry (GLB: asset.extras; OBJ, PLY: a header comment)
_TAG = f"dreamfusion-trt frame: {FILE_FRAME} (world x, y, z = file z, x, y)"


def save_mesh(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """Write a world-frame `mesh` to `path` atomically; the format follows the suffix (.glb, .obj
    or .ply). Every format is written in glTF's frame (+Y up, front facing +Z; `WORLD_TO_FILE`)
    and tagged so `load_mesh_world` returns the world-frame mesh.

    Vertex colors are kept in all three: GLB as the COLOR_0 attribute, PLY as per-vertex
    red/green/blue/alpha, OBJ as trimesh writes them (``v x y z r g b``).
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in MESH_FORMATS:
        raise ValueError(
            f"unsupported mesh format {path.suffix!r} in '{path}'; allowed: {', '.join('.' + f for f in MESH_FORMATS)}"
        )
    out = mesh.copy()
    out.apply_transform(WORLD_TO_FILE)
    if fmt == "obj":
        # no materials or texture files: a single self-contained OBJ with colored vertices
        data = f"# {_TAG}\n" + trimesh.exchange.obj.export_obj(out, include_color=True, include_texture=False)
    elif fmt == "glb":

        def tag(tree: dict) -> None:
            tree.setdefault("asset", {}).setdefault("extras", {})["dreamfusion_trt"] = {"frame": FILE_FRAME}

        data = trimesh.exchange.gltf.export_glb(trimesh.Scene(out), tree_postprocessor=tag)
    else:
        data = out.export(file_type="ply")
        magic, fmt_line, rest = data.split(b"\n", 2)
        data = b"\n".join([magic, fmt_line, f"comment {_TAG}".encode(), rest])  # after "ply" and "format ..."
    if isinstance(data, str):
        data = data.encode()
    atomic_write_bytes(path, data)
    logger.info("wrote %s (%d vertices, %d faces)", path, len(mesh.vertices), len(mesh.faces))
    return path


def mesh_file_frame(path: str | Path) -> str:
    """The frame a mesh file of ours is in: `FILE_FRAME`, or "world" for files written before
    meshes were written in glTF's frame (untagged). Raises ValueError for an unreadable GLB."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if path.suffix.lower() == ".glb":
        if len(head) < 20 or head[:4] != b"glTF" or head[16:20] != b"JSON":
            raise ValueError(f"'{path}' is not a binary glTF file")
        (n,) = struct.unpack("<I", head[12:16])
        if 20 + n > len(head):
            with open(path, "rb") as f:
                head = f.read(20 + n)
        try:
            tree = json.loads(head[20 : 20 + n])
        except ValueError as exc:
            raise ValueError(f"'{path}' has an unreadable glTF JSON chunk: {exc}") from exc
        tag = tree.get("asset", {}).get("extras", {}).get("dreamfusion_trt", {})
        return FILE_FRAME if isinstance(tag, dict) and tag.get("frame") == FILE_FRAME else "world"
    return FILE_FRAME if f"dreamfusion-trt frame: {FILE_FRAME}".encode() in head[:4096] else "world"


def load_mesh_world(path: str | Path) -> trimesh.Trimesh:
    """Read one of our mesh files (GLB, OBJ or PLY; a scene is concatenated) back into the world
    frame (z up, front towards +x), whichever frame it was written in: glTF's (tagged, today's)
    or the world frame (untagged files of older versions). Vertex colors are kept.

    Raises FileNotFoundError when it is missing, ValueError when it cannot be read or has no
    triangles.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh not found: '{path}'")
    try:
        frame = mesh_file_frame(path)
        mesh = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # noqa: BLE001 -- trimesh raises many types for unreadable files
        raise ValueError(f"could not read mesh '{path}': {exc}") from exc
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"mesh '{path}' has no triangles")
    if frame == FILE_FRAME:
        mesh.apply_transform(np.linalg.inv(WORLD_TO_FILE))
    else:
        logger.debug("'%s' carries no frame tag: read as the world frame (z up), as older versions wrote it", path)
    return mesh


def save_meshes(mesh: trimesh.Trimesh, out_dir: str | Path, stem: str, formats: Iterable[str]) -> list[Path]:
    """Write ``out_dir/stem.<fmt>`` for each format ("glb", "obj", "ply"; a leading dot is fine).

    All formats are checked before anything is written. Returns the written paths in order.
    """
    fmts = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in fmts if f not in MESH_FORMATS]
    if bad:
        raise ValueError(f"unsupported mesh format(s) {bad!r}; allowed: {', '.join(MESH_FORMATS)}")
    if not fmts:
        raise ValueError("no mesh formats given; allowed: " + ", ".join(MESH_FORMATS))
    out_dir = Path(out_dir)
    return [save_mesh(mesh, out_dir / f"{stem}.{fmt}") for fmt in dict.fromkeys(fmts)]


# ---------------------------------------------------------------------------------------------
# helpers


def _check_grid_args(bound: float, resolution: int, chunk: int) -> None:
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound!r}")
    if int(resolution) != resolution or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")


def _outward_vote(padded: np.ndarray, verts: np.ndarray, faces: np.ndarray, spacing: float, bound: float) -> float:
    """Area-weighted vote of whether face normals point down the density gradient (outward).

    Positive: the winding is already outward. Marching cubes winds every face the same way, so one
    global vote decides; the density gradient is a central difference at the voxel nearest each
    face centroid (signs only, so the huge padding values do not dominate).
    """
    tri = verts[faces]  # [F, 3, 3]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # [F, 3], |cross| = 2 * area
    centroid = tri.mean(axis=1)
    n = padded.shape[0]
    p = np.rint((centroid + bound) / spacing + 1.0).astype(np.int64)  # nearest padded index
    p = np.clip(p, 1, n - 2)
    grad = np.empty_like(centroid)
    for axis in range(3):
        hi, lo = p.copy(), p.copy()
        hi[:, axis] += 1
        lo[:, axis] -= 1
        grad[:, axis] = padded[tuple(hi.T)].astype(np.float64) - padded[tuple(lo.T)].astype(np.float64)
    dots = np.einsum("fi,fi->f", cross, grad)
    return float(np.sum(np.linalg.norm(cross, axis=1) * -np.sign(dots)))


def _filter_components(
    mesh: trimesh.Trimesh, components: Literal["all", "largest"], min_fraction: float
) -> trimesh.Trimesh:
    """Drop floaters: keep the largest connected piece, or the pieces above a face fraction."""
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    counts = np.bincount(labels)
    if len(counts) <= 1:
        return mesh
    if components == "largest":
        keep_labels = np.array([int(np.argmax(counts))])
    else:
        keep_labels = np.nonzero(counts >= min_fraction * len(mesh.faces))[0]
    if len(keep_labels) == len(counts):
        return mesh
    mask = np.isin(labels, keep_labels)
    logger.info(
        "dropped %d of %d connected pieces (%d of %d faces)",
        len(counts) - len(keep_labels),
        len(counts),
        int((~mask).sum()),
        len(mask),
    )
    mesh.update_faces(mask)
    mesh.remove_unreferenced_vertices()
    return mesh


@torch.no_grad()
def _query_colors(
    color_fn: ColorFn, vertices: np.ndarray, chunk: int, device: torch.device | str | None
) -> np.ndarray:
    """color_fn at the vertices [V, 3] -> uint8 RGB [V, 3]."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    pts = torch.as_tensor(np.asarray(vertices), dtype=torch.float32)
    out = np.empty((len(pts), 3), dtype=np.uint8)
    for start in range(0, len(pts), chunk):
        x = pts[start : start + chunk].to(device)
        rgb = color_fn(x)
        if tuple(rgb.shape) != (len(x), 3):
            raise ValueError(f"color_fn must return [N, 3] for N={len(x)} points, got shape {tuple(rgb.shape)}")
        rgb = torch.nan_to_num(rgb.float(), nan=0.0).clamp(0.0, 1.0)
        out[start : start + len(x)] = (rgb * 255.0).round().to(torch.uint8).cpu().numpy()
    return out
