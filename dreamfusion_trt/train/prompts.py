"""Prompt files for `batch`, and the folder each prompt's outputs go to.

Two formats, chosen by the file's suffix:

- ``.jsonl``: one JSON object per line, ``{"prompt": "...", "seed": 3, "negative": "...",
  "iters": 5000}``; only ``prompt`` is required, unknown keys are errors;
- anything else: one prompt per line; blank lines and lines starting with ``#`` are skipped.

A malformed line is reported with its line number and skipped; the others still run. A prompt's
identity is (prompt, negative, seed): its folder is a slug of the prompt plus a hash of that
identity, made only of ``[a-z0-9-]`` (no separators, dots, reserved device names or
overlong names), so no prompt can write outside the batch folder. Iterations are not part of
the identity: re-running with more iterations continues the same folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

JSONL_KEYS = ("prompt", "seed", "negative", "iters")
SLUG_CHARS = 40  # of the prompt in a folder name, before the hash
HASH_CHARS = 10
MAX_PROMPT_CHARS = 10_000  # longer lines are rejected (the text encoder sees 77 tokens anyway)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class PromptSpec:
    """One line of a prompts file; None means "the batch's setting"."""

    line: int
    prompt: str
    negative: str | None = None
    seed: int | None = None
    iters: int | None = None


def prompt_slug(text: str, max_chars: int = SLUG_CHARS) -> str:
    """Lower-case ASCII letters, digits and single hyphens from `text` (accents folded, other
    scripts dropped), at most `max_chars`; "prompt" when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_chars].strip("-") or "prompt"


def prompt_id(prompt: str, negative: str, seed: int) -> str:
    """The folder name of a prompt: ``<slug>-<hash of (prompt, negative, seed)>``."""
    digest = hashlib.sha256(json.dumps([prompt, negative, int(seed)], ensure_ascii=False).encode()).hexdigest()
    return f"{prompt_slug(prompt)}-{digest[:HASH_CHARS]}"


def prompt_folder(out_dir: Path, name: str) -> Path:
    """`out_dir / name`, refusing any name that would not be a direct child of `out_dir`."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"unsafe prompt folder name {name!r}")
    folder = out_dir / name
    if folder.resolve().parent != out_dir.resolve():
        raise ValueError(f"prompt folder {str(folder)!r} would leave the batch folder {str(out_dir)!r}")
    return folder


def _check_text(text: str, what: str) -> str | None:
    if _CONTROL.search(text):
        return f"{what} contains control characters"
    if len(text) > MAX_PROMPT_CHARS:
        return f"{what} is {len(text)} characters long (at most {MAX_PROMPT_CHARS})"
    return None


def _parse_json_line(text: str, number: int) -> PromptSpec:
    """One .jsonl line -> PromptSpec; ValueError with the reason (no line number)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object like {{\"prompt\": \"a hamburger\"}}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(JSONL_KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(JSONL_KEYS)})")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"\"prompt\" must be a non-empty string, got {prompt!r}")
    negative = data.get("negative")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"\"negative\" must be a string, got {negative!r}")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"\"seed\" must be a non-negative integer, got {seed!r}")
    iters = data.get("iters")
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0):
        raise ValueError(f"\"iters\" must be a positive integer, got {iters!r}")
    for value, what in ((prompt, "the prompt"), (negative or "", "the negative prompt")):
        problem = _check_text(value, what)
        if problem:
            raise ValueError(problem)
    return PromptSpec(number, prompt.strip(), None if negative is None else negative.strip(), seed, iters)


def report_skipped(messages: list[str], what: str = "line(s)", shown: int = 5) -> None:
    """One warning per skipped line for the first `shown`, then one summary line (a file of a
    thousand duplicates should not print a thousand warnings)."""
    for message in messages[:shown]:
        log.warning("skipped %s", message)
    if len(messages) > shown:
        log.warning("skipped %d more %s of the same file (all listed in the batch result)", len(messages) - shown, what)


def read_prompts(path: str | Path, check: Callable[[str], object] | None = None) -> tuple[list[PromptSpec], list[str]]:
    """Parse a prompts file. Returns the prompts and, for every malformed line, a message
    ``"<file>:<line>: <reason>"`` (those lines are skipped). `check` validates each prompt the
    way `generate` validates its own (the built-in prior: a known object), raising ValueError.
    FileNotFoundError/ValueError when the file itself cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: '{path}'")
    jsonl = path.suffix.lower() == ".jsonl"
    specs: list[PromptSpec] = []
    problems: list[str] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{path}:{number}: not valid UTF-8 (byte {exc.start})")
            continue
        stripped = text.strip()
        if not stripped or (not jsonl and stripped.startswith("#")):
            continue
        try:
            if jsonl:
                specs.append(_parse_json_line(stripped, number))
            else:
                problem = _check_text(stripped, "the prompt")
                if problem:
                    raise ValueError(problem)
                specs.append(PromptSpec(number, stripped))
            if check is not None:
                check(specs[-1].prompt)
        except ValueError as exc:
            if specs and specs[-1].line == number:
                specs.pop()
            problems.append(f"{path}:{number}: {exc}")
    report_skipped(problems)
    return specs, problems
