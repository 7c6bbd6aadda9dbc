import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from dreamfusion_trt import atomic
from dreamfusion_trt.atomic import (
    WriteError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_writable_dir,
    clean_stale_temporaries,
)


def test_written_file_gets_the_mode_of_an_ordinary_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
        plain = tmp_path / "plain.txt"
        plain.write_text("hello")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_failure_leaves_neither_the_file_nor_a_temporary(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_error_naming_the_file_and_the_space_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old content")

    def full_disk(fd, data):
        os.write(fd, bytes(data)[:3])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_all", full_disk)
    with pytest.raises(WriteError) as info:
        atomic_write_bytes(target, b"x" * 2_000_000)
    message = str(info.value)
    assert "\n" not in message and f"'{target}'" in message
    assert "No space left on device" in message and "needed 2.0 MB" in message and "free" in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, ValueError)  # the CLI's one line
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_error_inside_an_atomic_path_writer_becomes_a_write_error(tmp_path):
    target = tmp_path / "img.png"
    with pytest.raises(WriteError, match=r"could not write '.*img\.png': Read-only file system"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.EROFS, "Read-only file system")
    assert list(tmp_path.iterdir()) == []


def test_check_writable_dir(tmp_path):
    check_writable_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is created
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_writable_dir(tmp_path / "file" / "run")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ValueError, match="no write permission"):
                check_writable_dir(ro / "run")
        finally:
            ro.chmod(0o700)


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_clean_stale_temporaries_removes_only_dead_writers_leftovers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    (tmp_path / "checkpoint.safetensors").write_bytes(b"the real one")
    files = {
        f".checkpoint.{dead_pid}-abcd_123.tmp.safetensors": True,  # writer died
        ".checkpoint.q1w2e3r4.tmp.safetensors": True,  # older naming, no pid
        ".tmpAb12Cd": True,  # safetensors' own leftover in a run folder
        f".mesh.{os.getpid()}-zzzzzzzz.tmp.glb": False,  # this live process may still be writing it
        ".notes.txt": False,  # not our naming
        "mesh.tmp.glb": False,
        ".tmpAb12Cd7": False,  # seven characters: not that naming either
    }
    for name in files:
        (tmp_path / name).write_bytes(b"")
        _age(tmp_path / name, 120)
    fresh = tmp_path / f".validation.{dead_pid}-fresh123.tmp.png"
    fresh.write_bytes(b"")  # too young to judge
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, gone in files.items() if gone)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"checkpoint.safetensors", fresh.name} | {n for n, gone in files.items() if not gone}
    # A live pid's temporary older than max_age_s is a reused pid's: removed.
    assert [p.name for p in clean_stale_temporaries(tmp_path, max_age_s=60)] == [f".mesh.{os.getpid()}-zzzzzzzz.tmp.glb"]


def test_safetensors_style_leftovers_are_kept_outside_run_folders(tmp_path):
    (tmp_path / ".tmpAb12Cd").write_bytes(b"")
    _age(tmp_path / ".tmpAb12Cd", 120)
    assert clean_stale_temporaries(tmp_path) == []
    assert clean_stale_temporaries(tmp_path / "missing") == []


def test_temporaries_of_a_killed_writer_are_recognised(tmp_path):
    """kill -9 in the middle of an atomic write: the temporary it leaves is ours and is cleaned."""
    code = (
        "import sys, time\n"
        "from dreamfusion_trt.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half'); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "checkpoint.safetensors")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert clean_stale_temporaries(tmp_path, min_age_s=0) == []  # its writer is alive
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (left,) = list(tmp_path.iterdir())
    assert left.name.startswith(f".checkpoint.{proc.pid}-") and left.name.endswith(".tmp.safetensors")
    assert clean_stale_temporaries(tmp_path, min_age_s=0) == [left]
    assert list(tmp_path.iterdir()) == []
