"""The built-in known-answer prior: analytic objects with known shape and colours, a small Stable
Diffusion trained on their renders, and scores of how well a run recovers them.

- `scenes`: the objects (`KNOWN_OBJECTS`, caption -> spec; `AnalyticObject`, a NeRFField stand-in).
- `dataset`: renders of them through the project's own renderer and camera distribution.
- `model`: building and training the prior, saved as a diffusers Stable Diffusion folder.
- `score`: `score_run` (mesh vs truth: IoU, Chamfer, colour, six-face share) and
  `evaluate_prior_samples` (what the prior draws for each caption).

Submodules are imported on use: `scenes` and `score` need no diffusers, `model` does.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # where build_scripts/train_prior.py writes by default
PRESET_NAME = "dreamfusion_preset.yaml"  # RunConfig overrides inside the weights folder
PRESET_CPU_NAME = "dreamfusion_preset_cpu.yaml"  # layered on PRESET_NAME for runs on the CPU
PROMPTS_NAME = "prompts.json"  # the known captions inside the weights folder


def is_builtin(model: str) -> bool:
    """True when a run's ``model.model`` names the built-in prior ("builtin" or its folder)."""
    if model == "builtin":
        return True
    try:
        return Path(model).expanduser().resolve() == WEIGHTS_DIR
    except OSError:
        return False


def weights_available(folder: str | Path = WEIGHTS_DIR) -> bool:
    """True when `folder` holds a trained prior (a diffusers model_index.json)."""
    return (Path(folder) / "model_index.json").is_file()


__all__ = ["PRESET_CPU_NAME", "PRESET_NAME", "PROMPTS_NAME", "WEIGHTS_DIR", "is_builtin", "weights_available"]
