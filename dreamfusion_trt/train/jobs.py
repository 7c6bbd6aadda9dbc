"""Where the training loop gets its jobs and reports what became of them.

The driver (`driver.py`) asks a `JobSource` for the next job when a slot is free, tells it after
every step which jobs are still training (a shared queue renews their leases and names those it
lost), and reports each job's progress and end. `LocalJobs` is one process's list of jobs with an
optional batch manifest; a source over a queue shared by several processes (torchrun ranks,
Slurm array tasks) implements the same protocol.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from ..config import RunConfig
from ..export.artifacts import RunOutputs
from ..guidance.text import PromptEmbeddings
from .manifest import Manifest
from .monitor import MetricsLog, TraceLog


@dataclass
class Job:
    id: str
    cfg: RunConfig  # the prompt's own config: text, negative, seed, iters, output folder
    folder: Path
    line: int = 0  # in the prompts file
    start_step: int = 0  # from its checkpoint, when one exists
    embedding: PromptEmbeddings | None = None
    attempts: int = 0
    metrics: MetricsLog | None = None
    trace: TraceLog | None = None  # with train.trace_every
    started: float = 0.0
    outputs: RunOutputs | None = None  # once done
    error: str | None = None  # once failed
    lock: Any = None  # the `lock.RunLock` on its folder while this process trains it

    def close_logs(self) -> None:
        """Close its metrics and trace files (it stopped training here)."""
        for log in (self.metrics, self.trace):
            if log is not None:
                log.close()


class JobSource(Protocol):
    def take(self) -> Job | None:
        """The next job to start now, or None when none is available now."""

    def wait(self) -> Job | None:
        """With no job training here: block until one is available (None: no job will come)."""

    def exhausted(self) -> bool:
        """True when `take` will never return a job again."""

    def give_back(self, job: Job) -> None:
        """A job this process keeps but restarts later (out of memory): it comes back first."""

    def heartbeat(self, training: Sequence[Job]) -> list[Job]:
        """After a step: `training` are still being trained here; returns those among them this
        process may no longer train (a lost lease), which the driver drops without writing."""

    def record(self, job: Job, **fields: Any) -> None:
        """A change of the job's state: status (running, done, failed, pending), step, outputs,
        error, attempts, wall_s (a `manifest.PromptRecord`'s fields)."""

    def close(self) -> None:
        """The loop ended or was interrupted: jobs not done go back to pending."""


class LocalJobs:
    """This process's own jobs, in order, with the batch manifest when there is one."""

    def __init__(self, jobs: Sequence[Job], manifest: Manifest | None = None) -> None:
        self.queue: collections.deque[Job] = collections.deque(jobs)
        self.manifest = manifest

    def take(self) -> Job | None:
        return self.queue.popleft() if self.queue else None

    def wait(self) -> Job | None:
        return self.take()

    def exhausted(self) -> bool:
        return not self.queue

    def give_back(self, job: Job) -> None:
        self.queue.appendleft(job)

    def heartbeat(self, training: Sequence[Job]) -> list[Job]:
        return []

    def record(self, job: Job, **fields: Any) -> None:
        if self.manifest is not None:
            self.manifest.update(job.id, **fields)

    def close(self) -> None:
        if self.manifest is None:
            return
        for record in self.manifest.records.values():
            if record.status == "running":
                record.status = "pending"
        self.manifest.save()
