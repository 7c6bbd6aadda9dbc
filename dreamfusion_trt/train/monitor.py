"""What a run reports while it trains: per-prompt metrics files and per-stage step timings."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

METRIC_FIELDS = (
    "step", "phase", "shading", "loss", "sds", "orientation", "entropy", "sparsity",
    "t_mean", "opacity_mean", "it_per_s", "elapsed_s",
)  # fmt: skip
TENSORBOARD_KEYS = ("loss", "sds", "orientation", "entropy", "t_mean", "opacity_mean")


class MetricsLog:
    """``<out_dir>/metrics.csv`` of one prompt (plus TensorBoard scalars when asked for).

    Opened at a prompt's current step: rows of later steps (written before an interrupt or a
    roll-back to an earlier checkpoint) are dropped, so the file always tells one history.
    """

    def __init__(self, out_dir: Path, step: int, tensorboard: bool = False) -> None:
        self.path = Path(out_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if step > 0 and self.path.is_file():
            with self.path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        self._file = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from exc
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key in TENSORBOARD_KEYS:
                self._tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


# A run's known-answer scores mid-training: (its one-prompt scene, its config) -> one row.
Tracer = Callable[[Any, Any], dict[str, Any]]
TRACE_NAME = "trace.jsonl"


class TraceLog:
    """``<out_dir>/trace.jsonl`` of one prompt: one JSON object per traced step (`Tracer`).

    Opened at a prompt's current step, as `MetricsLog`: rows of later steps are dropped, so a
    resumed or rolled-back run's trace tells one history. Each row is written whole and flushed.
    """

    def __init__(self, out_dir: Path, step: int) -> None:
        self.path = Path(out_dir) / TRACE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    kept.append(line)
        self._file = self.path.open("w")
        self._file.writelines(line + "\n" for line in kept)
        self._file.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class StageTimer:
    """Marks named points of a training step and returns how long each stage took.

    On CUDA every mark records an event on the current stream (no synchronisation);
    `durations` synchronises once and returns milliseconds per stage of the marked step.
    On the CPU marks are wall-clock times.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, stage: str) -> None:
        """End of `stage` (it began at the previous mark)."""
        if self._marks:
            self._marks.append((stage, self._now()))

    def durations(self) -> dict[str, float]:
        """Milliseconds per stage since `start`; stages marked twice are summed."""
        if self.cuda and self._marks:
            self._marks[-1][1].synchronize()
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out


class StageClock:
    """Wall-clock seconds of named start-up stages (model, prompts, compile, probe, ...), for
    one log line that says where a run's start-up went."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        """End of `stage` (it began at the previous mark or at construction)."""
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.stages.items())
        return f"{parts} ({sum(self.stages.values()):.1f} s in all)"


class _NoTimer:
    def start(self) -> None:
        pass

    def mark(self, stage: str) -> None:
        pass


NO_TIMER = _NoTimer()
