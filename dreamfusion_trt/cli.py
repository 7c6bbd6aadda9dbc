"""Command line: generate · batch · render · export-mesh · build-engines · bench.

Every error the user can cause ends in one `dreamfusion-trt: error: ...` line and exit code 2;
Ctrl-C exits 130 after the trainer has written a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import typing
from pathlib import Path

from .config import CPU_PRESET, BackendName, RunConfig, add_config_arguments, from_dict, load_yaml, overrides_from_args

log = logging.getLogger("dreamfusion_trt")

# Short flags for the options people set most; each one is an alias of a --section.field.
SHORTCUTS = {
    "model": ("model", "model"),
    "backend": ("model", "backend"),
    "out": ("output", "out"),
    "iters": ("train", "iters"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "negative": ("prompt", "negative"),
    "data_parallel": ("train", "data_parallel"),
}


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=40, width=110)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="YAML file of config sections; command-line flags override it")
    p.add_argument("--model", help="hub id, local diffusers folder, or single-file .safetensors/.ckpt checkpoint "
                   "(default: builtin, the package's own known-answer prior)")  # fmt: skip
    p.add_argument("--backend", choices=typing.get_args(BackendName),
                   help=f"noise-predictor backend (default: {RunConfig().model.backend}: TensorRT or AOTInductor when built, "
                   "else torch.compile on CUDA, else eager)")  # fmt: skip
    p.add_argument("--out", help=f"output folder (default: {RunConfig().output.out})")
    p.add_argument("--iters", type=int, help=f"training iterations (default: {RunConfig().train.iters})")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--device", help="cuda, cuda:N, cpu or auto (default: auto)")
    p.add_argument("--negative", help="negative prompt (default: empty)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--data-parallel", action="store_true", default=None,
                   help="generate under torchrun: the ranks train this one prompt together, each rendering its own "
                   "cameras (train.data_parallel; one process: no effect)")  # fmt: skip
    add_config_arguments(p, _help_variants())


def _help_variants() -> dict[str, dict]:
    """The settings --help shows beside the plain defaults: the built-in prior's presets (used
    with no --model, the CPU one on a CPU) and the CPU sizes any other model gets on a CPU."""
    import yaml

    from .prior import PRESET_CPU_NAME, PRESET_NAME, WEIGHTS_DIR

    variants: dict[str, dict] = {}
    for label, name in (("built-in prior", PRESET_NAME), ("built-in prior on a CPU", PRESET_CPU_NAME)):
        try:
            variants[label] = yaml.safe_load((WEIGHTS_DIR / name).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
    variants["another model on a CPU"] = CPU_PRESET
    return variants


def build_config(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """defaults (or a checkpoint's config) < the built-in prior's preset when it is the model <
    --config YAML < --section.field < shortcut flags."""
    from .scene import resolve_device

    cfg = _layer_flags(args, base if base is not None else RunConfig())
    if cfg.model.model != "builtin":
        if base is None and args.command in ("generate", "batch") and resolve_device(cfg.train.device).type == "cpu":
            # A full-size field on a CPU runs for days: the CPU sizes apply, under the user's own choices.
            cfg = _layer_flags(args, from_dict(CPU_PRESET, RunConfig()))
            log.info("running on the CPU: a smaller field, renders and schedule apply (%s); any --section.field "
                     "flag overrides them", ", ".join(f"{s}.{k}={v}" for s, d in CPU_PRESET.items() for k, v in d.items()))  # fmt: skip
        return cfg
    from .prior.preset import preset_config, use_weights
    from .prior.scenes import resolve_caption

    preset = preset_config(base, on_cpu=resolve_device(cfg.train.device).type == "cpu")
    cfg = _layer_flags(args, preset)
    if cfg.prompt.text.strip():
        resolve_caption(cfg.prompt.text)  # unknown prompts: one line listing the known objects
    return use_weights(cfg)


def _layer_flags(args: argparse.Namespace, cfg: RunConfig) -> RunConfig:
    if getattr(args, "config", None):
        cfg = load_yaml(args.config, cfg)
    cfg = from_dict(overrides_from_args(args), cfg)
    short: dict[str, dict[str, object]] = {}
    for flag, (section, name) in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            short.setdefault(section, {})[name] = value
    if getattr(args, "prompt", None) is not None:
        short.setdefault("prompt", {})["text"] = args.prompt
    return from_dict(short, cfg)


def builtin_scorer(cfg: RunConfig):
    """The scorer for runs of `cfg`'s model: the built-in prior's (its objects have known
    answers), or None."""
    from .prior import is_builtin

    if not is_builtin(cfg.model.model):
        return None
    from .prior.score import write_score

    return write_score


def builtin_tracer(cfg: RunConfig):
    """The tracer (``train.trace_every``) for runs of `cfg`'s model: the built-in prior's
    `prior.score.trace_scores`, or None (other models have no known answers)."""
    from .prior import is_builtin

    if not is_builtin(cfg.model.model):
        return None
    from .prior.score import trace_scores

    return trace_scores


def _plain(value: object) -> object:
    """Paths as plain strings, inside lists and dicts too (for log lines people read)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def prompt_check(cfg: RunConfig):
    """What every batch line must pass, as `generate` checks its prompt: for the built-in prior,
    one of its known objects (ValueError listing them); any prompt for another model."""
    from .prior import is_builtin

    if not is_builtin(cfg.model.model):
        return None
    from .prior.scenes import resolve_caption

    return resolve_caption


def cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .train.generate import generate

    base = None
    if args.resume:
        out = Path(args.out or build_config(args).output.out)
        base = load_checkpoint(out).config
        if args.prompt is not None and args.prompt != base.prompt.text:
            raise ValueError(f"--resume: '{out}' was trained on {base.prompt.text!r}, not {args.prompt!r}")
    if args.prompt is not None and not args.prompt.strip() and not args.resume:
        example = "a red cube" if (args.model or RunConfig().model.model) == "builtin" else "a DSLR photo of a hamburger"
        raise ValueError(f"prompt is empty: give a text prompt, e.g. dreamfusion-trt generate \"{example}\"")
    cfg = build_config(args, base)
    outputs = generate(cfg, resume=args.resume, progress=not args.quiet, scorer=builtin_scorer(cfg), tracer=builtin_tracer(cfg))
    if outputs is None:  # a data-parallel rank other than 0: rank 0 wrote the run folder
        return 0
    for name, value in dataclasses.asdict(outputs).items():
        log.info("%s: %s", name, _plain(value))
    print(outputs.out_dir)
    if outputs.failed:  # everything else is on disk
        print(f"dreamfusion-trt: not written: {'; '.join(f'{k}: {v}' for k, v in outputs.failed.items())}", file=sys.stderr)
        return 1
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Exit code 0, 1 when a prompt failed; a stop (SIGTERM 143, SIGUSR1 or a stop request to
    requeue 75) raises `Interrupted`, which `main` turns into its exit code."""
    from .train.batch import load_batch_config, run_batch
    from .train.queue import parse_shard

    shard = parse_shard(args.shard) if args.shard is not None else None
    if not args.lease_s > 0:
        raise ValueError(f"--lease-s must be a positive number of seconds, got {args.lease_s}")
    out = Path(args.out).expanduser() if args.out else Path("runs") / Path(args.prompts).stem
    base = load_batch_config(out)  # a re-run continues with the settings the batch started with
    cfg = build_config(args, base)
    cfg.output = dataclasses.replace(cfg.output, out=str(out))
    result = run_batch(cfg, args.prompts, concurrency=args.concurrency, progress=not args.quiet, retry_failed=args.retry_failed,
                       scorer=builtin_scorer(cfg), shard=shard, lease_s=args.lease_s, check_prompt=prompt_check(cfg),
                       tracer=builtin_tracer(cfg))  # fmt: skip
    log.info("%d done, %d failed, %d finished earlier, %d line(s) skipped; manifest: %s",
             len(result.done), len(result.failed), len(result.skipped), len(result.problems), out / "manifest.jsonl")  # fmt: skip
    print(result.out_dir)
    if result.failed:
        print(f"dreamfusion-trt: {len(result.failed)} prompt(s) failed; their errors are in {out / 'manifest.jsonl'}", file=sys.stderr)
        return 1
    return 0


def _open_scene(ckpt_path: str, device_name: str):
    from .checkpoint import load_checkpoint
    from .scene import resolve_device, scene_from_checkpoint

    device = resolve_device(device_name)
    ckpt = load_checkpoint(ckpt_path, map_location=device)
    return ckpt, scene_from_checkpoint(ckpt, device)


def _parse_light(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ValueError(f"--light must be three numbers x,y,z, got {text!r}") from exc
    if len(values) != 3 or all(v == 0 for v in values):
        raise ValueError(f"--light must be a non-zero direction x,y,z, got {text!r}")
    return values  # type: ignore[return-value]


def cmd_render(args: argparse.Namespace) -> int:
    from .atomic import check_writable_dir
    from .checkpoint import resolve_checkpoint_path
    from .export.artifacts import write_grids, write_turntables

    light = _parse_light(args.light)
    for flag, value in (("--frames", args.frames), ("--size", args.size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive number, got {value}")
    out = Path(args.out) if args.out else resolve_checkpoint_path(args.checkpoint).parent
    check_writable_dir(out)
    ckpt, renderer = _open_scene(args.checkpoint, args.device)
    cfg = ckpt.config
    cfg.output = dataclasses.replace(
        cfg.output,
        video_frames=args.frames if args.frames is not None else cfg.output.video_frames,
        video_size=args.size if args.size is not None else cfg.output.video_size,
    )
    write_grids(renderer, cfg, [out / ("relit.png" if light else "validation.png")], light_dir=light)
    if not args.no_video:
        write_turntables(renderer, cfg, [out / "turntable.mp4"])
    print(out)
    return 0


def cmd_export_mesh(args: argparse.Namespace) -> int:
    from .atomic import check_writable_dir
    from .checkpoint import resolve_checkpoint_path
    from .export.artifacts import write_meshes

    if args.resolution is not None and args.resolution < 2:
        raise ValueError(f"--resolution must be at least 2 cells per axis, got {args.resolution}")
    out = Path(args.out) if args.out else resolve_checkpoint_path(args.checkpoint).parent
    check_writable_dir(out)
    ckpt, renderer = _open_scene(args.checkpoint, args.device)
    cfg = ckpt.config
    formats = tuple(f.strip() for f in args.formats.split(",")) if args.formats else cfg.output.mesh_formats
    cfg = from_dict(
        {"output": {
            "mesh_formats": list(formats),
            "mesh_resolution": args.resolution or cfg.output.mesh_resolution,
            "mesh_threshold": args.threshold if args.threshold is not None else cfg.output.mesh_threshold,
            "mesh_level": args.level or ("fixed" if args.threshold is not None else cfg.output.mesh_level),
        }},
        cfg,
    )  # fmt: skip
    for fmt in cfg.output.mesh_formats:
        if fmt not in ("glb", "obj", "ply"):
            raise ValueError(f"--formats: {fmt!r} is not one of glb, obj, ply")
    for p in write_meshes(renderer, cfg, [out], stem="mesh")[0]:
        print(p)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import json

    from .prior.score import score_run

    result = score_run(args.run_dir, resolution=args.resolution)
    print(json.dumps(result, indent=2))
    return 0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_engines_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_MODEL, ModelConfig
    from .engines import build
    from .engines.artifacts import ARTIFACT_BACKENDS
    from .engines.spec import NETWORKS

    p = argparse.ArgumentParser(prog="dreamfusion-trt build-engines", description=build.__doc__, formatter_class=_formatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, diffusers folder or single-file checkpoint (default: %(default)s)")
    p.add_argument("--revision", help="hub revision")
    p.add_argument("--out", default="engines", help="engines folder; files go to OUT/<model key>/ (default: %(default)s)")
    p.add_argument("--batch-sizes", default=",".join(map(str, build.DEFAULT_BATCH_SIZES)),
                   help="UNet batch sizes in use, CFG doubling included (default: %(default)s)")  # fmt: skip
    p.add_argument("--networks", default=",".join(build.DEFAULT_NETWORKS),
                   help=f"comma-separated subset of {','.join(NETWORKS)} (default: %(default)s)")  # fmt: skip
    p.add_argument("--backends", default=",".join(ARTIFACT_BACKENDS),
                   help="comma-separated subset of %(default)s, or inductor: compile the UNet in-process at --batch-sizes "
                   "so that runs find it in the compile cache (default: %(default)s)")  # fmt: skip
    p.add_argument("--cache-dir", default=ModelConfig.cache_dir,
                   help="the runs' model.cache_dir, where torch.compile keeps its cache (default: %(default)s)")  # fmt: skip
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument("--vae-dtype", help="VAE precision if not --dtype (float32 for a VAE that overflows in fp16)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    p.add_argument("--opset", type=int, default=build.DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    p.add_argument("--workspace-gib", type=float, help="TensorRT workspace limit")
    p.add_argument("--optimization-level", type=int, default=3, choices=range(6),
                   help="TensorRT builder optimization level; 4-5 search longer for final engines (default: %(default)s)")  # fmt: skip
    p.add_argument("--no-parity", action="store_true", help="skip the onnxruntime parity check of fp32 ONNX files")
    p.add_argument("--render-encoder", metavar="RENDERxENCODE",
                   help="also fit the distilled RGB-phase render encoder for these sizes, e.g. 64x512 (what train.rgb_encoder "
                   "auto uses; otherwise it is fitted on first use)")  # fmt: skip
    p.add_argument("--local-files-only", action="store_true", help="never touch the network")
    return p


def cmd_build_engines(args: argparse.Namespace) -> int:
    """Build what `rest` asks for and log the summary; 0 unless an artifact failed to build."""
    from .engines.build import build_engines
    from .engines.compile_cache import use_compile_cache
    from .scene import resolve_device
    from .sdmodel import load_diffusion, resolve_dtype

    opts = build_engines_parser().parse_args(args.rest)
    try:
        batch_sizes = [int(b) for b in _csv(opts.batch_sizes)]
    except ValueError as exc:
        raise ValueError(f"--batch-sizes: expected comma-separated integers, got {opts.batch_sizes!r}") from exc
    sizes = None
    if opts.render_encoder:
        try:
            sizes = tuple(int(v) for v in opts.render_encoder.lower().split("x"))
        except ValueError:
            sizes = ()
        if len(sizes) != 2 or min(sizes) < 1:
            raise ValueError(f"--render-encoder takes RENDERxENCODE, e.g. 64x512; got {opts.render_encoder!r}")
    backends = _csv(opts.backends)
    warm = "inductor" in backends
    backends = [b for b in backends if b != "inductor"]
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    use_compile_cache(opts.cache_dir, device)  # AOTInductor and the in-process compile both fill it
    source = opts.model
    if source == "builtin":  # what generate and batch run without --model: the package's prior
        from .prior import WEIGHTS_DIR

        source = str(WEIGHTS_DIR)
    model = load_diffusion(source, device=device, dtype=dtype, revision=opts.revision, local_files_only=opts.local_files_only)
    report = build_engines(
        model, opts.out, batch_sizes=batch_sizes, networks=_csv(opts.networks), backends=backends,
        vae_dtype=resolve_dtype(opts.vae_dtype, device) if opts.vae_dtype else None, opset=opts.opset,
        parity=not opts.no_parity, workspace_gib=opts.workspace_gib, optimization_level=opts.optimization_level,
    )  # fmt: skip
    log.info("%s", report.summary())
    reasons: dict[str, list[str]] = {}
    for item in report.of("not built") + report.of("failed"):
        reasons.setdefault(item.reason, []).append(f"{item.backend} {item.network}")
    for reason, what in reasons.items():
        log.warning("could not build %s: %s", ", ".join(what), reason)
    if warm:
        import time

        from .engines.backends import load_network

        start = time.perf_counter()
        from .engines.compile_cache import precompiled_folder

        load_network("unet", model, "inductor", Path(opts.out), batch_sizes=tuple(sorted(set(batch_sizes))),
                     precompiled_dir=precompiled_folder(opts.cache_dir, device, model.key))  # fmt: skip
        log.info("inductor unet: compiled for batch %s in %.0f s; runs on this machine load it from the compile cache",
                 ",".join(map(str, sorted(set(batch_sizes)))), time.perf_counter() - start)  # fmt: skip
    if device.type == "cuda":
        from .render.renderer import _nerfacc

        if _nerfacc() is not None:  # its first build takes minutes: here, not in the first run
            from .render.nerfacc_kernels import load_kernels

            try:
                load_kernels()
                log.info("nerfacc: CUDA kernels ready")
            except ValueError as exc:
                log.warning("%s", exc)
    if sizes:
        from .guidance.render_encoder import BelowThresholdError, load_or_fit

        try:
            _, entry = load_or_fit(model.vae, model.vae_scaling_factor, model.key, opts.out, sizes[0], sizes[1], device=device)
            log.info("render encoder %dx%d: ready (gradient cosine %.3f)", *sizes, entry.get("parity", {}).get("grad_cos_mean", float("nan")))
        except BelowThresholdError as exc:
            log.warning("render encoder %dx%d is below its parity threshold, runs will use the full VAE: %s", *sizes, exc)
    return 1 if report.of("failed") else 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "engines":
        from .bench.engines import main as bench_main
    elif args.what == "train":
        from .bench.train import main as bench_main
    elif args.what == "prior":
        from .bench.prior import main as bench_main
    elif args.what == "field":
        from .bench.field import main as bench_main
    else:
        raise ValueError(f"unknown benchmark {args.what!r}")
    return bench_main(args.rest)


def _quiet_libraries() -> None:
    """--quiet: no loading bars or notices from the model libraries either."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "diffusers"):
        try:
            lib_logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        lib_logging.set_verbosity_error()
        lib_logging.disable_progress_bar()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamfusion-trt", description=__doc__, formatter_class=_formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="train a NeRF for one prompt and export it", formatter_class=_formatter)
    g.add_argument("prompt", nargs="?", help="text prompt, e.g. \"a DSLR photo of a hamburger\"")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    _add_run_options(g)
    g.set_defaults(func=cmd_generate)

    bt = sub.add_parser("batch", help="train many prompts, K at a time per GPU (torchrun: one process per GPU), each into its own folder",
                        formatter_class=_formatter)  # fmt: skip
    bt.add_argument("prompts", help="prompts file: one prompt per line (.txt) or JSON lines with prompt, seed, negative, iters (.jsonl)")
    bt.add_argument("--concurrency", type=int, help="prompts trained at once (default: from GPU memory; 2 on a CPU)")
    bt.add_argument("--retry-failed", action="store_true", help="run prompts that failed in an earlier run again")
    bt.add_argument("--shard", metavar="i/N", help="train only shard i of N (every N-th prompt from the i-th; Slurm job "
                    "arrays), sharing the output folder's queue with the other shards")  # fmt: skip
    bt.add_argument("--lease-s", type=float, default=300.0, metavar="SECONDS",
                    help="under torchrun or --shard: a prompt whose process stopped renewing its claim for this long is "
                    "taken over by another from its checkpoint (default: 300)")  # fmt: skip
    _add_run_options(bt)
    bt.set_defaults(func=cmd_batch)

    r = sub.add_parser("render", help="render a checkpoint: image grid (optionally relit) and turntable MP4")
    r.add_argument("checkpoint", help="run folder or checkpoint.safetensors")
    r.add_argument("--out", help="output folder (default: beside the checkpoint)")
    r.add_argument("--light", help="world-space light direction x,y,z for relit renders (z is up)")
    r.add_argument("--frames", type=int, help="turntable frames")
    r.add_argument("--size", type=int, help="image size in pixels")
    r.add_argument("--no-video", action="store_true", help="image grid only")
    r.add_argument("--device", default="auto")
    r.set_defaults(func=cmd_render)

    m = sub.add_parser("export-mesh", help="marching-cubes mesh of a checkpoint (GLB, OBJ, PLY)")
    m.add_argument("checkpoint", help="run folder or checkpoint.safetensors")
    m.add_argument("--out", help="output folder (default: beside the checkpoint)")
    m.add_argument("--formats", help="comma-separated: glb,obj,ply (default: the run's output.mesh_formats)")
    m.add_argument("--resolution", type=int, help="grid cells per axis")
    m.add_argument("--threshold", type=float, help="density iso-level (with --level opacity: the centre of the levels searched)")
    m.add_argument("--level", choices=("fixed", "opacity"),
                   help="fixed: cut at the threshold; opacity: at the level whose silhouettes agree best with the renders "
                        "(default: fixed when --threshold is given, else the run's output.mesh_level)")  # fmt: skip
    m.add_argument("--device", default="auto")
    m.set_defaults(func=cmd_export_mesh)

    sc = sub.add_parser("score", help="score a run of a built-in prior object against the true shape (writes score.json)")
    sc.add_argument("run_dir", help="run folder (checkpoint.json + mesh.glb/.obj/.ply)")
    sc.add_argument("--resolution", type=int, default=96, help="voxel grid per axis for IoU (default: 96)")
    sc.set_defaults(func=cmd_score)

    b = sub.add_parser("build-engines", help="export ONNX and build engines once (see build_scripts/build_engines.py)", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_build_engines)

    bench = sub.add_parser("bench", help="benchmarks that write JSON (engines, train, prior, field)")
    bench.add_argument("what", choices=["engines", "train", "prior", "field"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "build-engines":
        # Its flags belong to its own parser; argparse's REMAINDER would not capture a first
        # word that starts with '--', so hand everything after the command over as it is.
        args = argparse.Namespace(command="build-engines", func=cmd_build_engines, rest=argv[1:], verbose=False)
    else:
        args = parser.parse_args(argv)
    from .train.driver import Interrupted

    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.WARNING if quiet else logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if quiet:
        _quiet_libraries()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dreamfusion-trt: interrupted", file=sys.stderr)
        return 130
    except Interrupted as exc:  # SIGTERM / SIGUSR1: checkpoints are written, the same command continues
        print(f"dreamfusion-trt: {exc}; checkpoints written", file=sys.stderr)
        return exc.exit_code
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError) as exc:
        if args.verbose:
            log.exception("failed")
        message = " ".join(str(exc).split())  # one line, however the library formatted it
        print(f"dreamfusion-trt: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
