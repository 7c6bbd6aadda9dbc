"""End to end on CPU: the `generate`, `render` and `export-mesh` commands on a tiny SD model."""

import csv
import json
import os
import signal

import imageio.v2 as imageio
import pytest
import torch
import trimesh
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt import cli
from dreamfusion_trt.checkpoint import load_checkpoint
from dreamfusion_trt.train import trainer as trainer_mod

# A run small enough for two CPU cores: tiny field, few samples, a handful of steps.
FAST = [
    "--field.num_levels", "4", "--field.log2_hashmap_size", "12", "--field.max_resolution", "64",
    "--field.hidden_dim", "16", "--render.num_samples", "12", "--camera.render_size", "16",
    "--render.albedo_iters", "2", "--train.latent_fraction", "0.5", "--train.log_every", "1",
    "--output.video_frames", "4", "--output.video_size", "24", "--output.grid_views", "2",
    "--output.mesh_resolution", "32", "--device", "cpu", "--quiet",
]  # fmt: skip


def _generate(tmp_path, tiny, out, *extra):
    return cli.main(
        ["generate", "a red cube", "--model", str(tiny.folder), "--out", str(out),
         "--model.cache_dir", str(tmp_path / "cache"), *FAST, *extra]
    )  # fmt: skip


@pytest.mark.slow
def test_generate_writes_every_output(tmp_path, tiny_sd_paths, capsys):
    out = tmp_path / "run"
    assert _generate(tmp_path, tiny_sd_paths, out, "--iters", "6", "--output.mesh_formats", "glb,ply") == 0
    for name in ("checkpoint.safetensors", "checkpoint.json", "turntable.mp4", "validation.png", "mesh.glb", "mesh.ply", "metrics.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert [r["phase"] for r in rows] == ["latent"] * 3 + ["rgb"] * 3
    assert all(float(r["it_per_s"]) > 0 for r in rows)
    state = json.loads((out / "checkpoint.json").read_text())
    assert state["step"] == 6 and state["config"]["prompt"]["text"] == "a red cube"
    mesh = trimesh.load(out / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 0 and mesh.bounds.max() <= 1.0 + 1e-6
    reader = imageio.get_reader(out / "turntable.mp4", format="FFMPEG")
    frames = [frame for frame in reader]
    reader.close()
    assert len(frames) == 4 and frames[0].shape[1] >= 3 * 24  # three panels side by side
    assert not list(out.glob(".*tmp*"))

    # Reopen the run: relit grid without video, then a mesh in another format.
    assert cli.main(["render", str(out), "--light", "0,0,1", "--no-video", "--device", "cpu"]) == 0
    assert (out / "relit.png").is_file()
    other = tmp_path / "mesh_only"
    assert cli.main(["export-mesh", str(out / "checkpoint.safetensors"), "--out", str(other), "--formats", "obj", "--device", "cpu"]) == 0
    assert (other / "mesh.obj").is_file()
    assert json.loads((other / "mesh_level.json").read_text())["mode"] == "fixed"
    # ... and one cut at the level its renders show (the level file says which)
    assert cli.main(["export-mesh", str(out), "--out", str(other), "--formats", "obj", "--level", "opacity", "--device", "cpu"]) == 0
    assert json.loads((other / "mesh_level.json").read_text())["mode"] in ("opacity", "fixed")  # fixed: nothing opaque


@pytest.mark.slow
def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tmp_path, tiny_sd_paths, monkeypatch):
    straight = tmp_path / "straight"
    exact = ("--train.deterministic", "true")  # the resumed run reads it back from the checkpoint
    assert _generate(tmp_path, tiny_sd_paths, straight, "--iters", "6", "--train.ckpt_every", "0", *exact) == 0

    real_step = trainer_mod.Trainer.train_step

    def interrupt_at_4(self, *args, **kwargs):
        if self.slots[0].step == 4:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", interrupt_at_4)
    broken = tmp_path / "broken"
    assert _generate(tmp_path, tiny_sd_paths, broken, "--iters", "6", "--train.ckpt_every", "0", *exact) == 130
    assert load_checkpoint(broken).step == 4  # Ctrl-C left a resumable checkpoint
    assert not (broken / "mesh.glb").exists()
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real_step)
    assert cli.main(["generate", "--resume", "--out", str(broken), "--quiet", "--device", "cpu"]) == 0

    a, b = load_checkpoint(straight), load_checkpoint(broken)
    assert a.step == b.step == 6
    for key, value in a.model.items():
        torch.testing.assert_close(b.model[key], value, rtol=0, atol=0, msg=key)
    rows = list(csv.DictReader((broken / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "   "], "prompt is empty"),
        (["generate", "a red cube", "--iters", "0"], "--iters must be a positive number of iterations, got 0"),
        (["generate", "a red cube", "--iters", "-5"], "got -5"),
        (["generate", "a red cube", "--model", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
        (["generate", "a red cube", "--model", "/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
        (["generate", "a red cube", "--render.shading", "phong"], "render.shading: 'phong' is not one of"),
        (["render", "/nonexistent/run"], "checkpoint not found"),
        (["export-mesh", "/nonexistent/run"], "checkpoint not found"),
        (["render", "RUN", "--light", "0,0,0"], "--light must be a non-zero direction"),
        (["generate", "a red cube", "--device", "tpu"], "--device 'tpu' is not a device: use auto, cpu, cuda or cuda:N"),
        (["render", "RUN", "--size", "0"], "--size must be a positive number, got 0"),
        (["export-mesh", "RUN", "--out", "RUN/blocker/sub"], "is not writable: "),
        (["render", "RUN", "--out", "RUN/blocker/sub"], "is not writable: "),
    ],
)
def test_bad_input_gets_one_error_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    (tmp_path / "blocker").write_text("a file where a folder would go")
    args = [a.replace("RUN", str(tmp_path)) for a in args]
    code = cli.main([*args, "--out", str(out)] if args[0] == "generate" else args)
    assert code == 2
    line = _error(capsys)
    assert line.startswith("dreamfusion-trt: error: ") and message in line
    assert not out.exists()


def test_corrupt_checkpoint_and_unwritable_output(tmp_path, capsys, tiny_sd_paths):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    assert cli.main(["render", str(run)]) == 2
    assert "corrupt" in _error(capsys)
    assert cli.main(["generate", "--resume", "--out", str(run)]) == 2
    assert "corrupt" in _error(capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["generate", "a red cube", "--model", str(tiny_sd_paths.folder), "--out", str(blocker / "sub")]) == 2
    assert "is not writable" in _error(capsys)
    assert cli.main(["generate", "a red cube", "--out", str(run)]) == 2  # holds a run, no --resume
    assert "pass --resume" in _error(capsys)


@pytest.mark.gpu
def test_generate_on_gpu_with_nerfacc_and_fp16(tmp_path, tiny_sd_paths):
    """The CUDA path end to end: nerfacc occupancy grid, fp16 autocast with a grad scaler."""
    out = tmp_path / "gpu"
    args = [a if a != "cpu" else "cuda" for a in FAST]
    code = cli.main(
        ["generate", "a red cube", "--model", str(tiny_sd_paths.folder), "--out", str(out), "--iters", "40",
         "--model.cache_dir", str(tmp_path / "cache"), "--render.backend", "nerfacc", "--render.grid_update_every", "4",
         "--train.precision", "fp16", *args]
    )  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 40 and all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    ckpt = load_checkpoint(out)
    assert ckpt.state["scaler"]["scale"] > 0
    assert any(k.startswith("estimators.") for k in ckpt.model)  # occupancy grids are saved
    for name in ("turntable.mp4", "validation.png", "mesh.glb"):
        assert (out / name).is_file()


@pytest.mark.slow
def test_without_model_the_builtin_prior_is_used_with_its_preset(tmp_path):
    from dreamfusion_trt.prior import WEIGHTS_DIR

    out = tmp_path / "builtin"
    code = cli.main(
        ["generate", "a green sphere", "--out", str(out), "--iters", "2", "--camera.render_size", "16",
         "--render.num_samples", "8", "--output.video_frames", "2", "--output.video_size", "16",
         "--output.grid_views", "2", "--output.mesh_resolution", "24", "--model.cache_dir", str(tmp_path / "cache"),
         "--device", "cpu", "--quiet"]
    )  # fmt: skip
    assert code == 0
    cfg = load_checkpoint(out).config
    assert cfg.model.model == str(WEIGHTS_DIR)
    assert cfg.field.num_levels == 8 and cfg.train.encode_size == 64  # from the prior's preset
    assert cfg.camera.render_size == 16  # command-line flags still win over the preset


def test_builtin_prior_names_the_prompts_it_knows(tmp_path, capsys):
    assert cli.main(["generate", "a DSLR photo of a hamburger", "--out", str(tmp_path / "x")]) == 2
    line = _error(capsys)
    assert "is not one of the built-in prior's known objects" in line and "'a red cube'" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_image_space_sds_trains_with_inference_only_vae(tmp_path, tiny_sd_paths, monkeypatch):
    """sds.rgb_mode=image: the RGB phase goes through image-space SDS and the VAE encoder never
    runs with autograd on (so it may be an engine)."""
    from dreamfusion_trt.engines.eager import EagerImageEncoder
    from dreamfusion_trt.guidance import sds as sds_mod

    calls, encodes = [], []
    real, real_encode = sds_mod.image_sds, EagerImageEncoder.__call__

    def spy(images, *args, **kwargs):
        calls.append(images.shape)
        return real(images, *args, **kwargs)

    def recording_encode(self, images):
        encodes.append((torch.is_grad_enabled(), images.requires_grad))
        return real_encode(self, images)

    monkeypatch.setattr(sds_mod, "image_sds", spy)
    monkeypatch.setattr(EagerImageEncoder, "__call__", recording_encode)
    out = tmp_path / "image"
    assert _generate(tmp_path, tiny_sd_paths, out, "--iters", "4", "--sds.rgb_mode", "image") == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["phase"] for r in rows] == ["latent", "latent", "rgb", "rgb"]
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    assert len(calls) == 2 and calls[0][1] == 3  # the two RGB steps went through image-space SDS
    assert len(encodes) >= 2 and not any(grad or needs for grad, needs in encodes)  # no graph through the VAE
    assert (out / "mesh.glb").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 75)])
def test_sigterm_and_sigusr1_leave_a_resumable_checkpoint(tmp_path, tiny_sd_paths, monkeypatch, capsys, signum, code):
    """What Slurm, Kubernetes and `timeout` send before they kill: the step in flight finishes,
    the checkpoint is written, the exit code says which signal, and --resume finishes the run."""
    real_step = trainer_mod.Trainer.train_step

    def signal_at_3(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        if self.slots[0].step == 3:
            os.kill(os.getpid(), signum)  # delivered to the handler right here, between two steps

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", signal_at_3)
    out = tmp_path / "run"
    assert _generate(tmp_path, tiny_sd_paths, out, "--iters", "6", "--train.ckpt_every", "1000") == code
    assert f"stopped by {signal.Signals(signum).name}" in capsys.readouterr().err
    assert load_checkpoint(out).step == 3 and not (out / "mesh.glb").exists()
    assert not list(out.glob(".*tmp*"))  # nothing half-written
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real_step)
    assert cli.main(["generate", "--resume", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert load_checkpoint(out).step == 6 and (out / "mesh.glb").is_file()
    assert signal.getsignal(signum) is signal.SIG_DFL  # the handler is gone once training ends


def test_resume_past_the_last_iteration_is_refused(tmp_path, tiny_sd_paths, capsys):
    out = tmp_path / "run"
    assert _generate(tmp_path, tiny_sd_paths, out, "--iters", "2") == 0
    assert cli.main(["generate", "--resume", "--out", str(out), "--iters", "1", "--device", "cpu", "--quiet"]) == 2
    assert "at step 2, past --iters 1" in _error(capsys)


def test_a_second_run_on_a_held_folder_refuses_and_names_the_owner(tmp_path, tiny_sd_paths, capsys):
    from dreamfusion_trt.lock import RunLock

    out = tmp_path / "run"
    with RunLock(out, what="generate"):  # as another live `generate` holds it
        assert _generate(tmp_path, tiny_sd_paths, out, "--iters", "2") == 2
        line = _error(capsys)
        assert f"pid {os.getpid()}" in line, line
        assert not (out / "checkpoint.safetensors").exists()
    assert _generate(tmp_path, tiny_sd_paths, out, "--iters", "2") == 0  # free again: the run goes ahead


def test_stale_temporaries_of_a_killed_write_are_removed_on_start(tmp_path, tiny_sd_paths):
    out = tmp_path / "run"
    assert _generate(tmp_path, tiny_sd_paths, out, "--iters", "2", "--train.ckpt_every", "1") == 0
    leftovers = [out / ".checkpoint.999999-Xy12ab34.tmp.safetensors", out / ".tmpab12cd"]
    for p in leftovers:
        p.write_bytes(b"")
        os.utime(p, (0, 0))  # old: its writer is long gone
    assert cli.main(["generate", "--resume", "--out", str(out), "--iters", "3", "--quiet", "--device", "cpu"]) == 0
    assert not any(p.exists() for p in leftovers)


def test_a_missing_video_writer_loses_nothing_else(tmp_path, tiny_sd_paths, monkeypatch, capsys):
    """No MP4 writer (the H200 image has no ffmpeg): the checkpoint, mesh, grid and metrics are
    written, the run says what was not and exits non-zero only after that."""
    from dreamfusion_trt.export import media

    def no_writer(*args, **kwargs):
        raise media.NoVideoWriter("no MP4 writer is installed: pip install imageio-ffmpeg (simulated)")

    monkeypatch.setattr(media, "write_video", no_writer)
    monkeypatch.setattr("dreamfusion_trt.export.artifacts.write_video", no_writer, raising=False)
    out = tmp_path / "run"
    assert _generate(tmp_path, tiny_sd_paths, out, "--iters", "2") == 1
    assert "not written: turntable" in capsys.readouterr().err
    for name in ("checkpoint.safetensors", "mesh.glb", "validation.png", "metrics.csv"):
        assert (out / name).is_file(), name
    assert not (out / "turntable.mp4").exists()
    assert cli.main(["render", str(out), "--no-video", "--device", "cpu"]) == 0  # the grid can be redone later


@pytest.mark.slow
def test_kill_9_then_resume_loses_at_most_one_checkpoint_interval(tmp_path, tiny_sd_paths):
    """A run killed with SIGKILL (no handler runs) resumes from its last checkpoint and, with
    train.deterministic, ends at the same parameters as a run that was never interrupted."""
    args = ["generate", "a red cube", "--model", str(tiny_sd_paths.folder), "--model.cache_dir", str(tmp_path / "cache"),
            *FAST, "--iters", "40", "--train.ckpt_every", "2", "--train.deterministic", "true"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed run's child uses one thread: the same reductions everywhere
    try:
        _kill_9_then_resume(tmp_path, args)
    finally:
        torch.set_num_threads(threads)


def _kill_9_then_resume(tmp_path, args):
    import subprocess
    import sys
    import time

    straight = tmp_path / "straight"
    assert cli.main([*args, "--out", str(straight)]) == 0
    killed = tmp_path / "killed"
    code = "import sys, torch; torch.set_num_threads(1); from dreamfusion_trt import cli; sys.exit(cli.main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--out", str(killed)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((killed / "checkpoint.json").read_text())["step"] >= 6:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()  # SIGKILL: no checkpoint on the way out
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = load_checkpoint(killed).step
    rows = [int(r["step"]) for r in csv.DictReader((killed / "metrics.csv").open())]
    assert 6 <= at_kill < 40 and max(rows, default=0) - at_kill < 2 + 1  # lost at most one interval (2 steps)
    assert cli.main(["generate", "--resume", "--out", str(killed), "--quiet", "--device", "cpu"]) == 0
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert a.step == b.step == 40
    for key, value in a.model.items():
        torch.testing.assert_close(b.model[key], value, rtol=0, atol=0, msg=key)


def test_start_up_is_logged_per_stage(tmp_path, tiny_sd_paths, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        assert _generate(tmp_path, tiny_sd_paths, tmp_path / "run", "--iters", "2") == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up: "))
    for stage in ("model", "prompts", "noise predictor", "colour map and RGB encoder", "trainer"):
        assert f"{stage} " in line, line
    assert line.endswith(" s in all)")
