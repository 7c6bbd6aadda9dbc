"""The run-folder lock: a second holder is refused with the owner's pid and host; a dead
holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from dreamfusion_trt.lock import LOCK_NAME, RunLock

HOLDER = (
    "import sys, time\n"
    "from dreamfusion_trt.lock import RunLock\n"
    "lock = RunLock(sys.argv[1], what='generate').acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def holder(tmp_path):
    """A subprocess holding the lock on tmp_path/run until killed."""
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield folder, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_second_holder_is_refused_with_the_owners_pid_and_host(holder):
    folder, proc = holder
    with pytest.raises(ValueError, match=rf"'{folder}' is in use by another generate \(pid {proc.pid} on {socket.gethostname()} since "):
        RunLock(folder).acquire()
    assert proc.poll() is None  # the owner is untouched


def test_lock_of_a_killed_process_is_taken_over(holder, caplog):
    folder, proc = holder
    proc.send_signal(signal.SIGKILL)  # kill -9: no chance to clean up
    proc.wait()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == proc.pid  # the file stays behind
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt.lock"):
        with RunLock(folder) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"from pid {proc.pid}" in caplog.text and "is gone" in caplog.text
    assert not (folder / LOCK_NAME).exists()  # released: removed


def test_two_locks_in_one_process_exclude_each_other_and_release_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path):
            with pytest.raises(ValueError, match=rf"pid {os.getpid()}"):
                RunLock(tmp_path).acquire()
            raise RuntimeError("the run failed")
    with RunLock(tmp_path):  # free again
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_lock_from_another_machine_is_refused_unless_asked(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "some-other-node", "since": 0}))
    with pytest.raises(ValueError, match=rf"locked by pid 4242 on some-other-node.*delete '.*{LOCK_NAME}'"):
        RunLock(tmp_path).acquire()
    lock = RunLock(tmp_path, take_foreign=True).acquire()
    assert lock.held
    lock.release()
    lock.release()  # twice is fine
