"""nerfacc's kernels load once per process behind a flock beside their build folder: a torch lock
left by a killed build is removed, a build in progress is waited for, a first build is logged.
nerfacc's own import is replaced by a stand-in (no CUDA toolkit here): these tests cover only
this package's calling code."""

from __future__ import annotations

import fcntl
import logging
import threading
import time
import types

import pytest

from dreamfusion_trt.render import nerfacc_kernels as nk


@pytest.fixture
def build_dir(tmp_path, monkeypatch):
    folder = tmp_path / "py311_cu130" / nk.EXTENSION
    monkeypatch.setattr(nk, "build_directory", lambda: folder)
    monkeypatch.setattr(nk, "_loaded", False)
    imports = []

    def fake_import():
        imports.append(time.monotonic())
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{nk.EXTENSION}.so").write_bytes(b"")  # what a finished build leaves
        return types.SimpleNamespace(_C=object())

    monkeypatch.setattr(nk, "_import_backend", fake_import)
    return types.SimpleNamespace(path=folder, imports=imports)


def test_a_killed_builds_lock_is_removed_and_the_build_said(build_dir, caplog):
    build_dir.path.mkdir(parents=True)
    (build_dir.path / "lock").write_text("")  # torch's baton, its holder gone
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        nk.load_kernels()
    assert not (build_dir.path / "lock").exists() and len(build_dir.imports) == 1
    assert "left by a kernel build that was killed" in caplog.text
    assert "compiling its CUDA kernels" in caplog.text and "compiled in" in caplog.text
    nk.load_kernels()  # once per process
    assert len(build_dir.imports) == 1


def test_built_kernels_load_quietly(build_dir, caplog):
    build_dir.path.mkdir(parents=True)
    (build_dir.path / f"{nk.EXTENSION}.so").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        nk.load_kernels()
    assert "compiling" not in caplog.text and len(build_dir.imports) == 1


def test_a_build_in_progress_is_waited_for(build_dir, caplog):
    build_dir.path.parent.mkdir(parents=True)
    guard = open(build_dir.path.parent / f"{build_dir.path.name}.dreamfusion-trt.lock", "a+")
    fcntl.flock(guard, fcntl.LOCK_EX)  # another builder (a separate open file: flock excludes it too)
    released = []

    def release():
        time.sleep(0.3)
        released.append(time.monotonic())
        fcntl.flock(guard, fcntl.LOCK_UN)
        guard.close()

    threading.Thread(target=release).start()
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        nk.load_kernels()
    assert "waiting for it" in caplog.text
    assert build_dir.imports[0] >= released[0]  # loaded only after the other builder let go


def test_no_kernels_is_one_clear_error(build_dir, monkeypatch):
    monkeypatch.setattr(nk, "_import_backend", lambda: types.SimpleNamespace(_C=None))
    with pytest.raises(ValueError, match="no CUDA toolkit"):
        nk.load_kernels()
    assert nk._loaded is False
