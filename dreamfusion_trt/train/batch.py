"""`batch`: many prompts on one GPU, K at a time, each written exactly as `generate` writes it.

The frozen model is loaded and every prompt embedded once; a K-slot `Trainer` trains K prompts
per step (one noise-predictor call for all of them). When a prompt finishes, its checkpoint and
outputs go to its own folder (``<out>/<slug>-<hash>/``, the layout `generate` leaves, so
`render` and `export-mesh` open it) and its slot takes the next prompt without stopping the
others. ``<out>/manifest.jsonl`` records every prompt's status.

Failures stay with their prompt: a non-finite loss (seen through the trainer's device-side
flag at each poll) or an output that fails to write rolls that prompt back to its last
checkpoint and retries once (with fresh random draws), then marks it failed with the reason.
Running out of GPU memory at start-up halves K and says so; later, all prompts in flight go
back to their checkpoints and K halves. Ctrl-C writes every prompt's checkpoint; a re-run skips
finished prompts and resumes the others. When the queue runs dry and at most half the slots
are busy, the survivors move to a smaller trainer so the last prompts do not pay for empty slots.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..checkpoint import CHECKPOINT_NAME, load_checkpoint
from ..config import RunConfig, from_dict, to_dict
from ..guidance.text import PromptEmbeddings
from ..scene import resolve_device
from .frozen import Frozen, load_frozen, make_predictor, new_trainer
from ..export.artifacts import Scorer, write_outputs
from ..scene import scene_from_checkpoint
from .generate import check_writable_dir, validate_training
from .manifest import Manifest, PromptRecord
from .monitor import MetricsLog
from .prompts import PromptSpec, prompt_folder, prompt_id, read_prompts
from .trainer import Trainer

log = logging.getLogger(__name__)

BATCH_CONFIG_NAME = "batch_config.json"
CPU_CONCURRENCY = 2  # default K without a GPU
MAX_CONCURRENCY = 64  # default K is never above this
MEMORY_HEADROOM = 0.85  # share of free GPU memory the default K plans to use
RETRIES = 1  # roll-backs per prompt before it is marked failed
_RESEED = 1_000_003  # a retry draws other random numbers: seed + attempt * this


@dataclass
class BatchResult:
    out_dir: Path
    done: list[str]  # prompt ids finished in this run
    failed: list[str]
    skipped: list[str]  # finished before this run
    problems: list[str]  # malformed or duplicate lines of the prompts file
    concurrency: int  # K the run started with (0 when nothing was left to do)


@dataclass
class _Job:
    id: str
    cfg: RunConfig  # the prompt's own config: text, negative, seed, iters, output folder
    folder: Path
    line: int  # in the prompts file
    start_step: int  # from its checkpoint, when one exists
    embedding: PromptEmbeddings | None = None
    attempts: int = 0
    metrics: MetricsLog | None = None
    started: float = 0.0


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


def _checkpoint_step(folder: Path) -> int:
    """Step of the checkpoint in `folder` from its JSON sidecar (0 when there is none)."""
    try:
        return int(json.loads((folder / "checkpoint.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def run_batch(
    cfg: RunConfig,
    prompts_path: str | Path,
    concurrency: int | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    scorer: Scorer | None = None,
) -> BatchResult:
    """Train every prompt of `prompts_path` into ``cfg.output.out`` (see the module docstring).
    `concurrency` is K (default: from GPU memory, or 2 on a CPU). `scorer` scores each finished
    prompt's folder (the built-in prior's `prior.score.write_score`); None writes no score."""
    return _Batch(cfg, Path(prompts_path), concurrency, progress, retry_failed, scorer).run()


class _Batch:
    def __init__(self, cfg: RunConfig, prompts_path: Path, concurrency: int | None, progress: bool, retry_failed: bool,
                 scorer: Scorer | None) -> None:  # fmt: skip
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
        validate_training(cfg)
        self.cfg = cfg
        self.out_dir = Path(cfg.output.out).expanduser()
        self.prompts_path = prompts_path
        self.concurrency = concurrency
        self.progress = progress
        self.retry_failed = retry_failed
        self.scorer = scorer
        self.manifest = Manifest(self.out_dir)
        self.done: list[str] = []
        self.failed: list[str] = []
        self.device = torch.device("cpu")
        self.frozen: Frozen | None = None
        self.bar: Any = None
        self.tick = 0

    # ------------------------------------------------------------------------------------------
    # what to do

    def _plan_jobs(self) -> tuple[list[_Job], list[str], list[str]]:
        specs, problems = read_prompts(self.prompts_path)
        check_writable_dir(self.out_dir)
        seen: dict[str, int] = {}
        jobs: list[_Job] = []
        for spec in specs:
            negative = self.cfg.prompt.negative if spec.negative is None else spec.negative
            seed = self.cfg.train.seed if spec.seed is None else spec.seed
            pid = prompt_id(spec.prompt, negative, seed)
            if pid in seen:
                message = f"{self.prompts_path}:{spec.line}: duplicate of line {seen[pid]} (same prompt, negative and seed)"
                log.warning("skipped %s", message)
                problems.append(message)
                continue
            seen[pid] = spec.line
            folder = prompt_folder(self.out_dir, pid)
            jobs.append(_Job(pid, job_config(self.cfg, spec, folder), folder, spec.line, _checkpoint_step(folder)))
        if not jobs:
            detail = f": {len(problems)} malformed line(s), first: {problems[0]}" if problems else ""
            raise ValueError(f"no usable prompts in '{self.prompts_path}'{detail}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest.load(self.out_dir)
        todo, skipped = [], []
        for job in jobs:
            c = job.cfg
            record = self.manifest.add(PromptRecord(job.id, c.prompt.text, c.prompt.negative, c.train.seed, c.train.iters))
            record.line, record.iters = job.line, c.train.iters
            finished = record.status == "done" and record.step >= c.train.iters and (job.folder / CHECKPOINT_NAME).is_file()
            if finished or (record.status == "failed" and not self.retry_failed):
                skipped.append(job.id)
                continue
            record.status, record.error, record.attempts = "pending", None, 0
            record.step = job.start_step
            todo.append(job)
        self.manifest.save()
        stored = dataclasses.replace(self.cfg, prompt=dataclasses.replace(self.cfg.prompt, text=""),
                                     output=dataclasses.replace(self.cfg.output, out=str(self.out_dir)))  # fmt: skip
        atomic_write_text(self.out_dir / BATCH_CONFIG_NAME, json.dumps(to_dict(stored), indent=2) + "\n")
        return todo, skipped, problems

    # ------------------------------------------------------------------------------------------
    # the run

    def run(self) -> BatchResult:
        todo, skipped, problems = self._plan_jobs()
        if skipped:
            log.info("%d prompt(s) already finished (or failed) in '%s' are skipped", len(skipped), self.out_dir)
        if not todo:
            return BatchResult(self.out_dir, [], [], skipped, problems, 0)
        cfg = self.cfg
        self.device = device = resolve_device(cfg.train.device)
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        from_memory = self.concurrency is None and device.type == "cuda"
        k = min(self.concurrency or CPU_CONCURRENCY, len(todo))
        # From memory: probe with the eager UNet, then build the chosen backend for that K.
        self.frozen, embeddings = load_frozen(cfg, device, [j.cfg.prompt for j in todo], max_prompts=None if from_memory else k)
        for job, emb in zip(todo, embeddings):
            job.embedding = dataclasses.replace(emb, cond=emb.cond.cpu(), uncond=emb.uncond.cpu())
        if from_memory:
            k = self._predictor_for(self._concurrency_from_memory(len(todo)))
        trainer, k = self._start(k)
        started_with = k
        log.info("training %d prompt(s), %d at a time, on %s -> %s", len(todo), k, device, self.out_dir)
        queue: collections.deque[_Job] = collections.deque(todo)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=sum(j.cfg.train.iters for j in todo), initial=sum(min(j.start_step, j.cfg.train.iters) for j in todo),
                        disable=not self.progress, unit="it", dynamic_ncols=True, desc="batch")  # fmt: skip
        try:
            self._loop(trainer, queue)
        except KeyboardInterrupt:
            self._interrupt(trainer, queue)
            raise
        finally:
            self.bar.close()
        return BatchResult(self.out_dir, self.done, self.failed, skipped, problems, started_with)

    def _loop(self, trainer: Trainer, queue: collections.deque[_Job]) -> None:
        self.trainer = trainer
        while True:
            trainer = self.trainer
            for k in range(trainer.num_slots):
                while trainer.slots[k] is None and queue:
                    self._start_job(trainer, k, queue.popleft())
            busy = trainer.active_slots
            if not busy:
                return
            if not queue and trainer.num_slots > 1 and len(busy) <= trainer.num_slots // 2:
                self._poll(trainer, write=False)
                self._shrink(trainer)
                continue
            try:
                trainer.train_step()
            except torch.OutOfMemoryError:
                self._out_of_memory(trainer, queue)
                continue
            self.tick += 1
            self.bar.update(len(busy))
            slots = {k: trainer.slots[k] for k in busy}
            finished = [k for k, s in slots.items() if s.done]
            every = [k for k, s in slots.items() if s.cfg.train.ckpt_every > 0 and s.step % s.cfg.train.ckpt_every == 0 and not s.done]
            if self.tick % self.cfg.train.log_every == 0 or finished or every:
                self._poll(trainer)
                for k in every:
                    if trainer.slots[k] is slots[k]:  # not rolled back or failed by the poll
                        self._checkpoint(trainer, k)
                for k in finished:
                    if trainer.slots[k] is slots[k]:
                        self._finish(trainer, k)
            self._postfix(queue)

    def _postfix(self, queue: collections.deque[_Job]) -> None:
        self.bar.set_postfix(done=len(self.done), failed=len(self.failed), queued=len(queue),
                             active=len(self.trainer.active_slots), refresh=False)  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # trainers

    def _concurrency_from_memory(self, n_prompts: int) -> int:
        """K from the peak memory of one probe step with one slot and the free GPU memory."""
        device = self.device
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe = new_trainer(self.frozen, self.cfg, 1, device)
        probe.probe()
        per_slot = max(torch.cuda.max_memory_allocated(device) - base, 1)
        del probe
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        k = int(max(1, min(n_prompts, MAX_CONCURRENCY, MEMORY_HEADROOM * free // per_slot)))
        log.info("one prompt's step needs %.2f GiB at its peak, %.1f GiB are free: %d prompt(s) at a time",
                 per_slot / 2**30, free / 2**30, k)  # fmt: skip
        return k

    def _predictor_for(self, k: int) -> int:
        """Build the configured noise predictor for k prompts; with built engines that do not
        cover a batch of 2k, halve k until one does."""
        while True:
            try:
                self.frozen.predictor = make_predictor(self.frozen.model, self.cfg, k)
                return k
            except (ValueError, FileNotFoundError) as exc:
                if k == 1 or self.cfg.model.backend not in ("tensorrt", "aotinductor"):
                    raise
                log.warning("%d prompts at once need a UNet batch of %d: %s; trying %d", k, 2 * k, exc, k // 2)
                k //= 2

    def _start(self, k: int) -> tuple[Trainer, int]:
        """A k-slot trainer that survived a probe step; k halves while memory runs out."""
        while True:
            trainer = None
            try:
                trainer = new_trainer(self.frozen, self.cfg, k, self.device)
                trainer.probe()
                self.trainer = trainer
                return trainer, k
            except torch.OutOfMemoryError as exc:
                del trainer
                self._free_memory()
                if k == 1:
                    raise ValueError(f"out of GPU memory with one prompt at a time: {str(exc).splitlines()[0]}") from exc
                log.warning("out of GPU memory with %d prompts at once; lowering the concurrency to %d", k, k // 2)
                k //= 2

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _shrink(self, trainer: Trainer) -> None:
        """Move the busy slots to a trainer of just that many slots."""
        busy = trainer.active_slots
        if not busy:
            return
        smaller = new_trainer(self.frozen, self.cfg, len(busy), self.device)
        for j, k in enumerate(busy):
            old = trainer.slots[k]
            slot = smaller.assign(j, old.cfg, old.tag.embedding, checkpoint=trainer.slot_checkpoint(k), tag=old.tag)
            slot.polled_at, slot.polled_step, slot.elapsed_s = old.polled_at, old.polled_step, old.elapsed_s
        log.info("%d prompt(s) left: continuing with %d slots instead of %d", len(busy), len(busy), trainer.num_slots)
        self.trainer = smaller
        del trainer
        self._free_memory()

    def _out_of_memory(self, trainer: Trainer, queue: collections.deque[_Job]) -> None:
        """Mid-run out of memory: every prompt in flight goes back to its last checkpoint (at
        the front of the queue) and training continues with half the slots."""
        if trainer.num_slots == 1:
            raise ValueError("out of GPU memory while training with one prompt at a time")
        k = trainer.num_slots // 2
        log.warning("out of GPU memory with %d prompts at once; they restart from their last checkpoints with %d slots",
                    trainer.num_slots, k)  # fmt: skip
        for slot_index in reversed(trainer.active_slots):
            slot = trainer.slots[slot_index]
            job: _Job = slot.tag
            job.start_step = _checkpoint_step(job.folder)
            self.bar.update(job.start_step - slot.step)
            if job.metrics is not None:
                job.metrics.close()
            queue.appendleft(job)
        self.trainer = None  # type: ignore[assignment]
        del trainer
        self._free_memory()
        self._start(k)

    # ------------------------------------------------------------------------------------------
    # one prompt

    def _start_job(self, trainer: Trainer, k: int, job: _Job, reseed: int | None = None) -> None:
        try:
            ckpt = load_checkpoint(job.folder, map_location=self.device) if (job.folder / CHECKPOINT_NAME).is_file() else None
            if ckpt is not None and ckpt.config.prompt.text != job.cfg.prompt.text:
                raise ValueError(f"'{job.folder}' holds a run of {ckpt.config.prompt.text!r}, not {job.cfg.prompt.text!r}")
            if ckpt is not None and ckpt.step >= job.cfg.train.iters:
                self._write(job, scene_from_checkpoint(ckpt, self.device), float(ckpt.state.get("elapsed_s", 0.0)))
                return
            job.folder.mkdir(parents=True, exist_ok=True)
            slot = trainer.assign(k, job.cfg, job.embedding, checkpoint=ckpt, tag=job, reseed=reseed)
        except (ValueError, OSError) as exc:
            self._fail(job, f"could not start: {exc}")
            return
        job.start_step = slot.step
        job.started = job.started or time.perf_counter()
        job.metrics = MetricsLog(job.folder, slot.step, tensorboard=job.cfg.train.tensorboard)
        self.manifest.update(job.id, status="running", step=slot.step, attempts=job.attempts, line=job.line)
        log.debug("slot %d: %r from step %d", k, job.cfg.prompt.text, slot.step)

    def _poll(self, trainer: Trainer, write: bool = True) -> None:
        for report in trainer.poll():
            job: _Job = trainer.slots[report.slot].tag
            if not report.finite:
                self._retry_or_fail(trainer, report.slot, f"non-finite loss ({report.row['loss']}) by step {report.step}")
            elif write and job.metrics is not None:
                job.metrics.write(report.row)

    def _checkpoint(self, trainer: Trainer, k: int) -> None:
        job: _Job = trainer.slots[k].tag
        try:
            trainer.save_slot(k)
        except OSError as exc:
            self._retry_or_fail(trainer, k, f"checkpoint could not be written: {exc}")
            return
        self.manifest.update(job.id, step=trainer.slots[k].step)

    def _retry_or_fail(self, trainer: Trainer, k: int, reason: str) -> None:
        """Roll slot k's prompt back to its last checkpoint and retry once, else mark it failed."""
        slot = trainer.slots[k]
        job: _Job = slot.tag
        trainer.release(k)
        if job.metrics is not None:
            job.metrics.close()
        lost = slot.step - _checkpoint_step(job.folder)
        if job.attempts >= RETRIES:
            self.bar.total -= job.cfg.train.iters - slot.step
            self.bar.refresh()
            self._fail(job, f"{reason}; already rolled back and retried {job.attempts} time(s)")
            return
        job.attempts += 1
        self.bar.update(-lost)
        log.warning("prompt %r: %s; rolling back to its last checkpoint (step %d) and retrying",
                    job.cfg.prompt.text, reason, slot.step - lost)  # fmt: skip
        self._start_job(trainer, k, job, reseed=job.cfg.train.seed + job.attempts * _RESEED)

    def _fail(self, job: _Job, reason: str) -> None:
        log.error("prompt %r failed: %s", job.cfg.prompt.text, reason)
        wall = time.perf_counter() - job.started if job.started else 0.0
        self.manifest.update(job.id, status="failed", error=reason, attempts=job.attempts, wall_s=round(wall, 2))
        self.failed.append(job.id)

    def _finish(self, trainer: Trainer, k: int) -> None:
        slot = trainer.slots[k]
        job: _Job = slot.tag
        try:
            trainer.save_slot(k)
        except OSError as exc:
            self._retry_or_fail(trainer, k, f"final checkpoint could not be written: {exc}")
            return
        scene = scene_from_checkpoint(trainer.slot_checkpoint(k), self.device)  # a copy: the slot is refilled next
        trainer.release(k)
        if job.metrics is not None:
            job.metrics.close()
        self.manifest.update(job.id, step=slot.step)
        self._write(job, scene, slot.elapsed_s)

    def _write(self, job: _Job, scene: Any, train_s: float) -> None:
        """Write a finished prompt's outputs; on failure reload its checkpoint and try once more."""
        start = time.perf_counter()
        for attempt in range(RETRIES + 1):
            try:
                outputs = write_outputs(scene, job.cfg, job.folder, self.scorer)
                break
            except Exception as exc:  # noqa: BLE001 -- one prompt's broken output must not stop the batch
                if attempt >= RETRIES:
                    self._fail(job, f"outputs could not be written: {type(exc).__name__}: {exc}")
                    return
                log.warning("prompt %r: outputs could not be written (%s); retrying from its checkpoint", job.cfg.prompt.text, exc)
                try:
                    scene = scene_from_checkpoint(load_checkpoint(job.folder, map_location=self.device), self.device)
                except (ValueError, FileNotFoundError) as load_exc:
                    self._fail(job, f"outputs could not be written ({exc}) and the checkpoint did not reload: {load_exc}")
                    return
        rel = lambda p: str(Path(p).relative_to(self.out_dir))  # noqa: E731
        paths = {"checkpoint": rel(outputs.checkpoint), "turntable": rel(outputs.turntable), "grid": rel(outputs.grid),
                 "meshes": [rel(m) for m in outputs.meshes], "metrics": rel(outputs.metrics)}  # fmt: skip
        if outputs.score is not None:
            paths["score"] = rel(outputs.score)
        wall = train_s + time.perf_counter() - start
        self.manifest.update(job.id, status="done", step=job.cfg.train.iters, outputs=paths, error=None, wall_s=round(wall, 2))
        self.done.append(job.id)
        log.info("done: %r -> %s", job.cfg.prompt.text, job.folder)

    def _interrupt(self, trainer: Trainer | None, queue: collections.deque[_Job]) -> None:
        """Ctrl-C: checkpoint every prompt in flight (unless its loss went non-finite)."""
        trainer = getattr(self, "trainer", trainer)
        saved = 0
        if trainer is not None:
            for report in trainer.poll():
                job: _Job = trainer.slots[report.slot].tag
                if report.finite:
                    try:
                        trainer.save_slot(report.slot)
                        saved += 1
                    except OSError as exc:
                        log.error("prompt %r: checkpoint could not be written on interrupt: %s", job.cfg.prompt.text, exc)
                self.manifest.update(job.id, status="pending", step=_checkpoint_step(job.folder))
                if job.metrics is not None:
                    job.metrics.close()
        for record in self.manifest.records.values():
            if record.status == "running":
                record.status = "pending"
        self.manifest.save()
        log.warning("interrupted; %d checkpoint(s) written; run the same command again to continue", saved)
