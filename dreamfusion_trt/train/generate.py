"""`generate`: one prompt from text to checkpoint, turntable, image grid, mesh and metrics.

Input is checked before anything is written; the frozen model is loaded once, the prompt's
embeddings come from the on-disk cache when they can, and the text encoder is freed before
training starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from ..config import RunConfig
from ..export.artifacts import RunOutputs, Scorer, write_outputs
from ..scene import resolve_device
from .frozen import load_frozen, new_trainer
from .trainer import Trainer

log = logging.getLogger(__name__)


def check_writable_dir(path: Path) -> None:
    """Fail early, without creating anything, if `path` cannot become a writable folder."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"output folder '{path}' is not writable: '{probe}' is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output folder '{path}' is not writable (no write permission on '{probe}')")


def validate_training(cfg: RunConfig) -> None:
    """Check the settings every prompt of a run shares. Raises ValueError."""
    if cfg.train.iters <= 0:
        raise ValueError(f"--iters must be a positive number of iterations, got {cfg.train.iters}")
    if not 0.0 <= cfg.train.latent_fraction <= 1.0:
        raise ValueError(f"train.latent_fraction must be within [0, 1], got {cfg.train.latent_fraction}")
    if not 0.0 < cfg.sds.t_min < cfg.sds.t_max <= 1.0:
        raise ValueError(f"need 0 < sds.t_min < sds.t_max <= 1, got {cfg.sds.t_min} and {cfg.sds.t_max}")
    for fmt in cfg.output.mesh_formats:
        if fmt not in ("glb", "obj", "ply"):
            raise ValueError(f"output.mesh_formats: {fmt!r} is not one of glb, obj, ply")


def validate(cfg: RunConfig, resume: bool) -> Path:
    """Check the run's input; return the output folder. Raises ValueError/FileNotFoundError."""
    if not cfg.prompt.text.strip():
        raise ValueError("prompt is empty: give a text prompt, e.g. dreamfusion-trt generate \"a DSLR photo of a hamburger\"")
    validate_training(cfg)
    out_dir = Path(cfg.output.out).expanduser()
    check_writable_dir(out_dir)
    has_ckpt = (out_dir / CHECKPOINT_NAME).is_file()
    if resume and not has_ckpt:
        raise FileNotFoundError(f"--resume: no checkpoint in '{out_dir}' (expected '{out_dir / CHECKPOINT_NAME}')")
    if has_ckpt and not resume:
        raise ValueError(f"'{out_dir}' already holds a run; pass --resume to continue it or choose another --out")
    return out_dir


def build_trainer(cfg: RunConfig, device: torch.device, checkpoint: Checkpoint | None = None) -> Trainer:
    """Load the frozen model, embed the prompt, and assemble a one-slot Trainer holding it
    (fresh from ``train.seed``, or from `checkpoint`)."""
    frozen, (embedding,) = load_frozen(cfg, device, [cfg.prompt], max_prompts=1)
    trainer = new_trainer(frozen, cfg, 1, device)
    trainer.assign(0, cfg, embedding, checkpoint=checkpoint)
    return trainer


def builtin_scorer(cfg: RunConfig) -> Scorer | None:
    """The scorer for runs of `cfg`'s model: the built-in prior's, or None (no known answer)."""
    from ..prior import is_builtin

    if not is_builtin(cfg.model.model):
        return None
    from ..prior.score import write_score

    return write_score


def generate(cfg: RunConfig, resume: bool = False, progress: bool = True) -> RunOutputs:
    out_dir = validate(cfg, resume)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    # Scatter-adds into the hash tables otherwise accumulate in a thread-dependent order, so a
    # resumed run would match an uninterrupted one only to float tolerance.
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    cfg.output.out = str(out_dir)
    checkpoint = load_checkpoint(out_dir, map_location=device) if resume else None
    if checkpoint is not None and int(checkpoint.state.get("num_prompts", 1)) != 1:
        raise ValueError(f"checkpoint '{out_dir}' holds {checkpoint.state.get('num_prompts')} prompts, --resume continues one")
    trainer = build_trainer(cfg, device, checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("training '%s' for %d iterations on %s -> %s", cfg.prompt.text, cfg.train.iters, device, out_dir)
    trainer.fit(progress=progress)
    return write_outputs(trainer.renderer, cfg, out_dir, builtin_scorer(cfg))
