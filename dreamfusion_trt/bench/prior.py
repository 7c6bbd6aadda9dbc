"""Known-answer evidence: how well SDS with the built-in prior recovers every known object.

Runs the batch API (`train.batch.run_batch`) over the known captions with the prior's preset (its
CPU settings on a CPU), once per view-dependent setting asked for, and collects per object the
score of its run against the true object (``score.json``: IoU at the mesh's threshold, the best
IoU over density thresholds, the opacity on and off the true silhouette, Chamfer, colour error,
the six-colored cube's share of right faces) and its wall time from the batch manifest. Writes
one JSON with the rows, the medians and the machine; ``--table`` prints the Markdown table of one
or more such files (BENCHMARKS.md's table), and ``--compare BASE NEW`` pairs two sets of them run
by run (setting, object, seed): wins, mean difference with a bootstrap interval, and a sign test,
since one setting's median moves by 0.04-0.08 IoU from seed to seed.

``--quick`` is the gate every speed change quotes: a fixed subset (one shape per colour and the
six-colored cube, seed 0, view-dependent prompts, one batch of K = 4) compared with the stored
reference for this device kind (``prior/quick_reference.json``) in one line; exit status 1 when
it fails. ``--write-reference`` stores the run as that reference.

    dreamfusion-trt bench prior --out prior_gpu_vd.json --concurrency 16                     # GPU, one batch of all 16
    dreamfusion-trt bench prior --view-dependent off --out prior_gpu_plain.json --concurrency 16
    dreamfusion-trt bench prior --device cpu --out prior_cpu.json --objects "a red cube,a blue torus"
    dreamfusion-trt bench prior --quick --out quick.json                                     # the gate
    dreamfusion-trt bench prior --objects "a six-colored cube" --seeds 0,1,2,3,4 --concurrency 5   # Janus
    dreamfusion-trt bench prior --table prior_gpu_vd.json prior_cpu.json
    dreamfusion-trt bench prior --compare base_s1.json,base_s2.json new_s1.json,new_s2.json   # paired, with a sign test
    dreamfusion-trt bench prior --out x.json -- --sds.guidance_scale 50     # run flags after --
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import logging
import math
import platform
import random
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..atomic import atomic_write_text
from ..config import RunConfig, add_config_arguments, from_dict, overrides_from_args
from ..train.monitor import TRACE_NAME

log = logging.getLogger(__name__)

# iou_by_threshold (the field's IoU at each density level) lets a mesh level be chosen from the
# files afterwards; best_iou alone says only that some level would do better.
SCORE_KEYS = ("iou", "best_iou", "best_threshold", "opacity_on_object", "opacity_off_object", "chamfer",
              "color_error", "face_color_share", "face_colors", "mesh_volume_fraction", "true_volume_fraction",
              "iou_by_threshold", "radial_error")  # fmt: skip

# The quick gate: one shape per colour and the six-colored cube, seed 0, one batch.
QUICK_OBJECTS = ("a red cube", "a green sphere", "a blue torus", "a six-colored cube")
QUICK_SEED = 0
QUICK_VIEW_DEPENDENT = "on"
# Per device kind, run flags on top of the preset. The turntable does not enter the score, so the
# gate writes 4 frames. The GPU preset's 2,000 steps take ~220 s per batch on an H200, over the
# gate's 3 minutes; there the gate trains half of them (against its own reference). On both kinds
# the RGB phase goes through the full VAE (the CPU's auto choice): the gate then needs no render
# encoder fitted for the prior first (minutes on a fresh machine), and its verdict does not depend
# on which fitted encoder is on disk; the distilled encoder has its own gate (BENCHMARKS.md).
QUICK_FLAGS: dict[str, tuple[str, ...]] = {
    "cpu": ("--output.video_frames", "4"),
    "cuda": ("--output.video_frames", "4", "--train.iters", "1000", "--render.albedo_iters", "500", "--train.rgb_encoder", "vae"),
}
QUICK_REFERENCE = Path(__file__).resolve().parents[1] / "prior" / "quick_reference.json"
# One-sided tolerances: a change may be better, never worse by more than these.
QUICK_TOLERANCE = {"median_iou": 0.05, "median_color_error": 0.05, "collapse_ratio": 0.5}


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu_threads"] = torch.get_num_threads()
        info["processor"] = platform.processor() or platform.machine()
    info["commit"] = source_commit()
    return info


def source_commit() -> str | None:
    """The short commit of the code that runs: ``DREAMFUSION_TRT_COMMIT`` when set (a copy of the
    tree outside git, such as an exported snapshot), else git's HEAD, but only when this package's
    files are tracked by that repository (a copy that sits inside some other checkout is not
    that checkout's HEAD); None when unknown."""
    if os.environ.get("DREAMFUSION_TRT_COMMIT"):
        return os.environ["DREAMFUSION_TRT_COMMIT"]
    here = Path(__file__).resolve()

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=here.parent, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", here.name).returncode != 0:
            return None
        return git("rev-parse", "--short", "HEAD").stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def collect(batch_dir: Path) -> list[dict[str, Any]]:
    """Per prompt of a finished batch folder: status, seed, wall time and its score (None when
    it failed or left nothing to score); with ``train.trace_every``, its ``trace`` rows too."""
    rows = []
    for line in (batch_dir / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        row: dict[str, Any] = {"object": rec["prompt"], "seed": rec.get("seed"), "status": rec["status"],
                               "wall_s": rec.get("wall_s"), "steps": rec.get("step"), "error": rec.get("error"),
                               "folder": rec.get("id")}  # fmt: skip
        score_rel = (rec.get("outputs") or {}).get("score")
        score = json.loads((batch_dir / score_rel).read_text()) if score_rel else {}
        row.update({k: score.get(k) for k in SCORE_KEYS})
        trace = batch_dir / str(rec.get("id")) / TRACE_NAME
        if rec.get("id") and trace.is_file():
            row["trace"] = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
        rows.append(row)
    return rows


def volume_ratio(row: dict[str, Any]) -> float | None:
    """The mesh's volume over the true object's: above 1 the run came out too big, below 1 too
    small. IoU alone does not say which (a sphere 20 % too big and one 15 % too small read alike)."""
    mesh, true = row.get("mesh_volume_fraction"), row.get("true_volume_fraction")
    return mesh / true if mesh is not None and true else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str, among: list[dict[str, Any]] = rows) -> float | None:
        values = [r[key] for r in among if r.get(key) is not None]
        return statistics.median(values) if values else None

    analytic = [r for r in rows if r["object"] != "a six-colored cube"]
    ratios = [v for v in map(volume_ratio, rows) if v is not None]
    shares = [r["face_color_share"] for r in rows if r.get("face_color_share") is not None]
    return {
        "median_iou": med("iou"),
        "median_best_iou": med("best_iou"),
        "median_opacity_on_object": med("opacity_on_object"),
        "median_chamfer": med("chamfer"),
        "median_color_error": med("color_error"),
        "median_wall_s": med("wall_s"),
        "median_volume_ratio": statistics.median(ratios) if ratios else None,
        "objects_too_big": sum(1 for v in ratios if v > 1.1),  # over 10 % more volume than the truth
        "objects_too_small": sum(1 for v in ratios if v < 0.9),
        "min_iou_analytic": min((r["iou"] or 0.0 for r in analytic), default=None),
        "objects_iou_at_least_0_8": sum(1 for r in analytic if (r["iou"] or 0.0) >= 0.8),
        "objects_analytic": len(analytic),
        "six_colored_face_shares": shares,
        "six_colored_face_share_mean": statistics.fmean(shares) if shares else None,
        "six_colored_face_share_stdev": statistics.stdev(shares) if len(shares) > 1 else None,
        "failed": [r["object"] for r in rows if r["status"] != "done"],
    }


def parse_run_flags(extra: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--section.field value`` pairs (the run flags after ``--``) as a nested dict of strings;
    ValueError naming anything else."""
    parser = argparse.ArgumentParser(prog="dreamfusion-trt bench prior ... --", add_help=False)
    add_config_arguments(parser)
    args, unknown = parser.parse_known_args(list(extra))
    if unknown:
        raise ValueError(f"run flags after '--' must be --section.field VALUE pairs; not understood: {' '.join(unknown)!r}")
    return overrides_from_args(args)


def run_config(device: str, view_dependent: bool, extra: Sequence[str], out: Path) -> RunConfig:
    """The batch's config: the prior's preset (its CPU settings on a CPU) with its weights, the
    device, the view-dependent setting, then the user's run flags (so ``--model.model`` may
    point at another prior folder), written into `out`."""
    from ..prior.preset import preset_config, use_weights

    flags = parse_run_flags(extra)
    cfg = preset_config(None, on_cpu=device == "cpu")
    if "model" not in flags.get("model", {}):
        cfg = use_weights(cfg)
    cfg = from_dict({"train": {"device": device}, "prompt": {"view_dependent": view_dependent}}, cfg)
    cfg = from_dict(flags, cfg)
    cfg.output = dataclasses.replace(cfg.output, out=str(out))
    return cfg


def prior_fingerprint(extra: Sequence[str]) -> str | None:
    """The fingerprint of the prior a run trains against (``--model.model`` among the run flags,
    else the built-in one; `sdmodel.folder_fingerprint`), None for a model that is not a local
    folder. A quick reference holds it, so a reference is never read against another prior."""
    from ..prior import WEIGHTS_DIR
    from ..sdmodel import folder_fingerprint

    folder = Path(parse_run_flags(extra).get("model", {}).get("model", WEIGHTS_DIR))
    return folder_fingerprint(folder) if (folder / "model_index.json").is_file() else None


def preset_fingerprint(kind: str) -> str | None:
    """12 hex digits of the settings the built-in prior's presets give a run on device kind `kind`
    ("cpu" or "cuda"): the preset's sections, with the CPU preset's merged on top for the CPU, as
    data (comments, layout, a CPU entry that repeats the GPU's value and an entry that states
    RunConfig's default do not count, since none changes the run); None when a file is missing. A
    quick reference holds it, so a verdict against a reference recorded with other settings says so."""
    import yaml

    from ..config import RunConfig, to_dict
    from ..prior import PRESET_CPU_NAME, PRESET_NAME, WEIGHTS_DIR

    merged: dict[str, Any] = {}
    for name in (PRESET_NAME, PRESET_CPU_NAME) if kind == "cpu" else (PRESET_NAME,):
        path = WEIGHTS_DIR / name
        if not path.is_file():
            return None
        for section, values in (yaml.safe_load(path.read_text()) or {}).items():
            merged[section] = {**merged.get(section, {}), **(values or {})}
    defaults = to_dict(RunConfig())
    for section, values in merged.items():
        given = defaults.get(section, {})
        merged[section] = {k: v for k, v in values.items() if k not in given or given[k] != v}
    text = json.dumps({"kind": kind, "settings": {s: v for s, v in merged.items() if v}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_prompts(path: Path, objects: Sequence[str], seeds: Sequence[int] | None) -> Path:
    """A batch prompts file: one line per object, or per (object, seed) when `seeds` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if seeds is None:
        atomic_write_text(path, "\n".join(objects) + "\n")
        return path
    lines = [json.dumps({"prompt": o, "seed": s}) for o in objects for s in seeds]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    from ..prior.scenes import KNOWN_CAPTIONS, resolve_caption
    from ..prior.score import trace_scores, write_score
    from ..scene import resolve_device
    from ..train.batch import run_batch

    objects = [c.strip() for c in args.objects.split(",")] if args.objects else list(KNOWN_CAPTIONS)
    for caption in objects:
        resolve_caption(caption)  # unknown objects: one error line listing the known ones
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    device = str(resolve_device(args.device))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_prior_"))
    result: dict[str, Any] = {
        "benchmark": "prior",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "concurrency": args.concurrency,
        "seeds": seeds,
        "run_flags": extra,
        "prior": prior_fingerprint(extra),
        "preset": preset_fingerprint(device_kind(device)),
        "settings": {},
    }
    for setting in args.view_dependent.split(","):
        if setting not in ("on", "off"):
            raise ValueError(f"--view-dependent takes on, off or on,off; got {setting!r}")
        folder = work / f"view_dependent_{setting}"
        suffix = ".jsonl" if seeds is not None else ".txt"
        prompts = write_prompts(work / f"objects_{setting}{suffix}", objects, seeds)
        cfg = run_config(device, setting == "on", extra, folder)
        log.info("view-dependent %s: %d runs, K=%d, in %s", setting, len(objects) * len(seeds or [0]), args.concurrency, folder)
        start = time.perf_counter()
        batch = run_batch(cfg, prompts, concurrency=args.concurrency, progress=args.progress, scorer=write_score,
                          tracer=trace_scores)
        rows = collect(folder)
        result["settings"][setting] = {
            "failed_runs": len(batch.failed),
            "batch_wall_s": round(time.perf_counter() - start, 2),
            "folder": str(folder),
            "summary": summarize(rows),
            "rows": rows,
        }
        log.info("view-dependent %s: %s", setting, result["settings"][setting]["summary"])
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# the quick gate


def device_kind(device: str) -> str:
    """"cuda" or "cpu": the key of a quick reference."""
    return "cuda" if device.startswith("cuda") else "cpu"


def load_references(path: Path = QUICK_REFERENCE) -> dict[str, Any]:
    """The stored quick references, by device kind ({} when there are none yet)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"quick reference '{path}' is not valid JSON: {exc}") from exc


def reference_entry(result: dict[str, Any]) -> dict[str, Any]:
    """What a quick reference keeps of a quick run: the machine, flags, medians and per-object scores."""
    block = result["settings"][QUICK_VIEW_DEPENDENT]
    keep = ("object", "seed", "status", "wall_s", *SCORE_KEYS)
    return {
        "date": result["date"],
        "machine": result["machine"],
        "objects": list(QUICK_OBJECTS),
        "run_flags": result["run_flags"],
        "prior": result.get("prior"),
        "preset": result.get("preset"),
        "batch_wall_s": block["batch_wall_s"],
        "summary": {k: block["summary"][k] for k in ("median_iou", "median_best_iou", "median_opacity_on_object",
                                                      "median_color_error", "median_chamfer")},  # fmt: skip
        "rows": [{k: r.get(k) for k in keep} for r in block["rows"]],
        "tolerance": dict(QUICK_TOLERANCE),
    }


def verdict(result: dict[str, Any], references: dict[str, Any]) -> tuple[bool | None, str]:
    """(passed, one line) for a quick run against the reference of its device kind; passed is
    None when there is no reference for it yet. Fails when the median IoU drops, or the median
    colour error rises, by more than the tolerance, or when any object collapses (no score, or an
    IoU below `collapse_ratio` times its reference IoU)."""
    kind = device_kind(result["machine"]["device"])
    block = result["settings"][QUICK_VIEW_DEPENDENT]
    s = block["summary"]
    now = (f"median IoU {_fmt(s['median_iou'])} (best over thresholds {_fmt(s['median_best_iou'])}, opacity on object "
           f"{_fmt(s['median_opacity_on_object'], 2)}), median colour error {_fmt(s['median_color_error'])}, "
           f"{block['batch_wall_s']:.0f} s")  # fmt: skip
    ref = references.get(kind)
    if ref is None:
        return None, f"bench prior --quick ({kind}): {now}; no reference for this device yet"
    if ref.get("prior") != result.get("prior"):
        return None, (f"bench prior --quick ({kind}): {now}; no verdict: the {kind} reference is for prior "
                      f"{ref.get('prior')}, this run trained against prior {result.get('prior')} (--write-reference records one)")  # fmt: skip
    tol = ref.get("tolerance", QUICK_TOLERANCE)
    rs = ref["summary"]
    problems = []
    if s["median_iou"] is None or s["median_iou"] < rs["median_iou"] - tol["median_iou"]:
        problems.append(f"median IoU {_fmt(s['median_iou'])} < {rs['median_iou']:.3f} - {tol['median_iou']}")
    if s["median_color_error"] is None or s["median_color_error"] > rs["median_color_error"] + tol["median_color_error"]:
        problems.append(f"median colour error {_fmt(s['median_color_error'])} > {rs['median_color_error']:.3f} + {tol['median_color_error']}")
    ref_iou = {r["object"]: r.get("iou") for r in ref["rows"]}
    for r in block["rows"]:
        floor = tol["collapse_ratio"] * (ref_iou.get(r["object"]) or 0.0)
        if r["status"] != "done" or r.get("iou") is None or (floor > 0 and r["iou"] < floor):
            problems.append(f"{r['object']} collapsed (IoU {_fmt(r.get('iou'))}, reference {_fmt(ref_iou.get(r['object']))})")
    against = f"reference {rs['median_iou']:.3f} / {rs['median_color_error']:.3f} from {ref['date'][:10]}"
    if ref.get("preset") and result.get("preset") and ref["preset"] != result["preset"]:
        against += f", recorded with other presets ({ref['preset']}; this run's {result['preset']}: record it again if they changed on purpose)"
    if problems:
        return False, f"bench prior --quick ({kind}): FAIL: {'; '.join(problems)} [{now}; {against}]"
    return True, f"bench prior --quick ({kind}): PASS: {now} [{against}, tolerance {tol['median_iou']} / {tol['median_color_error']}]"


def quick_args(args: argparse.Namespace, extra: list[str], device: str) -> tuple[argparse.Namespace, list[str]]:
    """`args` and run flags for the quick gate on `device`: its subset, seed, setting and K,
    its device kind's flags, then the user's own."""
    if args.objects or args.seeds:
        raise ValueError("--quick runs its own fixed objects and seed; drop --objects and --seeds")
    quick = argparse.Namespace(**{**vars(args), "objects": ",".join(QUICK_OBJECTS), "seeds": str(QUICK_SEED),
                                  "view_dependent": QUICK_VIEW_DEPENDENT, "concurrency": len(QUICK_OBJECTS),
                                  "device": device})  # fmt: skip
    return quick, [*QUICK_FLAGS[device_kind(device)], *extra]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_FACE_LETTERS = {"red": "R", "green": "G", "blue": "B", "yellow": "Y", "magenta": "M", "cyan": "C", None: "-"}


def trace_table(paths: Sequence[str]) -> str:
    """Markdown: per run that kept a trace (``train.trace_every``), one row per traced step:
    the field's IoU at the mesh level / the best over levels, its volume against the truth's,
    opacity on / off the object, the albedo's colour error on the true surface, and the torus's
    hole fill or the six-colored cube's face colours (one letter per face, in `FACES` order:
    RGBYMC is every face right)."""
    lines = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for setting, block in data["settings"].items():
            for r in block["rows"]:
                if not r.get("trace"):
                    continue
                lines += ["", f"{r['object']}, seed {r['seed']}, view-dep. {setting} (final mesh IoU {_fmt(r.get('iou'))}):", "",
                          "| step | IoU / best | volume × | opacity on / off | albedo err. | hole fill / faces |",
                          "| ---: | --- | ---: | --- | ---: | --- |"]  # fmt: skip
                for t in r["trace"]:
                    faces = t.get("albedo_face_colors")
                    extra = (_fmt(t.get("hole_fill"), 2) if "hole_fill" in t
                             else "".join(_FACE_LETTERS.get(c, "?") for c in faces.values()) if faces else "")  # fmt: skip
                    lines.append(f"| {t['step']} | {_fmt(t.get('field_iou'))} / {_fmt(t.get('best_iou'))} | {_fmt(t.get('field_volume_ratio'), 2)} "
                                 f"| {_fmt(t.get('opacity_on_object'), 2)} / {_fmt(t.get('opacity_off_object'), 2)} "
                                 f"| {_fmt(t.get('albedo_error'), 3)} | {extra} |")  # fmt: skip
    if not lines:
        raise ValueError(f"no run in {', '.join(map(str, paths))} kept a trace: run bench prior with -- --train.trace_every N")
    return "\n".join(lines[1:])


def table(paths: Sequence[str]) -> str:
    """Markdown: one row per object (and seed, when several), per (file, view-dependent setting)
    IoU / best IoU over thresholds / opacity on the object / Chamfer / colour error / the mesh's
    volume over the true one / wall time, then the medians."""
    runs = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        where = data["machine"].get("gpu") or f"CPU ({data['machine'].get('cpu_threads')} threads)"
        for setting, block in data["settings"].items():
            seeded = len(data.get("seeds") or []) > 1
            rows = {(f"{r['object']}, seed {r['seed']}" if seeded else r["object"]): r for r in block["rows"]}
            summary = {**summarize(block["rows"]), **block["summary"]}  # files written before a key existed
            runs.append((f"{where}, view-dep. {setting}", rows, summary))
    objects = list(dict.fromkeys(o for _, rows, _ in runs for o in rows))
    head = "| object | " + " | ".join(f"{name}: IoU / best IoU / opacity / Chamfer / colour err. / volume × / s" for name, _, _ in runs) + " |"
    lines = [head, "| --- |" + " --- |" * len(runs)]
    for obj in objects:
        cells = []
        for _, rows, _ in runs:
            r = rows.get(obj)
            if r is None:
                cells.append("not run")
                continue
            cell = f"{_fmt(r['iou'])} / {_fmt(r.get('best_iou'))} / {_fmt(r.get('opacity_on_object'), 2)} / {_fmt(r['chamfer'], 4)} / {_fmt(r['color_error'], 2)} / {_fmt(volume_ratio(r), 2)} / {_fmt(r['wall_s'], 0)}"
            if r.get("face_color_share") is not None:
                cell += f" (faces right {r['face_color_share']:.2f})"
            if r["status"] != "done":
                cell = f"{r['status']}: {r.get('error') or ''}"
            cells.append(cell)
        lines.append(f"| {obj} | " + " | ".join(cells) + " |")
    meds = [f"**{_fmt(s['median_iou'])} / {_fmt(s.get('median_best_iou'))} / {_fmt(s.get('median_opacity_on_object'), 2)} / "
            f"{_fmt(s['median_chamfer'], 4)} / {_fmt(s['median_color_error'], 2)} / {_fmt(s.get('median_volume_ratio'), 2)} / "
            f"{_fmt(s['median_wall_s'], 0)}**"
            for _, _, s in runs]  # fmt: skip
    lines.append("| median | " + " | ".join(meds) + " |")
    hits = [f"{s['objects_iou_at_least_0_8']} of {s['objects_analytic']} (min {_fmt(s['min_iou_analytic'])})" for _, _, s in runs]
    lines.append("| analytic objects with IoU ≥ 0.8 | " + " | ".join(hits) + " |")
    sizes = [f"{s['objects_too_big']} / {s['objects_too_small']}" for _, _, s in runs]
    lines.append("| objects over 1.1× / under 0.9× the true volume | " + " | ".join(sizes) + " |")
    if any(s.get("six_colored_face_shares") for _, _, s in runs):
        janus = [f"{_fmt(s.get('six_colored_face_share_mean'), 2)} ± {_fmt(s.get('six_colored_face_share_stdev'), 2)} "
                 f"(n = {len(s.get('six_colored_face_shares') or [])})" for _, _, s in runs]  # fmt: skip
        lines.append("| six-colored cube: faces right, mean ± sd | " + " | ".join(janus) + " |")
    return "\n".join(lines)


# --compare: which metrics it pairs, and which way is better.
COMPARE_HIGHER_IS_BETTER = {"iou": True, "best_iou": True, "opacity_on_object": True, "face_color_share": True,
                            "chamfer": False, "color_error": False}  # fmt: skip
COMPARE_RESAMPLES = 10_000  # bootstrap resamples of the mean difference (seeded: the same files give the same interval)


def _rows_by_run(paths: Sequence[str], side: str) -> dict[tuple[str, str, Any], dict[str, Any]]:
    """(view-dependent setting, object, seed) -> row, over result files; ValueError when one run
    appears twice on one side (two files of the same seed and setting)."""
    out: dict[tuple[str, str, Any], dict[str, Any]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("benchmark") != "prior" or "settings" not in data:
            raise ValueError(f"--compare: {path} is not a 'bench prior' result file")
        for setting, block in data["settings"].items():
            for row in block["rows"]:
                key = (setting, row["object"], row.get("seed"))
                if key in out:
                    raise ValueError(f"--compare: the {side} side has {row['object']!r}, seed {row.get('seed')}, "
                                     f"view-dependent {setting} twice ({path} and an earlier file)")  # fmt: skip
                out[key] = row
    return out


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between ``wins`` and
    ``losses`` if either side were equally likely to win each pair (ties are left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def bootstrap_mean_interval(deltas: Sequence[float], resamples: int = COMPARE_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``deltas`` (pure Python with a seeded
    `random.Random`, so it does not depend on the machine)."""
    if not deltas:
        raise ValueError("bootstrap_mean_interval needs at least one difference")
    rng, n = random.Random(seed), len(deltas)
    means = sorted(sum(rng.choice(deltas) for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def metric_reader(metric: str) -> Callable[[dict[str, Any]], float | None]:
    """A row's value of ``metric``: one of `COMPARE_HIGHER_IS_BETTER`, or ``iou@LEVEL``, the field's
    IoU at that density level (from the row's ``iou_by_threshold``; None where the row has none,
    as in files written before it was kept). ValueError for anything else."""
    if metric.startswith("iou@"):
        try:
            level = f"{float(metric[4:]):g}"
        except ValueError:
            raise ValueError(f"--metric iou@LEVEL needs a number, e.g. iou@2.5; got {metric!r}") from None
        return lambda row: (row.get("iou_by_threshold") or {}).get(level)
    if metric not in COMPARE_HIGHER_IS_BETTER:
        raise ValueError(f"--metric must be one of {', '.join(COMPARE_HIGHER_IS_BETTER)} or iou@LEVEL, got {metric!r}")
    return lambda row: row.get(metric)


def compare(base_paths: Sequence[str], new_paths: Sequence[str], metric: str = "iou", new_metric: str | None = None) -> dict[str, Any]:
    """Pair the runs of two sets of result files by (view-dependent setting, object, seed) and
    say, per setting and over all, how often and by how much the new side differs in ``metric``:
    wins and losses (by which way the metric is better), the mean and median difference, its 95 %
    bootstrap interval and the sign test's p-value, beside each side's median over the pairs.
    Runs on one side only are listed, not paired. One setting's median moves by 0.04-0.08 IoU
    from seed to seed on this prior (BENCHMARKS.md, eighteenth session), so one seed's medians
    alone do not separate changes that small."""
    new_metric = new_metric or metric
    value, new_value = metric_reader(metric), metric_reader(new_metric)
    higher = COMPARE_HIGHER_IS_BETTER[metric.split("@")[0]]
    if COMPARE_HIGHER_IS_BETTER[new_metric.split("@")[0]] != higher:
        raise ValueError(f"--metric {metric} and --new-metric {new_metric} are better in opposite directions")
    base, new = _rows_by_run(base_paths, "base"), _rows_by_run(new_paths, "new")
    pairs = [(key, value(base[key]), new_value(new[key])) for key in base if key in new
             and value(base[key]) is not None and new_value(new[key]) is not None]  # fmt: skip
    if not pairs:
        raise ValueError(f"--compare: no run has {metric!r} on both sides (runs pair by view-dependent setting, object and seed)")

    def group(selected: list[tuple[tuple[str, str, Any], float, float]]) -> dict[str, Any]:
        deltas = [n - b for _, b, n in selected]
        better = [d if higher else -d for d in deltas]
        wins, losses = sum(1 for d in better if d > 0), sum(1 for d in better if d < 0)
        low, high = bootstrap_mean_interval(deltas)
        return {
            "pairs": len(selected), "new_better": wins, "new_worse": losses, "ties": len(selected) - wins - losses,
            "mean_delta": statistics.fmean(deltas), "median_delta": statistics.median(deltas),
            "mean_delta_95": [low, high], "sign_test_p": sign_test_p(wins, losses),
            "base_median": statistics.median(b for _, b, _ in selected),
            "new_median": statistics.median(n for _, _, n in selected),
        }  # fmt: skip

    settings = sorted({key[0] for key, _, _ in pairs})
    return {
        "metric": metric,
        "new_metric": new_metric,
        "higher_is_better": higher,
        "pairs": [{"setting": k[0], "object": k[1], "seed": k[2], "base": b, "new": n, "delta": n - b} for k, b, n in pairs],
        "by_setting": {s: group([p for p in pairs if p[0][0] == s]) for s in settings},
        "all": group(pairs),
        "base_only": [list(k) for k in base if k not in new],
        "new_only": [list(k) for k in new if k not in base],
    }


def compare_table(result: dict[str, Any]) -> str:
    """Markdown of `compare`: one row per paired run, base → new and the difference, then per
    setting and over all the wins, the mean difference with its interval and the sign test."""
    metric, new_metric = result["metric"], result.get("new_metric") or result["metric"]
    lines = [f"| run (view-dep., object, seed) | base {metric} | new {new_metric} | Δ |", "| --- | ---: | ---: | ---: |"]
    for p in result["pairs"]:
        lines.append(f"| {p['setting']}, {p['object']}, seed {p['seed']} | {p['base']:.3f} | {p['new']:.3f} | {p['delta']:+.3f} |")
    groups = [(f"view-dep. {s}", g) for s, g in result["by_setting"].items()]
    if len(groups) > 1:
        groups.append(("all", result["all"]))
    for name, g in groups:
        low, high = g["mean_delta_95"]
        lines.append(f"| **{name}: median {g['base_median']:.3f} → {g['new_median']:.3f}** | new better in {g['new_better']} "
                     f"of {g['pairs']}, worse in {g['new_worse']} | mean Δ {g['mean_delta']:+.3f} (95 % {low:+.3f} to "
                     f"{high:+.3f}), median Δ {g['median_delta']:+.3f} | sign test p = {g['sign_test_p']:.3g} |")  # fmt: skip
    if result["base_only"] or result["new_only"]:
        lines.append(f"\nNot paired: {len(result['base_only'])} run(s) on the base side only, {len(result['new_only'])} on the new side only.")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamfusion-trt bench prior", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--objects", help="comma-separated known captions (default: all)")
    p.add_argument("--seeds", help="comma-separated seeds, each object once per seed (default: the preset's seed)")
    p.add_argument("--view-dependent", default="on,off", help="on, off or on,off (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=1, help="prompts trained at once (default: %(default)s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", help="folder for the batch runs (default: a new temporary folder)")
    p.add_argument("--out", default="bench_prior.json", help="JSON output (default: %(default)s)")
    p.add_argument("--progress", action="store_true", help="show the batch's progress bar")
    p.add_argument("--quick", action="store_true", help="the quick gate: fixed subset, one batch, a one-line verdict")
    p.add_argument("--write-reference", action="store_true",
                   help="with --quick: store this run as the reference of its device kind in --reference")
    p.add_argument("--reference", default=str(QUICK_REFERENCE),
                   help="the quick references' JSON, one entry per device kind (default: the package's %(default)s)")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the Markdown table of these result files and exit")
    p.add_argument("--traces", nargs="+", metavar="JSON",
                   help="print each traced run's scores step by step (runs made with -- --train.trace_every N) and exit")
    p.add_argument("--compare", nargs=2, metavar=("BASE", "NEW"),
                   help="pair the runs of two result files (each may be a comma-separated list, e.g. one file per seed) "
                        "by setting, object and seed, print the paired Markdown table and exit")  # fmt: skip
    p.add_argument("--metric", default="iou",
                   help=f"with --compare: {', '.join(COMPARE_HIGHER_IS_BETTER)}, or iou@LEVEL for the IoU at one density "
                        "level (e.g. iou@2.5; default: %(default)s)")  # fmt: skip
    p.add_argument("--new-metric", help="with --compare: the NEW side's metric, when it differs from --metric (e.g. the "
                                        "same files at --metric iou and --new-metric iou@2.5 try a mesh level)")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ..scene import resolve_device

    argv = list(argv or [])
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = make_parser().parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.traces:
        print(trace_table(args.traces))
        return 0
    if args.compare:
        print(compare_table(compare(*(side.split(",") for side in args.compare), metric=args.metric, new_metric=args.new_metric)))
        return 0
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency!r}")
    if args.write_reference and not args.quick:
        raise ValueError("--write-reference stores a quick run: add --quick")
    parse_run_flags(extra)  # a typo after '--' fails before any training
    if not args.quick:
        result = run(args, extra)
        for setting, block in result["settings"].items():
            print(f"view-dependent {setting}: {json.dumps(block['summary'])}")
        return 0
    device = str(resolve_device(args.device))
    quick, flags = quick_args(args, extra, device)
    result = run(quick, flags)
    reference_path = Path(args.reference)
    references = load_references(reference_path)
    if args.write_reference:
        references[device_kind(device)] = reference_entry(result)
        atomic_write_text(reference_path, json.dumps(references, indent=2) + "\n")
        log.info("stored the %s quick reference in %s", device_kind(device), reference_path)
    passed, line = verdict(result, references)
    print(line)
    return 1 if passed is False else 0
