"""One run per output folder: a lock file the run holds while it writes there.

``with RunLock(folder): ...`` takes ``folder/.dreamfusion-trt.lock``: an exclusive `flock` on the
file (the kernel drops it when the process dies, however it dies) plus the owner's pid, host and
start time written inside, for the message the next process prints. A second process that asks
for the folder gets a ValueError naming the owner's pid and host. A lock left by a dead process
on this host is taken over (its flock went with it). A lock file naming another host is refused
unless its flock is free and `take_foreign` is set, since a pid on another machine cannot be
checked from here; the message says which file to delete if that run is gone.

The lock is per open file: two `RunLock`s on one folder in one process also exclude each other.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from .atomic import pid_alive

log = logging.getLogger(__name__)

LOCK_NAME = ".dreamfusion-trt.lock"


def _owner_text(info: dict) -> str:
    since = info.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{when}"


class RunLock:
    """Exclusive use of a run folder by this process; a context manager (or `acquire`/`release`).

    `folder` is created if needed. Raises ValueError (naming the owner's pid and host) when
    another live process holds it. `what` names the holder in the message ("generate", "batch").
    """

    def __init__(self, folder: str | Path, what: str = "run", take_foreign: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.take_foreign = take_foreign
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise ValueError(f"the lock on '{self.folder}' is already held by this RunLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only when the file was replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                info = self._read_owner()
                raise ValueError(
                    f"output folder '{self.folder}' is in use by another {info.get('what', 'run')} "
                    f"({_owner_text(info)}); wait for it to finish or pick another output folder"
                ) from None
            # The holder before us may have unlinked the file between our open and our flock:
            # then we hold a lock on a file nobody else sees. Open the current one instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                self._check_previous(fd)
                self._write_owner(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise ValueError(f"could not lock '{self.path}': it keeps being replaced by another process")

    def _check_previous(self, fd: int) -> None:
        info = self._read_owner(fd)
        if not info:
            return
        host, pid = info.get("host"), info.get("pid")
        if host == socket.gethostname():
            state = "is gone" if isinstance(pid, int) and not pid_alive(pid) else "no longer holds it"
            log.info("taking over the lock on '%s' from %s, which %s", self.folder, _owner_text(info), state)
            return
        if not self.take_foreign:
            raise ValueError(
                f"output folder '{self.folder}' was locked by {_owner_text(info)}, another machine, whose process "
                f"cannot be checked from here; if that run is gone, delete '{self.path}'"
            )
        log.warning("taking over the lock on '%s' from %s (another machine)", self.folder, _owner_text(info))

    def _read_owner(self, fd: int | None = None) -> dict:
        try:
            if fd is None:
                text = self.path.read_text()
            else:
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, 4096).decode()
            info = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _write_owner(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": self.what}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        """Give the folder back: the lock file is removed, then unlocked. Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self.path.unlink()
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:  # a lock forgotten without release still frees the folder
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
