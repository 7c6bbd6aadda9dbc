"""Training throughput benchmark: iterations/s per phase, prompts/hour for K prompts at once,
peak memory and a per-stage breakdown of the step.

A full-size Stable Diffusion 2.1-base (UNet, VAE, OpenCLIP-H text encoder) is built from its
configs with random weights (nothing is downloaded; the UNet config comes from
`bench.engines`). For every noise-predictor backend and every K, a K-slot trainer with the
default run config (full-size hash grid, the renderer `render.backend` picks, fp16 autocast)
runs warm-up steps and then timed steps in the latent phase and in the RGB phase (forced for all
slots). Each timed step records CUDA events between its stages (plan: host draws and the upload;
render; vae_encode: the VAE encoder in the RGB phase, the linear colour map in the latent phase;
guidance: the UNet with classifier-free guidance; backward; optimizer: Adam and the occupancy
grids); medians are reported with the wall-clock step rate and `max_memory_allocated`, and
the GPU's busy time per step (kernels and copies under torch.profiler, a few more steps): the
wall-clock step minus that is what the host (planning, uploads, Python, launches) costs. Each
``--rgb-encoder`` is timed in the RGB phase of the same trainer (``untrained``: a distilled
render encoder with random weights, for its speed on random-weight models whose own fit is
refused).
Prompts/hour at the default schedule (``train.iters`` with ``train.latent_fraction`` of it in
the latent phase) is ``K * 3600 / (latent_iters / it_s_latent + rgb_iters / it_s_rgb)``, without
the time spent writing outputs. Steps start from the initial density blob, so the render cost
is that of early training. A K that runs out of memory is reported as such and larger K skipped.

    dreamfusion-trt bench train --out bench_train.json                      # GPU: eager, TensorRT if built
    dreamfusion-trt bench train --backends eager,tensorrt --engines-dir engines --build-engines
    dreamfusion-trt bench train --tiny --device cpu --out bench_train_tiny.json   # CPU smoke check
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import typing
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..atomic import atomic_write_text
from ..config import FieldConfig, NormalsMode, RunConfig, TrainConfig, from_dict, to_dict
from ..guidance.text import NO_VIEW, VIEWS, PromptEmbeddings
from ..sdmodel import DiffusionModel
from ..train.monitor import StageTimer
from ..train.step_graph import step_graph_choice
from .engines import build_unet

log = logging.getLogger(__name__)

STAGES = ("plan", "render", "vae_encode", "guidance", "backward", "optimizer", "graph")  # graph: a replayed step graph
RGB_ENCODERS = (*typing.get_args(typing.get_type_hints(TrainConfig)["rgb_encoder"]), "untrained")
PROFILED_STEPS = 3  # steps under torch.profiler per row, for the GPU's busy time
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd21base": dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    ),
    "tiny": dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    ),
}  # fmt: skip
TEXT_CONFIGS: dict[str, dict[str, Any]] = {  # OpenCLIP ViT-H/14 text tower, as SD 2.x uses it
    "sd21base": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512),
    "tiny": dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=32),
}  # fmt: skip
# The CPU smoke check: a field and renders small enough for a few steps in seconds.
TINY_OVERRIDES = {
    "field": {"num_levels": 4, "log2_hashmap_size": 12, "max_resolution": 64, "hidden_dim": 16},
    "render": {"num_samples": 12, "albedo_iters": 0},
    "camera": {"render_size": 16},
}


def build_random_sd(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DiffusionModel:
    """A `DiffusionModel` of `arch` ("sd21base" or "tiny") with random weights: UNet, VAE, CLIP
    text encoder (no tokenizer) and SD's scaled-linear noise schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch not in VAE_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r} (expected one of {', '.join(VAE_CONFIGS)})")
    unet = build_unet(arch, device, dtype, seed=seed)
    torch.manual_seed(seed + 1)
    vae_cfg = dict(VAE_CONFIGS[arch])
    scaling = vae_cfg.pop("scaling_factor")
    with torch.device(device):
        vae = AutoencoderKL(**vae_cfg, scaling_factor=scaling)
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIGS[arch]))
    vae = vae.to(dtype).eval().requires_grad_(False)
    text = text.to(dtype).eval().requires_grad_(False)
    schedule = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return DiffusionModel(
        tokenizer=None, text_encoder=text, unet=unet, vae=vae,
        alphas_cumprod=schedule.alphas_cumprod.to(device=device, dtype=torch.float32),
        vae_scaling_factor=scaling, latent_channels=int(unet.config.in_channels),
        text_dim=int(unet.config.cross_attention_dim), max_length=77,
        key=f"bench-{arch}-random", source=f"random {arch}", device=device, dtype=dtype,
    )  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_text_encoder(model: DiffusionModel, prompts: int, reps: int) -> dict[str, Any]:
    """Milliseconds to encode `prompts` x 5 texts (4 view variants + 1 negative) of 77 tokens."""
    device = model.device
    ids = torch.randint(0, model.text_encoder.config.vocab_size, (prompts * 5, model.max_length), device=device)
    times = []
    with torch.no_grad():
        model.text_encoder(ids[:2])
        for _ in range(reps):
            _sync(device)
            start = time.perf_counter()
            model.text_encoder(ids)
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
    return {"prompts": prompts, "texts": prompts * 5, "median_ms": statistics.median(times)}


def make_predictor(model: DiffusionModel, backend: str, max_k: int, engines_dir: Path, build: bool, step_graph: bool = False) -> Any:
    """The noise predictor of `backend` for up to `max_k` prompts (UNet batch 2 * max_k);
    ValueError/FileNotFoundError when it cannot run here."""
    from ..engines.artifacts import current_env
    from ..engines.backends import load_network
    from ..train.frozen import predictor_batch_sizes, predictor_compile_mode

    sizes = predictor_batch_sizes(backend, max_k)
    if build and backend in ("tensorrt", "aotinductor"):
        from ..engines.build import build_engines

        report = build_engines(model, engines_dir, batch_sizes=list(sizes), networks=("unet",), backends=(backend,),
                               parity=False, env=current_env(model.device))  # fmt: skip
        failed = report.of("failed") + report.of("not built")
        if failed:
            raise ValueError(f"{backend} build failed: {failed[0].reason}")
    return load_network("unet", model, backend, engines_dir, batch_sizes=sizes, compile_mode=predictor_compile_mode(step_graph))


def bench_config(args: argparse.Namespace, device: torch.device) -> RunConfig:
    cfg = from_dict(TINY_OVERRIDES) if args.tiny else RunConfig()
    overrides: dict[str, dict[str, Any]] = {"train": {"device": str(device), "compile": args.compile}}
    if args.compile_rgb_encoder:
        overrides["train"]["compile_rgb_encoder"] = args.compile_rgb_encoder
    if args.render_backend:
        overrides["render"] = {"backend": args.render_backend}
    overrides["sds"] = {"rgb_mode": args.rgb_mode}
    overrides["train"]["rgb_encoder"] = "vae"  # each of --rgb-encoder is set up by `rgb_input`
    overrides["field"] = {"backend": args.field_backend}
    if args.field_normals:
        overrides["field"]["normals"] = args.field_normals
    return from_dict(overrides, cfg)


def rgb_input(choice: str, model: DiffusionModel, cfg: RunConfig, frozen: Any) -> Any:
    """The RGB phase's render -> latents strategy for one --rgb-encoder choice."""
    from ..guidance.inputs import DistilledEncoding
    from ..guidance.render_encoder import untrained_render_encoder
    from ..train.frozen import compiled_render_encoder, rgb_encoding

    if choice not in RGB_ENCODERS:
        raise ValueError(f"unknown --rgb-encoder {choice!r} (expected some of {', '.join(RGB_ENCODERS)})")
    vae_input = frozen.inputs["rgb"]  # frozen_from_model built the VAE strategy (bench_config)
    if choice == "vae":
        return vae_input
    encode_size = cfg.train.encode_size or vae_input.encode_size
    if choice == "untrained":
        encoder = untrained_render_encoder(model.vae, cfg.camera.render_size, encode_size, model.device)
        return DistilledEncoding(compiled_render_encoder(encoder, cfg, model.device), cfg.camera.render_size, vae_input.latent_shape)
    chosen = from_dict({"train": {"rgb_encoder": choice}}, cfg)
    return rgb_encoding(model, chosen, vae_input.encoder, encode_size, vae_input.latent_shape)


def random_embedding(model: DiffusionModel, cfg: RunConfig, dtype: torch.dtype) -> PromptEmbeddings:
    """A fixed random prompt embedding (seed 0) with the config's views: what the benchmarks'
    slots train on (the text encoder's output values do not change a step's cost)."""
    views = VIEWS if cfg.prompt.view_dependent else (NO_VIEW,)
    gen = torch.Generator().manual_seed(0)
    return PromptEmbeddings(
        cond=torch.randn(len(views), model.max_length, model.text_dim, generator=gen).to(dtype),
        uncond=torch.randn(model.max_length, model.text_dim, generator=gen).to(dtype),
        views=views, prompt="benchmark", truncated=False,
    )  # fmt: skip


def device_busy_ms(trainer: Any, steps: int) -> float | None:
    """Median per step of the time the GPU spent in kernels and copies (torch.profiler, merged
    intervals), over `steps` steps: the step's wall time minus this is what the host costs."""
    if trainer.device.type != "cuda" or steps < 1:
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(trainer.device)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                trainer.train_step()
            _sync(trainer.device)
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
    except RuntimeError as exc:  # a profiler that cannot start (another one running, CUPTI missing)
        log.warning("GPU busy time not measured: %s", exc)
        return None
    busy, end = 0.0, float("-inf")
    for lo, hi in spans:  # union of intervals, in microseconds
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    return busy / 1e3 / steps


def time_phase(trainer: Any, phase: str, warmup: int, steps: int) -> dict[str, Any]:
    """Warm up, then time `steps` steps with every slot in `phase`."""
    device = trainer.device
    trainer.phase_override = phase
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            trainer.train_step()
        _sync(device)
        timers = [StageTimer(device) for _ in range(steps)]
        start = time.perf_counter()
        for timer in timers:
            trainer.train_step(timer)
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        busy = device_busy_ms(trainer, PROFILED_STEPS)
    finally:
        trainer.phase_override = None
    per_step = [t.durations() for t in timers]
    stages = {s: statistics.median(d.get(s, 0.0) for d in per_step) for s in STAGES}
    return {
        "step_ms": statistics.median(sum(d.values()) for d in per_step),
        "wall_step_ms": wall_ms,
        "it_per_s": 1e3 / wall_ms,  # iterations per second of each prompt
        "prompt_it_per_s": trainer.num_slots * 1e3 / wall_ms,
        "stages_ms": stages,
        # GPU kernel time per step (profiled separately); wall_step_ms - this = host and launch overhead
        "device_busy_ms": busy,
        "peak_memory_bytes": peak,
    }


def run_train_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by `args` (see `make_parser`); returns the JSON-able result,
    also written to ``args.out`` after every timed row."""
    from ..train.frozen import frozen_from_model, new_trainer
    from ..train.slots import fresh_slot_state

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    arch = "tiny" if args.tiny else "sd21base"
    ks = sorted({int(k) for k in args.concurrency.split(",") if k.strip()})
    if not ks or ks[0] < 1:
        raise ValueError(f"--concurrency must list positive numbers of prompts, got {args.concurrency!r}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    encoders = [e.strip() for e in args.rgb_encoder.split(",") if e.strip()]
    for e in encoders:
        if e not in RGB_ENCODERS:
            raise ValueError(f"unknown --rgb-encoder {e!r} (expected some of {', '.join(RGB_ENCODERS)})")
    if args.rgb_mode == "image" and encoders != ["vae"]:
        raise ValueError("--rgb-mode image has no RGB-phase encoder to choose; leave --rgb-encoder at vae")
    cfg = bench_config(args, device)
    if device.type == "cuda":
        from ..engines.compile_cache import use_compile_cache

        use_compile_cache(cfg.model.cache_dir, device)
    latent_iters = int(round(cfg.train.latent_fraction * cfg.train.iters))
    out = Path(args.out)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "arch": arch,
        "dtype": str(dtype).removeprefix("torch."),
        "schedule": {"iters": cfg.train.iters, "latent_iters": latent_iters, "rgb_iters": cfg.train.iters - latent_iters},
        "config": to_dict(cfg),
        "warmup": args.warmup,
        "steps": args.steps,
        "text_encoder": None,
        "results": [],
        "prompts_per_hour": [],
        "skipped": [],
    }
    model = build_random_sd(arch, device, dtype)
    result["text_encoder"] = time_text_encoder(model, prompts=32, reps=3)
    model.free_text_encoder()
    embedding = random_embedding(model, cfg, dtype)
    init_state = fresh_slot_state(cfg, 0, device)
    graph_settings = [g.strip() for g in args.cuda_graph.split(",") if g.strip()]
    for g in graph_settings:
        if g not in ("off", "on"):
            raise ValueError(f"--cuda-graph lists off and/or on, got {g!r}")
    renderers: dict[str, str] = {}
    for backend, graph_setting in [(b, g) for b in backends for g in graph_settings]:
        graphed = graph_setting == "on"
        try:
            if graphed:
                step_graph_choice(from_dict({"train": {"cuda_graph": "on"}}, bench_config(args, device)), max(ks), device)
            predictor = make_predictor(model, backend, max(ks), Path(args.engines_dir), args.build_engines, step_graph=graphed)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            log.warning("backend %s (cuda graph %s) skipped: %s", backend, graph_setting, exc)
            result["skipped"].append({"backend": backend, "cuda_graph": graphed, "reason": str(exc)})
            continue
        frozen = frozen_from_model(model, cfg, predictor, max(ks))
        rgb_inputs = {e: rgb_input(e, model, cfg, frozen) for e in encoders}
        for k in ks:
            trainer = None
            rows = {}
            try:
                trainer = new_trainer(frozen, cfg, k, device, step_graph=graphed)
                renderers[graph_setting] = trainer.renderer.backend_for(device)
                for slot in range(k):
                    trainer.assign(slot, cfg, embedding, init_state=init_state)
                for phase, encoder in [("latent", None), *(("rgb", e) for e in encoders)]:
                    if encoder is not None:
                        trainer.guidance.inputs["rgb"] = rgb_inputs[encoder]
                    key = phase if encoder is None else f"rgb:{encoder}"
                    rows[key] = time_phase(trainer, phase, args.warmup, args.steps)
                    row = {"backend": backend, "cuda_graph": graphed, "K": k, "phase": phase, "rgb_encoder": encoder, "oom": False,
                           **rows[key]}  # fmt: skip
                    if graphed:
                        row["graph_replays"] = trainer.step_graphs.replays
                        row["graph_failed"] = trainer.step_graphs.failed
                    result["results"].append(row)
                    atomic_write_text(out, json.dumps(result, indent=2) + "\n")  # a run cut short keeps its rows
                    log.info("%s%s K=%d %s%s: %.2f it/s (%.1f prompt-it/s), step %.1f ms (GPU busy %s ms), peak %s", backend,
                             " (cuda graph)" if graphed else "", k, phase, f" ({encoder})" if encoder else "", row["it_per_s"],
                             row["prompt_it_per_s"], row["step_ms"],
                             f"{row['device_busy_ms']:.1f}" if row["device_busy_ms"] is not None else "-",
                             row["peak_memory_bytes"])  # fmt: skip
            except torch.OutOfMemoryError:
                log.warning("%s K=%d: out of memory; larger K skipped", backend, k)
                result["results"].append({"backend": backend, "cuda_graph": graphed, "K": k,
                                          "phase": "latent" if "latent" not in rows else "rgb",
                                          "rgb_encoder": next((e for e in encoders if f"rgb:{e}" not in rows), None)
                                          if "latent" in rows else None, "oom": True})  # fmt: skip
                del trainer
                gc.collect()
                torch.cuda.empty_cache()
                break
            del trainer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            s = result["schedule"]
            for encoder in encoders:
                hours = (s["latent_iters"] / rows["latent"]["it_per_s"] + s["rgb_iters"] / rows[f"rgb:{encoder}"]["it_per_s"]) / 3600
                result["prompts_per_hour"].append({"backend": backend, "cuda_graph": graphed, "K": k, "rgb_encoder": encoder,
                                                   "prompts_per_hour": k / hours})  # fmt: skip
        result["renderer"] = renderers.get("off", renderers.get("on"))
        result["renderers"] = renderers
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        del predictor, frozen
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamfusion-trt bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny SD and field: a smoke check that runs on a CPU in seconds")
    p.add_argument("--backends", default="eager,tensorrt", help="noise-predictor backends: eager, inductor, aotinductor, "
                   "tensorrt (those without a built engine in --engines-dir are skipped) (default: %(default)s)")  # fmt: skip
    p.add_argument("--concurrency", default=None, help="K values, prompts trained at once (default: 1,4,16,32; tiny: 1,2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per phase (default: 3; tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per phase (default: 8; tiny: 2)")
    p.add_argument("--render-backend", choices=("auto", "nerfacc", "torch"), help="render.backend (default: auto)")
    p.add_argument("--field-backend", choices=typing.get_args(typing.get_type_hints(FieldConfig)["backend"]), default="auto",
                   help="hash-grid implementation, as training picks it by default (default: %(default)s)")
    p.add_argument("--field-normals", choices=typing.get_args(NormalsMode), default=None,
                   help="field.normals (default: the config's)")
    p.add_argument("--rgb-encoder", default="vae",
                   help="comma-separated RGB-phase encoders, each timed: " + ", ".join(RGB_ENCODERS) + "; distilled needs an "
                   "encoder that passes its parity, which random weights never give, and auto fits one on first use "
                   "(minutes); untrained is a distilled encoder of the fitted one's architecture with random weights, "
                   "for its speed (speed does not depend on weight values) (default: %(default)s)")  # fmt: skip
    p.add_argument("--rgb-mode", choices=("latent", "image"), default="latent",
                   help="RGB phase: latent SDS through the VAE encoder, or image-space SDS with inference-only VAE (default: %(default)s)")
    p.add_argument("--cuda-graph", default="off", help="comma-separated train.cuda_graph settings, each timed: off (eager steps, "
                   "the renderer render.backend picks, the UNet with its own CUDA graphs) and/or on (the whole step replayed as a CUDA "
                   "graph, torch sampler, the UNet compiled without graphs) (default: %(default)s)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile the renderer / field")
    p.add_argument("--compile-rgb-encoder", choices=("auto", "on", "off"), default=None,
                   help="train.compile_rgb_encoder: the distilled / untrained encoder compiled (auto: on CUDA) (default: the config's)")
    p.add_argument("--engines-dir", default="engines", help="built TensorRT/AOTInductor files (default: %(default)s)")
    p.add_argument("--build-engines", action="store_true", help="build missing TensorRT/AOTInductor UNets first (slow)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="bench_train.json", help="JSON output (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    tiny_defaults = {"concurrency": "1,2", "warmup": 1, "steps": 2}
    full_defaults = {"concurrency": "1,4,16,32", "warmup": 3, "steps": 8}
    for key, value in (tiny_defaults if args.tiny else full_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    run_train_bench(args)
    return 0

