"""A STAND-IN for the `tensorrt` module that records calls. It is not TensorRT and computes nothing.

TensorRT cannot be installed on the machines these tests run on, so the contract tests
(tests/test_engines_trt_contract.py) inject this module as ``sys.modules["tensorrt"]`` and drive
this project's calling code with it: `engines.tensorrt.build_engine` and `TensorRTEngine`. What
they check is the calling code's side of the contract (which memory it hands over and for how
long, which stream it enqueues on, how many contexts, which shapes and profiles), never what
TensorRT does with them.

It implements only the members the code uses, with the parameter names of NVIDIA's Python API
documentation (the test's `TRT_API` table lists them with the versions they were checked
against), so code that calls anything else fails here with an AttributeError. A "plan" is JSON:
the parser reads the ONNX file's inputs and outputs with `onnx`, the builder writes them with
the optimization profiles it was given, and the runtime reads them back.

`calls` is the log every object appends to, as tuples starting with the call's name. `FakeCuda`
is the matching stand-in for the CUDA calls `engines.tensorrt` makes through torch (streams,
graphs, device switches), logging to the same list so the order of events can be checked.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
from typing import Any

__version__ = "10.9.0"
calls: list[tuple] = []
_handles = itertools.count(0x1000)


def reset(version: str = "10.9.0") -> None:
    global __version__
    __version__ = version
    calls.clear()


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BF16 = 7
    INT64 = 8


float32, float16, int32, bfloat16, int64 = DataType.FLOAT, DataType.HALF, DataType.INT32, DataType.BF16, DataType.INT64
_FROM_ONNX = {1: float32, 10: float16, 6: int32, 16: bfloat16, 7: int64}  # onnx.TensorProto element types


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        # Unless the subclass raises it, every message, VERBOSE included, reaches Python (what
        # the review of the old logger found: thousands of calls per build).
        self.min_severity = ILogger.Severity.VERBOSE

    def log(self, severity: Any, msg: str) -> None:  # overridden by the project's logger
        pass


def emit(logger: ILogger, severity: ILogger.Severity, msg: str) -> bool:
    """What TensorRT's C++ side does with a message: call the Python logger only when the
    severity passes `min_severity`. True if it was called."""
    if severity > logger.min_severity:
        return False
    logger.log(severity, msg)
    return True


class IProgressMonitor:
    def __init__(self) -> None:
        pass


class ITensor:
    def __init__(self, name: str, dtype: DataType, shape: list[int]) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> ITensor:
        return self.inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self.outputs[index]


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, model: str) -> bool:
        import onnx

        calls.append(("parse_from_file", model))
        graph = onnx.load(model, load_external_data=False).graph
        init = {t.name for t in graph.initializer}

        def tensor(v: Any) -> ITensor:
            dims = [d.dim_value if not d.dim_param else -1 for d in v.type.tensor_type.shape.dim]
            return ITensor(v.name, _FROM_ONNX[v.type.tensor_type.elem_type], dims)

        self.network.inputs = [tensor(v) for v in graph.input if v.name not in init]
        self.network.outputs = [tensor(v) for v in graph.output]
        return True

    def get_error(self, index: int) -> str:
        return ""


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 -- TensorRT's names
        self.shapes[input] = (list(min), list(opt), list(max))


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> memoryview:
        return memoryview(b"timing-cache:" + self.data)


class IBuilderConfig:
    def __init__(self) -> None:
        self.profiles: list[IOptimizationProfile] = []
        self.builder_optimization_level = 3
        self.progress_monitor: Any = None
        self._cache: ITimingCache | None = None

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        calls.append(("set_memory_pool_limit", pool, pool_size))

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        assert self._cache is not None
        return self._cache


DEVICE_MEMORY = 4096  # bytes a context of a fake engine asks for, unless the plan says otherwise


class Builder:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        calls.append(("create_network", flags))
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> memoryview:
        calls.append(("build_serialized_network", config.builder_optimization_level, [p.shapes for p in config.profiles],
                      FakeCuda.active.state()))  # fmt: skip
        plan = {
            "io": [(t.name, t.dtype.name, t.shape, True) for t in network.inputs] + [(t.name, t.dtype.name, t.shape, False) for t in network.outputs],
            "profiles": [p.shapes for p in config.profiles],
            "device_memory": DEVICE_MEMORY,
        }
        return memoryview(json.dumps(plan).encode())


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> "ICudaEngine":
        return ICudaEngine(json.loads(bytes(serialized_engine)))


class ICudaEngine:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.io = {name: (DataType[dtype], shape, is_input) for name, dtype, shape, is_input in plan["io"]}
        self.names = [row[0] for row in plan["io"]]
        self.contexts: list[IExecutionContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.plan["profiles"])

    @property
    def device_memory_size_v2(self) -> int:
        return int(self.plan["device_memory"])

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io[name][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self.io[name][2] else TensorIOMode.OUTPUT

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[list[int]]:
        return [list(s) for s in self.plan["profiles"][profile_index][name]]

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy.STATIC) -> "IExecutionContext":
        ctx = IExecutionContext(self, strategy, len(self.contexts))
        self.contexts.append(ctx)
        calls.append(("create_execution_context", ctx.index, strategy))
        return ctx


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy: ExecutionContextAllocationStrategy, index: int) -> None:
        self.engine, self.strategy, self.index = engine, strategy, index
        self.profile: int | None = None
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if any(c.profile == profile_index for c in self.engine.contexts if c is not self):
            return False  # TensorRT: a profile belongs to one context
        self.profile = profile_index
        calls.append(("set_optimization_profile_async", self.index, profile_index, stream_handle))
        return True

    def set_device_memory(self, memory: int, size: int) -> None:
        self.memory = (memory, size)
        calls.append(("set_device_memory", self.index, memory, size))

    def set_input_shape(self, name: str, shape: Any) -> bool:
        lo, _, hi = self.engine.plan["profiles"][self.profile or 0][name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        calls.append(("set_input_shape", self.index, name, tuple(shape)))
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        _, shape, _ = self.engine.io[name]
        batch = next(iter(self.shapes.values()))[0]
        return tuple(batch if d == -1 else d for d in shape)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.memory is None:
            return False  # TensorRT refuses to run a user-managed context without memory
        calls.append(("execute_async_v3", self.index, stream_handle, dict(self.shapes), dict(self.addresses),
                      self.memory, FakeCuda.active.state()))  # fmt: skip
        return True


# ---------------------------------------------------------------------------------------------
# CUDA (what engines.tensorrt does through torch.cuda)


class FakeStream:
    def __init__(self, device: Any = None, handle: int | None = None) -> None:
        self.cuda_stream = next(_handles) if handle is None else handle
        self.device = device

    def wait_stream(self, stream: "FakeStream") -> None:
        calls.append(("wait_stream", self.cuda_stream, stream.cuda_stream))

    def synchronize(self) -> None:
        calls.append(("stream_synchronize", self.cuda_stream))


class FakeGraph:
    def __init__(self) -> None:
        self.captured: list[tuple] = []

    def replay(self) -> None:
        calls.append(("replay", id(self), FakeCuda.active.state()))


class FakeCuda:
    """The namespace `engines.tensorrt._CUDA` is swapped for. The caller's stream is the legacy
    default stream (handle 0), as in a program that never set one."""

    active: "FakeCuda"

    def __init__(self) -> None:
        self.devices: list[Any] = []
        self.streams: list[FakeStream] = [FakeStream(handle=0)]
        self.capturing: FakeGraph | None = None
        FakeCuda.active = self

    def state(self) -> dict[str, Any]:
        return {"device": self.devices[-1] if self.devices else None, "stream": self.streams[-1].cuda_stream,
                "capturing": id(self.capturing) if self.capturing else None}  # fmt: skip

    @contextlib.contextmanager
    def device(self, device: Any):
        self.devices.append(device)
        try:
            yield
        finally:
            self.devices.pop()

    def Stream(self, device: Any = None) -> FakeStream:  # noqa: N802 -- torch's name
        return FakeStream(device)

    def current_stream(self, device: Any = None) -> FakeStream:
        return self.streams[-1]

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        self.streams.append(stream)
        try:
            yield
        finally:
            self.streams.pop()

    def CUDAGraph(self) -> FakeGraph:  # noqa: N802 -- torch's name
        return FakeGraph()

    @contextlib.contextmanager
    def graph(self, graph: FakeGraph, stream: FakeStream | None = None):
        calls.append(("capture_begin", id(graph), stream.cuda_stream if stream else None))
        self.capturing = graph
        try:
            with self.stream(stream) if stream is not None else contextlib.nullcontext():
                yield
        finally:
            self.capturing = None
            calls.append(("capture_end", id(graph)))

    def synchronize(self, device: Any = None) -> None:
        calls.append(("device_synchronize", device))

    def record_stream(self, x: Any, stream: FakeStream) -> None:
        calls.append(("record_stream", x.data_ptr(), stream.cuda_stream))
