"""Checkpoints: one safetensors file holding every tensor, with the JSON state in its header.

One file means one atomic rename: a checkpoint is either the old one or the new one, never a
mix. Nothing is unpickled on load. A human-readable `checkpoint.json` sidecar repeats the state.

Tensor keys: ``model.<state_dict key>`` for the scene (field, background, occupancy grids),
``optim.<param index>.<name>`` for optimizer state, ``rng.<name>`` for generator states, and
``extra.<name>`` for anything else the trainer keeps (the fitted RGB->latent map).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .atomic import atomic_path, atomic_write_text
from .config import RunConfig, from_dict, to_dict

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    step: int
    config: RunConfig
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None  # a torch optimizer state_dict
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # JSON-able trainer state (scaler, timing, ...)


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in opt_state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(ckpt: Checkpoint, out_dir: str | Path) -> Path:
    """Write `out_dir/checkpoint.safetensors` atomically (and the JSON sidecar); return its path."""
    out_dir = Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in ckpt.model.items():
        tensors[f"model.{k}"] = v
    optim_meta = None
    if ckpt.optimizer is not None:
        opt_tensors, optim_meta = _flatten_optimizer(ckpt.optimizer)
        tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in ckpt.rng.items()})
    tensors.update({f"extra.{k}": v for k, v in ckpt.extra.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {
        "format_version": FORMAT_VERSION,
        "step": ckpt.step,
        "config": to_dict(ckpt.config),
        "optimizer": optim_meta,
        "state": ckpt.state,
    }
    path = out_dir / CHECKPOINT_NAME
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dreamfusion_trt": json.dumps(header)})
    atomic_write_text(out_dir / "checkpoint.json", json.dumps(header, indent=2) + "\n")
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a run folder or the checkpoint file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = resolve_checkpoint_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"checkpoint '{path}' is corrupt or not a dreamfusion-trt checkpoint: {exc}") from exc
    if "dreamfusion_trt" not in meta:
        raise ValueError(f"checkpoint '{path}' has no dreamfusion-trt header (not written by this tool?)")
    header = json.loads(meta["dreamfusion_trt"])
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint '{path}' has format {header.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "rng": {}, "extra": {}}
    for key, value in tensors.items():
        prefix, rest = key.split(".", 1)
        if prefix == "optim":
            groups["optim"][key] = value
        else:
            groups[prefix][rest] = value
    optimizer = _unflatten_optimizer(groups["optim"], header["optimizer"]) if header.get("optimizer") else None
    return Checkpoint(
        step=int(header["step"]),
        config=from_dict(header["config"]),
        model=groups["model"],
        optimizer=optimizer,
        rng=groups["rng"],
        extra=groups["extra"],
        state=header.get("state") or {},
    )
