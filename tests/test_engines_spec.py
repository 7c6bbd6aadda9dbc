"""Network specs, the engine manifest, backend selection and the benchmark's CPU smoke run, on
the tiny SD model."""

import importlib.util
import json
import logging
from dataclasses import replace

import pytest
import torch
from tiny_sd import make_tiny_sd_folder

from dreamfusion_trt.config import BackendName
from dreamfusion_trt.engines.artifacts import (
    Manifest,
    RuntimeEnv,
    engine_filename,
    find_artifact,
    model_folder,
)
from dreamfusion_trt.engines.backends import (
    BACKENDS,
    LOADERS,
    EngineAdapter,
    load_network,
)
from dreamfusion_trt.engines.base import ImageEncoder, LatentDecoder, NoisePredictor
from dreamfusion_trt.engines.eager import (
    EagerImageEncoder,
    EagerLatentDecoder,
    EagerNoisePredictor,
)
from dreamfusion_trt.engines.spec import (
    AxisRange,
    batch_range,
    make_spec,
    network_batch_sizes,
)
from dreamfusion_trt.engines.tensorrt import TENSORRT_INSTALL
from dreamfusion_trt.engines.wrappers import wrap_network
from dreamfusion_trt.sdmodel import load_diffusion

H100 = RuntimeEnv("2.13.0", "10.9.0", "cuda", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd") / "folder")
    return load_diffusion(str(folder), device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------
# specs


def test_unet_spec_derives_every_view_from_one_shape_table(model):
    spec = make_spec(model, "unet", [2, 8, 32])
    assert spec.batch == AxisRange(2, 32, 32)
    assert spec.input_names == ["sample", "timestep", "encoder_hidden_states"]
    # shapes come from the model config: 4 latent channels, 8x8 latents, 77 tokens of width 32
    assert spec.shape("sample", B=8) == (8, 4, 8, 8)
    assert spec.shape("encoder_hidden_states", B=2) == (2, 77, 32)
    assert spec.shape("noise_pred") == (32, 4, 8, 8)  # opt batch by default
    assert spec.tensors["timestep"].dtype == torch.float32
    assert spec.dynamic_axes() == {n: {0: "B"} for n in ("sample", "timestep", "encoder_hidden_states", "noise_pred")}
    for name, (lo, opt, hi) in spec.profile().items():
        assert (lo, opt, hi) == (spec.shape(name, B=2), spec.shape(name, B=32), spec.shape(name, B=32))
    outs = spec.allocate_outputs(8, "cpu")
    assert outs["noise_pred"].shape == (8, 4, 8, 8) and outs["noise_pred"].dtype == torch.float32
    inputs = spec.sample_inputs(8, generator=torch.Generator().manual_seed(0))
    assert list(inputs) == spec.input_names
    for name, x in inputs.items():
        assert tuple(x.shape) == spec.shape(name, B=8) and x.dtype == spec.tensors[name].dtype
    t = inputs["timestep"]
    assert t.min() >= 0 and t.max() < model.alphas_cumprod.shape[0] and torch.equal(t, t.round())
    assert spec.check_inputs(list(inputs.values())) == 8


@pytest.mark.parametrize("network", ["unet", "vae_encoder", "vae_decoder", "text_encoder"])
def test_spec_output_shape_matches_the_network(model, network):
    spec = make_spec(model, network, network_batch_sizes(network, [2, 6]))
    batch = spec.batch.max
    inputs = spec.sample_inputs(batch, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = wrap_network(model, network)(*inputs.values())
    assert tuple(out.shape) == spec.shape(spec.output_names[0], B=batch)
    assert out.dtype == spec.outputs[0].dtype


def test_vae_and_text_specs(model):
    enc = make_spec(model, "vae_encoder", [1, 4])
    dec = make_spec(model, "vae_decoder", [1, 4])
    assert enc.shape("images", B=4) == (4, 3, 64, 64) and enc.shape("latents", B=4) == (4, 4, 8, 8)
    assert dec.shape("latents", B=1) == (1, 4, 8, 8) and dec.shape("images", B=1) == (1, 3, 64, 64)
    text = make_spec(model, "text_encoder", [1, 3])
    ids = text.sample_inputs(3)["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape == (3, 77)
    assert ids.max() < model.text_encoder.config.vocab_size
    # a different latent size is derived everywhere from the one argument
    big = make_spec(model, "vae_decoder", [1], latent_size=(16, 12))
    assert big.shape("images", B=1) == (1, 3, 128, 96)


def test_network_batch_sizes_count_prompts_for_the_vae():
    assert network_batch_sizes("unet", [8, 2, 32]) == (2, 8, 32)
    assert network_batch_sizes("vae_encoder", [2, 8, 32]) == (1, 4, 16)
    assert network_batch_sizes("text_encoder", [2]) == (1,)


@pytest.mark.parametrize("bad", [[], [0], [2, -1], [True], [2.0]])
def test_bad_batch_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="batch"):
        batch_range(bad)


def test_batch_outside_the_range_is_rejected(model):
    spec = make_spec(model, "unet", [2, 8, 32])
    with pytest.raises(ValueError, match=r"batch size 64 is outside the engine's range \[2, 32\]"):
        spec.allocate_outputs(64, "cpu")
    with pytest.raises(ValueError, match=r"batch size 1 is outside"):
        spec.sample_inputs(1)
    x = spec.sample_inputs(2)
    with pytest.raises(ValueError, match=r"'encoder_hidden_states' must have shape \[2, 77, 32\]"):
        spec.check_inputs([x["sample"], x["timestep"], torch.zeros(2, 76, 32)])
    with pytest.raises(ValueError, match="unknown network 'clip'"):
        make_spec(model, "clip", [2])


def test_export_shapes_and_fingerprint(model):
    spec = make_spec(model, "unet", [2, 8])
    shapes = spec.export_dynamic_shapes()
    assert [set(s) for s in shapes] == [{0}, {0}, {0}]
    assert shapes[0][0] is shapes[1][0] is shapes[2][0]  # one shared batch dimension
    assert make_spec(model, "unet", [4]).export_dynamic_shapes() == ({}, {}, {})
    # the fingerprint ignores the batch range but not the precision
    assert spec.io_fingerprint() == make_spec(model, "unet", [1, 64]).io_fingerprint()
    assert spec.io_fingerprint() != make_spec(model, "unet", [2, 8], dtype=torch.float16).io_fingerprint()
    assert spec.profile_tag() == "b2-8-8"
    assert spec.sizes_tag() == "p2-8"


def test_one_tensorrt_profile_per_batch_size_in_use(model):
    spec = make_spec(model, "unet", [8, 2, 32])
    assert spec.batch_sizes == (2, 8, 32)
    batches = [{n: (lo[0], opt[0], hi[0]) for n, (lo, opt, hi) in p.items()} for p in spec.profiles()]
    # each size in use is a profile's opt (= max); together they cover [2, 32] once each
    assert [b["sample"] for b in batches] == [(2, 2, 2), (3, 8, 8), (9, 32, 32)]
    assert all(len(set(b.values())) == 1 for b in batches)  # every input on the same batch
    assert spec.profiles()[1]["encoder_hidden_states"] == ((3, 77, 32), (8, 77, 32), (8, 77, 32))
    # an engine's spec read back from the manifest keeps its sizes; they must lie in its range
    assert spec.with_batch(AxisRange(2, 8, 8), [2, 8]).sizes_tag() == "p2-8"
    with pytest.raises(ValueError, match=r"batch sizes \(2, 16\) are not all inside \[2, 8\]"):
        spec.with_batch(AxisRange(2, 8, 8), [2, 16])


# ---------------------------------------------------------------------------------------------
# manifest


def _fake_engine(model, tmp_path, env, batch_sizes=(2, 8)):
    """A manifest entry for an 'engine' file of made-up bytes, as if built on `env`."""
    spec = make_spec(model, "unet", batch_sizes)
    folder = model_folder(tmp_path, model.key)
    folder.mkdir(parents=True, exist_ok=True)
    name = engine_filename(spec, env)
    (folder / name).write_bytes(b"not really a plan")
    manifest = Manifest.load(folder, model.key)
    manifest.record(name, backend="tensorrt", spec=spec, env=env, recipe={"profile": spec.profile_tag()})
    return folder, name


def test_manifest_round_trip_and_staleness(model, tmp_path):
    folder, name = _fake_engine(model, tmp_path, H100)
    assert name == "unet.fp32.p2-8.trt10.9.0.nvidia-h100-80gb-hbm3-sm90.plan"
    loaded = Manifest.load(folder, model.key)
    entry = loaded.files[name]
    assert entry == json.loads((folder / "manifest.json").read_text())["files"][name]
    assert (entry["network"], entry["precision"], entry["backend"]) == ("unet", "fp32", "tensorrt")
    assert entry["profile"]["axes"] == {"B": {"min": 2, "opt": 8, "max": 8}}
    assert entry["profile"]["batch_sizes"] == [2, 8]
    assert entry["profile"]["inputs"]["sample"] == {"min": [2, 4, 8, 8], "opt": [8, 4, 8, 8], "max": [8, 4, 8, 8]}
    assert (entry["tensorrt_version"], entry["gpu"], entry["compute_capability"]) == ("10.9.0", H100.gpu, "9.0")
    assert entry["torch_version"] == "2.13.0"
    assert loaded.stale_reason(name, {"profile": "b2-8-8"}) is None
    assert loaded.stale_reason(name, {"profile": "b2-4-4"}) == "profile changed: 'b2-8-8' -> 'b2-4-4'"
    assert loaded.stale_reason("other.plan", {}) == "not built yet"
    (folder / name).write_bytes(b"tampered")
    assert "sha256" in loaded.stale_reason(name, {"profile": "b2-8-8"})
    (folder / name).unlink()
    assert "missing" in loaded.verify_file(name)


def test_manifest_of_another_model_is_refused(model, tmp_path):
    folder, _ = _fake_engine(model, tmp_path, H100)
    with pytest.raises(ValueError, match="belongs to model"):
        Manifest.load(folder, "some-other-model")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Manifest.load(folder, model.key)


def test_find_artifact_names_the_field_that_differs(model, tmp_path):
    folder, name = _fake_engine(model, tmp_path, H100)
    path, spec = find_artifact(model, "tensorrt", "unet", tmp_path, [2, 4], H100)
    assert path == folder / name and spec.batch == AxisRange(2, 8, 8) and spec.batch_sizes == (2, 8)
    a100 = replace(H100, gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    with pytest.raises(ValueError, match=r"gpu differs: built with 'NVIDIA H100 80GB HBM3', running 'NVIDIA A100-SXM4-80GB'"):
        find_artifact(model, "tensorrt", "unet", tmp_path, [2], a100)
    with pytest.raises(ValueError, match=r"tensorrt_version differs: built with '10.9.0', running '11.0.0'"):
        find_artifact(model, "tensorrt", "unet", tmp_path, [2], replace(H100, tensorrt_version="11.0.0"))
    with pytest.raises(ValueError, match=r"batch range \[2, 8\] does not cover \(2, 16\)"):
        find_artifact(model, "tensorrt", "unet", tmp_path, [2, 16], H100)
    with pytest.raises(FileNotFoundError, match="no aotinductor file for unet"):
        find_artifact(model, "aotinductor", "unet", tmp_path, [2], H100)
    (folder / name).write_bytes(b"changed after the build")
    with pytest.raises(ValueError, match="sha256"):
        find_artifact(model, "tensorrt", "unet", tmp_path, [2], H100)


# ---------------------------------------------------------------------------------------------
# backend selection


def test_backend_table_is_the_config_literal():
    assert BACKENDS == ("auto", "eager", "inductor", "aotinductor", "tensorrt")
    assert set(BACKENDS) == set(BackendName.__args__)
    assert set(LOADERS) == set(BACKENDS) - {"auto"}


def test_auto_on_cpu_is_eager(model, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt.engines.backends"):
        predictor = load_network("unet", model, "auto", tmp_path, batch_sizes=(2,))
    assert isinstance(predictor, EagerNoisePredictor)
    assert "backend auto -> eager for unet" in caplog.text
    no_trt = TENSORRT_INSTALL if importlib.util.find_spec("tensorrt") is None else "needs the model on a CUDA device"
    assert f"tensorrt: {no_trt}" in caplog.text and "aotinductor: no aotinductor file for unet" in caplog.text
    assert isinstance(load_network("vae_encoder", model, "auto", tmp_path), EagerImageEncoder)
    assert isinstance(load_network("vae_decoder", model, "eager", tmp_path), EagerLatentDecoder)


def test_tensorrt_backend_without_tensorrt_says_how_to_install(model, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is importable here")
    with pytest.raises(ValueError) as info:
        load_network("unet", model, "tensorrt", tmp_path)
    assert str(info.value) == TENSORRT_INSTALL
    assert isinstance(info.value.__cause__, ImportError)


def test_unknown_backend_and_bad_batches(model, tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'onnxruntime'"):
        load_network("unet", model, "onnxruntime", tmp_path)
    with pytest.raises(ValueError, match="no backend runs network 'text_encoder'"):
        load_network("text_encoder", model, "eager", tmp_path)
    with pytest.raises(ValueError, match="batch sizes must be positive"):
        load_network("unet", model, "eager", tmp_path, batch_sizes=(0,))


# ---------------------------------------------------------------------------------------------
# engine-only image SDS


@pytest.mark.parametrize("network, protocol", [("unet", NoisePredictor), ("vae_encoder", ImageEncoder), ("vae_decoder", LatentDecoder)])
def test_one_adapter_type_serves_every_protocol(model, network, protocol):
    spec = make_spec(model, network, network_batch_sizes(network, [2, 4]))
    calls = []

    def runner(*xs):  # records what reaches the compiled side
        calls.append([(x.dtype, x.is_contiguous()) for x in xs])
        return wrap_network(model, network)(*xs)

    adapter = EngineAdapter("stand-in", runner, spec, "cpu")
    assert isinstance(adapter, protocol)
    inputs = list(spec.sample_inputs(2, generator=torch.Generator().manual_seed(0)).values())
    if network == "unet":
        inputs[1] = inputs[1].long()  # callers pass integer timesteps; the spec says fp32
    inputs[0] = inputs[0].double().transpose(-1, -2)  # another dtype, not contiguous
    out = adapter(*inputs)
    assert calls == [[(t.dtype, True) for t in spec.inputs]]
    assert out.dtype == torch.float64  # back in the caller's dtype
    with torch.no_grad():
        ref = wrap_network(model, network)(*[x.to(t.dtype).contiguous() for x, t in zip(inputs, spec.inputs)])
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"{network}: expected {len(spec.inputs)} inputs"):
        adapter(*inputs, inputs[0])


def test_the_trainers_autocast_does_not_reach_the_network(model):
    """The trainer runs guidance under autocast; the network behind an adapter runs as it was
    built (a compiled graph guards on the autocast state: a call under autocast would recompile)."""
    spec = make_spec(model, "unet", network_batch_sizes("unet", [2]))
    seen = []

    def runner(*xs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        return wrap_network(model, "unet")(*xs)

    adapter = EngineAdapter("stand-in", runner, spec, "cpu")
    inputs = list(spec.sample_inputs(2, generator=torch.Generator().manual_seed(0)).values())
    plain = adapter(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = adapter(*inputs)
        assert torch.is_autocast_enabled("cpu")  # the caller's state is back afterwards
    assert seen == [(False, False), (False, False)]
    torch.testing.assert_close(under, plain, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# benchmark smoke run


def test_engine_bench_tiny_on_cpu(tmp_path):
    from dreamfusion_trt.bench.engines import make_parser, run_engine_bench

    out = tmp_path / "bench.json"
    args = make_parser().parse_args(["--tiny", "--backends", "eager,tensorrt", "--batch-sizes", "2,4", "--reps", "2",
                                     "--warmup", "1", "--device", "cpu", "--out", str(out), "--work-dir", str(tmp_path / "w")])  # fmt: skip
    result = run_engine_bench(args)
    assert json.loads(out.read_text()) == result
    rows = [r for r in result["results"] if r["backend"] == "eager"]
    assert [r["batch"] for r in rows] == [2, 4]
    assert rows[1]["gflop_per_call"] == pytest.approx(2 * rows[0]["gflop_per_call"])  # FLOPs scale with the batch
    assert all(r["median_ms"] > 0 and r["tflops"] > 0 and r["vs_matmul"] > 0 for r in rows)
    assert result["matmul"]["tflops"] > 0
    skipped = {s["backend"]: s["reason"] for s in result["skipped"]}
    # on a CPU the TensorRT row is always skipped, with the reason that applies here
    no_trt = TENSORRT_INSTALL if importlib.util.find_spec("tensorrt") is None else "TensorRT needs a CUDA GPU"
    assert skipped == {"tensorrt": no_trt}
