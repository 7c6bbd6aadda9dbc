"""Everything a finished run leaves for people to open: turntable MP4, image grids, relit views,
meshes. Works on any scene (fresh from training or reopened from a checkpoint) and writes one
set of files per prompt of a K-prompt scene."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..atomic import atomic_write_text
from ..cameras import orbit_cameras
from ..config import RunConfig
from ..render.renderer import Renderer
from .media import image_grid, to_uint8, write_png, write_video
from .mesh import extract_mesh, sample_density_grid, save_meshes
from .mesh_level import LEVEL_GRID, MESH_LEVEL_MODES, MeshLevel, opacity_levels

log = logging.getLogger(__name__)

TURNTABLE_PANELS = ("lambertian", "normal", "textureless")
GRID_ROWS = ("albedo", "lambertian", "normal")  # only "lambertian" depends on the light
CHECKPOINT_FILE = "checkpoint.safetensors"  # written by the trainer, listed here with the rest
LEVEL_SUFFIX = "_level.json"  # beside each mesh: the density level it was cut at (`mesh_level.MeshLevel`)

# Scores a finished run folder (its mesh against a known answer) and returns the file it wrote,
# or None when the run has no known answer. The built-in prior provides one.
Scorer = Callable[[Path], "Path | None"]


# The outputs of a run, in the order they are written: what users came for first.
OUTPUT_NAMES = ("mesh", "score", "grid", "turntable")


@dataclass
class RunOutputs:
    """What `write_outputs` wrote. An output that failed is None ([] for meshes) and its reason
    is in `failed` (output name from `OUTPUT_NAMES` -> one-line reason)."""

    out_dir: Path
    checkpoint: Path
    turntable: Path | None
    grid: Path | None
    meshes: list[Path]
    metrics: Path
    score: Path | None = None  # score.json: the mesh against the true object, for the built-in prior
    failed: dict[str, str] = dataclasses.field(default_factory=dict)


def write_outputs(renderer: Renderer, cfg: RunConfig, out_dir: Path, scorer: Scorer | None = None) -> RunOutputs:
    """Meshes of a one-prompt scene into `out_dir`, then its score, the image grid and the
    turntable. Each output is written on its own: one that fails (any exception: a missing MP4
    writer, a scene without a surface, a full disk) is logged as one warning and recorded in
    `RunOutputs.failed`, and the others are still written. The caller decides the exit code."""
    renderer = renderer.eval()
    out_dir = Path(out_dir)
    outputs = RunOutputs(out_dir, out_dir / CHECKPOINT_FILE, None, None, [], out_dir / "metrics.csv")

    def attempt(name: str, write: Callable[[], object]) -> None:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 -- one output failing must not lose the others
            reason = " ".join(str(exc).split()) or type(exc).__name__
            outputs.failed[name] = reason
            log.warning("%s not written: %s", name, reason)
            log.debug("%s failed", name, exc_info=True)

    def mesh() -> None:
        outputs.meshes = write_meshes(renderer, cfg, [out_dir])[0]

    def score() -> None:
        if "mesh" in outputs.failed:
            raise ValueError("it needs the mesh, which was not written")
        outputs.score = scorer(out_dir)

    def grid() -> None:
        path = out_dir / "validation.png"
        write_grids(renderer, cfg, [path])
        outputs.grid = path

    def turntable() -> None:
        path = out_dir / "turntable.mp4"
        write_turntables(renderer, cfg, [path])
        outputs.turntable = path

    attempt("mesh", mesh)
    if scorer is not None:
        attempt("score", score)
    attempt("grid", grid)
    attempt("turntable", turntable)
    if outputs.failed:
        log.warning("%d of the run's outputs were not written: %s", len(outputs.failed), ", ".join(outputs.failed))
    return outputs


def _orbit(cfg: RunConfig, n: int, light_dir=None):
    return orbit_cameras(n, cfg.camera.val_elevation, cfg.camera.val_radius, cfg.camera.val_fovy, light_dir)


def _repeat_for_prompts(cams, index: int, k: int):
    """Camera `index` of an orbit, repeated for all K prompts: [K] cameras."""
    return cams.take(index).repeated(k)


def image_chunk(device: torch.device, k: int) -> int:
    """Rays per prompt per render call for output images: 2^15 rays in all on a GPU (a 256^2
    view in two calls), 4096 per prompt on a CPU (where bigger calls gain nothing)."""
    return max(4096, 2**15 // max(k, 1)) if device.type == "cuda" else 4096


@torch.no_grad()
def render_views_shadings(
    renderer: Renderer, cfg: RunConfig, n: int, size: int, shadings: Sequence[str], light_dir=None
) -> dict[str, torch.Tensor]:
    """Render `n` orbit views of every prompt in each mode of `shadings`, from one render pass per
    view (density, albedo and normals are shared; only the shading differs):
    ``{mode: float [K, n, H, W, 3] in [0, 1] on the CPU}``."""
    k = renderer.num_prompts
    cams = _orbit(cfg, n, light_dir)
    device = next(renderer.parameters()).device
    chunk = image_chunk(device, k)
    frames: dict[str, list[torch.Tensor]] = {m: [] for m in dict.fromkeys(shadings)}
    for i in range(n):
        view = _repeat_for_prompts(cams, i, k).to(device)
        outs = renderer.render_image_shadings(view, size, size, list(frames), cfg.render.ambient_ratio, chunk=chunk)
        for m, out in outs.items():
            frames[m].append(out["rgb"].float().clamp(0, 1).cpu())  # [K, H, W, 3]
    return {m: torch.stack(f, dim=1) for m, f in frames.items()}


def render_views(renderer: Renderer, cfg: RunConfig, n: int, size: int, shading: str, light_dir=None) -> torch.Tensor:
    """Render `n` orbit views of every prompt: float [K, n, H, W, 3] in [0, 1] on the CPU."""
    return render_views_shadings(renderer, cfg, n, size, [shading], light_dir)[shading]


def write_turntables(renderer: Renderer, cfg: RunConfig, paths: list[Path]) -> None:
    """One MP4 per prompt: lambertian | normals | textureless, side by side, one orbit (all three
    from one render pass per frame)."""
    n, size = cfg.output.video_frames, cfg.output.video_size
    views = render_views_shadings(renderer, cfg, n, size, TURNTABLE_PANELS)
    video = torch.cat([views[m] for m in TURNTABLE_PANELS], dim=3)  # [K, n, H, 3W, 3]
    for k, path in enumerate(paths):
        write_video(to_uint8(video[k]), path, fps=cfg.output.video_fps)
        log.info("turntable: %s", path)


def write_grids(renderer: Renderer, cfg: RunConfig, paths: list[Path], light_dir=None) -> None:
    """One PNG per prompt: a row of albedo views over a row of shaded views (relit when
    `light_dir` is a world-space direction, otherwise lit from each camera) over a row of
    normals, all from one render pass per view (albedo and normals ignore the light)."""
    n, size = cfg.output.grid_views, cfg.output.video_size
    views = render_views_shadings(renderer, cfg, n, size, GRID_ROWS, light_dir)
    for k, path in enumerate(paths):
        rows = torch.cat([views[m][k] for m in GRID_ROWS], dim=0)
        write_png(image_grid(to_uint8(rows), cols=n), path)
        log.info("image grid: %s", path)


def write_meshes(
    renderer: Renderer, cfg: RunConfig, out_dirs: list[Path], stem: str = "mesh", coarse_stride: int = 1
) -> list[list[Path]]:
    """Marching cubes on each prompt's density, vertex colours from its albedo, world units
    (files in glTF's frame, see `mesh.save_mesh`), cut at the level ``output.mesh_level`` picks
    (`mesh_level`), which is written beside the mesh as ``<stem>_level.json``. `coarse_stride`
    > 1 queries the density exactly only near the surface (`mesh.sample_density_near_surface`)."""
    field = renderer.field
    mode = cfg.output.mesh_level
    if mode not in MESH_LEVEL_MODES:
        raise ValueError(f"output.mesh_level must be one of {', '.join(MESH_LEVEL_MODES)}, got {mode!r}")
    device = next(renderer.parameters()).device

    def density_of(i: int):
        one = slice(i, i + 1)  # evaluate prompt i alone, without copying the stacked tables

        def density_fn(x: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N]
            return field.density(x[None], prompts=one)[0].float()

        return density_fn

    fixed = cfg.output.mesh_threshold
    if mode == "opacity":
        grids = [torch.from_numpy(sample_density_grid(density_of(i), cfg.field.bound, LEVEL_GRID, device=device))
                 for i in range(len(out_dirs))]  # fmt: skip
        levels = opacity_levels(renderer, cfg, grids)
    else:
        levels = [MeshLevel(fixed, "fixed", fixed) for _ in out_dirs]
    written = []
    for i, out_dir in enumerate(out_dirs):
        one = slice(i, i + 1)

        def color_fn(x: torch.Tensor, one=one) -> torch.Tensor:  # [N, 3] -> [N, 3]
            return field(x[None], prompts=one)[1][0].float()

        level = levels[i]
        if level.mode == "opacity":
            log.info("mesh level %.3g (its silhouettes' IoU with the renders %.3f; %.3f at the fixed level %g)",
                     level.threshold, level.silhouette_iou, level.silhouette_iou_fixed, fixed)  # fmt: skip
        mesh = extract_mesh(
            density_of(i), color_fn, bound=cfg.field.bound, resolution=cfg.output.mesh_resolution,
            threshold=level.threshold, device=device, fill_cavities=cfg.output.mesh_fill_cavities,
            coarse_stride=coarse_stride,
        )  # fmt: skip
        paths = save_meshes(mesh, out_dir, stem, cfg.output.mesh_formats)
        atomic_write_text(Path(out_dir) / f"{stem}{LEVEL_SUFFIX}", json.dumps(level.as_dict(), indent=2) + "\n")
        written.append(paths)
        log.info("mesh: %d vertices, %d faces -> %s", len(mesh.vertices), len(mesh.faces), ", ".join(map(str, written[-1])))
    return written


def mesh_threshold_of(run_dir: Path, cfg: RunConfig, stem: str = "mesh") -> float:
    """The level the run's mesh was cut at (its ``<stem>_level.json``), else ``output.mesh_threshold``."""
    path = Path(run_dir) / f"{stem}{LEVEL_SUFFIX}"
    if path.is_file():
        try:
            return float(json.loads(path.read_text())["threshold"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"'{path}' is not a mesh level file: {exc}") from exc
    return cfg.output.mesh_threshold
