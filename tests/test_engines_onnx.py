"""ONNX export of the tiny SD networks, checks, onnxruntime parity, and the build script's CPU
path end to end."""

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from tiny_sd import make_tiny_sd_folder

from dreamfusion_trt.engines import onnx_export
from dreamfusion_trt.engines.build import build_engines, main
from dreamfusion_trt.engines.onnx_export import check_onnx, export_onnx, onnx_parity
from dreamfusion_trt.engines.registry import Manifest, model_folder
from dreamfusion_trt.engines.spec import make_spec, network_batch_sizes
from dreamfusion_trt.engines.tensorrt import TENSORRT_INSTALL
from dreamfusion_trt.engines.wrappers import fp32_islands, wrap_network
from dreamfusion_trt.sdmodel import load_diffusion

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd") / "folder")


@pytest.fixture(scope="module")
def model(folder):
    return load_diffusion(str(folder), device="cpu", dtype="float32")


def _graph_batch_dims(path):
    m = onnx.load(str(path), load_external_data=False)
    return {i.name: i.type.tensor_type.shape.dim[0].dim_param for i in [*m.graph.input, *m.graph.output]}


@pytest.mark.parametrize("network", ["unet", "vae_encoder", "vae_decoder", "text_encoder"])
def test_export_checks_and_matches_eager(model, tmp_path, network):
    spec = make_spec(model, network, network_batch_sizes(network, [2, 8]))
    module = wrap_network(model, network)
    files = export_onnx(module, spec, tmp_path / f"{network}.onnx")
    assert files == [tmp_path / f"{network}.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{network}.onnx"]  # no temporaries left
    check_onnx(files[0])
    assert _graph_batch_dims(files[0]) == {n: "B" for n in spec.input_names + spec.output_names}
    # a batch other than the traced one (2) exercises the dynamic axis
    batch = 4 if network == "unet" else 3
    report = onnx_parity(files[0], module, spec, batch=batch, alphas_cumprod=model.alphas_cumprod)
    assert report.batch == batch
    assert report.max_rel_error < 1e-4
    if network == "unet":
        assert report.sds_cosine >= 0.999
    else:
        assert report.sds_cosine is None


def test_fp16_export_keeps_norms_and_softmax_in_fp32(folder, tmp_path):
    model16 = load_diffusion(str(folder), device="cpu", dtype="float16")
    module = wrap_network(model16, "unet")
    processors = {k: type(v) for k, v in model16.unet.attn_processors.items()}
    path = export_onnx(module, make_spec(model16, "unet", [2]), tmp_path / "unet.onnx")[0]
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    guarded = [n for n in graph.node if n.op_type in ("Softmax", "InstanceNormalization", "LayerNormalization")]
    assert {n.op_type for n in guarded} == {"Softmax", "InstanceNormalization", "LayerNormalization"}
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in guarded)
    assert types["sample"] == types["noise_pred"] == onnx.TensorProto.FLOAT16
    # the export-time patches are undone
    assert {k: type(v) for k, v in model16.unet.attn_processors.items()} == processors
    assert not any("forward" in m.__dict__ for m in model16.unet.modules())


def test_fp32_islands_also_cover_clip(folder):
    model16 = load_diffusion(str(folder), device="cpu", dtype="float16")
    module = wrap_network(model16, "text_encoder")
    ids = make_spec(model16, "text_encoder", [2]).sample_inputs(2)["input_ids"]
    with torch.no_grad():
        ref = module(ids).float()
        with fp32_islands(module):
            assert model16.text_encoder.config._attn_implementation == "eager"
            got = module(ids).float()
    assert model16.text_encoder.config._attn_implementation == "sdpa"
    assert (got - ref).abs().max() < 2e-2 * ref.abs().max()


def test_large_models_go_to_one_external_data_file(model, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 10_000)  # pretend the tiny VAE is > 2 GB
    spec = make_spec(model, "vae_decoder", [1, 2])
    module = wrap_network(model, "vae_decoder")
    files = export_onnx(module, spec, tmp_path / "vae_decoder.onnx")
    assert [f.name for f in files] == ["vae_decoder.onnx.data", "vae_decoder.onnx"]
    assert files[1].stat().st_size < files[0].stat().st_size  # the weights moved out
    check_onnx(files[1])
    assert onnx_parity(files[1], module, spec, batch=2).max_rel_error < 1e-4


def test_check_onnx_rejects_a_broken_graph(tmp_path):
    bad = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [], []))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(ValueError, match="ONNX check failed for"):
        check_onnx(tmp_path / "bad.onnx")


@pytest.mark.slow
def test_build_script_cpu_path_end_to_end(folder, model, tmp_path, caplog):
    out = tmp_path / "engines"
    argv = ["--model", str(folder), "--out", str(out), "--backends", "onnx,tensorrt", "--batch-sizes", "2,4",
            "--local-files-only"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    mdir = model_folder(out, model.key)
    manifest = Manifest.load(mdir, model.key)
    onnx_files = sorted(n for n, e in manifest.files.items() if e["backend"] == "onnx")
    assert onnx_files == ["text_encoder.fp32.onnx", "unet.fp32.onnx", "vae_decoder.fp32.onnx", "vae_encoder.fp32.onnx"]
    assert manifest.files["unet.fp32.onnx"]["parity"]["sds_cosine"] >= 0.999
    assert all(manifest.files[n]["parity"]["max_rel_error"] < 1e-4 for n in onnx_files)
    assert manifest.files["vae_encoder.fp32.onnx"]["profile"]["axes"]["B"] == {"min": 1, "opt": 2, "max": 2}
    if importlib.util.find_spec("tensorrt") is None:
        assert f"could not build tensorrt unet, tensorrt vae_encoder, tensorrt vae_decoder, tensorrt text_encoder: {TENSORRT_INSTALL}" in caplog.text
    stamps = {p.name: p.stat().st_mtime_ns for p in mdir.iterdir()}

    # second run through the thin script: nothing to do
    run = subprocess.run([sys.executable, str(REPO / "build_scripts" / "build_engines.py"), *argv],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("up to date") >= 4 and "exporting" not in run.stderr
    assert {p.name: p.stat().st_mtime_ns for p in mdir.iterdir()} == stamps

    # a changed file is rebuilt, and only that one
    with open(mdir / "vae_decoder.fp32.onnx", "ab") as f:
        f.write(b"\0")
    report = build_engines(model, out, batch_sizes=[2, 4], backends=["onnx"])
    assert [(i.network, i.status) for i in report.items] == [
        ("unet", "up to date"), ("vae_encoder", "up to date"), ("vae_decoder", "built"), ("text_encoder", "up to date"),
    ]  # fmt: skip
    assert Manifest.load(mdir, model.key).verify_file("vae_decoder.fp32.onnx") is None
