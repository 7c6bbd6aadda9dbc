"""Per-prompt optimizer state for K stacked NeRFs: a slot-aware Adam and per-slot loss scaling.

K prompts train in one set of stacked tensors, but each prompt ("slot") must behave as if it
were optimised alone: its own Adam moments and step count (bias correction), its own gradient
clipping, its own fp16 loss scale, and a non-finite gradient in one slot must not skip or
poison the others' updates. A finished slot is refilled with a new prompt by resetting its rows.

Every parameter is stacked: its leading dimension is K and row k belongs to slot k (hash
tables ``[K, L, T, F]``, MLP weights ``[K, in, out]``, biases ``[K, 1, out]``).

Per-slot quantities (step count, loss scale, masks) are ``[K]`` tensors on the parameters'
device and every update is a masked tensor expression, so nothing here synchronises with the host.
A slot exports and imports its state in `torch.optim.Adam`'s state_dict layout for a one-prompt
scene, which is what a single-prompt checkpoint holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

@dataclass
class SlotParamGroup:
    params: list[torch.Tensor]  # stacked over the K slots
    lr: float


def _view(values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A per-slot ``[K]`` tensor shaped ``[K, 1, ...]`` to broadcast against a stacked `param`."""
    return values.view(-1, *([1] * (param.dim() - 1)))


def slot_adam_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    lrs: tuple[float, ...],
    step_count: torch.Tensor,
    active: torch.Tensor,
    inv_scale: torch.Tensor | None,
    max_grad_norm: float,
    betas: tuple[float, float],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`SlotAdam.step` on the parameters that have gradients: updates `params`, `grads` (unscaled,
    masked, clipped), the moments and `step_count` in place; returns (updated [K] bool, grad
    norm [K]). A pure tensor function without host reads, so `torch.compile` can fuse it."""
    k = step_count.shape[0]
    sq = torch.zeros(k, dtype=torch.float32, device=step_count.device)
    for g in grads:
        if inv_scale is not None:
            g.mul_(_view(inv_scale, g).to(g.dtype))
        # a reduction per slot, without a gradient-sized temporary
        sq = sq + torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float32).square()
    norm = sq.sqrt()  # [K]; inf or nan where some gradient is not finite
    finite = torch.isfinite(norm)
    update = active & finite
    upd = update.float()
    clip = None
    if max_grad_norm > 0:  # clip_grad_norm_'s rule per slot; 1 where the norm is not finite
        clip = torch.where(finite, (max_grad_norm / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
    step_count.add_(upd)
    b1, b2 = betas
    steps = step_count.double()
    bc1 = 1.0 - torch.pow(b1, steps)
    bc2_sqrt = (1.0 - torch.pow(b2, steps)).sqrt()
    # Slots that do not update keep m and v (weights 1 and 0) and move by exactly 0.
    keep1 = torch.where(update, torch.full_like(upd, b1), torch.ones_like(upd))
    keep2 = torch.where(update, torch.full_like(upd, b2), torch.ones_like(upd))
    bc1 = torch.where(update, bc1, torch.ones_like(bc1))
    bc2_sqrt = torch.where(update, bc2_sqrt, torch.ones_like(bc2_sqrt)).float()
    neg_step: dict[float, torch.Tensor] = {}
    for p, lr, g, m, v in zip(params, lrs, grads, exp_avg, exp_avg_sq):
        # A skipped slot's (possibly non-finite) gradient becomes 0, so 0 * g cannot be nan.
        g.masked_fill_(~_view(update, g), 0.0)
        if clip is not None:
            g.mul_(_view(clip, g).to(g.dtype))
        m.lerp_(g, _view(1.0 - keep1, m).to(m.dtype))
        v.mul_(_view(keep2, v).to(v.dtype)).add_(g.square().mul_(_view(1.0 - keep2, v).to(v.dtype)))
        if lr not in neg_step:
            neg_step[lr] = torch.where(update, -lr / bc1, torch.zeros_like(bc1)).float()
        denom = (v.sqrt() / _view(bc2_sqrt, v)).add_(eps)
        p.addcdiv_(m * _view(neg_step[lr], m).to(m.dtype), denom)
    return update, norm


class SlotAdam:
    """Adam (Kingma & Ba) with per-slot state; `step` applies it to the slots in `active`.

    ``step(active [K] bool, inv_scale [K] or None, max_grad_norm) -> (updated [K] bool,
    grad_norm [K])``: gradients are unscaled by `inv_scale`, a slot whose gradients are not all
    finite is skipped (its state is untouched), the others are clipped to `max_grad_norm`
    (when > 0, over all of the slot's parameters, as `clip_grad_norm_` does for one model) and
    updated with their own bias correction.
    """

    def __init__(
        self,
        groups: Sequence[SlotParamGroup],
        num_slots: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        compiled: bool = False,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots!r}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Adam betas must be in [0, 1), got {betas!r}")
        if eps < 0:
            raise ValueError(f"Adam eps must be >= 0, got {eps!r}")
        self.groups = list(groups)
        self.num_slots = num_slots
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        params = [p for g in self.groups for p in g.params]
        if not params:
            raise ValueError("SlotAdam got no parameters")
        device = params[0].device
        for p in params:
            if p.dim() == 0 or p.shape[0] != num_slots:
                raise ValueError(f"a stacked parameter must have a leading dimension of {num_slots}, got {tuple(p.shape)}")
        self.device = device
        self.step_count = torch.zeros(num_slots, dtype=torch.float32, device=device)  # [K]
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self._flat: list[tuple[torch.Tensor, float]] = [(p, g.lr) for g in self.groups for p in g.params]
        # `compiled`: the same update through torch.compile (a few fused kernels instead of ~15
        # launches per parameter; static shapes, so it compiles once). The eager function is its twin.
        self.compiled = bool(compiled)
        self._compiled = torch.compile(slot_adam_update, dynamic=False) if compiled else None

    # -- the update -------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for p, _ in self._flat:
            p.grad = None

    @torch.no_grad()
    def step(
        self,
        active: torch.Tensor,
        inv_scale: torch.Tensor | None = None,
        max_grad_norm: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the slots in `active` ([K] bool); see the class docstring."""
        present = tuple(i for i, (p, _) in enumerate(self._flat) if p.grad is not None)
        fn = self._compiled if self._compiled is not None else slot_adam_update
        return fn(
            [self._flat[i][0] for i in present], [self._flat[i][0].grad for i in present],  # type: ignore[misc]
            [self.exp_avg[i] for i in present], [self.exp_avg_sq[i] for i in present], tuple(self._flat[i][1] for i in present),
            self.step_count, active, inv_scale, float(max_grad_norm), self.betas, self.eps,
        )  # fmt: skip

    # -- per-slot state -----------------------------------------------------------------------------

    @torch.no_grad()
    def reset_slot(self, k: int) -> None:
        """Fresh Adam state for slot `k` (its prompt was replaced)."""
        self._check_slot(k)
        self.step_count[k] = 0.0
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m[k].zero_()
            v[k].zero_()

    def slot_state_dict(self, k: int) -> dict[str, Any]:
        """Slot `k`'s state as `torch.optim.Adam.state_dict()` of a one-prompt scene: parameters
        are numbered in this optimizer's order and every tensor keeps a leading dimension of 1.
        Tensors are views (copy before changing this slot)."""
        self._check_slot(k)
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups = []
        n = 0
        for g in self.groups:
            ids = []
            for _ in g.params:
                sl = slice(k, k + 1)
                state[n] = {"step": self.step_count[k].clone(), "exp_avg": self.exp_avg[n][sl], "exp_avg_sq": self.exp_avg_sq[n][sl]}
                ids.append(n)
                n += 1
            groups.append({"lr": g.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": 0.0,
                           "amsgrad": False, "params": ids})  # fmt: skip
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_slot_state_dict(self, k: int, state_dict: dict[str, Any]) -> None:
        """Load a one-prompt Adam state (as written by `slot_state_dict`, or by
        `torch.optim.Adam` for the same parameters in the same order) into slot `k`."""
        self._check_slot(k)
        state = {int(i): s for i, s in state_dict.get("state", {}).items()}
        n_params = sum(len(g["params"]) for g in state_dict.get("param_groups", []))
        if n_params != len(self._flat):
            raise ValueError(f"optimizer state holds {n_params} parameters, a slot of this scene has {len(self._flat)}")
        self.reset_slot(k)
        steps = []
        for n in range(len(self._flat)):
            s = state.get(n)
            if not s:
                continue  # a parameter that never got a gradient
            for name, buf in (("exp_avg", self.exp_avg[n]), ("exp_avg_sq", self.exp_avg_sq[n])):
                src = s[name].to(buf.device, buf.dtype)
                dst = buf[k]
                want = tuple(dst.shape)
                if tuple(src.shape) == (1, *want):
                    src = src[0]
                if tuple(src.shape) != want:
                    raise ValueError(f"optimizer state '{name}' of parameter {n} has shape {tuple(src.shape)}, expected {want}")
                dst.copy_(src)
            steps.append(torch.as_tensor(s["step"], dtype=torch.float32).reshape(()))
        if steps:
            self.step_count[k] = steps[0].to(self.device)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every state tensor of every slot (step counts, then moments), the live tensors: what
        ranks training one prompt together copy from rank 0 (`data_parallel.py`)."""
        return [self.step_count, *self.exp_avg, *self.exp_avg_sq]

    def _check_slot(self, k: int) -> None:
        if not 0 <= k < self.num_slots:
            raise ValueError(f"slot {k!r} is not in [0, {self.num_slots})")


class SlotGradScaler:
    """Dynamic fp16 loss scaling with one scale per slot (`torch.amp.GradScaler`'s rule, per
    slot): a slot whose gradients overflowed halves its scale and skips the step; after
    `growth_interval` clean steps its scale doubles. Disabled: ``scale()`` is None."""

    def __init__(
        self,
        num_slots: int,
        device: torch.device,
        enabled: bool,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.enabled = enabled
        self.init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self._scale = torch.full((num_slots,), self.init_scale, dtype=torch.float32, device=device)  # [K]
        self._tracker = torch.zeros(num_slots, dtype=torch.int32, device=device)  # [K]

    def scale(self) -> torch.Tensor | None:
        """[K] loss multipliers, or None when disabled."""
        return self._scale if self.enabled else None

    def inv_scale(self) -> torch.Tensor | None:
        return self._scale.reciprocal() if self.enabled else None

    @torch.no_grad()
    def update(self, active: torch.Tensor, updated: torch.Tensor) -> None:
        """After a step: `active` slots that did not update overflowed (back off), the others grow."""
        if not self.enabled:
            return
        overflow = active & ~updated
        tracker = torch.where(updated, self._tracker + 1, torch.where(overflow, torch.zeros_like(self._tracker), self._tracker))
        grow = tracker >= self.growth_interval
        scale = torch.where(overflow, self._scale * self.backoff_factor, self._scale)
        self._scale.copy_(torch.where(grow, scale * self.growth_factor, scale))
        self._tracker.copy_(torch.where(grow, torch.zeros_like(tracker), tracker))

    def state_tensors(self) -> list[torch.Tensor]:
        """The live [K] scale and growth-tracker tensors (see `SlotAdam.state_tensors`)."""
        return [self._scale, self._tracker]

    def reset_slot(self, k: int) -> None:
        self._scale[k] = self.init_scale
        self._tracker[k] = 0

    def slot_state_dict(self, k: int) -> dict[str, Any]:
        """`torch.amp.GradScaler.state_dict()` of slot `k` ({} when disabled); reads the device."""
        if not self.enabled:
            return {}
        return {"scale": float(self._scale[k]), "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": int(self._tracker[k])}  # fmt: skip

    def load_slot_state_dict(self, k: int, state: dict[str, Any]) -> None:
        self.reset_slot(k)
        if self.enabled and state:
            self._scale[k] = float(state["scale"])
            self._tracker[k] = int(state.get("_growth_tracker", 0))
