"""A small network distilled from the RGB phase's render -> latent function, and its storage.

The RGB phase computes ``encode_rgb(render, EagerImageEncoder(vae, scaling), E)``: the render
[n, 3, R, R] in [0, 1] is resized bilinearly to E x E and run through SD's whole VAE encoder
(posterior mean, times the scaling factor) -> latents [n, C, E/8, E/8]. The encoder never sees
detail finer than the R x R render, so a convolutional network working at the latent grid can
compute nearly the same function, and its vector-Jacobian products, at a small fraction of the
cost. `DistilledRenderEncoder` is that network; `fit_render_encoder` fits it to the teacher on
images made on the fly (`render_encoder_data`), matching both the latents and the teacher's
VJPs for random cotangents, because SDS uses the encoder's gradient, not only its output.
`CompiledRenderEncoder` is its fast twin (forward and backward through ``torch.compile``), with
the module as its reference and fallback.

Parity (`measure_parity`, on held-out renders): per image the relative error of the latents
``|z_s - z_t| / |z_t|`` and, per image and random latent-space gradient g, the cosine between the
render gradients ``J_t^T g`` (full VAE) and ``J_s^T g`` (distilled). `ParityThreshold` says how
good is good enough; the loader refuses an encoder whose recorded parity falls short and says why.

Storage, beside the engines: ``<engines_dir>/<model key>/render_encoder.r{R}e{E}.v{recipe}.safetensors``
(safetensors, written through `atomic`) with an entry in the folder's ``manifest.json`` (backend
"distilled", network "render_encoder": model key, sizes, recipe version, architecture, fit
settings, parity, sha256), checked by hash before loading. `load_or_fit` loads a matching,
intact, passing encoder, or fits and stores one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path
from ..engines.eager import EagerImageEncoder
from ..engines.artifacts import Manifest, model_folder, sha256_file
from .compiled import CompiledOrEager, compile_static
from .latents import encode_rgb

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the architecture, the data or the loss changes
NETWORK = "render_encoder"
BACKEND = "distilled"

Teacher = Callable[[torch.Tensor], torch.Tensor]  # images [n, 3, R, R] in [0, 1] -> latents [n, C, h, w]


# ---------------------------------------------------------------------------------------------
# the network


@dataclass(frozen=True)
class EncoderArch:
    render_size: int  # R: the render is [n, 3, R, R]
    encode_size: int  # E: the teacher resizes to E x E before its VAE
    latent_channels: int = 4
    vae_factor: int = 8  # E / latent size (2 ** (levels - 1) of the VAE encoder)
    width: int = 64
    blocks: int = 4

    @property
    def latent_size(self) -> int:
        return self.encode_size // self.vae_factor

    @property
    def downsample(self) -> int:
        """Stride-2 stages from the working size down to the latent grid (the render is resized
        to ``latent_size * 2 ** downsample`` first when its size is not already that)."""
        ratio = self.render_size / self.latent_size
        return max(0, math.ceil(math.log2(ratio) - 1e-9))

    def check(self) -> None:
        if self.encode_size % self.vae_factor or self.latent_size < 1:
            raise ValueError(f"encode size {self.encode_size!r} is not a multiple of the VAE's factor {self.vae_factor!r}")
        if self.render_size < 1 or self.width < 8 or self.width % 8 or self.blocks < 1:
            raise ValueError(f"invalid render encoder architecture {self!r} (render_size >= 1, width a multiple of 8, blocks >= 1)")


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, ch)


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = _norm(ch), nn.Conv2d(ch, ch, 3, padding=1)
        # A global context term, as the VAE's mid-block attention and group norms see the whole image.
        self.context = nn.Linear(ch, ch)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.context(h.mean(dim=(2, 3)))[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class DistilledRenderEncoder(nn.Module):
    """images [n, 3, R, R] in [0, 1] -> scaled latents [n, C, E/8, E/8], differentiable in the images.

    Stem conv at the working size, stride-2 convs down to the latent grid, residual blocks with
    group norms and a global context term, a conv head, plus a linear colour path (1x1 conv of
    the area-averaged input) that carries the bulk of the per-pixel colour -> latent map.
    Parameters are frozen after fitting; gradients still flow to the images.
    """

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        arch.check()
        self.arch = arch
        w = arch.width
        self.work_size = arch.latent_size * 2**arch.downsample
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for _ in range(arch.downsample))
        self.blocks = nn.ModuleList(_ResBlock(w) for _ in range(arch.blocks))
        self.head_norm = _norm(w)
        self.head = nn.Conv2d(w, arch.latent_channels, 3, padding=1)
        self.colour = nn.Conv2d(3, arch.latent_channels, 1)
        nn.init.zeros_(self.head.weight)  # start as the colour path alone (set by the fit's least squares)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r = self.arch.render_size
        if images.ndim != 4 or images.shape[1:] != (3, r, r):
            raise ValueError(f"images must be [n, 3, {r}, {r}], got shape {tuple(images.shape)}")
        x = images * 2.0 - 1.0
        if r != self.work_size:
            x = F.interpolate(x, size=(self.work_size, self.work_size), mode="bilinear", align_corners=False)
        h = self.stem(x)
        for conv in self.down:
            h = conv(F.silu(h))
        for block in self.blocks:
            h = block(h)
        pooled = F.avg_pool2d(x, 2**self.arch.downsample) if self.arch.downsample else x
        return self.head(F.silu(self.head_norm(h))) + self.colour(pooled)


class CompiledRenderEncoder:
    """The fast twin of a `DistilledRenderEncoder`, the module itself its reference and fallback:
    images [n, 3, R, R] in [0, 1] -> latents [n, C, E/8, E/8], differentiable in the images.

    ``torch.compile`` of the module's forward with static shapes (one graph per batch size);
    AOT autograd compiles its backward, so the RGB phase's forward and backward through it run
    as a few kernels instead of the eager module's many launches. Build one per encoder (it
    holds the compiled graphs). When the compiler fails, it runs the eager module for good,
    with one warning (`compiled.CompiledOrEager`). `train.compile_rgb_encoder` chooses it; it is
    off by default, as on the H200 it did not shorten the K = 1 RGB step (BENCHMARKS.md).
    """

    name = "compiled"

    def __init__(self, encoder: DistilledRenderEncoder, backend: str = "inductor", mode: str | None = None) -> None:
        self.encoder = encoder
        self.arch = encoder.arch
        self._run = CompiledOrEager(compile_static(encoder.forward, backend, mode), encoder, "the distilled render encoder")

    @property
    def compiled(self) -> bool:
        """False once the compiler failed and the eager module runs instead."""
        return not self._run.failed

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)  # [n, C, E/8, E/8]


def vae_teacher(vae: nn.Module, scaling_factor: float, encode_size: int) -> Teacher:
    """The exact function the RGB phase uses: ``encode_rgb(images, EagerImageEncoder(vae, s), E)``."""
    encoder = EagerImageEncoder(vae, scaling_factor)
    return lambda images: encode_rgb(images, encoder, encode_size)


def vae_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------
# teacher targets and parity


def random_cotangents(shape: torch.Size | tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Latent-space gradients [n, C, h, w] of unit RMS: white noise for even rows, smooth noise
    (drawn at a quarter of the grid and upsampled) for odd rows, as SDS gradients range from
    pixel noise (high t) to smooth structure."""
    n, c, h, w = shape
    white = torch.randn(n, c, h, w, generator=gen)
    coarse = torch.randn(n, c, max(1, h // 4), max(1, w // 4), generator=gen)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    g = torch.where((torch.arange(n) % 2 == 0)[:, None, None, None], white, smooth)
    return (g / g.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()).to(device)


@dataclass
class TeacherTargets:
    images: torch.Tensor  # [N, 3, R, R]
    latents: torch.Tensor  # [N, C, h, w]
    cotangents: torch.Tensor  # [N, M, C, h, w]
    vjps: torch.Tensor  # [N, M, 3, R, R]: J^T g for each cotangent


def teacher_targets(
    teacher: Teacher, images: torch.Tensor, cotangents_per_image: int, gen: torch.Generator, batch: int
) -> TeacherTargets:
    """Latents and VJPs of the teacher for `images` [N, 3, R, R], `batch` images at a time (fp32 out)."""
    lat, cot, vjp = [], [], []
    for chunk in images.split(batch):
        x = chunk.detach().clone().requires_grad_(True)
        z = teacher(x)
        gs = [random_cotangents(z.shape, gen, z.device).to(z.dtype) for _ in range(cotangents_per_image)]
        vs = [torch.autograd.grad(z, x, g, retain_graph=i + 1 < len(gs))[0] for i, g in enumerate(gs)]
        lat.append(z.detach().float())
        cot.append(torch.stack(gs, 1).float())
        vjp.append(torch.stack(vs, 1).float())
    return TeacherTargets(images.detach().float(), torch.cat(lat), torch.cat(cot), torch.cat(vjp))


def _per_row(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    rel = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-30)
    return rel, cos


def measure_parity(student: Teacher, targets: TeacherTargets, batch: int = 32) -> dict[str, float]:
    """Parity of `student` against the teacher's `targets` (held-out images):
    latent relative error per image (mean, 95th percentile) and the cosine of the render
    gradients J^T g per image and cotangent (mean, 5th percentile, and the gradient norm ratio)."""
    rels, coss, ratios = [], [], []
    for i in range(0, len(targets.images), batch):
        x = targets.images[i : i + batch].detach().clone().requires_grad_(True)
        z = student(x)
        rels.append(_per_row(z.detach(), targets.latents[i : i + batch])[0])
        g_all, v_all = targets.cotangents[i : i + batch], targets.vjps[i : i + batch]
        m = g_all.shape[1]
        for j in range(m):
            (v,) = torch.autograd.grad(z, x, g_all[:, j].to(z.dtype), retain_graph=j + 1 < m)
            _, cos = _per_row(v, v_all[:, j])
            coss.append(cos)
            ratios.append(v.flatten(1).double().norm(dim=1) / v_all[:, j].flatten(1).double().norm(dim=1).clamp_min(1e-30))
    rel, cos, ratio = torch.cat(rels), torch.cat(coss), torch.cat(ratios)
    return {
        "latent_rel_err_mean": float(rel.mean()),
        "latent_rel_err_p95": float(torch.quantile(rel, 0.95)),
        "grad_cos_mean": float(cos.mean()),
        "grad_cos_p5": float(torch.quantile(cos, 0.05)),
        "grad_norm_ratio_mean": float(ratio.mean()),
        "images": len(rel),
        "gradients": len(cos),
    }


class BelowThresholdError(ValueError):
    """A stored or fitted render encoder whose recorded parity falls short of the threshold."""


@dataclass(frozen=True)
class ParityThreshold:
    """What an encoder must reach on held-out renders to be used instead of the full VAE."""

    max_latent_rel_err_mean: float
    min_grad_cos_mean: float
    min_grad_cos_p5: float

    def failures(self, parity: dict[str, Any]) -> list[str]:
        """Why `parity` falls short, one message per failed bound (empty when it passes)."""
        out = []
        checks = (
            ("latent_rel_err_mean", self.max_latent_rel_err_mean, lambda v, t: v <= t, "above"),
            ("grad_cos_mean", self.min_grad_cos_mean, lambda v, t: v >= t, "below"),
            ("grad_cos_p5", self.min_grad_cos_p5, lambda v, t: v >= t, "below"),
        )
        for name, bound, ok, word in checks:
            value = parity.get(name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value, bound):
                out.append(f"{name} = {value!r} is {word} the threshold {bound:g}" if isinstance(value, (int, float)) else f"{name} missing")
        return out


# Measured on the CPU against the built-in prior's trained VAE (render 16 -> encode 64, a short
# fit of 200 steps on 96 images: tests/test_render_encoder.py): latent rel. error 0.193 (p95
# 0.286), gradient cosine 0.907 (p5 0.812); the same fit matching latents only reaches cosine
# 0.841 (p5 0.717) and a gradient norm ratio of 0.76 instead of 0.90, so the VJP term earns its
# place. The default leaves room below those numbers; the full recipe (FitOptions()) fits 15x
# longer on 20x more images. `bench.render_encoder` measures SD 2.1-base-size numbers.
DEFAULT_THRESHOLD = ParityThreshold(max_latent_rel_err_mean=0.25, min_grad_cos_mean=0.85, min_grad_cos_p5=0.70)


def untrained_render_encoder(vae: nn.Module, render_size: int, encode_size: int, device: torch.device | str) -> DistilledRenderEncoder:
    """A distilled render encoder of the fitted one's architecture with random weights (seed 0),
    frozen: the RGB phase's speed on a random-weight model, whose own fit never passes parity
    (speed does not depend on weight values). Its latents mean nothing; benchmarks only."""
    opts = FitOptions()
    arch = EncoderArch(render_size, encode_size, int(vae.config.latent_channels), vae_factor(vae), opts.width, opts.blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DistilledRenderEncoder(arch).to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# fitting


@dataclass(frozen=True)
class FitOptions:
    steps: int = 3000
    batch: int = 32
    train_images: int = 2048
    eval_images: int = 256  # held-out renders for the parity report
    cotangents_per_image: int = 2  # teacher VJPs per image; training mixes them linearly
    lr: float = 2e-3
    vjp_weight: float = 1.0
    width: int = 64
    blocks: int = 4
    teacher_batch: int = 16
    render_samples: int = 48  # ray samples of the training renders
    seed: int = 0
    # How the student's steps run, not what they compute: "auto" replays each step as one CUDA
    # graph on CUDA (the step is thousands of small kernels; eager steps are the graph's twin).
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    # The student's arithmetic during the fit: "bf16" runs its forward and double backward under
    # bfloat16 autocast (weights, Adam and losses stay fp32); `channels_last` runs its convolutions
    # in NHWC. Both are slower on the H200 (cuDNN's double-backward kernels: 47 and 43 ms per
    # step against 35 ms in fp32/TF32, BENCHMARKS.md, eighth session), so fp32 NCHW is the default.
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False


def fit_draws(options: FitOptions, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's training rows [steps, batch] and cotangent mixing coefficients
    [steps, batch, M], drawn from `gen` step by step, up front: one upload, no host sync per step."""
    m = options.cotangents_per_image
    idx, coeff = [], []
    for _ in range(options.steps):
        idx.append(torch.randint(0, n, (options.batch,), generator=gen))
        coeff.append(torch.randn(options.batch, m, generator=gen) / math.sqrt(m))
    if not idx:
        return torch.zeros(0, options.batch, dtype=torch.long), torch.zeros(0, options.batch, m)
    return torch.stack(idx), torch.stack(coeff)


def fit_graph_choice(options: FitOptions, device: torch.device) -> bool:
    """Whether the fit replays its steps as a CUDA graph (``FitOptions.cuda_graph``)."""
    if options.cuda_graph == "on" and device.type != "cuda":
        raise ValueError(f"the render encoder fit's cuda_graph='on' needs CUDA, got {device}")
    return options.cuda_graph == "on" or (options.cuda_graph == "auto" and device.type == "cuda")


def lr_factor(step: int, steps: int) -> float:
    """The fit's schedule: linear warm-up over the first 5% of the steps, then cosine to zero."""
    warmup = max(1, steps // 20)
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


class FitStep:
    """One step of the student's fit: latents and VJPs of rows `idx` of the teacher's targets
    against the student's (double backward), then Adam. Reads nothing from the host, so the same
    call can be captured as a CUDA graph (`GraphedFitStep`); `capturable` keeps Adam's state and
    learning rate on the device for that. The last losses stay in `out_loss` / `vjp_loss`."""

    def __init__(self, student: DistilledRenderEncoder, train: TeacherTargets, options: FitOptions, capturable: bool = False) -> None:
        self.student, self.train, self.options = student, train, options
        self.z_var = float(train.latents.var())
        device = train.images.device
        self.device_type = device.type
        if options.precision not in ("fp32", "bf16"):
            raise ValueError(f"render encoder fit precision must be 'fp32' or 'bf16', got {options.precision!r}")
        self.amp = options.precision == "bf16"
        if options.channels_last:
            student.to(memory_format=torch.channels_last)
        lr: float | torch.Tensor = torch.tensor(options.lr, device=device) if capturable else options.lr
        self.opt = torch.optim.Adam(student.parameters(), lr=lr, capturable=capturable)
        self.out_loss = self.vjp_loss = torch.zeros((), device=device)

    def set_lr(self, step: int) -> None:
        lr = self.options.lr * lr_factor(step, self.options.steps)
        for group in self.opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def update(self, idx: torch.Tensor, coeff: torch.Tensor) -> None:
        """The device side of a step (what a graph captures)."""
        train = self.train
        x = train.images[idx]
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        g = torch.einsum("bm,bm...->b...", coeff, train.cotangents[idx])
        v_t = torch.einsum("bm,bm...->b...", coeff, train.vjps[idx])
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):  # capturable
            z = self.student(x)
            (v_s,) = torch.autograd.grad(z, x, g.to(z.dtype), create_graph=True)
        z, v_s = z.float(), v_s.float()
        out_loss = (z - train.latents[idx]).square().mean() / self.z_var
        vjp_loss = ((v_s - v_t).square().flatten(1).sum(1) / v_t.square().flatten(1).sum(1).clamp_min(1e-30)).mean()
        self.opt.zero_grad(set_to_none=True)
        (out_loss + self.options.vjp_weight * vjp_loss).backward()
        self.opt.step()
        self.out_loss, self.vjp_loss = out_loss.detach(), vjp_loss.detach()

    def __call__(self, step: int, idx: torch.Tensor, coeff: torch.Tensor) -> None:
        self.set_lr(step)
        self.update(idx, coeff)


class GraphedFitStep:
    """`FitStep` replayed as one CUDA graph: `WARMUP` eager steps on a side stream, then a
    capture that reads the rows and coefficients from static buffers. A failed capture logs one
    warning and the remaining steps run eagerly (the same `FitStep`, so nothing is lost)."""

    WARMUP = 3

    def __init__(self, fit: FitStep) -> None:
        self.fit = fit
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self._calls = 0
        self._idx: torch.Tensor | None = None
        self._coeff: torch.Tensor | None = None

    def __call__(self, step: int, idx: torch.Tensor, coeff: torch.Tensor) -> None:
        fit = self.fit
        fit.set_lr(step)  # a device tensor the graph reads
        if self.failed:
            fit.update(idx, coeff)
            return
        if self._calls < self.WARMUP:  # eager, on a side stream, as a capture's warm-up must be
            self._calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fit.update(idx, coeff)
            torch.cuda.current_stream().wait_stream(side)
            return
        if self.graph is None:
            self._idx, self._coeff = idx.clone(), coeff.clone()
            graph = torch.cuda.CUDAGraph()
            try:
                fit.opt.zero_grad(set_to_none=True)
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    fit.update(self._idx, self._coeff)
            except Exception as exc:  # noqa: BLE001 -- any capture failure: eager steps from here
                logger.warning("render encoder fit: CUDA graph capture failed (%s); fitting with eager steps",
                               str(exc).splitlines()[0] if str(exc) else type(exc).__name__)  # fmt: skip
                self.failed = True
                torch.cuda.synchronize()
                fit.update(idx, coeff)
                return
            self.graph = graph
        else:
            self._idx.copy_(idx)
            self._coeff.copy_(coeff)
        self.graph.replay()


@contextlib.contextmanager
def cudnn_benchmark(device: torch.device) -> Iterator[None]:
    """cuDNN's autotuner for the fit's fixed shapes on CUDA (restored afterwards)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@dataclass
class FitReport:
    parity: dict[str, float]
    options: dict[str, Any]
    arch: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)


def fit_render_encoder(
    vae: nn.Module,
    scaling_factor: float,
    render_size: int,
    encode_size: int,
    *,
    options: FitOptions = FitOptions(),
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[DistilledRenderEncoder, FitReport]:
    """Fit a `DistilledRenderEncoder` to ``encode_rgb(., EagerImageEncoder(vae, scaling), encode_size)``
    at `render_size`, on images made from ``options.seed``; returns it (eval, frozen) and the
    report with its parity on held-out renders (another seed)."""
    from tqdm.auto import tqdm

    from .render_encoder_data import make_images

    device = torch.device(device)
    arch = EncoderArch(render_size, encode_size, int(vae.config.latent_channels), vae_factor(vae), options.width, options.blocks)
    arch.check()
    teacher = vae_teacher(vae, scaling_factor, encode_size)
    gen = torch.Generator().manual_seed(options.seed)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    train_x = make_images(options.train_images, render_size, options.seed, device, "mixed", options.render_samples)
    eval_x = make_images(options.eval_images, render_size, options.seed + 7919, device, "renders", options.render_samples)
    seconds["images"] = time.perf_counter() - start
    start = time.perf_counter()
    train = teacher_targets(teacher, train_x, options.cotangents_per_image, gen, options.teacher_batch)
    held_out = teacher_targets(teacher, eval_x, 1, gen, options.teacher_batch)
    _sync(device)
    seconds["teacher"] = time.perf_counter() - start

    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's generator alone
        torch.manual_seed(options.seed)
        student = DistilledRenderEncoder(arch).to(device)
    _init_colour_path(student, train)
    idx_all, coeff_all = fit_draws(options, len(train.images), gen)
    idx_all, coeff_all = idx_all.to(device), coeff_all.to(device)  # one upload: no host sync per step
    graphed = fit_graph_choice(options, device)
    fit = FitStep(student, train, options, capturable=graphed)
    start = time.perf_counter()
    with cudnn_benchmark(device):
        runner = GraphedFitStep(fit) if graphed else fit
        for s in tqdm(range(options.steps), disable=not progress, desc="render encoder", unit="step", dynamic_ncols=True):
            runner(s, idx_all[s], coeff_all[s])
    out_loss, vjp_loss = fit.out_loss, fit.vjp_loss
    _sync(device)
    seconds["train"] = time.perf_counter() - start
    student.eval().requires_grad_(False)
    start = time.perf_counter()
    parity = measure_parity(student, held_out)
    seconds["parity"] = time.perf_counter() - start
    report = FitReport(parity, asdict(options), asdict(arch), seconds,
                       {"latent": float(out_loss.detach()), "vjp": float(vjp_loss.detach())})  # fmt: skip
    logger.info(
        "fitted the render encoder (render %d, encode %d) in %.0f s: latent rel. error %.4f (p95 %.4f), "
        "gradient cosine %.4f (p5 %.4f) on %d held-out renders",
        render_size, encode_size, sum(seconds.values()), parity["latent_rel_err_mean"], parity["latent_rel_err_p95"],
        parity["grad_cos_mean"], parity["grad_cos_p5"], parity["images"],
    )  # fmt: skip
    return student, report


def _init_colour_path(student: DistilledRenderEncoder, train: TeacherTargets) -> None:
    """Start the linear colour path at the least-squares colour -> latent map of the teacher's
    own targets (interior pixels), so the residual network only learns what is left."""
    x = student.arch.downsample
    with torch.no_grad():
        inp = train.images * 2 - 1
        if student.work_size != student.arch.render_size:
            inp = F.interpolate(inp, size=(student.work_size,) * 2, mode="bilinear", align_corners=False)
        colours = F.avg_pool2d(inp, 2**x) if x else inp
        z = train.latents
        if z.shape[-1] > 4:
            colours, z = colours[..., 1:-1, 1:-1], z[..., 1:-1, 1:-1]
        a = colours.permute(0, 2, 3, 1).reshape(-1, 3).double()
        b = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
        design = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        sol = torch.linalg.lstsq(design.cpu(), b.cpu()).solution  # [4, C]
        student.colour.weight.copy_(sol[:3].T[:, :, None, None].float())
        student.colour.bias.copy_(sol[3].float())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# storage beside the engines


def encoder_filename(render_size: int, encode_size: int, recipe_version: int = RECIPE_VERSION) -> str:
    return f"{NETWORK}.r{render_size}e{encode_size}.v{recipe_version}.safetensors"


def save_render_encoder(
    encoder: DistilledRenderEncoder, report: FitReport, engines_dir: str | Path, model_key: str
) -> Path:
    """Write `encoder` as safetensors beside the engines of `model_key` (atomically) and record
    it, with `report`'s parity and its sha256, in that folder's manifest.json. Returns the path."""
    from safetensors.torch import save_file

    arch = encoder.arch
    folder = model_folder(engines_dir, model_key)
    name = encoder_filename(arch.render_size, arch.encode_size)
    path = folder / name
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in encoder.state_dict().items()}
    metadata = {"model_key": model_key, "recipe_version": str(RECIPE_VERSION), "arch": json.dumps(asdict(arch))}
    manifest = Manifest.load(folder, model_key)  # refuses a folder that belongs to another model
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    manifest.files[name] = {
        "backend": BACKEND,
        "network": NETWORK,
        "model_key": model_key,
        "render_size": arch.render_size,
        "encode_size": arch.encode_size,
        "recipe_version": RECIPE_VERSION,
        "arch": asdict(arch),
        "parity": report.parity,
        "fit": {"options": report.options, "seconds": report.seconds, "final_loss": report.final_loss},
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.save()
    logger.info("stored the render encoder at '%s'", path)
    return path


def load_render_encoder(
    engines_dir: str | Path,
    model_key: str,
    render_size: int,
    encode_size: int,
    *,
    threshold: ParityThreshold = DEFAULT_THRESHOLD,
    device: torch.device | str = "cpu",
) -> tuple[DistilledRenderEncoder, dict[str, Any]]:
    """The stored encoder for (`model_key`, `render_size`, `encode_size`, this recipe) and its
    manifest entry. FileNotFoundError when none is recorded or its file is missing; ValueError
    when its sha256 differs from the manifest or its entry does not match; `BelowThresholdError`
    (a ValueError) when its recorded parity is below `threshold`. Each message says which."""
    from safetensors import safe_open

    folder = model_folder(engines_dir, model_key)
    name = encoder_filename(render_size, encode_size)
    path = folder / name
    entry = Manifest.load(folder, model_key).files.get(name)
    if entry is None:
        raise FileNotFoundError(f"no render encoder '{name}' is recorded in '{folder / 'manifest.json'}'")
    if not path.is_file():
        raise FileNotFoundError(f"render encoder '{path}' is in the manifest but the file is missing")
    expect = {"backend": BACKEND, "network": NETWORK, "model_key": model_key, "render_size": render_size,
              "encode_size": encode_size, "recipe_version": RECIPE_VERSION}  # fmt: skip
    wrong = [f"{k} is {entry.get(k)!r}, expected {v!r}" for k, v in expect.items() if entry.get(k) != v]
    if wrong:
        raise ValueError(f"manifest entry of render encoder '{path}' does not match: {'; '.join(wrong)}")
    if sha256_file(path) != entry.get("sha256"):
        raise ValueError(f"sha256 of render encoder '{path}' differs from the manifest (changed since it was stored); "
                         "refusing to load it")  # fmt: skip
    failures = threshold.failures(entry.get("parity", {}))
    if failures:
        raise BelowThresholdError(f"render encoder '{path}' is below the parity threshold: {'; '.join(failures)}")
    try:
        arch = EncoderArch(**entry["arch"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"manifest entry of render encoder '{path}' has no usable architecture: {exc}") from exc
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a dict
    if json.loads(meta.get("arch", "null")) != asdict(arch) or meta.get("model_key") != model_key:
        raise ValueError(f"render encoder '{path}' was written for another model or architecture than its manifest entry says")
    encoder = DistilledRenderEncoder(arch)
    encoder.load_state_dict(state, strict=True)
    return encoder.to(device).eval().requires_grad_(False), entry


def load_or_fit(
    vae: nn.Module,
    scaling_factor: float,
    model_key: str,
    engines_dir: str | Path,
    render_size: int,
    encode_size: int,
    *,
    device: torch.device | str = "cpu",
    options: FitOptions = FitOptions(),
    threshold: ParityThreshold = DEFAULT_THRESHOLD,
    progress: bool = True,
) -> tuple[DistilledRenderEncoder, dict[str, Any]]:
    """Load the stored encoder when one matches, is intact and passes `threshold`; else fit one
    (progress bar, log line), store it and return it with its manifest entry.

    An intact stored encoder of this recipe whose recorded parity fails is not refitted (the
    same recipe would fit the same encoder): `BelowThresholdError` saying why, so the caller can
    fall back to the full VAE. A freshly fitted encoder that fails is stored (its parity recorded) and
    refused the same way.
    """
    try:
        return load_render_encoder(engines_dir, model_key, render_size, encode_size, threshold=threshold, device=device)
    except BelowThresholdError:
        raise
    except (FileNotFoundError, ValueError) as exc:  # missing, changed or mismatched: fit a new one
        why = str(exc)
    logger.info("fitting a render encoder for %s (render %d -> encode %d): %s", model_key, render_size, encode_size, why)
    encoder, report = fit_render_encoder(vae, scaling_factor, render_size, encode_size, options=options, device=device,
                                         progress=progress)  # fmt: skip
    save_render_encoder(encoder, report, engines_dir, model_key)
    return load_render_encoder(engines_dir, model_key, render_size, encode_size, threshold=threshold, device=device)
