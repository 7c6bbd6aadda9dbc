"""Finished prompts' outputs written on one worker thread while the other prompts train.

The driver hands `OutputWriter.submit` a finished prompt's scene (a copy: its slot is refilled
at once) and collects the finished writes between steps (`completed`, `wait_oldest`). The
worker thread only writes; what becomes of the prompt (its manifest row, a retry from its
checkpoint, a failure, the log) is decided by the caller, on its own thread. Each pending write
holds its scene in memory, so the caller keeps at most `capacity` of them and lets later ones
wait as checkpoints on disk.

On CUDA the worker writes on a stream of its own that first waits for an event recorded on the
caller's stream once the scene was copied, so its kernels run beside the training step; it
synchronizes that stream before it lets go of the scene, whose memory the caching allocator
counts as the caller's stream's and would otherwise hand out while the worker still reads it.
With ``background=False`` a write runs inline in `submit`: the twin the tests compare with.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..export.artifacts import RunOutputs


@dataclass(eq=False)
class Write:
    """One prompt's outputs, to be written from `scene` (dropped once written). `train_s` and
    `since` (`time.perf_counter` when it finished training) are the caller's, for its wall time;
    `seconds` and `steps` add up over its attempts."""

    job: Any
    scene: Any
    train_s: float = 0.0
    since: float = 0.0
    attempt: int = 0  # 0, then 1 for the retry from its checkpoint
    seconds: float = 0.0  # spent writing
    steps: int = 0  # training steps the caller made meanwhile
    outputs: RunOutputs | None = None
    error: BaseException | None = None
    ready: Any = None  # torch.cuda.Event: the scene's copy on the caller's stream is complete
    future: concurrent.futures.Future | None = None

    @property
    def finished(self) -> bool:
        return self.future is None or self.future.done()


class OutputWriter:
    """Runs ``write(job, scene) -> RunOutputs`` for each submitted `Write`, in order, on one
    worker thread (inline with ``background=False``), at most `capacity` pending at once.
    `steps` reads the caller's step counter."""

    def __init__(self, write: Callable[[Any, Any], RunOutputs], device: torch.device, *, background: bool,
                 steps: Callable[[], int], capacity: int) -> None:  # fmt: skip
        if capacity < 1:
            raise ValueError(f"an output writer needs room for at least one write, got capacity {capacity}")
        self.write = write
        self.device = device
        self.background = background
        self.steps = steps
        self.capacity = capacity
        self.pending: collections.deque[Write] = collections.deque()  # submitted, not yet collected, oldest first
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outputs") if background else None
        self._stream = torch.cuda.Stream(device) if background and device.type == "cuda" else None

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.capacity

    def submit(self, w: Write) -> None:
        """Start writing `w` (with ``background=False``: write it now). The caller checks `full` first."""
        assert not self.full, "output writer is full: collect a write first"
        if self._pool is None:
            self._run(w)
        else:
            if self._stream is not None:
                w.ready = torch.cuda.Event()
                w.ready.record(torch.cuda.current_stream(self.device))
            w.future = self._pool.submit(self._run, w)
        self.pending.append(w)

    def completed(self) -> list[Write]:
        """The writes finished by now, oldest first, handed back (no longer pending). Never blocks."""
        out = []
        while self.pending and self.pending[0].finished:  # one worker: they finish in order
            w = self.pending.popleft()
            if w.future is not None and not w.future.cancelled() and w.future.exception() is not None and w.error is None:
                w.error = w.future.exception()  # not an Exception (those are caught in _run)
            out.append(w)
        return out

    def wait_oldest(self) -> list[Write]:
        """Block until the oldest pending write is finished; then `completed` (at least that one)."""
        if self.pending and self.pending[0].future is not None:
            concurrent.futures.wait([self.pending[0].future])
        return self.completed()

    def _run(self, w: Write) -> None:
        start, steps = time.perf_counter(), self.steps()
        try:
            if self._stream is None:
                w.outputs = self.write(w.job, w.scene)
            else:
                with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                    self._stream.wait_event(w.ready)
                    try:
                        w.outputs = self.write(w.job, w.scene)
                    finally:
                        self._stream.synchronize()  # before the scene's memory can go back to the allocator
        except Exception as exc:  # noqa: BLE001 -- the caller retries from the checkpoint or fails the job
            w.error = exc
        finally:
            w.scene = w.ready = None
            w.seconds += time.perf_counter() - start
            w.steps += self.steps() - steps

    def close(self, wait: bool = True) -> None:
        """Stop the worker: after the writes submitted (`wait`), or at once, dropping those not
        started (an error or interrupt on the way out: their checkpoints are on disk)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
