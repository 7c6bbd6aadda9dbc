"""Torch-native engines: `torch.compile` (Inductor) in-process, and AOTInductor packages on disk.

`compile_network` compiles a wrapper from `wrappers.py` with static shapes and warms it up at
the batch sizes given; any other batch inside the spec's range compiles (and, with CUDA graphs,
records) on its first call, so a run whose last prompts fill fewer slots keeps working, and the
batches in use never pay for a recompile after warm-up. On CUDA it also switches
diffusers attention to the fused SDPA processor (`AttnProcessor2_0`) and the weights to
channels_last. Modes:

- ``"max-autotune-no-cudagraphs"`` (default): autotuned GEMM/conv templates, no CUDA graphs;
  outputs are fresh tensors.
- ``"reduce-overhead"``: CUDA graphs around the compiled call (what helps at small batches,
  where launch overhead shows); the output lives in the graph's memory pool and **is
  overwritten by the next call** (the `engines.base` contract allows that).
- ``"max-autotune"`` (both) and ``"default"`` (fast to compile, e.g. on a CPU).

AOTInductor: `aoti_compile` runs `torch.export.export` of the wrapper with the spec's dynamic
batch, then `torch._inductor.aoti_compile_and_package` into a ``.pt2`` file that `aoti_load`
loads with `torch._inductor.aoti_load_package`, without recompiling. A package is bound to the
torch version and device kind it was built with (the manifest records both). It also works on
a CPU (with a C++ compiler), which is how the tests exercise it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import torch
from torch import nn

from ..atomic import atomic_path
from .spec import NetworkSpec
from .wrappers import module_device, use_fused_attention

log = logging.getLogger(__name__)

CompileMode = Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
Runner = Callable[..., torch.Tensor]  # the spec's inputs, positionally -> the first output


def compile_network(
    module: nn.Module,
    spec: NetworkSpec,
    *,
    mode: CompileMode = "max-autotune-no-cudagraphs",
    batch_sizes: tuple[int, ...] = (),
    channels_last: bool | None = None,
) -> Runner:
    """`torch.compile` a wrapper (static shapes) and warm it up at `batch_sizes`; returns a
    runner taking the spec's inputs at any batch of `spec.batch` (sizes not warmed up compile on
    first use). `channels_last` defaults to True on CUDA. The wrapped network is changed in place
    (attention processors, weight memory format)."""
    device = module_device(module)
    mode, channels_last = resolve_compile_mode(mode, channels_last, device)
    prepare_for_compile(module, channels_last)
    compiled = torch.compile(module, mode=mode, dynamic=False)
    graphs = mode in _CUDAGRAPH_MODES and device.type == "cuda"
    seen: set[int] = set()
    # Static shapes compile once per batch; dynamo stops recompiling a function after
    # `recompile_limit` (8) shapes and silently runs it eagerly, so lift the limit to the
    # number of batches the range holds while a new size compiles.
    limit = max(torch._dynamo.config.recompile_limit, spec.batch.max - spec.batch.min + 1)

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        batch = int(inputs[0].shape[0])
        if batch in seen:
            return compiled(*inputs)
        spec.check_batch(batch)
        with torch._dynamo.config.patch(recompile_limit=limit):
            out = compiled(*inputs)
        seen.add(batch)
        return out

    gen = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(3 if graphs else 1):  # cudagraph trees record on the 2nd/3rd call
                run(*spec.sample_inputs(b, device, gen).values())
        log.info("compiled %s (%s) for batch %d in %.1f s", spec.network, mode, b, time.perf_counter() - start)
    return run


def resolve_compile_mode(mode: str, channels_last: bool | None, device: torch.device) -> tuple[str, bool]:
    """A compile mode checked and with "auto" resolved, and the memory-format default (True on
    CUDA). ValueError for an unknown mode."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r} (expected one of {', '.join(COMPILE_MODES)})")
    if mode == "auto":  # CUDA graphs gave 3x eager at batch 2 on an H200 (BENCHMARKS.md)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    return mode, channels_last if channels_last is not None else device.type == "cuda"


def prepare_for_compile(module: nn.Module, channels_last: bool) -> None:
    """What every in-process compile of a wrapper does first, in place: diffusers attention as
    fused SDPA on CUDA, and the weights in channels_last when asked."""
    if module_device(module).type == "cuda":
        use_fused_attention(module)
    if channels_last:
        module.to(memory_format=torch.channels_last)


def aoti_compile(
    module: nn.Module,
    spec: NetworkSpec,
    package_path: str | Path,
    *,
    inductor_configs: dict[str, Any] | None = None,
) -> Path:
    """Export `module` with the spec's dynamic batch and compile it into an AOTInductor
    package at `package_path` (``.pt2``), written atomically."""
    package_path = Path(package_path)
    if package_path.suffix != ".pt2":
        raise ValueError(f"AOTInductor package path must end in .pt2, got '{package_path}'")
    device = module_device(module)
    batch = min(max(2, spec.batch.min), spec.batch.max)
    inputs = tuple(spec.sample_inputs(batch, device, torch.Generator().manual_seed(0)).values())
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(module, inputs, dynamic_shapes=spec.export_dynamic_shapes(), strict=False)
        with atomic_path(package_path) as tmp:
            torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp), inductor_configs=inductor_configs or {})
    log.info("AOTInductor package for %s written to %s in %.0f s", spec.network, package_path, time.perf_counter() - start)
    return package_path


_SMOKE_CHILD = """
import json, sys, torch
path, device, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
index = torch.device(device).index or 0 if device.startswith("cuda") else -1
model = torch._inductor.aoti_load_package(path, device_index=index)
args = [torch.rand(v["shape"], device=device).to(getattr(torch, v["dtype"])) for v in inputs]
with torch.no_grad():
    out = model(*args)
out = out[0] if isinstance(out, (list, tuple)) else out
if device.startswith("cuda"):
    torch.cuda.synchronize()
assert torch.isfinite(out.float()).all(), "non-finite output"
"""


def aoti_smoke_check(package_path: str | Path, inputs: dict[str, torch.Tensor], timeout_s: float = 900) -> str | None:
    """Load `package_path` and call it once on random inputs shaped like `inputs`, in a child
    process; return None if that worked, else why not.

    A child process, because a broken package does not raise: an SD-sized UNet package built by
    torch 2.11 segfaults inside its wrapper on the first call (seen on an H200), which would take
    the whole training run down with it.
    """
    import json
    import subprocess
    import sys

    first = next(iter(inputs.values()))
    shapes = [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in inputs.values()]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SMOKE_CHILD, str(package_path), str(first.device), json.dumps(shapes)],
            capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"its first call did not finish within {timeout_s:.0f} s"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"it crashed on its first call (signal {-proc.returncode})"
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return f"its first call failed: {lines[-1] if lines else f'exit code {proc.returncode}'}"


def aoti_load(package_path: str | Path, device: torch.device | str) -> Runner:
    """Load a package written by `aoti_compile` (no recompilation); returns a runner."""
    package_path = Path(package_path)
    if not package_path.is_file():
        raise FileNotFoundError(f"AOTInductor package not found: '{package_path}'")
    device = torch.device(device)
    index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else -1
    model = torch._inductor.aoti_load_package(str(package_path), device_index=index)

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        out = model(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out

    return run
