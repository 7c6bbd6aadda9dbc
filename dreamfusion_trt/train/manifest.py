"""``manifest.jsonl``: one line per prompt of a batch, rewritten atomically on every change.

Each record says where a prompt stands (pending, running, done, failed), with its seed,
iterations, steps done, attempts, wall time, output paths (relative to the batch folder) and
the error that failed it. A re-run reads it to skip finished prompts; a record left "running"
by a killed process counts as unfinished. Runs over a shared queue (several ranks or array
tasks) do not update it record by record: they rebuild it from the queue (`shared_jobs.py`),
adding the rank and host that trained each prompt.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..atomic import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
Status = Literal["pending", "running", "done", "failed"]
STATUSES: tuple[str, ...] = ("pending", "running", "done", "failed")


@dataclass
class PromptRecord:
    id: str  # folder name inside the batch folder
    prompt: str
    negative: str
    seed: int
    iters: int
    line: int = 0  # in the prompts file of the latest run
    status: str = "pending"
    step: int = 0  # iterations done (as of the last checkpoint or poll)
    attempts: int = 0  # roll-backs after a failure
    wall_s: float = 0.0  # training plus output-writing time
    outputs_s: float = 0.0  # spent writing its outputs (turntable, grid, mesh, score)
    steps_during_outputs: int = 0  # training steps of the other prompts meanwhile (0: training waited for them)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    updated: str = ""
    rank: int | None = None  # the rank that trained it last (runs over a shared queue)
    host: str = ""  # and its machine


class Manifest:
    """The records of one batch folder, in first-seen order."""

    def __init__(self, out_dir: str | Path, records: dict[str, PromptRecord] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.records: dict[str, PromptRecord] = records if records is not None else {}

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @classmethod
    def load(cls, out_dir: str | Path) -> "Manifest":
        """The manifest of `out_dir` (empty when there is none). A line that cannot be read is
        logged and dropped (its prompt then counts as not started)."""
        manifest = cls(out_dir)
        if not manifest.path.is_file():
            return manifest
        known = {f.name for f in fields(PromptRecord)}
        for number, line in enumerate(manifest.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                record = PromptRecord(**{k: v for k, v in data.items() if k in known})
            except (json.JSONDecodeError, TypeError) as exc:
                log.warning("%s:%d: unreadable manifest record dropped (%s)", manifest.path, number, exc)
                continue
            if record.status not in STATUSES:
                record.status = "pending"
            manifest.records[record.id] = record
        return manifest

    def save(self) -> None:
        text = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in self.records.values())
        atomic_write_text(self.path, text)

    def add(self, record: PromptRecord) -> PromptRecord:
        """Insert `record` unless its id is known; returns the stored record."""
        return self.records.setdefault(record.id, record)

    def update(self, prompt_id: str, **changes: Any) -> PromptRecord:
        """Change fields of one record, stamp it and save the manifest."""
        record = self.records[prompt_id]
        for key, value in changes.items():
            if not hasattr(record, key):
                raise ValueError(f"unknown manifest field {key!r}")
            setattr(record, key, value)
        if record.status not in STATUSES:
            raise ValueError(f"unknown prompt status {record.status!r} (expected one of {', '.join(STATUSES)})")
        record.updated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.save()
        return record

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for r in self.records.values():
            out[r.status] += 1
        return out
