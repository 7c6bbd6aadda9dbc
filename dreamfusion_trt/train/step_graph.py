"""The whole training step as one CUDA graph per step shape: one launch instead of hundreds.

At K = 1 a step is bound by the host: on the H200 the latent step spent 19.5 ms on the wall
against 8.2 ms of GPU work, the rest in Python and in ~540 kernel launches (BENCHMARKS.md,
sixth session). A CUDA graph records the device side of a step (render, the render strategy,
guidance, regularisers, backward, Adam and the loss scale) once and replays it with one launch.

What a graph may not contain: host reads of device values, shapes that change between steps,
random draws, uploads from pageable memory. The trainer keeps all of those in the step plan,
outside the graph: the host's choices and the slots' device draws land in the plan's tensors,
which are copied into the graph's static input buffers before each replay. Host choices that
shape the work (the phase of each slot, the render groups and sizes, which render strategy runs)
make the graph's key. The torch sampler renders fixed samples per ray, so its shapes are static;
nerfacc's sample counts are not, so a graphed trainer always uses the torch sampler.

A key runs eagerly for `warmup` steps first (compiles, autotuning and lazy initialisation must
not happen inside a capture), is then captured and replayed from then on; a capture that fails
(an operation a graph cannot hold) logs one warning and every later step runs eagerly, the
step's slow twin, which is the same function called directly. `BufferReplay` is the twin of the
graph itself: the same static buffers and copies, the function re-run instead of replayed, so
a CPU test shows that nothing a step needs is baked into its capture.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable, Protocol, Sequence

import torch

from ..config import RunConfig

log = logging.getLogger(__name__)

__all__ = ["BufferReplay", "CudaGraphCapture", "StepGraphs", "step_graph_choice"]

GRAPH_WARMUP = 2  # eager steps of a key before its capture
MAX_GRAPHS = 8  # keys captured per trainer; later keys run eagerly

StepFn = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]


def step_graph_choice(cfg: RunConfig, max_prompts: int, device: torch.device) -> tuple[bool, str]:
    """Whether a run of up to `max_prompts` prompts per step graphs its steps
    (``train.cuda_graph``), and why. "on" raises ValueError where a graph cannot run; "auto"
    graphs one-prompt runs on CUDA, whose steps are host-bound, and leaves K > 1 to nerfacc,
    whose empty-space skipping pays more once the GPU is the bound."""
    knob = cfg.train.cuda_graph
    if knob not in ("auto", "on", "off"):
        raise ValueError(f"train.cuda_graph must be auto, on or off, got {knob!r}")
    if knob == "off":
        return False, "train.cuda_graph off"
    problems = []
    if device.type != "cuda":
        problems.append(f"CUDA graphs need a CUDA device, not {device.type}")
    if cfg.render.backend == "nerfacc":
        problems.append("render.backend nerfacc marches a different number of samples every step (use auto or torch)")
    if cfg.train.data_parallel:
        problems.append("data-parallel steps average gradients across ranks between backward and Adam")
    if knob == "on":
        if problems:
            raise ValueError("train.cuda_graph on: " + "; ".join(problems))
        return True, "train.cuda_graph on"
    if problems:
        return False, "auto: " + problems[0]
    if max_prompts > 1:
        return False, f"auto: {max_prompts} prompts per step (GPU-bound; nerfacc skips empty space)"
    return True, "auto: one prompt per step (host-bound)"


class Captured(Protocol):
    def replay(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]: ...


class CudaGraphCapture:
    """Records `fn` on static copies of its inputs into a `torch.cuda.CUDAGraph` (its own memory
    pool; errors only for unsafe calls of this thread, so a writer thread on its own stream may
    keep working during a capture). Capturing runs nothing: `replay` does."""

    def __call__(self, fn: StepFn, inputs: Sequence[torch.Tensor]) -> Captured:
        static_in = [x.detach().clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = list(fn(static_in))

        def launch() -> Sequence[torch.Tensor]:
            graph.replay()
            return static_out

        return _Replay(static_in, launch)


class BufferReplay:
    """`CudaGraphCapture`'s twin on any device: the same static input buffers and copies, with
    `fn` re-run on the buffers at each replay instead of a recorded graph. A step that takes
    some per-step value other than through its inputs computes with the capture's value here,
    as a graph would, so a trainer replayed this way stops matching its eager twin (the twin
    test shows it)."""

    def __call__(self, fn: StepFn, inputs: Sequence[torch.Tensor]) -> Captured:
        static_in = [x.detach().clone() for x in inputs]
        return _Replay(static_in, lambda: fn(static_in))


class _Replay:
    """Static input buffers and the launch that computes from them."""

    def __init__(self, static_in: list[torch.Tensor], launch: Callable[[], Sequence[torch.Tensor]]) -> None:
        self.static_in, self.launch = static_in, launch

    def replay(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        if len(inputs) != len(self.static_in):
            raise ValueError(f"a step graph holds {len(self.static_in)} inputs, got {len(inputs)}")
        for buf, x in zip(self.static_in, inputs):
            if buf.shape != x.shape or buf.dtype != x.dtype:
                raise ValueError(f"a step graph input is {buf.dtype} {tuple(buf.shape)}, got {x.dtype} {tuple(x.shape)}")
            buf.copy_(x, non_blocking=True)
        return self.launch()


class StepGraphs:
    """The step graphs of one trainer, by key: `run(key, inputs, fn)` returns ``fn(inputs)``,
    computed eagerly for a key's first `warmup` steps, then by its captured graph. `capture`
    defaults to CUDA graphs; `BufferReplay` is its twin."""

    def __init__(self, capture: Callable[[StepFn, Sequence[torch.Tensor]], Captured] | None = None,
                 warmup: int = GRAPH_WARMUP, max_graphs: int = MAX_GRAPHS) -> None:  # fmt: skip
        if warmup < 1:
            raise ValueError(f"a step graph needs at least one eager step before its capture, got warmup={warmup!r}")
        self.capture = capture or CudaGraphCapture()
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.graphs: dict[Hashable, Captured] = {}
        self.seen: dict[Hashable, int] = {}
        self.failed: str | None = None  # why capturing was given up (then every step runs eagerly)
        self.replays = 0

    def run(self, key: Hashable, inputs: Sequence[torch.Tensor], fn: StepFn) -> Sequence[torch.Tensor]:
        graph = self.graphs.get(key) if self.failed is None else None
        if graph is None and self.failed is None and self.seen.get(key, 0) >= self.warmup and len(self.graphs) < self.max_graphs:
            graph = self._capture(key, inputs, fn)
        if graph is not None:
            self.replays += 1
            return graph.replay(inputs)
        self.seen[key] = self.seen.get(key, 0) + 1
        return fn(list(inputs))

    def _capture(self, key: Hashable, inputs: Sequence[torch.Tensor], fn: StepFn) -> Captured | None:
        try:
            graph = self.capture(fn, inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this step and the rest eagerly
            self.failed = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            log.warning("train.cuda_graph: the step could not be captured (%s); running every step eagerly", self.failed)
            if torch.cuda.is_available():
                try:  # let a broken capture's stream settle before the eager step
                    torch.cuda.synchronize()
                except RuntimeError:
                    pass
            return None
        self.graphs[key] = graph
        log.info("train.cuda_graph: captured step graph %d (%d inputs)", len(self.graphs), len(inputs))
        return graph
