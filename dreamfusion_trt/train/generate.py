"""`generate`: one prompt from text to checkpoint, turntable, image grid, mesh and metrics.

Input is checked before anything is written; the frozen model is loaded once, the prompt's
embeddings come from the on-disk cache when they can, and the text encoder is freed before
training starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CHECKPOINT_NAME
from ..config import RunConfig
from ..engines.eager import EagerImageEncoder
from ..engines.registry import make_noise_predictor
from ..export.artifacts import write_grids, write_meshes, write_turntables
from ..guidance.latents import fit_rgb_to_latent
from ..guidance.sds import SDSGuidance
from ..guidance.text import encode_prompt
from ..scene import build_scene, resolve_device
from ..sdmodel import load_diffusion, resolve_dtype
from .trainer import Embeddings, Trainer

log = logging.getLogger(__name__)


@dataclass
class RunOutputs:
    out_dir: Path
    checkpoint: Path
    turntable: Path
    grid: Path
    meshes: list[Path]
    metrics: Path


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


def validate(cfg: RunConfig, resume: bool) -> Path:
    """Check the run's input; return the output folder. Raises ValueError/FileNotFoundError."""
    if not cfg.prompt.text.strip():
        raise ValueError("prompt is empty: give a text prompt, e.g. dreamfusion-trt generate \"a DSLR photo of a hamburger\"")
    if cfg.train.iters <= 0:
        raise ValueError(f"--iters must be a positive number of iterations, got {cfg.train.iters}")
    if not 0.0 <= cfg.train.latent_fraction <= 1.0:
        raise ValueError(f"train.latent_fraction must be within [0, 1], got {cfg.train.latent_fraction}")
    if not 0.0 < cfg.sds.t_min < cfg.sds.t_max <= 1.0:
        raise ValueError(f"need 0 < sds.t_min < sds.t_max <= 1, got {cfg.sds.t_min} and {cfg.sds.t_max}")
    for fmt in cfg.output.mesh_formats:
        if fmt not in ("glb", "obj", "ply"):
            raise ValueError(f"output.mesh_formats: {fmt!r} is not one of glb, obj, ply")
    out_dir = Path(cfg.output.out).expanduser()
    check_writable_dir(out_dir)
    has_ckpt = (out_dir / CHECKPOINT_NAME).is_file()
    if resume and not has_ckpt:
        raise FileNotFoundError(f"--resume: no checkpoint in '{out_dir}' (expected '{out_dir / CHECKPOINT_NAME}')")
    if has_ckpt and not resume:
        raise ValueError(f"'{out_dir}' already holds a run; pass --resume to continue it or choose another --out")
    return out_dir


def build_trainer(cfg: RunConfig, device: torch.device) -> Trainer:
    """Load the frozen model, embed the prompt, and assemble a Trainer for one prompt."""
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = load_diffusion(
        cfg.model.model, device=device, dtype=dtype, revision=cfg.model.revision,
        local_files_only=cfg.model.local_files_only,
    )  # fmt: skip
    cache_dir = Path(cfg.model.cache_dir).expanduser()
    emb = encode_prompt(model, cfg.prompt, cache_dir)
    model.free_text_encoder()
    embeddings = Embeddings(cond=emb.cond[None].to(device, dtype), uncond=emb.uncond[None].to(device, dtype))
    predictor = make_noise_predictor(model, cfg.model.backend, Path(cfg.model.engines_dir), batch_sizes=(2,))
    encoder = EagerImageEncoder(model.vae, model.vae_scaling_factor)
    latent_map = fit_rgb_to_latent(encoder, device=device, dtype=dtype, seed=cfg.train.seed)
    renderer = build_scene(cfg, num_prompts=1, device=device)
    guidance = SDSGuidance(predictor, model.alphas_cumprod, cfg.sds)
    latent_size = int(model.unet.config.sample_size)
    image_size = latent_size * 2 ** (len(model.vae.config.block_out_channels) - 1)
    return Trainer(cfg, renderer, guidance, embeddings, encoder, latent_map, device, latent_size, image_size)


def write_outputs(trainer: Trainer, out_dir: Path) -> RunOutputs:
    cfg = trainer.cfg
    renderer = trainer.renderer.eval()
    turntable, grid = out_dir / "turntable.mp4", out_dir / "validation.png"
    write_turntables(renderer, cfg, [turntable])
    write_grids(renderer, cfg, [grid])
    meshes = write_meshes(renderer, cfg, [out_dir])[0]
    return RunOutputs(out_dir, out_dir / CHECKPOINT_NAME, turntable, grid, meshes, out_dir / "metrics.csv")


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
    trainer = build_trainer(cfg, device)
    if resume:
        trainer.restore(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("training '%s' for %d iterations on %s -> %s", cfg.prompt.text, cfg.train.iters, device, out_dir)
    trainer.fit(out_dir, progress=progress)
    return write_outputs(trainer, out_dir)
