"""Render encoder benchmark: fit time and parity of the distilled encoder, and forward+backward
cost of the three ways from a render to latents.

1. A full-size SD 2.1-base VAE (its diffusers config, random weights: nothing is downloaded)
   in the training dtype. The distilled encoder is fitted to it at render 64 / encode 512
   (`fit_render_encoder`, times per stage) and its parity on held-out renders reported. With
   random weights this measures the fit's time and the encoders' cost; its parity is not the
   number to judge (see 3).
2. Forward + backward at K = 1 and 16 for the eager VAE (`EagerImageEncoder` through
   `encode_rgb`, the reference), the compiled VAE (`CompiledImageEncoder`) and the distilled
   encoder (under fp16 autocast on CUDA, as the RGB phase runs): warm-up calls, then CUDA events
   around the forward and the backward of each call; medians and `max_memory_allocated`.
3. The built-in prior's *trained* VAE (shipped with the package) at its CPU preset's render 32 /
   encode 64, fitted the same way: parity against random weights says little (a random VAE's
   group norms blow sub-pixel differences up to O(1) features), against trained ones it is the
   number that matters. Skipped with ``--no-prior``.

    python -m dreamfusion_trt.bench.render_encoder --out bench_render_encoder.json            # H200
    python -m dreamfusion_trt.bench.render_encoder --tiny --device cpu --compile-backend aot_eager --out t.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..engines.eager import EagerImageEncoder
from ..guidance.latents import encode_rgb
from ..guidance.render_encoder import (
    DEFAULT_THRESHOLD,
    DistilledRenderEncoder,
    EncoderArch,
    FitOptions,
    FitStep,
    GraphedFitStep,
    TeacherTargets,
    cudnn_benchmark,
    fit_render_encoder,
)
from ..guidance.vae_encode import CompiledImageEncoder
from ..scene import resolve_device
from .train import VAE_CONFIGS

log = logging.getLogger(__name__)

FULL = {"arch": "sd21base", "render": 64, "encode": 512, "options": FitOptions()}
TINY = {
    "arch": "tiny", "render": 16, "encode": 64,
    "options": FitOptions(steps=30, batch=8, train_images=32, eval_images=8, width=16, blocks=1, render_samples=16),
}  # fmt: skip
PRIOR = {"render": 32, "encode": 64}


def build_vae(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[Any, float]:
    from diffusers import AutoencoderKL

    cfg = dict(VAE_CONFIGS[arch])
    scaling = cfg.pop("scaling_factor")
    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(**cfg, scaling_factor=scaling)
    return vae.to(dtype).eval().requires_grad_(False), float(scaling)


def prior_vae(device: torch.device) -> tuple[Any, float]:
    from diffusers import AutoencoderKL

    from ..prior import WEIGHTS_DIR

    vae = AutoencoderKL.from_pretrained(WEIGHTS_DIR / "vae").to(device).eval().requires_grad_(False)
    return vae, float(vae.config.scaling_factor)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, warmup: int, reps: int, autocast: bool
) -> dict[str, Any]:
    """Median forward, backward and total milliseconds of ``fn(x)`` and its VJP for a random
    latent gradient; peak memory of the timed calls."""
    device = x.device
    cuda = device.type == "cuda"

    def call(events: tuple | None = None) -> None:
        xi = x.detach().requires_grad_(True)
        if events:
            events[0].record()
        with torch.autocast(device.type, dtype=torch.float16, enabled=autocast and cuda):
            z = fn(xi)
        if events:
            events[1].record()
        torch.autograd.grad(z, xi, torch.ones_like(z))
        if events:
            events[2].record()

    for _ in range(warmup):
        call()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    fwd, bwd = [], []
    for _ in range(reps):
        if cuda:
            ev = tuple(torch.cuda.Event(enable_timing=True) for _ in range(3))
            call(ev)
            torch.cuda.synchronize(device)
            fwd.append(ev[0].elapsed_time(ev[1]))
            bwd.append(ev[1].elapsed_time(ev[2]))
        else:
            t0 = time.perf_counter()
            xi = x.detach().requires_grad_(True)
            z = fn(xi)
            t1 = time.perf_counter()
            torch.autograd.grad(z, xi, torch.ones_like(z))
            fwd.append((t1 - t0) * 1e3)
            bwd.append((time.perf_counter() - t1) * 1e3)
    total = [f + b for f, b in zip(fwd, bwd)]
    return {
        "forward_ms": statistics.median(fwd),
        "backward_ms": statistics.median(bwd),
        "total_ms": statistics.median(total),
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }


STEP_VARIANTS = ("eager", "graph", "bf16", "nhwc", "bf16_nhwc", "graph_bf16", "graph_bf16_nhwc")
STEP_TOKENS = {"eager", "graph", "bf16", "nhwc", "nobench"}  # a variant: tokens joined by "_"


def time_fit_steps(render: int, encode: int, options: FitOptions, device: torch.device, variants: Sequence[str] = STEP_VARIANTS,
                   warmup: int = 10, steps: int = 40, profile: bool = True) -> dict[str, Any]:  # fmt: skip
    """Milliseconds per student step of the fit, each way it can run, on random targets of the
    fit's shapes (a step's cost does not depend on the values), a fresh student each; with
    `profile`, the eager step's heaviest kernels (torch.profiler, self CUDA time)."""
    arch = EncoderArch(render, encode, 4, 8, options.width, options.blocks)
    n, m, h = options.train_images, options.cotangents_per_image, arch.latent_size
    gen = torch.Generator().manual_seed(0)
    train = TeacherTargets(torch.rand(n, 3, render, render, generator=gen).to(device), torch.randn(n, 4, h, h, generator=gen).to(device),
                           torch.randn(n, m, 4, h, h, generator=gen).to(device),
                           torch.randn(n, m, 3, render, render, generator=gen).to(device))  # fmt: skip
    idx = torch.randint(0, n, (warmup + steps, options.batch), generator=gen).to(device)
    coeff = torch.randn(warmup + steps, options.batch, m, generator=gen).to(device)
    cuda = device.type == "cuda"
    out: dict[str, Any] = {"warmup": warmup, "steps": steps, "batch": options.batch, "variants": {}}
    for name in variants:
        tokens = set(name.split("_"))
        if tokens - STEP_TOKENS:
            raise ValueError(f"unknown fit step variant {name!r}: join tokens of {sorted(STEP_TOKENS)} with '_'")
        if tokens & {"graph", "bf16", "nhwc"} and not cuda:
            continue
        graphed = "graph" in tokens
        torch.manual_seed(0)
        student = DistilledRenderEncoder(arch).to(device)
        opts = replace(options, steps=warmup + steps, precision="bf16" if "bf16" in tokens else "fp32", channels_last="nhwc" in tokens)
        fit = FitStep(student, train, opts, capturable=graphed)
        runner = GraphedFitStep(fit) if graphed else fit
        bench = contextlib.nullcontext() if "nobench" in tokens else cudnn_benchmark(device)  # the fit autotunes on CUDA
        with bench:
            for s in range(warmup):
                runner(s, idx[s], coeff[s])
            _sync(device)
            t0 = time.perf_counter()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            for s in range(warmup, warmup + steps):
                runner(s, idx[s], coeff[s])
            if cuda:
                end.record()
            _sync(device)
            wall = (time.perf_counter() - t0) * 1e3 / steps
            row = {"wall_ms_per_step": wall, "gpu_ms_per_step": start.elapsed_time(end) / steps if cuda else None,
                   "final_loss": float(fit.out_loss + fit.vjp_loss)}  # fmt: skip
            if graphed:
                row["captured"] = runner.graph is not None
        out["variants"][name] = row
        log.info("fit step (%s): %s", name, json.dumps(row))
        if profile and cuda and name == "eager":
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for s in range(5):
                    runner(s, idx[s], coeff[s])
                _sync(device)
            events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)[:15]
            out["eager_profile_top_kernels_ms_per_step"] = {e.key: e.self_device_time_total / 1e3 / 5 for e in events}
            log.info("eager fit step, heaviest ops:\n%s", prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
        del runner, fit, student
    return out


def fit_and_report(vae: Any, scaling: float, render: int, encode: int, options: FitOptions, device: torch.device) -> tuple[Any, dict]:
    start = time.perf_counter()
    encoder, report = fit_render_encoder(vae, scaling, render, encode, options=options, device=device, progress=True)
    _sync(device)
    out = {
        "render_size": render, "encode_size": encode, "fit_seconds": time.perf_counter() - start,
        "stage_seconds": report.seconds, "parity": report.parity, "final_loss": report.final_loss,
        "passes_default_threshold": not DEFAULT_THRESHOLD.failures(report.parity),
        "threshold_failures": DEFAULT_THRESHOLD.failures(report.parity),
        "params": sum(p.numel() for p in encoder.parameters()), "options": report.options,
    }  # fmt: skip
    log.info("fit render %d encode %d: %.1f s, parity %s", render, encode, out["fit_seconds"], json.dumps(report.parity))
    return encoder, out


def run_bench(args: argparse.Namespace, write: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """The benchmark's result; `write` is called with the partial result after every stage."""
    device = resolve_device(args.device)
    setup = TINY if args.tiny else FULL
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    options = setup["options"]
    if args.steps is not None:
        options = replace(options, steps=args.steps)
    if args.train_images is not None:
        options = replace(options, train_images=args.train_images)
    options = replace(options, precision=args.fit_precision, cuda_graph=args.fit_cuda_graph, channels_last=args.fit_channels_last)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "arch": setup["arch"], "dtype": str(dtype).removeprefix("torch."),
        "threshold": asdict(DEFAULT_THRESHOLD), "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
    }  # fmt: skip
    render, encode = setup["render"], setup["encode"]
    if args.step_variants:
        result["fit_steps"] = time_fit_steps(render, encode, options, device, args.step_variants)
        write(result)
    if args.no_fit:
        return result
    vae, scaling = build_vae(setup["arch"], device, dtype)
    encoder, result["fit"] = fit_and_report(vae, scaling, render, encode, options, device)
    write(result)

    eager = EagerImageEncoder(vae, scaling)
    # A copy: compiling switches its VAE to channels_last, and the eager reference stays as training runs it.
    compiled = CompiledImageEncoder(copy.deepcopy(vae), scaling, backend=args.compile_backend,
                                    mode=None if args.compile_mode == "default" else args.compile_mode)  # fmt: skip
    paths: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "eager_vae": lambda x: encode_rgb(x, eager, encode),
        "compiled_vae": lambda x: encode_rgb(x, compiled, encode),
        "distilled": encoder,
    }
    result["timing"] = {}
    for k in args.ks:
        x = torch.rand(k, 3, render, render, device=device)
        row = {}
        for name, fn in paths.items():
            start = time.perf_counter()
            try:
                row[name] = time_fwd_bwd(fn, x, args.warmup, args.reps, autocast=name == "distilled")
            except RuntimeError as exc:  # a compiler failure is a result, not the end of the benchmark
                log.warning("K=%d %s failed: %s", k, name, str(exc).splitlines()[0])
                row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
                continue
            row[name]["wall_s_incl_warmup"] = time.perf_counter() - start
            log.info("K=%d %s: %s", k, name, json.dumps(row[name]))
        for name in ("distilled", "compiled_vae"):
            if "total_ms" in row[name]:
                row[f"speedup_{name}_vs_eager"] = row["eager_vae"]["total_ms"] / row[name]["total_ms"]
        result["timing"][str(k)] = row
        write(result)
    paths.clear()  # drop the VAE, its compiled graphs and their memory before the next stage
    vae = eager = compiled = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_prior:  # last: the least essential stage, cut first by a time limit
        pvae, pscale = prior_vae(device)
        _, result["prior_fit"] = fit_and_report(pvae, pscale, PRIOR["render"], PRIOR["encode"], options, device)
        write(result)
    return result


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench render_encoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny VAE, render 16 / encode 64, a few fit steps (CPU smoke check)")
    p.add_argument("--device", default="auto")
    p.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",") if v], default=[1, 16],
                   help="batch sizes K of the forward+backward timings (default: 1,16; empty: none)")
    p.add_argument("--step-variants", type=lambda s: [v for v in s.split(",") if v], default=[],
                   help=f"first time the fit's student steps each of these ways (of {','.join(STEP_VARIANTS)}) on random targets")
    p.add_argument("--no-fit", action="store_true", help="stop after --step-variants (no VAE, no fit)")
    p.add_argument("--fit-precision", default="fp32", choices=("fp32", "bf16"), help="FitOptions.precision of the fits")
    p.add_argument("--fit-cuda-graph", default="auto", choices=("auto", "on", "off"), help="FitOptions.cuda_graph of the fits")
    p.add_argument("--fit-channels-last", action="store_true", help="FitOptions.channels_last of the fits")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="fit steps (default: the recipe's)")
    p.add_argument("--train-images", type=int, default=None, help="fit images (default: the recipe's)")
    p.add_argument("--no-prior", action="store_true", help="skip the fit against the built-in prior's trained VAE")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager"))
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for inductor (default: %(default)s)")
    p.add_argument("--out", default="bench_render_encoder.json", help="JSON output (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = make_parser().parse_args(argv)
    def write(result: dict[str, Any]) -> None:  # after every stage, so a run cut short still leaves its numbers
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    write(run_bench(args, write))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
