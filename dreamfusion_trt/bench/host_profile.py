"""Host profile of a training step: how long the host takes to *enqueue* each stage, against
how long the GPU is busy.

At K=1 (one prompt) the GPU finishes a step's kernels well before the host has issued them:
planning, Python, kernel launches and the host syncs inside the renderer are most of a step's
wall time. CUDA-event stage times then measure the host too, since each event waits behind the
launches before it, and say little about what to cut. This benchmark measures the host directly:
every stage of `Trainer.train_step` is timed with `time.perf_counter` at its mark, without any
device synchronisation, so a stage's number is what the host spent issuing it. Set against the
GPU's busy time per step (kernels and copies under torch.profiler), it says whether a change has
to cut host work (host sum close to the wall time, GPU busy much less) or GPU work.

A full-size Stable Diffusion 2.1-base with random weights (`bench.train.build_random_sd`, fp16,
the UNet through torch.compile: the "inductor" noise predictor) and a K-slot trainer of the
default run config are built once; each *variant* overlays a few config keys (`VARIANTS`) and
gets its own trainer. For each variant and phase (latent, then RGB with an untrained distilled
render encoder), after ``--warmup`` untimed steps:

- ``wall_ms``: ``--blocks`` blocks of ``--steps`` steps, each block timed on the wall clock
  with one device sync at its end; the median block's milliseconds per step (``walls_ms``: all);
- ``host_stage_ms``: the median per step of each stage's host time over those blocks, and
  ``host_sum_ms`` their sum;
- ``event_stage_ms``: CUDA-event stage medians over 10 more steps (`StageTimer`);
- ``busy_ms``: the GPU's busy time per step (`bench.train.device_busy_ms`; None on a CPU);
- ``top_cpu_ops``: the ``--top-ops`` operators with the most self CPU time under torch.profiler
  (CPU activity) over 5 steps, per step.

A variant that fails (a torch.compile error, say) is recorded with its error and the others
still run. The JSON is rewritten after every variant. ``--tiny`` (a tiny SD in fp32, the eager
UNet and the tiny field of ``bench train --tiny``) is a smoke check, the only thing that runs on
a CPU; its numbers say nothing about the GPU.

    python -m dreamfusion_trt.bench.host_profile --variants default,eager_optim,each_march --out host_profile_k1.json
    python -m dreamfusion_trt.bench.host_profile --tiny --device cpu --warmup 1 --blocks 1 --steps 2 --out host_profile_tiny.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..config import from_dict, to_dict
from ..train.monitor import StageTimer
from . import train as bench_train

log = logging.getLogger(__name__)

# Named config overlays; "default" is the benchmark's run config as it is.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "eager_optim": {"train": {"compile_optimizer": "off"}},
    "torch_renderer": {"render": {"backend": "torch"}},
    "torch_renderer_compiled": {"render": {"backend": "torch"}, "train": {"compile": True}},
    "nerfacc_compiled_query": {"train": {"compile": True}},
    "each_march": {"render": {"batched_marching": False}},
}
PHASES = ("latent", "rgb")
EVENT_STEPS = 10  # steps timed with CUDA events per phase
PROFILED_STEPS = 5  # steps under torch.profiler per phase, for the top CPU ops and the GPU's busy time
ERROR_CHARS = 2000


class HostTimer:
    """`StageTimer`'s interface on the host clock: milliseconds of `time.perf_counter` between
    marks, with no device synchronisation, so a stage's time is what the host spent enqueuing it.
    Keeps every step's stages (a stage marked twice in one step is summed)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._last = 0.0

    def start(self) -> None:
        self.steps.append({})
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        step = self.steps[-1]
        step[stage] = step.get(stage, 0.0) + (now - self._last) * 1e3
        self._last = now

    def medians(self) -> dict[str, float]:
        """Median milliseconds per step of each stage, in marking order."""
        names = list(dict.fromkeys(name for step in self.steps for name in step))
        return {name: statistics.median(step.get(name, 0.0) for step in self.steps) for name in names}


def parse_variants(text: str) -> list[str]:
    """The comma-separated variant names of ``--variants``; ValueError naming the known ones."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown --variants {', '.join(map(repr, unknown)) or repr(text)} "
                         f"(expected some of {', '.join(VARIANTS)})")  # fmt: skip
    return names


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def top_cpu_ops(trainer: Any, steps: int, limit: int) -> list[dict[str, Any]]:
    """The `limit` operators with the most self CPU time over `steps` steps under torch.profiler,
    per step: [{name, self_cpu_ms_per_step, calls_per_step}], most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    _sync(trainer.device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
        _sync(trainer.device)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [{"name": e.key, "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 4),
             "calls_per_step": e.count / steps} for e in ops]  # fmt: skip


def profile_phase(trainer: Any, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then host-, wall-, event- and profiler-time steps with every slot in `phase`."""
    device = trainer.device
    trainer.phase_override = phase
    try:
        start = time.perf_counter()
        for _ in range(args.warmup):
            trainer.train_step()
        _sync(device)
        warmup_s = time.perf_counter() - start
        host = HostTimer()
        walls = []
        for _ in range(args.blocks):
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(host)
            _sync(device)
            walls.append((time.perf_counter() - start) * 1e3 / args.steps)
        timers = [StageTimer(device) for _ in range(EVENT_STEPS)]
        for timer in timers:
            trainer.train_step(timer)
        _sync(device)
        events = [t.durations() for t in timers]
        busy = bench_train.device_busy_ms(trainer, PROFILED_STEPS)
        ops = top_cpu_ops(trainer, PROFILED_STEPS, args.top_ops)
    finally:
        trainer.phase_override = None
    host_ms = host.medians()
    return {
        "warmup_s": warmup_s,
        "wall_ms": statistics.median(walls),  # the median block's ms per step
        "walls_ms": walls,
        "host_stage_ms": host_ms,
        "host_sum_ms": sum(host_ms.values()),
        "event_stage_ms": {s: statistics.median(d.get(s, 0.0) for d in events) for s in bench_train.STAGES},
        "busy_ms": busy,
        "top_cpu_ops": ops,
    }


def profile_variant(name: str, setup: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One variant's trainer, both phases profiled."""
    from ..train.frozen import frozen_from_model, new_trainer
    from ..train.slots import fresh_slot_state

    model, device, k = setup["model"], setup["device"], args.concurrency
    cfg = from_dict(VARIANTS[name], setup["cfg"])
    frozen = frozen_from_model(model, cfg, setup["predictor"], k)
    untrained = bench_train.rgb_input("untrained", model, cfg, frozen)
    trainer = new_trainer(frozen, cfg, k, device, step_graph=False)  # the eager step is what it profiles
    init_state = fresh_slot_state(cfg, 0, device)
    for slot in range(k):
        trainer.assign(slot, cfg, setup["embedding"], init_state=init_state)
    row: dict[str, Any] = {"overrides": VARIANTS[name], "renderer": trainer.renderer.backend_for(device)}
    for phase in PHASES:
        if phase == "rgb":
            trainer.guidance.inputs["rgb"] = untrained
        r = row[phase] = profile_phase(trainer, phase, args)
        host = ", ".join(f"{s} {ms:.2f}" for s, ms in r["host_stage_ms"].items())
        busy = f"{r['busy_ms']:.2f}" if r["busy_ms"] is not None else "-"
        log.info("%s %s: wall %.2f ms/step; host %s (sum %.2f) ms; GPU busy %s ms", name, phase, r["wall_ms"], host,
                 r["host_sum_ms"], busy)  # fmt: skip
    return row


def run_host_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Profile every variant of ``args.variants``; returns the JSON-able result, also written to
    ``args.out`` after every variant."""
    names = parse_variants(args.variants)
    for flag in ("concurrency", "blocks", "steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.top_ops < 0:
        raise ValueError(f"--warmup and --top-ops must not be negative, got {args.warmup} and {args.top_ops}")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        raise ValueError(f"the full-size profile needs CUDA (device {str(device)!r}); use --tiny for a CPU smoke check")
    arch, dtype, backend = ("tiny", torch.float32, "eager") if args.tiny else ("sd21base", torch.float16, "inductor")
    cfg = bench_train.bench_config(bench_train.make_parser().parse_args(["--tiny"] if args.tiny else []), device)  # its defaults
    if device.type == "cuda":
        from ..engines.compile_cache import use_compile_cache

        use_compile_cache(cfg.model.cache_dir, device)
    out = Path(args.out)
    result: dict[str, Any] = {
        "benchmark": "host_profile",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "arch": arch,
        "dtype": str(dtype).removeprefix("torch."),
        "noise_predictor": backend,
        "K": args.concurrency,
        "args": vars(args),
        "config": to_dict(cfg),
        "variants": {},
    }
    model = bench_train.build_random_sd(arch, device, dtype)
    model.free_text_encoder()
    predictor = bench_train.make_predictor(model, backend, args.concurrency, Path("engines"), False)
    embedding = bench_train.random_embedding(model, cfg, dtype)
    setup = {"model": model, "device": device, "cfg": cfg, "predictor": predictor, "embedding": embedding}
    for name in names:
        try:
            result["variants"][name] = profile_variant(name, setup, args)
        except Exception as exc:  # a variant that fails (a compile error) is reported; the others still run
            log.warning("variant %s failed: %s", name, exc, exc_info=True)
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")  # a run cut short keeps its variants
    return result


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamfusion_trt.bench.host_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--variants", default="default", help=f"comma-separated, some of {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="tiny SD (fp32, eager UNet) and field: a smoke check that runs on a CPU")
    p.add_argument("--concurrency", type=int, default=1, help="K, prompts trained at once (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps per phase (default: %(default)s)")
    p.add_argument("--blocks", type=int, default=3, help="wall-clock timed blocks per phase (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="steps per block (default: %(default)s)")
    p.add_argument("--top-ops", type=int, default=25, help="operators listed by self CPU time (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="host_profile.json", help="JSON output (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run_host_profile(args)
    except ValueError as exc:  # bad flags: one line and exit status 2, nothing written
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
