"""`bench prior`: its run config (the prior's preset under the user's flags, through the batch API
and not the CLI) and the quick gate's verdict against a stored reference. No training here."""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
from pathlib import Path

import pytest

from dreamfusion_trt.bench import prior as bench_prior
from dreamfusion_trt.prior import WEIGHTS_DIR, weights_available
from dreamfusion_trt.prior.scenes import FACES, SIX_FACE_COLORS


def test_bench_prior_is_a_client_of_the_batch_api_not_of_the_cli():
    tree = ast.parse(Path(bench_prior.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "train.batch" in imported and "prior.score" in imported
    assert not any(m == "cli" or m.endswith(".cli") for m in imported)


@pytest.mark.skipif(not weights_available(), reason="the built-in prior's weights are not in the package")
def test_run_config_layers_the_users_flags_on_the_prior_preset(tmp_path):
    cfg = bench_prior.run_config("cpu", False, ["--sds.guidance_scale", "7", "--train.iters", "3"], tmp_path / "b")
    assert cfg.model.model == str(WEIGHTS_DIR)
    assert cfg.camera.render_size == 32  # the CPU preset
    assert cfg.field.bound == 0.6  # the preset
    assert cfg.sds.guidance_scale == 7.0 and cfg.train.iters == 3  # the user's flags win
    assert cfg.prompt.view_dependent is False and cfg.train.device == "cpu"
    assert cfg.output.out == str(tmp_path / "b")
    gpu = bench_prior.run_config("cuda", True, [], tmp_path / "g")
    assert gpu.camera.render_size == 64 and gpu.train.iters == 2000 and gpu.prompt.view_dependent is True
    with pytest.raises(ValueError, match="not understood: .--bogus 7."):
        bench_prior.parse_run_flags(["--bogus", "7"])
    with pytest.raises(ValueError, match="sds.guidance_scale"):
        bench_prior.run_config("cpu", True, ["--sds.guidance_scale", "lots"], tmp_path / "c")


def test_seeded_prompts_file_lists_every_object_per_seed(tmp_path):
    from dreamfusion_trt.train.prompts import read_prompts

    path = bench_prior.write_prompts(tmp_path / "p.jsonl", ["a red cube", "a blue torus"], [0, 3])
    specs, problems = read_prompts(path)
    assert not problems
    assert [(s.prompt, s.seed) for s in specs] == [("a red cube", 0), ("a red cube", 3), ("a blue torus", 0), ("a blue torus", 3)]
    plain, _ = read_prompts(bench_prior.write_prompts(tmp_path / "p.txt", ["a red cube"], None))
    assert [(s.prompt, s.seed) for s in plain] == [("a red cube", None)]


def _quick_result(device="cpu", ious=(0.5, 0.8, 0.45, 0.5), color=(0.2, 0.2, 0.15, 0.7), status="done"):
    rows = [{"object": o, "seed": 0, "status": status, "wall_s": 100.0, **{k: None for k in bench_prior.SCORE_KEYS},
             "iou": i, "color_error": c} for o, i, c in zip(bench_prior.QUICK_OBJECTS, ious, color)]  # fmt: skip
    block = {"batch_wall_s": 600.0, "rows": rows, "summary": bench_prior.summarize(rows)}
    return {"date": "2026-12-01T10:00:00+00:00", "machine": {"device": device}, "run_flags": [], "settings": {"on": block}}


def test_quick_verdict_against_the_reference_of_its_device_kind():
    ref = {"cpu": bench_prior.reference_entry(_quick_result())}
    json.dumps(ref)  # storable
    passed, line = bench_prior.verdict(_quick_result(device="cuda"), ref)
    assert passed is None and "no reference for this device yet" in line and "(cuda)" in line
    passed, line = bench_prior.verdict(_quick_result(), ref)
    assert passed is True and line.count("\n") == 0 and "PASS" in line
    # within tolerance: IoU 0.04 lower, colour 0.04 worse
    passed, _ = bench_prior.verdict(_quick_result(ious=(0.46, 0.76, 0.41, 0.46), color=(0.24, 0.24, 0.19, 0.74)), ref)
    assert passed is True
    passed, line = bench_prior.verdict(_quick_result(ious=(0.4, 0.7, 0.4, 0.4)), ref)
    assert passed is False and "median IoU" in line
    passed, line = bench_prior.verdict(_quick_result(color=(0.3, 0.3, 0.3, 0.7)), ref)
    assert passed is False and "colour error" in line
    # one object collapsing fails the gate even when the medians hold
    passed, line = bench_prior.verdict(_quick_result(ious=(0.5, 0.8, 0.1, 0.5)), ref)
    assert passed is False and "a blue torus collapsed" in line
    failed = _quick_result()
    failed["settings"]["on"]["rows"][0].update(status="failed", iou=None)
    passed, line = bench_prior.verdict(failed, ref)
    assert passed is False and "a red cube collapsed" in line


def test_quick_runs_its_own_subset_and_flags():
    args = argparse.Namespace(objects=None, seeds=None, view_dependent="on,off", concurrency=1, device="auto")
    quick, flags = bench_prior.quick_args(args, ["--sds.guidance_scale", "40"], "cuda:0")
    assert quick.objects.split(",") == list(bench_prior.QUICK_OBJECTS) and quick.seeds == "0"
    assert quick.view_dependent == "on" and quick.concurrency == len(bench_prior.QUICK_OBJECTS)
    assert flags[: len(bench_prior.QUICK_FLAGS["cuda"])] == list(bench_prior.QUICK_FLAGS["cuda"])
    assert flags[-2:] == ["--sds.guidance_scale", "40"]  # the user's flags last: they win
    colours = {o.split()[1] for o in bench_prior.QUICK_OBJECTS}
    assert {"red", "green", "blue", "six-colored"} <= colours
    with pytest.raises(ValueError, match="--quick runs its own"):
        bench_prior.quick_args(copy.copy(argparse.Namespace(**{**vars(args), "objects": "a red cube"})), [], "cpu")


def test_stored_references_are_valid():
    refs = bench_prior.load_references()
    assert set(refs) <= {"cpu", "cuda"}
    for kind, ref in refs.items():
        assert [r["object"] for r in ref["rows"]] == list(bench_prior.QUICK_OBJECTS), kind
        assert ref["summary"]["median_iou"] is not None and ref["tolerance"] == bench_prior.QUICK_TOLERANCE
        assert ref["run_flags"] == list(bench_prior.QUICK_FLAGS[kind]), kind  # recorded with the flags the gate runs


@pytest.mark.skipif(not weights_available(), reason="the built-in prior's weights are not in the package")
def test_stored_references_are_for_the_built_in_prior():
    fingerprint = bench_prior.prior_fingerprint([])
    assert fingerprint is not None and len(fingerprint) == 12
    for kind, ref in bench_prior.load_references().items():
        assert ref["prior"] == fingerprint, f"the {kind} quick reference is for another prior: record it again"


def test_a_reference_for_another_prior_gives_no_verdict(tmp_path):
    from dreamfusion_trt.sdmodel import folder_fingerprint

    folder = tmp_path / "prior_a"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "w.safetensors").write_bytes(b"weights one")
    first = bench_prior.prior_fingerprint(["--model.model", str(folder)])
    assert first == folder_fingerprint(folder)
    moved = folder.rename(tmp_path / "prior_b")  # the name and place do not enter it ...
    assert folder_fingerprint(moved) == first
    (moved / "unet" / "w.safetensors").write_bytes(b"weights two")  # ... any retrained file does
    assert folder_fingerprint(moved) != first
    assert bench_prior.prior_fingerprint(["--model.model", "some/hub-id"]) is None  # not a local folder

    ref = {"cpu": bench_prior.reference_entry({**_quick_result(), "prior": first})}
    passed, line = bench_prior.verdict({**_quick_result(), "prior": folder_fingerprint(moved)}, ref)
    assert passed is None and "no verdict" in line and first in line and "--write-reference" in line
    passed, _ = bench_prior.verdict({**_quick_result(), "prior": first}, ref)
    assert passed is True


def test_a_reference_recorded_with_other_presets_still_gives_its_verdict_and_says_so(tmp_path, monkeypatch):
    import dreamfusion_trt.prior as prior_pkg

    for name in (prior_pkg.PRESET_NAME, prior_pkg.PRESET_CPU_NAME):
        (tmp_path / name).write_text("sds:\n  guidance_scale: 50.0\n")
    monkeypatch.setattr(prior_pkg, "WEIGHTS_DIR", tmp_path)
    cpu, cuda = bench_prior.preset_fingerprint("cpu"), bench_prior.preset_fingerprint("cuda")
    assert len(cpu) == len(cuda) == 12 and cpu != cuda  # the CPU layers its own preset on top
    ref = {"cpu": bench_prior.reference_entry({**_quick_result(), "preset": cpu})}
    passed, line = bench_prior.verdict({**_quick_result(), "preset": cpu}, ref)
    assert passed is True and "other presets" not in line
    (tmp_path / prior_pkg.PRESET_CPU_NAME).write_text("sds:\n  guidance_scale: 7.5\n")
    changed = bench_prior.preset_fingerprint("cpu")
    assert changed != cpu and bench_prior.preset_fingerprint("cuda") == cuda  # the GPU preset did not change
    passed, line = bench_prior.verdict({**_quick_result(), "preset": changed}, ref)
    assert passed is True and f"recorded with other presets ({cpu}; this run's {changed}" in line
    (tmp_path / prior_pkg.PRESET_NAME).unlink()
    assert bench_prior.preset_fingerprint("cuda") is None


def test_preset_fingerprints_follow_the_merged_settings_not_the_files_text(tmp_path, monkeypatch):
    import dreamfusion_trt.prior as prior_pkg

    monkeypatch.setattr(prior_pkg, "WEIGHTS_DIR", tmp_path)
    gpu, cpu = tmp_path / prior_pkg.PRESET_NAME, tmp_path / prior_pkg.PRESET_CPU_NAME
    gpu.write_text("sds:\n  guidance_scale: 50.0\ntrain:\n  iters: 2000\n")
    cpu.write_text("sds:\n  guidance_scale: 7.5\ntrain:\n  iters: 400\n")
    first = bench_prior.preset_fingerprint("cpu")
    # The GPU preset takes the CPU's value: the CPU's merged settings are the same, the GPU's are not.
    cuda_before = bench_prior.preset_fingerprint("cuda")
    gpu.write_text("# a comment\ntrain:\n  iters: 2000\nsds:\n  guidance_scale: 7.5\n")
    assert bench_prior.preset_fingerprint("cpu") == first and bench_prior.preset_fingerprint("cuda") != cuda_before
    cpu.write_text("train:\n  iters: 400\n")  # the CPU entry that now repeats the GPU's value, dropped
    assert bench_prior.preset_fingerprint("cpu") == first
    cpu.write_text("train:\n  iters: 401\n")
    assert bench_prior.preset_fingerprint("cpu") != first


def test_a_preset_entry_that_states_the_default_does_not_change_the_fingerprint(tmp_path, monkeypatch):
    import dreamfusion_trt.prior as prior_pkg
    from dreamfusion_trt.config import RunConfig

    monkeypatch.setattr(prior_pkg, "WEIGHTS_DIR", tmp_path)
    gpu, cpu = tmp_path / prior_pkg.PRESET_NAME, tmp_path / prior_pkg.PRESET_CPU_NAME
    gpu.write_text("train:\n  iters: 2000\n")
    cpu.write_text("train:\n  iters: 400\n")
    first = {kind: bench_prior.preset_fingerprint(kind) for kind in ("cpu", "cuda")}
    default = RunConfig().camera.elevation_sampling
    gpu.write_text(f"train:\n  iters: 2000\ncamera:\n  elevation_sampling: {default}\n")
    assert {kind: bench_prior.preset_fingerprint(kind) for kind in ("cpu", "cuda")} == first
    other = "angle" if default == "sphere" else "sphere"
    gpu.write_text(f"train:\n  iters: 2000\ncamera:\n  elevation_sampling: {other}\n")
    assert bench_prior.preset_fingerprint("cuda") != first["cuda"] and bench_prior.preset_fingerprint("cpu") != first["cpu"]
    cpu.write_text(f"train:\n  iters: 400\ncamera:\n  elevation_sampling: {default}\n")  # the CPU sets it back
    assert bench_prior.preset_fingerprint("cpu") == first["cpu"]


@pytest.mark.skipif(not weights_available(), reason="the built-in prior's weights are not in the package")
def test_stored_references_name_the_presets_they_were_recorded_with():
    for kind, ref in bench_prior.load_references().items():
        assert ref.get("preset") == bench_prior.preset_fingerprint(kind), f"the {kind} quick reference is for other presets: record it again"


@pytest.mark.skipif(not weights_available(), reason="the built-in prior's weights are not in the package")
def test_run_flags_naming_a_model_replace_the_built_in_one(tmp_path):
    cfg = bench_prior.run_config("cpu", True, ["--model.model", str(tmp_path)], tmp_path / "b")
    assert cfg.model.model == str(tmp_path) and cfg.camera.render_size == 32  # the preset still applies


def test_the_commit_is_named_only_for_a_tree_git_tracks_or_when_given(tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setenv("DREAMFUSION_TRT_COMMIT", "abc1234")
    assert bench_prior.source_commit() == "abc1234"
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    # A copy of the package inside another checkout, untracked there (an exported snapshot): that
    # checkout's HEAD is not this code's commit.
    repo = tmp_path / "other"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env=env, capture_output=True)
    package = Path(bench_prior.__file__).resolve().parents[1]
    shutil.copytree(package, repo / "snap" / package.name, ignore=shutil.ignore_patterns("weights", "__pycache__"))
    env.pop("DREAMFUSION_TRT_COMMIT", None)
    code = "import dreamfusion_trt.bench.prior as p; print(p.__file__); print(p.source_commit())"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo / "snap", env={**env, "PYTHONPATH": str(repo / "snap")},
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert out[0].startswith(str(repo / "snap")) and out[1] == "None"


def test_volume_ratio_says_too_big_from_too_small_and_the_table_shows_it(tmp_path):
    # two runs with the same IoU-like error, one 20 % too big and one 15 % too small, and one
    # that left no mesh: the ratio tells them apart, and a missing mesh counts as neither
    result = _quick_result()
    rows = result["settings"]["on"]["rows"]
    for row, mesh in zip(rows, (0.36, 0.255, None, 0.3)):
        row.update(mesh_volume_fraction=mesh, true_volume_fraction=0.3)
    assert bench_prior.volume_ratio(rows[0]) == pytest.approx(1.2)
    assert bench_prior.volume_ratio(rows[1]) == pytest.approx(0.85)
    assert bench_prior.volume_ratio(rows[2]) is None
    summary = bench_prior.summarize(rows)
    assert summary["median_volume_ratio"] == pytest.approx(1.0)
    assert (summary["objects_too_big"], summary["objects_too_small"]) == (1, 1)

    # a file written before the ratio existed: the table fills it in from the rows
    old = copy.deepcopy(result)
    old["settings"]["on"]["summary"] = {k: v for k, v in summary.items()
                                        if k not in ("median_volume_ratio", "objects_too_big", "objects_too_small")}  # fmt: skip
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    md = bench_prior.table([str(path)])
    assert "volume ×" in md.splitlines()[0]
    red_cube = next(line for line in md.splitlines() if line.startswith("| a red cube |"))
    assert " / 1.20 / " in red_cube
    assert "| objects over 1.1× / under 0.9× the true volume | 1 / 1 |" in md
    assert " / 1.00 / " in next(line for line in md.splitlines() if line.startswith("| median |"))


def _result_file(path: Path, ious: dict[tuple[str, int], float], setting: str = "on") -> str:
    rows = [{"object": o, "seed": s, "status": "done", "wall_s": 100.0, **{k: None for k in bench_prior.SCORE_KEYS},
             "iou": i, "chamfer": 0.1 - i / 10} for (o, s), i in ious.items()]  # fmt: skip
    data = {"benchmark": "prior", "date": "2026-12-04T00:00:00+00:00", "machine": {"device": "cpu"}, "run_flags": [],
            "seeds": sorted({s for _, s in ious}), "settings": {setting: {"rows": rows, "summary": bench_prior.summarize(rows)}}}  # fmt: skip
    path.write_text(json.dumps(data))
    return str(path)


def test_sign_test_and_bootstrap_interval_are_exact_and_seeded():
    assert bench_prior.sign_test_p(8, 0) == pytest.approx(2 / 256)  # all 8 pairs one way
    assert bench_prior.sign_test_p(0, 8) == bench_prior.sign_test_p(8, 0)
    assert bench_prior.sign_test_p(4, 4) == 1.0 and bench_prior.sign_test_p(0, 0) == 1.0
    assert bench_prior.sign_test_p(9, 1) == pytest.approx(2 * 11 / 1024)
    deltas = [0.01, 0.03, -0.02, 0.05, 0.0, 0.02]
    low, high = bench_prior.bootstrap_mean_interval(deltas)
    assert low < sum(deltas) / len(deltas) < high and min(deltas) <= low and high <= max(deltas)
    assert bench_prior.bootstrap_mean_interval(deltas) == (low, high)  # seeded: the same files, the same interval
    assert bench_prior.bootstrap_mean_interval([0.02] * 5) == pytest.approx((0.02, 0.02))
    with pytest.raises(ValueError):
        bench_prior.bootstrap_mean_interval([])


def test_compare_pairs_runs_by_setting_object_and_seed_across_files(tmp_path):
    objects = ("a red cube", "a green sphere", "a blue torus", "a red cone")
    base_s1 = _result_file(tmp_path / "b1.json", {(o, 1): 0.6 for o in objects})
    base_s2 = _result_file(tmp_path / "b2.json", {(o, 2): 0.7 for o in objects})
    base_off = _result_file(tmp_path / "boff.json", {(o, 1): 0.5 for o in objects}, setting="off")
    # the new side: better on seed 1 in every object, worse on seed 2 in one, seed 3 only on this side
    new_s1 = _result_file(tmp_path / "n1.json", {(o, 1): 0.65 for o in objects})
    new_s2 = _result_file(tmp_path / "n2.json", {**{(o, 2): 0.7 for o in objects[:3]}, (objects[3], 2): 0.6, (objects[0], 3): 0.9})
    result = bench_prior.compare([base_s1, base_s2, base_off], [new_s1, new_s2])
    on = result["by_setting"]["on"]
    assert (on["pairs"], on["new_better"], on["new_worse"], on["ties"]) == (8, 4, 1, 3)
    assert on["mean_delta"] == pytest.approx((4 * 0.05 - 0.1) / 8)
    assert on["base_median"] == pytest.approx(0.65) and on["new_median"] == pytest.approx(0.65)  # 0.6, 0.65 x4, 0.7 x3
    assert on["sign_test_p"] == pytest.approx(bench_prior.sign_test_p(4, 1))
    assert list(result["by_setting"]) == ["on"]  # the off runs have no partner
    assert sorted(map(tuple, result["base_only"])) == [("off", o, 1) for o in sorted(objects)]
    assert result["new_only"] == [["on", "a red cube", 3]]
    # a metric where lower is better: the same runs' Chamfer fell, so the new side wins there too
    chamfer = bench_prior.compare([base_s1], [new_s1], metric="chamfer")["all"]
    assert chamfer["new_better"] == 4 and chamfer["mean_delta"] < 0
    md = bench_prior.compare_table(result)
    assert "| on, a red cone, seed 2 | 0.700 | 0.600 | -0.100 |" in md
    assert "new better in 4 of 8, worse in 1" in md and "sign test p = " in md
    assert "Not paired: 4 run(s) on the base side only, 1 on the new side only." in md


def test_compare_errors_name_the_problem(tmp_path):
    a = _result_file(tmp_path / "a.json", {("a red cube", 1): 0.6})
    twin = _result_file(tmp_path / "twin.json", {("a red cube", 1): 0.7})
    other = _result_file(tmp_path / "other.json", {("a red cube", 2): 0.7})
    with pytest.raises(ValueError, match="the base side has 'a red cube', seed 1, view-dependent on twice"):
        bench_prior.compare([a, twin], [other])
    with pytest.raises(ValueError, match="no run has 'iou' on both sides"):
        bench_prior.compare([a], [other])
    with pytest.raises(ValueError, match="--metric must be one of"):
        bench_prior.compare([a], [twin], metric="speed")
    (tmp_path / "not_prior.json").write_text(json.dumps({"benchmark": "train"}))
    with pytest.raises(ValueError, match="is not a 'bench prior' result file"):
        bench_prior.compare([str(tmp_path / "not_prior.json")], [a])


def test_compare_from_the_command_line_prints_the_paired_table(tmp_path, capsys):
    a = _result_file(tmp_path / "a.json", {("a red cube", 1): 0.6, ("a blue torus", 1): 0.4})
    b = _result_file(tmp_path / "b.json", {("a red cube", 1): 0.7, ("a blue torus", 1): 0.5})
    assert bench_prior.main(["--compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "| on, a blue torus, seed 1 | 0.400 | 0.500 | +0.100 |" in out
    assert "new better in 2 of 2, worse in 0" in out and "mean Δ +0.100" in out


def test_collect_keeps_each_runs_score_and_its_iou_at_every_level(tmp_path):
    run = tmp_path / "a-red-cube-0"
    run.mkdir()
    score = {"iou": 0.7, "best_iou": 0.8, "best_threshold": 2.5, "iou_by_threshold": {"2.5": 0.8, "10": 0.7},
             "mesh_volume_fraction": 0.25, "true_volume_fraction": 0.3, "unrelated": 1}  # fmt: skip
    (run / "score.json").write_text(json.dumps(score))
    (run / "trace.jsonl").write_text('{"step": 250, "field_iou": 0.4}\n{"step": 500, "field_iou": 0.6}\n')
    manifest = [{"prompt": "a red cube", "seed": 1, "status": "done", "wall_s": 9.0, "step": 5, "id": run.name,
                 "outputs": {"score": f"{run.name}/score.json"}},
                {"prompt": "a blue torus", "seed": 1, "status": "failed", "error": "out of memory", "id": "x"}]  # fmt: skip
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    done, failed = bench_prior.collect(tmp_path)
    assert done["iou_by_threshold"] == {"2.5": 0.8, "10": 0.7} and done["best_threshold"] == 2.5
    assert done["steps"] == 5 and done["folder"] == run.name and "unrelated" not in done
    assert failed["status"] == "failed" and failed["error"] == "out of memory" and failed["iou"] is None
    assert done["trace"] == [{"step": 250, "field_iou": 0.4}, {"step": 500, "field_iou": 0.6}] and "trace" not in failed


def test_compare_tries_a_mesh_level_on_the_same_files(tmp_path):
    # the runs' IoU at level 2.5 against their mesh IoU: better in two runs, worse in one; a row
    # written before iou_by_threshold was kept is left out of the pairs
    path = tmp_path / "r.json"
    _result_file(path, {("a red cube", 1): 0.6, ("a green sphere", 1): 0.8, ("a blue torus", 1): 0.4, ("a red cone", 1): 0.5})
    data = json.loads(path.read_text())
    for row, levels in zip(data["settings"]["on"]["rows"], ({"2.5": 0.7, "10": 0.6}, {"2.5": 0.9}, {"2.5": 0.3}, None)):
        row["iou_by_threshold"] = levels
    path.write_text(json.dumps(data))
    result = bench_prior.compare([str(path)], [str(path)], metric="iou", new_metric="iou@2.50")
    assert (result["all"]["pairs"], result["all"]["new_better"], result["all"]["new_worse"]) == (3, 2, 1)
    assert result["all"]["mean_delta"] == pytest.approx(0.1 / 3)
    assert "| base iou | new iou@2.50 |" in bench_prior.compare_table(result)
    assert bench_prior.compare([str(path)], [str(path)], metric="iou@10")["all"]["pairs"] == 1
    with pytest.raises(ValueError, match="iou@LEVEL needs a number"):
        bench_prior.compare([str(path)], [str(path)], metric="iou@high")
    with pytest.raises(ValueError, match="better in opposite directions"):
        bench_prior.compare([str(path)], [str(path)], metric="iou", new_metric="chamfer")


def test_traces_print_step_by_step_and_say_when_there_are_none(tmp_path, capsys):
    six = {"object": "a six-colored cube", "seed": 3, "iou": 0.61, "trace": [
        {"step": 250, "field_iou": 0.2, "best_iou": 0.5, "field_volume_ratio": 0.4, "opacity_on_object": 0.3,
         "opacity_off_object": 0.01, "albedo_error": 0.7, "albedo_face_colors": dict(zip(FACES, ["magenta"] * 6))},
        {"step": 500, "field_iou": 0.6, "best_iou": 0.7, "field_volume_ratio": 0.9, "opacity_on_object": 0.8,
         "opacity_off_object": 0.02, "albedo_error": 0.3, "albedo_face_colors": dict(zip(FACES, SIX_FACE_COLORS))}]}  # fmt: skip
    torus = {"object": "a red torus", "seed": 3, "iou": 0.4, "trace": [{"step": 250, "field_iou": 0.3, "hole_fill": 0.75}]}
    plain = {"object": "a red cube", "seed": 3, "iou": 0.8}
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"settings": {"on": {"rows": [six, torus, plain]}}}))
    assert bench_prior.main(["--traces", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a six-colored cube, seed 3, view-dep. on (final mesh IoU 0.610):" in out
    assert "| 250 | 0.200 / 0.500 | 0.40 | 0.30 / 0.01 | 0.700 | MMMMMM |" in out
    assert "| 500 | 0.600 / 0.700 | 0.90 | 0.80 / 0.02 | 0.300 | RGBYMC |" in out
    assert "| 250 | 0.300 / – | – | – / – | – | 0.75 |" in out and "a red cube" not in out
    path.write_text(json.dumps({"settings": {"on": {"rows": [plain]}}}))
    with pytest.raises(ValueError, match="kept a trace: run bench prior with -- --train.trace_every N"):
        bench_prior.main(["--traces", str(path)])
