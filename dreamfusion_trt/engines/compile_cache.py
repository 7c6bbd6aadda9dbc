"""Where torch.compile keeps what it compiled, so a second run on the same machine starts in seconds.

Inductor caches compiled FX graphs, AOTAutograd graphs, autotuning results and the Triton
kernels it generated on disk, keyed by the graph, the input shapes (our batch sizes), the torch
version and the GPU. By default that folder is ``/tmp/torchinductor_<user>``, which a reboot or
a /tmp cleaner empties and which a cluster's nodes do not share. `use_compile_cache` points it
at ``<cache root>/compile/torch-<version>-<device>/`` (the run's ``model.cache_dir``) instead, so
the cache lasts, `build-engines --backends inductor` can fill it in advance, and a folder per
torch version and device kind keeps caches of different machines apart on a shared home. A
``TORCHINDUCTOR_CACHE_DIR`` the user set is left alone.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "TORCHINDUCTOR_CACHE_DIR"


def device_slug(device: torch.device | str) -> str:
    """``cpu``, or the GPU's name and compute capability, filesystem-safe (``nvidia-h200-sm90``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"{name}-sm{major}{minor}"


def compile_cache_folder(cache_root: str | Path, device: torch.device | str) -> Path:
    """``<cache_root>/compile/torch-<version>-<device slug>``."""
    version = re.sub(r"[^A-Za-z0-9.]+", "-", torch.__version__)
    return Path(cache_root).expanduser() / "compile" / f"torch-{version}-{device_slug(device)}"


def _user_set(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The cache folder the user chose, or None when unset or only Inductor's own default
    (Inductor writes its default into the environment the first time it asks)."""
    value = environ.get(ENV)
    if not value:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    ours = environ.get("_DREAMFUSION_TRT_COMPILE_CACHE")
    if os.path.abspath(value) in (os.path.abspath(default_cache_dir()), ours):
        return None
    return value


def use_compile_cache(cache_root: str | Path, device: torch.device | str) -> Path:
    """Make this process's Inductor cache ``compile_cache_folder(cache_root, device)`` unless the
    user set ``TORCHINDUCTOR_CACHE_DIR``; returns the folder in use. Call it before the first
    torch.compile (later calls switch folders for what compiles afterwards)."""
    user = _user_set(os.environ)
    if user is not None:
        log.debug("compile cache: %s (TORCHINDUCTOR_CACHE_DIR)", user)
        return Path(user)
    folder = compile_cache_folder(cache_root, device)
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get(ENV) != str(folder):
        os.environ[ENV] = str(folder)
        os.environ["_DREAMFUSION_TRT_COMPILE_CACHE"] = os.path.abspath(folder)
        try:  # in-memory caches that remember the previous folder
            from torch._inductor.utils import clear_caches

            clear_caches()
        except ImportError:  # pragma: no cover - older torch
            pass
        log.info("compile cache: %s", folder)
    return folder


def precompiled_folder(cache_root: str | Path, device: torch.device | str, model_key: str) -> Path:
    """Where `engines.precompiled` keeps a model's compiled artifacts:
    ``compile_cache_folder(cache_root, device)/precompiled/<model key>``."""
    return compile_cache_folder(cache_root, device) / "precompiled" / model_key
