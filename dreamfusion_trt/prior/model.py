"""The built-in known-answer prior: a small Stable Diffusion trained on renders of known objects.

`train_prior` renders the dataset once (`dataset.render_dataset`, on the training device), then

1. trains a small `AutoencoderKL` (two downsamplings: 64x64 images -> 16x16x4 latents) on
   L1 + L2 reconstruction plus a small KL term, and sets its ``scaling_factor`` to one over the
   standard deviation of the dataset's latents, as SD does;
2. encodes the whole dataset once, then trains a small `UNet2DConditionModel` to predict the
   noise (epsilon) of latents noised with SD's scaled-linear schedule, conditioned on a small
   `CLIPTextModel`. The text encoder is trained jointly with the UNet (it starts from a seeded
   random initialisation, so there is no pretrained text space to keep); captions are dropped to
   the empty prompt with probability `caption_dropout` so classifier-free guidance works; the
   saved UNet and text encoder are exponential moving averages of the trained weights;
3. saves a diffusers folder (`StableDiffusionPipeline.save_pretrained`: model_index.json,
   tokenizer/ with the vocabulary written here, text_encoder/, unet/, vae/, scheduler/), plus
   ``prompts.json`` (the known captions), ``dreamfusion_preset.yaml`` (RunConfig overrides suited
   to this prior), ``prior_train.json`` (settings, losses, timings) and ``prior_eval.json``
   (`score.evaluate_prior_samples` on the saved weights). Everything is written to a temporary
   folder beside `out` and renamed into place at the end.

Everything is seeded: on the CPU two runs with the same settings produce the same weights; on a
GPU, kernels with atomic adds make runs agree only closely.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..guidance.text import VIEWS
from ..scene import resolve_device
from . import PRESET_CPU_NAME, PRESET_NAME, PROMPTS_NAME, WEIGHTS_DIR
from .dataset import PRIOR_BOUND, DatasetConfig, RenderedDataset, render_dataset
from .scenes import KNOWN_CAPTIONS, PALETTE, SIX_COLORED_CAPTION

logger = logging.getLogger(__name__)

DEFAULT_OUT = WEIGHTS_DIR
MAX_LENGTH = 77
MAX_WEIGHT_BYTES = 20 * 2**20  # all safetensors of the folder together
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
EVAL_NAME = "prior_eval.json"
TRAIN_NAME = "prior_train.json"


@dataclass
class PriorArchitecture:
    """Sizes of the four networks."""

    image_size: int = 64  # pixels; latents are image_size / 2^(len(vae_channels) - 1)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 128)  # first level without attention only if 1 level
    unet_layers_per_block: int = 1
    attention_heads: int = 4
    text_dim: int = 64  # CLIP width = UNet cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    norm_groups: int = 16

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor


TINY_ARCHITECTURE = PriorArchitecture(
    image_size=32, vae_channels=(8, 16, 16), unet_channels=(16, 32), attention_heads=2,
    text_dim=16, text_layers=1, text_heads=2, norm_groups=4,
)  # fmt: skip


@dataclass
class PriorTrainConfig:
    out: str = str(DEFAULT_OUT)
    device: str = "auto"  # cuda when available, else cpu
    steps_vae: int = 2500
    steps_unet: int = 4000  # the shipped weights: 151 s on an H200
    batch_size: int = 128
    seed: int = 0
    lr_vae: float = 1e-3
    lr_unet: float = 5e-4  # UNet and text encoder
    warmup: int = 200  # linear warm-up steps, then cosine decay to 10 %
    kl_weight: float = 1e-4  # per latent element, against per-pixel L1 + L2
    # Weight of `color_isometry_loss`: flat colours keep their RGB distances in latent space up to
    # one scale (the shipped weights: 1.0; 0 turns it off). Without it the VAE put red 6x closer
    # to white than blue (bench/prior_diagnosis.py), and SDS barely saw a red object.
    color_isometry_weight: float = 1.0
    color_isometry_pairs: int = 64  # flat-colour pairs per VAE step (a quarter of them against white)
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    save_dtype: Literal["float16", "float32"] = "float16"
    eval_per_caption: int = 4  # DDIM samples per caption text (view variants included); 0 skips the check
    eval_steps: int = 50
    eval_guidance: float = 5.0
    log_every: int = 250
    # A trained prior's folder whose VAE this run keeps instead of training one (its architecture
    # must be `arch`'s): a prior retrained on other renders then shares the shipped one's latent
    # space, so only its UNet and text encoder differ.
    vae_from: str | None = None
    # A trained prior's folder whose UNet and text encoder this run starts from instead of a fresh
    # initialisation (their architecture must be `arch`'s), keeping that folder's VAE too unless
    # `vae_from` names another: `steps_unet` more steps, with the schedule's warm-up and decay run
    # again. One long UNet training then spans several shorter jobs.
    unet_from: str | None = None
    arch: PriorArchitecture = field(default_factory=PriorArchitecture)
    data: DatasetConfig = field(default_factory=DatasetConfig)


def tiny_config(out: str | Path, seed: int = 0) -> PriorTrainConfig:
    """A seconds-long CPU run of the whole pipeline (tests): tiny networks, 2 renders per object."""
    arch = TINY_ARCHITECTURE
    data = DatasetConfig(images_per_object=2, image_size=arch.image_size, num_samples=24, batch=8, seed=seed)
    return PriorTrainConfig(
        out=str(out), device="cpu", steps_vae=2, steps_unet=2, batch_size=4, seed=seed, warmup=1,
        save_dtype="float32", eval_per_caption=1, eval_steps=2, log_every=1, arch=arch, data=data,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# tokenizer


def caption_words(captions: tuple[str, ...] = KNOWN_CAPTIONS) -> list[str]:
    """The words of the captions and of the view suffixes, as CLIP's pre-tokenizer splits them."""
    import re

    text = " ".join([*captions, *(f"{v} view" for v in VIEWS)]).lower()
    return sorted(set(re.findall(r"[^\W\d_]+", text)))


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make every word of `words` one token: repeatedly merge the most frequent
    adjacent pair (ties broken by the pair itself), as BPE training does. Encoding replays merges
    by rank, so each training word comes out whole."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words if w}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for parts in pieces.values():
            counts.update(zip(parts[:-1], parts[1:]))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        for w, parts in pieces.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            pieces[w] = out


def write_vocab(folder: Path, words: list[str]) -> Path:
    """vocab.json and merges.txt of a CLIP-style byte-level BPE: the 256 byte symbols and their
    end-of-word forms (any text tokenizes), whole-word tokens for `words`, the special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = learn_merges(words)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += list(SPECIAL_TOKENS)
    atomic_write_text(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def build_tokenizer(captions: tuple[str, ...] = KNOWN_CAPTIONS):
    """A CLIPTokenizer whose vocabulary has one token per caption/view word."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_vocab(Path(tmp), caption_words(captions))
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)


# ---------------------------------------------------------------------------------------------
# networks


def build_components(arch: PriorArchitecture, tokenizer, seed: int) -> dict[str, Any]:
    """Freshly initialised text encoder, UNet, VAE and scheduler (seeded)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch.image_size % arch.vae_factor or arch.latent_size < 4:
        raise ValueError(f"image_size {arch.image_size} must be a multiple of {arch.vae_factor} giving latents of 4 px or more")
    levels = len(arch.unet_channels)
    if arch.latent_size % 2 ** (levels - 1):
        raise ValueError(f"latent size {arch.latent_size} cannot be halved {levels - 1} times by the UNet")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.text_dim,
            intermediate_size=4 * arch.text_dim,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=MAX_LENGTH,
            projection_dim=arch.text_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Attention on every level but the coarsest (SD's layout, scaled down).
    down = ("CrossAttnDownBlock2D",) * max(levels - 1, 1) + ("DownBlock2D",) * (levels > 1)
    up = ("UpBlock2D",) * (levels > 1) + ("CrossAttnUpBlock2D",) * max(levels - 1, 1)
    unet = UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.unet_layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=arch.text_dim,
        attention_head_dim=arch.attention_heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=arch.norm_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels),
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=arch.norm_groups,
        sample_size=arch.image_size,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae, "scheduler": scheduler}


def weight_bytes(arch: PriorArchitecture, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of all parameters of an architecture at `dtype` (the saved safetensors' payload)."""
    parts = build_components(arch, build_tokenizer(), seed=0)
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(p.numel() * size for n in ("text_encoder", "unet", "vae") for p in parts[n].parameters())


# ---------------------------------------------------------------------------------------------
# training


class Progress:
    """Logs `name step/total | loss | it/s | ETA` every `every` steps (rates over the interval)."""

    def __init__(self, name: str, total: int, every: int) -> None:
        self.name, self.total, self.every = name, total, max(every, 1)
        self.start = self.last = time.perf_counter()
        self.last_step = 0
        self.losses: list[float] = []

    def update(self, step: int, loss: torch.Tensor) -> None:
        if step % self.every and step != self.total:
            return
        value = float(loss.detach())  # one sync per log line
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.name} loss is {value} at step {step}")
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        self.last, self.last_step = now, step
        self.losses.append(value)
        logger.info("%s %d/%d  loss %.5f  %.1f it/s  ETA %dm%02ds", self.name, step, self.total, value, rate,
                    int(eta // 60), int(eta % 60))  # fmt: skip

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(total - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))

    return f


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def _to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def train_vae(vae, data: RenderedDataset, cfg: PriorTrainConfig, device: torch.device, gen: torch.Generator) -> dict:
    """Reconstruction (L1 + L2 per pixel) + kl_weight * KL per latent element (+ the colour
    isometry term when its weight is set); returns stats."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr_vae, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(cfg.warmup, cfg.steps_vae), cfg.steps_vae))
    progress = Progress("vae", cfg.steps_vae, cfg.log_every)
    n = len(data)
    for step in range(1, cfg.steps_vae + 1):
        idx = torch.randint(n, (cfg.batch_size,), generator=gen, device=device)
        x = _to_unit(data.images[idx])
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=gen)
            recon = vae.decode(z).sample.float()
        mu, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()  # per latent element
        loss = (recon - x).abs().mean() + (recon - x).square().mean() + cfg.kl_weight * kl
        if cfg.color_isometry_weight > 0:
            loss = loss + cfg.color_isometry_weight * color_isometry_loss(vae, cfg.color_isometry_pairs, gen, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        progress.update(step, loss)
    vae.eval().requires_grad_(False)
    return {"seconds": round(progress.seconds, 2), "logged_losses": progress.losses, "psnr": reconstruction_psnr(vae, data, device),
            "color_isometry": color_isometry_stats(vae, device)}  # fmt: skip


def load_trained_vae(folder: str | Path, fresh, device: torch.device):
    """The VAE of the trained prior in `folder` (its ``vae/`` subfolder), in float32 on `device`
    and frozen; `fresh` is a newly built VAE whose architecture it must have. ValueError when the
    folder holds no VAE or one of another architecture."""
    from diffusers import AutoencoderKL

    path = Path(folder).expanduser() / "vae"
    if not (path / "config.json").is_file():
        raise ValueError(f"--vae-from: '{folder}' holds no trained prior's VAE (no vae/config.json)")
    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32)
    keys = ("block_out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "down_block_types")
    theirs, ours = ({k: list(c[k]) if isinstance(c[k], (list, tuple)) else c[k] for k in keys} for c in (vae.config, fresh.config))
    if theirs != ours:
        raise ValueError(f"--vae-from: the VAE in '{folder}' has another architecture ({theirs}) than this prior's ({ours})")
    return vae.to(device).eval().requires_grad_(False)


def load_trained_denoiser(folder: str | Path, parts: dict[str, Any], device: torch.device) -> None:
    """Replace ``parts``' fresh UNet and text encoder by the trained ones in `folder` (its
    ``unet/`` and ``text_encoder/``), in float32 on `device`. ValueError when the folder lacks
    them, has another architecture, or was trained on other captions (its tokenizer differs)."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    root = Path(folder).expanduser()
    for sub in ("unet", "text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            raise ValueError(f"--unet-from: '{folder}' holds no trained prior's {sub} (no {sub}/ folder)")
    if AutoTokenizer.from_pretrained(str(root / "tokenizer")).get_vocab() != parts["tokenizer"].get_vocab():
        raise ValueError(f"--unet-from: the prior in '{folder}' was trained on other captions (its tokenizer differs)")
    unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32)
    text = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=torch.float32)
    for name, loaded in (("unet", unet), ("text_encoder", text)):
        fresh = parts[name]
        shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in loaded.state_dict().items()}:
            raise ValueError(f"--unet-from: the {name} in '{folder}' has another architecture than this prior's")
        fresh.load_state_dict(loaded.state_dict())
        fresh.to(device)


def flat_color_latents(vae, colors: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Posterior means of flat images of `colors` [B, 3] in [0, 1], averaged over the latent
    pixels away from the border (zero padding) -> [B, C]."""
    x = (colors * 2.0 - 1.0)[:, :, None, None].expand(-1, 3, size, size)
    mu = vae.encode(x).latent_dist.mean.float()  # [B, C, h, w]
    h = mu.shape[-1]
    inner = mu[..., 1 : h - 1, 1 : h - 1] if h > 2 else mu
    return inner.mean(dim=(-2, -1))


def color_isometry_loss(vae, pairs: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Variance of log(latent distance / RGB distance) over `pairs` random pairs of flat
    colours, a quarter of them against white (the background): 0 when the encoder maps flat
    colours isometrically up to one scale, whatever that scale is (so it does not fight the KL
    term or the latent scaling factor)."""
    a = torch.rand(pairs, 3, generator=gen, device=device)
    b = torch.rand(pairs, 3, generator=gen, device=device)
    b[: max(1, pairs // 4)] = 1.0
    rgb = (a - b).norm(dim=-1)
    keep = rgb > 0.05  # near-identical pairs carry no scale
    z = flat_color_latents(vae, torch.cat([a[keep], b[keep]]))
    za, zb = z.chunk(2)
    ratio = torch.log((za - zb).norm(dim=-1).clamp_min(1e-6) / rgb[keep])
    return ratio.var() if len(ratio) > 1 else ratio.sum() * 0.0


@torch.no_grad()
def color_isometry_stats(vae, device: torch.device) -> dict[str, Any]:
    """Latent distance of each palette colour's flat image from flat white, over its RGB
    distance (one scale for all when the latent is colour-isometric), and their spread."""
    names = list(PALETTE)
    colors = torch.tensor([PALETTE[n] for n in names] + [[1.0, 1.0, 1.0]], device=device)
    z = flat_color_latents(vae, colors)
    ratio = {n: float((z[i] - z[-1]).norm() / (colors[i] - 1).norm()) for i, n in enumerate(names)}
    return {"latent_over_rgb_distance_from_white": ratio, "max_over_min": max(ratio.values()) / min(ratio.values())}


@torch.no_grad()
def reconstruction_psnr(vae, data: RenderedDataset, device: torch.device, count: int = 512) -> float:
    """PSNR (dB, images in [0, 1]) of encoding (posterior mean) and decoding `count` images
    spread evenly over the dataset (every object)."""
    idx = torch.linspace(0, len(data) - 1, min(count, len(data)), device=device).long()
    x = _to_unit(data.images[idx])
    with _autocast(device):
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    mse = ((recon.clamp(-1, 1) - x) / 2).square().mean()
    return round(float(-10.0 * torch.log10(mse.clamp_min(1e-10))), 2)


@torch.no_grad()
def encode_dataset(vae, data: RenderedDataset, device: torch.device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: each ``[N, C, h, w]`` float32 on `device`."""
    means, stds = [], []
    for s in range(0, len(data), batch):
        with _autocast(device):
            post = vae.encode(_to_unit(data.images[s : s + batch])).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids.to(device)


class EMA:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone().float() for p in params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def train_unet(
    unet, text_encoder, tokenizer, alphas_cumprod: torch.Tensor, latents: tuple[torch.Tensor, torch.Tensor],
    scaling_factor: float, data: RenderedDataset, cfg: PriorTrainConfig, device: torch.device, gen: torch.Generator,
) -> dict:  # fmt: skip
    """Epsilon prediction on scaled latents with caption dropout; leaves EMA weights in the models."""
    mean, std = latents  # [N, C, h, w] each
    texts = [*data.texts, ""]
    empty = len(texts) - 1
    ids = tokenize(tokenizer, texts, device)  # [T + 1, 77]
    params = [*unet.parameters(), *text_encoder.parameters()]
    for module in (unet, text_encoder):
        module.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr_unet, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(cfg.warmup, cfg.steps_unet), cfg.steps_unet))
    ema = EMA(params, cfg.ema_decay)
    acp = alphas_cumprod.to(device)
    progress = Progress("unet", cfg.steps_unet, cfg.log_every)
    n, b = len(data), cfg.batch_size
    for step in range(1, cfg.steps_unet + 1):
        idx = torch.randint(n, (b,), generator=gen, device=device)
        mu = mean[idx]
        x0 = (mu + std[idx] * torch.randn(mu.shape, generator=gen, device=device)) * scaling_factor
        t = torch.randint(acp.shape[0], (b,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        a = acp[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        drop = torch.rand(b, generator=gen, device=device) < cfg.caption_dropout
        text = torch.where(drop, torch.full_like(idx, empty), data.text_index[idx])
        with _autocast(device):
            table = text_encoder(ids)[0]  # [T + 1, 77, D]: every distinct text once per step
            pred = unet(xt, t, encoder_hidden_states=table[text]).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update()
        progress.update(step, loss)
    ema.copy_to()
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return {"seconds": round(progress.seconds, 2), "logged_losses": progress.losses}


# ---------------------------------------------------------------------------------------------
# the folder


def _pair(values: tuple[float, float]) -> str:
    return f"[{values[0]:g}, {values[1]:g}]"


def preset_yaml(cfg: PriorTrainConfig) -> str:
    """RunConfig overrides for SDS with this prior (config.py's YAML sections): the cameras and
    background its training renders had, and a field sized for these simple objects."""
    size, cam = cfg.arch.image_size, cfg.data.camera
    return f"""\
# RunConfig overrides for the built-in known-answer prior (dreamfusion_trt.prior).
# The prior sees {size}x{size} renders through its VAE ({cfg.arch.latent_size}x{cfg.arch.latent_size} latents), so the
# whole run is in the RGB phase at encode_size = {size}. Cameras and background are those of the
# prior's training renders; the NeRF's box (bound) is small enough that every camera sees it from
# outside, so density cannot fill the view.
field:
  bound: {PRIOR_BOUND:g}
  num_levels: 8
  log2_hashmap_size: 16
  base_resolution: 16
  max_resolution: 256
  hidden_dim: 32
  num_layers: 2
  blob_radius: 0.4
  background: solid  # white, as in every training render
  background_color: [1, 1, 1]
render:
  num_samples: 64
  backend: torch  # every sample of a fixed 64 per ray: nerfacc's grid starts with only the blob's ball occupied and cost the cubes 0.03-0.14 IoU (BENCHMARKS.md, ninth session)
  grid_resolution: 64
  albedo_iters: 1000
  textureless_ratio: {cfg.data.shading_probs[2]:g}  # the prior's share of textureless renders
  ambient_ratio: {cfg.data.ambient_ratio:g}
camera:
  render_size: {size}
  radius_range: {_pair(cam.radius_range)}
  elevation_range: {_pair(cam.elevation_range)}
  elevation_sampling: {cam.elevation_sampling}  # as the prior's training renders drew them
  fovy_range: {_pair(cam.fovy_range)}
  val_radius: {cam.val_radius:g}
  val_elevation: {cam.val_elevation:g}
  val_fovy: {cam.val_fovy:g}
train:
  iters: 2000
  latent_fraction: 0.0
  encode_size: {size}
# SDS guidance 7.5 and timesteps up to 0.6 of the schedule, annealed to 0.3: where this prior's
# guided prediction at a true object keeps the object's size (`prior_diagnosis --inflation-scales`:
# at guidance 50 it fills twice the true silhouette from t = 0.6 up, so SDS inflated every object;
# BENCHMARKS.md, fifth and sixth sessions).
sds:
  guidance_scale: 7.5
  t_max: 0.6
  t_anneal: linear
  t_max_final: 0.3
reg:
  entropy: 0.01  # opaque or empty rays: a translucent shell lets the white background through
  orientation: 10  # threestudio's DreamFusion weight (ours was 0.01): +0.014-0.021 median IoU on 16 objects, H200 (BENCHMARKS.md, fifteenth session)
output:
  mesh_resolution: 128
  video_size: 128
  video_frames: 60
"""


def preset_cpu_yaml(cfg: PriorTrainConfig) -> str:
    """Overrides layered on `preset_yaml` when a run with this prior is on the CPU: a few minutes
    on two cores instead of the GPU's full-size run."""
    size = cfg.arch.image_size
    return f"""\
# CPU overrides for the built-in prior, layered on {PRESET_NAME} when the run's device is the CPU.
# Renders at half size with half the samples (upsampled to {size}x{size} for the VAE), autograd normals
# (cheaper than finite differences on a CPU), fewer steps, and smaller outputs.
field:
  normals: autograd
render:
  num_samples: 32
  albedo_iters: 300
camera:
  render_size: {size // 2}
train:
  iters: 600  # at 400 this prior's runs stay faint and small: README red cube 0.743, 0.798 at 600 (BENCHMARKS.md, twentieth session)
  encode_size: {size}
output:
  mesh_resolution: 64
  video_size: 64
  video_frames: 24
"""


def _save_folder(parts: dict[str, Any], folder: Path, dtype: torch.dtype) -> None:
    from diffusers import StableDiffusionPipeline

    nets = {n: copy.deepcopy(parts[n]).to("cpu", dtype) for n in ("text_encoder", "unet", "vae")}
    pipe = StableDiffusionPipeline(
        **nets,
        tokenizer=parts["tokenizer"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def folder_weight_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` folder to `out`, replacing an older `out` only once `tmp` is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_config(cfg: PriorTrainConfig) -> None:
    for name in ("steps_vae", "steps_unet", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    if cfg.data.image_size != cfg.arch.image_size:
        raise ValueError(f"dataset image_size {cfg.data.image_size} differs from the prior's {cfg.arch.image_size}")
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {cfg.caption_dropout!r}")
    if cfg.color_isometry_weight < 0 or cfg.color_isometry_pairs < 2:
        raise ValueError(f"color_isometry_weight must be >= 0 and color_isometry_pairs >= 2, "
                         f"got {cfg.color_isometry_weight!r} and {cfg.color_isometry_pairs!r}")  # fmt: skip


def train_prior(cfg: PriorTrainConfig) -> tuple[Path, dict]:
    """Render, train, save and evaluate; returns (folder, evaluation dict; empty when
    ``eval_per_caption`` is 0)."""
    from .score import evaluate_prior_samples

    _check_config(cfg)
    device = resolve_device(cfg.device)
    out = Path(cfg.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = render_dataset(cfg.data, device)
    render_s = time.perf_counter() - started
    logger.info("dataset: %d renders of %d objects in %.1f s", len(data), len(data.captions), render_s)

    parts = build_components(cfg.arch, build_tokenizer(data.captions), cfg.seed)
    for n in ("text_encoder", "unet", "vae"):
        parts[n].to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    vae_from = cfg.vae_from if cfg.vae_from is not None else cfg.unet_from
    if cfg.unet_from is not None:
        load_trained_denoiser(cfg.unet_from, parts, device)
    if vae_from is None:
        vae_stats = train_vae(parts["vae"], data, cfg, device, gen)
    else:
        parts["vae"] = load_trained_vae(vae_from, parts["vae"], device)
        vae_stats = {"from": str(vae_from), "seconds": 0.0, "psnr": reconstruction_psnr(parts["vae"], data, device),
                     "color_isometry": color_isometry_stats(parts["vae"], device)}  # fmt: skip
    mean, std = encode_dataset(parts["vae"], data, device)
    sample = mean + std * torch.randn(mean.shape, generator=gen, device=device)
    if vae_from is None:
        scaling_factor = float(1.0 / sample.std())
        parts["vae"].register_to_config(scaling_factor=scaling_factor)
    else:  # the kept VAE's own scale, so the latents SDS sees are scaled as before
        scaling_factor = float(parts["vae"].config.scaling_factor)
    logger.info("VAE reconstruction PSNR %.2f dB; latent std %.4f -> scaling_factor %.5f",
                vae_stats["psnr"], 1.0 / scaling_factor, scaling_factor)  # fmt: skip
    unet_stats = train_unet(
        parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"].alphas_cumprod,
        (mean, std), scaling_factor, data, cfg, device, gen,
    )  # fmt: skip

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _save_folder(parts, tmp, getattr(torch, cfg.save_dtype))
        size = folder_weight_bytes(tmp)
        if size > MAX_WEIGHT_BYTES:
            raise ValueError(f"the prior's weights take {size / 2**20:.1f} MiB, over the {MAX_WEIGHT_BYTES / 2**20:.0f} MiB limit")
        prompts = {"captions": list(data.captions), "views": list(VIEWS), "texts": list(data.texts),
                   "six_colored": SIX_COLORED_CAPTION}  # fmt: skip
        atomic_write_text(tmp / PROMPTS_NAME, json.dumps(prompts, indent=2) + "\n")
        atomic_write_text(tmp / PRESET_NAME, preset_yaml(cfg))
        atomic_write_text(tmp / PRESET_CPU_NAME, preset_cpu_yaml(cfg))
        del mean, std, sample
        evaluation: dict[str, Any] = {}
        if cfg.eval_per_caption > 0:
            evaluation = evaluate_prior_samples(
                tmp, n_per_caption=cfg.eval_per_caption, device=device, reference=data,
                steps=cfg.eval_steps, guidance_scale=cfg.eval_guidance, seed=cfg.seed,
            )  # fmt: skip
            atomic_write_text(tmp / EVAL_NAME, json.dumps(evaluation, indent=2) + "\n")
        record = {
            "config": asdict(cfg),
            "device": str(device),
            "dataset_images": len(data),
            "render_seconds": round(render_s, 2),
            "vae": vae_stats,
            "unet": {**unet_stats, **({"from": str(cfg.unet_from)} if cfg.unet_from is not None else {})},
            "scaling_factor": scaling_factor,
            "weight_bytes": size,
            "total_seconds": round(time.perf_counter() - started, 2),
        }
        atomic_write_text(tmp / TRAIN_NAME, json.dumps(record, indent=2) + "\n")
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prior written to %s (%.1f MiB of weights) in %.0f s; object accuracy of its samples %s",
                out, size / 2**20, time.perf_counter() - started, evaluation.get("object_accuracy", "not checked"))  # fmt: skip
    return out, evaluation
