"""The frozen side of a run, loaded once: Stable Diffusion, the prompts' text embeddings (all
encoded up front, then the text encoder is freed), the noise-predictor backend and the render
strategy of each phase (the fitted colour -> latent map; the VAE encoder, or image space).
`new_trainer` puts a K-slot trainer on top of them; a batch builds several over its lifetime
(start-up at a lower K after running out of memory, a smaller one for the last prompts) without
reloading anything.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import PromptConfig, RunConfig
from ..engines.base import ImageEncoder, LatentDecoder, NoisePredictor
from ..engines.eager import EagerImageEncoder, EagerNoisePredictor
from ..engines.backends import load_network
from ..engines.compile_cache import precompiled_folder, use_compile_cache
from ..guidance.inputs import ColourMap, ColourPreconditioned, DistilledEncoding, ImageSpace, RenderInput, VAEEncoding
from ..guidance.latents import LinearLatentMap, load_or_fit_rgb_to_latent
from ..guidance.precondition import colour_preconditioner
from ..guidance.sds import SDSGuidance
from ..guidance.text import PromptEmbeddings, encode_prompts
from ..scene import build_scene
from ..sdmodel import DiffusionModel, load_diffusion, resolve_dtype
from .monitor import StageClock
from .step_graph import step_graph_choice
from .trainer import Trainer

log = logging.getLogger(__name__)

LATENT_MAP_SEED = 0  # the colour -> latent fit is a property of the VAE, not of a prompt's seed
# Benchmarks of random-weight models, whose own render-encoder fit never passes parity: "1" runs
# the RGB phase through the distilled architecture with random weights, for its speed.
STAND_IN_ENCODER_ENV = "DREAMFUSION_TRT_STAND_IN_RENDER_ENCODER"


@dataclass
class Frozen:
    model: DiffusionModel
    predictor: NoisePredictor
    latent_map: LinearLatentMap
    inputs: dict[str, RenderInput]  # the render strategy of each phase ("latent", "rgb")
    max_prompts: int = 1  # prompts per step the noise predictor was built for


def predictor_batch_sizes(backend: str, max_prompts: int) -> tuple[int, ...]:
    """UNet batch sizes (classifier-free guidance doubles the prompts) a run may call with:
    built engines must cover one prompt up to `max_prompts`; an in-process compile is warmed
    up at the largest only (others compile on first use)."""
    top = 2 * max(1, max_prompts)
    return (top,) if backend == "inductor" else tuple(sorted({2, top}))


def make_predictor(model: DiffusionModel, cfg: RunConfig, max_prompts: int) -> NoisePredictor:
    """The ``model.backend`` noise predictor for up to `max_prompts` prompts per step.
    ValueError/FileNotFoundError when no built engine covers that batch."""
    sizes = predictor_batch_sizes(cfg.model.backend, max_prompts)
    graphed, _ = step_graph_choice(cfg, max_prompts, model.device)
    return load_network("unet", model, cfg.model.backend, Path(cfg.model.engines_dir), batch_sizes=sizes,
                        compile_mode=predictor_compile_mode(graphed),
                        precompiled_dir=precompiled_folder(cfg.model.cache_dir, model.device, model.key))  # fmt: skip


def predictor_compile_mode(step_graph: bool) -> str:
    """The in-process compile of the UNet: its own CUDA graphs ("auto"), unless the whole step is
    captured as one, which holds the UNet's kernels itself ("default": Inductor without graphs)."""
    return "default" if step_graph else "auto"


def load_frozen(
    cfg: RunConfig,
    device: torch.device,
    prompts: Sequence[PromptConfig],
    max_prompts: int | None = 1,
    model: DiffusionModel | None = None,
    clock: StageClock | None = None,
) -> tuple[Frozen, list[PromptEmbeddings]]:
    """Load the model (unless given), embed every prompt (disk cache first), free the text
    encoder, and build the noise predictor for up to `max_prompts` prompts per step (None: the
    eager one for now, to be replaced once the number is known). `clock` marks each stage."""
    clock = clock or StageClock()
    compiles = cfg.model.backend in ("inductor", "aotinductor") or cfg.train.compile or cfg.train.compile_rgb_encoder == "on"
    if device.type == "cuda" or compiles:
        use_compile_cache(cfg.model.cache_dir, device)  # before anything compiles
    if model is None:
        dtype = resolve_dtype(cfg.model.dtype, device)
        model = load_diffusion(
            cfg.model.model, device=device, dtype=dtype, revision=cfg.model.revision,
            local_files_only=cfg.model.local_files_only, lazy_text_encoder=True,  # cached prompts never load it
        )  # fmt: skip
    clock.mark("model")
    embeddings = encode_prompts(model, list(prompts), Path(cfg.model.cache_dir).expanduser()) if prompts else []
    model.free_text_encoder()
    clock.mark("prompts")
    predictor = make_predictor(model, cfg, max_prompts) if max_prompts else EagerNoisePredictor(model.unet)
    clock.mark("noise predictor")
    frozen = frozen_from_model(model, cfg, predictor, max_prompts or 1)
    clock.mark("colour map and RGB encoder")
    return frozen, embeddings


def frozen_from_model(model: DiffusionModel, cfg: RunConfig, predictor: NoisePredictor, max_prompts: int = 1) -> Frozen:
    """The frozen side over a loaded model and its noise predictor: the colour -> latent map
    fitted to the VAE (cached per model under ``model.cache_dir``), and the render strategy of each phase (``sds.rgb_mode``)."""
    encoder: ImageEncoder = EagerImageEncoder(model.vae, model.vae_scaling_factor)  # the RGB phase backpropagates through it
    latent_map = load_or_fit_rgb_to_latent(encoder, model.key, cfg.model.cache_dir, model.device, model.dtype, seed=LATENT_MAP_SEED)
    latent_size = int(model.unet.config.sample_size)  # 64 for SD
    image_size = latent_size * 2 ** (len(model.vae.config.block_out_channels) - 1)  # 512 for SD
    encode_size = cfg.train.encode_size or image_size
    rgb_latents = (int(latent_map.weight.shape[0]), encode_size * latent_size // image_size, encode_size * latent_size // image_size)
    rgb: RenderInput
    if cfg.sds.rgb_mode == "image":
        # Image-space SDS needs no gradient through the VAE: both halves may run as engines.
        n = max(1, max_prompts)
        engines = Path(cfg.model.engines_dir)
        decoder: LatentDecoder = load_network("vae_decoder", model, cfg.model.backend, engines, batch_sizes=(n,))
        encoder = load_network("vae_encoder", model, cfg.model.backend, engines, batch_sizes=(n,))
        rgb = ImageSpace(encoder, decoder, encode_size, cfg.camera.render_size, rgb_latents)
    else:
        rgb = rgb_encoding(model, cfg, encoder, encode_size, rgb_latents)
    inputs: dict[str, RenderInput] = {"latent": ColourMap(latent_map, latent_size), "rgb": rgb}
    if cfg.sds.colour_preconditioning:
        p = colour_preconditioner(latent_map.weight, cfg.sds.colour_damping).to(model.device)
        inputs = {phase: ColourPreconditioned(s, p) if s.space == "latent" else s for phase, s in inputs.items()}
        log.info("SDS: colour-preconditioned gradients (damping %g; P's eigenvalues %s)", cfg.sds.colour_damping,
                 ", ".join(f"{v:.2f}" for v in torch.linalg.eigvalsh(p.double().cpu()).tolist()))  # fmt: skip
    return Frozen(model, predictor, latent_map, inputs, max(1, max_prompts))


def rgb_encoding(model: DiffusionModel, cfg: RunConfig, encoder: ImageEncoder, encode_size: int,
                 latent_shape: tuple[int, int, int]) -> RenderInput:  # fmt: skip
    """The RGB phase's render -> latents (``train.rgb_encoder``): the distilled render encoder
    when asked for or, with auto, on CUDA when its recorded parity passes, compiled where
    ``train.compile_rgb_encoder`` says (auto: on CUDA); else the VAE."""
    choice, render_size = cfg.train.rgb_encoder, cfg.camera.render_size
    if os.environ.get(STAND_IN_ENCODER_ENV) == "1":
        from ..guidance.render_encoder import untrained_render_encoder

        log.warning("RGB phase: a stand-in render encoder with random weights (%s=1, for benchmarks): its latents mean "
                    "nothing, only its speed is real", STAND_IN_ENCODER_ENV)  # fmt: skip
        stand_in = untrained_render_encoder(model.vae, render_size, encode_size, model.device)
        return DistilledEncoding(compiled_render_encoder(stand_in, cfg, model.device), render_size, latent_shape)
    if choice == "distilled" or (choice == "auto" and model.device.type == "cuda"):
        from ..guidance.render_encoder import BelowThresholdError, load_or_fit

        try:
            distilled, entry = load_or_fit(model.vae, model.vae_scaling_factor, model.key, cfg.model.engines_dir, render_size,
                                           encode_size, device=model.device)  # fmt: skip
        except BelowThresholdError as exc:
            if choice == "distilled":
                raise
            log.info("RGB phase: the full VAE encoder (the distilled one is refused: %s)", exc)
        else:
            parity = entry.get("parity", {})
            runner = compiled_render_encoder(distilled, cfg, model.device)
            log.info("RGB phase: distilled render encoder %d -> %d, %s (gradient cosine %.3f against the VAE; "
                     "--train.rgb_encoder vae for the full VAE)", render_size, encode_size, "eager" if runner is distilled else "compiled",
                     parity.get("grad_cos_mean", float("nan")))  # fmt: skip
            return DistilledEncoding(runner, render_size, latent_shape)
    elif choice == "auto":
        log.info("RGB phase: the full VAE encoder (auto on the CPU; --train.rgb_encoder distilled fits a small one)")
    return VAEEncoding(encoder, encode_size, render_size, latent_shape)


def new_trainer(frozen: Frozen, cfg: RunConfig, num_slots: int, device: torch.device, step_graph: bool | None = None) -> Trainer:
    """A trainer of `num_slots` empty slots over a fresh K-prompt scene (fill them with `assign`).
    `step_graph` None: as `step_graph_choice` decides for the predictor's prompts per step."""
    renderer = build_scene(cfg, num_prompts=num_slots, device=device)
    guidance = SDSGuidance(frozen.predictor, frozen.model.alphas_cumprod, cfg.sds, frozen.inputs)
    model = frozen.model
    # Decided for the run's largest step, as the predictor was: a batch's last prompts, trained
    # in a smaller trainer, keep the run's renderer.
    graphed, why = step_graph_choice(cfg, frozen.max_prompts, device) if step_graph is None else (step_graph, "asked for")
    log.debug("train.cuda_graph: %s (%s)", "the whole step as CUDA graphs, torch sampler" if graphed else "eager steps", why)
    return Trainer(cfg, renderer, guidance, device, text_shape=(model.max_length, model.text_dim), text_dtype=model.dtype,
                   colour_state=frozen.latent_map, step_graph=graphed)  # fmt: skip


def compiled_render_encoder(encoder: torch.nn.Module, cfg: RunConfig, device: torch.device) -> Any:
    """`encoder`'s compiled twin where ``train.compile_rgb_encoder`` asks for it (auto: on CUDA),
    else `encoder` itself. Built once per encoder (it holds the compiled graphs); the eager module
    is its fallback."""
    knob = cfg.train.compile_rgb_encoder
    if knob == "on" or (knob == "auto" and device.type == "cuda"):
        from ..guidance.render_encoder import CompiledRenderEncoder

        return CompiledRenderEncoder(encoder)
    return encoder
