"""The occupancy state a scene saves, whichever renderer backend is importable.

A nerfacc `OccGridEstimator` per prompt marches rays on CUDA; without nerfacc an `OccupancyGrid`
stand-in holds the same tensors. Both save exactly ``occs [R^3]`` and ``binaries [1, R, R, R]``
(the box and resolution follow from the config), so a checkpoint written on either side opens
on the other. `upgrade_scene_state` brings scenes saved by older versions to this form.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Buffers of a nerfacc estimator that follow from the config (not saved).
DERIVED_GRID_BUFFERS = ("resolution", "aabbs")


class OccupancyGrid(nn.Module):
    """The occupancy state of one prompt without nerfacc: the tensors a one-level
    `nerfacc.OccGridEstimator` saves, with the same names, shapes and dtypes, so its state_dict
    is interchangeable with the estimator's. Unused by the torch sampler; kept so the scene
    carries its grid to a machine where nerfacc marches it.

    ``occs [R^3]`` float32: the running occupancy value of each cell (nerfacc's cell order);
    ``binaries [1, R, R, R]`` bool: cells the marcher visits.
    """

    def __init__(self, resolution: int) -> None:
        super().__init__()
        if resolution < 1:
            raise ValueError(f"render.grid_resolution must be at least 1, got {resolution!r}")
        self.register_buffer("occs", torch.zeros(resolution**3))
        self.register_buffer("binaries", torch.zeros(1, resolution, resolution, resolution, dtype=torch.bool))


def upgrade_scene_state(state: Mapping[str, torch.Tensor], num_prompts: int, grid_resolution: int) -> dict[str, torch.Tensor]:
    """A scene state in today's backend-neutral form (a new dict; tensors are not copied).

    Scenes saved by older versions differ only in the occupancy grids: with nerfacc they also
    hold each estimator's derived ``resolution`` and ``aabbs`` (dropped here); without nerfacc
    they hold no grid at all (given fully occupied grids here, what such a scene rendered with).
    """
    out = {k: v for k, v in state.items() if not (k.startswith("estimators.") and k.rsplit(".", 1)[-1] in DERIVED_GRID_BUFFERS)}
    if not any(k.startswith("estimators.") for k in out):
        logger.debug("scene state without occupancy grids (saved without nerfacc by an older version): grids start full")
        r = grid_resolution
        for i in range(num_prompts):
            out[f"estimators.{i}.occs"] = torch.zeros(r**3)
            out[f"estimators.{i}.binaries"] = torch.ones(1, r, r, r, dtype=torch.bool)
    return out


