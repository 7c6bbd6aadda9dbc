import os
import stat

import pytest

from dreamfusion_trt.atomic import atomic_path, atomic_write_text


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
