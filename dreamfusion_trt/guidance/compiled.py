"""``torch.compile`` for the RGB phase's encoders, which SDS backpropagates through: one
static-shape compile (`compile_static`) and a guard that falls back to the eager twin for good
when the compiler fails (`CompiledOrEager`).

The encoders are compiled as functions of one image batch; AOT autograd traces their backward
with the forward, so both run as compiled code. The eager network stays the reference the
compiled one is tested against (tests/test_render_encoder*.py), and the fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

Encode = Callable[[torch.Tensor], torch.Tensor]


def compile_static(fn: Callable, backend: str = "inductor", mode: str | None = None) -> Callable:
    """``torch.compile(fn)`` with static shapes. Backends: "inductor" (the fast path),
    "aot_eager" (traces forward and backward like inductor but runs them eagerly: quick to
    compile, for tests), "eager" (dynamo only). `mode` applies to inductor."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"unknown torch.compile backend {backend!r} (expected one of {', '.join(COMPILE_BACKENDS)})")
    kwargs = {"mode": mode} if backend == "inductor" and mode is not None else {}
    # Static shapes: the RGB phase encodes one [K, 3, E, E] shape per run (two with a last short batch).
    return torch.compile(fn, backend=backend, dynamic=False, fullgraph=False, **kwargs)


class CompiledOrEager:
    """images -> `compiled(images)`, or `eager(images)` for good once the compiler fails on it
    (one warning): a compiled encoder is an optional speed-up and must not stop a run.

    AOT autograd lowers the backward lazily, at the first backward, where no guard here would
    see a compiler error. So the first call of each kind (shape, dtype, device, autocast, and
    whether a gradient is wanted) runs inside the guard and, when the images want a gradient,
    also compiles the backward with a probe vector-Jacobian product on a detached copy. A
    failure raises before the caller's graph is built, so the eager call that replaces it starts
    clean. Errors other than the compiler's (a wrong shape) propagate.
    """

    def __init__(self, compiled: Encode, eager: Encode, what: str) -> None:
        self.compiled = compiled
        self.eager = eager
        self.what = what
        self.failed = False
        self._checked: set[tuple] = set()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.eager(images)
        wants_grad = torch.is_grad_enabled() and images.requires_grad
        kind = (tuple(images.shape), images.dtype, images.device, torch.is_autocast_enabled(images.device.type), wants_grad)
        if kind in self._checked:
            return self.compiled(images)
        try:
            if wants_grad:
                probe = images.detach().requires_grad_(True)
                out = self.compiled(probe)
                torch.autograd.grad(out, probe, torch.ones_like(out))
            out = self.compiled(images)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            self.failed = True
            # "backend='inductor' raised:" and, on the next line, what it raised
            why = " ".join(str(exc).strip().splitlines()[:2])[:300] or type(exc).__name__
            logger.warning("%s did not compile (%s); running it eagerly", self.what, why)
            return self.eager(images)
        self._checked.add(kind)
        return out
