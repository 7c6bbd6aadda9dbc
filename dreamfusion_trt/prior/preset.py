"""The built-in prior's run settings: its preset, plus its CPU preset when the run is on a CPU.

Library callers (the batch API, `bench prior`) and the command line build a run on the prior the
same way: `preset_config` gives the settings to layer the user's own choices on.
"""

from __future__ import annotations

import logging

from ..config import RunConfig, from_dict, load_yaml
from . import PRESET_CPU_NAME, PRESET_NAME, WEIGHTS_DIR, weights_available

log = logging.getLogger(__name__)


def preset_config(base: RunConfig | None, on_cpu: bool) -> RunConfig:
    """`base` (default: the plain defaults) with the prior's preset on top, and its CPU preset
    too when `on_cpu` and `base` is None (a resumed run keeps the settings it started with).
    FileNotFoundError when the prior's weights are missing."""
    if not weights_available():
        raise FileNotFoundError(f"the built-in prior's weights are missing from '{WEIGHTS_DIR}': "
                                "rebuild them with build_scripts/train_prior.py or pass --model")  # fmt: skip
    preset = load_yaml(WEIGHTS_DIR / PRESET_NAME, base if base is not None else RunConfig())
    cpu_preset = WEIGHTS_DIR / PRESET_CPU_NAME
    if base is None and on_cpu and cpu_preset.is_file():
        preset = load_yaml(cpu_preset, preset)  # a few minutes on two cores
        log.info("running on the CPU: the built-in prior's CPU settings apply (%s)", cpu_preset.name)
    return preset


def use_weights(cfg: RunConfig) -> RunConfig:
    """`cfg` with ``model.model`` pointing at the prior's weights folder (logged)."""
    log.info("no --model given: using the built-in known-answer prior (%s)", WEIGHTS_DIR)
    return from_dict({"model": {"model": str(WEIGHTS_DIR)}}, cfg)
