"""A batch's jobs shared by several processes through the queue in ``<out>/queue/``.

`SharedJobs` is the `jobs.JobSource` of a batch run by torchrun ranks (one process per GPU, one
or many nodes) or by Slurm array tasks (``--shard i/N``): every process plans the same jobs from
the prompts file and takes them one at a time from a `queue.PromptQueue` that lives beside the
outputs, so fast and slow ranks stay busy to the end and nothing but the filesystem is shared.

- `take` claims the next prompt (a lease) and re-reads its checkpoint step, since another rank
  may have trained it before (a takeover after that rank died, or a resume after a stop). When
  nothing is claimable it does not look again for ``renew_every_s``: the driver asks for a job
  after every step, and a directory listing per step would load a shared filesystem for nothing.
- `wait` (no job training here) waits for a claim: another rank's lease may run out. None
  means every prompt is done or failed, or a stop was asked for.
- `heartbeat` renews this process's leases after every step (a clock comparison between
  renewals) and names the jobs whose lease was lost: the driver drops them without writing.
- `record` turns a job's end into the queue's record (``done`` and ``failed`` are created in the
  same atomic step that ends the lease); `close` releases what is not finished as resumable.

A claimed prompt's folder lock (`lock.RunLock`) is taken here, before the driver sees the job:
the lease already says who may train it, so a lock left by a process on another machine is
taken over (that process's lease ran out), and a lock that a live process on this machine still
holds (its lease ran out under it: it drops the prompt at its next renewal) sends the prompt
back to the queue instead of failing it.

The manifest is not rewritten from each process's partial view: `rebuild_manifest` derives
``manifest.jsonl`` from the queue's records plus the prompt list, with the rank and host that
trained each prompt, atomically; rank 0 does it on its progress tick, and every process at its
end (array tasks have no common rank 0). Each rebuild reads the queue again after it writes and
writes again until the two agree, so a stale rebuild that lands last is corrected by its own
writer and concurrent ones are harmless.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..atomic import clean_stale_temporaries
from ..lock import RunLock
from .distributed import ProgressReporter, format_summary
from .driver import checkpoint_step
from .jobs import Job
from .manifest import Manifest
from .queue import PromptQueue, PromptState, read_states

log = logging.getLogger(__name__)

_STATUS = {"done": "done", "failed": "failed", "held": "running"}  # queue state -> manifest status; else pending


def merge_states(base: Manifest, states: Mapping[str, PromptState]) -> Manifest:
    """The manifest that `states` (from `queue.read_states`) make of `base` (the records of
    every prompt of the batch, as planned). A prompt the queue has no record of keeps its base
    record; so does one the base records as finished when the queue does not agree (its queue
    records are left from an earlier shared run, and a single-process run finished it since)."""
    merged = Manifest(base.out_dir)
    for pid, record in base.records.items():
        s = states.get(pid)
        new = dataclasses.replace(record, outputs=dict(record.outputs))
        merged.records[pid] = new
        if s is None or s.record is None:
            continue
        status = _STATUS.get(s.state, "pending")
        if (record.status == "done" and status != "done") or (record.status == "failed" and status not in ("done", "failed")):
            continue
        info: dict[str, Any] = s.record.info
        new.status = status
        new.rank, new.host = s.record.holder.rank, s.record.holder.host
        new.updated = datetime.datetime.fromtimestamp(s.record.time, datetime.timezone.utc).isoformat(timespec="seconds")
        if isinstance(info.get("step"), int):
            new.step = info["step"]
        if status == "done":
            new.step, new.error = record.iters, None
            new.outputs = dict(info.get("outputs") or {})
        if status == "failed":
            new.error = str(info.get("error") or "failed")
        for key in ("attempts", "wall_s", "outputs_s", "steps_during_outputs"):
            if key in info:
                setattr(new, key, info[key])
    return merged


def rebuild_manifest(base: Manifest, lease_s: float, tries: int = 8) -> Manifest:
    """`merge_states` over the queue in `base`'s folder, written atomically; returns it.

    A rebuild reads the queue, then writes: another process's release between the two, followed
    by that process's own rebuild, would be overwritten by this stale one (the last write wins,
    not the freshest read). So after writing, the queue is read again and the manifest written
    again until a read agrees with what was written: the last writer then wrote what it saw after
    every release that an earlier writer had seen, whatever the order of the writes."""
    ids = list(base.records)
    merged = merge_states(base, read_states(base.out_dir, ids, lease_s=lease_s))
    merged.save()
    for _ in range(tries):
        again = merge_states(base, read_states(base.out_dir, ids, lease_s=lease_s))
        if again.records == merged.records:
            break
        again.save()
        merged = again
    return merged


class SharedJobs:
    """`jobs` (every job this process may train, by id) handed out through `queue`.

    `manifest` holds every prompt of the batch as planned (the base of `rebuild_manifest`);
    `reporter` is rank 0's progress display (None on other ranks: they report nothing);
    `should_stop` says a stop was asked for (it ends `wait`)."""

    def __init__(self, jobs: Sequence[Job], queue: PromptQueue, manifest: Manifest, *, reporter: ProgressReporter | None = None,
                 should_stop: Callable[[], bool] = lambda: False, poll_s: float | None = None) -> None:  # fmt: skip
        self.jobs = {job.id: job for job in jobs}
        missing = [pid for pid in queue.ids if pid not in self.jobs]
        if missing:
            raise ValueError(f"queue prompts without a job: {missing[:3]}")
        self.queue = queue
        self.manifest = manifest
        self.reporter = reporter
        self.should_stop = should_stop
        self.poll_s = min(30.0, queue.lease_s / 4) if poll_s is None else float(poll_s)
        self.done: list[str] = []
        self.failed: list[str] = []
        self._returned: collections.deque[Job] = collections.deque()  # given back: held, restarted first
        self._none_until = float("-inf")  # monotonic: nothing was claimable, do not look before this
        self._steps: dict[str, int] = {}  # checkpointed step of each held job
        self._locked_out: dict[str, float] = {}  # id -> monotonic time before which it is not claimed again

    # ---- handing out

    def take(self) -> Job | None:
        if self._returned:
            return self._returned.popleft()
        if time.monotonic() < self._none_until:
            return None
        tried: set[str] = set()
        while (pid := self.queue.claim_next(self._skip() | tried)) is not None:
            job = self._claimed(pid)
            if job is not None:
                return job
            tried.add(pid)
        self._none_until = time.monotonic() + self.queue.renew_every_s
        return None

    def wait(self) -> Job | None:
        if self._returned:
            return self._returned.popleft()
        while True:
            pid = self.queue.wait_claim(poll_s=self.poll_s, should_stop=self._idle, skip=self._skip())
            if pid is None:
                if not self._skip() or self.should_stop():
                    return None
                time.sleep(self.poll_s)  # only prompts whose folders are locked here are left: look again
                continue
            job = self._claimed(pid)
            if job is not None:
                self._none_until = float("-inf")
                return job

    def _skip(self) -> set[str]:
        """Prompts sent back recently because their folder was locked here."""
        now = time.monotonic()
        self._locked_out = {pid: until for pid, until in self._locked_out.items() if until > now}
        return set(self._locked_out)

    def _idle(self) -> bool:
        self._tick()
        return self.should_stop()

    def _claimed(self, pid: str) -> Job | None:
        job = self.jobs[pid]
        if job.lock is None:
            try:
                job.lock = RunLock(job.folder, what="batch", take_foreign=True).acquire()
            except ValueError as exc:
                log.warning("prompt %r goes back to the queue: %s", job.cfg.prompt.text, exc)
                self.queue.finish(pid, "pending", {"step": checkpoint_step(job.folder)})
                self._locked_out[pid] = time.monotonic() + self.poll_s
                return None
            clean_stale_temporaries(job.folder)
        job.start_step = checkpoint_step(job.folder)  # another rank may have advanced it
        self._steps[pid] = job.start_step
        previous = self.queue.previous_holder(pid)
        if previous is not None:
            h = previous.holder
            how = "took over" if previous.kind == "lease" else f"resumes ({previous.kind} by)"
            log.info("rank %d %s prompt %r from rank %d on %s (pid %d) at step %d", self.queue.holder.rank, how, job.cfg.prompt.text,
                     h.rank, h.host, h.pid, job.start_step)  # fmt: skip
        return job

    def exhausted(self) -> bool:
        """Nothing claimable now (others hold the rest): a hint to shrink the trainer; a lease
        that runs out later is still taken when a slot asks."""
        return not self._returned and time.monotonic() < self._none_until

    def give_back(self, job: Job) -> None:
        self._returned.appendleft(job)  # still held (its lease is renewed), restarted first

    # ---- while training

    def heartbeat(self, training: Sequence[Job]) -> list[Job]:
        info = {job.id: {"step": self._steps.get(job.id, job.start_step)} for job in training}
        lost = set(self.queue.renew(info=info))
        if lost:
            self._returned = collections.deque(j for j in self._returned if j.id not in lost)
            for pid in lost:
                self._steps.pop(pid, None)
                self._unlock(self.jobs[pid])
        self._tick()
        return [job for job in training if job.id in lost]

    def record(self, job: Job, **fields: Any) -> None:
        if "step" in fields:
            self._steps[job.id] = int(fields["step"])
        status = fields.get("status")
        if status not in ("done", "failed"):
            return  # running: the lease says so; pending: `close` releases it
        if job.id not in self.queue.held:
            log.warning("prompt %r: %s here, but this rank no longer holds it; not recorded", job.cfg.prompt.text, status)
            return
        info = {k: fields[k] for k in ("outputs", "error", "wall_s", "outputs_s", "steps_during_outputs") if k in fields}
        info.update(step=self._steps.get(job.id, 0), attempts=int(fields.get("attempts", job.attempts)), line=job.line)
        if self.queue.finish(job.id, status, info):
            (self.done if status == "done" else self.failed).append(job.id)
        self._steps.pop(job.id, None)

    @staticmethod
    def _unlock(job: Job) -> None:
        if job.lock is not None:
            job.lock.release()
            job.lock = None

    def _tick(self) -> None:
        """Rank 0: the progress line every `reporter.every_s`, and the manifest with it."""
        if self.reporter is not None and self.reporter.maybe_report() is not None:
            rebuild_manifest(self.manifest, self.queue.lease_s)

    # ---- the end

    def close(self) -> None:
        held = self.queue.held
        released = self.queue.release_all({pid: {"step": checkpoint_step(self.jobs[pid].folder)} for pid in held})
        for pid in held:  # the driver unlocked the jobs it trained; not the ones given back to it
            self._unlock(self.jobs[pid])
        if released:
            log.info("rank %d released %d prompt(s) as resumable from their checkpoints", self.queue.holder.rank, len(released))
        self._returned.clear()
        rebuild_manifest(self.manifest, self.queue.lease_s)
        if self.reporter is not None and self.reporter.env.is_main:
            log.info("batch summary:\n%s", format_summary(self.reporter.progress()))
