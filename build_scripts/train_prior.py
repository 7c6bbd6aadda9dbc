#!/usr/bin/env python
"""Train the built-in known-answer prior and write it as a diffusers Stable Diffusion folder.

The command line over `dreamfusion_trt.prior.model.train_prior`; see ``--help``. The full run
(default settings, one GPU) renders the dataset on the GPU, trains VAE then UNet + text encoder,
and writes dreamfusion_trt/prior/weights/ with prompts.json, dreamfusion_preset.yaml,
prior_train.json and prior_eval.json:

    python build_scripts/train_prior.py --device cuda

The shipped weights' VAE was trained with these defaults at ``--object-offset 0`` (463 s on an
H200); it keeps flat colours' RGB distances in latent space (``--color-isometry-weight 1.0``).
Their UNet and text encoder were then retrained on renders whose density sits 0.03 inside each
object's surface (the default since), so the renders' silhouettes are the objects' own size
(367 s on an H200, from the weights of commit 82f5c1c):

    python build_scripts/train_prior.py --device cuda --object-offset 0.03 --vae-from dreamfusion_trt/prior/weights --out /tmp/prior_off

The earlier prior without the colour term (its VAE put red six times closer to white than blue):

    python build_scripts/train_prior.py --device cuda --color-isometry-weight 0 --object-offset 0 --out /tmp/prior_plain

A training too long for one job is split: the second job continues the first one's UNet and text
encoder (keeping its VAE) for --steps-unet more steps, e.g. a prior at 128 x 128:

    python build_scripts/train_prior.py --device cuda --image-size 128 --steps-unet 1000 --out /tmp/p128_a
    python build_scripts/train_prior.py --device cuda --image-size 128 --steps-unet 3000 --unet-from /tmp/p128_a --out /tmp/p128

A seconds-long CPU smoke run of the whole pipeline with tiny networks:

    python build_scripts/train_prior.py --tiny --out /tmp/tiny_prior
"""

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

try:
    from dreamfusion_trt.prior.model import PriorTrainConfig, tiny_config, train_prior
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dreamfusion_trt.prior.model import PriorTrainConfig, tiny_config, train_prior

log = logging.getLogger("train_prior")


def make_parser() -> argparse.ArgumentParser:
    d = PriorTrainConfig()
    p = argparse.ArgumentParser(
        prog="train_prior",
        description="Train the built-in known-answer prior (a small Stable Diffusion folder) on renders of known objects.",
    )
    p.add_argument("--out", default=d.out, help="output diffusers folder (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="cuda, cuda:N, cpu or auto (default: %(default)s; cpu with --tiny)")
    p.add_argument("--steps-vae", type=int, help=f"VAE steps (default: {d.steps_vae})")
    p.add_argument("--steps-unet", type=int, help=f"UNet + text encoder steps (default: {d.steps_unet})")
    p.add_argument("--batch-size", type=int, help=f"images per step (default: {d.batch_size})")
    p.add_argument("--images-per-object", type=int, help=f"training renders per object (default: {d.data.images_per_object})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of renders, initialisation and training (default: %(default)s)")
    p.add_argument("--eval-per-caption", type=int,
                   help=f"DDIM samples per caption text for prior_eval.json, 0 to skip (default: {d.eval_per_caption})")  # fmt: skip
    p.add_argument("--log-every", type=int, help=f"steps between progress lines (default: {d.log_every})")
    p.add_argument("--color-isometry-weight", type=float,
                   help=f"VAE term keeping flat colours' RGB distances in latent space (default: {d.color_isometry_weight})")  # fmt: skip
    p.add_argument("--elevation-sampling", choices=("sphere", "angle"),
                   help="how the training renders' elevations are drawn: uniform on the sphere or uniform in degrees, "
                        f"as camera.elevation_sampling (default: {d.data.camera.elevation_sampling})")  # fmt: skip
    p.add_argument("--object-width", type=float,
                   help="world units over which the training objects' density falls at their surface "
                        f"(density scale x sigmoid(-sdf / width); default: {d.data.object_width})")  # fmt: skip
    p.add_argument("--object-offset", type=float,
                   help="world units inside the surface at which the training objects' density is centred, so that "
                        "their soft edge's silhouette lies on the true one (0.03 at width 0.01: prior_diagnosis "
                        f"--silhouette-widths 0.01 --silhouette-offsets ...; default: {d.data.object_offset})")  # fmt: skip
    p.add_argument("--render-samples", type=int,
                   help=f"samples per ray of the training renders; a sharper edge needs more (default: {d.data.num_samples})")
    p.add_argument("--vae-from", metavar="FOLDER",
                   help="keep this trained prior's VAE instead of training one (e.g. the shipped "
                        "dreamfusion_trt/prior/weights), so only the UNet and text encoder are retrained")  # fmt: skip
    p.add_argument("--unet-from", metavar="FOLDER",
                   help="start the UNet and text encoder from this trained prior (and keep its VAE unless --vae-from says "
                        "otherwise), then train --steps-unet more steps: a long training split into shorter jobs")  # fmt: skip
    p.add_argument("--image-size", type=int,
                   help=f"pixels of the training renders and of the prior (default: {d.arch.image_size}); the preset's "
                        "renders follow it")  # fmt: skip
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long CPU run with tiny networks and 2 renders per object (tests, smoke checks); "
                        "the flags above still override its settings")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> PriorTrainConfig:
    """Defaults (or the --tiny settings) overridden by the flags that were given."""
    cfg = tiny_config(args.out, args.seed) if args.tiny else PriorTrainConfig(out=args.out, seed=args.seed)
    if not args.tiny or args.device != "auto":
        cfg = replace(cfg, device=args.device)
    given = {
        name: getattr(args, name)
        for name in ("steps_vae", "steps_unet", "batch_size", "eval_per_caption", "log_every", "color_isometry_weight",
                     "vae_from", "unet_from")
        if getattr(args, name) is not None
    }
    data = replace(cfg.data, seed=args.seed)
    if args.images_per_object is not None:
        data = replace(data, images_per_object=args.images_per_object)
    if args.object_width is not None:
        data = replace(data, object_width=args.object_width)
    if args.object_offset is not None:
        data = replace(data, object_offset=args.object_offset)
    if args.render_samples is not None:
        data = replace(data, num_samples=args.render_samples)
    if args.elevation_sampling is not None:
        data = replace(data, camera=replace(data.camera, elevation_sampling=args.elevation_sampling))
    arch = cfg.arch
    if args.image_size is not None:
        arch = replace(arch, image_size=args.image_size)
        data = replace(data, image_size=args.image_size, camera=replace(data.camera, render_size=args.image_size))
    return replace(cfg, arch=arch, data=data, **given)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    out, evaluation = train_prior(config_from_args(args))
    log.info("evaluation: %s", json.dumps({k: v for k, v in evaluation.items() if k != "per_text"}))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        log.error("%s", exc)
        sys.exit(2)
