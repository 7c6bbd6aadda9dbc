"""`train.trace_every`: a run's known-answer scores mid-training (`prior.score.trace_scores`) into
its ``trace.jsonl``, without changing what it trains."""

import json

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt import cli
from dreamfusion_trt.checkpoint import load_checkpoint
from dreamfusion_trt.config import FieldConfig, RenderConfig, from_dict
from dreamfusion_trt.field.background import Background
from dreamfusion_trt.prior.scenes import PALETTE, SIX_COLORED_CAPTION, SIX_FACE_COLORS, FACES, make_object
from dreamfusion_trt.prior.score import trace_scores
from dreamfusion_trt.render.renderer import Renderer
from dreamfusion_trt.train.monitor import TRACE_NAME, TraceLog

BOUND = 0.6


def _trace_of(field_caption: str, prompt: str) -> dict:
    """The trace row of a scene whose field is the analytic `field_caption`, for a run of `prompt`."""
    field = make_object(field_caption, bound=BOUND)
    renderer = Renderer(field, Background(FieldConfig(background="solid")), RenderConfig(backend="torch", num_samples=48), bound=BOUND)
    cfg = from_dict({"prompt": {"text": prompt}, "field": {"bound": BOUND}})
    return trace_scores(renderer, cfg)


def test_the_true_object_traces_as_right_and_a_wrong_one_as_wrong():
    six = _trace_of(SIX_COLORED_CAPTION, SIX_COLORED_CAPTION)
    # the analytic density's soft edge reaches the mesh level ~0.03 outside the surface: at level
    # 10 the cube reads 1.2x its volume on the 48^3 grid, and best at a higher level
    assert six["field_iou"] > 0.8 and six["best_iou"] >= six["field_iou"] and six["best_threshold"] > 10
    assert 1.1 < six["field_volume_ratio"] < 1.3 and six["opacity_on_object"] > 0.99
    assert six["albedo_error"] < 1e-4  # the field's own colours at the true surface
    assert six["albedo_face_share"] == 1.0 and six["albedo_face_colors"] == dict(zip(FACES, SIX_FACE_COLORS))
    for face, name in zip(FACES, SIX_FACE_COLORS):
        assert six["albedo_face_rgb"][face] == pytest.approx(PALETTE[name], abs=1e-3)
    assert "hole_fill" not in six

    # a blue cube where a red one belongs: the right shape, the wrong colour by |blue - red|
    blue = _trace_of("a blue cube", "a red cube")
    assert blue["field_iou"] == six["field_iou"]
    want = float(torch.tensor(PALETTE["blue"]).sub(torch.tensor(PALETTE["red"])).norm())
    assert blue["albedo_error"] == pytest.approx(want, abs=1e-4)
    # a one-colour cube has no face scores
    assert "albedo_face_share" not in blue

    # the torus with its hole open, and a cylinder (its hole filled) where the torus belongs
    torus = _trace_of("a red torus", "a red torus")
    disc = _trace_of("a red cylinder", "a red torus")
    assert torus["hole_fill"] < 0.2 and disc["hole_fill"] > 0.98  # the torus's: the soft edge's rim
    assert torus["field_iou"] > 0.6 > 0.3 > disc["field_iou"] and disc["field_volume_ratio"] > 2


def test_a_reopened_trace_keeps_one_history(tmp_path):
    log = TraceLog(tmp_path, 0)
    for step in (2, 4, 6):
        log.write({"step": step, "field_iou": step / 10})
    log.close()
    with (tmp_path / TRACE_NAME).open("a") as f:
        f.write('{"step": 8, "field_io')  # cut short by a crash
    log = TraceLog(tmp_path, 4)  # resumed from the step-4 checkpoint
    log.write({"step": 6, "field_iou": 0.0})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / TRACE_NAME).read_text().splitlines()]
    assert rows == [{"step": 2, "field_iou": 0.2}, {"step": 4, "field_iou": 0.4}, {"step": 6, "field_iou": 0.0}]
    TraceLog(tmp_path, 0).close()  # a new run starts a new trace
    assert (tmp_path / TRACE_NAME).read_text() == ""


BUILTIN_FAST = [
    "--iters", "4", "--render.albedo_iters", "2", "--camera.render_size", "16", "--render.num_samples", "8",
    "--output.video_frames", "2", "--output.video_size", "16", "--output.grid_views", "1",
    "--output.mesh_resolution", "24", "--train.log_every", "1", "--train.deterministic", "true", "--device", "cpu", "--quiet",
]  # fmt: skip


@pytest.fixture
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_traced_run_trains_bit_identically_and_traces_its_steps(tmp_path, _one_thread):
    runs = {}
    for name, extra in (("plain", []), ("traced", ["--train.trace_every", "2"])):
        out = tmp_path / name
        code = cli.main(["generate", "a blue cube", "--out", str(out), "--model.cache_dir", str(tmp_path / "cache"),
                         *BUILTIN_FAST, *extra])  # fmt: skip
        assert code == 0
        runs[name] = out
    assert not (runs["plain"] / TRACE_NAME).exists()
    a, b = load_checkpoint(runs["plain"]), load_checkpoint(runs["traced"])
    for key, value in a.model.items():
        torch.testing.assert_close(b.model[key], value, rtol=0, atol=0, msg=key)
    rows = [json.loads(line) for line in (runs["traced"] / TRACE_NAME).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert 0.0 <= r["field_iou"] <= r["best_iou"] <= 1.0 and 0.0 <= r["opacity_on_object"] <= 1.0
        assert r["albedo_error"] >= 0.0 and r["trace_s"] >= 0.0
    # the final row is the finished run's field: its field_iou is score.json's at the same grid size or close
    score = json.loads((runs["traced"] / "score.json").read_text())
    assert abs(rows[-1]["best_iou"] - score["best_iou"]) < 0.1


def test_tracing_needs_known_answers_and_a_step_count(tmp_path, tiny_sd_paths, capsys):
    out = tmp_path / "x"
    code = cli.main(["generate", "a red cube", "--model", str(tiny_sd_paths.folder), "--out", str(out),
                     "--train.trace_every", "2", "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.trace_every" in line and "known answers" in line
    assert not (out / "checkpoint.json").exists()
    code = cli.main(["generate", "a red cube", "--out", str(tmp_path / "y"), "--train.trace_every", "-1", "--device", "cpu", "--quiet"])
    assert code == 2
    assert "train.trace_every must be 0 (off) or a number of steps, got -1" in capsys.readouterr().err
