"""Engine files, their manifest, and one entry point per network that picks a backend.

Layout: ``<engines_dir>/<model key>/`` holds the ONNX files, TensorRT plans, AOTInductor
packages and ``manifest.json`` (see engines/README.md). File names carry what the file is bound
to: ``unet.fp16.onnx`` (portable), ``unet.fp16.b2-32-32.trt10.9.0.nvidia-h100-sm90.plan`` (batch
profile, TensorRT version, GPU), ``unet.fp16.b2-32-32.torch2.13.0.cuda-nvidia-h100-sm90.pt2``.
The manifest records, per file, its sha256, network, precision, batch profile, backend, the
TensorRT/torch versions and GPU it was built with, and the recipe (model key, tensor layout,
source ONNX hash, ...) that decides whether a rebuild is needed.

`make_noise_predictor` / `make_image_encoder` / `make_latent_decoder` build a backend behind
the `engines.base` protocols: "eager", "inductor", "aotinductor", "tensorrt", or "auto"
(TensorRT when it is installed and a matching engine exists, else a matching AOTInductor
package, else inductor on CUDA, else eager; the choice and the reasons are logged). An engine
built for another GPU or TensorRT version is refused with the field that differs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..atomic import atomic_write_text
from .base import ImageEncoder, LatentDecoder, NoisePredictor
from .spec import BATCH, AxisRange, NetworkSpec, batch_range, make_spec, precision_tag

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
BACKENDS: tuple[str, ...] = ("auto", "eager", "inductor", "aotinductor", "tensorrt")
ARTIFACT_BACKENDS: tuple[str, ...] = ("onnx", "tensorrt", "aotinductor")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Fields of the running environment an artifact is bound to, per backend.
ENV_FIELDS = {
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
    return f"{spec.network}.{precision_tag(spec.precision)}.{spec.profile_tag()}.trt{_slug(env.tensorrt_version)}.{device_tag(env)}.plan"


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
        dtype = PRECISIONS.get(e.get("precision"))
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
        usable.append(((dtype != model.dtype, rng.max - rng.min, name), folder / name, spec.with_batch(rng)))
    hint = f"build it with: dreamfusion-trt build-engines --model {model.source} --backends {backend}"
    if not usable:
        if problems:
            raise ValueError(f"no usable {backend} file for {network} in '{folder}': " + " | ".join(problems) + f"; {hint}")
        raise FileNotFoundError(f"no {backend} file for {network} in '{folder}'; {hint}")
    _, path, spec = min(usable, key=lambda u: u[0])
    return path, spec


# ---------------------------------------------------------------------------------------------
# backends behind the protocols


def _eager(network: str, model: Any) -> Any:
    from .eager import EagerImageEncoder, EagerLatentDecoder, EagerNoisePredictor

    if network == "unet":
        return EagerNoisePredictor(model.unet)
    if network == "vae_encoder":
        return EagerImageEncoder(model.vae, model.vae_scaling_factor)
    return EagerLatentDecoder(model.vae, model.vae_scaling_factor)


def _tensorrt(network: str, path: Path, spec: NetworkSpec, model: Any, cuda_graph: bool, shared_memory: Any) -> Any:
    from .tensorrt import TensorRTEngine, TensorRTImageEncoder, TensorRTLatentDecoder, TensorRTNoisePredictor

    engine = TensorRTEngine(path, spec, device=model.device, shared_memory=shared_memory, cuda_graph=cuda_graph)
    return {"unet": TensorRTNoisePredictor, "vae_encoder": TensorRTImageEncoder, "vae_decoder": TensorRTLatentDecoder}[network](engine)


def _aoti(network: str, path: Path, spec: NetworkSpec, model: Any) -> Any:
    from .inductor import AOTIImageEncoder, AOTILatentDecoder, AOTINoisePredictor

    return {"unet": AOTINoisePredictor, "vae_encoder": AOTIImageEncoder, "vae_decoder": AOTILatentDecoder}[network](path, spec, model.device)


def _inductor(network: str, model: Any, batch_sizes: Sequence[int], mode: str) -> Any:
    from .inductor import InductorImageEncoder, InductorLatentDecoder, InductorNoisePredictor

    spec = make_spec(model, network, batch_sizes)
    sizes = tuple(sorted(set(batch_sizes)))
    if network == "unet":
        return InductorNoisePredictor(model.unet, spec, mode=mode, batch_sizes=sizes)  # type: ignore[arg-type]
    cls = InductorImageEncoder if network == "vae_encoder" else InductorLatentDecoder
    return cls(model.vae, model.vae_scaling_factor, spec, mode=mode, batch_sizes=sizes)  # type: ignore[arg-type]


def _make(
    network: str,
    model: Any,
    backend: str,
    engines_dir: str | Path,
    batch_sizes: Sequence[int],
    env: RuntimeEnv | None,
    compile_mode: str,
    cuda_graph: bool,
    shared_memory: Any,
) -> Any:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    batch_range(batch_sizes)
    if backend == "eager":
        return _eager(network, model)
    if backend == "inductor":
        return _inductor(network, model, batch_sizes, compile_mode)
    env = env if env is not None else current_env(model.device)
    if backend == "aotinductor":
        path, spec = find_artifact(model, "aotinductor", network, engines_dir, batch_sizes, env)
        return _aoti(network, path, spec, model)
    if backend == "tensorrt":
        from .tensorrt import import_tensorrt

        import_tensorrt()  # ValueError with the install line
        if torch.device(model.device).type != "cuda":
            raise ValueError(f"backend 'tensorrt' needs the model on a CUDA device, it is on '{model.device}'")
        path, spec = find_artifact(model, "tensorrt", network, engines_dir, batch_sizes, env)
        return _tensorrt(network, path, spec, model, cuda_graph, shared_memory)

    # auto: the fastest backend that can run here
    reasons = []
    if env.device == "cuda" and env.tensorrt_version is not None:
        try:
            path, spec = find_artifact(model, "tensorrt", network, engines_dir, batch_sizes, env)
            log.info("backend auto -> tensorrt for %s: engine '%s'", network, path)
            return _tensorrt(network, path, spec, model, cuda_graph, shared_memory)
        except (ValueError, FileNotFoundError) as exc:
            reasons.append(f"tensorrt: {exc}")
    else:
        reasons.append("tensorrt: " + ("not installed" if env.device == "cuda" else "needs a CUDA GPU"))
    try:
        path, spec = find_artifact(model, "aotinductor", network, engines_dir, batch_sizes, env)
        log.info("backend auto -> aotinductor for %s: package '%s' (%s)", network, path, "; ".join(reasons))
        return _aoti(network, path, spec, model)
    except (ValueError, FileNotFoundError) as exc:
        reasons.append(f"aotinductor: {exc}")
    chosen = "inductor" if env.device == "cuda" else "eager"
    if chosen == "eager":
        reasons.append("inductor: compiles slowly and gains little without CUDA")
    log.info("backend auto -> %s for %s (%s)", chosen, network, "; ".join(reasons))
    return _inductor(network, model, batch_sizes, compile_mode) if chosen == "inductor" else _eager(network, model)


def make_noise_predictor(
    model: Any,
    backend: str,
    engines_dir: str | Path = "engines",
    batch_sizes: Sequence[int] = (2,),
    *,
    env: RuntimeEnv | None = None,
    compile_mode: str = "auto",
    cuda_graph: bool = False,
    shared_memory: Any = None,
) -> NoisePredictor:
    """UNet backend for a `DiffusionModel`; `batch_sizes` are UNet batches (CFG doubling
    included). `cuda_graph` and `shared_memory` (a `tensorrt.SharedDeviceMemory`) apply to
    TensorRT, `compile_mode` to inductor ("auto": CUDA graphs on a GPU, the measured fastest
    on the H200 benchmark; plain compile on a CPU)."""
    return _make("unet", model, backend, engines_dir, batch_sizes, env, compile_mode, cuda_graph, shared_memory)


def make_image_encoder(
    model: Any,
    backend: str,
    engines_dir: str | Path = "engines",
    batch_sizes: Sequence[int] = (1,),
    *,
    env: RuntimeEnv | None = None,
    compile_mode: str = "auto",
    cuda_graph: bool = False,
    shared_memory: Any = None,
) -> ImageEncoder:
    """VAE-encoder backend; `batch_sizes` are numbers of images. Only "eager" backpropagates to
    the images; the other backends run without gradient."""
    return _make("vae_encoder", model, backend, engines_dir, batch_sizes, env, compile_mode, cuda_graph, shared_memory)


def make_latent_decoder(
    model: Any,
    backend: str,
    engines_dir: str | Path = "engines",
    batch_sizes: Sequence[int] = (1,),
    *,
    env: RuntimeEnv | None = None,
    compile_mode: str = "auto",
    cuda_graph: bool = False,
    shared_memory: Any = None,
) -> LatentDecoder:
    """VAE-decoder backend; `batch_sizes` are numbers of latents."""
    return _make("vae_decoder", model, backend, engines_dir, batch_sizes, env, compile_mode, cuda_graph, shared_memory)
