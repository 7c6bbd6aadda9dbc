"""Field benchmark: the hash-grid encodings, and a NeRF field query with normals by each method.

Two tables, both timed with CUDA events after a warm-up (medians), with peak memory:

- ``encoding``: the PyTorch `HashGridEncoding` against the fused `TritonHashGridEncoding` on the same
  tables, features alone and features with their spatial Jacobian (analytic normals), forward and
  forward + backward to the tables.
- ``field_query``: ``NeRFField.query(x [K, N, 3], with_normals=True)`` as a training step's render
  calls it (gradients enabled, fp16 autocast by default), for each ``field.normals`` method, split
  into forward and backward of a render-like loss (density, albedo and the orientation term on the
  normals, so the normals' backward runs too). Default K = 16 prompts of 163,840 samples each
  (2.6 M points: 16 x 64^2 rays x ~40 samples kept by the occupancy grid). The JSON also records how
  closely each method's normals agree with ``analytic`` at the default initialisation (the blob).

    python -m dreamfusion_trt.bench.field --out bench_field.json                 # GPU
    python -m dreamfusion_trt.bench.field --prompts 16 --points 163840 --normals finite_difference,analytic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..config import FieldConfig, NormalsMode
from ..field import HashGridEncoding, NeRFField

log = logging.getLogger(__name__)


class _Marks:
    """Time stamps between stages: CUDA events on a GPU, the host clock on the CPU (smoke runs)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stamps: list[Any] = []
        self()

    def __call__(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.stamps.append(event)
        else:
            self.stamps.append(time.perf_counter())

    def durations_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.stamps[:-1], self.stamps[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.stamps[:-1], self.stamps[1:])]


def _time_stages(
    step: Callable[[Callable[[], None]], None], device: torch.device, warmup: int, iters: int
) -> dict[str, Any]:
    """Run ``step(mark)`` warmup + iters times; ``mark()`` ends a stage. Returns the median ms of
    each stage and of the whole step, and the peak CUDA memory (None on the CPU)."""
    per_iter: list[list[float]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + iters):
        marks = _Marks(device)
        step(marks)
        durations = marks.durations_ms()
        if i >= warmup:
            per_iter.append(durations)
    stages = [statistics.median(t[s] for t in per_iter) for s in range(len(per_iter[0]))]
    return {
        "stages_ms": stages,
        "total_ms": statistics.median(sum(t) for t in per_iter),
        "max_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def bench_encoding(
    cfg: FieldConfig, num_prompts: int, num_points: int, device: torch.device, warmup: int, iters: int
) -> list[dict]:
    """The PyTorch and fused encodings on the same random tables and points ``[K, N, 3]``."""
    from ..field.triton_hashgrid import TritonHashGridEncoding  # noqa: PLC0415

    reference = HashGridEncoding(num_prompts, cfg).to(device)
    fused = TritonHashGridEncoding(num_prompts, cfg).to(device)
    fused.load_state_dict(reference.state_dict())
    x = torch.rand(num_prompts, num_points, 3, device=device)
    grad = torch.randn(num_prompts, num_points, reference.output_dim, device=device)
    grad_jac = torch.randn(num_prompts, num_points, 3, reference.output_dim, device=device)
    rows = []
    for impl, enc in (("torch", reference), ("triton", fused)):
        for jacobian in (False, True):

            def step(mark: Callable[[], None], enc: HashGridEncoding = enc, jacobian: bool = jacobian) -> None:
                enc.tables.grad = None
                if jacobian:
                    feats, jac = enc.forward_with_jacobian(x)
                    mark()
                    ((feats * grad).sum() + (jac * grad_jac).sum()).backward()
                else:
                    feats = enc(x)
                    mark()
                    feats.backward(grad)
                mark()

            timed = _time_stages(step, device, warmup, iters)
            rows.append({
                "impl": impl, "jacobian": jacobian, "forward_ms": timed["stages_ms"][0],
                "backward_ms": timed["stages_ms"][1], "forward_backward_ms": timed["total_ms"],
                "max_memory_mib": timed["max_memory_mib"],
            })  # fmt: skip
            log.info("encoding %s", rows[-1])
    return rows


def bench_field_query(
    cfg: FieldConfig,
    modes: Sequence[str],
    num_prompts: int,
    num_points: int,
    device: torch.device,
    amp: torch.dtype | None,
    warmup: int,
    iters: int,
) -> list[dict]:
    """``query(x, with_normals=True)`` and the backward of a render-like loss, per normals mode,
    for fields with the same parameters (the default initialisation) on ``x [K, N, 3]``."""
    torch.manual_seed(0)
    fields = {m: NeRFField(dataclasses.replace(cfg, normals=m), num_prompts).to(device) for m in modes}
    first = next(iter(fields.values()))
    for f in fields.values():
        f.load_state_dict(first.state_dict())
    gen = torch.Generator(device=device).manual_seed(1)
    x = (torch.rand(num_prompts, num_points, 3, device=device, generator=gen) * 2.0 - 1.0) * 0.9 * cfg.bound
    dirs = torch.nn.functional.normalize(torch.randn(x.shape, device=device, generator=gen), dim=-1)
    weights = torch.rand(x.shape[:2], device=device, generator=gen) / (num_prompts * num_points)

    def render_like_loss(out) -> torch.Tensor:
        facing_away = (out.normal * dirs).sum(-1).clamp_min(0.0).square()
        return (weights * (facing_away + out.sigma.clamp_max(100.0) + out.albedo.sum(-1))).sum()

    rows = []
    normals = {}
    for mode, field in fields.items():

        def step(mark: Callable[[], None], field: NeRFField = field) -> None:
            field.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = field.query(x, with_normals=True)
                loss = render_like_loss(out)
            mark()
            loss.backward()
            mark()

        timed = _time_stages(step, device, warmup, iters)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            normals[mode] = field.query(x, with_normals=True).normal.float()
        rows.append({
            "normals": mode, "forward_ms": timed["stages_ms"][0], "backward_ms": timed["stages_ms"][1],
            "forward_backward_ms": timed["total_ms"], "max_memory_mib": timed["max_memory_mib"],
        })  # fmt: skip
        log.info("field query %s", rows[-1])
    if "analytic" in normals:
        for row in rows:
            cos = (normals[row["normals"]] * normals["analytic"]).sum(-1).flatten()
            row["cos_vs_analytic_median"] = float(cos.median())
            row["cos_vs_analytic_p01"] = float(cos.quantile(0.01)) if cos.numel() <= 2**24 else None
    return rows


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamfusion_trt.bench.field", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    modes = typing.get_args(NormalsMode)
    p.add_argument("--prompts", type=int, default=16, help="K, prompts queried at once (default: %(default)s)")
    p.add_argument("--points", type=int, default=163_840, help="samples per prompt (default: %(default)s)")
    p.add_argument("--normals", default="finite_difference,analytic",
                   help=f"comma-separated field.normals methods, of {modes} (default: %(default)s)")  # fmt: skip
    p.add_argument("--backend", choices=("torch", "triton"), default="triton", help="field.backend (default: %(default)s)")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                   help="autocast for the field query, as training on CUDA; bf16 on the CPU (default: %(default)s)")  # fmt: skip
    p.add_argument("--encoding-points", type=int, default=64 * 64 * 96 * 7,
                   help="points of the encoding table, K = 1; 0 skips it (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", default="cuda", help="cuda; cpu for a smoke run with --backend torch (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="bench_field.json", help="JSON output (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = make_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("the field benchmark needs a CUDA GPU (torch.cuda.is_available() is False); --device cpu for a smoke run")
    modes = [m for m in args.normals.split(",") if m]
    unknown = [m for m in modes if m not in typing.get_args(NormalsMode)]
    if unknown or not modes:
        p.error(f"--normals: unknown method(s) {unknown} (choose from {typing.get_args(NormalsMode)})")
    cfg = FieldConfig(backend=args.backend)
    amp = {"fp16": torch.float16 if device.type == "cuda" else torch.bfloat16, "fp32": None}[args.precision]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "field": dataclasses.asdict(cfg),
        "prompts": args.prompts,
        "points_per_prompt": args.points,
        "precision": args.precision,
        "field_query": bench_field_query(cfg, modes, args.prompts, args.points, device, amp, args.warmup, args.iters),
    }
    if args.encoding_points > 0:
        result["encoding_points"] = args.encoding_points
        result["encoding"] = bench_encoding(cfg, 1, args.encoding_points, device, args.warmup, args.iters)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"field query, K={args.prompts}, N={args.points} per prompt, {args.precision}, {result['device']}")
    print(f"{'normals':<18} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'peak MiB':>9} {'cos median':>10}")
    for r in result["field_query"]:
        cos = r.get("cos_vs_analytic_median")
        print(f"{r['normals']:<18} {r['forward_ms']:>8.2f} {r['backward_ms']:>8.2f} {r['forward_backward_ms']:>9.2f} "
              f"{r['max_memory_mib'] or 0:>9.0f} {'' if cos is None else f'{cos:10.4f}'}")  # fmt: skip
    for r in result.get("encoding", []):
        print(f"encoding {r['impl']:<7} jacobian={r['jacobian']!s:<5} fwd {r['forward_ms']:.2f} ms, "
              f"bwd {r['backward_ms']:.2f} ms, peak {r['max_memory_mib'] or 0:.0f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
