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
from tiny_sd import make_tiny_sd_folder

from dreamfusion_trt.engines import onnx_export
from dreamfusion_trt import cli
from dreamfusion_trt.engines.build import build_engines
from dreamfusion_trt.engines.onnx_export import check_onnx, export_onnx, onnx_parity
from dreamfusion_trt.engines.artifacts import Manifest, model_folder
from dreamfusion_trt.engines.spec import make_spec, network_batch_sizes
from dreamfusion_trt.engines.tensorrt import TENSORRT_INSTALL
from dreamfusion_trt.engines.wrappers import wrap_network
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


def _typed_graph(path):
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {t.name: t.data_type for t in graph.initializer}
    return graph, types


def _softmax_chains(graph):
    """For each Softmax: the op types from it back to the first MatMul, and the op producing
    that MatMul's first input (the query side)."""
    producer = {o: n for n in graph.node for o in n.output}
    chains = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        ops, cur = [], producer[node.input[0]]
        while cur.op_type != "MatMul":
            ops.append(cur.op_type)
            cur = producer[cur.input[0]]
        chains.append((ops, producer[cur.input[0]].op_type if cur.input[0] in producer else "input"))
    return chains


def test_fp16_export_keeps_norms_in_fp32_and_the_sdpa_attention_pattern(folder, tmp_path):
    """Norms normalise in fp32 (explicit casts); attention is the default SDPA export: Q scaled
    by a Mul *before* the first MatMul, MatMul -> Softmax directly, no Cast around the Softmax,
    which is the pattern TensorRT's fused attention matches (issue 12, item 5)."""
    model16 = load_diffusion(str(folder), device="cpu", dtype="float16")
    module = wrap_network(model16, "unet")
    processors = {k: type(v) for k, v in model16.unet.attn_processors.items()}
    spec = make_spec(model16, "unet", [2, 8])
    path = export_onnx(module, spec, tmp_path / "unet.onnx")[0]
    graph, types = _typed_graph(path)
    norms = [n for n in graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization")]
    assert {n.op_type for n in norms} == {"InstanceNormalization", "LayerNormalization"}
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 8  # 4 transformer blocks x (self, cross) attention
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in softmaxes)
    assert _softmax_chains(graph) == [([], "Mul")] * 8
    assert types["sample"] == types["noise_pred"] == onnx.TensorProto.FLOAT16
    # the export-time changes are undone
    assert {k: type(v) for k, v in model16.unet.attn_processors.items()} == processors
    assert not any("forward" in m.__dict__ for m in model16.unet.modules())


def test_classic_attention_is_exported_as_sdpa_too(model, tmp_path):
    """A model loaded with diffusers' classic processor (MatMul -> Mul(scale) -> Softmax) is
    exported through SDPA all the same, and gets its processor back."""
    from diffusers.models.attention_processor import AttnProcessor

    model.unet.set_attn_processor(AttnProcessor())
    try:
        path = export_onnx(wrap_network(model, "unet"), make_spec(model, "unet", [2]), tmp_path / "unet.onnx")[0]
        assert {type(p) for p in model.unet.attn_processors.values()} == {AttnProcessor}
    finally:
        model.unet.set_default_attn_processor()
    graph, _ = _typed_graph(path)
    assert _softmax_chains(graph) == [([], "Mul")] * 8


def test_bf16_export_has_no_bf16_resize(folder, tmp_path):
    """TensorRT has no bf16 Resize: every upsampling Resize of a bf16 graph gets fp32 casts."""
    model_bf = load_diffusion(str(folder), device="cpu", dtype="bfloat16")
    for network, count in (("unet", 1), ("vae_decoder", 3)):
        spec = make_spec(model_bf, network, network_batch_sizes(network, [2]))
        path = export_onnx(wrap_network(model_bf, network), spec, tmp_path / f"{network}.onnx")[0]
        graph, types = _typed_graph(path)
        resizes = [n for n in graph.node if n.op_type == "Resize"]
        assert len(resizes) == count
        assert all(types[n.input[0]] == types[n.output[0]] == onnx.TensorProto.FLOAT for n in resizes)
        assert types[spec.output_names[0]] == onnx.TensorProto.BFLOAT16
        check_onnx(path, full_check=False)  # the rewritten graph is well formed
        with pytest.raises(ValueError, match=r"Conv.*unsupported type: tensor\(bfloat16\)"):
            check_onnx(path)  # why not the full check: ONNX types Conv for bf16 from opset 22 on


def test_bf16_resize_casts_compute_what_the_graph_computed():
    """The rewrite on a small graph, run through onnxruntime: nearest-neighbour upsampling of
    bf16-representable values is exact in fp32, so the result is the input repeated."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("Resize", ["xb", "", "scales"], ["yb"], mode="nearest"),
             helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])], [scales])  # fmt: skip
    model, n = onnx_export.cast_bf16_resize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert n == 1
    assert [node.op_type for node in model.graph.node] == ["Cast", "Cast", "Resize", "Cast", "Cast"]
    onnx.checker.check_model(model, full_check=True)
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert (y == x.repeat(2, axis=2).repeat(2, axis=3)).all()


def test_check_graph_names_what_differs_from_the_spec(model, tmp_path):
    spec = make_spec(model, "vae_decoder", [1, 2])
    path = export_onnx(wrap_network(model, "vae_decoder"), spec, tmp_path / "vae_decoder.onnx")[0]
    graph = onnx.load(str(path))
    onnx_export.check_graph(graph, spec)  # as exported: fine
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # batch fixed to 2
    graph.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    with pytest.raises(ValueError, match=r"'latents' has shape \[2, 4, 8, 8\], the spec \['B', 4, 8, 8\]; "
                                         r"'images' has element type FLOAT16, the spec FLOAT"):  # fmt: skip
        onnx_export.check_graph(graph, spec)


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
        assert cli.main(["build-engines", *argv]) == 0
    mdir = model_folder(out, model.key)
    manifest = Manifest.load(mdir, model.key)
    onnx_files = sorted(n for n, e in manifest.files.items() if e["backend"] == "onnx")
    assert onnx_files == ["unet.fp32.onnx", "vae_decoder.fp32.onnx", "vae_encoder.fp32.onnx"]  # what a backend loads
    assert manifest.files["unet.fp32.onnx"]["parity"]["sds_cosine"] >= 0.999
    assert all(manifest.files[n]["parity"]["max_rel_error"] < 1e-4 for n in onnx_files)
    assert manifest.files["vae_encoder.fp32.onnx"]["profile"]["axes"]["B"] == {"min": 1, "opt": 2, "max": 2}
    if importlib.util.find_spec("tensorrt") is None:
        assert f"could not build tensorrt unet, tensorrt vae_encoder, tensorrt vae_decoder: {TENSORRT_INSTALL}" in caplog.text
    stamps = {p.name: p.stat().st_mtime_ns for p in mdir.iterdir()}

    # second run through the thin script: nothing to do
    run = subprocess.run([sys.executable, str(REPO / "build_scripts" / "build_engines.py"), *argv],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("up to date") >= 3 and "exporting" not in run.stderr
    assert {p.name: p.stat().st_mtime_ns for p in mdir.iterdir()} == stamps

    # a changed file is rebuilt, and only that one
    with open(mdir / "vae_decoder.fp32.onnx", "ab") as f:
        f.write(b"\0")
    report = build_engines(model, out, batch_sizes=[2, 4], backends=["onnx"])
    assert [(i.network, i.status) for i in report.items] == [("unet", "up to date"), ("vae_encoder", "up to date"), ("vae_decoder", "built")]
    assert Manifest.load(mdir, model.key).verify_file("vae_decoder.fp32.onnx") is None


def test_build_engines_rejects_a_malformed_render_encoder_size(capsys):
    assert cli.main(["build-engines", "--render-encoder", "64by512"]) == 2
    assert "--render-encoder takes RENDERxENCODE, e.g. 64x512; got '64by512'" in capsys.readouterr().err


def test_build_engines_without_a_model_builds_for_the_builtin_prior(tmp_path, caplog):
    """The default --model is the built-in prior, as for generate: no hub lookup, and the files
    land under the model key generate computes for it."""
    from dreamfusion_trt.prior import WEIGHTS_DIR
    from dreamfusion_trt.sdmodel import load_diffusion

    key = load_diffusion(str(WEIGHTS_DIR), device="cpu", dtype="float32").key
    with caplog.at_level(logging.INFO):
        assert cli.main(["build-engines", "--device", "cpu", "--backends", "onnx", "--networks", "vae_decoder",
                         "--no-parity", "--out", str(tmp_path)]) == 0  # fmt: skip
    assert (model_folder(tmp_path, key) / "vae_decoder.fp32.onnx").is_file()
    assert "huggingface.co" not in caplog.text
