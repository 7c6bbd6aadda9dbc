"""The built-in prior's known answer, end to end on the CPU: the README's main command with its
CPU settings (32x32 renders, 600 steps) must recover a cube, scored against the true one."""

from __future__ import annotations

import json

import pytest

from dreamfusion_trt.cli import main
from dreamfusion_trt.prior import weights_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not weights_available(), reason="the built-in prior's weights are not in the package"),
]


def test_short_cpu_run_recovers_a_cube(tmp_path):
    out = tmp_path / "cube"
    # Only the video is made smaller than the CPU preset's: it does not enter the score.
    rc = main(["generate", "a blue cube", "--out", str(out), "--device", "cpu", "--quiet",
               "--train.deterministic", "true", "--output.video_frames", "4"])  # fmt: skip
    assert rc == 0
    score = json.loads((out / "score.json").read_text())
    assert score["object"] == "a blue cube"
    assert score["iou"] >= 0.5, score
    assert score["chamfer"] < 0.1, score
    assert score["color_error"] < 0.35, score  # the albedo is blue, not the white background
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert ckpt["config"]["camera"]["render_size"] == 32  # the CPU settings were applied
