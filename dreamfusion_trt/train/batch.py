"""`batch`: many prompts, K at a time per GPU, each written exactly as `generate` writes it.

The prompts file becomes one `Job` per prompt (``<out>/<slug>-<hash>/``, the layout `generate`
leaves, so `render` and `export-mesh` open it) and the one training loop (`driver.py`) runs
them. ``<out>/manifest.jsonl`` records every prompt's status and ``<out>/batch_config.json`` the
settings the batch started with: a re-run skips finished prompts and resumes the others.

One process without ``--shard`` keeps its jobs to itself (`jobs.LocalJobs`). Several torchrun
ranks, or Slurm array tasks with ``--shard i/N``, share them through the queue in
``<out>/queue/`` (`shared_jobs.SharedJobs`): every process plans the same jobs, claims them one
at a time, and a prompt whose process died is taken over from its checkpoint once its lease
runs out. A shard is every N-th prompt of the de-duplicated file from the i-th, whatever is
finished already, so the N tasks cover the file exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import atomic_write_text
from ..checkpoint import CHECKPOINT_NAME
from ..config import RunConfig, from_dict, to_dict
from ..export.artifacts import Scorer
from .distributed import DistEnv, ProgressReporter, StopFlag, device_for, dist_env
from .driver import Driver, checkpoint_step
from .generate import check_writable_dir, validate_training
from .jobs import Job, LocalJobs
from .manifest import Manifest, PromptRecord
from .monitor import Tracer
from .prompts import PromptSpec, prompt_folder, prompt_id, read_prompts, report_skipped
from .queue import DEFAULT_LEASE_S, PromptQueue, shard_ids
from .shared_jobs import SharedJobs

log = logging.getLogger(__name__)

BATCH_CONFIG_NAME = "batch_config.json"


@dataclass
class BatchResult:
    out_dir: Path
    done: list[str]  # prompt ids finished in this run
    failed: list[str]
    skipped: list[str]  # finished before this run
    problems: list[str]  # malformed or duplicate lines of the prompts file
    concurrency: int  # K the run started with (0 when nothing was left to do)


def load_batch_config(out_dir: str | Path) -> RunConfig | None:
    """The config a batch folder was started with (``batch_config.json``), or None."""
    path = Path(out_dir).expanduser() / BATCH_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"batch config '{path}' is unreadable: {exc}") from exc


def job_config(base: RunConfig, spec: PromptSpec, folder: Path) -> RunConfig:
    """One prompt's config: the batch's, with the line's prompt, negative, seed and iterations."""
    return dataclasses.replace(
        base,
        prompt=dataclasses.replace(base.prompt, text=spec.prompt, negative=base.prompt.negative if spec.negative is None else spec.negative),
        train=dataclasses.replace(base.train, seed=base.train.seed if spec.seed is None else spec.seed,
                                  iters=spec.iters or base.train.iters),
        output=dataclasses.replace(base.output, out=str(folder)),
    )  # fmt: skip


def run_batch(
    cfg: RunConfig,
    prompts_path: str | Path,
    concurrency: int | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    scorer: Scorer | None = None,
    shard: tuple[int, int] | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    env: DistEnv | None = None,
    check_prompt: Callable[[str], object] | None = None,
    tracer: Tracer | None = None,
) -> BatchResult:
    """Train every prompt of `prompts_path` into ``cfg.output.out`` (see the module docstring).
    `concurrency` is K (default: from GPU memory, or 2 on a CPU). `scorer` scores each finished
    prompt's folder (the built-in prior's `prior.score.write_score`); None writes no score.
    `shard` = (i, N) trains shard i of N only; with several ranks (`env`, default from the
    launcher's environment) or a shard the jobs go through the shared queue, whose leases last
    `lease_s` seconds without renewal. `check_prompt` validates every line the way `generate`
    validates its prompt (the built-in prior: a known object); lines it rejects are skipped with
    their line number. `tracer` writes each prompt's ``trace.jsonl`` with ``train.trace_every``
    (the built-in prior's `prior.score.trace_scores`). Raises `driver.Interrupted` (exit code 75 to requeue,
    143 after SIGTERM) once every job in flight is checkpointed when asked to stop."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    validate_training(cfg)
    if cfg.train.data_parallel:
        raise ValueError("--data-parallel (train.data_parallel) trains one prompt over several GPUs: use it with generate; "
                         "batch already spreads its prompts over the GPUs under torchrun")  # fmt: skip
    env = dist_env() if env is None else env
    shared = env.is_distributed or shard is not None
    out_dir = Path(cfg.output.out).expanduser()
    prompts_path = Path(prompts_path)
    todo, skipped, problems, manifest = _plan_jobs(cfg, prompts_path, out_dir, retry_failed, shard, check_prompt)
    if skipped:
        log.info("%d prompt(s) already finished (or failed) in '%s' are skipped", len(skipped), out_dir)
    if not todo:
        return BatchResult(out_dir, [], [], skipped, problems, 0)
    if not shared:
        driver = Driver(cfg, todo, concurrency=concurrency, progress=progress, scorer=scorer, source=LocalJobs(todo, manifest),
                        desc="batch", tracer=tracer)  # fmt: skip
        k = driver.run()
        return BatchResult(out_dir, [j.id for j in driver.done], [j.id for j in driver.failed], skipped, problems, k)

    if env.is_distributed and cfg.train.device == "auto":  # one GPU per rank (batch_config.json keeps "auto")
        device = str(device_for(env))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
        for job in todo:
            job.cfg = dataclasses.replace(job.cfg, train=dataclasses.replace(job.cfg.train, device=device))
    queue = PromptQueue(out_dir, [j.id for j in todo], lease_s=lease_s, rank=env.rank, host=env.host, job=env.job,
                        restart=env.restart, retry_failed=retry_failed)  # fmt: skip
    reporter = ProgressReporter(out_dir, queue.ids, env, lease_s=lease_s) if env.is_main else None
    flag = StopFlag(out_dir, env.job, env.restart)  # the stop-request file; the driver handles the signals
    where = f"rank {env.rank}/{env.world_size} on {env.host}" + (f", shard {shard[0]}/{shard[1]}" if shard else "")
    log.info("%s: %d prompt(s) to share through '%s'", where, len(todo), queue.dir)
    driver: Driver | None = None
    source = SharedJobs(todo, queue, manifest, reporter=reporter, should_stop=lambda: driver is not None and driver.stopping)
    driver = Driver(cfg, todo, concurrency=concurrency, progress=progress and env.is_main, scorer=scorer, source=source,
                    desc=f"rank {env.rank}" if env.is_distributed else "batch",
                    should_stop=lambda: flag.exit_code if flag.requested else None, tracer=tracer)  # fmt: skip
    k = driver.run()
    return BatchResult(out_dir, [j.id for j in driver.done], [j.id for j in driver.failed], skipped, problems, k)


def _plan_jobs(cfg: RunConfig, prompts_path: Path, out_dir: Path, retry_failed: bool, shard: tuple[int, int] | None = None,
               check_prompt: Callable[[str], object] | None = None) -> tuple[list[Job], list[str], list[str], Manifest]:  # fmt: skip
    """(jobs to train, ids skipped as finished, problems of the file, the manifest). Every
    prompt of the file gets a manifest record; with `shard` = (i, N) only shard i's jobs are
    trained, split from the whole de-duplicated file (finished or not) so that every task
    computes the same split."""
    specs, problems = read_prompts(prompts_path, check_prompt)
    check_writable_dir(out_dir)
    duplicates: list[str] = []
    seen: dict[str, int] = {}
    jobs: list[Job] = []
    for spec in specs:
        negative = cfg.prompt.negative if spec.negative is None else spec.negative
        seed = cfg.train.seed if spec.seed is None else spec.seed
        pid = prompt_id(spec.prompt, negative, seed)
        if pid in seen:
            duplicates.append(f"{prompts_path}:{spec.line}: duplicate of line {seen[pid]} (same prompt, negative and seed)")
            continue
        seen[pid] = spec.line
        folder = prompt_folder(out_dir, pid)
        jobs.append(Job(pid, job_config(cfg, spec, folder), folder, spec.line, checkpoint_step(folder)))
    report_skipped(duplicates, "duplicate line(s)")
    problems += duplicates
    if not jobs:
        detail = f": {len(problems)} malformed line(s), first: {problems[0]}" if problems else ""
        raise ValueError(f"no usable prompts in '{prompts_path}'{detail}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(out_dir)
    mine = set(shard_ids([j.id for j in jobs], *shard)) if shard is not None else None
    todo, skipped = [], []
    for job in jobs:
        c = job.cfg
        record = manifest.add(PromptRecord(job.id, c.prompt.text, c.prompt.negative, c.train.seed, c.train.iters))
        record.line, record.iters = job.line, c.train.iters
        if mine is not None and job.id not in mine:
            continue  # another shard's
        finished = record.status == "done" and record.step >= c.train.iters and (job.folder / CHECKPOINT_NAME).is_file()
        if finished or (record.status == "failed" and not retry_failed):
            skipped.append(job.id)
            continue
        record.status, record.error, record.attempts = "pending", None, 0
        record.step = job.start_step
        todo.append(job)
    manifest.save()
    stored = dataclasses.replace(cfg, prompt=dataclasses.replace(cfg.prompt, text=""),
                                 output=dataclasses.replace(cfg.output, out=str(out_dir)))  # fmt: skip
    atomic_write_text(out_dir / BATCH_CONFIG_NAME, json.dumps(to_dict(stored), indent=2) + "\n")
    return todo, skipped, problems, manifest
