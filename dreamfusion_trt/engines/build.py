"""Export and build every engine of a model once: ``dreamfusion-trt build-engines``.

For each requested network: the ONNX file (also the input of TensorRT), then the TensorRT plan
and the AOTInductor package. Each artifact is skipped when the manifest says it is up to date
(same recipe, file intact by sha256), so a second run with nothing changed does nothing. What
cannot be built here (no GPU, no TensorRT) is reported with the reason, and the rest is still
built: on a CPU machine the fp32 ONNX files are exported, checked and compared with the eager
networks through onnxruntime.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from .onnx_export import DEFAULT_OPSET, export_onnx, onnx_parity
from .artifacts import (
    ARTIFACT_BACKENDS,
    Manifest,
    RuntimeEnv,
    aoti_filename,
    current_env,
    device_tag,
    engine_filename,
    mismatches,
    model_folder,
    onnx_filename,
)
from .backends import LOADABLE_NETWORKS
from .tensorrt import OPTIMIZATION_LEVELS
from .spec import NETWORKS, NetworkSpec, make_spec, network_batch_sizes, precision_tag
from .wrappers import module_device, module_dtype, wrap_network

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (2, 8, 32)
DEFAULT_NETWORKS = LOADABLE_NETWORKS  # what a backend loads; the text encoder only on request
Status = Literal["built", "up to date", "not built", "failed"]


@dataclass
class BuildItem:
    backend: str
    network: str
    status: Status
    file: str | None = None
    reason: str = ""


@dataclass
class BuildReport:
    folder: Path
    items: list[BuildItem] = field(default_factory=list)

    def of(self, status: Status) -> list[BuildItem]:
        return [i for i in self.items if i.status == status]

    def summary(self) -> str:
        lines = [f"engines in '{self.folder}':"]
        for i in self.items:
            what = f"{i.backend:<11} {i.network:<12} {i.status:<10}"
            lines.append(f"  {what} {i.file or ''}{('  (' + i.reason + ')') if i.reason else ''}")
        return "\n".join(lines)


def _tensorrt_unavailable(env: RuntimeEnv) -> str | None:
    from .tensorrt import TENSORRT_INSTALL

    if env.tensorrt_version is None:
        return TENSORRT_INSTALL
    if env.device != "cuda":
        return "TensorRT engines are built on a CUDA GPU; the model is on the CPU"
    return None


def build_engines(
    model: Any,
    out: str | Path = "engines",
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    networks: Sequence[str] = DEFAULT_NETWORKS,
    backends: Sequence[str] = ARTIFACT_BACKENDS,
    vae_dtype: torch.dtype | None = None,
    opset: int = DEFAULT_OPSET,
    parity: bool = True,
    workspace_gib: float | None = None,
    optimization_level: int = 3,
    aoti_configs: dict[str, Any] | None = None,
    env: RuntimeEnv | None = None,
) -> BuildReport:
    """Build what is missing or stale under ``out/<model.key>/`` for a loaded `DiffusionModel`.

    `batch_sizes` are UNet batches (CFG doubling included); the VAE and text encoder get the
    matching prompt counts (`spec.network_batch_sizes`). Engines compute in the model's dtype,
    the VAE in `vae_dtype` if given (float32 for a VAE that overflows in fp16). `parity` compares
    fp32 ONNX files with the eager network through onnxruntime and records the errors.
    `optimization_level` is TensorRT's builder level (3 its default; 4-5 for final engines,
    slower to build). `aoti_configs` are passed to AOTInductor as ``inductor_configs``."""
    for n in networks:
        if n not in NETWORKS:
            raise ValueError(f"unknown network {n!r} (expected some of {', '.join(NETWORKS)})")
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"TensorRT builder optimization level must be 0-5, got {optimization_level!r}")
    for b in backends:
        if b not in ARTIFACT_BACKENDS:
            raise ValueError(f"unknown engine backend {b!r} (expected some of {', '.join(ARTIFACT_BACKENDS)})")
    env = env if env is not None else current_env(model.device)
    folder = model_folder(out, model.key)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(folder, model.key)
    report = BuildReport(folder)
    no_trt = _tensorrt_unavailable(env) if "tensorrt" in backends else None
    timing_cache = Path(out) / "timing_cache" / f"trt{env.tensorrt_version}.{device_tag(env)}.cache"

    steps = [(n, b) for n in networks for b in ARTIFACT_BACKENDS if b in backends or (b == "onnx" and "tensorrt" in backends and not no_trt)]
    for i, (network, backend) in enumerate(steps, 1):
        dtype = vae_dtype if (vae_dtype is not None and network.startswith("vae")) else model.dtype
        spec = make_spec(model, network, network_batch_sizes(network, batch_sizes), dtype=dtype)
        log.info("[%d/%d] %s %s (%s, batch %s)", i, len(steps), backend, network, precision_tag(dtype), spec.profile_tag())
        try:
            item = _build_one(backend, model, spec, manifest, env, opset=opset, parity=parity, no_trt=no_trt,
                              timing_cache=timing_cache, workspace_gib=workspace_gib,
                              optimization_level=optimization_level, aoti_configs=aoti_configs)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 -- one failed artifact must not stop the others
            log.exception("%s %s failed", backend, network)
            item = BuildItem(backend, network, "failed", reason=f"{type(exc).__name__}: {exc}")
        report.items.append(item)
        log.info("%s %s: %s %s", backend, network, item.status, item.file or item.reason)
    return report


def _module(model: Any, network: str, dtype: torch.dtype) -> torch.nn.Module:
    module = wrap_network(model, network)
    return module if module_dtype(module) == dtype else copy.deepcopy(module).to(dtype)


def _build_one(
    backend: str,
    model: Any,
    spec: NetworkSpec,
    manifest: Manifest,
    env: RuntimeEnv,
    *,
    opset: int,
    parity: bool,
    no_trt: str | None,
    timing_cache: Path,
    workspace_gib: float | None,
    optimization_level: int,
    aoti_configs: dict[str, Any] | None,
) -> BuildItem:
    network = spec.network
    onnx_name = onnx_filename(spec)
    if backend == "onnx":
        recipe = {"model_key": model.key, "io": spec.io_fingerprint(), "opset": opset, "exporter": "torchscript",
                  "fp32_islands": "norms", "resize_casts": True}  # fmt: skip
        stale = manifest.stale_reason(onnx_name, recipe)
        if stale is None:
            return BuildItem("onnx", network, "up to date", onnx_name)
        log.info("exporting %s: %s", onnx_name, stale)
        module = _module(model, network, spec.precision)
        files = export_onnx(module, spec, manifest.folder / onnx_name, opset=opset)
        fields: dict[str, Any] = {}
        if parity and spec.precision == torch.float32:
            r = onnx_parity(manifest.folder / onnx_name, module, spec, alphas_cumprod=model.alphas_cumprod)
            fields["parity"] = {"batch": r.batch, "max_rel_error": r.max_rel_error, "rel_l2_error": r.rel_l2_error, "sds_cosine": r.sds_cosine}
            if r.max_rel_error > 1e-3 or (r.sds_cosine is not None and r.sds_cosine < 0.999):
                log.warning("%s differs from the eager network: %s", onnx_name, fields["parity"])
        manifest.record(onnx_name, backend="onnx", spec=spec, env=env, recipe=recipe,
                        extra_files=[f.name for f in files if f.name != onnx_name], **fields)  # fmt: skip
        return BuildItem("onnx", network, "built", onnx_name)

    if backend == "tensorrt":
        if no_trt:
            return BuildItem("tensorrt", network, "not built", reason=no_trt)
        from .tensorrt import build_engine

        source = manifest.files.get(onnx_name)
        if source is None or manifest.verify_file(onnx_name) is not None:
            return BuildItem("tensorrt", network, "not built", reason=f"its ONNX file '{onnx_name}' is missing or changed")
        name = engine_filename(spec, env)
        recipe = {"model_key": model.key, "io": spec.io_fingerprint(), "profiles": spec.sizes_tag(),
                  "onnx_sha256": source["sha256"], "optimization_level": optimization_level}  # fmt: skip
        stale = manifest.stale_reason(name, recipe)
        if stale is None:
            return BuildItem("tensorrt", network, "up to date", name)
        for other, e in manifest.entries("tensorrt", network):
            if e.get("precision") == precision_tag(spec.precision) and e["recipe"].get("profiles") == spec.sizes_tag() and mismatches(e, env):
                log.info("'%s' does not fit this machine (%s): building '%s'", other, "; ".join(mismatches(e, env)), name)
        log.info("building %s: %s", name, stale)
        build_engine(manifest.folder / onnx_name, spec, manifest.folder / name, timing_cache=timing_cache,
                     workspace_gib=workspace_gib, optimization_level=optimization_level, device=model.device)  # fmt: skip
        manifest.record(name, backend="tensorrt", spec=spec, env=env, recipe=recipe, source=onnx_name)
        return BuildItem("tensorrt", network, "built", name)

    from .inductor import aoti_compile, aoti_smoke_check

    name = aoti_filename(spec, env)
    recipe = {"model_key": model.key, "io": spec.io_fingerprint(), "profile": spec.profile_tag()}
    stale = manifest.stale_reason(name, recipe)
    if stale is None:
        return BuildItem("aotinductor", network, "up to date", name)
    log.info("compiling %s: %s", name, stale)
    module = _module(model, network, spec.precision)
    aoti_compile(module, spec, manifest.folder / name, inductor_configs=aoti_configs)
    # Never record a package that cannot run: `auto` would pick it and crash the run.
    inputs = spec.sample_inputs(spec.batch.max, module_device(module), torch.Generator().manual_seed(0))
    failure = aoti_smoke_check(manifest.folder / name, inputs)
    if failure is not None:
        (manifest.folder / name).unlink(missing_ok=True)
        log.warning("aotinductor %s: %s; package removed", network, failure)
        return BuildItem("aotinductor", network, "failed", reason=f"package built, but {failure}")
    manifest.record(name, backend="aotinductor", spec=spec, env=env, recipe=recipe)
    return BuildItem("aotinductor", network, "built", name)


# ---------------------------------------------------------------------------------------------
# command line
