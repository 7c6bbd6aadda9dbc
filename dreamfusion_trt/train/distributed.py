"""Where this process stands in a multi-GPU or multi-node batch, and how it is told to stop.

- `dist_env` reads rank, world size, local rank, node and host from what the launcher set:
  torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``) wins
  over Slurm (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NODEID``) because ``srun torchrun`` sets both and only torchrun's describe the
  workers. Slurm's are used only inside an srun step (``SLURM_STEP_ID`` is set): the batch
  script itself is one process even when the allocation has many tasks. Either way the Slurm
  job id and restart count are kept, so a requeued job recognises its earlier incarnation's
  leases (`queue.PromptQueue`'s ``job``/``restart``).
- `device_for` maps a rank to ``cuda:LOCAL_RANK`` (``cuda:0`` when Slurm bound one GPU per
  task), `init_distributed` starts torch.distributed only when there is more than one rank and
  someone needs collectives (the shared queue does not: it lives on the filesystem), gloo on a
  CPU and nccl on CUDA.
- `ProgressReporter`: rank 0's one progress line for the whole job (prompts done, failed and
  running per rank, prompts per hour) and the final summary, read from the queue's records in
  the shared folder, so it sees every rank without any communication.
- `StopFlag`: SIGTERM and SIGUSR1 (what Slurm sends at preemption and, with
  ``--signal=B:USR1@120``, before the time limit) and a stop-request file set a flag that the
  training loop polls; the loop then writes its checkpoints, releases its prompts as resumable
  and exits with `StopFlag.exit_code`:

  ======================  =====  ============================================================
  `EXIT_REQUEUE`           75    SIGUSR1 or a "requeue" request (EX_TEMPFAIL, "try again"):
                                 checkpoints written; the sbatch scripts call
                                 ``scontrol requeue`` on it and the requeued job continues.
  `EXIT_TERMINATED`        143   SIGTERM (128 + 15, what a shell reports for a process killed
                                 by SIGTERM): checkpoints written, not requeued by our scripts
                                 (``scancel``, or preemption where Slurm requeues by itself).
  ======================  =====  ============================================================

  A SIGTERM after a SIGUSR1 (Slurm's time limit following its warning) keeps the requeue code.
  The stop-request file (``<out>/queue/_stop.<job>``, or ``_stop`` for every job) is how a
  batch script reaches ranks that no signal can reach directly (workers under torchrun on
  several nodes); `request_stop` writes it, the flag checks it every few seconds.

torch is imported only by the functions that need it, so the queue, progress and stop helpers
cost nothing to import in a process that never touches a GPU.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..atomic import atomic_write_text
from .queue import DEFAULT_LEASE_S, DEFAULT_SKEW_S, PromptState, queue_dir, read_states

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75
EXIT_TERMINATED = 143
STOP_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
STOP_ACTIONS: tuple[str, ...] = ("requeue", "terminate")
Launcher = Literal["torchrun", "slurm", "single"]


# ------------------------------------------------------------------------------------------
# who am I


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    host: str = ""
    launcher: Launcher = "single"
    job: str = ""  # Slurm job id ('' outside Slurm)
    restart: int = 0  # SLURM_RESTART_COUNT: how often Slurm requeued this job

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a whole number") from None
    if number < minimum:
        raise ValueError(f"environment variable {name}={value!r} must be at least {minimum}")
    return number


def dist_env(environ: Mapping[str, str] | None = None, hostname: str | None = None) -> DistEnv:
    """This process's place in the job, from `environ` (default ``os.environ``); see the module
    docstring for which variables count. ValueError naming the variable for a malformed value
    or an inconsistent pair (rank >= world size)."""
    env = os.environ if environ is None else environ
    host = hostname or env.get("SLURMD_NODENAME") or socket.gethostname()
    job = env.get("SLURM_JOB_ID", "").strip()
    restart = _int(env, "SLURM_RESTART_COUNT", 0) or 0
    if "RANK" in env and "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
        launcher: Launcher = "torchrun"
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS",
                 "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID")  # fmt: skip
        launcher = "slurm"
    else:
        return DistEnv(host=host, job=job, restart=restart)
    rank_name, world_name, local_name, local_world_name, node_name = names
    rank = _int(env, rank_name, 0)
    world = _int(env, world_name, 1, minimum=1)
    local_rank = _int(env, local_name, 0)
    node = _int(env, node_name, 0)
    if launcher == "slurm":  # "4(x2)" or "4,2": the first node's count is as good as any for a label
        raw = env.get(local_world_name, "1").split("(")[0].split(",")[0]
        local_world = _int({local_world_name: raw}, local_world_name, 1, minimum=1)
    else:
        local_world = _int(env, local_world_name, 1, minimum=1)
    if rank >= world:
        raise ValueError(f"{rank_name}={rank} is not below {world_name}={world}")
    if local_rank >= max(local_world, 1) and launcher == "torchrun":
        raise ValueError(f"{local_name}={local_rank} is not below {local_world_name}={local_world}")
    return DistEnv(rank, world, local_rank, local_world, node, host, launcher, job, restart)


def device_for(env: DistEnv, cuda_available: bool | None = None, device_count: int | None = None) -> torch.device:
    """The device of a rank: ``cuda:LOCAL_RANK``; ``cuda:0`` when only one GPU is visible (Slurm's
    ``--gpus-per-task=1`` binds one per task); the CPU without CUDA. ValueError when the local
    rank has no GPU of its own."""
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return torch.device("cpu")
    count = torch.cuda.device_count() if device_count is None else device_count
    if count == 1:
        return torch.device("cuda:0")
    if env.local_rank >= count:
        raise ValueError(f"local rank {env.local_rank} has no GPU: {count} visible (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); start at most {count} processes per node")
    return torch.device(f"cuda:{env.local_rank}")


def init_distributed(env: DistEnv, device: torch.device, backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the job's process group (nccl on CUDA, gloo on the CPU) when there is more than one
    rank and it is not joined yet; True when this call joined it. Needs torchrun's
    ``MASTER_ADDR``/``MASTER_PORT`` (or the same set by hand)."""
    import torch
    import torch.distributed as dist

    if not env.is_distributed or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"torch.distributed needs {' and '.join(missing)} (launch with torchrun, or set them)")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d joined the %s process group on %s", env.rank, env.world_size, backend, env.host)
    return True


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# progress (rank 0)


@dataclass
class RankCounts:
    done: int = 0
    failed: int = 0
    running: int = 0
    host: str = ""


@dataclass
class JobProgress:
    total: int
    done: int
    failed: int
    running: int  # live leases
    stalled: int  # leases past their expiry: a rank died, another will take them over
    waiting: int  # never started or released (resumable)
    per_rank: dict[int, RankCounts] = field(default_factory=dict)
    elapsed_s: float = 0.0
    done_since: int = 0  # finished since the reporter started
    prompts_per_hour: float = 0.0

    @property
    def finished(self) -> bool:
        return self.done + self.failed == self.total


def job_progress(states: Mapping[str, PromptState], since: float, now: float) -> JobProgress:
    """Counts over `states` (from `queue.read_states`); prompts/hour over the ones finished after
    `since` (wall clock)."""
    per_rank: dict[int, RankCounts] = {}
    counts = dict.fromkeys(("done", "failed", "running", "stalled", "waiting"), 0)
    done_since = 0
    for s in states.values():
        key = {"done": "done", "failed": "failed", "held": "running", "expired": "stalled"}.get(s.state, "waiting")
        counts[key] += 1
        if s.record is None or key not in ("done", "failed", "running"):
            continue
        rc = per_rank.setdefault(s.record.holder.rank, RankCounts(host=s.record.holder.host))
        setattr(rc, key, getattr(rc, key) + 1)
        if key == "done" and s.record.time >= since:
            done_since += 1
    elapsed = max(now - since, 1e-9)
    return JobProgress(len(states), counts["done"], counts["failed"], counts["running"], counts["stalled"], counts["waiting"],
                       dict(sorted(per_rank.items())), elapsed, done_since, done_since * 3600.0 / elapsed)  # fmt: skip


def format_progress(p: JobProgress) -> str:
    """One line: ``12/40 done, 1 failed, 8 running (r0 3/0/2 r1 ...), 1 stalled, 18 waiting, 9.5 prompts/h``."""
    ranks = " ".join(f"r{r} {c.done}/{c.failed}/{c.running}" for r, c in p.per_rank.items())
    return (f"{p.done}/{p.total} done, {p.failed} failed, {p.running} running"
            + (f" (rank done/failed/running: {ranks})" if ranks else "")
            + (f", {p.stalled} stalled" if p.stalled else "")
            + f", {p.waiting} waiting, {p.prompts_per_hour:.1f} prompts/h")  # fmt: skip


def format_summary(p: JobProgress) -> str:
    """The end-of-job table: one line per rank, then the totals."""
    lines = [f"{'rank':>4}  {'host':<20} {'done':>5} {'failed':>6} {'running':>7}"]
    for r, c in p.per_rank.items():
        lines.append(f"{r:>4}  {c.host[:20]:<20} {c.done:>5} {c.failed:>6} {c.running:>7}")
    lines.append(f"{p.done}/{p.total} prompts done, {p.failed} failed, {p.total - p.done - p.failed} unfinished; "
                 f"{p.done_since} in {p.elapsed_s / 3600:.2f} h = {p.prompts_per_hour:.1f} prompts/h")  # fmt: skip
    return "\n".join(lines)


class ProgressReporter:
    """Rank 0's view of the whole job, read from ``<out>/queue/``; other ranks get None from
    `maybe_report` and never touch the folder for it."""

    def __init__(self, out_dir: str | Path, ids: Iterable[str], env: DistEnv, every_s: float = 60.0,
                 lease_s: float = DEFAULT_LEASE_S, skew_s: float = DEFAULT_SKEW_S, since: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.out_dir, self.ids, self.env = Path(out_dir), list(ids), env
        self.every_s, self.lease_s, self.skew_s, self.clock = every_s, lease_s, skew_s, clock
        self.since = clock() if since is None else since
        self._last = float("-inf")

    def progress(self) -> JobProgress:
        now = self.clock()
        return job_progress(read_states(self.out_dir, self.ids, self.lease_s, self.skew_s, now), self.since, now)

    def maybe_report(self, force: bool = False) -> JobProgress | None:
        """On rank 0, at most every `every_s` (or when forced): log and return the progress."""
        if not self.env.is_main:
            return None
        mono = time.monotonic()
        if not force and mono - self._last < self.every_s:
            return None
        self._last = mono
        p = self.progress()
        log.info("batch: %s", format_progress(p))
        return p


# ------------------------------------------------------------------------------------------
# stopping


def stop_file(out_dir: str | Path, job: str = "") -> Path:
    """The stop-request file for Slurm job `job` (``''``: every job)."""
    return queue_dir(out_dir) / (f"_stop.{job}" if job else "_stop")


def request_stop(out_dir: str | Path, action: str = "requeue", job: str = "", restart: int | None = None) -> Path:
    """Ask every rank of `job` (its incarnation `restart`, or any) to checkpoint and stop."""
    if action not in STOP_ACTIONS:
        raise ValueError(f"unknown stop action {action!r} (expected one of {', '.join(STOP_ACTIONS)})")
    path = stop_file(out_dir, job)
    atomic_write_text(path, json.dumps({"action": action, "restart": restart}) + "\n")
    return path


def read_stop_request(out_dir: str | Path, job: str = "", restart: int = 0) -> str | None:
    """The action asked of this job's incarnation `restart` ("requeue"/"terminate"), or None.
    A request for an earlier incarnation (the job was requeued since) is ignored."""
    for path in ((stop_file(out_dir, job),) if job else ()) + (stop_file(out_dir),):
        try:
            data: Any = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            data = {"action": "requeue"}  # half-written by hand: still a request to stop
        if not isinstance(data, dict):
            data = {}
        if data.get("restart") is not None and data.get("restart") != restart:
            continue
        action = data.get("action", "requeue")
        return action if action in STOP_ACTIONS else "requeue"
    return None


class StopFlag:
    """Set by a stop signal or request; the training loop polls `requested` (cheap: a flag, plus
    a look at the stop-request file every `check_every_s` when `out_dir` is given)."""

    def __init__(self, out_dir: str | Path | None = None, job: str = "", restart: int = 0, check_every_s: float = 5.0) -> None:
        self.out_dir, self.job, self.restart, self.check_every_s = out_dir, job, restart, check_every_s
        self.signals: list[int] = []
        self.action: str | None = None  # from a stop-request file
        self._previous: dict[int, Any] = {}
        self._checked = float("-inf")

    def install(self, names: Iterable[str] = STOP_SIGNALS) -> StopFlag:
        """Handle the named signals (main thread only; ValueError elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("stop signals can only be handled in the main thread")
        for name in names:
            signum = getattr(signal, name, None)
            if not isinstance(signum, signal.Signals):
                raise ValueError(f"unknown signal {name!r}")
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # nothing else: the loop does the work between steps

    @property
    def requested(self) -> bool:
        if self.signals or self.action:
            return True
        if self.out_dir is not None:
            mono = time.monotonic()
            if mono - self._checked >= self.check_every_s:
                self._checked = mono
                self.action = read_stop_request(self.out_dir, self.job, self.restart)
        return bool(self.signals or self.action)

    @property
    def reason(self) -> str | None:
        if self.signals:
            return "+".join(signal.Signals(s).name for s in dict.fromkeys(self.signals))
        return f"stop request ({self.action})" if self.action else None

    @property
    def exit_code(self) -> int | None:
        """`EXIT_REQUEUE` after SIGUSR1 or a "requeue" request, else `EXIT_TERMINATED` after
        SIGTERM or a "terminate" request; None when no stop was requested."""
        if signal.SIGUSR1 in self.signals or self.action == "requeue":
            return EXIT_REQUEUE
        if self.signals or self.action == "terminate":
            return EXIT_TERMINATED
        return None
