"""The slot table: K prompts in one stacked scene, each filled, checkpointed and emptied alone.

A scene built for K prompts keeps most tensors stacked with a leading dimension K (hash tables,
MLP weights and biases) and a few per-prompt modules in lists (one nerfacc occupancy grid per
prompt). `extract_slot` cuts prompt k out as the state_dict of a one-prompt scene (what a
checkpoint holds, so `render` and `export-mesh` open it), `insert_slot` copies such a state into
slot k, and `fresh_slot_state` is the state a new prompt starts from: a one-prompt scene
initialised from the prompt's seed alone, so a prompt starts identically whichever slot, batch
or command it trains in.

`SlotTable` holds the slots (`Slot`: a prompt's config, step and generators), the per-slot text
embeddings, device-side loss metrics and non-finite flags, and turns a slot into a checkpoint
and back. The trainer (`trainer.py`) adds the step on top.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..cameras import cameras_at
from ..checkpoint import Checkpoint, save_checkpoint
from ..config import RunConfig
from ..guidance.text import NO_VIEW, VIEWS, PromptEmbeddings
from ..sequence import sequence_offset, sequence_point
from ..render.occupancy import upgrade_scene_state
from ..render.renderer import Renderer
from ..scene import build_scene
from .optim import SlotAdam, SlotGradScaler

log = logging.getLogger(__name__)

# Module lists holding one module per prompt (state keys "<list>.<k>.<rest>").
PER_PROMPT_LISTS = ("estimators",)
# Per-slot metrics kept on the device between polls, in this order.
DEVICE_METRICS = ("loss", "sds", "orientation", "entropy", "sparsity", "t_mean", "opacity_mean")


def per_prompt_key(key: str) -> tuple[str, int, str] | None:
    """``"estimators.3.occs"`` -> ``("estimators", 3, "occs")``; None for a stacked tensor's key."""
    for prefix in PER_PROMPT_LISTS:
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1 :].partition(".")
            if index.isdigit():
                return prefix, int(index), rest
    return None


def extract_slot(state: Mapping[str, torch.Tensor], k: int, num_slots: int) -> dict[str, torch.Tensor]:
    """Prompt `k` of a K-prompt scene state -> a one-prompt scene state (views, not copies)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        found = per_prompt_key(key)
        if found is None:
            if value.dim() == 0 or value.shape[0] != num_slots:
                raise ValueError(f"scene tensor '{key}' of shape {tuple(value.shape)} is not stacked over {num_slots} prompts")
            out[key] = value[k : k + 1]
        elif found[1] == k:
            out[f"{found[0]}.0.{found[2]}"] = value
    return out


@torch.no_grad()
def insert_slot(target: Mapping[str, torch.Tensor], k: int, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a one-prompt scene `state` into slot `k` of `target` (a K-prompt scene's
    ``state_dict()``, whose tensors share storage with the scene). Raises ValueError naming
    the first missing, unexpected or mis-shaped tensor."""
    wanted: dict[str, tuple[str, bool]] = {}  # one-prompt key -> (scene key, stacked?)
    for key in target:
        found = per_prompt_key(key)
        if found is None:
            wanted[key] = (key, True)
        elif found[1] == k:
            wanted[f"{found[0]}.0.{found[2]}"] = (key, False)
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"prompt state does not match the scene: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in state.items():
        scene_key, stacked = wanted[key]
        dst = target[scene_key]
        if stacked:  # [1, ...] -> row k
            if tuple(value.shape) != (1, *dst.shape[1:]):
                raise ValueError(f"'{key}' has shape {tuple(value.shape)}, the scene expects {(1, *dst.shape[1:])}")
            dst[k].copy_(value[0])
        else:
            if value.shape != dst.shape:
                raise ValueError(f"'{key}' has shape {tuple(value.shape)}, the scene expects {tuple(dst.shape)}")
            dst.copy_(value)


def fresh_slot_state(cfg: RunConfig, seed: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The initial one-prompt scene state for `seed`: parameters drawn from a CPU generator
    seeded with `seed` (the global RNG is left as it was), occupancy grids fully occupied."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        scene = build_scene(cfg, num_prompts=1, device="cpu" if cfg.field.backend == "torch" else device)
    return scene.state_dict()


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
    sequence_seed: int = 0  # starts the slot's low-discrepancy views and timesteps (camera.sequence, sds.t_sequence)
    sequence_stride: int = 1  # data parallel: rank r of W takes points step * W + r, so the ranks' views interleave
    sequence_phase: int = 0

    def sequence_point(self) -> tuple[float, ...]:
        """This step's (azimuth, elevation, timestep) shares from the slot's low-discrepancy
        sequence (`sequence.py`)."""
        return sequence_point(self.step * self.sequence_stride + self.sequence_phase, sequence_offset(self.sequence_seed))

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
    row: dict[str, Any]  # one metrics.csv row (monitor.METRIC_FIELDS)


class SlotTable:
    """K slots over one stacked scene and its slot-aware optimiser state (see the module docstring)."""

    def __init__(self, cfg: RunConfig, renderer: Renderer, optimizer: SlotAdam, scaler: SlotGradScaler, device: torch.device,
                 text_shape: tuple[int, int], text_dtype: torch.dtype, colour_state: Any = None) -> None:  # fmt: skip
        """`text_shape` is (tokens, width) of one text embedding, e.g. (77, 1024). `colour_state`
        (a module whose state a one-slot run saves and restores with its checkpoints: the fitted
        colour -> latent map) is optional."""
        self.renderer = renderer
        self.optimizer = optimizer
        self.scaler = scaler
        self.device = device
        self.colour_state = colour_state
        self.num_slots = k = renderer.num_prompts
        self.views = VIEWS if cfg.prompt.view_dependent else (NO_VIEW,)
        length, width = text_shape
        self.cond_table = torch.zeros(k * len(self.views), length, width, device=device, dtype=text_dtype)  # [K*V, 77, D]
        self.uncond = torch.zeros(k, length, width, device=device, dtype=text_dtype)  # [K, 77, D]
        self.slots: list[Slot | None] = [None] * k
        self.active = torch.zeros(k, dtype=torch.bool, device=device)  # [K]
        self.nonfinite = torch.zeros(k, dtype=torch.bool, device=device)  # [K], sticky
        self.metrics = torch.zeros(k, len(DEVICE_METRICS), device=device)  # [K, M], last step

    @property
    def active_slots(self) -> list[int]:
        return [k for k, s in enumerate(self.slots) if s is not None]

    def assign(self, k: int, cfg: RunConfig, embedding: PromptEmbeddings, checkpoint: Checkpoint | None = None, tag: Any = None,
               init_state: dict[str, torch.Tensor] | None = None, reseed: int | None = None) -> Slot:  # fmt: skip
        """Start prompt `cfg` in slot `k`: from its checkpoint, or fresh from ``cfg.train.seed``
        (parameters, occupancy grid, Adam state, loss scale, generators all reset). `reseed`
        re-seeds the generators after loading (a retry that should draw other numbers)."""
        if not 0 <= k < self.num_slots:
            raise ValueError(f"slot {k!r} is not in [0, {self.num_slots})")
        if cfg.train.iters <= 0:
            raise ValueError(f"--iters must be a positive number of iterations, got {cfg.train.iters}")
        cameras_at(cfg.camera, 0.0)  # a bad camera.angle_until fails here, before the slot is touched
        v = len(self.views)
        if embedding.cond.shape != (v, *self.cond_table.shape[1:]) or embedding.uncond.shape != self.uncond.shape[1:]:
            raise ValueError(f"text embeddings of {cfg.prompt.text!r} have shapes {tuple(embedding.cond.shape)} and "
                             f"{tuple(embedding.uncond.shape)}, expected {(v, *self.cond_table.shape[1:])}")  # fmt: skip
        target = self.renderer.state_dict()
        seed = int(cfg.train.seed)
        cpu_gen = torch.Generator().manual_seed(seed)
        dev_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        step, elapsed, sequence_seed = 0, 0.0, seed
        if checkpoint is None:
            insert_slot(target, k, init_state if init_state is not None else fresh_slot_state(cfg, seed, self.device))
            self.optimizer.reset_slot(k)
            self.scaler.reset_slot(k)
            # Mark the occupancy grid from the initial blob now, so the first step marches the
            # blob rather than the whole box (a full grid costs ~10x the samples and memory).
            self.renderer.update_occupancy([0 if i == k else None for i in range(self.num_slots)])
        else:
            try:
                insert_slot(target, k, upgrade_scene_state(checkpoint.model, 1, cfg.render.grid_resolution))
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
            sequence_seed = int(checkpoint.state.get("sequence_seed", seed))
            saved = {key.removeprefix("latent_map."): t for key, t in checkpoint.extra.items() if key.startswith("latent_map.")}
            if self.num_slots == 1 and saved and self.colour_state is not None:
                self.colour_state.load_state_dict(saved)
        if reseed is not None:
            cpu_gen.manual_seed(int(reseed))
            dev_gen.manual_seed(int(reseed) + 1)
            sequence_seed = int(reseed)
        self.cond_table[k * v : (k + 1) * v].copy_(embedding.cond)
        self.uncond[k].copy_(embedding.uncond)
        self.active[k] = True
        self.nonfinite[k] = False
        self.metrics[k] = 0.0
        slot = Slot(cfg=cfg, step=step, cpu_gen=cpu_gen, dev_gen=dev_gen, elapsed_s=elapsed, tag=tag, polled_step=step,
                    sequence_seed=sequence_seed)  # fmt: skip
        self.slots[k] = slot
        return slot

    def release(self, k: int) -> None:
        """Empty slot `k`; it keeps rendering placeholder rays (static shapes) but never updates."""
        self.slots[k] = None
        self.active[k] = False

    def slot_checkpoint(self, k: int) -> Checkpoint:
        """Slot `k` as a one-prompt checkpoint. Tensors are views of the live state: save or copy
        it before the slot trains on or is refilled."""
        slot = self._slot(k)
        extra = {} if self.colour_state is None else {f"latent_map.{n}": t for n, t in self.colour_state.state_dict().items()}
        return Checkpoint(
            step=slot.step, config=slot.cfg, model=extract_slot(self.renderer.state_dict(), k, self.num_slots),
            optimizer=self.optimizer.slot_state_dict(k), rng={"cpu_gen": slot.cpu_gen.get_state(), "dev_gen": slot.dev_gen.get_state()},
            extra=extra, state={"scaler": self.scaler.slot_state_dict(k), "elapsed_s": slot.elapsed_s, "num_prompts": 1,
                                "sequence_seed": slot.sequence_seed},
        )  # fmt: skip

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
        data = torch.cat([self.metrics, self.nonfinite[:, None].float()], dim=1).cpu()
        now = time.perf_counter()
        reports = []
        for k, slot in enumerate(self.slots):
            if slot is None:
                continue
            dt = max(now - slot.polled_at, 1e-9)
            steps = slot.step - slot.polled_step
            slot.elapsed_s += dt
            slot.polled_at, slot.polled_step = now, slot.step
            values = dict(zip(DEVICE_METRICS, data[k, :-1].tolist()))
            row = {"step": slot.step, "phase": slot.phase, "shading": slot.shading, **values,
                   "it_per_s": round(steps / dt, 3), "elapsed_s": round(slot.elapsed_s, 2)}  # fmt: skip
            reports.append(SlotReport(k, slot.step, not bool(data[k, -1]), row))
        return reports
