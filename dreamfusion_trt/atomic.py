"""Write-then-rename, so a crash or Ctrl-C never leaves a half-written output or checkpoint.

Every file the tool writes goes through one temporary name beside its target,
``.<stem>.<pid>-<random>.tmp<suffix>`` (same suffix, so writers that pick a format by extension
still work), is flushed to disk, and is renamed over the target only when complete. A process
killed mid-write leaves only such a temporary; `clean_stale_temporaries` removes the ones whose
writer is gone. Operating-system errors while writing (a full disk, a read-only folder) become
one `WriteError` that names the file and, when known, how much space it needed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# Our temporaries: ".<stem>.<pid>-<random>.tmp<suffix>", and the form before the pid was added
# (".<stem>.<random>.tmp<suffix>", mkstemp's 8 random characters).
_OURS = re.compile(r"^\.(?P<stem>.+)\.(?:(?P<pid>\d+)-)?[A-Za-z0-9_]{8}\.tmp(?:\.[A-Za-z0-9]+)?$")
# What safetensors' own temp-and-rename (Rust `tempfile`) left in a run folder when an older
# version of this tool let it write checkpoints directly: ".tmp" and 6 random characters.
_SAFETENSORS_LEFTOVER = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


class WriteError(OSError, ValueError):
    """An output could not be written (disk full, read-only folder, ...). One line: which file,
    why, and for a full disk how much space was needed and how much is free. It is an OSError
    (``errno`` is kept) and a ValueError (the CLI's one-line error)."""

    def __init__(self, code: int | None, message: str, filename: str) -> None:
        super().__init__(code, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _describe(exc: OSError, path: Path, needed: int | None) -> WriteError:
    reason = exc.strerror or str(exc)
    msg = f"could not write '{path}': {reason}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path.parent)
        parts = []
        if needed is not None:
            parts.append(f"needed {_mb(needed)}")
        if free is not None:
            parts.append(f"{_mb(free)} free on that filesystem")
        if parts:
            msg += f" ({', '.join(parts)})"
        msg += "; free some space or pick another --out (the previous file is unchanged)"
    return WriteError(exc.errno, msg, str(path))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _temp_name(path: Path) -> tuple[int, Path]:
    """Create and open our temporary beside `path`: (fd, temp path)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}-", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file an ordinary file's mode
    return fd, Path(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not sync directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer to fill; once the block finishes it is
    flushed to disk and renamed over `path`. On any error the temporary is removed and `path`
    keeps its previous content; an OSError is raised as `WriteError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_path = _temp_name(path)
        os.close(fd)
    except OSError as exc:
        raise _describe(exc, path, None) from exc
    try:
        try:
            yield tmp_path
            _fsync_file(tmp_path)
            os.replace(tmp_path, path)
        except OSError as exc:
            if isinstance(exc, WriteError):
                raise
            size = tmp_path.stat().st_size if tmp_path.exists() else None
            raise _describe(exc, path, size) from exc
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` through our temporary and a rename (see the module docstring).
    Raises `WriteError` naming `path` and the bytes needed when the disk is full."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_name(path)
    except OSError as exc:
        raise _describe(exc, path, len(data)) from exc
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _describe(exc, path, len(data)) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_writable_dir(path: str | Path) -> None:
    """Fail early, without creating anything, if `path` cannot become a writable folder.
    Raises ValueError naming the folder and the reason."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"output folder '{path}' is not writable: '{probe}' is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output folder '{path}' is not writable (no write permission on '{probe}')")


def pid_alive(pid: int) -> bool:
    """True when a process with this pid runs on this machine (ours or another user's); a killed
    child nobody has reaped yet (a zombie) counts as gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def clean_stale_temporaries(folder: str | Path, min_age_s: float = 10.0, max_age_s: float = 3600.0) -> list[Path]:
    """Remove the temporaries our writers left in `folder` (not its subfolders) when they died.

    Only files of our own naming are touched (see the module docstring), and only when older than
    `min_age_s`: those tagged with a pid whose process is gone (on this host), those tagged with a
    live pid but older than `max_age_s` (a pid reused since), and untagged ones (older versions'
    naming). A run folder (one holding a checkpoint) also loses the ``.tmpXXXXXX`` files that
    safetensors' own temp-and-rename left there under older versions. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    is_run = (folder / "checkpoint.safetensors").exists() or (folder / "checkpoint.json").exists()
    removed: list[Path] = []
    for entry in folder.iterdir():
        name = entry.name
        m = _OURS.match(name)
        if m is None and not (is_run and _SAFETENSORS_LEFTOVER.match(name)):
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        if not entry.is_file() or entry.is_symlink():
            continue
        age = now - st.st_mtime
        if age < min_age_s:
            continue
        pid = m.group("pid") if m is not None else None
        if pid is not None and pid_alive(int(pid)) and age < max_age_s:
            continue
        try:
            entry.unlink()
        except OSError as exc:
            log.warning("could not remove the stale temporary '%s': %s", entry, exc)
            continue
        removed.append(entry)
    if removed:
        log.info("removed %d stale temporary file(s) in '%s' left by an interrupted write", len(removed), folder)
    return removed
