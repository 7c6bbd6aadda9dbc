"""Engine files: their names, the runtime environment they are bound to, their manifest, and
finding the one that fits.

Layout: ``<engines_dir>/<model key>/`` holds the ONNX files, TensorRT plans, AOTInductor
packages and ``manifest.json`` (see engines/README.md). File names carry what the file is bound
to: ``unet.fp16.onnx`` (portable), ``unet.fp16.p2-8-32.trt10.9.0.nvidia-h100-sm90.plan``
(optimization profiles, TensorRT version, GPU), ``unet.fp16.b2-32-32.torch2.13.0.cuda-nvidia-h100-sm90.pt2``
(batch range, torch version, device). The manifest records, per file, its sha256, network,
precision, batch profile, backend, the TensorRT/torch versions and GPU it was built with, and the
recipe (model key, tensor layout, source ONNX hash, ...) that decides whether a rebuild is needed.
`find_artifact` refuses a file built for another GPU or TensorRT version with the field that differs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

import torch

from ..atomic import atomic_write_text
from .spec import BATCH, AxisRange, NetworkSpec, batch_range, make_spec, precision_of, precision_tag

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
ArtifactKind = Literal["onnx", "tensorrt", "aotinductor"]  # what build_engines writes, in build order
ARTIFACT_BACKENDS: tuple[str, ...] = get_args(ArtifactKind)
# Fields of the running environment an artifact is bound to, per kind.
ENV_FIELDS: dict[str, tuple[str, ...]] = {
    "onnx": (),
    "tensorrt": ("tensorrt_version", "gpu", "compute_capability"),
    "aotinductor": ("torch_version", "device", "compute_capability"),
}


@dataclass(frozen=True)
class RuntimeEnv:
    torch_version: str
    tensorrt_version: str | None  # None when `tensorrt` does not import
    device: str  # "cuda" or "cpu"
    gpu: str | None  # torch.cuda.get_device_name()
    compute_capability: str | None  # "9.0"


def current_env(device: torch.device | str | None = None) -> RuntimeEnv:
    from .tensorrt import tensorrt_version

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    gpu = cc = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        cc = "{}.{}".format(*torch.cuda.get_device_capability(device))
    return RuntimeEnv(torch.__version__, tensorrt_version(), device.type, gpu, cc)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")


def device_tag(env: RuntimeEnv) -> str:
    if env.device != "cuda" or env.gpu is None or env.compute_capability is None:
        return env.device
    return f"{_slug(env.gpu)}-sm{env.compute_capability.replace('.', '')}"


def model_folder(engines_dir: str | Path, model_key: str) -> Path:
    return Path(engines_dir) / model_key


def onnx_filename(spec: NetworkSpec) -> str:
    return f"{spec.network}.{precision_tag(spec.precision)}.onnx"


def engine_filename(spec: NetworkSpec, env: RuntimeEnv) -> str:
    if env.tensorrt_version is None or env.gpu is None:
        raise ValueError("a TensorRT engine name needs the TensorRT version and the GPU")
    return f"{spec.network}.{precision_tag(spec.precision)}.{spec.sizes_tag()}.trt{_slug(env.tensorrt_version)}.{device_tag(env)}.plan"


def aoti_filename(spec: NetworkSpec, env: RuntimeEnv) -> str:
    return f"{spec.network}.{precision_tag(spec.precision)}.{spec.profile_tag()}.torch{_slug(env.torch_version)}.{device_tag(env)}.pt2"


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def mismatches(entry: dict[str, Any], env: RuntimeEnv) -> list[str]:
    """The environment fields `entry` was built for that differ from `env`, as messages."""
    return [
        f"{field} differs: built with {entry.get(field)!r}, running {getattr(env, field)!r}"
        for field in ENV_FIELDS.get(entry.get("backend", ""), ())
        if entry.get(field) != getattr(env, field)
    ]


# ---------------------------------------------------------------------------------------------
# manifest


class Manifest:
    """``manifest.json`` of one model folder: {file name: entry}. Saved atomically on change."""

    def __init__(self, folder: str | Path, model_key: str, files: dict[str, dict[str, Any]] | None = None) -> None:
        self.folder = Path(folder)
        self.model_key = model_key
        self.files = files if files is not None else {}

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_NAME

    @classmethod
    def load(cls, folder: str | Path, model_key: str | None = None) -> "Manifest":
        folder = Path(folder)
        key = model_key if model_key is not None else folder.name
        path = folder / MANIFEST_NAME
        if not path.is_file():
            return cls(folder, key)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"engine manifest '{path}' is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
            raise ValueError(f"engine manifest '{path}' is not a format-{MANIFEST_FORMAT} manifest")
        if data.get("model_key") != key:
            raise ValueError(f"engine manifest '{path}' belongs to model {data.get('model_key')!r}, not {key!r}")
        return cls(folder, key, data["files"])

    def save(self) -> None:
        data = {"format": MANIFEST_FORMAT, "model_key": self.model_key, "files": dict(sorted(self.files.items()))}
        atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")

    def entries(self, backend: str | None = None, network: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        return [
            (name, e)
            for name, e in sorted(self.files.items())
            if (backend is None or e.get("backend") == backend) and (network is None or e.get("network") == network)
        ]

    def record(
        self,
        name: str,
        *,
        backend: str,
        spec: NetworkSpec,
        env: RuntimeEnv,
        recipe: dict[str, Any],
        extra_files: Sequence[str] = (),
        **fields: Any,
    ) -> dict[str, Any]:
        """Hash `name` (and `extra_files`, e.g. external ONNX data) and write its entry."""
        if backend not in ARTIFACT_BACKENDS:
            raise ValueError(f"unknown artifact backend {backend!r} (expected {', '.join(ARTIFACT_BACKENDS)})")
        path = self.folder / name
        bound = set(ENV_FIELDS[backend])
        entry = {
            "backend": backend,
            "network": spec.network,
            "precision": precision_tag(spec.precision),
            "profile": {
                "axes": spec.describe()["axes"],
                "batch_sizes": list(spec.batch_sizes),
                "inputs": {n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in spec.profile().items()},
            },
            "io": spec.io_fingerprint(),
            "spec": spec.describe(),
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "data_files": {f: sha256_file(self.folder / f) for f in extra_files},
            "torch_version": env.torch_version,
            # fields the artifact is not bound to stay null, so they never read as a mismatch
            "tensorrt_version": env.tensorrt_version if "tensorrt_version" in bound else None,
            "device": env.device if "device" in bound else None,
            "gpu": env.gpu if "gpu" in bound else None,
            "compute_capability": env.compute_capability if "compute_capability" in bound else None,
            "recipe": recipe,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **fields,
        }
        self.files[name] = entry
        self.save()
        return entry

    def verify_file(self, name: str) -> str | None:
        """None if `name` and its data files exist with the recorded sha256, else why not."""
        entry = self.files.get(name)
        if entry is None:
            return "not in the manifest"
        for f, digest in ((name, entry.get("sha256")), *entry.get("data_files", {}).items()):
            path = self.folder / f
            if not path.is_file():
                return f"file '{path}' is missing"
            if sha256_file(path) != digest:
                return f"sha256 of '{path}' differs from the manifest (changed since it was built)"
        return None

    def stale_reason(self, name: str, recipe: dict[str, Any]) -> str | None:
        """None if `name` is up to date for `recipe` (same recipe, file intact), else why not."""
        entry = self.files.get(name)
        if entry is None:
            return "not built yet"
        old = entry.get("recipe", {})
        changed = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
        if changed:
            return "; ".join(f"{k} changed: {old.get(k)!r} -> {recipe.get(k)!r}" for k in changed)
        return self.verify_file(name)


# ---------------------------------------------------------------------------------------------
# finding a built artifact


def find_artifact(
    model: Any,
    backend: str,
    network: str,
    engines_dir: str | Path,
    batch_sizes: Sequence[int],
    env: RuntimeEnv,
) -> tuple[Path, NetworkSpec]:
    """The built `backend` file for `network` of `model` whose batch range covers
    `batch_sizes` and that matches `env`, with the spec over its batch range.

    FileNotFoundError when there is none; ValueError naming, for each file that does not fit,
    the field that differs (GPU, TensorRT version, ...)."""
    folder = model_folder(engines_dir, model.key)
    manifest = Manifest.load(folder, model.key)
    want = batch_range(batch_sizes)
    problems, usable = [], []
    for name, e in manifest.entries(backend=backend, network=network):
        dtype = precision_of(e.get("precision"))
        if dtype is None:
            problems.append(f"'{name}': unknown precision {e.get('precision')!r}")
            continue
        spec = make_spec(model, network, [want.min], dtype=dtype)
        if e.get("io") != spec.io_fingerprint():
            problems.append(f"'{name}': built for other tensor shapes {e.get('spec', {}).get('inputs')}")
            continue
        b = e["profile"]["axes"][BATCH]
        rng = AxisRange(int(b["min"]), int(b["opt"]), int(b["max"]))
        if not (rng.min <= want.min and want.max <= rng.max):
            problems.append(f"'{name}': batch range [{rng.min}, {rng.max}] does not cover {tuple(batch_sizes)}")
            continue
        diff = mismatches(e, env)
        bad = None if diff else manifest.verify_file(name)
        if diff or bad:
            problems.append(f"'{name}': " + ("; ".join(diff) if diff else bad))
            continue
        sizes = [s for s in e["profile"].get("batch_sizes", ()) if rng.contains(s)]
        usable.append(((dtype != model.dtype, rng.max - rng.min, name), folder / name, spec.with_batch(rng, sizes)))
    hint = f"build it with: dreamfusion-trt build-engines --model {model.source} --backends {backend}"
    if not usable:
        if problems:
            raise ValueError(f"no usable {backend} file for {network} in '{folder}': " + " | ".join(problems) + f"; {hint}")
        raise FileNotFoundError(f"no {backend} file for {network} in '{folder}'; {hint}")
    _, path, spec = min(usable, key=lambda u: u[0])
    return path, spec
