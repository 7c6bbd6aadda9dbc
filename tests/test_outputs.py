"""A finished run's outputs: each written on its own, in order, failures recorded, MP4 writers
falling back (imageio-ffmpeg -> OpenCV -> PyAV) with one clear error when none is installed."""

from __future__ import annotations

import json
import types
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from dreamfusion_trt.config import from_dict
from dreamfusion_trt.export import artifacts, media
from dreamfusion_trt.export.artifacts import RunOutputs, write_outputs
from dreamfusion_trt.export.media import NoVideoWriter, write_video
from dreamfusion_trt.scene import build_scene

TINY = {
    "field": {"num_levels": 2, "level_dim": 2, "log2_hashmap_size": 8, "base_resolution": 4, "max_resolution": 8,
              "hidden_dim": 8, "background": "solid", "backend": "torch"},
    "render": {"backend": "torch", "num_samples": 8, "grid_resolution": 4},
    "output": {"video_frames": 2, "video_size": 8, "grid_views": 2, "mesh_resolution": 12, "mesh_formats": ["glb"]},
}  # fmt: skip


@pytest.fixture
def scene():
    torch.manual_seed(0)
    cfg = from_dict(TINY)
    return build_scene(cfg), cfg


def _hide(monkeypatch, *modules: str) -> None:
    """Make `media._import` fail for `modules`, as on a machine without them."""
    real = media._import

    def fake(name):
        if name in modules:
            raise ImportError(f"No module named {name!r}")
        return real(name)

    monkeypatch.setattr(media, "_import", fake)


def _scorer(calls):
    def score(out_dir: Path) -> Path:
        calls.append(sorted(p.name for p in out_dir.iterdir()))  # what was on disk when scored
        path = out_dir / "score.json"
        path.write_text(json.dumps({"iou": 1.0}))
        return path

    return score


def test_all_outputs_in_order(scene, tmp_path):
    renderer, cfg = scene
    calls: list[list[str]] = []
    out = write_outputs(renderer, cfg, tmp_path, _scorer(calls))
    assert isinstance(out, RunOutputs) and out.failed == {}
    assert out.meshes == [tmp_path / "mesh.glb"] and out.grid == tmp_path / "validation.png"
    assert out.turntable == tmp_path / "turntable.mp4" and out.score == tmp_path / "score.json"
    assert calls == [["mesh.glb", "mesh_level.json"]]  # the mesh (and its level) first, then the score; grid and video afterwards
    assert all(p.is_file() for p in (*out.meshes, out.grid, out.turntable))


def test_missing_video_writer_loses_only_the_video(scene, tmp_path, monkeypatch, caplog):
    renderer, cfg = scene
    _hide(monkeypatch, "imageio_ffmpeg", "cv2", "av")
    calls: list[list[str]] = []
    out = write_outputs(renderer, cfg, tmp_path, _scorer(calls))
    assert set(out.failed) == {"turntable"} and out.turntable is None
    assert "pip install imageio-ffmpeg" in out.failed["turntable"]
    assert out.meshes and out.grid is not None and out.score is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.glb", "mesh_level.json", "score.json", "validation.png"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and r.message.startswith("turntable not written")]
    assert len(warnings) == 1


def test_no_surface_loses_the_mesh_and_its_score_only(scene, tmp_path):
    renderer, cfg = scene
    cfg.output.mesh_threshold = 1e9  # nowhere that dense
    calls: list[list[str]] = []
    out = write_outputs(renderer, cfg, tmp_path, _scorer(calls))
    assert set(out.failed) == {"mesh", "score"} and calls == []
    assert "no surface at threshold" in out.failed["mesh"] and "mesh" in out.failed["score"]
    assert out.meshes == [] and out.score is None
    assert out.grid.is_file() and out.turntable.is_file()


def test_a_failing_scorer_and_grid_do_not_stop_the_rest(scene, tmp_path, monkeypatch):
    renderer, cfg = scene

    def bad_scorer(out_dir):
        raise RuntimeError("scorer crashed")

    def bad_grids(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts, "write_grids", bad_grids)
    out = write_outputs(renderer, cfg, tmp_path, bad_scorer)
    assert out.failed == {"score": "scorer crashed", "grid": "[Errno 28] No space left on device"}
    assert out.meshes[0].is_file() and out.turntable.is_file() and out.grid is None


def test_turntable_and_grid_views_from_one_pass_equal_per_shading_renders(scene):
    renderer, cfg = scene
    renderer.eval()
    modes = list(artifacts.TURNTABLE_PANELS) + ["albedo"]
    light = (0.0, 0.0, 1.0)
    many = artifacts.render_views_shadings(renderer, cfg, 3, 8, modes, light_dir=light)
    for m in modes:
        single = artifacts.render_views(renderer, cfg, 3, 8, m, light_dir=light)  # [K, n, H, W, 3]
        assert many[m].shape == single.shape == (1, 3, 8, 8, 3)
        torch.testing.assert_close(many[m], single)


# ---------------------------------------------------------------------------------------------
# MP4 writers


def _frames(n=4, h=9, w=10):
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[..., 0] = np.arange(n)[:, None, None] * 40  # red grows frame by frame
    frames[..., 2] = 200
    return frames


class _FakeCV2(types.ModuleType):
    """Stands in for OpenCV: its build opens only 'mp4v', records BGR frames, writes a file."""

    def __init__(self):
        super().__init__("cv2")
        self.frames, self.opened = [], []

    @staticmethod
    def VideoWriter_fourcc(*chars):  # noqa: N802 -- OpenCV's name
        return "".join(chars)

    def VideoWriter(self, path, fourcc, fps, size):  # noqa: N802
        fake = self

        class Writer:
            def isOpened(self):  # noqa: N802
                fake.opened.append((fourcc, fps, size))
                return fourcc == "mp4v"

            def write(self, frame):
                fake.frames.append(frame.copy())

            def release(self):
                if fourcc == "mp4v":
                    Path(path).write_bytes(b"fake mp4")

        return Writer()


def test_falls_back_to_opencv_without_imageio_ffmpeg(tmp_path, monkeypatch):
    fake = _FakeCV2()
    _hide(monkeypatch, "imageio_ffmpeg")
    real = media._import
    monkeypatch.setattr(media, "_import", lambda name: fake if name == "cv2" else real(name))
    frames = _frames()
    path = write_video(frames, tmp_path / "t.mp4", fps=12)
    assert path.read_bytes() == b"fake mp4" and [p.name for p in tmp_path.iterdir()] == ["t.mp4"]
    assert [o[0] for o in fake.opened] == ["avc1", "mp4v"] and fake.opened[-1][1:] == (12.0, (10, 10))
    assert len(fake.frames) == 4 and fake.frames[0].shape == (10, 10, 3)  # padded to even sizes
    np.testing.assert_array_equal(fake.frames[2][:9, :, ::-1], frames[2])  # BGR, as OpenCV wants


def test_no_writer_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    _hide(monkeypatch, "imageio_ffmpeg", "cv2", "av")
    with pytest.raises(NoVideoWriter, match=r"no MP4 writer is available for '.*t\.mp4'.*install one: pip install imageio-ffmpeg \(or opencv-python-headless, or av\)"):
        write_video(_frames(), tmp_path / "t.mp4")
    assert list(tmp_path.iterdir()) == []


def _read(path):
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack(list(reader.iter_data()))
    finally:
        reader.close()


@pytest.mark.parametrize("writer, hidden", [("cv2", ("imageio_ffmpeg",)), ("av", ("imageio_ffmpeg", "cv2"))])
def test_real_fallback_writers_encode_the_frames(tmp_path, monkeypatch, writer, hidden):
    pytest.importorskip(writer)
    _hide(monkeypatch, *hidden)
    frames = np.repeat(np.repeat(_frames(n=6, h=8, w=8), 4, axis=1), 4, axis=2)  # [6, 32, 32, 3]
    path = write_video(frames, tmp_path / "t.mp4", fps=10)
    back = _read(path)  # read with imageio's ffmpeg, as a viewer would
    assert back.shape == frames.shape
    # lossy codecs: compare frame means (red ramps by 40 per frame), not pixels
    np.testing.assert_allclose(back[..., 0].mean(axis=(1, 2)), frames[..., 0].mean(axis=(1, 2)), atol=8)
