"""One SDS step for K prompts at once: plan, render, guidance, regularisers, optimiser.

`Trainer` is a `SlotTable` (K prompt slots over one stacked scene, slot-aware Adam and loss
scaling, the text-embedding table) plus the step. Each slot trains as if it were alone: its own
generators, schedule (iterations, latent -> RGB switch, t annealing by its own progress, so one
step may mix latent-phase and RGB-phase prompts), per-prompt regulariser sums, gradient
clipping, loss scale and Adam state. K prompts trained together therefore reach the parameters
each would reach alone (to float rounding).

The step never waits for the host on the torch renderer: the plan goes up in one pinned,
non-blocking copy, losses and a sticky [K] non-finite flag stay on the device, and `poll` reads
them in one copy when the caller wants metrics. The nerfacc renderer reads its sample counts
back (one synchronisation per step). The trainer never asks how a render becomes what the noise
predictor scores: the guidance object it was given turns renders into per-prompt losses.

With `step_sync` (`data_parallel.DataParallel`, `generate --data-parallel` under torchrun) the
step has three more seams: rank r > 0 seeds its own views before the plan, the gradients are
replaced by the ranks' mean between backward and the optimiser, and rank 0's occupancy grids
are copied after the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..config import RunConfig
from ..field.nerf import coarse_to_fine_weights
from ..guidance.sds import RenderPart, SDSGuidance
from ..guidance.text import PromptEmbeddings
from ..render.renderer import Renderer
from . import plan as step_plan
from . import regularizers as reg
from .monitor import NO_TIMER, StageTimer
from .optim import SlotAdam, SlotGradScaler, SlotParamGroup
from .slots import Slot, SlotTable, fresh_slot_state
from .step_graph import StepGraphs

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from .data_parallel import DataParallel

log = logging.getLogger(__name__)

__all__ = ["Trainer", "autocast_dtype", "make_optimizer"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def make_optimizer(renderer: Renderer, cfg: RunConfig) -> SlotAdam:
    """Slot-aware Adam with the hash-grid tables on a larger learning rate (Instant-NGP practice).
    Parameter order (rest, then grid) is the one checkpoints number them in. The update is
    compiled where ``train.compile_optimizer`` says (auto: on CUDA)."""
    grid, rest = [], []
    for name, param in renderer.named_parameters():
        if param.requires_grad:
            (grid if "encoding" in name else rest).append(param)
    groups = [SlotParamGroup(rest, cfg.train.lr)]
    if grid:
        groups.append(SlotParamGroup(grid, cfg.train.lr * cfg.train.grid_lr_scale))
    device = next(renderer.parameters()).device
    compiled = cfg.train.compile_optimizer == "on" or (cfg.train.compile_optimizer == "auto" and device.type == "cuda")
    return SlotAdam(groups, renderer.num_prompts, betas=cfg.train.betas, eps=cfg.train.eps, compiled=compiled)


def compiled_or_eager(compiled: Callable[..., Any], eager: Callable[..., Any], what: str) -> Callable[..., Any]:
    """`compiled`, or `eager` for good once the compiler fails on it (one warning): a compile of the
    nerfacc field query (dynamic sample counts) trips an Inductor bug on torch 2.11 (H200,
    2026-12-01), and an optional speed-up must not stop a run. A failure raises before anything
    runs, so the eager call that replaces it starts clean."""
    failed = False

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        if not failed:
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as exc:
                failed = True
                log.warning("train.compile: %s did not compile (%s); running it eagerly",
                            what, str(exc).strip().splitlines()[0][:200])  # fmt: skip
        return eager(*args, **kwargs)

    return run


class Trainer(SlotTable):
    def __init__(self, cfg: RunConfig, renderer: Renderer, guidance: SDSGuidance, device: torch.device,
                 text_shape: tuple[int, int], text_dtype: torch.dtype = torch.float32, colour_state: Any = None,
                 step_graph: bool = False) -> None:  # fmt: skip
        """`cfg` holds what all slots share (field, renderer, SDS, optimiser settings); each
        slot's own prompt, seed and iterations come with `assign`. `guidance` has one render
        strategy per phase; each phase renders at its strategy's `render_size`. `step_graph`
        (see `step_graph_choice`) replays each step shape as a CUDA graph; it renders with the
        torch sampler and chooses the shading on the device."""
        amp = autocast_dtype(cfg.train.precision, device)
        k = renderer.num_prompts
        super().__init__(cfg, renderer, make_optimizer(renderer, cfg), SlotGradScaler(k, device, enabled=amp == torch.float16),
                         device, text_shape, text_dtype, colour_state)  # fmt: skip
        self.cfg = cfg
        self.guidance = guidance
        self.amp_dtype = amp
        self.phase_override: str | None = None  # "latent"/"rgb" forces every slot's phase (probe, benchmarks)
        self.step_sync: DataParallel | None = None  # ranks training the same prompts together (data_parallel.py)
        self.step_graphs: StepGraphs | None = None
        if step_graph:
            if renderer.cfg.backend == "nerfacc":
                raise ValueError("a step graph needs the torch sampler's static shapes, not render.backend nerfacc")
            renderer.sampler = "torch"
            self.step_graphs = StepGraphs()
        self._torch_sampler = renderer.backend_for(device) == "torch"
        self._render = renderer.render
        self._shading_tensor = step_graph  # one graph for every shading
        self._pad_ray = torch.tensor([[0.0, 0.0, 3.0 * renderer.bound], [0.0, 0.0, 1.0]], device=device)  # misses the box
        self._arange: dict[int, torch.Tensor] = {}
        if cfg.train.compile:
            self._compile()
        renderer.train()

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
            # instance attribute over the method
            field.query = compiled_or_eager(torch.compile(field.query, dynamic=True), field.query, "the field query")
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

    def assign(self, k: int, cfg: RunConfig, embedding: PromptEmbeddings, checkpoint: Checkpoint | None = None, tag: Any = None,
               init_state: dict[str, torch.Tensor] | None = None, reseed: int | None = None) -> Slot:  # fmt: skip
        """`SlotTable.assign`; with `step_sync`, every rank then takes rank 0's state."""
        slot = super().assign(k, cfg, embedding, checkpoint=checkpoint, tag=tag, init_state=init_state, reseed=reseed)
        if self.step_sync is not None:
            self.step_sync.start_slot(self, k)
        return slot

    def plan(self) -> step_plan.StepPlan:
        """This step's plan for every slot (host choices, one upload, the slots' device draws)."""
        g = self.guidance
        if self.step_sync is not None:  # rank r > 0 draws its own views of this step
            self.step_sync.seed_views(self.slots)
        host = step_plan.host_plan(self.slots, self.cfg, self.phase, self._pick_shading,
                                   {p: s.render_size for p, s in g.inputs.items()}, len(self.views))  # fmt: skip
        return step_plan.device_plan(
            host, self.slots, self.device, self.cfg.render.num_samples, jitter=self._torch_sampler,
            random_background=self.renderer.background.kind == "random",
            noise_shape={p: s.latent_shape for p, s in g.inputs.items()}, sample_t=g.sample_t, placeholder_t=g.t_range(0.0)[0],
            t_sequence=self.cfg.sds.t_sequence,
        )  # fmt: skip

    def train_step(self, timer: StageTimer | None = None) -> None:
        """One SDS step for every busy slot (empty slots render placeholders and never update).
        With step graphs, the device side of the step (`_device_step`) is a replayed CUDA
        graph of the plan's shape; its timer stage is then "graph"."""
        cfg, timer = self.cfg, timer or NO_TIMER
        timer.start()
        plan = self.plan()
        if cfg.field.coarse_to_fine > 0:
            self.renderer.field.set_level_weights(self._level_weights())
        if cfg.field.blob_fade > 0:
            self.renderer.field.set_blob_scales(self._blob_scales())
        if cfg.field.albedo_noise > 0 and cfg.field.albedo_noise_fade > 0:
            self.renderer.field.set_albedo_noise_scales(self._fade_scales(cfg.field.albedo_noise_fade))
        timer.mark("plan")
        if self.step_graphs is not None and self.step_sync is None:
            tensors = step_plan.plan_tensors(plan)
            nonfinite, metrics = self.step_graphs.run(self._graph_key(plan, tensors), tensors,
                                                      lambda xs: self._device_step(step_plan.with_tensors(plan, xs), NO_TIMER))  # fmt: skip
            timer.mark("graph")
        else:
            nonfinite, metrics = self._device_step(plan, timer)
        steps = [s.step if s is not None else None for s in self.slots]
        self.renderer.update_occupancy(steps)
        timer.mark("optimizer")
        self.nonfinite |= nonfinite
        self.metrics = metrics
        for k, slot in enumerate(self.slots):
            if slot is not None:
                slot.step += 1
                slot.phase, slot.shading = plan.phases[k], plan.shadings[k]
        if self.step_sync is not None:  # rank 0's occupancy grids; now and then, a check that the ranks agree
            self.step_sync.after_step(self, steps)

    def _device_step(self, plan: step_plan.StepPlan, timer: StageTimer) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's device work for a plan: render, guidance, regularisers, backward, Adam and
        the loss scales. Returns the new non-finite flags [K] and the metrics [K, M]. Reads the
        host only through the plan's host side (the step graph's key), so a CUDA graph of it
        replays any plan of that key."""
        cfg = self.cfg
        rays_o, rays_d, jitter = step_plan.plan_rays(plan, self._pad_ray, cfg.render.num_samples)
        if self._shading_tensor:
            shading: Any = plan.shading
        else:
            shading = plan.shadings[0] if len(set(plan.shadings)) == 1 else plan.shadings
        need_normals = self._need_normals(plan)
        with self._autocast():
            out = self._render(rays_o, rays_d, plan.cameras.light_dir, shading=shading, ambient_ratio=cfg.render.ambient_ratio,
                               need_normals=need_normals, jitter=jitter, background=plan.background,
                               geometry_grad=self.guidance.geometry_grad(plan.t))  # fmt: skip
            timer.mark("render")
            parts = self._parts(out.rgb, plan)
            timer.mark("vae_encode")  # the images part of the render -> model input (inside guidance)
            cond = self.cond_table.index_select(0, plan.view_row)  # [K, 77, D], each slot's view
            sds = self.guidance(parts, plan.t, plan.noise, cond, self.uncond)  # [K]
            timer.mark("guidance")
            weight = reg.ray_weights(self._arange_row(plan.rays), plan.ray_count, plan.inv_ray_count)  # [K, R]
            entropy = reg.opacity_entropy(out.opacity, weight)
            sparsity = reg.opacity_sparsity(out.opacity, weight)
            orientation = reg.orientation(out.orientation_rays, weight)
            loss = sds + cfg.reg.orientation * orientation + cfg.reg.entropy * entropy + cfg.reg.sparsity * sparsity  # [K]
        scale = self.scaler.scale()
        objective = (loss * scale).sum() if scale is not None else loss.sum()
        self.optimizer.zero_grad()
        objective.backward()
        timer.mark("backward")
        with torch.no_grad():
            nonfinite = self.active & ~torch.isfinite(loss)
            metrics = torch.stack([loss, sds, orientation, entropy, sparsity, plan.t.float(), sparsity], dim=1).detach()
        if self.step_sync is not None:  # data parallel: the ranks' mean gradient and metrics, any rank's flags
            nonfinite, metrics = self.step_sync.average([p for g in self.optimizer.groups for p in g.params], nonfinite, metrics)
            timer.mark("grad_sync")
        updated, _ = self.optimizer.step(self.active, self.scaler.inv_scale(), cfg.train.grad_clip)
        self.scaler.update(self.active, updated)
        return nonfinite, metrics

    def _need_normals(self, plan: step_plan.StepPlan) -> bool:
        return self.cfg.reg.orientation > 0 or any(s != "albedo" for s in plan.shadings)

    def _graph_key(self, plan: step_plan.StepPlan, tensors: list[torch.Tensor]) -> tuple:
        """What shapes a step's device work besides its plan's `tensors`: the phases and render
        groups, the render strategy of each group (benchmarks swap them), the need for normals
        and the tensors' shapes and dtypes."""
        groups = tuple((g.phase, g.size, g.start, g.stop, tuple(g.members), id(self.guidance.inputs[g.phase])) for g in plan.groups)
        shading = None if self._shading_tensor else tuple(plan.shadings)
        shapes = tuple((tuple(x.shape), x.dtype) for x in tensors)
        return (tuple(plan.phases), groups, plan.rays, self._need_normals(plan), shading, shapes)

    def _fade_scales(self, share: float) -> list[float]:
        """Per slot, what is left this step of something that fades over `share` (> 0) of its
        iterations: falling linearly to nothing at the step after that share (so with a share
        of 1 its last step, and its outputs, see none). Empty slots: all of it, what a fresh
        prompt starts from."""
        return [1.0 if slot is None else max(0.0, 1.0 - (slot.step + 1) / (share * slot.iters)) for slot in self.slots]

    def _blob_scales(self) -> list[float]:
        """Per slot, the share of the density blob left this step (field.blob_fade)."""
        return self._fade_scales(self.cfg.field.blob_fade)

    def _level_weights(self) -> list[tuple[float, ...] | None]:
        """Per slot, its hash-grid levels' weights this step (field.coarse_to_fine): the ramp
        ends at the step after the configured share of the slot's iterations, so its last steps,
        and its outputs, see every level. Empty slots: all levels."""
        fc = self.cfg.field
        return [None if slot is None else coarse_to_fine_weights(fc.num_levels, fc.coarse_levels,
                                                                 (slot.step + 1) / (fc.coarse_to_fine * slot.iters))
                for slot in self.slots]  # fmt: skip

    def _parts(self, rgb: torch.Tensor, plan: step_plan.StepPlan) -> list[RenderPart]:
        """Renders [K, R, 3] -> one image batch [n, 3, H, W] per render group."""
        parts = []
        for g in plan.groups:
            idx = plan.order[g.start : g.stop]
            # index_select even for one group: its backward hands the renderer a fresh contiguous
            # gradient, so reductions downstream add in the same order whatever the grouping.
            img = rgb.index_select(0, idx)[:, : g.size**2]
            parts.append(RenderPart(g.phase, img.reshape(len(g.members), g.size, g.size, 3).permute(0, 3, 1, 2), idx, g.members))
        return parts

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # A CUDA graph must not keep casts cached outside its capture; the eager steps of a
        # graphed trainer cast the same way, so both compute the same numbers.
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=self.step_graphs is None)

    def _arange_row(self, n: int) -> torch.Tensor:
        if n not in self._arange:
            self._arange[n] = torch.arange(n, device=self.device)
        return self._arange[n]

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
            seconds = {}
            for phase in ("rgb", "latent"):
                start = time.perf_counter()
                self.phase_override = phase
                self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds[phase] = time.perf_counter() - start
            log.info("probe: the first RGB-phase step took %.1f s, the first latent-phase step %.1f s (first calls: kernels "
                     "loaded or compiled)", seconds["rgb"], seconds["latent"])  # fmt: skip
        finally:
            self.phase_override = None
            for k in range(self.num_slots):
                self.release(k)
