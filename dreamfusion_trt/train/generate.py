"""`generate`: one prompt from text to checkpoint, turntable, image grid, mesh and metrics.

Input is checked before anything is written; then the one training loop (`driver.py`) runs a
single job whose folder is ``--out``: the frozen model is loaded once, the prompt's embeddings
come from the on-disk cache when they can, and the text encoder is freed before training starts.
With ``train.data_parallel`` under torchrun every rank runs that loop on the same job, rendering
its own cameras, and rank 0 alone writes the folder (`data_parallel.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..atomic import check_writable_dir
from ..checkpoint import CHECKPOINT_NAME, load_checkpoint
from ..config import RunConfig
from ..export.artifacts import RunOutputs, Scorer
from .data_parallel import join
from .distributed import destroy_distributed
from .driver import Driver, checkpoint_step
from .jobs import Job
from .monitor import Tracer

log = logging.getLogger(__name__)


def validate_training(cfg: RunConfig) -> None:
    """Check the settings every prompt of a run shares. Raises ValueError."""
    if cfg.train.iters <= 0:
        raise ValueError(f"--iters must be a positive number of iterations, got {cfg.train.iters}")
    if not 0.0 <= cfg.train.latent_fraction <= 1.0:
        raise ValueError(f"train.latent_fraction must be within [0, 1], got {cfg.train.latent_fraction}")
    if not 0.0 < cfg.sds.t_min < cfg.sds.t_max <= 1.0:
        raise ValueError(f"need 0 < sds.t_min < sds.t_max <= 1, got {cfg.sds.t_min} and {cfg.sds.t_max}")
    if cfg.train.trace_every < 0:
        raise ValueError(f"train.trace_every must be 0 (off) or a number of steps, got {cfg.train.trace_every}")
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


def generate(cfg: RunConfig, resume: bool = False, progress: bool = True, scorer: Scorer | None = None,
             tracer: Tracer | None = None) -> RunOutputs | None:
    """Train one prompt into ``cfg.output.out`` and write its outputs: the training loop of
    `batch` with one job whose folder is the output folder. A non-finite loss raises
    FloatingPointError (the last good checkpoint is kept); Ctrl-C and SIGTERM/SIGUSR1 write a
    checkpoint that ``resume`` continues from. With ``train.data_parallel`` under torchrun the
    ranks train it together; ranks other than 0 write nothing and return None. `tracer`: as
    `batch.run_batch`'s."""
    out_dir = validate(cfg, resume)
    cfg.output.out = str(out_dir)
    if resume:
        step = load_checkpoint(out_dir).step  # a corrupt checkpoint fails here, before any loading
        if step > cfg.train.iters:
            raise ValueError(f"--resume: the checkpoint in '{out_dir}' is at step {step}, past --iters {cfg.train.iters}")
    dp = join(cfg) if cfg.train.data_parallel else None
    log.info("training '%s' for %d iterations -> %s", cfg.prompt.text, cfg.train.iters, out_dir)
    job = Job("generate", cfg, out_dir, start_step=checkpoint_step(out_dir) if resume else 0)
    main = dp is None or dp.is_main
    driver = Driver(cfg, [job], concurrency=1, progress=progress and main, scorer=scorer, retries=0, data_parallel=dp,
                    tracer=tracer)
    try:
        driver.run()
    finally:
        if dp is not None:
            dp.close()  # the vote group first, then the default group
            destroy_distributed()
    if job.error is not None:
        raise (FloatingPointError if "non-finite" in job.error else ValueError)(job.error)
    if not main:
        log.info("data parallel: rank %d is done; rank 0 writes the outputs into %s", dp.rank, out_dir)
        return None
    assert job.outputs is not None
    return job.outputs
