"""ONNX export of the frozen networks, graph clean-up and checks, and onnxruntime parity.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. On torch 2.13 it exports
diffusers' UNet, AutoencoderKL halves and the CLIP text model with a correct dynamic batch (the
tests run batch sizes other than the traced one through onnxruntime) and needs nothing beyond
`onnx`. The torch.export-based exporter (``dynamo=True``, the default since torch 2.9) needs the
``onnxscript`` package; `export_onnx(..., dynamo=True)` uses it with `torch.export` dynamic shapes
from the same spec when it is installed.

After export the graph is loaded with `onnx`, constant-folded by polygraphy when it is
importable (optional), shape-inferred, saved (with one external-data file ``<name>.onnx.data``
when the model is over protobuf's 2 GB), checked with the path-based `onnx.checker` and only
then moved into place, so a failed export never leaves a file a later build would trust.
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
        model = fold_constants(model)
        staged = Path(tmp) / path.name
        files = save_onnx(model, staged)
        check_onnx(staged)
        _check_io(onnx.load(str(staged), load_external_data=False), spec)
        final = []
        for f in sorted(files, key=lambda f: f.suffix == ".onnx"):  # data first, the .onnx last
            os.replace(f, path.parent / f.name)
            final.append(path.parent / f.name)
    log.info("wrote %s", ", ".join(str(f) for f in final))
    return final


def fold_constants(model):
    """Constant-fold with polygraphy when it is installed (the legacy exporter already folds
    most constants); returns `model` unchanged otherwise."""
    try:
        from polygraphy.backend.onnx import fold_constants as poly_fold
    except ImportError:
        log.debug("polygraphy not importable: skipping its constant folding")
        return model
    try:
        return poly_fold(model, allow_onnxruntime_shape_inference=True, error_ok=True)
    except Exception as exc:  # noqa: BLE001 -- folding is an optimisation; the checked graph stands
        log.warning("polygraphy constant folding failed (%s); keeping the exported graph", exc)
        return model


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


def check_onnx(path: str | Path) -> None:
    """`onnx.checker` on the file (path-based, so models with external data work)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"ONNX check failed for '{path}': {str(exc).splitlines()[0]}") from exc


def _check_io(model, spec: NetworkSpec) -> None:
    names_in = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    names_out = [o.name for o in model.graph.output]
    if names_in != spec.input_names or names_out != spec.output_names:
        raise ValueError(
            f"{spec.network}: exported graph has inputs {names_in} and outputs {names_out}, "
            f"the spec says {spec.input_names} and {spec.output_names}"
        )


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
