"""The optimisation loop for K prompts at once: render a random view per prompt, turn the renders
into latents, take one SDS step for all of them.

`Trainer` holds K prompt *slots* over one stacked scene (K NeRFs, K occupancy grids), one
slot-aware Adam and one text-embedding table. Each slot trains as if it were alone: its own
camera/shading generator (CPU) and noise/timestep/jitter generator (device), seeded from its
prompt's seed; its own schedule (iterations, latent -> RGB switch, t annealing by its own
progress, so one step may mix latent-phase and RGB-phase prompts); per-prompt regulariser sums,
gradient clipping, loss scale and Adam state. K prompts trained together therefore reach the
parameters each would reach alone (to float rounding). A slot is filled with `assign` (fresh
from the prompt's seed, or from its one-prompt checkpoint) and emptied with `release`, without
disturbing the others.

The step never waits for the host on the torch renderer: per-step host data (cameras, view and
shading choices) goes up in one pinned, non-blocking copy, losses and a sticky [K] non-finite
flag stay on the device, and `poll` reads them in one copy when the caller wants metrics. The
nerfacc renderer reads its sample counts back (one synchronisation per step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..cameras import CameraBatch, get_rays, orbit_cameras, sample_random_cameras
from ..checkpoint import Checkpoint, save_checkpoint
from ..config import RunConfig
from ..engines.base import ImageEncoder, LatentDecoder
from ..engines.image_sds import image_sds
from ..guidance.latents import LinearLatentMap, encode_rgb
from ..guidance.sds import SDSGuidance, sds_surrogate, sds_weight
from ..guidance.text import NO_VIEW, VIEWS, PromptEmbeddings, view_indices
from ..render.renderer import Renderer, to_device_async
from ..render.shading import SHADING_MODES
from .monitor import METRIC_FIELDS, NO_TIMER, MetricsLog, StageTimer
from .optim import SlotAdam, SlotGradScaler, SlotParamGroup
from .slots import extract_slot, fresh_slot_state, insert_slot, parameter_owner

log = logging.getLogger(__name__)

__all__ = ["METRIC_FIELDS", "SlotReport", "Trainer", "autocast_dtype", "make_optimizer"]

_DEVICE_METRICS = ("loss", "sds", "orientation", "entropy", "sparsity", "t_mean", "opacity_mean")
_PACK = 28  # floats per slot in the per-step upload, see `_plan`


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def make_optimizer(renderer: Renderer, cfg: RunConfig) -> SlotAdam:
    """Slot-aware Adam with the hash-grid tables on a larger learning rate (Instant-NGP practice).
    Parameter order (rest, then grid) is the one single-prompt checkpoints number them in."""
    grid, rest = [], []
    for name, param in renderer.named_parameters():
        if param.requires_grad:
            (grid if "encoding" in name else rest).append((param, parameter_owner(name)))
    groups = [SlotParamGroup(rest, cfg.train.lr)]
    if grid:
        groups.append(SlotParamGroup(grid, cfg.train.lr * cfg.train.grid_lr_scale))
    return SlotAdam(groups, renderer.num_prompts, betas=cfg.train.betas, eps=cfg.train.eps)


@dataclass
class Slot:
    """One prompt in training: its config (text, seed, iterations, output folder) and progress."""

    cfg: RunConfig
    step: int
    cpu_gen: torch.Generator  # cameras and shading
    dev_gen: torch.Generator  # jitter, background, timesteps, noise
    elapsed_s: float = 0.0
    tag: Any = None  # whatever the caller identifies the prompt by
    phase: str = ""  # of the last step
    shading: str = ""
    polled_step: int = 0
    polled_at: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def iters(self) -> int:
        return self.cfg.train.iters

    @property
    def latent_steps(self) -> int:
        return int(round(self.cfg.train.latent_fraction * self.cfg.train.iters))

    @property
    def done(self) -> bool:
        return self.step >= self.iters


@dataclass
class SlotReport:
    slot: int
    step: int
    finite: bool  # every loss since the slot was assigned was finite
    row: dict[str, Any]  # one metrics.csv row (METRIC_FIELDS)


@dataclass
class _Group:
    """Slots rendered at one size and turned into latents one way (positions start:stop of the order)."""

    phase: str
    size: int
    start: int
    stop: int
    members: list[int]


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        renderer: Renderer,
        guidance: SDSGuidance,
        encoder: ImageEncoder,
        latent_map: LinearLatentMap,
        device: torch.device,
        latent_size: int,
        image_size: int,
        text_shape: tuple[int, int],
        text_dtype: torch.dtype = torch.float32,
        decoder: LatentDecoder | None = None,
    ) -> None:
        """`cfg` holds what all slots share (field, renderer, SDS, optimiser settings); each
        slot's own prompt, seed and iterations come with `assign`. `latent_size` is the UNet's
        latent resolution (64 for SD), `image_size` the VAE's matching image resolution (512);
        the latent phase renders at `latent_size`, the RGB phase at `camera.render_size`,
        resized to `train.encode_size` or `image_size`. `text_shape` is (tokens, width) of one
        text embedding, e.g. (77, 1024). `decoder` is given for image-space SDS in the RGB phase
        (``sds.rgb_mode = image``), where `encoder` then runs without gradient."""
        self.cfg = cfg
        self.renderer = renderer
        self.guidance = guidance
        self.encoder = encoder
        self.decoder = decoder
        if (cfg.sds.rgb_mode == "image") != (decoder is not None):
            raise ValueError(f"sds.rgb_mode={cfg.sds.rgb_mode!r} and the decoder given do not agree")
        self.latent_map = latent_map
        self.device = device
        self.num_slots = k = renderer.num_prompts
        self.latent_size = latent_size
        self.image_size = image_size
        self.encode_size = cfg.train.encode_size or image_size
        self.rgb_latent_size = self.encode_size * latent_size // image_size
        self.latent_channels = int(latent_map.weight.shape[0])
        self.views = VIEWS if cfg.prompt.view_dependent else (NO_VIEW,)
        length, width = text_shape
        self.cond_table = torch.zeros(k * len(self.views), length, width, device=device, dtype=text_dtype)  # [K*V, 77, D]
        self.uncond = torch.zeros(k, length, width, device=device, dtype=text_dtype)  # [K, 77, D]
        self.optimizer = make_optimizer(renderer, cfg)
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        self.scaler = SlotGradScaler(k, device, enabled=self.amp_dtype == torch.float16)
        self.slots: list[Slot | None] = [None] * k
        self._active = torch.zeros(k, dtype=torch.bool, device=device)  # [K]
        self._nonfinite = torch.zeros(k, dtype=torch.bool, device=device)  # [K], sticky
        self._metrics = torch.zeros(k, len(_DEVICE_METRICS), device=device)  # [K, M], last step
        self.phase_override: str | None = None  # "latent"/"rgb" forces every slot's phase (probe, benchmarks)
        self._torch_sampler = renderer.backend_for(device) == "torch"
        self._render = renderer.render
        self._shading_tensor = False
        self._pad_ray = torch.tensor([[0.0, 0.0, 3.0 * renderer.bound], [0.0, 0.0, 1.0]], device=device)  # misses the box
        self._arange: dict[int, torch.Tensor] = {}
        if cfg.train.compile:
            self._compile()
        renderer.train()

    # ------------------------------------------------------------------------------------------
    # slots

    @property
    def active_slots(self) -> list[int]:
        return [k for k, s in enumerate(self.slots) if s is not None]

    def assign(
        self,
        k: int,
        cfg: RunConfig,
        embedding: PromptEmbeddings,
        checkpoint: Checkpoint | None = None,
        tag: Any = None,
        init_state: dict[str, torch.Tensor] | None = None,
        reseed: int | None = None,
    ) -> Slot:
        """Start prompt `cfg` in slot `k`: from its checkpoint, or fresh from ``cfg.train.seed``
        (parameters, occupancy grid, Adam state, loss scale, generators all reset). `reseed`
        re-seeds the generators after loading (a retry that should draw other numbers)."""
        if not 0 <= k < self.num_slots:
            raise ValueError(f"slot {k!r} is not in [0, {self.num_slots})")
        if cfg.train.iters <= 0:
            raise ValueError(f"--iters must be a positive number of iterations, got {cfg.train.iters}")
        v = len(self.views)
        if embedding.cond.shape != (v, *self.cond_table.shape[1:]) or embedding.uncond.shape != self.uncond.shape[1:]:
            raise ValueError(f"text embeddings of {cfg.prompt.text!r} have shapes {tuple(embedding.cond.shape)} and "
                             f"{tuple(embedding.uncond.shape)}, expected {(v, *self.cond_table.shape[1:])}")  # fmt: skip
        target = self.renderer.state_dict()
        seed = int(cfg.train.seed)
        cpu_gen = torch.Generator().manual_seed(seed)
        dev_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        step, elapsed = 0, 0.0
        if checkpoint is None:
            insert_slot(target, k, init_state if init_state is not None else fresh_slot_state(cfg, seed, self.device))
            self.optimizer.reset_slot(k)
            self.scaler.reset_slot(k)
            # Mark the occupancy grid from the initial blob now, so the first step marches the
            # blob rather than the whole box (a full grid costs ~10x the samples and memory).
            self.renderer.update_occupancy([0 if i == k else None for i in range(self.num_slots)])
        else:
            if int(checkpoint.state.get("num_prompts", 1)) != 1:
                raise ValueError(f"a checkpoint of {checkpoint.state.get('num_prompts')} prompts cannot fill one slot")
            try:
                insert_slot(target, k, checkpoint.model)
                if checkpoint.optimizer is not None:
                    self.optimizer.load_slot_state_dict(k, checkpoint.optimizer)
                else:
                    self.optimizer.reset_slot(k)
            except ValueError as exc:
                raise ValueError(f"the checkpoint of {cfg.prompt.text!r} does not fit this run's scene: {exc}") from exc
            self.scaler.load_slot_state_dict(k, checkpoint.state.get("scaler", {}))
            cpu_gen.set_state(checkpoint.rng["cpu_gen"].cpu())
            dev_gen.set_state(checkpoint.rng["dev_gen"].cpu())
            step, elapsed = int(checkpoint.step), float(checkpoint.state.get("elapsed_s", 0.0))
            if self.num_slots == 1 and any(key.startswith("latent_map.") for key in checkpoint.extra):
                self.latent_map.load_state_dict(
                    {key.removeprefix("latent_map."): t for key, t in checkpoint.extra.items() if key.startswith("latent_map.")}
                )
        if reseed is not None:
            cpu_gen.manual_seed(int(reseed))
            dev_gen.manual_seed(int(reseed) + 1)
        self.cond_table[k * v : (k + 1) * v].copy_(embedding.cond)
        self.uncond[k].copy_(embedding.uncond)
        self._active[k] = True
        self._nonfinite[k] = False
        self._metrics[k] = 0.0
        slot = Slot(cfg=cfg, step=step, cpu_gen=cpu_gen, dev_gen=dev_gen, elapsed_s=elapsed, tag=tag, polled_step=step)
        self.slots[k] = slot
        return slot

    def release(self, k: int) -> None:
        """Empty slot `k`; it keeps rendering placeholder rays (static shapes) but never updates."""
        self.slots[k] = None
        self._active[k] = False

    def slot_checkpoint(self, k: int) -> Checkpoint:
        """Slot `k` as a one-prompt checkpoint (the format `generate` writes). Tensors are views
        of the live state: save or copy it before the slot trains on or is refilled."""
        slot = self._slot(k)
        return Checkpoint(
            step=slot.step,
            config=slot.cfg,
            model=extract_slot(self.renderer.state_dict(), k, self.num_slots),
            optimizer=self.optimizer.slot_state_dict(k),
            rng={"cpu_gen": slot.cpu_gen.get_state(), "dev_gen": slot.dev_gen.get_state()},
            extra={f"latent_map.{name}": t for name, t in self.latent_map.state_dict().items()},
            state={"scaler": self.scaler.slot_state_dict(k), "elapsed_s": slot.elapsed_s, "num_prompts": 1},
        )

    def save_slot(self, k: int, out_dir: Path | None = None) -> Path:
        """Write slot `k`'s checkpoint to `out_dir` (default: its ``output.out``)."""
        slot = self._slot(k)
        path = save_checkpoint(self.slot_checkpoint(k), Path(out_dir or slot.cfg.output.out))
        log.debug("checkpoint of %r at step %d: %s", slot.cfg.prompt.text, slot.step, path)
        return path

    def _slot(self, k: int) -> Slot:
        slot = self.slots[k] if 0 <= k < self.num_slots else None
        if slot is None:
            raise ValueError(f"slot {k!r} holds no prompt")
        return slot

    def poll(self) -> list[SlotReport]:
        """Metrics of the last step and finiteness since assignment for every busy slot: one
        device -> host copy. Also advances each slot's wall-clock time."""
        data = torch.cat([self._metrics, self._nonfinite[:, None].float()], dim=1).cpu()
        now = time.perf_counter()
        reports = []
        for k, slot in enumerate(self.slots):
            if slot is None:
                continue
            dt = max(now - slot.polled_at, 1e-9)
            steps = slot.step - slot.polled_step
            slot.elapsed_s += dt
            slot.polled_at, slot.polled_step = now, slot.step
            values = dict(zip(_DEVICE_METRICS, data[k, :-1].tolist()))
            row = {"step": slot.step, "phase": slot.phase, "shading": slot.shading, **values,
                   "it_per_s": round(steps / dt, 3), "elapsed_s": round(slot.elapsed_s, 2)}  # fmt: skip
            reports.append(SlotReport(k, slot.step, not bool(data[k, -1]), row))
        return reports

    # ------------------------------------------------------------------------------------------
    # one step

    def _compile(self) -> None:
        """``train.compile``: the torch renderer whole (static shapes, shading chosen on the
        device so one graph serves every step), or the field query for nerfacc (dynamic sample
        counts). CUDA only."""
        if self.device.type != "cuda":
            log.info("train.compile applies to CUDA; running the renderer eagerly on %s", self.device)
            return
        if self._torch_sampler:
            self._render = torch.compile(self.renderer.render, dynamic=False)
            self._shading_tensor = True
        else:
            field = self.renderer.field
            field.query = torch.compile(field.query, dynamic=True)  # instance attribute over the method
        log.info("train.compile: compiled the %s", "renderer" if self._torch_sampler else "field query")

    def phase(self, slot: Slot) -> str:
        if self.phase_override is not None:
            return self.phase_override
        return "latent" if slot.step < slot.latent_steps else "rgb"

    def _pick_shading(self, slot: Slot) -> str:
        rc = self.cfg.render
        if rc.shading != "random":
            return rc.shading
        u = float(torch.rand((), generator=slot.cpu_gen))
        if slot.step < rc.albedo_iters:
            return "albedo"
        # After the albedo warm-up: textureless with its ratio, otherwise lambertian-shaded albedo.
        return "textureless" if u < rc.textureless_ratio else "lambertian"

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _arange_row(self, n: int) -> torch.Tensor:
        if n not in self._arange:
            self._arange[n] = torch.arange(n, device=self.device)
        return self._arange[n]

    def _host_plan(self) -> dict[str, Any]:
        """Host-side choices of one step for every slot (CPU generators only): phase, render
        size, camera, shading, view, and the groups of slots rendered alike; the numbers the
        device needs are packed into one CPU tensor [K, _PACK]."""
        cfg = self.cfg
        k_all = self.num_slots
        busy = [s for s in self.slots if s is not None]
        idle_phase = self.phase(busy[0]) if busy else "latent"
        phases, cams, shadings = [], [], []
        for slot in self.slots:
            if slot is None:
                phases.append(idle_phase)
                cams.append(orbit_cameras(1, cfg.camera.val_elevation, cfg.camera.val_radius, cfg.camera.val_fovy))
                shadings.append("albedo")
                continue
            phases.append(self.phase(slot))
            cams.append(sample_random_cameras(1, cfg.camera, slot.cpu_gen))
            shadings.append(self._pick_shading(slot))
        size_of = {"latent": self.latent_size, "rgb": cfg.camera.render_size}
        sizes = [size_of[p] for p in phases]
        rays = max(sizes) ** 2
        # Slots grouped by phase, in slot order within a group; `order` lists them group by group.
        groups, order = [], []
        for phase in ("latent", "rgb"):
            members = [k for k in range(k_all) if phases[k] == phase]
            if members:
                groups.append(_Group(phase, size_of[phase], len(order), len(order) + len(members), members))
                order += members
        cam = CameraBatch(**{f.name: torch.cat([getattr(c, f.name) for c in cams]) for f in dataclasses.fields(CameraBatch)})
        views = view_indices(cam.elevation_deg, cam.azimuth_deg, cfg.prompt)
        # One upload: c2w 16 | fovy elev azim radius | light 3 | flat view row | shading | 1/R_k | R_k | order
        pack = torch.empty(k_all, _PACK)
        pack[:, :16] = cam.c2w.reshape(k_all, 16)
        pack[:, 16], pack[:, 17], pack[:, 18], pack[:, 19] = cam.fovy_deg, cam.elevation_deg, cam.azimuth_deg, cam.radius
        pack[:, 20:23] = cam.light_dir
        pack[:, 23] = torch.arange(k_all) * len(self.views) + views
        pack[:, 24] = torch.tensor([float(SHADING_MODES.index(s)) for s in shadings])
        pack[:, 25] = torch.tensor([1.0 / (s * s) for s in sizes], dtype=torch.float32)
        pack[:, 26] = torch.tensor([float(s * s) for s in sizes])
        pack[:, 27] = torch.tensor(order, dtype=torch.float32)
        return {"phases": phases, "shadings": shadings, "sizes": sizes, "rays": rays, "groups": groups, "pack": pack}

    def _plan(self) -> dict[str, Any]:
        """`_host_plan` uploaded in one non-blocking copy, plus each slot's device random draws."""
        cfg, dev = self.cfg, self.device
        plan = self._host_plan()
        plan["pack"] = to_device_async(plan["pack"], dev)
        phases, sizes = plan["phases"], plan["sizes"]
        # Each slot's own device draws, always in this order: jitter, background, t, noise.
        jitter, background, t, noise = [], [], [], []
        s_count = cfg.render.num_samples
        random_bg = self.renderer.background.kind == "random"
        for k, slot in enumerate(self.slots):
            r_k = sizes[k] ** 2
            lat = self.latent_size if phases[k] == "latent" else self.rgb_latent_size
            shape = (1, self.latent_channels, lat, lat)
            if slot is None:
                jitter.append(torch.full((1, r_k, s_count), 0.5, device=dev))
                background.append(torch.full((1, 1, 3), 0.5, device=dev))
                t.append(torch.full((1,), self.guidance.t_range(0.0)[0], dtype=torch.long, device=dev))
                noise.append(torch.zeros(shape, device=dev))
                continue
            g = slot.dev_gen
            if self._torch_sampler:
                jitter.append(torch.rand((1, r_k, s_count), generator=g, device=dev))
            if random_bg:
                background.append(torch.rand((1, 1, 3), generator=g, device=dev))
            lo, hi = self.guidance.t_range(slot.step / slot.iters)
            t.append(torch.randint(lo, hi + 1, (1,), generator=g, device=dev))
            noise.append(torch.randn(shape, generator=g, device=dev))
        plan.update(jitter=jitter if self._torch_sampler else None, background=torch.cat(background) if random_bg else None,
                    t=t, noise=noise)  # fmt: skip
        return plan

    def _rays(self, plan: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Rays [K, R, 3] (slots rendered smaller than R padded with rays that miss the scene),
        the light [K, 3] and the jitter [K, R, S]."""
        pack, k_all, rays = plan["pack"], self.num_slots, plan["rays"]
        cam = CameraBatch(pack[:, :16].reshape(k_all, 4, 4), pack[:, 16], pack[:, 17], pack[:, 18], pack[:, 19], pack[:, 20:23])
        groups = plan["groups"]
        jitter = None
        if len(groups) == 1 and groups[0].size**2 == rays:  # every slot at one size, in slot order
            rays_o, rays_d = get_rays(cam, groups[0].size, groups[0].size)
            if plan["jitter"] is not None:
                jitter = torch.cat(plan["jitter"])
            return rays_o, rays_d, cam.light_dir, jitter
        order = pack[:, 27].long()
        rays_o = self._pad_ray[0].expand(k_all, rays, 3).clone()
        rays_d = self._pad_ray[1].expand(k_all, rays, 3).clone()
        for g in groups:
            idx = order[g.start : g.stop]
            sub = CameraBatch(*(getattr(cam, f.name)[idx] for f in dataclasses.fields(CameraBatch)))
            o, d = get_rays(sub, g.size, g.size)
            rays_o[:, : g.size**2].index_copy_(0, idx, o)
            rays_d[:, : g.size**2].index_copy_(0, idx, d)
        if plan["jitter"] is not None:
            jitter = torch.full((k_all, rays, self.cfg.render.num_samples), 0.5, device=self.device)
            for k, draw in enumerate(plan["jitter"]):
                jitter[k, : draw.shape[1]] = draw[0]
        return rays_o, rays_d, cam.light_dir, jitter

    def _latents(self, rgb: torch.Tensor, plan: dict[str, Any]) -> list[tuple[_Group | None, torch.Tensor]]:
        """Renders [K, R, 3] -> latents per guidance unit: [(group, or None for all K slots in
        slot order, latents [n, C, h, w])]; one unit unless the phases' latent sizes differ."""
        groups, order = plan["groups"], plan["pack"][:, 27].long()
        parts = []
        for g in groups:
            n = g.stop - g.start
            # index_select even for one group: its backward hands the renderer a fresh contiguous
            # gradient, so reductions downstream add in the same order whatever the grouping.
            img = rgb.index_select(0, order[g.start : g.stop])[:, : g.size**2]
            img = img.reshape(n, g.size, g.size, 3).permute(0, 3, 1, 2)  # [n, 3, H, W]
            if g.phase == "latent":
                parts.append(self.latent_map(img))  # [n, C, h, w]: the render is the latent
            elif self.decoder is not None:  # image-space SDS works on the encoder's input
                size = (self.encode_size, self.encode_size)
                parts.append(F.interpolate(img, size=size, mode="bilinear", align_corners=False) * 2.0 - 1.0)
            else:
                parts.append(encode_rgb(img, self.encoder, self.encode_size))  # [n, C, h, w]
        if len(parts) == 1:
            return [(None, parts[0])]
        if parts[0].shape[1:] == parts[1].shape[1:]:
            stacked = torch.cat([p.to(parts[0].dtype) for p in parts])
            out = torch.zeros_like(stacked).index_copy(0, order, stacked)  # back to slot order
            return [(None, out)]
        return list(zip(groups, parts))

    def _sds(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor,
             uncond: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """SDS per prompt with this step's own t [n] and noise [n, C, h, w]: one noise-predictor
        call for all n prompts (2n with classifier-free guidance). Returns the surrogate loss
        [n] whose gradient w.r.t. `latents` is w(t) (eps_hat - eps), value 0.5 ||grad||^2."""
        # One memory layout whatever produced the latents (the VAE may return channels-last, a
        # mix of phases comes back through index_copy): convolutions pick their algorithm by
        # layout, and a prompt's numbers must not depend on which others share the step.
        latents = latents.contiguous()
        g = self.guidance
        if self.decoder is not None and latents.shape[1] == 3:  # images in [-1, 1]: image-space SDS
            w = sds_weight(g.alphas_cumprod.to(latents.device)[t], g.cfg.weighting)  # [n]
            out = image_sds(latents, t, noise, cond, uncond, encoder=self.encoder, predictor=g.predictor,
                            decoder=self.decoder, alphas_cumprod=g.alphas_cumprod, weight=w,
                            guidance_scale=g.cfg.guidance_scale)  # fmt: skip
            return out.per_prompt
        grad, _ = g.grad(latents, t, noise.to(latents.dtype), cond, uncond)
        return sds_surrogate(latents, grad)

    def train_step(self, timer: StageTimer | None = None) -> None:
        """One SDS step for every busy slot (empty slots render placeholders and never update).
        Metrics stay on the device until `poll`; nothing here waits for the host on the torch
        renderer."""
        cfg, dev, k_all = self.cfg, self.device, self.num_slots
        timer = timer or NO_TIMER
        timer.start()
        plan = self._plan()
        rays_o, rays_d, light, jitter = self._rays(plan)
        pack = plan["pack"]
        shadings = plan["shadings"]
        if self._shading_tensor:
            shading: Any = pack[:, 24].long()
        else:
            shading = shadings[0] if len(set(shadings)) == 1 else shadings
        need_normals = cfg.reg.orientation > 0 or any(s != "albedo" for s in shadings)
        timer.mark("plan")
        with self._autocast():
            out = self._render(
                rays_o, rays_d, light, shading=shading, ambient_ratio=cfg.render.ambient_ratio,
                need_normals=need_normals, jitter=jitter, background=plan["background"],
            )  # fmt: skip
            timer.mark("render")
            units = self._latents(out.rgb, plan)
            timer.mark("vae_encode")  # the VAE encoder in the RGB phase, the linear map in the latent phase
            cond = self.cond_table.index_select(0, pack[:, 23].long())  # [K, 77, D], each slot's view
            t_all = torch.cat(plan["t"])  # [K]
            if len(units) == 1:
                sds = self._sds(units[0][1], t_all, torch.cat(plan["noise"]), cond, self.uncond)  # [K]
            else:
                # Latent sizes differ between the phases (train.encode_size): one call per phase.
                sds = torch.zeros(k_all, device=dev)
                order = pack[:, 27].long()
                for g, lat in units:
                    idx = order[g.start : g.stop]
                    noise = torch.cat([plan["noise"][k] for k in g.members])
                    sds = sds.index_copy(0, idx, self._sds(lat, t_all[idx], noise, cond[idx], self.uncond[idx]))
            timer.mark("guidance")
            # Regularisers as per-prompt sums over each slot's own rays (1/R_k weights), so K
            # prompts together get the gradients each would get alone.
            rays = plan["rays"]
            weight = (self._arange_row(rays)[None, :] < pack[:, 26:27]).float() * pack[:, 25:26]  # [K, R]
            opacity = out.opacity.float().clamp(1e-5, 1 - 1e-5)
            entropy = (weight * -(opacity * opacity.log() + (1 - opacity) * (1 - opacity).log())).sum(dim=1)
            sparsity = (weight * opacity).sum(dim=1)
            if out.orientation_rays is not None:
                orientation = (weight * out.orientation_rays.float()).sum(dim=1)
            else:
                orientation = torch.zeros_like(sparsity)
            loss = sds + cfg.reg.orientation * orientation + cfg.reg.entropy * entropy + cfg.reg.sparsity * sparsity  # [K]
        scale = self.scaler.scale()
        objective = (loss * scale).sum() if scale is not None else loss.sum()
        self.optimizer.zero_grad()
        objective.backward()
        timer.mark("backward")
        updated, _ = self.optimizer.step(self._active, self.scaler.inv_scale(), cfg.train.grad_clip)
        self.scaler.update(self._active, updated)
        self.renderer.update_occupancy([s.step if s is not None else None for s in self.slots])
        timer.mark("optimizer")
        with torch.no_grad():
            self._nonfinite |= self._active & ~torch.isfinite(loss)
            self._metrics = torch.stack(
                [loss, sds, orientation, entropy, sparsity, t_all.float(), sparsity], dim=1
            ).detach()  # order of _DEVICE_METRICS
        for k, slot in enumerate(self.slots):
            if slot is not None:
                slot.step += 1
                slot.phase, slot.shading = plan["phases"][k], shadings[k]

    def probe(self, force: bool = False) -> None:
        """Run one RGB-phase and one latent-phase step with every slot busy on a throwaway
        prompt, then empty all slots: reaches the step's peak memory (an out-of-memory error
        surfaces here, before any prompt is touched) and compiles what `train.compile` asks
        for. Only on CUDA unless `force`."""
        if self.device.type != "cuda" and not force:
            return
        state = fresh_slot_state(self.cfg, 0, self.device)
        shape, dtype = self.cond_table.shape, self.cond_table.dtype
        dummy = PromptEmbeddings(
            cond=torch.zeros(len(self.views), *shape[1:], dtype=dtype), uncond=torch.zeros(*shape[1:], dtype=dtype),
            views=self.views, prompt="probe", truncated=False,
        )  # fmt: skip
        probe_cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, iters=2))
        try:
            for k in range(self.num_slots):
                self.assign(k, probe_cfg, dummy, init_state=state)
            for phase in ("rgb", "latent"):
                self.phase_override = phase
                self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            self.phase_override = None
            for k in range(self.num_slots):
                self.release(k)

    # ------------------------------------------------------------------------------------------
    # one prompt, start to finish (generate)

    def fit(self, progress: bool = True) -> None:
        """Train the prompt in slot 0 of a one-slot trainer until its ``train.iters``, writing
        metrics and periodic checkpoints to its ``output.out``.

        A non-finite loss raises FloatingPointError (the last good checkpoint is kept). On
        Ctrl-C a checkpoint of the last finished step is written before the interrupt
        propagates, so ``--resume`` continues from there.
        """
        from tqdm.auto import tqdm

        if self.num_slots != 1:
            raise ValueError(f"fit trains one prompt; this trainer has {self.num_slots} slots (use train.batch)")
        slot = self._slot(0)
        out_dir = Path(slot.cfg.output.out)
        tc = slot.cfg.train
        metrics = MetricsLog(out_dir, slot.step, tensorboard=tc.tensorboard)
        bar = tqdm(total=slot.iters, initial=slot.step, disable=not progress, unit="it", dynamic_ncols=True)
        slot.polled_at, slot.polled_step = time.perf_counter(), slot.step
        try:
            while not slot.done:
                self.train_step()
                bar.update(1)
                log_now = slot.step % tc.log_every == 0 or slot.done
                ckpt_now = tc.ckpt_every > 0 and slot.step % tc.ckpt_every == 0 and not slot.done
                if log_now or ckpt_now:
                    report = self.poll()[0]
                    if not report.finite:
                        raise FloatingPointError(
                            f"loss is {report.row['loss']} at step {slot.step}; last good checkpoint kept"
                        )
                    if log_now:
                        metrics.write(report.row)
                        bar.set_postfix(loss=f"{report.row['loss']:.4g}", phase=report.row["phase"], refresh=False)
                    if ckpt_now:
                        self.save_slot(0)
        except KeyboardInterrupt:
            report = self.poll()[0]
            if report.finite:
                self.save_slot(0)
                log.warning("interrupted at step %d; checkpoint written, continue with --resume", slot.step)
            raise
        finally:
            bar.close()
            metrics.close()
        self.save_slot(0)

