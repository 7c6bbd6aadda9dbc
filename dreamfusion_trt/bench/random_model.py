"""A Stable Diffusion folder with random weights, for end-to-end timings of the real commands.

`bench train` builds its full-size model in memory; `generate` and `batch` load a model from a
hub id, a folder or a single file. To time those commands from start to the last file without
downloading anything, this writes a diffusers folder (model_index.json, unet/, vae/,
text_encoder/, scheduler/, tokenizer/) of the SD 2.1-base architecture (or the tiny one) with
random weights. The tokenizer is the built-in prior's (a small CLIP BPE vocabulary); the text
encoder's special token ids are set to its. Speed does not depend on weight values, so the
folder times like the real model; what it produces is noise.

    python -m dreamfusion_trt.bench.random_model --arch sd21base --out /tmp/sd21-random
    dreamfusion-trt generate "a hamburger" --model.model /tmp/sd21-random --out runs/h
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

import os
from .train import TEXT_CONFIGS, VAE_CONFIGS
from .engines import UNET_CONFIGS

log = logging.getLogger(__name__)

PRIOR_TOKENIZER = Path(__file__).resolve().parent.parent / "prior" / "weights" / "tokenizer"
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False, steps_offset=1)  # SD 2.1-base's betas  # fmt: skip


def write_random_sd(folder: str | Path, arch: str = "sd21base", dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write a diffusers folder of `arch` ("sd21base" or "tiny") with random weights at
    `folder` (a temporary folder beside it, renamed at the end; removed on failure); returns `folder`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if arch not in VAE_CONFIGS or arch not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r} (expected one of {', '.join(sorted(set(VAE_CONFIGS) & set(UNET_CONFIGS)))})")
    folder = Path(folder)
    if folder.exists():
        raise ValueError(f"'{folder}' already exists; choose another --out")
    tokenizer = CLIPTokenizer.from_pretrained(str(PRIOR_TOKENIZER))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    start = time.perf_counter()
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.manual_seed(seed)
        UNet2DConditionModel(**UNET_CONFIGS[arch]).to(dtype).save_pretrained(tmp / "unet", safe_serialization=True)
        vae_cfg = dict(VAE_CONFIGS[arch])
        AutoencoderKL(**vae_cfg).to(dtype).save_pretrained(tmp / "vae", safe_serialization=True)
        text_cfg = {**TEXT_CONFIGS[arch], **{k: v for k, v in ids.items() if v is not None}}
        if tokenizer.vocab_size > text_cfg["vocab_size"]:
            raise ValueError(f"the prior's tokenizer has {tokenizer.vocab_size} tokens, more than {arch}'s text encoder")
        CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype).save_pretrained(tmp / "text_encoder", safe_serialization=True)
        DDPMScheduler(**SCHEDULER).save_pretrained(tmp / "scheduler")
        shutil.copytree(PRIOR_TOKENIZER, tmp / "tokenizer")
        index = {
            "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        }  # fmt: skip
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote a random-weights %s folder to %s in %.0f s", arch, folder, time.perf_counter() - start)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreamfusion_trt.bench.random_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arch", default="sd21base", choices=sorted(set(VAE_CONFIGS) & set(UNET_CONFIGS)))
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_random_sd(args.out, args.arch, getattr(torch, args.dtype), args.seed)
    except ValueError as exc:
        p.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
