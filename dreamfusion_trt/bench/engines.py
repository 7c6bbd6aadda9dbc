"""UNet backend benchmark: ms per call, effective TFLOP/s, share of a dense matmul, peak memory.

Full-size SD 1.5 and SD 2.1-base UNet architectures are built from their configs with random
weights (nothing is downloaded), in fp16 with 64x64 latents, and each available backend is timed
at each batch size: CUDA events around every call after a warm-up, median reported. FLOPs per
call are counted once per shape with `torch.utils.flop_counter.FlopCounterMode` on the eager
network; effective TFLOP/s is that over the median time, and ``vs_matmul`` divides it by the
TFLOP/s of a dense fp16 8192^3 matmul measured in the same run. A backend that cannot run here
is listed under "skipped" with the reason. The JSON is rewritten after every backend, so a
crash (an AOTInductor package has been seen to segfault) keeps what was measured before it.

    dreamfusion-trt bench engines --out bench_engines.json            # GPU
    dreamfusion-trt bench engines --tiny --backends eager --reps 3     # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..atomic import atomic_write_text

log = logging.getLogger(__name__)

_SD_BLOCKS = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {**_SD_BLOCKS, "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd21base": {**_SD_BLOCKS, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
    "tiny": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    ),  # fmt: skip
}
BENCH_BACKENDS = (
    "eager", "inductor", "inductor-reduce-overhead", "inductor-max-autotune", "aotinductor", "tensorrt", "tensorrt-cudagraph",
)  # fmt: skip
# torch.compile mode of each inductor variant
INDUCTOR_MODES = {
    "inductor": "max-autotune-no-cudagraphs",
    "inductor-reduce-overhead": "reduce-overhead",
    "inductor-max-autotune": "max-autotune",
}
MAX_LENGTH = 77


def build_unet(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A UNet2DConditionModel of `arch` with random weights, frozen, on `device` in `dtype`."""
    from diffusers import UNet2DConditionModel

    if arch not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet architecture {arch!r} (expected one of {', '.join(UNET_CONFIGS)})")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[arch])
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


def _model(arch: str, unet: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """What `make_spec` / `build_engines` need of a DiffusionModel, for a bare UNet."""
    return types.SimpleNamespace(
        unet=unet, vae=None, text_encoder=None, latent_channels=int(unet.config.in_channels),
        text_dim=int(unet.config.cross_attention_dim), max_length=MAX_LENGTH, alphas_cumprod=torch.zeros(1000),
        vae_scaling_factor=1.0, dtype=dtype, device=device, key=f"bench-{arch}-random", source=f"random {arch} UNet",
    )  # fmt: skip


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds per call: CUDA events around each call on CUDA, perf_counter on the CPU."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
            return [s.elapsed_time(e) for s, e in events]
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, warmup: int, reps: int) -> dict[str, Any]:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_ms(lambda: a @ b, device, warmup, reps))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_ms": ms, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


def count_flops(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def _runner(backend: str, arch: str, unet: Any, batch_sizes: list[int], device: torch.device, dtype: torch.dtype,
            work_dir: Path, shared_memory: Any) -> Callable[..., torch.Tensor]:  # fmt: skip
    """A callable taking (sample, timestep, encoder_hidden_states) for `backend`, or ValueError
    saying why the backend cannot run here. `shared_memory` is the run's TensorRT activation
    block (created once by the caller, which keeps it)."""
    from ..engines.artifacts import current_env, find_artifact
    from ..engines.build import build_engines
    from ..engines.inductor import aoti_load, compile_network
    from ..engines.spec import make_spec
    from ..engines.wrappers import UNetWrapper

    model = _model(arch, unet, device, dtype)
    wrapper = UNetWrapper(unet).eval()
    if backend == "eager":
        return wrapper
    if backend.startswith("inductor"):
        mode = INDUCTOR_MODES[backend]
        if mode in ("reduce-overhead", "max-autotune") and device.type != "cuda":
            raise ValueError("reduce-overhead (CUDA graphs) needs a CUDA GPU")
        return compile_network(wrapper, make_spec(model, "unet", batch_sizes), mode=mode, batch_sizes=tuple(batch_sizes))
    artifact = "tensorrt" if backend.startswith("tensorrt") else "aotinductor"
    if artifact == "tensorrt":
        from ..engines.tensorrt import TensorRTEngine, import_tensorrt

        import_tensorrt()
        if device.type != "cuda":
            raise ValueError("TensorRT needs a CUDA GPU")
    env = current_env(device)
    report = build_engines(model, work_dir, batch_sizes=batch_sizes, networks=("unet",), backends=(artifact,), parity=False, env=env)
    failed = report.of("failed") + report.of("not built")
    if failed:
        raise ValueError(f"{artifact} build: {failed[0].reason}")
    path, spec = find_artifact(model, artifact, "unet", work_dir, batch_sizes, env)
    if artifact == "aotinductor":
        return aoti_load(path, device)
    engine = TensorRTEngine(path, spec, device=device, shared_memory=shared_memory, cuda_graph=backend == "tensorrt-cudagraph")
    run = lambda *xs: engine(*xs)[0]  # noqa: E731
    run.close = engine.close  # type: ignore[attr-defined]
    return run


SDPA_CHOICES = ("default", "cudnn", "flash", "efficient")


def select_sdpa_backend(choice: str) -> None:
    """Restrict scaled-dot-product attention to one kernel family ("default" leaves PyTorch's
    own priority order). cuDNN's fused attention has Hopper-specific kernels."""
    if choice not in SDPA_CHOICES:
        raise ValueError(f"unknown --sdpa {choice!r} (expected one of {', '.join(SDPA_CHOICES)})")
    if choice == "default":
        return
    torch.backends.cuda.enable_cudnn_sdp(choice == "cudnn")
    torch.backends.cuda.enable_flash_sdp(choice == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(choice == "efficient")
    torch.backends.cuda.enable_math_sdp(True)  # the fallback for shapes the chosen kernel rejects


def run_engine_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by `args` (see `make_parser`); returns the JSON-able result,
    also written to ``args.out``."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype if args.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    ]
    archs = ["tiny"] if args.tiny else [a.strip() for a in args.archs.split(",") if a.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BENCH_BACKENDS:
            raise ValueError(f"unknown backend {b!r} (expected some of {', '.join(BENCH_BACKENDS)})")
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
        select_sdpa_backend(args.sdpa)
    from ..engines.tensorrt import tensorrt_version

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tensorrt": tensorrt_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_sizes": batch_sizes,
        "inductor_freezing": bool(torch._inductor.config.freezing),  # TORCHINDUCTOR_FREEZING=1
        "sdpa": args.sdpa,
        "matmul": matmul_tflops(device, dtype, args.matmul_n or (8192 if device.type == "cuda" else 512), 3, max(args.reps, 5)),
        "results": [],
        "skipped": [],
    }
    out = Path(args.out)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_engines_"))
    log.info("dense matmul: %.3g TFLOP/s", result["matmul"]["tflops"])
    for arch in archs:
        unet = build_unet(arch, device, dtype)
        spec_model = _model(arch, unet, device, dtype)
        from ..engines.spec import make_spec

        spec = make_spec(spec_model, "unet", batch_sizes)
        gen = torch.Generator().manual_seed(0)
        inputs = {b: tuple(spec.sample_inputs(b, device, gen).values()) for b in batch_sizes}
        from ..engines.wrappers import UNetWrapper

        flops = {b: count_flops(UNetWrapper(unet), inputs[b]) for b in batch_sizes}
        shared_memory = None
        if device.type == "cuda" and any(b.startswith("tensorrt") for b in backends):
            from ..engines.tensorrt import SharedDeviceMemory

            shared_memory = SharedDeviceMemory(device)  # one block for the arch's engines, kept until they are closed
        for backend in backends:
            try:
                run = _runner(backend, arch, unet, batch_sizes, device, dtype, work_dir, shared_memory)
            except (ValueError, FileNotFoundError, RuntimeError) as exc:
                log.warning("%s %s skipped: %s", arch, backend, exc)
                result["skipped"].append({"arch": arch, "backend": backend, "reason": str(exc)})
                continue
            for b in batch_sizes:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                ms = time_ms(lambda fn=run, x=inputs[b]: fn(*x), device, args.warmup, args.reps)
                median = statistics.median(ms)
                tflops = flops[b] / (median * 1e-3) / 1e12
                row = {
                    "arch": arch, "backend": backend, "batch": b, "median_ms": median, "min_ms": min(ms),
                    "gflop_per_call": flops[b] / 1e9, "tflops": tflops, "vs_matmul": tflops / result["matmul"]["tflops"],
                    "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                }  # fmt: skip
                result["results"].append(row)
                log.info("%s %-26s batch %3d: %8.2f ms  %.3g TFLOP/s  (%.0f%% of matmul)",
                         arch, backend, b, median, tflops, 100 * row["vs_matmul"])  # fmt: skip
            atomic_write_text(out, json.dumps(result, indent=2) + "\n")
            if hasattr(run, "close"):
                run.close()
            del run
        del unet, shared_memory
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamfusion-trt bench engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--archs", default="sd15,sd21base", help="UNet architectures: sd15, sd21base (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet instead (CPU smoke check)")
    p.add_argument("--backends", default=",".join(BENCH_BACKENDS), help="comma-separated subset of %(default)s")
    p.add_argument("--batch-sizes", default="2,8,32", help="UNet batch sizes, CFG doubling included (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--sdpa", default="default", choices=SDPA_CHOICES, help="attention kernel family (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--matmul-n", type=int, default=0, help="reference matmul size (default: 8192 on CUDA, 512 on CPU)")
    p.add_argument("--work-dir", help="where ONNX/TensorRT/AOTInductor files are built and reused (default: a temp dir)")
    p.add_argument("--out", default="bench_engines.json", help="JSON output (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run_engine_bench(make_parser().parse_args(argv))
    return 0
