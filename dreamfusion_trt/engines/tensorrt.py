"""TensorRT: build an engine from ONNX, and run it zero-copy on torch tensors.

Written against the TensorRT 10/11 Python API; `tensorrt` is imported inside the functions
that need it, so this module imports on machines without it.

Build (`build_engine`): `OnnxParser` into a strongly typed network (the ``STRONGLY_TYPED``
creation flag on TensorRT 10; TensorRT 11 is strongly typed always and has no FP16 builder
flag), so precision comes from the ONNX graph: an fp16 graph with fp32 islands (see
`wrappers.py`) builds fp16 kernels with fp32 group norms and softmaxes. One optimization profile
from the spec, a timing cache file read before and written after, build progress logged
through an `IProgressMonitor`, and the plan written atomically.

Runtime (`TensorRTEngine`): deserialise once, allocate outputs once at the profile's largest
batch, and per call bind the caller's tensors by `data_ptr()` and enqueue on the caller's
current CUDA stream. **Output buffers belong to the engine and are overwritten by its next
call**; clone what you keep. Optionally the engine call is captured in a CUDA graph per batch
size (inputs are then copied into the graph's static buffers), and several engines that run
one after another can share one activation-memory block (`SharedDeviceMemory`).
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_bytes
from .adapters import NetworkImageEncoder, NetworkLatentDecoder, NetworkNoisePredictor
from .spec import NetworkSpec

log = logging.getLogger(__name__)

TENSORRT_INSTALL = (
    "TensorRT is not installed: pip install --extra-index-url https://pypi.nvidia.com 'dreamfusion-trt[tensorrt]'"
)


class TensorRTError(RuntimeError):
    """A TensorRT or CUDA call failed; the message carries TensorRT's logged errors."""


def import_tensorrt() -> Any:
    """The `tensorrt` module, or ValueError with the install line."""
    try:
        import tensorrt
    except ImportError as exc:  # the ImportError stays attached as __cause__
        raise ValueError(TENSORRT_INSTALL) from exc
    return tensorrt


def tensorrt_version() -> str | None:
    try:
        return str(import_tensorrt().__version__)
    except ValueError:
        return None


_LOGGER: Any = None


def _logger(trt: Any) -> Any:
    """Process-wide TensorRT logger forwarding to `logging` and remembering recent errors."""
    global _LOGGER
    if _LOGGER is None:
        severity = trt.ILogger.Severity
        levels = {severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR, severity.WARNING: logging.WARNING}

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: collections.deque[str] = collections.deque(maxlen=16)

            def log(self, sev: Any, msg: str) -> None:
                level = levels.get(sev, logging.DEBUG)
                if level >= logging.ERROR:
                    self.errors.append(msg)
                log.log(level, "TensorRT: %s", msg)

        _LOGGER = _Logger()
    return _LOGGER


def check(result: Any, what: str) -> Any:
    """Return `result`, or raise TensorRTError when it signals failure: False or None from a
    TensorRT call, or a non-zero status first in a cuda-python ``(err, ...)`` tuple. The message
    includes the errors TensorRT logged since the last check."""
    errors = list(_LOGGER.errors) if _LOGGER is not None else []
    if _LOGGER is not None:
        _LOGGER.errors.clear()
    status = result[0] if isinstance(result, tuple) and result else None
    if status is not None and hasattr(status, "name") and int(status) != 0:
        raise TensorRTError(f"{what} failed: CUDA error {status.name}")
    if result is None or result is False:
        detail = "; ".join(errors) if errors else "no error logged by TensorRT"
        raise TensorRTError(f"{what} failed: {detail}")
    return result


def _trt_dtype(trt: Any, dtype: torch.dtype) -> Any:
    table = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int32: "int32", torch.int64: "int64"}
    return getattr(trt, table[dtype])


def _check_io(trt: Any, spec: NetworkSpec, found: dict[str, tuple[Any, bool]], where: str) -> None:
    """`found`: {tensor name: (TensorRT dtype, is_input)} from a network or an engine."""
    want = {t.name: (_trt_dtype(trt, t.dtype), True) for t in spec.inputs} | {
        t.name: (_trt_dtype(trt, t.dtype), False) for t in spec.outputs
    }
    if found != want:
        show = lambda d: ", ".join(f"{'in' if i else 'out'} {n}: {dt}" for n, (dt, i) in sorted(d.items()))  # noqa: E731
        raise ValueError(f"{where} does not match the {spec.network} spec: it has [{show(found)}], the spec [{show(want)}]")


# ---------------------------------------------------------------------------------------------
# build


def _progress_monitor(trt: Any) -> Any:
    class _Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            (log.info if parent_phase is None else log.debug)("TensorRT build: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            log.debug("TensorRT build: %s step %d", phase_name, step)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            log.debug("TensorRT build: %s done", phase_name)

    return _Progress()


def build_engine(
    onnx_path: str | Path,
    spec: NetworkSpec,
    engine_path: str | Path,
    *,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
    optimization_level: int = 3,
) -> Path:
    """Build a serialized engine for `spec`'s batch range from the ONNX file; returns its path."""
    trt = import_tensorrt()
    logger = _logger(trt)
    builder = check(trt.Builder(logger), "creating the TensorRT builder")
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = check(builder.create_network(flags), "creating the network definition")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"parsing '{onnx_path}' failed: {errors}")
    tensors = [(network.get_input(i), True) for i in range(network.num_inputs)]
    tensors += [(network.get_output(i), False) for i in range(network.num_outputs)]
    _check_io(trt, spec, {t.name: (t.dtype, is_in) for t, is_in in tensors}, f"'{onnx_path}'")

    config = check(builder.create_builder_config(), "creating the builder config")
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile().items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        check(None, f"adding the optimization profile {spec.profile()}")
    config.builder_optimization_level = optimization_level
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    cache_file = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
    cache = check(config.create_timing_cache(cache_bytes), "loading the timing cache")
    check(config.set_timing_cache(cache, False), "setting the timing cache")
    monitor = _progress_monitor(trt) if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor

    log.info("building TensorRT engine for %s, profile %s", spec.network, spec.profile_tag())
    start = time.perf_counter()
    plan = check(builder.build_serialized_network(network, config), f"building the {spec.network} engine")
    log.info("built %s in %.0f s (%.1f MiB)", spec.network, time.perf_counter() - start, plan.nbytes / 2**20)
    engine_path = Path(engine_path)
    atomic_write_bytes(engine_path, memoryview(plan))
    if cache_file is not None:
        atomic_write_bytes(cache_file, memoryview(config.get_timing_cache().serialize()))
    return engine_path


# ---------------------------------------------------------------------------------------------
# runtime


class SharedDeviceMemory:
    """One activation-memory block for engines that run one after another on one stream (the
    UNet, then the VAE decoder, ...): the block is as large as the largest engine needs."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self.buffer: torch.Tensor | None = None
        self._engines: list[TensorRTEngine] = []

    def attach(self, engine: "TensorRTEngine") -> None:
        size = engine.device_memory_size
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            for other in self._engines:  # the old block is gone: point everyone at the new one
                other._set_device_memory(self.buffer)
        self._engines.append(engine)
        engine._set_device_memory(self.buffer)


class TensorRTEngine:
    """A deserialized engine and its execution context, called with the spec's inputs.

    ``engine(*inputs) -> tuple(outputs)``: inputs are CUDA tensors in spec order; those that are
    contiguous and in the spec's dtype are bound as they are. The outputs are views of buffers
    the engine owns, valid until its next call.
    """

    def __init__(
        self,
        path: str | Path,
        spec: NetworkSpec,
        *,
        device: torch.device | str = "cuda",
        shared_memory: SharedDeviceMemory | None = None,
        cuda_graph: bool = False,
    ) -> None:
        trt = import_tensorrt()
        self.spec = spec
        self.device = torch.device(device)
        self.cuda_graph = cuda_graph
        self.path = Path(path)
        with torch.cuda.device(self.device):
            self._runtime = check(trt.Runtime(_logger(trt)), "creating the TensorRT runtime")
            self._engine = check(self._runtime.deserialize_cuda_engine(self.path.read_bytes()), f"deserializing '{path}'")
            e = self._engine
            names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
            found = {n: (e.get_tensor_dtype(n), e.get_tensor_mode(n) == trt.TensorIOMode.INPUT) for n in names}
            _check_io(trt, spec, found, f"engine '{path}'")
            if shared_memory is not None:
                strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
                self._context = check(e.create_execution_context(strategy), "creating an execution context")
                shared_memory.attach(self)
            else:
                self._context = check(e.create_execution_context(), "creating an execution context")
            self._outputs = spec.allocate_outputs(spec.batch.max, self.device)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}

    @property
    def device_memory_size(self) -> int:
        e = self._engine
        return int(e.device_memory_size_v2 if hasattr(e, "device_memory_size_v2") else e.device_memory_size)

    def _set_device_memory(self, buffer: torch.Tensor) -> None:
        if hasattr(self._context, "set_device_memory"):
            self._context.set_device_memory(buffer.data_ptr(), buffer.numel())
        else:
            self._context.device_memory = buffer.data_ptr()
        self._graphs.clear()  # captured graphs hold the old address

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = self.spec.check_inputs(inputs)
        bound = [x.to(device=self.device, dtype=t.dtype).contiguous() for x, t in zip(inputs, self.spec.inputs)]
        outs = [self._outputs[n][:batch] for n in self.spec.output_names]
        stream = torch.cuda.current_stream(self.device)
        if self.cuda_graph:
            self._replay(batch, bound, outs)
        else:
            self._bind(bound, outs)
            check(self._context.execute_async_v3(stream.cuda_stream), f"running the {self.spec.network} engine")
        return tuple(outs)

    def _bind(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        ctx = self._context
        changed = False
        for t, x in zip(self.spec.inputs, inputs):
            shape = tuple(x.shape)
            if self._shapes.get(t.name) != shape:
                check(ctx.set_input_shape(t.name, shape), f"set_input_shape({t.name!r}, {shape})")
                self._shapes[t.name] = shape
                changed = True
            check(ctx.set_tensor_address(t.name, x.data_ptr()), f"binding input {t.name!r}")
        for name, out in zip(self.spec.output_names, outputs):
            if changed and tuple(ctx.get_tensor_shape(name)) != tuple(out.shape):
                raise TensorRTError(f"{self.spec.network}: engine output {name!r} has shape {tuple(ctx.get_tensor_shape(name))}, "
                                    f"the spec says {tuple(out.shape)}")  # fmt: skip
            check(ctx.set_tensor_address(name, out.data_ptr()), f"binding output {name!r}")

    def _replay(self, batch: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """CUDA-graph path: one graph per batch size, captured on first use with its own static
        input buffers (the caller's tensors are copied in: their addresses change per call)."""
        if batch not in self._graphs:
            static = [x.clone() for x in inputs]
            self._bind(static, outputs)
            stream = torch.cuda.current_stream(self.device)
            check(self._context.execute_async_v3(stream.cuda_stream), "warm-up before CUDA-graph capture")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                check(self._context.execute_async_v3(torch.cuda.current_stream().cuda_stream), "CUDA-graph capture")
            self._graphs[batch] = (graph, static)
        graph, static = self._graphs[batch]
        for buf, x in zip(static, inputs):
            buf.copy_(x)
        graph.replay()

    def close(self) -> None:
        """Release the context, engine and runtime (in that order) and the output buffers."""
        self._graphs.clear()
        for attr in ("_context", "_engine", "_runtime", "_outputs"):
            if hasattr(self, attr):
                delattr(self, attr)


def _first(engine: TensorRTEngine):
    return lambda *xs: engine(*xs)[0]


class TensorRTNoisePredictor(NetworkNoisePredictor):
    """NoisePredictor running a UNet engine; returns the engine-owned output when the caller's
    latents are already in the engine's dtype (clone it to keep it past the next call)."""

    def __init__(self, engine: TensorRTEngine) -> None:
        super().__init__("tensorrt", _first(engine), engine.spec, engine.device)
        self.engine = engine


class TensorRTImageEncoder(NetworkImageEncoder):
    def __init__(self, engine: TensorRTEngine) -> None:
        super().__init__("tensorrt", _first(engine), engine.spec, engine.device)
        self.engine = engine


class TensorRTLatentDecoder(NetworkLatentDecoder):
    def __init__(self, engine: TensorRTEngine) -> None:
        super().__init__("tensorrt", _first(engine), engine.spec, engine.device)
        self.engine = engine
