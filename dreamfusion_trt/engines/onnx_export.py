"""ONNX export of the frozen networks, graph clean-up and checks, and onnxruntime parity.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. On torch 2.13 it exports
diffusers' UNet, AutoencoderKL halves and the CLIP text model with a correct dynamic batch (the
tests run batch sizes other than the traced one through onnxruntime) and needs nothing beyond
`onnx`. The torch.export-based exporter (``dynamo=True``, the default since torch 2.9) needs the
``onnxscript`` package; `export_onnx(..., dynamo=True)` uses it with `torch.export` dynamic shapes
from the same spec when it is installed.

After export the graph is loaded with `onnx`; in a bf16 graph every `Resize` gets casts to fp32
around it (TensorRT has no bf16 Resize); it is shape-inferred, saved (with one external-data file
``<name>.onnx.data`` when the model is over protobuf's 2 GB), checked with the path-based
`onnx.checker` (``full_check``, strict shape and type inference, except for bf16 graphs:
ONNX types Conv for bf16 only from opset 22) and against the spec (`check_graph`:
input/output element types and dynamic axes, no bf16 Resize), and only then moved into place, so
a failed export never leaves a file a later build would trust. No separate constant folding:
the exporter folds (``do_constant_folding``) and TensorRT folds what is left of the shape
arithmetic when it builds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .base import cfg_combine
from .spec import NetworkSpec
from .wrappers import fp32_islands, module_device

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
_PROTOBUF_LIMIT = 2**31 - 1


def trace_batch(spec: NetworkSpec) -> int:
    """Batch to trace with: 2 when the range allows (batch 1 invites specialisation), else min."""
    r = spec.batch
    return min(max(2, r.min), r.max)


def export_onnx(
    module: nn.Module,
    spec: NetworkSpec,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    islands: bool = True,
    dynamo: bool = False,
) -> list[Path]:
    """Export `module` (a wrapper from `wrappers.py`, already in the spec's precision and on its
    device) to `path`; returns the files written (the .onnx, plus its .onnx.data if any).

    `islands`: keep group norms and attention softmaxes in fp32 in an fp16/bf16 graph.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = module_device(module)
    inputs = tuple(spec.sample_inputs(trace_batch(spec), device, torch.Generator().manual_seed(0)).values())
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        raw = Path(tmp) / "raw.onnx"
        log.info("exporting %s (%s) to ONNX", spec.network, spec.describe()["precision"])
        with torch.no_grad(), (fp32_islands(module) if islands else contextlib.nullcontext()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            if dynamo:
                torch.onnx.export(
                    module, inputs, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                    opset_version=max(opset, 18), dynamo=True, dynamic_shapes=spec.export_dynamic_shapes(),
                    external_data=True,
                )  # fmt: skip
            else:
                torch.onnx.export(
                    module, inputs, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                    opset_version=opset, dynamo=False, dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
                )  # fmt: skip
        model = onnx.load(str(raw))  # pulls in any external tensors the exporter wrote beside it
        if spec.precision == torch.bfloat16:
            model, n = cast_bf16_resize(model)
            log.info("%s: %d bf16 Resize node(s) computed in fp32", spec.network, n)
        _name_io_dims(model, spec)
        staged = Path(tmp) / path.name
        files = save_onnx(model, staged)
        # ONNX types Conv for bf16 only from opset 22 on (the TorchScript exporter stops at 20);
        # TensorRT parses bf16 Conv all the same, so bf16 graphs get the structural check.
        check_onnx(staged, full_check=spec.precision != torch.bfloat16)
        check_graph(onnx.load(str(staged), load_external_data=False), spec)
        final = []
        for f in sorted(files, key=lambda f: f.suffix == ".onnx"):  # data first, the .onnx last
            os.replace(f, path.parent / f.name)
            final.append(path.parent / f.name)
    log.info("wrote %s", ", ".join(str(f) for f in final))
    return final


def cast_bf16_resize(model):
    """`model` with Cast(fp32) -> Resize -> Cast(bf16) wherever a Resize reads bf16 data, and
    how many there were. TensorRT implements Resize in fp32/fp16 only; in a strongly typed build
    the casts say where it runs. Needs type inference, so the model must be under 2 GB (a bf16
    SD UNet is 1.7 GB)."""
    import onnx
    from onnx import TensorProto, helper

    types = _elem_types(onnx.shape_inference.infer_shapes(model))
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type != "Resize" or types.get(node.input[0]) != TensorProto.BFLOAT16:
            nodes.append(node)
            continue
        count += 1
        x, y = node.input[0], node.output[0]
        x32, y32 = f"{x}__fp32_{count}", f"{y}__fp32"
        nodes.append(helper.make_node("Cast", [x], [x32], to=TensorProto.FLOAT, name=f"{node.name}/cast_in"))
        node.input[0], node.output[0] = x32, y32
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [y32], [y], to=TensorProto.BFLOAT16, name=f"{node.name}/cast_out"))
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        kept = [v for v in model.graph.value_info if v.name not in {n.output[0] for n in nodes if n.op_type == "Resize"}]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return model, count


def _name_io_dims(model, spec: NetworkSpec) -> None:
    """Write the spec's fixed sizes over the exporter's generated dimension names on the graph's
    inputs and outputs (it names some output dims after the op that made them, e.g.
    'Mullatents_dim_1'); dynamic axes keep the spec's names. `check_graph` verifies the result
    and the full checker its consistency with the graph."""
    for v in [*model.graph.input, *model.graph.output]:
        t = spec.tensors.get(v.name)
        dims = v.type.tensor_type.shape.dim
        if t is None or len(dims) != len(t.shape):
            continue
        for d, want in zip(dims, t.shape):
            if isinstance(want, int) and d.dim_param and d.dim_param not in dict(spec.axes):
                d.dim_value = want  # clears dim_param (a oneof)


def _elem_types(model) -> dict[str, int]:
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]} | {
        t.name: t.data_type for t in g.initializer
    }


def save_onnx(model, path: Path) -> list[Path]:
    """Shape-infer and save; weights go to one `<name>.data` file when over 2 GB."""
    import onnx

    large = model.ByteSize() > _PROTOBUF_LIMIT
    if not large:
        model = onnx.shape_inference.infer_shapes(model)
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    return [path, data]


def check_onnx(path: str | Path, full_check: bool = True) -> None:
    """`onnx.checker` on the file (path-based, so models with external data work); `full_check`
    adds strict shape and type inference."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValueError(f"ONNX check failed for '{path}': {str(exc).splitlines()[0]}") from exc


def check_graph(model, spec: NetworkSpec) -> None:
    """ValueError unless the graph's inputs and outputs are the spec's, in order, with its
    element types and shapes (dynamic axes named as the spec names them, fixed sizes equal),
    and no Resize reads bf16 (see `cast_bf16_resize`)."""
    import onnx
    from onnx import TensorProto

    elem = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
            torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64}  # fmt: skip
    problems = []
    names_in = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    names_out = [o.name for o in model.graph.output]
    if names_in != spec.input_names or names_out != spec.output_names:
        problems.append(f"inputs {names_in} and outputs {names_out}, the spec says {spec.input_names} and {spec.output_names}")
    for v in [*model.graph.input, *model.graph.output]:
        t = spec.tensors.get(v.name)
        if t is None:
            continue
        want_type = elem[t.dtype]
        if v.type.tensor_type.elem_type != want_type:
            problems.append(f"{v.name!r} has element type {TensorProto.DataType.Name(v.type.tensor_type.elem_type)}, "
                            f"the spec {TensorProto.DataType.Name(want_type)}")  # fmt: skip
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        if dims != list(t.shape):
            problems.append(f"{v.name!r} has shape {dims}, the spec {list(t.shape)}")
    types = _elem_types(onnx.shape_inference.infer_shapes(model))
    bad = [n.name for n in model.graph.node if n.op_type == "Resize" and types.get(n.input[0]) == TensorProto.BFLOAT16]
    if bad:
        problems.append(f"bf16 Resize nodes (TensorRT has none): {bad}")
    if problems:
        raise ValueError(f"{spec.network}: exported graph does not match the spec: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# parity


@dataclass
class ParityReport:
    network: str
    batch: int
    max_rel_error: float  # max |onnx - eager| / max |eager|
    rel_l2_error: float  # ||onnx - eager|| / ||eager||
    sds_cosine: float | None = None  # UNet: cosine between the SDS gradients from both


def sds_gradient(noise_pred: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """w(t) (eps_u + s (eps_c - eps_u) - eps) from a UNet output [2K, C, h, w] laid out
    [uncond; cond], the added noise [K, C, h, w] and w [K]."""
    return weight.view(-1, 1, 1, 1) * (cfg_combine(noise_pred, guidance_scale) - noise.float())


def onnx_parity(
    path: str | Path,
    module: nn.Module,
    spec: NetworkSpec,
    *,
    batch: int | None = None,
    seed: int = 0,
    guidance_scale: float = 100.0,
    alphas_cumprod: torch.Tensor | None = None,
) -> ParityReport:
    """Run the ONNX file with onnxruntime (CPU) and the eager `module` on the same inputs.

    For the UNet the inputs form an SDS step (batch [uncond; cond] on the same x_t and t, from
    latents + noise) and the report adds the cosine similarity of the two SDS gradients,
    weighted by w(t) = 1 - alphas_cumprod[t] when `alphas_cumprod` [T] is given.
    Meant for fp32 graphs: onnxruntime's CPU kernels cover few fp16 ops.
    """
    import onnxruntime as ort

    batch = spec.check_batch(batch if batch is not None else trace_batch(spec))
    gen = torch.Generator().manual_seed(seed)
    inputs = spec.sample_inputs(batch, "cpu", gen)
    noise = weight = None
    if spec.network == "unet":
        if batch % 2:
            raise ValueError(f"unet parity needs an even batch ([uncond; cond]), got {batch}")
        k = batch // 2
        latents, noise = inputs["sample"][:k].float(), inputs["sample"][k:].float()
        t = inputs["timestep"][:k]
        a = alphas_cumprod.float().cpu()[t.long()] if alphas_cumprod is not None else torch.full((k,), 0.5)
        x_t = a.sqrt().view(-1, 1, 1, 1) * latents + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
        inputs["sample"] = torch.cat([x_t, x_t]).to(spec.inputs[0].dtype)
        inputs["timestep"] = torch.cat([t, t])
        weight = 1 - a if alphas_cumprod is not None else torch.ones(k)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {n: x.numpy() for n, x in inputs.items()})[0])
    device = module_device(module)
    with torch.no_grad():
        ref = module(*(x.to(device) for x in inputs.values())).float().cpu()
    got = got.float()
    diff = (got - ref).abs()
    report = ParityReport(
        network=spec.network,
        batch=batch,
        max_rel_error=float(diff.max() / ref.abs().max().clamp_min(1e-30)),
        rel_l2_error=float((got - ref).norm() / ref.norm().clamp_min(1e-30)),
    )
    if spec.network == "unet":
        g_onnx = sds_gradient(got, noise, weight, guidance_scale).flatten()
        g_ref = sds_gradient(ref, noise, weight, guidance_scale).flatten()
        report.sds_cosine = float(torch.nn.functional.cosine_similarity(g_onnx, g_ref, dim=0))
    log.info("%s parity at batch %d: %s", spec.network, batch, report)
    return report
