"""The one training loop: jobs (one prompt each) through K-slot trainers to their output folders.

`generate` is a driver of one job writing into `--out`; `batch` is a driver of a prompts file's
jobs, each into its own folder, with a manifest. Either way the frozen model is loaded and every
prompt embedded once, a K-slot `Trainer` trains K prompts per step (one noise-predictor call for
all of them), and when a prompt finishes its checkpoint and outputs are written and its slot
takes the next job without stopping the others.

Failures stay with their job: a non-finite loss (seen through the trainer's device-side flag at
each poll) or an output that fails to write rolls that job back to its last checkpoint and
retries it (`retries` times, with fresh random draws), then marks it failed with the reason.
Running out of GPU memory at start-up halves K and says so; later, every job in flight goes back
to its checkpoint and K halves. Ctrl-C, SIGTERM and SIGUSR1 (what `timeout`, Kubernetes and
Slurm send before they kill) write every job's checkpoint: the signals between two steps, Ctrl-C
where it lands. When the queue runs dry and at most half the slots are busy, the survivors move
to a smaller trainer so the last prompts do not pay for empty slots.

Outputs are written in the background (``output.background_writes``, on by default): a
finished prompt's checkpoint is saved, its scene copied and its slot refilled at once, and one
worker thread (`output_writer.OutputWriter`, on its own CUDA stream) writes the turntable, grid,
mesh and score while the others train. The loop collects finished writes between steps and does
their bookkeeping itself (manifest row, retry from the checkpoint, failure, log line with the
write's seconds and the steps trained meanwhile, kept in the manifest as ``outputs_s`` and
``steps_during_outputs``). At most `MAX_PENDING_WRITES` scenes are held for writing; prompts
finishing beyond that wait as their checkpoints on disk and are reloaded when the writer has
room. The loop waits for writes only when nothing is left to train, before restarting after an
out-of-memory error, and when stopped: a stop finishes the writes whose scenes are held and
leaves the others pending, which a re-run writes from their final checkpoints without training.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..atomic import clean_stale_temporaries
from ..checkpoint import CHECKPOINT_NAME, checkpoint_header_step, load_checkpoint
from ..config import RunConfig
from ..export.artifacts import RunOutputs, Scorer, write_outputs
from ..lock import RunLock
from ..scene import resolve_device, scene_from_checkpoint
from .data_parallel import DataParallel
from .distributed import EXIT_REQUEUE
from .frozen import Frozen, load_frozen, make_predictor, new_trainer
from .step_graph import step_graph_choice
from .jobs import Job, JobSource, LocalJobs
from .monitor import MetricsLog, StageClock, TraceLog, Tracer
from .output_writer import OutputWriter, Write
from .trainer import Trainer

log = logging.getLogger(__name__)

CPU_CONCURRENCY = 2  # default K without a GPU
MAX_CONCURRENCY = 64  # default K is never above this
MEMORY_HEADROOM = 0.85  # share of free GPU memory the default K plans to use
RETRIES = 1  # roll-backs per prompt before it is marked failed
MAX_PENDING_WRITES = 2  # finished prompts' scenes held for the output writer: one being written, one ready
_RESEED = 1_000_003  # a retry draws other random numbers: seed + attempt * this
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(Exception):
    """Training stopped by a signal or a stop request after every job in flight was checkpointed.
    `exit_code`: 143 (128 + SIGTERM, the shell's convention) for SIGTERM; `EXIT_REQUEUE` (75) for
    SIGUSR1, which Slurm sends before the time limit: the job is to be requeued and continue."""

    def __init__(self, signum: int | None, exit_code: int | None = None) -> None:
        self.signum = signum
        if exit_code is None:
            exit_code = EXIT_REQUEUE if signum == signal.SIGUSR1 else 128 + int(signum or 0)
        self.exit_code = exit_code
        super().__init__(f"stopped by {signal.Signals(signum).name}" if signum else f"stopped by a stop request (exit {exit_code})")


def checkpoint_step(folder: Path) -> int:
    """Step of the checkpoint in `folder`, from the header inside the checkpoint file (0 when
    there is none): the JSON sidecar is written after the file and lags it after a kill."""
    try:
        return checkpoint_header_step(folder / CHECKPOINT_NAME)
    except (OSError, ValueError):
        return 0


def setup_torch(cfg: RunConfig) -> torch.device:
    """The run's device, with its determinism and TF32 settings applied."""
    device = resolve_device(cfg.train.device)
    # Scatter-adds into the hash tables otherwise accumulate in a thread-dependent order, so a
    # resumed run would match an uninterrupted one only to float tolerance.
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    return device


class Driver:
    def __init__(self, cfg: RunConfig, jobs: Sequence[Job], *, concurrency: int | None, progress: bool, scorer: Scorer | None,
                 source: JobSource | None = None, retries: int = RETRIES, desc: str | None = None,
                 should_stop: Callable[[], int | None] | None = None, data_parallel: DataParallel | None = None,
                 tracer: Tracer | None = None) -> None:  # fmt: skip
        """`cfg` holds what every job shares; `jobs` are all the jobs this process may train
        (their prompts are embedded up front); `source` hands them out and hears what became of
        them (default: `jobs` in order, no manifest); `concurrency` is K (None: from GPU memory,
        or 2 on a CPU); `should_stop` returns an exit code when something other than a signal
        asks the loop to stop (a shared queue's stop-request file), checked between steps.
        `data_parallel`: this rank of several that train the same jobs together (its trainers
        step with the others, stops are agreed, and a rank other than 0 writes nothing).
        `tracer` scores a prompt's scene every ``train.trace_every`` steps into its
        ``trace.jsonl`` (the built-in prior's known answers); ValueError when a job asks for a
        trace and there is none."""
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
        for c in [cfg] + [j.cfg for j in jobs]:  # (a negative trace_every is `validate_training`'s to refuse)
            if c.train.trace_every > 0 and tracer is None:
                raise ValueError(f"train.trace_every scores a run against its known object; model {c.model.model!r} has no known "
                                 "answers (only the built-in prior has)")  # fmt: skip
        self.cfg = cfg
        self.jobs = list(jobs)
        self.concurrency = concurrency
        self.progress = progress
        self.scorer = scorer
        self.tracer = tracer
        self.source: JobSource = source if source is not None else LocalJobs(jobs)
        self.retries = retries
        self.desc = desc
        self.done: list[Job] = []
        self.failed: list[Job] = []
        self.device = torch.device("cpu")
        self.frozen: Frozen | None = None
        self.trainer: Trainer | None = None
        self._output_sampler: str | None = None  # the trainers' `Renderer.sampler`: outputs render as the prompts trained
        self.bar: Any = None
        self.tick = 0
        self._stop: int | None = None  # a stop signal that arrived
        self.should_stop = should_stop
        self.data_parallel = data_parallel
        self.writes = data_parallel is None or data_parallel.is_main  # folders, checkpoints, metrics, outputs
        self.writer: OutputWriter | None = None
        self._unwritten: collections.deque[Write] = collections.deque()  # finished; their checkpoints wait for the writer
        self._write_totals = {"prompts": 0, "seconds": 0.0, "steps": 0, "waited_s": 0.0, "reload_s": 0.0}

    def _record(self, job: Job, **fields: Any) -> None:
        self.source.record(job, **fields)

    # ------------------------------------------------------------------------------------------
    # the run

    def run(self) -> int:
        """Train every job; returns the K it started with. Raises KeyboardInterrupt or
        `Interrupted` after checkpointing when stopped."""
        todo = self.jobs
        cfg = self.cfg
        self.device = device = setup_torch(cfg)
        from_memory = self.concurrency is None and device.type == "cuda"
        k = min(self.concurrency or CPU_CONCURRENCY, len(todo))
        # From memory: probe with the eager UNet, then build the chosen backend for that K.
        clock = StageClock()
        self.frozen, embeddings = load_frozen(cfg, device, [j.cfg.prompt for j in todo], max_prompts=None if from_memory else k,
                                              clock=clock)  # fmt: skip
        for job, emb in zip(todo, embeddings):
            job.embedding = dataclasses.replace(emb, cond=emb.cond.cpu(), uncond=emb.uncond.cpu())
        if from_memory:
            k = self._predictor_for(self._concurrency_from_memory(len(todo)))
            clock.mark("concurrency from memory, noise predictor")
        trainer, k = self._start(k)
        clock.mark("probe" if device.type == "cuda" else "trainer")
        log.info("train.cuda_graph: %s", "the whole step as CUDA graphs (torch sampler)" if trainer.step_graphs is not None else
                 step_graph_choice(cfg, self.frozen.max_prompts, device)[1])  # fmt: skip
        log.info("start-up: %s", clock.summary())
        log.info("training %d prompt(s), %d at a time, on %s", len(todo), k, device)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=sum(j.cfg.train.iters for j in todo), initial=sum(min(j.start_step, j.cfg.train.iters) for j in todo),
                        disable=not self.progress, unit="it", dynamic_ncols=True, desc=self.desc)  # fmt: skip
        self.tick = min((j.start_step for j in todo), default=0)  # logs land on the steps a lone prompt logs
        self.writer = OutputWriter(self._write_outputs, device, background=cfg.output.background_writes, steps=lambda: self.tick,
                                   capacity=MAX_PENDING_WRITES)  # fmt: skip
        clean = False
        try:
            with self._stop_signals():
                self._loop()
                self._drain()
                if self._unwritten:  # a stop arrived during the last writes
                    self._check_stop()
            clean = True
        except (KeyboardInterrupt, Interrupted):
            self._interrupt()
            raise
        except Exception:
            try:
                self._settle_writes()
            except Exception as exc:  # noqa: BLE001 -- the error that stopped the loop is the one to raise
                log.error("outputs of the finished prompts could not be settled after an error: %s", exc)
            raise
        finally:
            self.writer.close(wait=clean)
            self.bar.close()
            self.source.close()
        totals = self._write_totals
        if self.writer.background and totals["prompts"]:
            log.info("outputs of %d prompt(s) written in the background: %.1f s of writing, %d training step(s) meanwhile; "
                     "the loop waited %.1f s for writes and spent %.1f s reloading scenes that waited on disk", totals["prompts"],
                     totals["seconds"], totals["steps"], totals["waited_s"], totals["reload_s"])  # fmt: skip
        return k

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """SIGTERM/SIGUSR1 set a flag the loop checks between steps (never mid-step or mid-write)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def stop(signum: int, frame: Any) -> None:  # a SIGTERM after SIGUSR1 keeps the requeue code
            self._stop = signal.SIGUSR1 if self._stop == signal.SIGUSR1 else signum

        for s in STOP_SIGNALS:
            signal.signal(s, stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @property
    def stopping(self) -> bool:
        """A stop signal arrived or `should_stop` asks for a stop (for a source that blocks while idle)."""
        return self._stop is not None or (self.should_stop is not None and self.should_stop() is not None)

    def _check_stop(self) -> None:
        stop = self._stop
        if self.data_parallel is not None:  # data-parallel ranks stop after the same step, whichever got the signal
            stop = self.data_parallel.agree_stop(stop, self.trainer)
            self._stop = self._stop if stop is None else stop
        if stop is not None:
            raise Interrupted(stop)
        code = self.should_stop() if self.should_stop is not None else None
        if code is not None:
            raise Interrupted(None, code)

    def _loop(self) -> None:
        source = self.source
        while True:
            self._collect()
            self._check_stop()
            trainer = self.trainer
            for k in range(trainer.num_slots):
                while trainer.slots[k] is None and (job := source.take()) is not None:
                    self._start_job(trainer, k, job)
            busy = trainer.active_slots
            if not busy:
                self._drain()  # nothing trains meanwhile, and a source may block in `wait`
                self._check_stop()
                job = source.wait()
                if job is None:
                    self._check_stop()  # a source stops waiting when asked to stop
                    return
                self._start_job(trainer, 0, job)
                continue
            if source.exhausted() and trainer.num_slots > 1 and len(busy) <= trainer.num_slots // 2:
                self._poll(trainer, write=False)
                self._shrink(trainer)
                continue
            try:
                trainer.train_step()
            except torch.OutOfMemoryError:
                self._out_of_memory(trainer)
                continue
            self.tick += 1
            self.bar.update(len(busy))
            self._estimate(trainer)
            for job in source.heartbeat([trainer.slots[k].tag for k in busy]):
                k = next(k for k in busy if trainer.slots[k].tag is job)
                log.warning("prompt %r: another process took it over; dropped here", job.cfg.prompt.text)
                job.close_logs()
                self.bar.update(-trainer.slots[k].step)
                trainer.release(k)
                busy.remove(k)
            slots = {k: trainer.slots[k] for k in busy}
            finished = [k for k, s in slots.items() if s.done]
            every = [k for k, s in slots.items() if s.cfg.train.ckpt_every > 0 and s.step % s.cfg.train.ckpt_every == 0 and not s.done]
            traced = [k for k, s in slots.items() if s.tag.trace is not None and s.step % s.cfg.train.trace_every == 0]
            if self.tick % self.cfg.train.log_every == 0 or finished or every or traced:
                self._poll(trainer)
                for k in every:
                    if trainer.slots[k] is slots[k]:  # not rolled back or failed by the poll
                        self._checkpoint(trainer, k)
                for k in traced:
                    if trainer.slots[k] is slots[k]:
                        self._trace(trainer, k)
                for k in finished:
                    if trainer.slots[k] is slots[k]:
                        self._finish(trainer, k)
            self.bar.set_postfix(done=len(self.done), failed=len(self.failed), active=len(trainer.active_slots), refresh=False)

    def _estimate(self, trainer: Trainer) -> None:
        """Log, once, how long the whole run will take, from the second and third steps (the
        first compiles and warms up): a CPU run of a full-size field should say so up front."""
        self._steps_here = getattr(self, "_steps_here", 0) + 1
        if self._steps_here == 1:
            self._eta_from = time.perf_counter()
        elif self._steps_here == 3:
            per_step = (time.perf_counter() - self._eta_from) / 2
            left = max(0, self.bar.total - self.bar.n)  # this process's share (a shared queue: what it has taken so far)
            seconds = per_step * left / max(1, trainer.num_slots)
            log.info("%.2f s per step of %d prompt(s): about %s for the %d iterations left", per_step,
                     trainer.num_slots, time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400
                     else f"{seconds / 86400:.1f} days", left)  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # trainers

    def _concurrency_from_memory(self, n_prompts: int) -> int:
        """K from the peak memory of one probe step with one slot and the free GPU memory."""
        device = self.device
        self._free_memory()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe = new_trainer(self.frozen, self.cfg, 1, device, step_graph=False)  # the sampler of K > 1
        probe.probe()
        per_slot = max(torch.cuda.max_memory_allocated(device) - base, 1)
        del probe
        self._free_memory()
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
                self.frozen.max_prompts = k
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
                trainer.step_sync = self.data_parallel  # after the probe, which each rank runs alone
                self.trainer = trainer
                self._output_sampler = trainer.renderer.sampler
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
        smaller = new_trainer(self.frozen, self.cfg, len(busy), self.device)
        smaller.step_sync = self.data_parallel
        for j, k in enumerate(busy):
            old = trainer.slots[k]
            slot = smaller.assign(j, old.cfg, old.tag.embedding, checkpoint=trainer.slot_checkpoint(k), tag=old.tag)
            slot.polled_at, slot.polled_step, slot.elapsed_s = old.polled_at, old.polled_step, old.elapsed_s
        log.info("%d prompt(s) left: continuing with %d slots instead of %d", len(busy), len(busy), trainer.num_slots)
        self.trainer = smaller
        del trainer
        self._free_memory()

    def _out_of_memory(self, trainer: Trainer) -> None:
        """Mid-run out of memory: every job in flight goes back to its last checkpoint (at the
        front of the queue) and training continues with half the slots."""
        if trainer.num_slots == 1:
            raise ValueError("out of GPU memory while training with one prompt at a time")
        self._drain(unwritten=False)  # the scenes being written and the worker's memory go first
        k = trainer.num_slots // 2
        log.warning("out of GPU memory with %d prompts at once; they restart from their last checkpoints with %d slots",
                    trainer.num_slots, k)  # fmt: skip
        for slot_index in reversed(trainer.active_slots):
            slot = trainer.slots[slot_index]
            job: Job = slot.tag
            job.start_step = checkpoint_step(job.folder)
            self.bar.update(job.start_step - slot.step)
            job.close_logs()
            self.source.give_back(job)
        self.trainer = None
        del trainer
        self._free_memory()
        self._start(k)

    # ------------------------------------------------------------------------------------------
    # one job

    def _start_job(self, trainer: Trainer, k: int, job: Job, reseed: int | None = None) -> None:
        try:
            if job.lock is None and self.writes:  # one process per run folder; a dead owner's lock is taken over
                job.folder.mkdir(parents=True, exist_ok=True)
                job.lock = RunLock(job.folder, what=self.desc or "generate").acquire()
                clean_stale_temporaries(job.folder)
            ckpt = load_checkpoint(job.folder, map_location=self.device) if (job.folder / CHECKPOINT_NAME).is_file() else None
            if ckpt is not None and ckpt.config.prompt.text != job.cfg.prompt.text:
                raise ValueError(f"'{job.folder}' holds a run of {ckpt.config.prompt.text!r}, not {job.cfg.prompt.text!r}")
            if ckpt is not None and ckpt.step >= job.cfg.train.iters:  # trained, its outputs not written (stopped first)
                scene = None if self._writer_busy else self._scene(ckpt)
                self._write(job, scene, float(ckpt.state.get("elapsed_s", 0.0)))
                return
            if self.writes:
                job.folder.mkdir(parents=True, exist_ok=True)
            slot = trainer.assign(k, job.cfg, job.embedding, checkpoint=ckpt, tag=job, reseed=reseed)
        except (ValueError, OSError) as exc:
            self._fail(job, f"could not start: {exc}")
            return
        if ckpt is not None and reseed is None:
            log.info("%r resumes from its checkpoint at step %d of %d", job.cfg.prompt.text, slot.step, job.cfg.train.iters)
        job.start_step = slot.step
        job.started = job.started or time.perf_counter()
        job.metrics = MetricsLog(job.folder, slot.step, tensorboard=job.cfg.train.tensorboard) if self.writes else None
        job.trace = TraceLog(job.folder, slot.step) if self.writes and job.cfg.train.trace_every > 0 else None
        self._record(job, status="running", step=slot.step, attempts=job.attempts, line=job.line)
        log.debug("slot %d: %r from step %d", k, job.cfg.prompt.text, slot.step)

    def _trace(self, trainer: Trainer, k: int) -> None:
        """One row of slot `k`'s trace: its scene scored as it stands. The scene is built from
        a copy of the slot's state under a forked random state (building one draws initial
        weights from the global generators), so a traced run trains bit-identically to an
        untraced one."""
        slot = trainer.slots[k]
        job: Job = slot.tag
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            scene = self._scene(trainer.slot_checkpoint(k))
            try:
                row = self.tracer(scene, job.cfg)
            except ValueError as exc:  # e.g. a prompt that names no known object
                log.warning("prompt %r: no trace (%s)", job.cfg.prompt.text, exc)
                job.trace.close()
                job.trace = None
                return
        del scene
        job.trace.write({"step": slot.step, **row, "trace_s": round(time.perf_counter() - start, 3)})

    def _poll(self, trainer: Trainer, write: bool = True) -> None:
        for report in trainer.poll():
            job: Job = trainer.slots[report.slot].tag
            if not report.finite:
                self._retry_or_fail(trainer, report.slot, f"non-finite loss ({report.row['loss']}) by step {report.step}")
            elif write and job.metrics is not None:
                job.metrics.write(report.row)

    def _checkpoint(self, trainer: Trainer, k: int) -> None:
        job: Job = trainer.slots[k].tag
        if not self.writes:
            return
        try:
            trainer.save_slot(k)
        except OSError as exc:
            self._retry_or_fail(trainer, k, f"checkpoint could not be written: {exc}")
            return
        self._record(job, step=trainer.slots[k].step)

    def _retry_or_fail(self, trainer: Trainer, k: int, reason: str) -> None:
        """Roll slot k's job back to its last checkpoint and retry, else mark it failed."""
        slot = trainer.slots[k]
        job: Job = slot.tag
        trainer.release(k)
        job.close_logs()
        lost = slot.step - checkpoint_step(job.folder)
        if job.attempts >= self.retries:
            self.bar.total -= job.cfg.train.iters - slot.step
            self.bar.refresh()
            tried = f"; already rolled back and retried {job.attempts} time(s)" if self.retries else "; last good checkpoint kept"
            self._fail(job, reason + tried)
            return
        job.attempts += 1
        self.bar.update(-lost)
        log.warning("prompt %r: %s; rolling back to its last checkpoint (step %d) and retrying",
                    job.cfg.prompt.text, reason, slot.step - lost)  # fmt: skip
        self._start_job(trainer, k, job, reseed=job.cfg.train.seed + job.attempts * _RESEED)

    def _unlock(self, job: Job) -> None:
        if job.lock is not None:
            job.lock.release()
            job.lock = None

    def _fail(self, job: Job, reason: str) -> None:
        self._unlock(job)
        log.error("prompt %r failed: %s", job.cfg.prompt.text, reason)
        job.error = reason
        wall = time.perf_counter() - job.started if job.started else 0.0
        self._record(job, status="failed", error=reason, attempts=job.attempts, wall_s=round(wall, 2))
        self.failed.append(job)

    def _finish(self, trainer: Trainer, k: int) -> None:
        slot = trainer.slots[k]
        job: Job = slot.tag
        try:
            if self.writes:
                trainer.save_slot(k)
        except OSError as exc:
            self._retry_or_fail(trainer, k, f"final checkpoint could not be written: {exc}")
            return
        # A copy (the slot is refilled next) when the writer has room; else its checkpoint waits.
        scene = None if self._writer_busy or not self.writes else self._scene(trainer.slot_checkpoint(k))
        trainer.release(k)
        job.close_logs()
        self._record(job, step=slot.step)
        self._write(job, scene, slot.elapsed_s)

    # ------------------------------------------------------------------------------------------
    # outputs

    def _write_outputs(self, job: Job, scene: Any) -> RunOutputs:
        """The write itself, on the writer's thread: nothing else happens there."""
        return write_outputs(scene, job.cfg, job.folder, self.scorer)

    @property
    def _writer_busy(self) -> bool:
        """A newly finished prompt's scene would have to wait: do not hold it in memory."""
        return self.writer.full or bool(self._unwritten)

    def _scene(self, ckpt: Any) -> Any:
        """A finished prompt's scene for its outputs, rendered with the sampler it trained with."""
        return scene_from_checkpoint(ckpt, self.device, sampler=self._output_sampler)

    def _reload(self, job: Job) -> Any:
        start = time.perf_counter()
        try:
            return self._scene(load_checkpoint(job.folder, map_location=self.device))
        finally:
            self._write_totals["reload_s"] += time.perf_counter() - start

    def _write(self, job: Job, scene: Any, train_s: float) -> None:
        """Hand a finished job's outputs to the writer; `scene` None: it is reloaded from the
        job's checkpoint once the writes ahead of it leave room. Without background writes the
        write and its bookkeeping are done on return."""
        if not self.writes:  # a data-parallel rank other than 0: rank 0 writes them
            self.done.append(job)
            return
        self._unwritten.append(Write(job, scene, train_s=train_s, since=time.perf_counter()))
        self._feed()
        if not self.writer.background:
            self._collect()

    def _feed(self) -> None:
        """Give waiting writes to the writer while it has room. Scene construction stays on this
        thread: building a scene draws its initial weights from the global generator, which a
        new slot's seeded initialization borrows meanwhile."""
        while self._unwritten and not self.writer.full:
            w = self._unwritten.popleft()
            if w.scene is None:
                try:
                    w.scene = self._reload(w.job)
                except (ValueError, OSError) as exc:
                    self._fail(w.job, f"outputs could not be written: the final checkpoint did not reload: {exc}")
                    continue
            self.writer.submit(w)

    def _collect(self) -> None:
        """The bookkeeping of every write finished by now, then the next writes for the writer."""
        while done := self.writer.completed():
            for w in done:
                self._written(w)
        self._feed()

    def _drain(self, unwritten: bool = True) -> None:
        """Wait for the writer's writes and do their bookkeeping; with `unwritten`, also write
        those waiting on disk, until a stop is asked for."""
        start = time.perf_counter()
        while True:
            if unwritten and not self.stopping:
                self._feed()
            if not self.writer.pending:
                break
            for w in self.writer.wait_oldest():
                self._written(w)
        self._write_totals["waited_s"] += time.perf_counter() - start

    def _settle_writes(self) -> int:
        """Stopping: finish the writes whose scenes are held; the jobs waiting on disk stay
        pending at their final checkpoint, and a re-run writes their outputs without training.
        Returns how many were left so."""
        self._drain(unwritten=False)
        left = list(self._unwritten)
        self._unwritten.clear()
        for w in left:
            self._record(w.job, status="pending", step=checkpoint_step(w.job.folder))
            self._unlock(w.job)
        return len(left)

    def _written(self, w: Write) -> None:
        """A finished write: its job is done, or retried once from its checkpoint, or failed."""
        job: Job = w.job
        if w.error is not None:
            exc = w.error
            if w.attempt >= RETRIES:
                self._fail(job, f"outputs could not be written: {type(exc).__name__}: {exc}")
                return
            log.warning("prompt %r: outputs could not be written (%s); retrying from its checkpoint", job.cfg.prompt.text, exc)
            try:
                w.scene = self._reload(job)
            except (ValueError, OSError) as load_exc:
                self._fail(job, f"outputs could not be written ({exc}) and the checkpoint did not reload: {load_exc}")
                return
            w.attempt, w.error, w.outputs = w.attempt + 1, None, None
            self.writer.submit(w)  # it has just left the writer: there is room
            return
        outputs = w.outputs
        job.outputs = outputs
        self._unlock(job)
        def rel(p: Path | None) -> str | None:  # relative to the batch folder
            return None if p is None else str(Path(p).relative_to(job.folder.parent))


        paths = {"checkpoint": rel(outputs.checkpoint), "turntable": rel(outputs.turntable), "grid": rel(outputs.grid),
                 "meshes": [rel(m) for m in outputs.meshes], "metrics": rel(outputs.metrics)}  # fmt: skip
        if outputs.score is not None:
            paths["score"] = rel(outputs.score)
        if outputs.failed:  # the others are on disk; `render` / `export-mesh` can write these later
            paths["not_written"] = dict(outputs.failed)
        wall = w.train_s + time.perf_counter() - w.since
        self._record(job, status="done", step=job.cfg.train.iters, outputs=paths, error=None, wall_s=round(wall, 2),
                     outputs_s=round(w.seconds, 2), steps_during_outputs=w.steps)  # fmt: skip
        self.done.append(job)
        totals = self._write_totals
        totals["prompts"], totals["seconds"], totals["steps"] = totals["prompts"] + 1, totals["seconds"] + w.seconds, totals["steps"] + w.steps
        if self.writer.background:
            log.info("outputs of %r written in %.1f s in the background; training ran %d step(s) meanwhile",
                     job.cfg.prompt.text, w.seconds, w.steps)  # fmt: skip
        else:
            log.info("outputs of %r written in %.1f s; training waited for them", job.cfg.prompt.text, w.seconds)
        log.info("done: %r -> %s", job.cfg.prompt.text, job.folder)

    def _interrupt(self) -> None:
        """Stopped: checkpoint every job in flight (unless its loss went non-finite)."""
        trainer, saved = self.trainer, 0
        if trainer is not None:
            for report in trainer.poll():
                job: Job = trainer.slots[report.slot].tag
                if report.finite and self.writes:
                    try:
                        trainer.save_slot(report.slot)
                        saved += 1
                    except OSError as exc:
                        log.error("prompt %r: checkpoint could not be written on interrupt: %s", job.cfg.prompt.text, exc)
                self._record(job, status="pending", step=checkpoint_step(job.folder))
                job.close_logs()
                self._unlock(job)
        why = f"stopped by {signal.Signals(self._stop).name}" if self._stop is not None else "interrupted"
        log.warning("%s; %d checkpoint(s) written; the same command with --resume (generate) or again (batch) continues", why, saved)
        if self.writer is not None and (self.writer.pending or self._unwritten):
            if self.writer.pending:
                log.warning("finishing the outputs of %d prompt(s) before exiting", len(self.writer.pending))
            left = self._settle_writes()
            if left:
                log.warning("%d finished prompt(s) wait for their outputs: the re-run writes them from their final checkpoints", left)
