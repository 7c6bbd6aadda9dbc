"""Load a frozen Stable Diffusion (1.x / 2.x layout) for distillation.

`load_diffusion` accepts three kinds of source and returns the same `DiffusionModel`:

- a hub id (``stabilityai/stable-diffusion-2-1-base``), from the local cache or the hub;
- a local diffusers folder (model_index.json with tokenizer/, text_encoder/, unet/, vae/,
  scheduler/);
- one original-LDM-layout checkpoint (``.safetensors``, or a ``.ckpt``/``.pt``/``.pth`` torch file
  read with ``weights_only=True``, so nothing in it is unpickled beyond tensors and containers).
  Its diffusers configs come from `config` (a folder or hub id), else from a model_index.json
  folder beside the file, else diffusers infers the matching hub repository from the weights
  (which must then be cached when offline).

Every component is frozen (``requires_grad_(False)``, eval mode). Errors are one line: a path
that does not exist is a FileNotFoundError; a hub id that cannot be resolved and an unreadable
checkpoint are ValueErrors naming the id or file. ``HF_HUB_OFFLINE`` is honoured at call time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_LDM_UNET_PREFIX = "model.diffusion_model."
_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


@dataclass
class DiffusionModel:
    """The frozen networks plus what SDS needs from the noise schedule."""

    tokenizer: Any  # transformers CLIPTokenizer
    text_encoder: Any  # CLIPTextModel; None after free_text_encoder(), or until `require_text_encoder` (lazy load)
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    alphas_cumprod: torch.Tensor  # [T] float32, on `device`
    vae_scaling_factor: float
    latent_channels: int
    text_dim: int  # width D of the text embeddings [77, D]
    max_length: int  # tokens per prompt (77 for SD)
    key: str  # filesystem-safe id of these weights: name + short hash; keys caches and engines
    source: str
    device: torch.device
    dtype: torch.dtype
    text_encoder_loader: Callable[[], Any] | None = None  # a lazy load's pending text encoder

    def require_text_encoder(self) -> Any:
        """The text encoder, loaded now if its load was deferred (`load_diffusion(...,
        lazy_text_encoder=True)`). ValueError once it was freed."""
        if self.text_encoder is None and self.text_encoder_loader is not None:
            logger.info("reading the text encoder of %s", self.source)
            self.text_encoder, self.text_encoder_loader = self.text_encoder_loader(), None
        if self.text_encoder is None:
            raise ValueError("the model's text encoder was freed (free_text_encoder())")
        return self.text_encoder

    def free_text_encoder(self) -> None:
        """Drop the text encoder (or its pending load) once every prompt is embedded (and cached)."""
        self.text_encoder_loader = None
        if self.text_encoder is None:
            return
        self.text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """"auto" -> float16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def load_diffusion(
    source: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype | str,
    revision: str | None = None,
    local_files_only: bool = False,
    config: str | None = None,
    lazy_text_encoder: bool = False,
) -> DiffusionModel:
    """Load and freeze tokenizer, text encoder, UNet and VAE from `source` (hub id, diffusers
    folder or single checkpoint file; `config` only applies to single files). With
    `lazy_text_encoder`, a folder's or hub model's text encoder is read only when
    `require_text_encoder` asks for it (its config now): a run whose prompts are all cached never
    loads it. A single file loads everything at once."""
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    offline = local_files_only or _env_offline()
    path = Path(source).expanduser()

    if path.is_file():
        parts, key = _load_single_file(path, config, dtype, offline)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"'{source}' is a folder but not a diffusers model (no model_index.json)")
        parts = _load_components(str(path), path, revision=None, dtype=dtype, offline=True, lazy_text_encoder=lazy_text_encoder)
        key = _key(path.name, _fingerprint(path, [path / "model_index.json", *_component_files(path)]))
    elif _looks_like_path(source):
        raise FileNotFoundError(f"model path does not exist: '{source}'")
    else:
        commit = _resolve_hub(source, revision, offline)
        parts = _load_components(source, source, revision=commit, dtype=dtype, offline=offline, lazy_text_encoder=lazy_text_encoder)
        key = _key(source.replace("/", "--"), hashlib.sha256(f"hub:{source}@{commit}".encode()).hexdigest())

    tokenizer, text_encoder, unet, vae, scheduler = (parts[n] for n in COMPONENTS)
    loader = parts.get("text_encoder_loader")
    text_config = text_encoder.config if text_encoder is not None else parts["text_encoder_config"]
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        # SDS subtracts the sampled noise from the UNet output, so the output must be a noise estimate.
        raise ValueError(
            f"'{source}' predicts {prediction!r}; only epsilon-prediction models are supported "
            "(for example stabilityai/stable-diffusion-2-1-base)"
        )
    for module in (text_encoder, unet, vae):  # already in `dtype`: loaded with it
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    text_dim = int(unet.config.cross_attention_dim)
    if text_config.hidden_size != text_dim:
        raise ValueError(
            f"'{source}': text encoder width {text_config.hidden_size} does not match the UNet's "
            f"cross_attention_dim {text_dim} (only SD 1.x/2.x layouts are supported)"
        )
    max_length = min(int(tokenizer.model_max_length), int(text_config.max_position_embeddings))
    model = DiffusionModel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        alphas_cumprod=_alphas_cumprod(scheduler).to(device),
        vae_scaling_factor=float(vae.config.scaling_factor),
        latent_channels=int(unet.config.in_channels),
        text_dim=text_dim,
        max_length=max_length,
        key=key,
        source=source,
        device=device,
        dtype=dtype,
        text_encoder_loader=None if loader is None else lambda: loader().requires_grad_(False).eval().to(device),
    )
    logger.info("loaded %s as %s on %s (%s)%s", source, key, device, str(dtype).removeprefix("torch."),
                "; the text encoder is read only for a prompt not in the cache" if loader is not None else "")  # fmt: skip
    return model


# ---------------------------------------------------------------------------------------------
# sources


def _env_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported.
    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def _looks_like_path(source: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else that does not exist is a missing path."""
    return (
        source.startswith((".", "/", "~", "\\"))
        or source.lower().endswith((*CHECKPOINT_SUFFIXES, ".json"))
        or source.count("/") > 1
        or os.sep in source.replace("/", "")
    )


def _resolve_hub(repo_id: str, revision: str | None, offline: bool) -> str:
    """Commit hash of `repo_id` at `revision`, from the cache or the hub; ValueError if neither."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = Path(hf_hub_download(repo_id, "model_index.json", revision=revision, local_files_only=offline))
    except (OSError, EntryNotFoundError, ValueError) as exc:
        raise ValueError(f"Stable Diffusion model '{repo_id}' was {_unreachable(exc, offline)}") from exc
    return index.parent.name  # .../snapshots/<commit>/model_index.json


def _hub_configs(repo_id: str, offline: bool, checkpoint: Path) -> str:
    """Local folder with the diffusers configs (no weights) of hub repo `repo_id`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    patterns = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline)
    except (OSError, EntryNotFoundError, ValueError) as exc:
        raise ValueError(
            f"configs for single-file checkpoint '{checkpoint}' (hub repo '{repo_id}') were "
            f"{_unreachable(exc, offline)}; put model_index.json and the component configs beside the file "
            "or pass config="
        ) from exc


def _unreachable(exc: Exception, offline: bool) -> str:
    if offline:
        why = "HF_HUB_OFFLINE or local_files_only is set"
    else:
        why = "the hub could not be reached or has no such model"
    return f"not found locally and {why} ({type(exc).__name__}: {_first_line(exc)})"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_components(src: str, where: Path | str, *, revision, dtype, offline, lazy_text_encoder: bool = False) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    common = {"revision": revision, "local_files_only": offline}
    # Without accelerate, diffusers warns once per model that it falls back to this; say it once.
    lean = {} if importlib.util.find_spec("accelerate") is not None else {"low_cpu_mem_usage": False}
    loaders = {
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **common),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype, **common),
        "unet": lambda: UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **common, **lean),
        "vae": lambda: AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, **common, **lean),
        "scheduler": lambda: DDPMScheduler.from_pretrained(src, subfolder="scheduler", **common),
    }
    if lazy_text_encoder:
        load_text_encoder = loaders.pop("text_encoder")
        loaders["text_encoder_config"] = lambda: CLIPTextConfig.from_pretrained(src, subfolder="text_encoder", **common)
    parts: dict[str, Any] = {}
    for name, load in loaders.items():
        parts[name] = _load_part(name, load, where)
    if lazy_text_encoder:
        parts["text_encoder"] = None
        parts["text_encoder_loader"] = lambda: _load_part("text_encoder", load_text_encoder, where)
    return parts


def _load_part(name: str, load: Callable[[], Any], where: Path | str) -> Any:
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 -- every loader failure becomes one line naming the source
        raise ValueError(f"could not load the {name} of '{where}': {_first_line(exc)}") from exc


def _load_single_file(path: Path, config: str | None, dtype: torch.dtype, offline: bool) -> tuple[dict[str, Any], str]:
    from diffusers import StableDiffusionPipeline

    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"unsupported checkpoint file '{path}' (expected {', '.join(CHECKPOINT_SUFFIXES)})")
    index = _checkpoint_index(path)
    if not any(k.startswith(_LDM_UNET_PREFIX) for k in index):
        raise ValueError(
            f"'{path}' is not an original-layout Stable Diffusion checkpoint (no '{_LDM_UNET_PREFIX}*' weights)"
        )
    # Always hand diffusers a local config folder: left to itself, it goes online for the configs
    # even with local_files_only when they are not cached.
    if config is None and (path.parent / "model_index.json").is_file():
        config = str(path.parent)
    elif config is None:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        config = _hub_configs(fetch_diffusers_config(index)["pretrained_model_name_or_path"], offline, path)
    elif not Path(config).is_dir():
        config = _hub_configs(config, offline, path)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=config, torch_dtype=dtype, local_files_only=True, safety_checker=None
        )
    except Exception as exc:  # noqa: BLE001 -- diffusers raises many types; all mean "cannot use this file"
        raise ValueError(
            f"could not load single-file checkpoint '{path}' with configs '{config}': {_first_line(exc)}"
        ) from exc
    parts = {name: getattr(pipe, name) for name in COMPONENTS}
    for name in ("text_encoder", "unet", "vae"):
        if any(p.is_meta for p in parts[name].parameters()):
            raise ValueError(f"'{path}' lacks some {name} weights (they stayed uninitialised)")
    files = [path, Path(config) / "model_index.json", *_component_files(Path(config))]
    return parts, _key(path.stem, _fingerprint(path.parent, files))


def _checkpoint_index(path: Path) -> dict[str, torch.Tensor]:
    """Name -> tensor of a checkpoint without reading the weights: meta tensors of the right
    shapes (safetensors) or memory-mapped ones loaded with ``weights_only=True`` (torch files).
    ValueError naming the file when it cannot be read."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 -- corrupt files fail in format-specific ways
        why = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        raise ValueError(f"'{path}' is not a readable checkpoint ({why})") from exc
    while isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"'{path}' does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------
# identity and schedule


def _component_files(folder: Path) -> list[Path]:
    return sorted(f for name in COMPONENTS for f in (folder / name).rglob("*") if f.is_file())


def _fingerprint(root: Path, files: list[Path], chunk: int = 1 << 20) -> str:
    """Hash of file names, sizes, small files whole and the first and last MiB of large ones:
    cheap on multi-GB weights, stable across copies, and changed by any retrained tensor."""
    h = hashlib.sha256()
    for f in files:
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if f.is_relative_to(root) else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 2 * chunk:
                h.update(fh.read())
            else:
                h.update(fh.read(chunk))
                fh.seek(size - chunk)
                h.update(fh.read(chunk))
    return h.hexdigest()


def folder_fingerprint(folder: str | Path) -> str:
    """12 hex digits that change with any component file of a diffusers folder and not with the
    folder's name or place: the suffix of its model key."""
    root = Path(folder)
    return hashlib.sha256(_fingerprint(root, [root / "model_index.json", *_component_files(root)]).encode()).hexdigest()[:12]


def _key(name: str, digest: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return f"{slug}-{hashlib.sha256(digest.encode()).hexdigest()[:12]}"


def _alphas_cumprod(scheduler) -> torch.Tensor:
    """[T] float32 cumulative alphas of the model's training noise schedule."""
    from diffusers import DDPMScheduler

    # Only the keys that define the betas: other schedulers' options would be logged as unused.
    schedule = {k: v for k, v in scheduler.config.items() if k in _SCHEDULE_KEYS}
    return DDPMScheduler.from_config(schedule).alphas_cumprod.to(torch.float32).clone()


_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)
