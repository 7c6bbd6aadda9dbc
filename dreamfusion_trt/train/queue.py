"""A prompt queue shared by every rank of a batch, kept in ``<out>/queue/`` beside the outputs.

Ranks (torchrun processes, Slurm tasks, or plain processes started by hand on several machines)
need nothing in common but the output folder on a shared filesystem: no server, no
torch.distributed. Each prompt id owns a *chain* of small JSON records ``queue/<id>.<gen>``,
``gen`` = 0, 1, 2, ...; the record with the highest ``gen`` says where the prompt stands:

- ``lease``: rank R on host H (pid P) trains it until ``expires`` (wall clock, seconds since the
  epoch). The holder rewrites its own record with a later ``expires`` (`PromptQueue.renew`);
- ``released``: its holder stopped (a signal, a mid-run out-of-memory) after writing its
  checkpoint: anyone may take it at once;
- ``done``: finished; terminal, it is never claimed again;
- ``failed``: given up, with the error; terminal unless the queue is opened with
  ``retry_failed`` (then failures recorded before the queue was opened are claimable again).

**Every change of hands is the exclusive creation of the next record**, ``<id>.<gen+1>``. A
fresh claim creates ``<id>.0``; taking over a released or expired lease creates the next gen;
finishing creates a ``done``/``failed``/``released`` record as the next gen. Exclusive creation
is done NFS-safely: the record is written to a unique temporary file, fsynced, then hard-linked
to its name. ``link(2)`` is atomic on the server on NFSv2/3/4 (unlike ``O_CREAT|O_EXCL``, which is
not on NFSv2 and old clients), and it fails when the name exists; when a retransmitted LINK
makes the client report an error for a link that did happen, the temporary's link count (2)
tells the truth, as the ``open(2)`` manual recommends. On a filesystem without hard links it
falls back to ``O_CREAT|O_EXCL`` on the name itself (atomic on local disks, NFSv3+, Lustre,
GPFS). So whatever a rank's (possibly stale, cached) directory listing says, two ranks can
never both create the same gen, and since a ``done`` record is itself the gen after the last
lease, *marking done and releasing the lease are one atomic step*: nobody can claim a prompt
that is done, and a late holder that lost its lease cannot mark it done (its create fails).
Records are never deleted while a batch runs, so a gen can never be created twice.

A lease is taken over when it expired (``now > expires + skew_s``: the holder died, was
``kill -9``-ed, or its node was lost) or, without waiting, when its holder is certainly gone:
the same host, boot and pid namespace and its pid no longer alive, or the same Slurm job at an
earlier restart count (Slurm runs one incarnation of a job at a time). The new holder resumes
from the prompt's last checkpoint in its folder, so a rank's death costs at most its lease
time plus one checkpoint interval. A holder's `renew` tells it when it lost a prompt (the next
gen exists); it must then drop the prompt without writing anything. A holder whose own lease
ran out before it renewed (a long pause) re-takes it by creating the next gen, which succeeds
only if nobody else did.

Clocks: expiry compares wall clocks of different machines, which Slurm clusters keep in step
(NTP; Slurm's own credentials need it); ``skew_s`` absorbs the rest. On NFS choose
``lease_s`` well above the attribute-cache time (``acdirmax``, 60 s by default) so that a
renewal is visible to other clients long before the lease ends; the default is 5 minutes,
renewed every ``lease_s / 4`` at most (`renew` is a clock comparison otherwise, cheap enough to
call every step).

Shards: `shard_ids` splits a prompt list for ``--shard i/N`` (Slurm job arrays): prompt ``j`` of
the list goes to shard ``j mod N``, so N tasks cover the list exactly once and each gets an
even mix of the file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..atomic import pid_alive

log = logging.getLogger(__name__)

QUEUE_DIR = "queue"  # inside the batch folder
DEFAULT_LEASE_S = 300.0
DEFAULT_SKEW_S = 5.0
Kind = Literal["lease", "released", "done", "failed"]
KINDS: tuple[str, ...] = ("lease", "released", "done", "failed")
State = Literal["free", "held", "expired", "released", "done", "failed"]
FINISH_STATUSES: tuple[str, ...] = ("done", "failed", "pending")  # pending: released, resumable
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_RECORD = re.compile(r"(?P<id>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<gen>\d+)")


# ------------------------------------------------------------------------------------------
# shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N; ValueError naming the text otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise ValueError(f"--shard must look like i/N with whole numbers (e.g. 0/4), got {text!r}")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1:
        raise ValueError(f"--shard {text!r}: the number of shards N must be at least 1")
    if i >= n:
        raise ValueError(f"--shard {text!r}: the shard index i must be below N (0 <= i < {n}); job arrays count from 0")
    return i, n


def shard_ids(ids: Iterable[str], i: int, n: int) -> list[str]:
    """The ids of shard `i` of `n`: every n-th one starting at i, in the list's order. Over
    i = 0..n-1 the shards cover `ids` exactly once; the same list gives the same split on
    every machine (pass the de-duplicated prompt ids in file order)."""
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is not a shard: need 0 <= i < n")
    return [x for j, x in enumerate(ids) if j % n == i]


# ------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Holder:
    """Who holds or held a prompt. `boot` (boot id + pid namespace) is what makes a pid
    comparable: two processes are on the same machine and see the same pids only if both match."""

    rank: int
    host: str
    pid: int
    boot: str = ""
    job: str = ""  # Slurm job id ('' outside Slurm)
    restart: int = 0  # SLURM_RESTART_COUNT of that job


@dataclass(frozen=True)
class Record:
    """One record of a prompt's chain (``queue/<id>.<gen>``)."""

    id: str
    gen: int
    kind: str  # one of KINDS
    holder: Holder
    token: str  # the PromptQueue object that wrote it
    time: float  # written or last renewed (wall clock)
    expires: float = 0.0  # leases only
    info: dict[str, Any] = field(default_factory=dict)  # step (leases); outputs, error... (final)

    def to_json(self) -> str:
        h = self.holder
        return json.dumps({"id": self.id, "gen": self.gen, "kind": self.kind, "rank": h.rank, "host": h.host, "pid": h.pid,
                           "boot": h.boot, "job": h.job, "restart": h.restart, "token": self.token, "time": self.time,
                           "expires": self.expires, "info": self.info}, ensure_ascii=False)  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Record:
        d = json.loads(text)
        if d.get("kind") not in KINDS:
            raise ValueError(f"unknown record kind {d.get('kind')!r}")
        holder = Holder(int(d["rank"]), str(d["host"]), int(d["pid"]), str(d.get("boot", "")), str(d.get("job", "")),
                        int(d.get("restart", 0)))  # fmt: skip
        return cls(str(d["id"]), int(d["gen"]), d["kind"], holder, str(d.get("token", "")), float(d["time"]),
                   float(d.get("expires", 0.0)), dict(d.get("info") or {}))  # fmt: skip


@dataclass(frozen=True)
class PromptState:
    id: str
    state: str  # one of State
    record: Record | None  # the chain's last record (None when free, or unreadable)
    gen: int  # of that record; -1 when free


def queue_dir(out_dir: str | Path) -> Path:
    return Path(out_dir).expanduser() / QUEUE_DIR


def _record_path(qdir: Path, prompt_id: str, gen: int) -> Path:
    return qdir / f"{prompt_id}.{gen}"


def machine_id() -> str:
    """Boot id plus pid namespace: equal for two processes only when their pids are comparable
    ('' where unknown, which turns the dead-pid shortcut off)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


_links_work = True  # False after a filesystem refused a hard link


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists, atomically (see the module docstring).
    True if this call created it."""
    global _links_work
    data = text.encode()
    if _links_work:
        tmp = path.parent / f".new-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return os.stat(tmp).st_nlink == 2  # a lost reply to a LINK that did happen
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                    if os.stat(tmp).st_nlink == 2:
                        return True
                    raise
                log.info("'%s' has no hard links (%s); claims use O_CREAT|O_EXCL", path.parent, exc.strerror)
                _links_work = False
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _replace(path: Path, text: str) -> None:
    """Rewrite `path` through a temporary and a rename (a renewal: no fsync, a lost renewal only
    makes the lease look older)."""
    tmp = path.parent / f".renew-{uuid.uuid4().hex}"
    tmp.write_text(text)
    os.replace(tmp, path)


def _scan(qdir: Path) -> dict[str, int]:
    """The highest gen of every prompt's chain in `qdir` (one directory listing)."""
    gens: dict[str, int] = {}
    try:
        entries = os.listdir(qdir)
    except FileNotFoundError:
        return gens
    for name in entries:
        match = _RECORD.fullmatch(name)
        if match:
            pid, gen = match.group("id"), int(match.group("gen"))
            if gen > gens.get(pid, -1):
                gens[pid] = gen
    return gens


def _read(qdir: Path, prompt_id: str, gen: int) -> tuple[Record | None, float]:
    """(record, file mtime); record None when it cannot be read or parsed."""
    path = _record_path(qdir, prompt_id, gen)
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except OSError:  # ESTALE/ENOENT mid-rename on NFS: look again next time
        return None, time.time()
    try:
        return Record.from_json(text), mtime
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("queue record '%s' is unreadable (%s)", path, exc)
        return None, mtime


def _state_of(record: Record | None, mtime: float, now: float, lease_s: float, skew_s: float, me: Holder | None,
              retry_before: float | None) -> str:  # fmt: skip
    if record is None:  # unreadable: treat it as a lease written at its mtime
        return "expired" if now > mtime + lease_s + skew_s else "held"
    if record.kind == "done":
        return "done"
    if record.kind == "failed":
        return "released" if retry_before is not None and record.time < retry_before else "failed"
    if record.kind == "released":
        return "released"
    if now > record.expires + skew_s:
        return "expired"
    if me is not None and _certainly_gone(record.holder, me):
        return "expired"
    return "held"


def _certainly_gone(h: Holder, me: Holder) -> bool:
    """True only when the lease's holder cannot be running any more (see the module docstring)."""
    if h.job and h.job == me.job and h.restart < me.restart:
        return True
    return bool(h.boot) and h.boot == me.boot and h.host == me.host and h.pid != me.pid and not pid_alive(h.pid)


def read_states(out_dir: str | Path, ids: Iterable[str] | None = None, lease_s: float = DEFAULT_LEASE_S,
                skew_s: float = DEFAULT_SKEW_S, now: float | None = None) -> dict[str, PromptState]:  # fmt: skip
    """Where every prompt of `out_dir`'s queue stands (all ids found there when `ids` is None),
    for progress displays; read-only. "expired" here means by the clock only."""
    qdir = queue_dir(out_dir)
    gens = _scan(qdir)
    now = time.time() if now is None else now
    out: dict[str, PromptState] = {}
    for pid in list(ids) if ids is not None else sorted(gens):
        gen = gens.get(pid, -1)
        if gen < 0:
            out[pid] = PromptState(pid, "free", None, -1)
            continue
        record, mtime = _read(qdir, pid, gen)
        out[pid] = PromptState(pid, _state_of(record, mtime, now, lease_s, skew_s, None, None), record, gen)
    return out


# ------------------------------------------------------------------------------------------
# the queue


@dataclass
class _Claim:
    gen: int
    claimed: float
    expires: float
    info: dict[str, Any]
    previous: Record | None  # the record it took over from (None for a fresh claim)


class PromptQueue:
    """One rank's handle on the shared queue of `ids` in ``<out_dir>/queue/``.

    ``claim_next()`` takes the first claimable prompt (file order); ``renew()`` extends this
    rank's leases and says which it lost; ``finish(id, status, info)`` records ``done`` or
    ``failed`` (terminal) or ``pending`` (released, resumable from its checkpoint) and gives the
    lease up in the same atomic step. `clock` is the wall clock (tests pass their own)."""

    def __init__(self, out_dir: str | Path, ids: Iterable[str], lease_s: float = DEFAULT_LEASE_S, rank: int = 0,
                 host: str | None = None, *, job: str = "", restart: int = 0, skew_s: float = DEFAULT_SKEW_S,
                 renew_every_s: float | None = None, retry_failed: bool = False,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.ids = list(dict.fromkeys(ids))
        for pid in self.ids:
            if not isinstance(pid, str) or not _ID.fullmatch(pid):
                raise ValueError(f"prompt id {pid!r} cannot name a queue record (letters, digits, '-' and '_' only)")
        if not lease_s > 0:
            raise ValueError(f"--lease-s must be positive, got {lease_s}")
        if skew_s < 0:
            raise ValueError(f"clock skew allowance must be >= 0, got {skew_s}")
        self.out_dir = Path(out_dir).expanduser()
        self.dir = queue_dir(self.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lease_s = float(lease_s)
        self.skew_s = float(skew_s)
        self.renew_every_s = lease_s / 4 if renew_every_s is None else float(renew_every_s)
        self.clock = clock
        self.holder = Holder(int(rank), host or socket.gethostname(), os.getpid(), machine_id(), job, int(restart))
        self.token = uuid.uuid4().hex
        self.opened = clock()
        self.retry_before = self.opened if retry_failed else None
        self._held: dict[str, _Claim] = {}
        self._terminal: set[str] = set()  # seen done/failed: never read again
        self._final: dict[str, Record] = {}  # done/failed records read so far
        self._last_renew = time.monotonic()

    # ---- reading

    @property
    def held(self) -> list[str]:
        """Ids this rank holds now, in claim order."""
        return list(self._held)

    def previous_holder(self, prompt_id: str) -> Record | None:
        """The record a held prompt was taken over from: its last holder's lease (a takeover),
        a ``released`` record (a resume), or None (never claimed before)."""
        return self._held[prompt_id].previous

    def states(self) -> dict[str, PromptState]:
        """Where each of this queue's prompts stands (one listing, one read per started prompt)."""
        gens = _scan(self.dir)
        now = self.clock()
        out = {}
        for pid in self.ids:
            gen = gens.get(pid, -1)
            if gen < 0:
                out[pid] = PromptState(pid, "free", None, -1)
                continue
            record, mtime = self._read(pid, gen)
            state = _state_of(record, mtime, now, self.lease_s, self.skew_s, self.holder, self.retry_before)
            out[pid] = PromptState(pid, state, record, gen)
        return out

    def _read(self, pid: str, gen: int) -> tuple[Record | None, float]:
        """`_read`, remembering final records (they never change) so that polling a long
        batch reads only the prompts still in flight."""
        cached = self._final.get(pid)
        if cached is not None and cached.gen == gen:
            return cached, cached.time
        record, mtime = _read(self.dir, pid, gen)
        if record is not None and record.kind in ("done", "failed"):
            self._final[pid] = record
        return record, mtime

    def pending(self) -> list[str]:
        """Ids not finished yet (neither done nor failed), whoever holds them: the job is over
        for every rank when this is empty."""
        return [pid for pid, s in self.states().items() if s.state not in ("done", "failed")]

    def next_expiry(self, skip: Collection[str] = ()) -> float | None:
        """Seconds until the earliest lease held by someone else can be taken over (0 when one
        can now, None when no other lease is pending); prompts in `skip` do not count."""
        now = self.clock()
        waits = []
        for pid, s in self.states().items():
            if pid in self._held or pid in skip or s.state in ("done", "failed"):
                continue
            if s.state in ("free", "expired", "released"):
                return 0.0
            expires = s.record.expires if s.record is not None else now + self.lease_s
            waits.append(max(0.0, expires + self.skew_s - now))
        return min(waits) if waits else None

    # ---- claiming

    def claim_next(self, skip: Collection[str] = ()) -> str | None:
        """Claim the first prompt (in the ids' order, none of `skip`) that is free, released or
        whose lease expired; None when there is none right now (others may still hold some:
        see `pending` and `wait_claim`)."""
        gens = _scan(self.dir)
        for pid in self.ids:
            if pid in self._held or pid in self._terminal or pid in skip:
                continue
            if self._try_claim(pid, gens.get(pid, -1)):
                return pid
        return None

    def claim(self, prompt_id: str) -> bool:
        """Claim one given prompt if it is claimable now."""
        if prompt_id not in self.ids:
            raise ValueError(f"prompt id {prompt_id!r} is not in this queue")
        if prompt_id in self._held:
            return True
        return self._try_claim(prompt_id, _scan(self.dir).get(prompt_id, -1))

    def wait_claim(self, poll_s: float = 10.0, should_stop: Callable[[], bool] = lambda: False,
                   sleep: Callable[[float], None] = time.sleep, skip: Collection[str] = ()) -> str | None:  # fmt: skip
        """For an idle rank: claim the next prompt (none of `skip`), waiting while others hold
        the rest (one of them may die and its lease expire). None when no prompt is left to
        anyone but this rank (`skip` aside) or `should_stop()` says so."""
        while not should_stop():
            pid = self.claim_next(skip)
            if pid is not None:
                return pid
            wait = self.next_expiry(skip)
            if wait is None:
                return None
            sleep(min(poll_s, max(wait, 0.05)))
        return None

    def _try_claim(self, pid: str, gen: int) -> bool:
        previous = None
        if gen >= 0:
            previous, mtime = self._read(pid, gen)
            state = _state_of(previous, mtime, self.clock(), self.lease_s, self.skew_s, self.holder, self.retry_before)
            if state in ("done", "failed"):
                self._terminal.add(pid)
                return False
            if state == "held":
                return False
        now = self.clock()
        claim = _Claim(gen + 1, now, now + self.lease_s, {}, previous)
        if not _create_exclusive(_record_path(self.dir, pid, gen + 1), self._lease_json(pid, claim, now)):
            return False  # another rank was faster
        self._held[pid] = claim
        if previous is not None and previous.kind == "lease":
            h = previous.holder
            log.warning("took over prompt %s from rank %d on %s (pid %d), whose lease ran out or whose process is gone",
                        pid, h.rank, h.host, h.pid)  # fmt: skip
        return True

    def _lease_json(self, pid: str, claim: _Claim, now: float) -> str:
        return Record(pid, claim.gen, "lease", self.holder, self.token, now, claim.expires, claim.info).to_json()

    # ---- holding

    def renew(self, ids: Iterable[str] | None = None, info: dict[str, dict[str, Any]] | None = None,
              force: bool = False) -> list[str]:  # fmt: skip
        """Extend this rank's leases (all held, or `ids`) and return the ids it lost: another
        rank took them over or they were finished elsewhere. The caller drops a lost prompt
        without writing anything. `info` maps ids to small JSON-able dicts stored in the lease
        (e.g. ``{"step": 1200}``, shown by progress displays). Without `force` this is a clock
        comparison unless ``renew_every_s`` passed since the last renewal."""
        mono = time.monotonic()
        if not force and mono - self._last_renew < self.renew_every_s:
            if info:
                for pid, extra in info.items():
                    if pid in self._held:
                        self._held[pid].info.update(extra)
            return []
        self._last_renew = mono
        lost = []
        for pid in list(self._held) if ids is None else list(ids):
            claim = self._held.get(pid)
            if claim is None:
                lost.append(pid)
                continue
            if info and pid in info:
                claim.info.update(info[pid])
            if not self._renew_one(pid, claim):
                del self._held[pid]
                lost.append(pid)
        for pid in lost:
            log.warning("rank %d lost its lease on prompt %s (taken over or finished elsewhere)", self.holder.rank, pid)
        return lost

    def _renew_one(self, pid: str, claim: _Claim) -> bool:
        nxt = _record_path(self.dir, pid, claim.gen + 1)
        if os.path.lexists(nxt):
            return False
        now = self.clock()
        if now >= claim.expires - self.skew_s:  # ran out before this renewal: re-take it, if nobody did
            retake = _Claim(claim.gen + 1, claim.claimed, now + self.lease_s, claim.info, claim.previous)
            if not _create_exclusive(nxt, self._lease_json(pid, retake, now)):
                return False
            self._held[pid] = retake
            return True
        claim.expires = now + self.lease_s
        _replace(_record_path(self.dir, pid, claim.gen), self._lease_json(pid, claim, now))
        return not os.path.lexists(nxt)  # a taker that read the old expiry just before the rewrite

    def holds(self, prompt_id: str) -> bool:
        """Whether this rank still holds `prompt_id` (its next record does not exist). Check it
        before writing a prompt's final outputs."""
        claim = self._held.get(prompt_id)
        return claim is not None and not os.path.lexists(_record_path(self.dir, prompt_id, claim.gen + 1))

    def finish(self, prompt_id: str, status: str, info: dict[str, Any] | None = None) -> bool:
        """Record the end of this rank's work on a held prompt and give its lease up, in one
        atomic create: ``done`` (terminal), ``failed`` (terminal; `info` should carry the
        error) or ``pending`` (released: its checkpoint is written, anyone may resume it).
        False when the lease had been lost (nothing is recorded then)."""
        if status not in FINISH_STATUSES:
            raise ValueError(f"unknown finish status {status!r} (expected one of {', '.join(FINISH_STATUSES)})")
        claim = self._held.get(prompt_id)
        if claim is None:
            raise ValueError(f"prompt {prompt_id!r} is not held by rank {self.holder.rank}")
        kind = "released" if status == "pending" else status
        now = self.clock()
        record = Record(prompt_id, claim.gen + 1, kind, self.holder, self.token, now, 0.0, dict(info or {}))
        del self._held[prompt_id]
        if not _create_exclusive(_record_path(self.dir, prompt_id, claim.gen + 1), record.to_json()):
            log.warning("prompt %s: not recorded as %s by rank %d, whose lease was lost", prompt_id, status, self.holder.rank)
            return False
        if kind in ("done", "failed"):
            self._terminal.add(prompt_id)
        return True

    def release_all(self, info: dict[str, dict[str, Any]] | None = None) -> list[str]:
        """Release every held prompt as resumable (on a stop signal, after the checkpoints are
        written); returns the ids released."""
        return [pid for pid in self.held if self.finish(pid, "pending", (info or {}).get(pid))]
