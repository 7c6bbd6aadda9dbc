"""Contract tests of this project's TensorRT calling code, with no TensorRT.

`fake_tensorrt` (a stand-in that records calls, not TensorRT) is injected as ``tensorrt`` and
`engines.tensorrt._CUDA` is swapped for its recording CUDA stand-in; the tests then check the
obligations of `build_engine` and `TensorRTEngine` towards TensorRT: the memory they hand over
lives as long as it is used and has the size asked for, work goes on a stream of the engine's own
(never the legacy default stream) ordered against the caller's, one execution context per
optimization profile and per captured graph, input shapes set only when they change, misaligned
inputs copied, profiles derived from the spec. They say nothing about what TensorRT computes:
the `tensorrt`-marked GPU tests (tests/test_engines_tensorrt.py) do, where TensorRT runs.

`TRT_API` is every `tensorrt` name and member the code uses, with the parameter names and the
TensorRT 10.x / 11.x Python API documentation pages they were checked against; the stand-in
implements exactly these, so code that calls anything else fails here.
"""

from __future__ import annotations

import ast
import gc
import inspect
import logging
import sys
from pathlib import Path

import fake_tensorrt
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dreamfusion_trt.engines import tensorrt as trt_mod
from dreamfusion_trt.engines.spec import AxisRange, NetworkSpec, TensorSpec
from dreamfusion_trt.engines.tensorrt import SharedDeviceMemory, TensorRTEngine, TensorRTError, aligned_empty, build_engine

# ---------------------------------------------------------------------------------------------
# the API surface, as data

DOCS_10 = "TensorRT 10.x Python API (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api, 10.14/10.15; archives/tensorrt-1001 for 10.0.1)"
DOCS_11 = "TensorRT 11.x Python API (docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api, and 11.4.0)"
# (owner, member): (parameter names after self, or None for an attribute/enum member, {version: note}).
# Every entry was looked up in both documentation sets unless its note says otherwise.
TRT_API: dict[tuple[str, str], tuple[tuple[str, ...] | None, dict[str, str]]] = {
    ("tensorrt", "__version__"): (None, {"10": "module attribute", "11": "module attribute"}),
    ("tensorrt", "ILogger"): ((), {"10": "Core/Logger: subclass, call ILogger.__init__(self), override log(severity, msg)", "11": "same"}),
    ("ILogger", "Severity"): (None, {"10": "INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE", "11": "same"}),
    ("ILogger", "min_severity"): (None, {"10": "Core/Logger: 'minimum required severity of messages for the logger to log them'", "11": "same"}),
    ("ILogger", "log"): (("severity", "msg"), {"10": "Core/Logger", "11": "Core/Logger"}),
    ("ILogger", "__init__"): ((), {"10": "'explicitly instantiate the base class in __init__()'", "11": "same"}),
    ("IProgressMonitor", "__init__"): ((), {"10": "Core/ProgressMonitor: same subclassing rule", "11": "same"}),
    ("tensorrt", "Builder"): (("logger",), {"10": "Core/Builder: Builder(logger)", "11": "Core/Builder: Builder(logger)"}),
    ("Builder", "create_network"): (("flags",), {"10": "flags = 1 << STRONGLY_TYPED for a strongly typed network", "11": "strongly typed always; flags=0"}),
    ("Builder", "create_builder_config"): ((), {"10": "Core/Builder", "11": "Core/Builder"}),
    ("Builder", "create_optimization_profile"): ((), {"10": "Core/Builder", "11": "Core/Builder"}),
    ("Builder", "build_serialized_network"): (("network", "config"), {"10": "returns IHostMemory (buffer protocol) or None", "11": "same"}),
    ("tensorrt", "NetworkDefinitionCreationFlag"): (None, {"10": "STRONGLY_TYPED", "11": "STRONGLY_TYPED deprecated in 11.0, 'retained for API compatibility but ignored': used on 10 only"}),
    ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"): (None, {"10": "Core/Builder", "11": "deprecated, ignored (not used on 11)"}),
    ("tensorrt", "OnnxParser"): (("network", "logger"), {"10": "Parsers/Onnx/pyOnnx", "11": "same"}),
    ("OnnxParser", "parse_from_file"): (("model",), {"10": "returns bool", "11": "returns bool"}),
    ("OnnxParser", "num_errors"): (None, {"10": "attribute", "11": "attribute"}),
    ("OnnxParser", "get_error"): (("index",), {"10": "IParserError", "11": "same"}),
    ("INetworkDefinition", "num_inputs"): (None, {"10": "Graph/Network", "11": "same"}),
    ("INetworkDefinition", "num_outputs"): (None, {"10": "Graph/Network", "11": "same"}),
    ("INetworkDefinition", "get_input"): (("index",), {"10": "Graph/Network", "11": "same"}),
    ("INetworkDefinition", "get_output"): (("index",), {"10": "Graph/Network", "11": "same"}),
    ("ITensor", "name"): (None, {"10": "Graph/Network ITensor", "11": "same"}),
    ("ITensor", "dtype"): (None, {"10": "Graph/Network ITensor", "11": "same"}),
    ("IBuilderConfig", "add_optimization_profile"): (("profile",), {"10": "returns the profile index, -1 on error", "11": "same"}),
    ("IBuilderConfig", "builder_optimization_level"): (None, {"10": "0-5, default 3", "11": "same"}),
    ("IBuilderConfig", "set_memory_pool_limit"): (("pool", "pool_size"), {"10": "Core/BuilderConfig", "11": "same"}),
    ("IBuilderConfig", "create_timing_cache"): (("serialized_timing_cache",), {"10": "Core/BuilderConfig", "11": "same"}),
    ("IBuilderConfig", "set_timing_cache"): (("cache", "ignore_mismatch"), {"10": "returns bool", "11": "same"}),
    ("IBuilderConfig", "get_timing_cache"): ((), {"10": "Core/BuilderConfig", "11": "same"}),
    ("IBuilderConfig", "progress_monitor"): (None, {"10": "IProgressMonitor, from 10.0", "11": "same"}),
    ("ITimingCache", "serialize"): ((), {"10": "Core/BuilderConfig ITimingCache", "11": "same"}),
    ("tensorrt", "IProgressMonitor"): ((), {"10": "subclass with phase_start, step_complete, phase_finish", "11": "same"}),
    ("IOptimizationProfile", "set_shape"): (("input", "min", "opt", "max"), {"10": "Core/OptimizationProfile", "11": "same"}),
    ("tensorrt", "MemoryPoolType"): (None, {"10": "WORKSPACE", "11": "WORKSPACE"}),
    ("MemoryPoolType", "WORKSPACE"): (None, {"10": "Core/BuilderConfig", "11": "same"}),
    ("tensorrt", "Runtime"): (("logger",), {"10": "Core/Runtime", "11": "same"}),
    ("Runtime", "deserialize_cuda_engine"): (("serialized_engine",), {"10": "Core/Runtime, None on failure", "11": "same"}),
    ("ICudaEngine", "num_io_tensors"): (None, {"10": "Core/Engine", "11": "Core/Engine"}),
    ("ICudaEngine", "get_tensor_name"): (("index",), {"10": "Core/Engine", "11": "same"}),
    ("ICudaEngine", "get_tensor_dtype"): (("name",), {"10": "Core/Engine", "11": "same"}),
    ("ICudaEngine", "get_tensor_mode"): (("name",), {"10": "Core/Engine", "11": "same"}),
    ("ICudaEngine", "get_tensor_profile_shape"): (("name", "profile_index"), {"10": "[min, opt, max]", "11": "same"}),
    ("ICudaEngine", "num_optimization_profiles"): (None, {"10": "Core/Engine", "11": "same"}),
    ("ICudaEngine", "device_memory_size_v2"): (None, {"10": "from 10.1 (device_memory_size deprecated)", "11": "only this one (device_memory_size removed)"}),
    ("ICudaEngine", "create_execution_context"): (("strategy",), {"10": "ExecutionContextAllocationStrategy, from 10.0", "11": "same"}),
    ("tensorrt", "TensorIOMode"): (None, {"10": "NONE, INPUT, OUTPUT", "11": "same"}),
    ("TensorIOMode", "INPUT"): (None, {"10": "Core/Engine", "11": "same"}),
    ("tensorrt", "ExecutionContextAllocationStrategy"): (None, {"10": "STATIC, ON_PROFILE_CHANGE, USER_MANAGED", "11": "same (Core/RuntimeConfig)"}),
    ("ExecutionContextAllocationStrategy", "USER_MANAGED"): (None, {"10": "'the user supplies custom allocation'", "11": "same"}),
    ("IExecutionContext", "set_optimization_profile_async"): (("profile_index", "stream_handle"), {"10": "a profile belongs to one context", "11": "same"}),
    ("IExecutionContext", "set_device_memory"): (("memory", "size"), {"10": "from 10.1 (setDeviceMemoryV2); 256-byte aligned", "11": "same"}),
    ("IExecutionContext", "set_input_shape"): (("name", "shape"), {"10": "returns bool", "11": "same"}),
    ("IExecutionContext", "get_tensor_shape"): (("name",), {"10": "Core/ExecutionContext", "11": "same"}),
    ("IExecutionContext", "set_tensor_address"): (("name", "memory"), {"10": "returns bool", "11": "same"}),
    ("IExecutionContext", "execute_async_v3"): (("stream_handle",), {"10": "returns bool", "11": "same"}),
    ("tensorrt", "float32"): (None, {"10": "DataType alias", "11": "same"}),
    ("tensorrt", "float16"): (None, {"10": "DataType alias", "11": "same"}),
    ("tensorrt", "bfloat16"): (None, {"10": "DataType alias", "11": "same"}),
    ("tensorrt", "int32"): (None, {"10": "DataType alias", "11": "same"}),
    ("tensorrt", "int64"): (None, {"10": "DataType alias", "11": "same"}),
}
# the stand-in's class for each documented owner
_FAKE = {
    "tensorrt": fake_tensorrt, "ILogger": fake_tensorrt.ILogger, "IProgressMonitor": fake_tensorrt.IProgressMonitor,
    "Builder": fake_tensorrt.Builder,
    "NetworkDefinitionCreationFlag": fake_tensorrt.NetworkDefinitionCreationFlag, "OnnxParser": fake_tensorrt.OnnxParser,
    "INetworkDefinition": fake_tensorrt.INetworkDefinition, "ITensor": fake_tensorrt.ITensor,
    "IBuilderConfig": fake_tensorrt.IBuilderConfig, "ITimingCache": fake_tensorrt.ITimingCache,
    "IOptimizationProfile": fake_tensorrt.IOptimizationProfile, "MemoryPoolType": fake_tensorrt.MemoryPoolType,
    "Runtime": fake_tensorrt.Runtime, "ICudaEngine": fake_tensorrt.ICudaEngine, "TensorIOMode": fake_tensorrt.TensorIOMode,
    "ExecutionContextAllocationStrategy": fake_tensorrt.ExecutionContextAllocationStrategy,
    "IExecutionContext": fake_tensorrt.IExecutionContext,
}  # fmt: skip


def _trt_names_in_source() -> set[tuple[str, str]]:
    """Every ``trt.<name>`` and ``trt.<name>.<member>`` in engines/tensorrt.py."""
    tree = ast.parse(Path(trt_mod.__file__).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
            found.add(("tensorrt", node.attr))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner = node.value
            if isinstance(inner.value, ast.Name) and inner.value.id == "trt":
                found.add((inner.attr, node.attr))
    return found


def test_every_trt_name_the_code_uses_is_documented_for_10_and_11():
    used = _trt_names_in_source()
    assert used, "the parser found no trt.* names"
    assert used - set(TRT_API) == set()
    for key, (_, versions) in TRT_API.items():
        assert set(versions) == {"10", "11"}, key


def test_the_stand_in_implements_exactly_the_documented_members_with_their_parameter_names():
    for (owner, member), (params, _) in TRT_API.items():
        obj = _FAKE[owner]
        if params is None:
            continue  # attributes and enum members: exercised by the contract tests below
        target = getattr(obj, member)
        if isinstance(target, type):
            target = target.__init__
        names = [p for p in inspect.signature(target).parameters if p != "self"]
        assert tuple(names) == params, (owner, member, names)
    documented = {m for (o, m) in TRT_API if o != "tensorrt"}
    for owner, cls in _FAKE.items():
        if owner == "tensorrt" or not isinstance(cls, type):
            continue
        public = {n for n, v in vars(cls).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
        assert public - documented == set(), (owner, public - documented)


# ---------------------------------------------------------------------------------------------
# set-up: the stand-in in place of tensorrt, a spec, an ONNX file, a plan built by the fake


@pytest.fixture
def trt(monkeypatch):
    fake_tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(trt_mod, "_LOGGER", None)
    monkeypatch.setattr(trt_mod, "_CUDA", fake_tensorrt.FakeCuda())
    return fake_tensorrt


def _spec(sizes=(2, 8)) -> NetworkSpec:
    return NetworkSpec(
        "unet",
        (TensorSpec("sample", torch.float16, ("B", 4, 8, 8)), TensorSpec("timestep", torch.float32, ("B",)),
         TensorSpec("encoder_hidden_states", torch.float16, ("B", 77, 32))),
        (TensorSpec("noise_pred", torch.float16, ("B", 4, 8, 8)),),
        (("B", AxisRange(min(sizes), max(sizes), max(sizes))),), torch.float16, sizes=tuple(sizes),
    )  # fmt: skip


def _write_onnx(spec: NetworkSpec, path: Path) -> Path:
    elem = {torch.float16: TensorProto.FLOAT16, torch.float32: TensorProto.FLOAT}
    vi = lambda t: helper.make_tensor_value_info(t.name, elem[t.dtype], list(t.shape))  # noqa: E731
    graph = helper.make_graph([helper.make_node("Identity", ["sample"], ["noise_pred"])], "g",
                              [vi(t) for t in spec.inputs], [vi(t) for t in spec.outputs])  # fmt: skip
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.fixture
def plan(trt, tmp_path):
    spec = _spec()
    path = build_engine(_write_onnx(spec, tmp_path / "unet.onnx"), spec, tmp_path / "unet.plan", device="cpu")
    trt.calls.clear()
    return path, spec


def _inputs(batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Inputs in 256-byte aligned memory (torch's CPU allocator aligns less than its CUDA one)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in _spec().inputs:
        shape = (batch, *t.shape[1:])
        x = aligned_empty(shape, t.dtype, "cpu")
        x.copy_(torch.randn(shape, generator=gen))
        out.append(x)
    return out


def _calls(trt, name):
    return [c for c in trt.calls if c[0] == name]


# ---------------------------------------------------------------------------------------------
# build


@pytest.mark.parametrize("version, flags", [("10.9.0", 1 << 1), ("11.0.0", 0)])
def test_build_makes_one_profile_per_batch_size_from_the_spec(trt, tmp_path, version, flags):
    trt.reset(version)
    spec = _spec((2, 4, 8))
    out = build_engine(_write_onnx(spec, tmp_path / "u.onnx"), spec, tmp_path / "u.plan", timing_cache=tmp_path / "tc",
                       optimization_level=5, device=torch.device("cuda", 1))  # fmt: skip
    assert _calls(trt, "create_network") == [("create_network", flags)]  # TensorRT 11 is strongly typed always
    (_, level, profiles, state), = _calls(trt, "build_serialized_network")
    assert level == 5
    assert profiles == [{n: tuple(map(list, s)) for n, s in p.items()} for p in spec.profiles()]
    assert [p["sample"] for p in profiles] == [([2, 4, 8, 8], [2, 4, 8, 8], [2, 4, 8, 8]), ([3, 4, 8, 8], [4, 4, 8, 8], [4, 4, 8, 8]),
                                               ([5, 4, 8, 8], [8, 4, 8, 8], [8, 4, 8, 8])]  # fmt: skip
    assert state["device"] == torch.device("cuda", 1)  # built on the engine's GPU
    assert out.is_file() and (tmp_path / "tc").read_bytes().startswith(b"timing-cache:")
    with pytest.raises(ValueError, match="optimization level must be 0-5, got 7"):
        build_engine(tmp_path / "u.onnx", spec, tmp_path / "v.plan", optimization_level=7)


def test_logger_filters_severity_before_python(trt):
    logger = trt_mod._logger(trt)
    seen = []
    logger.log = lambda sev, msg: seen.append(msg)
    assert not trt.emit(logger, trt.ILogger.Severity.VERBOSE, "tactic 17 of 900")
    assert not trt.emit(logger, trt.ILogger.Severity.INFO, "building")
    assert trt.emit(logger, trt.ILogger.Severity.WARNING, "careful")
    assert seen == ["careful"]


def test_logged_errors_go_into_the_exception(trt):
    logger = trt_mod._logger(trt)
    logger.log(trt.ILogger.Severity.ERROR, "profile 1 has no shape for 'sample'")
    with pytest.raises(TensorRTError, match="building the unet engine failed: profile 1 has no shape for 'sample'"):
        trt_mod.check(None, "building the unet engine")


# ---------------------------------------------------------------------------------------------
# runtime


def _live_uint8(ptr: int, size: int) -> bool:
    """Whether a live tensor owns [ptr, ptr + size) of memory."""
    gc.collect()
    return any(
        isinstance(o, torch.Tensor) and o.dtype == torch.uint8 and o.data_ptr() == ptr and o.numel() >= size
        for o in gc.get_objects()
    )


def test_an_engine_with_a_shared_block_constructs_and_keeps_the_block_alive(trt, plan):
    path, spec = plan
    engine = TensorRTEngine(path, spec, device="cpu", shared_memory=SharedDeviceMemory("cpu"))  # the block made inline
    engine(*_inputs(8))
    gc.collect()
    (_, _, ptr, size), = _calls(trt, "set_device_memory")
    assert size == trt.DEVICE_MEMORY  # the size the engine asked for
    assert _live_uint8(ptr, size), "the activation block was freed while the engine still uses it"
    engine(*_inputs(8, seed=1))
    (*_, memory, _), = _calls(trt, "execute_async_v3")[1:]
    assert memory == (ptr, size)


def test_engines_sharing_a_block_get_one_allocation_at_the_largest_size(trt, plan, tmp_path, monkeypatch):
    path, spec = plan
    block = SharedDeviceMemory("cpu")
    small = TensorRTEngine(path, spec, device="cpu", shared_memory=block)
    monkeypatch.setattr(trt, "DEVICE_MEMORY", 3 * trt.DEVICE_MEMORY)
    big_path = build_engine(_write_onnx(spec, tmp_path / "b.onnx"), spec, tmp_path / "b.plan", device="cpu")
    big = TensorRTEngine(big_path, spec, device="cpu", shared_memory=block)
    assert block.buffer is None and block.size == big.device_memory_size == 3 * small.device_memory_size
    small(*_inputs(2))
    big(*_inputs(2))
    given = {(ptr, size) for _, _, ptr, size in _calls(trt, "set_device_memory")}
    assert given == {(block.buffer.data_ptr(), block.buffer.numel())} and block.buffer.numel() == big.device_memory_size
    assert _calls(trt, "device_synchronize") == []  # never regrown
    small.close()
    assert not block.attached(small) and block.size == big.device_memory_size
    big.close()
    assert block.size == 0
    with pytest.raises(ValueError, match="was closed"):
        big(*_inputs(2))


def test_a_block_that_grows_after_first_use_is_rebound_everywhere(trt, plan, tmp_path, monkeypatch):
    path, spec = plan
    block = SharedDeviceMemory("cpu")
    first = TensorRTEngine(path, spec, device="cpu", shared_memory=block, cuda_graph=True)
    first(*_inputs(8))
    kept = block.buffer  # held here so the new block cannot land at the same address
    old = kept.data_ptr()
    monkeypatch.setattr(trt, "DEVICE_MEMORY", 10 * trt.DEVICE_MEMORY)
    TensorRTEngine(build_engine(_write_onnx(spec, tmp_path / "b.onnx"), spec, tmp_path / "b.plan", device="cpu"), spec,
                   device="cpu", shared_memory=block)  # fmt: skip
    assert _calls(trt, "device_synchronize")  # nothing may still run in the old block
    first(*_inputs(8))
    rebound = _calls(trt, "set_device_memory")[-1]
    assert rebound[2] == block.buffer.data_ptr() != old and rebound[3] == block.buffer.numel()
    assert len(_calls(trt, "capture_begin")) == 2  # the graph held the old address: captured again


def test_work_goes_on_the_engines_own_stream_ordered_against_the_callers(trt, plan):
    path, spec = plan
    engine = TensorRTEngine(path, spec, device="cpu")
    engine(*_inputs(8))
    own = engine._stream.cuda_stream
    events = [c for c in trt.calls if c[0] in ("wait_stream", "execute_async_v3", "record_stream")]
    assert [e[0] for e in events] == ["wait_stream", "record_stream", "record_stream", "record_stream", "execute_async_v3", "wait_stream"]
    assert events[0][1:] == (own, 0)  # the engine's stream waits for the caller's (legacy default, 0)
    assert events[4][2] == own != 0  # enqueued on its own stream
    assert events[-1][1:] == (0, own)  # the caller waits for the engine before using the outputs
    assert all(e[2] == own for e in events[1:4])  # inputs recorded on the engine's stream
    assert events[4][-1]["device"] == engine.device  # and on the engine's device


def test_input_shapes_are_set_only_when_they_change_and_each_profile_has_its_context(trt, plan):
    path, spec = plan
    engine = TensorRTEngine(path, spec, device="cpu")
    for batch in (8, 8, 6, 2, 8):
        out = engine(*_inputs(batch))[0]
        assert out.shape == (batch, 4, 8, 8)
    shapes = [(ctx, name, shape[0]) for _, ctx, name, shape in _calls(trt, "set_input_shape")]
    # profiles: [2, 2] and [3, 8]; context 0 is profile 1 (first used at batch 8), context 1 profile 0
    assert shapes == [(0, n, 8) for n in spec.input_names] + [(0, n, 6) for n in spec.input_names] + \
        [(1, n, 2) for n in spec.input_names] + [(0, n, 8) for n in spec.input_names]  # fmt: skip
    assert [c[1:3] for c in _calls(trt, "set_optimization_profile_async")] == [(0, 1), (1, 0)]
    assert {c[2] for c in _calls(trt, "create_execution_context")} == {trt.ExecutionContextAllocationStrategy.USER_MANAGED}


def test_aligned_inputs_are_bound_zero_copy_and_misaligned_ones_copied(trt, plan):
    path, spec = plan
    engine = TensorRTEngine(path, spec, device="cpu")
    x, t, e = _inputs(8)
    engine(x, t, e)
    addresses = _calls(trt, "execute_async_v3")[-1][4]
    assert addresses["sample"] == x.data_ptr() and addresses["encoder_hidden_states"] == e.data_ptr()
    backing = aligned_empty((9, 4, 8, 8), torch.float16, "cpu")
    backing[1:].copy_(x)
    shifted = backing[1:]  # a view 512 bytes in: aligned; one element in is not
    odd = aligned_empty((8 * 4 * 8 * 8 + 1,), torch.float16, "cpu")[1:].view(8, 4, 8, 8)
    odd.copy_(x)
    engine(odd, t, e)
    bound = _calls(trt, "execute_async_v3")[-1][4]["sample"]
    assert bound != odd.data_ptr() and bound % trt_mod.ALIGNMENT == 0
    engine(shifted, t, e)
    assert _calls(trt, "execute_async_v3")[-1][4]["sample"] == shifted.data_ptr()
    for name, ptr in addresses.items():
        assert ptr % trt_mod.ALIGNMENT == 0, name


def test_cuda_graphs_one_context_and_one_graph_per_profile(trt, plan):
    path, spec = plan
    engine = TensorRTEngine(path, spec, device="cpu", cuda_graph=True)
    outs = {}
    for batch in (8, 2, 6, 8, 2):
        outs[batch] = engine(*_inputs(batch))[0]
        assert outs[batch].shape == (batch, 4, 8, 8)
    captures = _calls(trt, "capture_begin")
    assert len(captures) == 2 and all(c[2] == engine._stream.cuda_stream for c in captures)
    # each capture ran on its own context, on its own profile, at the profile's largest batch
    captured = [c for c in _calls(trt, "execute_async_v3") if c[-1]["capturing"]]
    assert [(c[1], c[3]["sample"][0]) for c in captured] == [(0, 8), (1, 2)]
    assert [c[1:3] for c in _calls(trt, "set_optimization_profile_async")] == [(0, 1), (1, 0)]
    replays = _calls(trt, "replay")
    assert len(replays) == 5 and all(r[2]["stream"] == engine._stream.cuda_stream for r in replays)
    assert [r[1] for r in replays] == [captures[0][1], captures[1][1], captures[0][1], captures[0][1], captures[1][1]]


def test_build_engines_refuses_a_bad_optimization_level_up_front(tmp_path):
    from types import SimpleNamespace

    from dreamfusion_trt.engines.build import build_engines

    with pytest.raises(ValueError, match="optimization level must be 0-5, got 9"):
        build_engines(SimpleNamespace(device="cpu", key="k"), tmp_path, optimization_level=9)


def test_what_is_built_by_default_is_what_a_backend_loads():
    """A text-encoder engine used to be built by default, and nothing loaded it."""
    from dreamfusion_trt.engines.backends import LOADABLE_NETWORKS
    from dreamfusion_trt.cli import build_engines_parser
    from dreamfusion_trt.engines.build import build_engines

    assert inspect.signature(build_engines).parameters["networks"].default == LOADABLE_NETWORKS
    assert build_engines_parser().parse_args([]).networks == ",".join(LOADABLE_NETWORKS)


def test_log_level_debug_lets_tensorrt_verbose_through(trt, caplog):
    with caplog.at_level(logging.DEBUG, logger="dreamfusion_trt.engines.tensorrt"):
        logger = trt_mod._logger(trt)
        assert trt.emit(logger, trt.ILogger.Severity.VERBOSE, "tactic 17")
    assert "TensorRT: tactic 17" in caplog.text
