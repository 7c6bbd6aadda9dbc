"""Inductor artifacts on disk: a frozen network compiled once per batch, loaded without Dynamo.

`compile_network` pays Dynamo's trace of the whole UNet in every process, even when Inductor
finds every compiled kernel in its cache (about 7 s for SD 2.1-base on an H200, BENCHMARKS.md).
`precompiled_network` is its twin that keeps what the trace produced:

- **Compile, once per batch**: `torch.export` the wrapper (static shapes, parameters lifted to
  graph inputs), `torch._inductor.standalone_compile` the exported graph, and save the compiled
  artifact (Python wrapper and kernels, no weights: the parameters stay inputs) beside a JSON
  index of its inputs, both written atomically.
- **Load**: `CompiledArtifact.load`, then call it with the module's own parameters in the
  index's order and the spec's inputs: no export, no Dynamo, no guards.

The artifact is specialised on the inputs' shapes, dtypes and strides, so the module is
prepared exactly as `compile_network` prepares it (fused SDPA attention and channels_last
weights on CUDA) before both. Cudagraph modes wrap each batch's artifact in one
`torch.cuda.CUDAGraph` of our own (static input buffers; the output is overwritten by the next
call, as `engines.base` allows). Batches in the spec's range that were not warmed up go to a
lazily built `compile_network` runner, as before. Any failure to export, compile, save or load
falls back to `compile_network` for everything, with one warning: the artifact is a start-up
cache, never a requirement.

Artifacts live under ``<compile cache>/precompiled/<model key>/`` (the compile cache folder is
per torch version and GPU), named by network, batch, dtype, latent shape, options and device.
``DREAMFUSION_TRT_PRECOMPILE=0`` turns the path off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..atomic import atomic_path
from .inductor import _CUDAGRAPH_MODES, CompileMode, Runner, compile_network, prepare_for_compile, resolve_compile_mode
from .spec import NetworkSpec
from .wrappers import module_device

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what an artifact's index means changes
ENV = "DREAMFUSION_TRT_PRECOMPILE"


def precompile_enabled(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    return environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def standalone_available() -> bool:
    """Whether this torch has Inductor's precompilation API (torch >= 2.8)."""
    from torch import _inductor

    return hasattr(_inductor, "standalone_compile") and hasattr(_inductor, "CompiledArtifact")


def _options(mode: str) -> dict[str, Any]:
    """Inductor options of a compile mode, without its CUDA graphs (those are ours here)."""
    return {"max_autotune": True} if mode.startswith("max-autotune") else {}


def artifact_stem(spec: NetworkSpec, batch: int, mode: str, channels_last: bool, device: str = "cpu") -> str:
    """``unet-b2-float16-<hash>``: the network and batch readable, the rest (input shapes and
    dtypes, options, memory format, the device, format version) in a short hash. The device's
    index is part of it because Inductor's wrapper code names the GPU it was compiled for: a
    data-parallel rank on ``cuda:1`` compiles its own."""
    key = {
        "device": device,
        "format": FORMAT,
        "inputs": [(t.name, str(t.dtype), [batch if isinstance(d, str) else int(d) for d in t.shape]) for t in spec.inputs],
        "options": _options(mode),
        "channels_last": bool(channels_last),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec.network}-b{batch}-{str(spec.precision).removeprefix('torch.')}-{digest}"


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _export_graph(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, list[str], list[torch.Tensor]]:
    """The exported graph of `module` at `inputs`, its placeholders' meaning in order (a
    parameter or buffer name, or ``"input:<i>"``) and the example tensors in that order."""
    from torch.export.graph_signature import InputKind

    exported = torch.export.export(module, inputs, strict=False)
    named = _named_tensors(module)
    order: list[str] = []
    flat: list[torch.Tensor] = []
    user = 0
    for spec in exported.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            order.append(f"input:{user}")
            flat.append(inputs[user])
            user += 1
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in named:
            order.append(str(spec.target))
            flat.append(named[str(spec.target)])
        else:  # lifted constants, custom objects, tokens: nothing this index can rebuild at load
            raise ValueError(f"exported graph input {spec.target!r} of kind {spec.kind.name} is not a parameter, buffer or input")
    if user != len(inputs):
        raise ValueError(f"exported graph takes {user} of the {len(inputs)} inputs")
    return exported.graph_module, order, flat


def _bind(artifact: Callable[..., Any], order: list[str], module: nn.Module, num_inputs: int) -> Runner:
    """A runner calling `artifact` with `module`'s tensors in `order` and the spec's inputs."""
    named = _named_tensors(module)
    missing = [name for name in order if not name.startswith("input:") and name not in named]
    if missing:
        raise ValueError(f"the artifact needs tensors the module lacks: {', '.join(missing[:3])}")
    template: list[torch.Tensor | None] = [None if n.startswith("input:") else named[n] for n in order]
    places = [(i, int(n.split(":", 1)[1])) for i, n in enumerate(order) if n.startswith("input:")]  # (argument, input)
    if sorted(j for _, j in places) != list(range(num_inputs)):
        raise ValueError(f"the artifact's index does not name the {num_inputs} inputs once each")

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        args = template.copy()  # the parameters once, then the few inputs into their places
        for i, j in places:
            args[i] = inputs[j]
        out = artifact(*args)
        return out[0] if isinstance(out, (list, tuple)) else out

    return run


class _Graphed:
    """One CUDA graph around `run` at fixed input shapes: inputs are copied into static buffers,
    the graph replays, and the returned output is the graph's own (overwritten by the next call)."""

    def __init__(self, run: Runner, sample: tuple[torch.Tensor, ...]) -> None:
        self.inputs = [x.clone() for x in sample]
        stream = torch.cuda.Stream(device=sample[0].device)
        stream.wait_stream(torch.cuda.current_stream(sample[0].device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # lazy initialisation and kernel loads happen outside the capture
                run(*self.inputs)
        torch.cuda.current_stream(sample[0].device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = run(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return self.output


def compile_artifact(module: nn.Module, spec: NetworkSpec, batch: int, folder: Path, mode: str, channels_last: bool) -> Runner:
    """Export and compile `module` (already prepared) at `batch`, save the artifact and its
    index in `folder` (atomically), and return its runner (not graphed)."""
    device = module_device(module)
    inputs = tuple(spec.sample_inputs(batch, device, torch.Generator().manual_seed(0)).values())
    stem = artifact_stem(spec, batch, mode, channels_last, str(device))
    with torch.no_grad():
        graph, order, flat = _export_graph(module, inputs)
        artifact = torch._inductor.standalone_compile(graph, flat, dynamic_shapes="from_example_inputs", options=_options(mode))
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{stem}.bin") as tmp:
        artifact.save(path=str(tmp), format="binary")
    index = {"format": FORMAT, "torch": torch.__version__, "network": spec.network, "batch": batch, "inputs": order}
    with atomic_path(folder / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(index, indent=1))
    return _bind(artifact, order, module, len(inputs))


def load_artifact(module: nn.Module, spec: NetworkSpec, batch: int, folder: Path, mode: str, channels_last: bool) -> Runner | None:
    """The runner of a saved artifact for `batch`, or None when there is none. ValueError for
    an index that does not fit this module."""
    stem = artifact_stem(spec, batch, mode, channels_last, str(module_device(module)))
    path, index_path = folder / f"{stem}.bin", folder / f"{stem}.json"
    if not (path.is_file() and index_path.is_file()):
        return None
    index = json.loads(index_path.read_text())  # JSON only: nothing here is unpickled
    if index.get("format") != FORMAT or index.get("torch") != torch.__version__:
        return None
    artifact = torch._inductor.CompiledArtifact.load(path=str(path), format="binary")
    return _bind(artifact, list(index["inputs"]), module, len(spec.inputs))


def precompiled_network(
    module: nn.Module,
    spec: NetworkSpec,
    folder: str | Path,
    *,
    mode: CompileMode = "max-autotune-no-cudagraphs",
    batch_sizes: tuple[int, ...] = (),
    channels_last: bool | None = None,
) -> Runner:
    """`compile_network`'s twin that loads each of `batch_sizes` from an artifact in `folder`
    (compiling and saving it when there is none); other batches compile in-process on first
    use. Falls back to `compile_network` entirely when the artifact path fails."""
    device = module_device(module)
    mode, channels_last = resolve_compile_mode(mode, channels_last, device)
    if not batch_sizes or not standalone_available():
        return compile_network(module, spec, mode=mode, batch_sizes=batch_sizes, channels_last=channels_last)  # type: ignore[arg-type]
    prepare_for_compile(module, channels_last)
    folder = Path(folder)
    graphs = mode in _CUDAGRAPH_MODES and device.type == "cuda"
    runners: dict[int, Runner] = {}
    gen = torch.Generator().manual_seed(0)
    try:
        for b in batch_sizes:
            spec.check_batch(b)
            start = time.perf_counter()
            run = load_artifact(module, spec, b, folder, mode, channels_last)
            how = "loaded"
            if run is None:
                run = compile_artifact(module, spec, b, folder, mode, channels_last)
                how = "compiled and saved"
            sample = tuple(spec.sample_inputs(b, device, gen).values())
            with torch.no_grad():
                runners[b] = _Graphed(run, sample) if graphs else run
                runners[b](*sample)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            log.info("%s: %s the compiled artifact for batch %d (%s%s) in %.1f s", spec.network, how, b, mode,
                     ", one CUDA graph" if graphs else "", time.perf_counter() - start)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a start-up cache: any failure means the in-process compile
        log.warning("%s: the compiled artifact failed (%s: %s); compiling in-process instead", spec.network,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
        return compile_network(module, spec, mode=mode, batch_sizes=batch_sizes, channels_last=channels_last)
    fallback: list[Runner] = []

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        runner = runners.get(int(inputs[0].shape[0]))
        if runner is not None:
            return runner(*inputs)
        if not fallback:  # a batch not warmed up: the in-process compile, built once
            fallback.append(compile_network(module, spec, mode=mode, channels_last=channels_last))
        return fallback[0](*inputs)

    return run
