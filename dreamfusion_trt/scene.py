"""Build the trainable scene (field + background + renderer) from a run config.

Shared by training and by the commands that reopen a checkpoint (render, export-mesh).
"""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .config import RunConfig
from .field.background import Background
from .field.nerf import NeRFField
from .render.renderer import Renderer


def build_scene(cfg: RunConfig, num_prompts: int = 1, device: torch.device | str = "cpu") -> Renderer:
    """A `Renderer` owning a K-prompt `NeRFField` and `Background`; its `state_dict()` is the scene."""
    field = NeRFField(cfg.field, num_prompts=num_prompts)
    background = Background(cfg.field, num_prompts=num_prompts)
    return Renderer(field, background, cfg.render, bound=cfg.field.bound).to(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    ValueError naming the value for anything else or for a GPU this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def scene_from_checkpoint(ckpt: Checkpoint, device: torch.device | str, sampler: str | None = None) -> Renderer:
    """The scene a checkpoint holds, in eval mode; `sampler` "torch" renders it with the torch
    sampler whatever render.backend auto would pick (`Renderer.sampler`: a run trained with step
    graphs renders its outputs as it trained, and never needs nerfacc's kernels). ValueError
    when its tensors do not fit the scene its own config describes."""
    renderer = build_scene(ckpt.config, num_prompts=int(ckpt.state.get("num_prompts", 1)), device=device)
    renderer.sampler = sampler
    try:
        renderer.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint of {ckpt.config.prompt.text!r} does not match its own config: {exc}") from exc
    return renderer.eval()
