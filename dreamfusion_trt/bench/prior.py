"""Known-answer evidence: how well SDS with the built-in prior recovers every known object.

Runs `dreamfusion-trt batch` over the known captions with the prior's preset (its CPU settings on
a CPU), once per view-dependent setting asked for, and collects per object the score of its mesh
against the true object (``score.json``: IoU, Chamfer, colour error, the six-colored cube's share
of right faces) and its wall time from the batch manifest (training plus outputs). Writes one JSON
with the rows, the medians and the machine; ``--table`` prints the Markdown table of one or more
such files (BENCHMARKS.md's table).

    dreamfusion-trt bench prior --out prior_gpu_vd.json --concurrency 16                     # GPU, one batch of all 16
    dreamfusion-trt bench prior --view-dependent off --out prior_gpu_plain.json --concurrency 16
    dreamfusion-trt bench prior --device cpu --out prior_cpu.json --objects "a red cube,a blue torus"
    dreamfusion-trt bench prior --table prior_gpu_vd.json prior_cpu.json
    dreamfusion-trt bench prior --out x.json -- --sds.guidance_scale 50     # run flags after --
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from ..atomic import atomic_write_text

log = logging.getLogger(__name__)

SCORE_KEYS = ("iou", "chamfer", "color_error", "face_color_share", "mesh_volume_fraction", "true_volume_fraction")


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu_threads"] = torch.get_num_threads()
        info["processor"] = platform.processor() or platform.machine()
    return info


def collect(batch_dir: Path) -> list[dict[str, Any]]:
    """Per prompt of a finished batch folder: status, wall time and its score (None when it
    failed or left nothing to score)."""
    rows = []
    for line in (batch_dir / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        row: dict[str, Any] = {"object": rec["prompt"], "status": rec["status"], "wall_s": rec.get("wall_s"),
                               "steps": rec.get("step"), "error": rec.get("error")}  # fmt: skip
        score_rel = (rec.get("outputs") or {}).get("score")
        score = json.loads((batch_dir / score_rel).read_text()) if score_rel else {}
        row.update({k: score.get(k) for k in SCORE_KEYS})
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    analytic = [r for r in rows if r["object"] != "a six-colored cube"]
    return {
        "median_iou": med("iou"),
        "median_chamfer": med("chamfer"),
        "median_color_error": med("color_error"),
        "median_wall_s": med("wall_s"),
        "min_iou_analytic": min((r["iou"] or 0.0 for r in analytic), default=None),
        "objects_iou_at_least_0_8": sum(1 for r in analytic if (r["iou"] or 0.0) >= 0.8),
        "objects_analytic": len(analytic),
        "failed": [r["object"] for r in rows if r["status"] != "done"],
    }


def run(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    from ..cli import main as cli_main
    from ..prior.scenes import KNOWN_CAPTIONS, resolve_caption
    from ..scene import resolve_device

    objects = [c.strip() for c in args.objects.split(",")] if args.objects else list(KNOWN_CAPTIONS)
    for caption in objects:
        resolve_caption(caption)  # unknown objects: one error line listing the known ones
    device = str(resolve_device(args.device))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_prior_"))
    result: dict[str, Any] = {
        "benchmark": "prior",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "concurrency": args.concurrency,
        "run_flags": extra,
        "settings": {},
    }
    for setting in args.view_dependent.split(","):
        if setting not in ("on", "off"):
            raise ValueError(f"--view-dependent takes on, off or on,off; got {setting!r}")
        folder = work / f"view_dependent_{setting}"
        prompts = work / f"objects_{setting}.txt"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("\n".join(objects) + "\n")
        argv = ["batch", str(prompts), "--out", str(folder), "--concurrency", str(args.concurrency), "--device", device,
                "--prompt.view_dependent", "true" if setting == "on" else "false", "--quiet", *extra]  # fmt: skip
        log.info("view-dependent %s: %d objects, K=%d, in %s", setting, len(objects), args.concurrency, folder)
        start = time.perf_counter()
        rc = cli_main(argv)
        rows = collect(folder)
        result["settings"][setting] = {
            "batch_rc": rc,
            "batch_wall_s": round(time.perf_counter() - start, 2),
            "folder": str(folder),
            "summary": summarize(rows),
            "rows": rows,
        }
        log.info("view-dependent %s: %s", setting, result["settings"][setting]["summary"])
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(paths: Sequence[str]) -> str:
    """Markdown: one row per object, per (file, view-dependent setting) IoU / Chamfer / colour
    error / wall time columns, then the medians."""
    runs = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        where = data["machine"].get("gpu") or f"CPU ({data['machine'].get('cpu_threads')} threads)"
        for setting, block in data["settings"].items():
            runs.append((f"{where}, view-dep. {setting}", {r["object"]: r for r in block["rows"]}, block["summary"]))
    objects = list(dict.fromkeys(o for _, rows, _ in runs for o in rows))
    head = "| object | " + " | ".join(f"{name}: IoU / Chamfer / colour err. / s" for name, _, _ in runs) + " |"
    lines = [head, "| --- |" + " --- |" * len(runs)]
    for obj in objects:
        cells = []
        for _, rows, _ in runs:
            r = rows.get(obj)
            if r is None:
                cells.append("not run")
                continue
            cell = f"{_fmt(r['iou'])} / {_fmt(r['chamfer'], 4)} / {_fmt(r['color_error'], 2)} / {_fmt(r['wall_s'], 0)}"
            if r.get("face_color_share") is not None:
                cell += f" (faces right {r['face_color_share']:.2f})"
            if r["status"] != "done":
                cell = f"{r['status']}: {r.get('error') or ''}"
            cells.append(cell)
        lines.append(f"| {obj} | " + " | ".join(cells) + " |")
    meds = [f"**{_fmt(s['median_iou'])} / {_fmt(s['median_chamfer'], 4)} / {_fmt(s['median_color_error'], 2)} / "
            f"{_fmt(s['median_wall_s'], 0)}**" for _, _, s in runs]  # fmt: skip
    lines.append("| median | " + " | ".join(meds) + " |")
    hits = [f"{s['objects_iou_at_least_0_8']} of {s['objects_analytic']} (min {_fmt(s['min_iou_analytic'])})" for _, _, s in runs]
    lines.append("| analytic objects with IoU ≥ 0.8 | " + " | ".join(hits) + " |")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamfusion-trt bench prior", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--objects", help="comma-separated known captions (default: all)")
    p.add_argument("--view-dependent", default="on,off", help="on, off or on,off (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=1, help="prompts trained at once (default: %(default)s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", help="folder for the batch runs (default: a new temporary folder)")
    p.add_argument("--out", default="bench_prior.json", help="JSON output (default: %(default)s)")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the Markdown table of these result files and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = make_parser().parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency!r}")
    result = run(args, extra)
    for setting, block in result["settings"].items():
        print(f"view-dependent {setting}: {json.dumps(block['summary'])}")
    return 0
