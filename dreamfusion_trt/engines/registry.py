"""Temporary shim: the old engine entry points over `artifacts` and `backends.load_network`.

Callers should import from `engines.artifacts` (names, environment, manifest, lookup) and call
`engines.backends.load_network`; this module goes once they do.
"""

from __future__ import annotations

from typing import Any

from .artifacts import (  # noqa: F401 -- re-exported
    ARTIFACT_BACKENDS,
    ENV_FIELDS,
    MANIFEST_NAME,
    Manifest,
    RuntimeEnv,
    aoti_filename,
    current_env,
    device_tag,
    engine_filename,
    find_artifact,
    mismatches,
    model_folder,
    onnx_filename,
    sha256_file,
)
from .backends import BACKENDS, load_network  # noqa: F401 -- re-exported


def make_noise_predictor(model: Any, backend: str, engines_dir: Any = "engines", batch_sizes: Any = (2,), **kw: Any) -> Any:
    return load_network("unet", model, backend, engines_dir, batch_sizes, **kw)


def make_image_encoder(model: Any, backend: str, engines_dir: Any = "engines", batch_sizes: Any = (1,), **kw: Any) -> Any:
    return load_network("vae_encoder", model, backend, engines_dir, batch_sizes, **kw)


def make_latent_decoder(model: Any, backend: str, engines_dir: Any = "engines", batch_sizes: Any = (1,), **kw: Any) -> Any:
    return load_network("vae_decoder", model, backend, engines_dir, batch_sizes, **kw)
