#!/usr/bin/env python
"""Train the built-in known-answer prior and write it as a diffusers Stable Diffusion folder.

A thin entry point over `dreamfusion_trt.prior.model`; see ``--help``. The full run (default
settings, one GPU) renders the dataset on the GPU, trains VAE then UNet + text encoder, and
writes dreamfusion_trt/prior/weights/ with prompts.json, dreamfusion_preset.yaml, prior_train.json
and prior_eval.json:

    python build_scripts/train_prior.py --device cuda

A seconds-long CPU smoke run of the whole pipeline with tiny networks:

    python build_scripts/train_prior.py --tiny --out /tmp/tiny_prior
"""

import logging
import sys
from pathlib import Path

try:
    from dreamfusion_trt.prior.model import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dreamfusion_trt.prior.model import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        logging.getLogger("train_prior").error("%s", exc)
        sys.exit(2)
