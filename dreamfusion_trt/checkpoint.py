"""Checkpoints: one safetensors file holding every tensor, with the JSON state in its header.

One file means one atomic rename: a checkpoint is either the old one or the new one, never a
mix. It is serialised in memory and written through `atomic.atomic_write_bytes` (our one
temporary name, an fsync, a rename), so a kill mid-write leaves only a temporary that
`atomic.clean_stale_temporaries` recognises, and a full disk is one `WriteError` with the
previous checkpoint intact. Nothing is unpickled on load. The header carries the sha256 of the
tensor data (everything after the safetensors header), verified at load, so a flipped byte is
refused rather than rendered. A human-readable `checkpoint.json` sidecar repeats the state.

Tensor keys: ``model.<state_dict key>`` for the scene (field, background, occupancy grids),
``optim.<param index>.<name>`` for optimizer state, ``rng.<name>`` for generator states, and
``extra.<name>`` for anything else the trainer keeps (the fitted RGB->latent map).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .atomic import atomic_write_bytes, atomic_write_text
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
    state = {idx: state[idx] for idx in sorted(state)}  # parameter order, whatever the file's order
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
    # The data section does not depend on the metadata (offsets come from the tensors alone), so
    # its hash can be taken from a first serialisation and stored in the header of the second.
    header["data_sha256"] = _data_sha256(save_bytes(tensors, metadata={"dreamfusion_trt": "{}"}))
    data = save_bytes(tensors, metadata={"dreamfusion_trt": json.dumps(header)})
    path = out_dir / CHECKPOINT_NAME
    atomic_write_bytes(path, data)
    atomic_write_text(out_dir / "checkpoint.json", json.dumps(header, indent=2) + "\n")
    return path


def _header_length(data: bytes) -> int:
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes is too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"header length {n} runs past the end of the file ({len(data)} bytes)")
    return n


def _data_sha256(data: bytes) -> str:
    """sha256 of a safetensors file's tensor data: the bytes after its 8-byte length and header."""
    n = _header_length(data)
    return hashlib.sha256(memoryview(data)[8 + n :]).hexdigest()


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a run folder or the checkpoint file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
    return path


def checkpoint_header_step(path: str | Path) -> int:
    """The step a checkpoint file holds, from the header inside it: reads only the header, and
    cannot lag behind the tensors the way the JSON sidecar can (a kill between the two renames
    leaves the sidecar one checkpoint behind). ValueError when there is no readable header."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        raw = fh.read(n) if n <= 100_000_000 else b""
    if n == 0 or len(raw) != n:
        raise ValueError(f"checkpoint '{path}' has no complete safetensors header")
    try:
        meta = json.loads(raw).get("__metadata__") or {}
        return int(json.loads(meta["dreamfusion_trt"])["step"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"checkpoint '{path}' has no dreamfusion-trt step in its header: {exc}") from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint (a run folder or the file). Raises FileNotFoundError when there is none
    and ValueError when it is corrupt (including tensor data that does not match its sha256),
    foreign or of another format version. Checkpoints written before the hash was stored load
    without that check."""
    path = resolve_checkpoint_path(path)
    try:
        data = path.read_bytes()
        n = _header_length(data)
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"checkpoint '{path}' is corrupt or not a dreamfusion-trt checkpoint: {exc}") from exc
    if "dreamfusion_trt" not in meta:
        raise ValueError(f"checkpoint '{path}' has no dreamfusion-trt header (not written by this tool?)")
    try:
        header = json.loads(meta["dreamfusion_trt"])
    except ValueError as exc:
        raise ValueError(f"checkpoint '{path}' is corrupt: its dreamfusion-trt header is not JSON ({exc})") from exc
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint '{path}' has format {header.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    expected = header.get("data_sha256")
    if expected is None:
        log.debug("checkpoint '%s' carries no data hash (written before hashes were stored); not verified", path)
    else:
        actual = _data_sha256(data)
        if actual != expected:
            raise ValueError(
                f"checkpoint '{path}' is corrupt: its tensor data has sha256 {actual[:16]}..., "
                f"its header says {expected[:16]}... (a damaged copy or disk?); restore it or train again"
            )
    del data
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
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
