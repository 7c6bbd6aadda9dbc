"""How much of each known object starts in cells that nerfacc's occupancy grid marks empty.

nerfacc marches a ray only through occupied cells of a prompt's occupancy grid. A cell is
occupied when its running value, the field's density times the march step, exceeds
``min(mean over cells, render.occupancy_threshold)``. The first refresh of the grid (step 0)
sees the field at initialisation: DreamFusion's density blob ``blob_density * (1 - |x| /
blob_radius)`` on top of a near-zero hash grid. Where the blob is strongly negative, beyond
about its radius, a cell starts empty. A true object that reaches further (a cube's corners and
edges) then gets no samples and no SDS gradient there. Density can only appear there through
the hash grid's interpolation from neighbouring cells, until a later refresh finds it.
The torch sampler samples the whole box, so it has no such blind spot.

For every known object (or ``--objects``), at the preset's initial field (``--seed``), this
computes the share of the object's true volume in cells that nerfacc's first refresh would mark
empty, and ``iou_cap``, one minus that share: the best IoU a shape could reach if no empty cell
ever came back. It follows nerfacc's own update rule: cell
centres jittered, density times step, threshold ``min(mean, occ_thre)``. It runs on any
device and needs no nerfacc.

    python -m dreamfusion_trt.bench.initial_occupancy --out initial_occupancy.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..atomic import atomic_write_text

log = logging.getLogger(__name__)


def cell_centres(resolution: int, bound: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Points [R^3, 3] in ``[-bound, bound]^3``, one per cell of an R^3 grid in nerfacc's cell
    order (x slowest): cell centres, or uniformly jittered inside each cell with `gen`."""
    r = resolution
    idx = torch.arange(r)
    grid = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), dim=-1).reshape(-1, 3).float()
    offset = torch.rand(grid.shape, generator=gen) if gen is not None else torch.full(grid.shape, 0.5)
    return -bound + (grid + offset) / r * (2 * bound)


def occupied_cells(density: torch.Tensor, step_size: float, occ_thre: float) -> torch.Tensor:
    """nerfacc's binarisation of one refresh: ``density * step > min(mean, occ_thre)`` -> bool [N]."""
    occ = density * step_size
    return occ > torch.clamp(occ.mean(), max=occ_thre)


def measure(objects: Sequence[str], seed: int, samples_per_cell: int = 8) -> dict[str, Any]:
    """The initial occupied share of the box and, per object, the share of its true volume in
    initially empty cells and the IoU of the truth with its initially occupied part."""
    from ..prior.preset import preset_config
    from ..prior.scenes import make_object
    from ..scene import build_scene

    cfg = preset_config(None, on_cpu=False)  # the GPU preset: the one nerfacc marches
    torch.manual_seed(seed)
    renderer = build_scene(cfg, num_prompts=1, device="cpu").eval()
    bound, res = float(renderer.bound), int(cfg.render.grid_resolution)
    step = float(renderer.step_size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = cell_centres(res, bound, gen)
        sigma = torch.cat([renderer.field.density(c[None], prompts=slice(0, 1))[0] for c in x.split(2**16)])
    occupied = occupied_cells(sigma, step, cfg.render.occupancy_threshold)
    radius = x.norm(dim=-1)
    out: dict[str, Any] = {
        "seed": seed, "grid_resolution": res, "bound": bound, "step_size": step,
        "occupancy_threshold": cfg.render.occupancy_threshold,
        "blob_density": cfg.field.blob_density, "blob_radius": cfg.field.blob_radius,
        "occupied_share_of_box": float(occupied.float().mean()),
        "occupied_radius_max": float(radius[occupied].max()) if occupied.any() else 0.0,
        "empty_radius_min": float(radius[~occupied].min()) if (~occupied).any() else math.inf,
        "objects": {},
    }  # fmt: skip
    # The truth per cell from several points inside it (the share of the cell the object fills).
    fill = torch.zeros(res**3)
    for name in objects:
        obj = make_object(name)
        fill.zero_()
        for s in range(samples_per_cell):
            fill += obj.occupancy(cell_centres(res, bound, torch.Generator().manual_seed(1000 + s))).float()
        fill /= samples_per_cell
        true_volume = float(fill.sum())
        share = float(fill[~occupied].sum()) / max(true_volume, 1e-9)
        # A shape confined to the initially occupied cells is at best the truth's part in them,
        # whose IoU with the truth is that part's share of the true volume.
        out["objects"][name] = {"true_volume_cells": true_volume, "share_in_initially_empty_cells": share, "iou_cap": 1.0 - share}
        log.info("%s: %.1f%% of its volume starts in empty cells (IoU at most %.3f inside the occupied ones)", name,
                 100 * share, 1.0 - share)  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from ..prior.scenes import KNOWN_CAPTIONS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m dreamfusion_trt.bench.initial_occupancy", description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", default=",".join(KNOWN_CAPTIONS), help="known captions, comma-separated (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="initial_occupancy.json")
    args = p.parse_args(argv)
    result = measure([o.strip() for o in args.objects.split(",") if o.strip()], args.seed)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    log.info("occupied share of the box %.3f (cells out to radius %.3f); wrote %s", result["occupied_share_of_box"],
             result["occupied_radius_max"], args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
