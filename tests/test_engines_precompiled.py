"""Inductor artifacts on disk (`engines.precompiled`) against the eager twin, on the CPU in fp32:
compiled and saved once, loaded in a second build without tracing, and the fallbacks to the
in-process compile (which the tests replace by a counting stand-in, to keep them quick)."""

import json
import logging

import pytest
import torch
from tiny_sd import make_tiny_sd_folder

from dreamfusion_trt.engines import precompiled
from dreamfusion_trt.engines.backends import load_network
from dreamfusion_trt.engines.compile_cache import compile_cache_folder, precompiled_folder
from dreamfusion_trt.engines.eager import EagerNoisePredictor
from dreamfusion_trt.engines.precompiled import artifact_stem, precompile_enabled, precompiled_network
from dreamfusion_trt.engines.spec import make_spec
from dreamfusion_trt.engines.wrappers import wrap_network
from dreamfusion_trt.sdmodel import load_diffusion

pytestmark = pytest.mark.skipif(not precompiled.standalone_available(), reason="this torch lacks torch._inductor.standalone_compile")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd") / "folder")
    return load_diffusion(str(folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """One artifact for batch 2, compiled and saved by `precompiled_network` (about a minute on
    two cores), shared by the tests below."""
    folder = tmp_path_factory.mktemp("precompiled")
    spec = make_spec(model, "unet", [2])
    run = precompiled_network(wrap_network(model, "unet"), spec, folder, mode="default", batch_sizes=(2,))
    return folder, spec, run


class CountingCompile:
    """Stands in for `compile_network` (what the fallbacks call): records the calls and runs the
    wrapper eagerly."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, spec, **kwargs):
        self.calls.append(kwargs)
        return lambda *inputs: module(*inputs)


def _inputs(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=gen), torch.randint(0, 1000, (batch,), generator=gen).float(),
            torch.randn(batch, 77, 32, generator=gen))  # fmt: skip


def _close(got, ref):
    # fp32 on both sides; only the order of the compiled reductions differs
    return bool((got - ref).abs().max() <= 1e-4 * ref.abs().max())


def test_saved_artifact_matches_eager_and_loads_without_tracing(model, saved, monkeypatch, caplog):
    folder, spec, first = saved
    stem = artifact_stem(spec, 2, "default", channels_last=False)
    index = json.loads((folder / f"{stem}.json").read_text())
    assert (folder / f"{stem}.bin").stat().st_size > 0
    assert index["batch"] == 2 and index["inputs"].count("input:0") == 1 and len(index["inputs"]) > 3
    assert not list(folder.glob("*.tmp*")), "nothing half-written is left"
    eager = EagerNoisePredictor(model.unet)
    x, t, e = _inputs(2, seed=1)
    ref = eager(x, t, e)
    with torch.no_grad():
        assert _close(first(x, t, e), ref)

    def no_trace(*args, **kwargs):
        raise AssertionError("a saved artifact must load without exporting the network again")

    monkeypatch.setattr(torch.export, "export", no_trace)
    monkeypatch.setattr(torch._inductor, "standalone_compile", no_trace)
    stand_in = CountingCompile()
    monkeypatch.setattr(precompiled, "compile_network", stand_in)
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt.engines.precompiled"):
        loaded = precompiled_network(wrap_network(model, "unet"), spec, folder, mode="default", batch_sizes=(2,))
    assert "loaded the compiled artifact for batch 2" in caplog.text
    assert stand_in.calls == []
    with torch.no_grad():
        got = loaded(x, t, e)
    assert _close(got, ref)
    # The artifact reads the module's parameters at each call, not copies made at load: a
    # changed weight changes its output as it changes the eager network's.
    with torch.no_grad():
        model.unet.conv_out.bias.add_(0.5)
        try:
            assert _close(loaded(x, t, e), eager(x, t, e))
            assert (loaded(x, t, e) - got).abs().max() > 0.1
        finally:
            model.unet.conv_out.bias.sub_(0.5)


def test_batches_not_warmed_up_and_broken_artifacts_fall_back_to_the_in_process_compile(model, saved, monkeypatch, caplog):
    folder, _, _ = saved
    spec = make_spec(model, "unet", [2, 4])
    stand_in = CountingCompile()
    monkeypatch.setattr(precompiled, "compile_network", stand_in)
    run = precompiled_network(wrap_network(model, "unet"), spec, folder, mode="default", batch_sizes=(2,))
    assert stand_in.calls == []
    eager = EagerNoisePredictor(model.unet)
    x, t, e = _inputs(4, seed=2)
    with torch.no_grad():
        assert _close(run(x, t, e), eager(x, t, e))
    assert len(stand_in.calls) == 1 and "batch_sizes" not in stand_in.calls[0], "batch 4 went to the lazy in-process compile"
    run(x, t, e)
    assert len(stand_in.calls) == 1, "built once"

    broken = folder / "broken"
    broken.mkdir()
    stem = artifact_stem(spec, 2, "default", channels_last=False)
    (broken / f"{stem}.bin").write_bytes(b"not an artifact")
    (broken / f"{stem}.json").write_text((folder / f"{stem}.json").read_text())
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt.engines.precompiled"):
        precompiled_network(wrap_network(model, "unet"), spec, broken, mode="default", batch_sizes=(2,))
    assert "the compiled artifact failed" in caplog.text and "compiling in-process instead" in caplog.text
    assert stand_in.calls[-1].get("batch_sizes") == (2,)


def test_an_index_from_another_torch_is_not_loaded(model, saved, monkeypatch, tmp_path):
    folder, spec, _ = saved
    stem = artifact_stem(spec, 2, "default", channels_last=False)
    index = json.loads((folder / f"{stem}.json").read_text())
    (tmp_path / f"{stem}.bin").write_bytes((folder / f"{stem}.bin").read_bytes())
    (tmp_path / f"{stem}.json").write_text(json.dumps({**index, "torch": "0.0.0"}))
    assert precompiled.load_artifact(wrap_network(model, "unet"), spec, 2, tmp_path, "default", False) is None
    index["inputs"] = ["unet.no_such.weight", *index["inputs"]]
    (tmp_path / f"{stem}.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="needs tensors the module lacks: unet.no_such.weight"):
        precompiled.load_artifact(wrap_network(model, "unet"), spec, 2, tmp_path, "default", False)


def test_keys_and_switches(model, monkeypatch, tmp_path):
    spec = make_spec(model, "unet", [2, 4])
    stems = {artifact_stem(spec, 2, "default", False), artifact_stem(spec, 2, "reduce-overhead", False),
             artifact_stem(spec, 4, "default", False), artifact_stem(spec, 2, "max-autotune", False),
             artifact_stem(spec, 2, "default", True), artifact_stem(spec, 2, "default", False, "cuda:1")}  # fmt: skip
    # Our CUDA graphs wrap the same artifact, so "default" and "reduce-overhead" share one; each
    # GPU of a data-parallel node has its own.
    assert len(stems) == 5 and artifact_stem(spec, 2, "default", False).startswith("unet-b2-float32-")
    assert precompile_enabled({}) and not precompile_enabled({"DREAMFUSION_TRT_PRECOMPILE": "0"})
    assert precompiled_folder(tmp_path, "cpu", "m-123") == compile_cache_folder(tmp_path, "cpu") / "precompiled" / "m-123"
    with pytest.raises(ValueError, match="unknown torch.compile mode 'fastest'"):
        precompiled_network(wrap_network(model, "unet"), spec, tmp_path, mode="fastest", batch_sizes=(2,))  # type: ignore[arg-type]
    # load_network's inductor backend takes the artifact path when given a folder, and not when
    # the environment turns it off.
    seen = []
    monkeypatch.setattr(precompiled, "precompiled_network", lambda *a, **k: seen.append("artifact") or (lambda *x: x[0]))
    monkeypatch.setattr("dreamfusion_trt.engines.inductor.compile_network", lambda *a, **k: seen.append("compile") or (lambda *x: x[0]))
    load_network("unet", model, "inductor", batch_sizes=(2,), precompiled_dir=tmp_path)
    monkeypatch.setenv("DREAMFUSION_TRT_PRECOMPILE", "0")
    load_network("unet", model, "inductor", batch_sizes=(2,), precompiled_dir=tmp_path)
    load_network("unet", model, "inductor", batch_sizes=(2,))
    assert seen == ["artifact", "compile", "compile"]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_precompiled_fp16_matches_eager_on_gpu(tmp_path, mode):
    """The artifact (and, with reduce-overhead, our CUDA graph around it) against the eager UNet
    in fp16, saved by one build and loaded by the next."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    folder = make_tiny_sd_folder(tmp_path / "tiny")
    model = load_diffusion(str(folder), device="cuda", dtype="float16")
    eager = EagerNoisePredictor(model.unet)
    x, t, e = (v.to("cuda", torch.float16) if v.is_floating_point() else v.cuda() for v in _inputs(4, seed=3))
    t = t.float()
    ref = eager(x, t, e).clone()
    for _ in range(2):  # compiled and saved, then loaded
        predictor = load_network("unet", model, "inductor", batch_sizes=(4,), compile_mode=mode, precompiled_dir=tmp_path / "art")
        got = predictor(x, t, e).clone()
        assert not got.isnan().any()
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), ref.float().flatten(), dim=0)
        assert float(cos) >= 0.999
    assert len(list((tmp_path / "art").glob("unet-b4-float16-*.bin"))) == 1
