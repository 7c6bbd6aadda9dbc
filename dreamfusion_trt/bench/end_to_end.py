"""End to end: the wall time of a real `generate` command, from its start to its last file,
split into start-up, latent phase, RGB phase and outputs.

Runs ``dreamfusion-trt generate ...`` (everything after ``--``) in a child process ``--runs``
times, each into a fresh ``--out`` folder (``<out>-1``, ``<out>-2``, ...; the second and later
runs find the first one's caches: compiled graphs, text embeddings, the colour map, the render
encoder), and times it from outside:

- ``startup_s``: from the command's start to its ``start-up:`` log line (imports, model load,
  prompts, noise predictor and its compile, colour map and RGB encoder, probe), with the
  per-stage line itself;
- ``latent_s`` / ``rgb_s``: training seconds per phase, from the run's ``metrics.csv`` (each
  row's ``elapsed_s`` and ``phase``), with the measured iterations per second of each;
- ``outputs_s``: what is left (turntable, grid, mesh, score and the exit).

``projected`` replaces the phases by the default schedule at the measured rates (for a run
shortened with ``--iters``: 10,000 iterations, 30 % latent), stated as a projection.

    python -m dreamfusion_trt.bench.end_to_end --out e2e.json --runs 2 -- \\
        "a hamburger" --model.model /tmp/sd21-random --out /tmp/e2e/run --iters 2000
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_write_text
from ..train.frozen import STAND_IN_ENCODER_ENV

log = logging.getLogger(__name__)

STARTUP = re.compile(r"start-up: (.*)$")
DEFAULT_ITERS, DEFAULT_LATENT_FRACTION = 10_000, 0.3


def phase_times(metrics_csv: Path) -> dict[str, Any]:
    """Training seconds and iterations per phase from a run's metrics.csv (rows every
    ``log_every`` steps: step, phase, elapsed_s)."""
    with metrics_csv.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()]
    if not rows:
        raise ValueError(f"'{metrics_csv}' has no rows")
    out: dict[str, Any] = {"latent_s": 0.0, "rgb_s": 0.0, "latent_iters": 0, "rgb_iters": 0}
    prev_step, prev_t = 0, 0.0
    for r in rows:
        step, t, phase = int(r["step"]), float(r["elapsed_s"]), r["phase"]
        key = "latent" if phase == "latent" else "rgb"
        out[f"{key}_s"] += t - prev_t
        out[f"{key}_iters"] += step - prev_step
        prev_step, prev_t = step, t
    out["train_s"] = prev_t
    for key in ("latent", "rgb"):
        out[f"{key}_it_per_s"] = out[f"{key}_iters"] / out[f"{key}_s"] if out[f"{key}_s"] > 0 else None
    return out


def run_once(command: list[str], out_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `command` (a generate command line writing to `out_dir`) and split its wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    marks: dict[str, Any] = {}
    tail: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            for part in line.rstrip("\n").split("\r"):
                if m := STARTUP.search(part):
                    marks.setdefault("startup_s", now)
                    marks["startup_stages"] = m.group(1)
                if part.strip():
                    tail.append(part)
                    del tail[:-40]
            sys.stderr.write(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join()
    wall = time.perf_counter() - start
    metrics = out_dir / "metrics.csv"
    if code != 0 and not metrics.is_file():
        raise RuntimeError(f"generate exited with {code}: " + " | ".join(tail[-5:]))
    row: dict[str, Any] = {"wall_s": wall, **marks, **phase_times(metrics)}
    if code != 0:  # it trained, then an output failed (say, no surface for the mesh): the times hold
        row["exit_code"], row["error"] = code, " | ".join(tail[-5:])
    if "startup_s" in row:
        row["outputs_s"] = wall - row["startup_s"] - row["train_s"]
        it = {k: row[f"{k}_it_per_s"] for k in ("latent", "rgb")}
        if all(it.values()):
            latent = DEFAULT_ITERS * DEFAULT_LATENT_FRACTION
            rgb = DEFAULT_ITERS - latent
            row["projected"] = {
                "iters": DEFAULT_ITERS, "latent_s": latent / it["latent"], "rgb_s": rgb / it["rgb"],
                "wall_s": row["startup_s"] + latent / it["latent"] + rgb / it["rgb"] + row["outputs_s"],
            }  # fmt: skip
    row["files"] = sorted(p.name for p in out_dir.iterdir())
    return row


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m dreamfusion_trt.bench.end_to_end", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--runs", type=int, default=2, help="times to run the command (the later ones with warm caches)")
    p.add_argument("--out", default="bench_end_to_end.json", help="JSON output (default: %(default)s)")
    p.add_argument("--stand-in-encoder", action="store_true",
                   help="RGB phase through the distilled render encoder's architecture with random weights (its speed on a "
                   "random-weight model, whose own fit never passes parity; recorded in the JSON)")  # fmt: skip
    args = p.parse_args(argv)
    if "--out" not in rest:
        p.error("the generate command after -- needs --out FOLDER (each run writes to FOLDER-1, FOLDER-2, ...)")
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    j = rest.index("--out") + 1
    base = rest[j]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.stand_in_encoder:
        env[STAND_IN_ENCODER_ENV] = "1"
    failed = False
    result: dict[str, Any] = {"benchmark": "end_to_end", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": rest,
                              "stand_in_render_encoder": env.get(STAND_IN_ENCODER_ENV) == "1", "runs": []}  # fmt: skip
    for n in range(1, args.runs + 1):
        out_dir = Path(f"{base}-{n}")
        command = [sys.executable, "-m", "dreamfusion_trt.cli", "generate", *rest[:j], str(out_dir), *rest[j + 1 :]]
        try:
            row = run_once(command, out_dir, env)
        except (RuntimeError, OSError, ValueError) as exc:
            result["runs"].append({"error": str(exc)})
            atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
            print(f"error: run {n}: {exc}", file=sys.stderr)
            return 1
        result["runs"].append(row)
        atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
        if "exit_code" in row:
            print(f"error: run {n}: generate exited with {row['exit_code']} after training (times kept): {row['error']}",
                  file=sys.stderr)  # fmt: skip
            failed = True
        log.info("run %d: %.1f s = start-up %.1f + latent %.1f + RGB %.1f + outputs %.1f", n, row["wall_s"],
                 row.get("startup_s", float("nan")), row["latent_s"], row["rgb_s"], row.get("outputs_s", float("nan")))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
