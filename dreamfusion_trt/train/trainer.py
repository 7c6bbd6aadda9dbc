"""The optimisation loop: render a random view, turn it into latents, take an SDS step.

`Trainer` owns everything that changes during training (scene parameters, optimizer, grad
scaler, random generators) and can save and restore all of it, so a resumed run continues to
exactly the state an uninterrupted run would reach. The frozen guidance networks come in through
the constructor (`SDSGuidance` wraps whichever noise-predictor backend was chosen).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cameras import get_rays, sample_random_cameras
from ..checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..config import RunConfig
from ..engines.base import ImageEncoder
from ..guidance.latents import LinearLatentMap, encode_rgb
from ..guidance.sds import SDSGuidance
from ..guidance.text import view_indices
from ..render.renderer import Renderer

log = logging.getLogger(__name__)

SHADINGS = ("albedo", "lambertian", "textureless")
METRIC_FIELDS = (
    "step", "phase", "shading", "loss", "sds", "orientation", "entropy", "sparsity",
    "t_mean", "opacity_mean", "it_per_s", "elapsed_s",
)  # fmt: skip


@dataclass
class Embeddings:
    """Text conditioning for K prompts: cond [K, V, 77, D] (V view variants), uncond [K, 77, D]."""

    cond: torch.Tensor
    uncond: torch.Tensor


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def make_optimizer(renderer: Renderer, cfg: RunConfig) -> torch.optim.Adam:
    """Adam with the hash-grid tables on a larger learning rate (Instant-NGP practice)."""
    grid, rest = [], []
    for name, param in renderer.named_parameters():
        if not param.requires_grad:
            continue
        (grid if "encoding" in name else rest).append(param)
    groups = [{"params": rest, "lr": cfg.train.lr}]
    if grid:
        groups.append({"params": grid, "lr": cfg.train.lr * cfg.train.grid_lr_scale})
    return torch.optim.Adam(groups, betas=cfg.train.betas, eps=cfg.train.eps)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        renderer: Renderer,
        guidance: SDSGuidance,
        embeddings: Embeddings,
        encoder: ImageEncoder,
        latent_map: LinearLatentMap,
        device: torch.device,
        latent_size: int,
        image_size: int,
    ) -> None:
        """`latent_size` is the UNet's latent resolution (64 for SD), `image_size` the VAE's
        matching image resolution (512 for SD); the latent phase renders at `latent_size`, the RGB
        phase at `camera.render_size`, resized to `train.encode_size` or `image_size`."""
        self.cfg = cfg
        self.renderer = renderer
        self.guidance = guidance
        self.embeddings = embeddings
        self.encoder = encoder
        self.latent_map = latent_map
        self.device = device
        self.num_prompts = embeddings.cond.shape[0]
        self.optimizer = make_optimizer(renderer, cfg)
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.elapsed_s = 0.0
        # Cameras and shading are drawn on the CPU, noise and timesteps on the device; both
        # generators are checkpointed so a resumed run draws the same numbers.
        self.cpu_gen = torch.Generator().manual_seed(cfg.train.seed)
        self.dev_gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
        self.latent_steps = int(round(cfg.train.latent_fraction * cfg.train.iters))
        self.latent_size = latent_size
        self.encode_size = cfg.train.encode_size or image_size

    # ------------------------------------------------------------------------------------------
    # one step

    def phase(self, step: int) -> str:
        return "latent" if step < self.latent_steps else "rgb"

    def pick_shading(self, step: int) -> str:
        rc = self.cfg.render
        if rc.shading != "random":
            return rc.shading
        u = float(torch.rand((), generator=self.cpu_gen))
        if step < rc.albedo_iters:
            return "albedo"
        # After the albedo warm-up: textureless with its ratio, otherwise lambertian-shaded albedo.
        return "textureless" if u < rc.textureless_ratio else "lambertian"

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> dict[str, torch.Tensor | str]:
        """One SDS step for all K prompts; returns metrics as tensors (no host sync here)."""
        cfg, step, k = self.cfg, self.step, self.num_prompts
        phase = self.phase(step)
        size = self.latent_size if phase == "latent" else cfg.camera.render_size
        self.renderer.train()
        cams = sample_random_cameras(k, cfg.camera, self.cpu_gen).to(self.device)
        shading = self.pick_shading(step)
        rays_o, rays_d = get_rays(cams, size, size)
        need_normals = shading != "albedo" or cfg.reg.orientation > 0
        with self._autocast():
            out = self.renderer.render(
                rays_o, rays_d, cams.light_dir, shading, cfg.render.ambient_ratio,
                generator=self.dev_gen, need_normals=need_normals,
            )  # fmt: skip
            image = out.rgb.reshape(k, size, size, 3).permute(0, 3, 1, 2)  # [K, 3, H, W]
            if phase == "latent":
                latents = self.latent_map(image)  # [K, 4, h, w]: the render is the latent
            else:
                latents = encode_rgb(image, self.encoder, self.encode_size)  # [K, 4, h, w]
            views = view_indices(cams.elevation_deg, cams.azimuth_deg, cfg.prompt).to(self.device)
            cond = self.embeddings.cond[torch.arange(k, device=self.device), views]
            sds = self.guidance(latents, cond, self.embeddings.uncond, step / cfg.train.iters, generator=self.dev_gen)
            opacity = out.opacity.float().clamp(1e-5, 1 - 1e-5)
            entropy = -(opacity * opacity.log() + (1 - opacity) * (1 - opacity).log()).mean()
            sparsity = opacity.mean()
            orientation = out.orientation.float().mean() if out.orientation is not None else sds.loss.new_zeros(())
            loss = (
                sds.loss
                + cfg.reg.orientation * orientation
                + cfg.reg.entropy * entropy
                + cfg.reg.sparsity * sparsity
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.renderer.parameters(), cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.renderer.update_occupancy(step)
        self.step += 1
        return {
            "phase": phase, "shading": shading, "loss": loss.detach(), "sds": sds.loss.detach(),
            "orientation": orientation.detach(), "entropy": entropy.detach(), "sparsity": sparsity.detach(),
            "t_mean": sds.t.float().mean(), "opacity_mean": sparsity.detach(),
        }  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # the loop

    def fit(self, out_dir: Path, progress: bool = True) -> None:
        """Train until `cfg.train.iters`, writing metrics and periodic checkpoints to `out_dir`.

        On Ctrl-C a checkpoint of the last finished step is written before the interrupt
        propagates, so `--resume` continues from there.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        iters = cfg.train.iters
        metrics_path = out_dir / "metrics.csv"
        new_file = not metrics_path.exists() or self.step == 0
        writer_file = metrics_path.open("w" if new_file else "a", newline="")
        writer = csv.DictWriter(writer_file, fieldnames=METRIC_FIELDS)
        if new_file:
            writer.writeheader()
        tb = self._tensorboard(out_dir)
        bar = tqdm(total=iters, initial=self.step, disable=not progress, unit="it", dynamic_ncols=True)
        last_t, last_step = time.perf_counter(), self.step
        try:
            while self.step < iters:
                metrics = self.train_step()
                bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == iters:
                    now = time.perf_counter()
                    rate = (self.step - last_step) / max(now - last_t, 1e-9)
                    self.elapsed_s += now - last_t
                    last_t, last_step = now, self.step
                    row = {k: (float(v) if torch.is_tensor(v) else v) for k, v in metrics.items()}
                    row.update(step=self.step, it_per_s=round(rate, 3), elapsed_s=round(self.elapsed_s, 2))
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"loss is {row['loss']} at step {self.step}; last good checkpoint kept")
                    writer.writerow(row)
                    writer_file.flush()
                    if tb is not None:
                        for key in ("loss", "sds", "orientation", "entropy", "t_mean", "opacity_mean"):
                            tb.add_scalar(f"train/{key}", row[key], self.step)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", phase=row["phase"], refresh=False)
                if cfg.train.ckpt_every > 0 and self.step % cfg.train.ckpt_every == 0 and self.step < iters:
                    self.save(out_dir)
        except KeyboardInterrupt:
            self.elapsed_s += time.perf_counter() - last_t
            self.save(out_dir)
            log.warning("interrupted at step %d; checkpoint written, continue with --resume", self.step)
            raise
        finally:
            bar.close()
            writer_file.close()
            if tb is not None:
                tb.close()
        self.save(out_dir)

    def _tensorboard(self, out_dir: Path):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ValueError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from exc
        return SummaryWriter(str(out_dir / "tensorboard"))

    # ------------------------------------------------------------------------------------------
    # state

    def checkpoint(self) -> Checkpoint:
        rng = {"cpu_gen": self.cpu_gen.get_state(), "dev_gen": self.dev_gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return Checkpoint(
            step=self.step,
            config=self.cfg,
            model=self.renderer.state_dict(),
            optimizer=self.optimizer.state_dict(),
            rng=rng,
            extra={f"latent_map.{k}": v for k, v in self.latent_map.state_dict().items()},
            state={"scaler": self.scaler.state_dict(), "elapsed_s": self.elapsed_s, "num_prompts": self.num_prompts},
        )

    def save(self, out_dir: Path) -> Path:
        path = save_checkpoint(self.checkpoint(), out_dir)
        log.info("checkpoint at step %d: %s", self.step, path)
        return path

    def restore(self, path: str | Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.state.get("num_prompts", 1) != self.num_prompts:
            raise ValueError(f"checkpoint '{path}' holds {ckpt.state.get('num_prompts')} prompts, this run has {self.num_prompts}")
        self.renderer.load_state_dict(ckpt.model)
        if ckpt.optimizer is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
        self.scaler.load_state_dict(ckpt.state.get("scaler", {}))
        self.cpu_gen.set_state(ckpt.rng["cpu_gen"].cpu())
        self.dev_gen.set_state(ckpt.rng["dev_gen"].cpu())
        torch.set_rng_state(ckpt.rng["torch"].cpu())
        if "cuda" in ckpt.rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt.rng["cuda"].cpu(), self.device)
        self.latent_map.load_state_dict(
            {k.removeprefix("latent_map."): v for k, v in ckpt.extra.items() if k.startswith("latent_map.")}
        )
        self.step = ckpt.step
        self.elapsed_s = float(ckpt.state.get("elapsed_s", 0.0))
        log.info("resumed from '%s' at step %d", path, self.step)
