"""`batch`: K prompts trained together equal each trained alone; slots refill; the manifest
and re-runs; a failing prompt is isolated; prompt files and folder names; the train benchmark."""

import csv
import json
import logging
import re

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt import cli
from dreamfusion_trt.checkpoint import load_checkpoint
from dreamfusion_trt.config import from_dict
from dreamfusion_trt.export.artifacts import RunOutputs
from dreamfusion_trt.engines.eager import EagerImageEncoder
from dreamfusion_trt.guidance.sds import SDSGuidance
from dreamfusion_trt.train import batch as batch_mod
from dreamfusion_trt.train import driver as driver_mod
from dreamfusion_trt.train import frozen as frozen_mod
from dreamfusion_trt.train import plan as plan_mod
from dreamfusion_trt.train import trainer as trainer_mod
from dreamfusion_trt.train.manifest import Manifest
from dreamfusion_trt.train.prompts import prompt_folder, prompt_id, read_prompts

FAST = [
    "--field.num_levels", "4", "--field.log2_hashmap_size", "12", "--field.max_resolution", "64",
    "--field.hidden_dim", "16", "--render.num_samples", "12", "--camera.render_size", "8",
    "--render.albedo_iters", "2", "--train.latent_fraction", "0.5", "--train.log_every", "1",
    "--output.video_frames", "2", "--output.video_size", "16", "--output.grid_views", "1",
    "--output.mesh_resolution", "16", "--device", "cpu", "--quiet",
]  # fmt: skip
OUTPUTS = ("checkpoint.safetensors", "checkpoint.json", "turntable.mp4", "validation.png", "mesh.glb", "metrics.csv")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the same reduction order in every run (and no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def per_sample_networks(monkeypatch):
    """UNet and VAE encoder evaluated one sample at a time, so a prompt's numbers do not depend
    on how many others share the call (batched convolutions round differently per batch size);
    what is left to compare is the trainer's own bookkeeping, which must match exactly."""
    real_make = frozen_mod.make_predictor

    class PerSamplePredictor:
        def __init__(self, inner):
            self.inner, self.name = inner, f"per-sample {inner.name}"

        def __call__(self, x, t, emb):
            return torch.cat([self.inner(x[i : i + 1], t[i : i + 1], emb[i : i + 1]).clone() for i in range(len(x))])

    class PerSampleEncoder(EagerImageEncoder):
        def __call__(self, images):
            return torch.cat([super(PerSampleEncoder, self).__call__(images[i : i + 1]) for i in range(len(images))])

    monkeypatch.setattr(frozen_mod, "make_predictor", lambda *a, **kw: PerSamplePredictor(real_make(*a, **kw)))
    monkeypatch.setattr(frozen_mod, "EagerImageEncoder", PerSampleEncoder)


def _poison_loss(monkeypatch, prompt):
    """From now on the SDS loss of `prompt` is NaN in every step it trains in (the other slots'
    losses untouched). Returns the real `SDSGuidance.__call__`, to undo it."""
    real_sds, real_step = SDSGuidance.__call__, trainer_mod.Trainer.train_step
    poisoned = {}

    def remember_slots(self, *args, **kwargs):
        poisoned["now"] = [s is not None and s.cfg.prompt.text == prompt for s in self.slots]
        return real_step(self, *args, **kwargs)

    def nan_for_prompt(self, *args):
        loss = real_sds(self, *args)
        return torch.where(torch.tensor(poisoned["now"]), torch.full_like(loss, float("nan")), loss)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", remember_slots)
    monkeypatch.setattr(SDSGuidance, "__call__", nan_for_prompt)
    return real_sds


def _run(tmp_path, tiny, *args, extra=()):
    return cli.main([*args, "--model", str(tiny.folder), "--model.cache_dir", str(tmp_path / "cache"), *FAST, *extra])


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _folders(out):
    return {p.name: p for p in out.iterdir() if p.is_dir()}


def _assert_same_checkpoint(a, b, atol=0.0):
    assert a.step == b.step
    assert a.model.keys() == b.model.keys()
    for key, value in a.model.items():
        torch.testing.assert_close(b.model[key], value, rtol=0, atol=atol, msg=key)
    if atol == 0.0:
        for i, state in a.optimizer["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(b.optimizer["state"][i][name], value, rtol=0, atol=0, msg=f"optim {i} {name}")
        for name in ("cpu_gen", "dev_gen"):
            assert torch.equal(a.rng[name], b.rng[name]), name


PROMPTS_JSONL = [
    json.dumps({"prompt": "a red chair", "iters": 4}),
    json.dumps({"prompt": "a blue dog", "iters": 6, "seed": 3}),
    json.dumps({"prompt": "a cat", "iters": 5, "negative": "blurry"}),
]
ALONE_ARGS = {  # the same prompts through `generate`
    "a red chair": ["--iters", "4"],
    "a blue dog": ["--iters", "6", "--seed", "3"],
    "a cat": ["--iters", "5", "--negative", "blurry"],
}


@pytest.mark.slow
def test_prompts_trained_together_equal_each_trained_alone(tmp_path, tiny_sd_paths, per_sample_networks, caplog, monkeypatch):
    """Three prompts of different lengths on two slots: the phases mix within a step, the first
    slot to finish is refilled, the last prompt moves to a one-slot trainer; every checkpoint
    equals `generate` of that prompt alone, bit for bit. (Both phases render 8x8 here, as both
    render 64x64 with SD's defaults; other sizes pad the smaller renders, next test.)"""
    prompts = _write(tmp_path / "prompts.jsonl", PROMPTS_JSONL)
    out = tmp_path / "batch"
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(out), "--concurrency", "2") == 0
    assert "continuing with 1 slots instead of 2" in caplog.text
    folders = _folders(out)
    assert len(folders) == 3
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done"] * 3 and [r["line"] for r in records] == [1, 2, 3]
    for record in records:
        folder = out / record["id"]
        for name in OUTPUTS:
            assert (folder / name).is_file(), (record["prompt"], name)
        assert record["outputs"]["checkpoint"] == f"{record['id']}/checkpoint.safetensors"
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows] == list(range(1, record["iters"] + 1))
        assert record["step"] == record["iters"] and record["wall_s"] > 0

    # Each prompt alone through `generate`; only its checkpoint is compared, so no media is written.
    def checkpoint_only(scene, cfg, folder, scorer):
        return RunOutputs(folder, folder / "checkpoint.safetensors", None, None, [], folder / "metrics.csv")

    monkeypatch.setattr(driver_mod, "write_outputs", checkpoint_only)
    for record in records:
        alone = tmp_path / f"alone-{record['id']}"
        assert _run(tmp_path, tiny_sd_paths, "generate", record["prompt"], "--out", str(alone), *ALONE_ARGS[record["prompt"]]) == 0
        together = load_checkpoint(out / record["id"])
        assert together.config.prompt.text == record["prompt"] and together.state["num_prompts"] == 1
        _assert_same_checkpoint(load_checkpoint(alone), together)

    # A batch folder is a generate folder: the other commands open it.
    chair = next(out / r["id"] for r in records if r["prompt"] == "a red chair")
    assert cli.main(["export-mesh", str(chair), "--out", str(tmp_path / "mesh"), "--formats", "obj", "--resolution", "16", "--device", "cpu"]) == 0
    assert (tmp_path / "mesh" / "mesh.obj").is_file()


@pytest.mark.slow
def test_batched_networks_stay_within_float_tolerance_of_per_sample_runs(tmp_path, tiny_sd_paths, monkeypatch):
    """The real (batched) UNet and VAE encoder, and RGB renders (16x16) larger than latent
    renders (8x8, padded in mixed steps): same parameters as one prompt at a time, up to the
    rounding of batched convolutions and of matmuls over padded rays."""
    prompts = _write(tmp_path / "prompts.jsonl", PROMPTS_JSONL[:2])
    batched, alone = tmp_path / "batched", tmp_path / "alone"
    sizes = ("--camera.render_size", "16")
    assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(batched), "--concurrency", "2", extra=sizes) == 0
    assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(alone), "--concurrency", "1", extra=sizes) == 0
    for name in _folders(batched):
        # Adam moves each weight by ~lr = 1e-2 per step: a slot mix-up would show at that scale.
        _assert_same_checkpoint(load_checkpoint(alone / name), load_checkpoint(batched / name), atol=5e-3)


@pytest.mark.slow
def test_interrupted_batch_resumes_and_skips_finished_prompts(tmp_path, tiny_sd_paths, monkeypatch, capsys):
    lines = [json.dumps({"prompt": "a red chair", "iters": 2}), json.dumps({"prompt": "a blue dog", "iters": 5}),
             json.dumps({"prompt": "a cat", "iters": 4})]  # fmt: skip
    prompts = _write(tmp_path / "prompts.jsonl", lines)
    out = tmp_path / "batch"
    real_step = trainer_mod.Trainer.train_step
    calls = {"n": 0}

    def interrupt_at_5th(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", interrupt_at_5th)
    assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(out), "--concurrency", "2") == 130
    manifest = {r.prompt: r for r in Manifest.load(out).records.values()}
    assert manifest["a red chair"].status == "done"
    assert (manifest["a blue dog"].status, manifest["a blue dog"].step) == ("pending", 4)
    assert (manifest["a cat"].status, manifest["a cat"].step) == ("pending", 2)  # refilled into the chair's slot
    for prompt, step in (("a blue dog", 4), ("a cat", 2)):
        folder = out / manifest[prompt].id
        assert load_checkpoint(folder).step == step and not (folder / "mesh.glb").exists()
    chair_ckpt = out / manifest["a red chair"].id / "checkpoint.safetensors"
    chair_mtime = chair_ckpt.stat().st_mtime_ns

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real_step)
    assert cli.main(["batch", str(prompts), "--out", str(out), "--quiet"]) == 0  # settings come from the batch folder
    manifest = {r.prompt: r for r in Manifest.load(out).records.values()}
    assert all(r.status == "done" for r in manifest.values())
    assert chair_ckpt.stat().st_mtime_ns == chair_mtime  # finished: skipped, not retrained
    for prompt, iters in (("a blue dog", 5), ("a cat", 4)):
        folder = out / manifest[prompt].id
        assert load_checkpoint(folder).step == iters and (folder / "mesh.glb").is_file()
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows] == list(range(1, iters + 1))  # one history, no repeats
    assert capsys.readouterr().out.strip().endswith(str(out))


@pytest.mark.slow
def test_a_failing_prompt_is_isolated_and_the_others_finish(tmp_path, tiny_sd_paths, monkeypatch, caplog, capsys):
    """A prompt whose loss goes NaN is rolled back, retried once and marked failed; a prompt
    whose outputs fail to write once is retried and finishes; a malformed line is skipped with
    its line number; unsafe prompts land in safe folders."""
    prompts = _write(tmp_path / "prompts.txt", ["a red chair", "bad \x07 line", "../../etc/passwd", "# a comment", "CON"])
    out = tmp_path / "batch"
    real_sds = _poison_loss(monkeypatch, "a red chair")
    real_write = driver_mod.write_outputs
    writes = {"n": 0}

    def flaky_write(scene, cfg, folder, scorer):
        if cfg.prompt.text == "../../etc/passwd" and writes["n"] == 0:
            writes["n"] += 1
            raise OSError("disk full (simulated)")
        return real_write(scene, cfg, folder, scorer)

    monkeypatch.setattr(driver_mod, "write_outputs", flaky_write)
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt"):
        code = _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(out), "--concurrency", "3", "--iters", "3")
    assert code == 1
    assert "1 prompt(s) failed" in capsys.readouterr().err
    assert f"{prompts}:2: the prompt contains control characters" in caplog.text
    assert "rolling back to its last checkpoint" in caplog.text and "retrying from its checkpoint" in caplog.text
    records = {r.prompt: r for r in Manifest.load(out).records.values()}
    assert set(records) == {"a red chair", "../../etc/passwd", "CON"}
    chair = records["a red chair"]
    assert chair.status == "failed" and chair.attempts == 1
    assert "non-finite loss (nan)" in chair.error and "retried 1 time" in chair.error
    for prompt in ("../../etc/passwd", "CON"):
        record = records[prompt]
        assert record.status == "done" and record.error is None, record
        folder = out / record.id
        assert folder.parent == out and re.fullmatch(r"[a-z0-9-]+", record.id)
        ckpt = load_checkpoint(folder)
        assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.dtype.is_floating_point)
        assert all((folder / name).is_file() for name in OUTPUTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["batch", "cache", "prompts.txt"])  # nothing escaped

    # A re-run leaves finished and failed prompts alone; --retry-failed runs the failed one again.
    done_mtime = (out / records["CON"].id / "checkpoint.safetensors").stat().st_mtime_ns
    assert cli.main(["batch", str(prompts), "--out", str(out), "--quiet"]) == 0
    assert Manifest.load(out).records[chair.id].status == "failed"
    monkeypatch.setattr(SDSGuidance, "__call__", real_sds)  # the chair's loss is finite from now on
    assert cli.main(["batch", str(prompts), "--out", str(out), "--quiet", "--retry-failed"]) == 0
    again = Manifest.load(out).records
    assert again[chair.id].status == "done" and again[chair.id].error is None
    assert (out / chair.id / "mesh.glb").is_file()
    assert (out / records["CON"].id / "checkpoint.safetensors").stat().st_mtime_ns == done_mtime  # done: not retrained


@pytest.mark.slow
def test_out_of_memory_at_start_up_lowers_the_concurrency(tmp_path, tiny_sd_paths, monkeypatch, caplog):
    def probe(self, force=False):
        if self.num_slots > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer_mod.Trainer, "probe", probe)
    prompts = _write(tmp_path / "prompts.txt", ["a red chair", "a blue dog"])
    base = cli.build_config(cli.make_parser().parse_args(["batch", "x", "--model", str(tiny_sd_paths.folder), "--out", str(tmp_path / "b"),
                                                          "--model.cache_dir", str(tmp_path / "cache"), "--iters", "2", *FAST]))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt"):
        result = batch_mod.run_batch(base, prompts, concurrency=4, progress=False)
    assert "out of GPU memory with 2 prompts at once; lowering the concurrency to 1" in caplog.text
    assert result.concurrency == 1 and len(result.done) == 2 and not result.failed


def test_malformed_prompt_files_name_their_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'{"prompt": "a red chair", "seed": 1}\n'
        b"\n"
        b"not json\n"
        b'["a list"]\n'
        b'{"seed": 2}\n'
        b'{"prompt": "x", "colour": "red"}\n'
        b'{"prompt": "x", "seed": true}\n'
        b'{"prompt": "x", "iters": 0}\n'
        b'{"prompt": "ok", "iters": 7, "negative": "blurry"}\n'
        b'{"prompt": "\\u0000"}\n'
        b"\xff\xfe broken utf-8\n"
    )
    specs, problems = read_prompts(path)
    assert [(s.line, s.prompt, s.seed, s.iters, s.negative) for s in specs] == [(1, "a red chair", 1, None, None), (9, "ok", None, 7, "blurry")]
    expected = {3: "not valid JSON", 4: "expected a JSON object", 5: '"prompt" must be a non-empty string', 6: "unknown key 'colour'",
                7: '"seed" must be a non-negative integer', 8: '"iters" must be a positive integer', 10: "control characters",
                11: "not valid UTF-8"}  # fmt: skip
    assert len(problems) == len(expected)
    for problem, (line, reason) in zip(problems, expected.items()):
        assert problem.startswith(f"{path}:{line}: ") and reason in problem, problem

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text('{"prompt": ""}\n')
    cfg = from_dict({"output": {"out": str(tmp_path / "never")}})
    with pytest.raises(ValueError, match=r"no usable prompts in .*bad.jsonl.*bad.jsonl:1: \"prompt\" must be a non-empty string"):
        batch_mod.run_batch(cfg, only_bad)
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        batch_mod.run_batch(cfg, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="--concurrency must be at least 1, got 0"):
        batch_mod.run_batch(cfg, path, concurrency=0)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "prompt",
    ["../../etc", "/abs/path", "CON", "nul", "com1", "..", ".", "a" * 5000, "日本語のプロンプト", "café ☕ — déjà vu", "a/b\\c:d*e?f", " - "],
)
def test_prompt_folders_cannot_escape_the_batch_folder(tmp_path, prompt):
    name = prompt_id(prompt, "", 0)
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*-[0-9a-f]{10}", name) and len(name) <= 51
    assert name.split("-")[0].upper() not in {"CON", "PRN", "AUX", "NUL"} or "-" in name  # never a bare device name
    folder = prompt_folder(tmp_path, name)
    assert folder.parent == tmp_path and folder.resolve().parent == tmp_path.resolve()
    assert prompt_id(prompt, "", 1) != name and prompt_id(prompt, "blurry", 0) != name  # identity is (prompt, negative, seed)


def test_prompt_folder_rejects_unsafe_names(tmp_path):
    for name in ("../x", "a/b", ".hidden", "", "CON.txt"):
        with pytest.raises(ValueError, match="unsafe prompt folder name"):
            prompt_folder(tmp_path, name)
    assert prompt_id("日本語", "", 0).startswith("prompt-")
    assert prompt_id("Café Déjà", "", 0).startswith("cafe-deja-")


def test_per_prompt_shading_matches_each_prompt_rendered_alone():
    """One render with a shading mode per prompt equals each prompt's mode applied to all."""
    from dreamfusion_trt.cameras import get_rays, orbit_cameras
    from dreamfusion_trt.scene import build_scene

    cfg = from_dict({"field": {"num_levels": 2, "log2_hashmap_size": 10, "max_resolution": 32, "hidden_dim": 8},
                     "render": {"backend": "torch", "num_samples": 8}})  # fmt: skip
    torch.manual_seed(0)
    renderer = build_scene(cfg, num_prompts=3).eval()
    cams = orbit_cameras(3, 20.0, 1.3, 50.0)
    rays_o, rays_d = get_rays(cams, 6, 6)
    modes = ["lambertian", "albedo", "textureless"]
    mixed = renderer.render(rays_o, rays_d, cams.light_dir, shading=modes)
    by_index = renderer.render(rays_o, rays_d, cams.light_dir, shading=torch.tensor([1, 0, 2]))
    for k, mode in enumerate(modes):
        alone = renderer.render(rays_o, rays_d, cams.light_dir, shading=mode, need_normals=True)
        torch.testing.assert_close(mixed.rgb[k], alone.rgb[k], rtol=0, atol=0)
        torch.testing.assert_close(by_index.rgb[k], alone.rgb[k], rtol=0, atol=1e-6)  # all modes evaluated: other layouts
    assert mixed.orientation_rays.shape == (3, 36)
    torch.testing.assert_close(mixed.orientation, mixed.orientation_rays.mean(dim=-1))
    with pytest.raises(ValueError, match=r"one shading mode per prompt \(3\)"):
        renderer.render(rays_o, rays_d, cams.light_dir, shading=["albedo"])


def test_tiny_train_benchmark_writes_every_key(tmp_path):
    from dreamfusion_trt.bench.train import STAGES
    from dreamfusion_trt.bench.train import main as bench_main

    out = tmp_path / "bench.json"
    assert bench_main(["--tiny", "--device", "cpu", "--backends", "eager,tensorrt", "--rgb-encoder", "vae,untrained",
                       "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    for key in ("device", "torch", "arch", "dtype", "schedule", "config", "text_encoder", "results", "prompts_per_hour", "skipped", "renderer"):
        assert key in result, key
    assert result["arch"] == "tiny" and result["schedule"]["latent_iters"] + result["schedule"]["rgb_iters"] == 10000
    rows = {(r["K"], r["phase"], r["rgb_encoder"]): r for r in result["results"]}
    assert set(rows) == {(k, p, e) for k in (1, 2) for p, e in (("latent", None), ("rgb", "vae"), ("rgb", "untrained"))}
    for row in rows.values():
        assert row["backend"] == "eager" and not row["oom"] and row["it_per_s"] > 0
        assert row["prompt_it_per_s"] == pytest.approx(row["K"] * row["it_per_s"])
        assert set(row["stages_ms"]) == set(STAGES) and all(v >= 0 for v in row["stages_ms"].values())
        assert row["device_busy_ms"] is None  # profiled on CUDA only
    pph = {(p["K"], p["rgb_encoder"]): p["prompts_per_hour"] for p in result["prompts_per_hour"]}
    assert set(pph) == {(k, e) for k in (1, 2) for e in ("vae", "untrained")} and all(v > 0 for v in pph.values())
    with pytest.raises(ValueError, match="unknown --rgb-encoder 'tiny-vae'"):
        bench_main(["--tiny", "--device", "cpu", "--rgb-encoder", "vae,tiny-vae", "--out", str(out)])
    assert result["skipped"][0]["backend"] == "tensorrt"  # no TensorRT here: skipped with the reason


def _trainer(tiny, tmp_path, device, num_slots, iters, **sections):
    """A trainer with `num_slots` tiny prompts of `iters` iterations, on the torch renderer."""
    device = torch.device(device)
    data = {"model": {"model": str(tiny.folder), "cache_dir": str(tmp_path / "cache")},
            "field": {"num_levels": 4, "log2_hashmap_size": 12, "max_resolution": 64, "hidden_dim": 16},
            "render": {"num_samples": 12, "albedo_iters": 1, "backend": "torch"}, "camera": {"render_size": 16},
            "train": {"latent_fraction": 0.5, "device": device.type}}  # fmt: skip
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    cfg = from_dict(data)
    texts = ["a red chair", "a blue dog", "a cat", "a hamburger"][:num_slots]
    cfgs = [from_dict({"prompt": {"text": t}, "train": {"iters": n, "seed": i}}, from_dict(data)) for i, (t, n) in enumerate(zip(texts, iters))]
    frozen, embeddings = frozen_mod.load_frozen(cfg, device, [c.prompt for c in cfgs], max_prompts=num_slots)
    trainer = frozen_mod.new_trainer(frozen, cfg, num_slots, device)
    for k, (c, e) in enumerate(zip(cfgs, embeddings)):
        trainer.assign(k, c, e)
    return trainer


def test_training_step_reads_nothing_back_from_the_device(tmp_path, tiny_sd_paths, monkeypatch):
    """The CPU twin of the GPU sync test below: after the host-side plan (CPU generators,
    cameras, shading), no op of the step may read a tensor's value back (.item(), float(),
    bool(), nonzero, masked_select, ...), forward or backward, with mixed phases and padding."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    reads = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default", "aten.equal.default",
             "aten.masked_select.default", "aten._unique2.default", "aten.unique_consecutive.default"}  # fmt: skip
    seen = set()

    class NoReadBack(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func))
            if str(func) in reads:
                raise AssertionError(f"the training step reads a value back from the device: {func}")
            return func(*args, **(kwargs or {}))

    real_host_plan = plan_mod.host_plan

    def host_plan_outside_the_check(*args):
        with _disable_current_modes():
            return real_host_plan(*args)

    monkeypatch.setattr(plan_mod, "host_plan", host_plan_outside_the_check)
    trainer = _trainer(tiny_sd_paths, tmp_path, "cpu", 3, iters=(2, 6, 3))
    trainer.train_step()
    trainer.train_step()
    assert {trainer.phase(s) for s in trainer.slots} == {"latent", "rgb"}
    with NoReadBack():
        for _ in range(2):
            trainer.train_step()
    assert "aten.convolution_backward.default" in seen  # the backward ran under the check too
    assert [r.step for r in trainer.poll()] == [4, 4, 4]


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_training_step_never_waits_for_the_host_on_the_torch_renderer(tmp_path, tiny_sd_paths):
    """Steps with mixed phases (latent 8x8 and RGB 16x16 renders in one step), per-prompt
    shading, fp16 autocast and per-slot loss scaling, under CUDA's sync debug mode: any
    host synchronisation raises. (The nerfacc renderer reads sample counts back: not covered.)"""
    trainer = _trainer(tiny_sd_paths, tmp_path, "cuda", 3, iters=(2, 6, 3), train={"precision": "fp16"})
    for _ in range(2):  # warm-up: allocator, pinned buffers, cuDNN/cuBLAS handles
        trainer.train_step()
    assert {trainer.phase(s) for s in trainer.slots} == {"latent", "rgb"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reports = trainer.poll()
    assert [r.step for r in reports] == [5, 5, 5] and all(r.finite for r in reports)


@pytest.mark.gpu
def test_batch_on_gpu_with_nerfacc_and_fp16(tmp_path, tiny_sd_paths):
    prompts = _write(tmp_path / "prompts.txt", ["a red chair", "a blue dog", "a cat"])
    out = tmp_path / "batch"
    args = [a if a != "cpu" else "cuda" for a in FAST]
    code = cli.main(["batch", str(prompts), "--out", str(out), "--model", str(tiny_sd_paths.folder), "--iters", "20",
                     "--model.cache_dir", str(tmp_path / "cache"), "--render.backend", "nerfacc", "--render.grid_update_every", "4",
                     "--train.precision", "fp16", "--concurrency", "2", *args])  # fmt: skip
    assert code == 0
    for record in Manifest.load(out).records.values():
        assert record.status == "done"
        ckpt = load_checkpoint(out / record.id)
        assert ckpt.state["scaler"]["scale"] > 0 and any(k.startswith("estimators.0.") for k in ckpt.model)


def test_batch_checks_every_line_as_generate_checks_its_prompt(tmp_path, caplog):
    """The built-in prior knows its objects only: emoji, Japanese, a zero-width space, a long
    prompt are skipped with their line numbers (generate rejects them), and a thousand
    duplicates give a few warnings and one summary line, not a thousand."""
    from dreamfusion_trt.prior.scenes import resolve_caption

    lines = ["a red cube", "\U0001f354 a hamburger", "赤い立方体", "a red\u200b cube", "a red cube " * 1000] + ["a blue cube"] * 1000
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = from_dict({"output": {"out": str(tmp_path / "b")}})
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt"):
        jobs, _, problems, _ = batch_mod._plan_jobs(base, path, tmp_path / "b", False, check_prompt=resolve_caption)
    assert [j.cfg.prompt.text for j in jobs] == ["a red cube", "a blue cube"]
    assert [p.split(":")[1] for p in problems[:4]] == ["2", "3", "4", "5"]
    assert "is not one of the built-in prior's known objects" in problems[0]
    assert len(problems) == 4 + 999 and caplog.text.count("skipped") <= 5 + 1 + 5 + 1
    assert "skipped 994 more duplicate line(s)" in caplog.text


@pytest.mark.slow
def test_a_hundred_prompts_with_injected_faults_lose_only_the_faulty_ones(tmp_path, tiny_sd_paths, monkeypatch):
    """100 prompts on the CPU with a NaN in one, a checkpoint that cannot be written for another,
    a malformed line and no MP4 writer at all: every other prompt is done, with its mesh, grid
    and score-free outputs, and each failure is in the manifest with its reason."""
    from dreamfusion_trt.export import media

    lines = [f"object number {i}" for i in range(100)]
    lines[50] = "bad \x07 line"
    prompts = _write(tmp_path / "prompts.txt", lines)
    real_save = trainer_mod.Trainer.save_slot
    _poison_loss(monkeypatch, "object number 7")

    def no_disk_for_13(self, k, out_dir=None):
        if self.slots[k].cfg.prompt.text == "object number 13":
            raise OSError(28, "No space left on device (simulated)")
        return real_save(self, k, out_dir)

    def no_writer(*args, **kwargs):
        raise media.NoVideoWriter("no MP4 writer is installed (simulated)")

    monkeypatch.setattr(trainer_mod.Trainer, "save_slot", no_disk_for_13)
    monkeypatch.setattr("dreamfusion_trt.export.artifacts.write_video", no_writer)
    out = tmp_path / "batch"
    tiny = ["--iters", "2", "--output.video_frames", "1", "--output.mesh_resolution", "12", "--concurrency", "10"]
    assert _run(tmp_path, tiny_sd_paths, "batch", str(prompts), "--out", str(out), *tiny) == 1
    records = {r.prompt: r for r in Manifest.load(out).records.values()}
    assert len(records) == 99  # the malformed line is not a prompt
    done = [r for r in records.values() if r.status == "done"]
    assert len(done) >= 97
    assert "non-finite loss" in records["object number 7"].error
    assert "No space left on device" in records["object number 13"].error
    for record in done:
        assert set(record.outputs["not_written"]) == {"turntable"} and "no MP4 writer" in record.outputs["not_written"]["turntable"]
        assert (out / record.id / "mesh.glb").is_file() and (out / record.id / "validation.png").is_file()
