"""`batch` writes a finished prompt's outputs on a worker thread while the others train: the same
checkpoints and statuses as writing them in the loop, training that goes on during a slow write,
a failing write retried from its checkpoint, and a stop during a write that a re-run completes."""

import json
import logging
import re
import threading

import pytest
from test_batch import OUTPUTS, _assert_same_checkpoint, _one_thread, _run, _write  # noqa: F401  (_one_thread: an autouse fixture)
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.checkpoint import load_checkpoint
from dreamfusion_trt.train import driver as driver_mod
from dreamfusion_trt.train import manifest as manifest_mod
from dreamfusion_trt.train import trainer as trainer_mod
from dreamfusion_trt.train.manifest import Manifest

LINES = [
    json.dumps({"prompt": "a red chair", "iters": 2}),
    json.dumps({"prompt": "a blue dog", "iters": 6}),
    json.dumps({"prompt": "a cat", "iters": 4}),
]


def _records(out):
    return {r.prompt: r for r in Manifest.load(out).records.values()}


def _steps(monkeypatch):
    """Counts the trainer's steps; `after` (a list) holds callbacks run after each step."""
    real_step, count = trainer_mod.Trainer.train_step, {"n": 0, "after": []}

    def counted(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        count["n"] += 1
        for hook in count["after"]:
            hook(count["n"])
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", counted)
    return count


@pytest.mark.slow
def test_background_writes_train_and_record_the_same_as_writes_in_the_loop(tmp_path, tiny_sd_paths):
    """Two slots, three prompts of different lengths (a refill, then a move to one slot): with
    and without background writes, every checkpoint is the same bit for bit, every manifest row
    has the same status, steps and outputs, and every output file is there."""
    prompts = _write(tmp_path / "prompts.jsonl", LINES)
    outs = {mode: tmp_path / f"background-{mode}" for mode in ("true", "false")}
    for mode, out in outs.items():
        args = ("--concurrency", "2", "--output.background_writes", mode)
        assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(out), *args) == 0
    background, inline = _records(outs["true"]), _records(outs["false"])
    assert set(background) == set(inline) == {"a red chair", "a blue dog", "a cat"}
    for prompt, a in background.items():
        b = inline[prompt]
        assert (a.status, a.step, a.attempts, a.outputs) == (b.status, b.step, b.attempts, b.outputs) == ("done", b.iters, 0, b.outputs)
        assert b.steps_during_outputs == 0 and a.outputs_s > 0 and b.outputs_s > 0
        for out in outs.values():
            assert all((out / a.id / name).is_file() for name in OUTPUTS), (prompt, out)
        _assert_same_checkpoint(load_checkpoint(outs["false"] / a.id), load_checkpoint(outs["true"] / a.id))


@pytest.mark.slow
def test_training_goes_on_while_a_prompts_outputs_are_written(tmp_path, tiny_sd_paths, monkeypatch, caplog):
    """The chair's write (on the worker thread) returns only after the others trained three more
    steps: a write that stalled the loop would time out. Its manifest row and log line say how
    many steps ran meanwhile; every manifest update happens on the main thread."""
    prompts = _write(tmp_path / "prompts.jsonl", [LINES[0], json.dumps({"prompt": "a blue dog", "iters": 9}), LINES[2]])
    out = tmp_path / "batch"
    steps = _steps(monkeypatch)
    advanced, seen = threading.Event(), {}
    steps["after"].append(lambda n: "from" in seen and n - seen["from"] >= 3 and advanced.set())
    real_write = driver_mod.write_outputs

    def slow_write(scene, cfg, folder, scorer):
        if cfg.prompt.text == "a red chair":
            seen["thread"] = threading.current_thread()
            seen["from"] = steps["n"]
            seen["advanced"] = advanced.wait(timeout=60)
        return real_write(scene, cfg, folder, scorer)

    real_update, updaters = manifest_mod.Manifest.update, set()

    def update(self, *args, **kwargs):
        updaters.add(threading.current_thread())
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(driver_mod, "write_outputs", slow_write)
    monkeypatch.setattr(manifest_mod.Manifest, "update", update)
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(out), "--concurrency", "2") == 0
    assert seen["advanced"] and seen["thread"] is not threading.main_thread()
    assert updaters == {threading.main_thread()}
    records = _records(out)
    assert all(r.status == "done" for r in records.values())
    chair = records["a red chair"]
    assert chair.steps_during_outputs >= 3 and chair.outputs_s > 0
    line = re.search(r"outputs of 'a red chair' written in [0-9.]+ s in the background; training ran (\d+) step\(s\) meanwhile", caplog.text)
    assert line and int(line[1]) == chair.steps_during_outputs
    assert all((out / chair.id / name).is_file() for name in OUTPUTS)


@pytest.mark.slow
def test_a_failing_write_is_retried_from_its_checkpoint_then_fails_alone(tmp_path, tiny_sd_paths, monkeypatch, caplog):
    prompts = _write(tmp_path / "prompts.jsonl", LINES)
    out = tmp_path / "batch"
    real_write, scenes = driver_mod.write_outputs, []

    def broken_for_the_dog(scene, cfg, folder, scorer):
        if cfg.prompt.text == "a blue dog":
            scenes.append(scene)
            raise OSError("disk full (simulated)")
        return real_write(scene, cfg, folder, scorer)

    monkeypatch.setattr(driver_mod, "write_outputs", broken_for_the_dog)
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt"):
        assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(out), "--concurrency", "2") == 1
    assert len(scenes) == 2 and scenes[0] is not scenes[1]  # the retry's scene is reloaded from the checkpoint
    assert "prompt 'a blue dog': outputs could not be written (disk full (simulated)); retrying from its checkpoint" in caplog.text
    records = _records(out)
    dog = records["a blue dog"]
    assert dog.status == "failed" and dog.error == "outputs could not be written: OSError: disk full (simulated)"
    assert load_checkpoint(out / dog.id).step == 6  # trained: --retry-failed can write it later
    for prompt in ("a red chair", "a cat"):
        assert records[prompt].status == "done"
        assert all((out / records[prompt].id / name).is_file() for name in OUTPUTS)


@pytest.mark.slow
def test_a_stop_during_a_write_finishes_it_and_the_rerun_writes_the_rest(tmp_path, tiny_sd_paths, monkeypatch, caplog):
    """Room for one scene: the chair is being written (slowly), the dog finished at the same step
    and waits as its checkpoint, the cat trains. Ctrl-C: the chair's outputs are finished before
    the exit code, the dog stays pending at its final checkpoint, the cat at its interrupt
    checkpoint. The re-run writes the dog's outputs without training it and finishes the cat."""
    lines = [json.dumps({"prompt": "a red chair", "iters": 2}), json.dumps({"prompt": "a blue dog", "iters": 2}),
             json.dumps({"prompt": "a cat", "iters": 6})]  # fmt: skip
    prompts = _write(tmp_path / "prompts.jsonl", lines)
    out = tmp_path / "batch"
    monkeypatch.setattr(driver_mod, "MAX_PENDING_WRITES", 1)
    steps = _steps(monkeypatch)
    writing, release = threading.Event(), threading.Event()
    real_write = driver_mod.write_outputs

    def slow_write(scene, cfg, folder, scorer):
        if cfg.prompt.text == "a red chair":
            writing.set()
            assert release.wait(timeout=60)
        return real_write(scene, cfg, folder, scorer)

    def stop_while_writing(n):
        if n == 3:  # the first step after the chair and the dog finished
            assert writing.wait(timeout=60)
            threading.Timer(0.5, release.set).start()  # the write ends while the driver is stopping
            raise KeyboardInterrupt

    steps["after"].append(stop_while_writing)
    monkeypatch.setattr(driver_mod, "write_outputs", slow_write)
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt"):
        assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(out), "--concurrency", "2") == 130
    assert "finishing the outputs of 1 prompt(s) before exiting" in caplog.text
    assert "1 finished prompt(s) wait for their outputs" in caplog.text
    records = _records(out)
    chair, dog, cat = records["a red chair"], records["a blue dog"], records["a cat"]
    assert chair.status == "done" and all((out / chair.id / name).is_file() for name in OUTPUTS)
    assert (dog.status, dog.step) == ("pending", 2) and not (out / dog.id / "mesh.glb").exists()
    assert cat.status == "pending" and 0 < cat.step < 6 and load_checkpoint(out / cat.id).step == cat.step
    dog_ckpt = (out / dog.id / "checkpoint.safetensors").stat().st_mtime_ns

    steps["after"].clear()
    monkeypatch.setattr(driver_mod, "write_outputs", real_write)
    assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(out)) == 0
    records = _records(out)
    assert all(r.status == "done" for r in records.values())
    for record in records.values():
        assert all((out / record.id / name).is_file() for name in OUTPUTS), record.prompt
    assert (out / dog.id / "checkpoint.safetensors").stat().st_mtime_ns == dog_ckpt  # written, not trained again
    assert load_checkpoint(out / cat.id).step == 6
