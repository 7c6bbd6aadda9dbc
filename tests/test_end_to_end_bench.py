"""`bench.end_to_end`: a real `generate` in a child process, its wall time split by phase."""

import json

import pytest
from tiny_sd import tiny_sd_paths  # noqa: F401, F811  (session fixture)

from dreamfusion_trt.bench.end_to_end import main, phase_times
from test_generate import FAST as GENERATE_FAST

FAST = [a for a in GENERATE_FAST if a != "--quiet"]  # the generate tests' tiny run


def test_phase_times_split_the_metrics_by_phase(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,phase,elapsed_s\n2,latent,1.0\n4,latent,2.0\n6,rgb,5.0\n8,rgb,8.0\n")
    t = phase_times(csv)
    assert (t["latent_s"], t["rgb_s"], t["train_s"]) == (2.0, 6.0, 8.0)
    assert (t["latent_iters"], t["rgb_iters"], t["latent_it_per_s"], t["rgb_it_per_s"]) == (4, 4, 2.0, pytest.approx(4 / 6))


def test_two_tiny_runs_are_timed_and_split(tmp_path, tiny_sd_paths):
    out = tmp_path / "e2e.json"
    code = main(["--runs", "2", "--out", str(out), "--", "a red cube", "--model", str(tiny_sd_paths.folder),
                 "--model.cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--iters", "4", *FAST])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 2
    for row in result["runs"]:
        assert row["latent_iters"] == 2 and row["rgb_iters"] == 2
        assert 0 < row["startup_s"] < row["wall_s"] and row["outputs_s"] > 0
        assert row["startup_s"] + row["train_s"] + row["outputs_s"] == pytest.approx(row["wall_s"])
        assert "model" in row["startup_stages"] and "mesh.glb" in row["files"]
        assert row["projected"]["iters"] == 10_000
    assert (tmp_path / "run-1" / "metrics.csv").is_file() and (tmp_path / "run-2" / "metrics.csv").is_file()


def test_a_failing_command_is_an_error_with_its_last_lines(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert main(["--runs", "1", "--out", str(out), "--", "a red cube", "--model", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "run"), "--device", "cpu"]) == 1  # fmt: skip
    assert "generate exited with" in capsys.readouterr().err
    assert "error" in json.loads(out.read_text())["runs"][0]
    with pytest.raises(SystemExit):
        main(["--", "a red cube"])  # no --out for the runs


def test_a_run_that_trained_but_lost_an_output_keeps_its_times_and_fails(tmp_path, tiny_sd_paths, capsys):
    # No surface at an iso-level the density never reaches: generate exits 1 after training, as
    # a random-weights scene does when SDS empties it. The phases are still measured.
    out = tmp_path / "e2e.json"
    code = main(["--runs", "1", "--out", str(out), "--", "a red cube", "--model", str(tiny_sd_paths.folder),
                 "--model.cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--iters", "4",
                 "--output.mesh_threshold", "1e30", *FAST])  # fmt: skip
    assert code == 1
    row = json.loads(out.read_text())["runs"][0]
    assert row["exit_code"] == 1 and "no surface" in row["error"]
    assert row["latent_iters"] == 2 and row["rgb_iters"] == 2 and row["outputs_s"] > 0
    assert "mesh.glb" not in row["files"] and "metrics.csv" in row["files"]
    assert "after training (times kept)" in capsys.readouterr().err
