"""One prompt's share of a K-prompt scene, as the state_dict of a one-prompt scene.

A scene built for K prompts keeps most tensors stacked with a leading dimension K (hash tables,
MLP weights and biases) and a few per-prompt modules in lists (one nerfacc occupancy grid per
prompt, one tinycudann encoding per prompt). `extract_slot` cuts prompt k out as the state_dict
of a one-prompt scene (what a single-prompt checkpoint holds, so `render` and `export-mesh` open
it), `insert_slot` copies such a state into slot k, and `fresh_slot_state` is the state a new
prompt starts from: a one-prompt scene initialised from the prompt's seed alone, so a prompt
starts identically whichever slot, batch or command it trains in.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..config import RunConfig
from ..scene import build_scene

# Module lists holding one module per prompt (state keys "<list>.<k>.<rest>").
PER_PROMPT_LISTS = ("estimators", "field.encoding.encodings")


def per_prompt_key(key: str) -> tuple[str, int, str] | None:
    """``"estimators.3.occs"`` -> ``("estimators", 3, "occs")``; None for a stacked tensor's key."""
    for prefix in PER_PROMPT_LISTS:
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1 :].partition(".")
            if index.isdigit():
                return prefix, int(index), rest
    return None


def parameter_owner(name: str) -> int | None:
    """The slot a parameter of a K-prompt scene belongs to whole (per-prompt modules), or None
    when it is stacked over the prompts."""
    found = per_prompt_key(name)
    return None if found is None else found[1]


def extract_slot(state: Mapping[str, torch.Tensor], k: int, num_slots: int) -> dict[str, torch.Tensor]:
    """Prompt `k` of a K-prompt scene state -> a one-prompt scene state (views, not copies)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        found = per_prompt_key(key)
        if found is None:
            if value.dim() == 0 or value.shape[0] != num_slots:
                raise ValueError(f"scene tensor '{key}' of shape {tuple(value.shape)} is not stacked over {num_slots} prompts")
            out[key] = value[k : k + 1]
        elif found[1] == k:
            out[f"{found[0]}.0.{found[2]}"] = value
    return out


@torch.no_grad()
def insert_slot(target: Mapping[str, torch.Tensor], k: int, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a one-prompt scene `state` into slot `k` of `target` (a K-prompt scene's
    ``state_dict()``, whose tensors share storage with the scene). Raises ValueError naming
    the first missing, unexpected or mis-shaped tensor."""
    wanted: dict[str, tuple[str, bool]] = {}  # one-prompt key -> (scene key, stacked?)
    for key in target:
        found = per_prompt_key(key)
        if found is None:
            wanted[key] = (key, True)
        elif found[1] == k:
            wanted[f"{found[0]}.0.{found[2]}"] = (key, False)
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"prompt state does not match the scene: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in state.items():
        scene_key, stacked = wanted[key]
        dst = target[scene_key]
        if stacked:  # [1, ...] -> row k
            if tuple(value.shape) != (1, *dst.shape[1:]):
                raise ValueError(f"'{key}' has shape {tuple(value.shape)}, the scene expects {(1, *dst.shape[1:])}")
            dst[k].copy_(value[0])
        else:
            if value.shape != dst.shape:
                raise ValueError(f"'{key}' has shape {tuple(value.shape)}, the scene expects {tuple(dst.shape)}")
            dst.copy_(value)


def fresh_slot_state(cfg: RunConfig, seed: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The initial one-prompt scene state for `seed`: parameters drawn from a CPU generator
    seeded with `seed` (the global RNG is left as it was), occupancy grids fully occupied."""
    build_device = "cpu" if cfg.field.backend == "torch" else device  # tinycudann builds on CUDA
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        scene = build_scene(cfg, num_prompts=1, device=build_device)
    return scene.state_dict()
