"""One prompt over several GPUs: ranks render different cameras of one scene and step together.

`generate --data-parallel` under torchrun (N processes, one per GPU) trains one prompt with N
times the views per step, the data parallelism DreamFusion's NeMo version lists: each rank
renders its own cameras of the same NeRF, scores them under its own copy of the frozen model,
and every rank applies the same update, computed from the ranks' mean gradient. It is an option;
one process per prompt (`generate` alone, or `batch` with its queue across GPUs) is the default.

How the ranks stay one model (each point is one method of `DataParallel`, called by the
trainer or the driver):

- Same start (`start_slot`, when a prompt enters a slot): every rank builds the scene from the
  prompt's seed or loads the same checkpoint; the ranks compare their parameters (a warning
  names the largest difference) and then take rank 0's whole state: scene with its occupancy
  grids, Adam moments and step counts, loss scales and the fitted colour map.
- Own views (`seed_views`, before each step's plan): rank 0 draws cameras, shading, jitter,
  background, timesteps and noise from the prompt's own generators, exactly as a single
  process does, so its views are the ones a one-GPU run sees. Rank r > 0 draws step s from
  generators seeded with `view_seed` (prompt seed or a retry's reseed, r, s): nothing of
  theirs needs saving, and a resumed run draws on every rank what an uninterrupted one draws.
  With `camera.sequence` or `sds.t_sequence` stratified, the slot's one low-discrepancy sequence
  is shared out instead: rank r takes points s * N + r, so the N views of a step interleave.
- One update (`average`, between backward and the optimiser): every trainable parameter's
  gradient, the step's per-slot non-finite-loss flags and its metrics go into one flat bucket,
  summed over the ranks and divided by N (one all-reduce). Every rank then holds the same mean
  gradient, so everything that decides whether and how a step is applied agrees without further
  talk: the fp16 loss scaler's overflow test (a non-finite gradient on any rank makes the mean
  non-finite on all), gradient clipping (of the mean), the Adam step, and the driver's
  roll-back of a non-finite loss (the flag is any rank's). The t schedule and the latent -> RGB
  switch follow the slot's step, which is the same everywhere. metrics.csv holds the ranks' means.
- Occupancy (`after_step`): nerfacc's grid update samples cells from the global random
  generator, which differs between ranks: after each update rank 0's grids are broadcast.
  Every `check_every` steps and at a prompt's last step the parameters are compared with rank
  0's (one broadcast; logged; a difference is a bug, warned about and repaired from rank 0).
- Same stop (`agree_stop`, the driver's check between steps): a small all-reduce on the CPU
  (its own gloo group, so no GPU synchronisation) tells every rank whether any rank got
  SIGTERM or SIGUSR1, so all stop after the same step and rank 0 writes the one checkpoint;
  the same message carries each rank's place (call site, busy slots, their steps), and ranks
  that went out of step (a job that failed to start on one rank only, say) raise ValueError
  instead of waiting on each other for ever.

Rank 0 alone writes the run folder (checkpoints, metrics, outputs, the folder lock); the others
read it (the checkpoint on `--resume`, so several nodes need a shared filesystem) and write
nothing. Collectives go through a small `Collectives` interface: `TorchCollectives` over
torch.distributed (nccl on CUDA, gloo on the CPU, the group `distributed.init_distributed`
starts), or a stand-in in tests.
"""

from __future__ import annotations

import hashlib
import logging
import signal
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from .distributed import DistEnv, device_for, dist_env, init_distributed

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..render.renderer import Renderer
    from .slots import Slot
    from .trainer import Trainer

log = logging.getLogger(__name__)

__all__ = ["Collectives", "DataParallel", "TorchCollectives", "join", "view_seed"]

# What the stop vote carries, in this order; each place value also goes in negated, so one MAX
# all-reduce gives every field's maximum and minimum.
_SITE_LOOP, _SITE_START = 1, 2  # where a vote was cast: between steps, a prompt entering a slot
_STOP_PRIORITY = {signal.SIGTERM: 1, signal.SIGUSR1: 2}  # several ranks stopped: requeue (USR1) wins


def view_seed(seed: int, rank: int, step: int, stream: int) -> int:
    """The seed of rank `rank`'s draws at `step` of a prompt seeded `seed`; stream 0 seeds the
    host generator (cameras, shading), 1 the device generator (jitter, background, t, noise).
    63 bits of a hash, so no two (seed, rank, step, stream) share a stream in practice."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(rank)}:{int(step)}:{int(stream)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Collectives(Protocol):
    """The collectives data parallelism needs. Tensors are reduced in place."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum over the ranks, on the tensor's device."""

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Rank `src`'s values to every rank."""

    def vote_max(self, tensor: torch.Tensor) -> None:
        """Elementwise maximum over the ranks of a small int64 CPU tensor (no GPU work)."""


class TorchCollectives:
    """`Collectives` over torch.distributed's default group (already joined), plus a gloo group
    of the same ranks for the CPU-side vote (created here: every rank must construct one, at
    the same point)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("data parallelism needs the torch.distributed process group (launch with torchrun)")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._votes = dist.new_group(backend="gloo")

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._dist.broadcast(tensor, src=src)

    def vote_max(self, tensor: torch.Tensor) -> None:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX, group=self._votes)

    def close(self) -> None:
        """Destroy the vote group now, while the interpreter is whole: left to the interpreter's
        exit, a gloo group's threads are torn down in whatever order finalisation runs."""
        if self._votes is not None and self._dist.is_initialized():
            self._dist.destroy_process_group(self._votes)
        self._votes = None


def _as_wire(tensor: torch.Tensor) -> torch.Tensor:
    """A view a collective can carry (bool travels as uint8: gloo has no bool)."""
    return tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor


class DataParallel:
    """The agreement between ranks that train one prompt together (see the module docstring)."""

    def __init__(self, comm: Collectives, check_every: int = 0) -> None:
        """`check_every`: compare the parameters with rank 0's every this many steps of a
        prompt (0: only at its last step)."""
        if comm.world_size < 2:
            raise ValueError(f"data parallelism needs at least 2 ranks, got a world size of {comm.world_size}")
        self.comm = comm
        self.rank = comm.rank
        self.world_size = comm.world_size
        self.check_every = int(check_every)
        self._view_base: dict[int, int] = {}  # id(slot) -> the seed its rank > 0 views derive from

    def close(self) -> None:
        """Release what the collectives hold beyond the default group (before it is destroyed)."""
        close = getattr(self.comm, "close", None)  # test stand-ins hold nothing
        if close is not None:
            close()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- a prompt enters a slot -----------------------------------------------------------------

    @torch.no_grad()
    def start_slot(self, trainer: Trainer, k: int) -> None:
        """After `trainer.assign(k, ...)` on every rank: check the ranks agree, then copy rank
        0's state to all. Rank r > 0's slot `k` then draws its own views (`seed_views`)."""
        self._vote(None, trainer, _SITE_START)
        diff = self._difference_from_main(trainer)
        slot = trainer.slots[k]
        assert slot is not None
        if diff != 0.0:
            log.warning("data parallel: the ranks started %r with different parameters (largest difference %.3g from "
                        "rank 0's); every rank continues from rank 0's", slot.cfg.prompt.text, diff)  # fmt: skip
        self._broadcast_state(trainer)
        # One low-discrepancy sequence shared out over the ranks: rank r takes points step * W + r.
        slot.sequence_stride, slot.sequence_phase = self.world_size, self.rank
        if self.rank > 0:  # the prompt's seed (or a retry's reseed), as this rank's generators hold it
            self._view_base[id(slot)] = int(slot.cpu_gen.initial_seed())
        log.info("data parallel: rank %d of %d trains %r from step %d with rank 0's state%s", self.rank, self.world_size,
                 slot.cfg.prompt.text, slot.step, "" if self.rank == 0 else ", drawing its own views")  # fmt: skip

    def _broadcast_state(self, trainer: Trainer) -> None:
        """Rank 0's scene (parameters and buffers), Adam state, loss scales and colour map to every rank."""
        tensors = list(trainer.renderer.state_dict().values())
        tensors += trainer.optimizer.state_tensors() + trainer.scaler.state_tensors()
        if trainer.colour_state is not None:
            tensors += list(trainer.colour_state.state_dict().values())
        for t in tensors:
            if t.is_contiguous():
                self.comm.broadcast(_as_wire(t), src=0)
            else:
                buf = t.contiguous()
                self.comm.broadcast(_as_wire(buf), src=0)
                t.copy_(buf)

    def _difference_from_main(self, trainer: Trainer) -> float:
        """Largest |parameter - rank 0's| over every trainable parameter and every rank (0.0:
        identical). One broadcast of the flattened parameters and one sum; reads the device."""
        params = _params(trainer)
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        ref = flat.clone()
        self.comm.broadcast(ref, src=0)
        diff = (flat - ref).abs().max().reshape(1)
        self.comm.all_reduce_sum(diff)
        return float(diff)

    # -- each step --------------------------------------------------------------------------------

    def seed_views(self, slots: Sequence[Slot | None]) -> None:
        """Before a step's plan: on rank r > 0, seed each busy slot's generators for this step."""
        if self.rank == 0:
            return
        for slot in slots:
            if slot is None:
                continue
            base = self._view_base.get(id(slot), int(slot.cfg.train.seed))
            slot.cpu_gen.manual_seed(view_seed(base, self.rank, slot.step, 0))
            slot.dev_gen.manual_seed(view_seed(base, self.rank, slot.step, 1))

    @torch.no_grad()
    def average(self, params: Sequence[torch.Tensor], flags: torch.Tensor, metrics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Between backward and the optimiser: replace every parameter's gradient by the ranks'
        mean (a parameter without a gradient here counts as zero), in one all-reduce that also
        carries the step's flags ([K] bool, True: a non-finite loss) and metrics ([K, M]).
        Returns (flags set on any rank [K] bool, the ranks' mean metrics [K, M]). Stays on the
        device: nothing here waits for the host."""
        if not params:
            raise ValueError("data parallel: no parameters to average")
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
        pieces += [flags.reshape(-1).to(dtype), metrics.reshape(-1).to(dtype)]
        bucket = torch.cat(pieces)
        self.comm.all_reduce_sum(bucket)
        bucket.div_(self.world_size)
        sizes = [p.numel() for p in params] + [flags.numel(), metrics.numel()]
        chunks = bucket.split(sizes)
        for p, chunk in zip(params, chunks):
            p.grad = chunk.view(p.shape).to(p.dtype)  # a view of the bucket when the dtype matches
        agreed = chunks[-2].view(flags.shape) > 0
        mean_metrics = chunks[-1].view(metrics.shape).to(metrics.dtype)
        return agreed, mean_metrics

    @torch.no_grad()
    def after_step(self, trainer: Trainer, steps: Sequence[int | None]) -> None:
        """After a step whose occupancy update ran with `steps` (each slot's step before the
        step, None for empty slots): broadcast the grids nerfacc updated, and compare the
        parameters with rank 0's when a slot reached a multiple of `check_every` or its end."""
        renderer = trainer.renderer
        if renderer.training and renderer.backend_for(trainer.device) == "nerfacc":
            every = max(renderer.cfg.grid_update_every, 1)
            for i, step in enumerate(steps):
                grid_step = renderer.grid_refresh_step(step)
                if grid_step is not None and grid_step % every == 0:  # the steps nerfacc's update_every_n_steps updates on
                    broadcast_grid(self.comm, renderer, i)
        slots = [s for s in trainer.slots if s is not None]
        if any(s.done or (self.check_every > 0 and s.step % self.check_every == 0) for s in slots):
            diff = self._difference_from_main(trainer)
            where = ", ".join(f"{s.cfg.prompt.text!r} at step {s.step}" for s in slots)
            if diff == 0.0:
                log.info("data parallel: the parameters of all %d ranks are identical (%s)", self.world_size, where)
            else:
                log.warning("data parallel: the ranks' parameters differ by up to %.3g (%s); every rank continues from "
                            "rank 0's", diff, where)  # fmt: skip
                self._broadcast_state(trainer)

    # -- between steps ------------------------------------------------------------------------------

    def agree_stop(self, local: int | None, trainer: Trainer | None) -> int | None:
        """The driver's stop check, as one decision for all ranks: the stop signal any rank
        received (SIGUSR1 over SIGTERM), or None. ValueError when the ranks are not at the same
        place of the same prompts (one of them dropped a job the others still train)."""
        return self._vote(local, trainer, _SITE_LOOP)

    def _vote(self, local: int | None, trainer: Trainer | None, site: int) -> int | None:
        busy = [s for s in trainer.slots if s is not None] if trainer is not None else []
        steps = sum(s.step for s in busy)
        code = 0 if local is None else _STOP_PRIORITY.get(local, 1) * 1000 + int(local)
        vote = torch.tensor([code, site, -site, len(busy), -len(busy), steps, -steps], dtype=torch.int64)
        self.comm.vote_max(vote)
        top, low = vote[1::2].tolist(), (-vote[2::2]).tolist()
        if top != low:
            here = f"rank {self.rank}: {'between steps' if site == _SITE_LOOP else 'starting a prompt'}, {len(busy)} prompt(s) at step(s) {steps}"
            raise ValueError(f"data parallel: the ranks are out of step ({here}; another rank is elsewhere): a job failed "
                             "or finished on some ranks only (see the first error above)")  # fmt: skip
        stop = int(vote[0])
        return None if stop == 0 else stop % 1000


def broadcast_grid(comm: Collectives, renderer: Renderer, prompt: int) -> None:
    """Rank 0's occupancy grid of `prompt` (``occs``, ``binaries``) to every rank."""
    for t in renderer.estimators[prompt].state_dict().values():
        comm.broadcast(_as_wire(t), src=0)


def _params(trainer: Trainer) -> list[torch.Tensor]:
    """The trainable parameters, in the optimiser's order (the same on every rank)."""
    return [p for g in trainer.optimizer.groups for p in g.params]


def join(cfg: RunConfig, env: DistEnv | None = None) -> DataParallel | None:
    """`generate --data-parallel`: join the launcher's process group (nccl on CUDA, gloo on the
    CPU) and return this rank's `DataParallel`; None, with a log line, for one process
    (nothing to share: the flag changes nothing). On CUDA each rank takes ``cuda:LOCAL_RANK``
    as its current device, which ``train.device`` auto and cuda then mean; ValueError for a
    device naming one GPU for every rank."""
    env = dist_env() if env is None else env
    if not env.is_distributed:
        log.info("--data-parallel: one process (world size 1, no torchrun): nothing to share, training as without it")
        return None
    device = device_for(env)
    name = cfg.train.device
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device {name!r} with --data-parallel under torchrun would put all {env.world_size} ranks on one "
                         "device: use --device auto (each rank takes cuda:LOCAL_RANK)")  # fmt: skip
    if name == "cpu":
        device = torch.device("cpu")
    init_distributed(env, device)
    dp = DataParallel(TorchCollectives(), check_every=cfg.train.ckpt_every)
    log.info("data parallel: rank %d of %d on %s (%s): %d views of %r per step", dp.rank, dp.world_size, device, env.host,
             dp.world_size, cfg.prompt.text)  # fmt: skip
    return dp

