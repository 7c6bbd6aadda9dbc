"""Colour preconditioning of the SDS gradient: equal pull along every colour direction.

A VAE's latent space need not be isometric in colour. The built-in prior's colour -> latent map
``W [C, 3]`` has ``W^T W`` eigenvalues 0.13, 9.3 and 13.8 (CPU fit, 2026-12-01): changing green
and blue together, which is what separates red from the white background, barely moves the
latent. SDS pushes a latent-space gradient g back to the render as ``W^T g`` (through the colour
map or the encoder's Jacobian), so the render's pull towards red, and the opacity's pull
(d render / d alpha = colour - background), is a few times weaker for a red object than for a
blue one: red objects come out as translucent shells.

The fix is in the optimisation's geometry, not per object: a damped Gauss-Newton step. Each
pixel's RGB gradient is multiplied by

    P = (M + lam * m * I)^-1 * m * (1 + lam),   M = W^T W, m = trace(M) / 3,

the render change that moves the latent by g, damped by `lam` so the weak direction is not
amplified without bound. P is the identity for an isometric map; it changes neither the loss nor
the forward pass, only the gradient that reaches the render. ``precondition(images, P)`` applies
it (identity forward, P in the backward)."""

from __future__ import annotations

import torch


def colour_preconditioner(weight: torch.Tensor, damping: float) -> torch.Tensor:
    """P [3, 3] (float32) for a colour -> latent map `weight` [C, 3] and a damping > 0."""
    if weight.ndim != 2 or weight.shape[1] != 3:
        raise ValueError(f"expected a colour map weight [C, 3], got {tuple(weight.shape)}")
    if not damping > 0:
        raise ValueError(f"sds.colour_damping must be positive, got {damping!r}")
    w = weight.detach().double()
    m = w.T @ w
    mean = torch.trace(m) / 3.0
    p = torch.linalg.inv(m + damping * mean * torch.eye(3, dtype=m.dtype, device=m.device)) * mean * (1.0 + damping)
    return p.float()


class _Precondition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(p)
        return images.view_as(images)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        # P is symmetric: the pixel's gradient row vector times P.
        return torch.einsum("nchw,cd->ndhw", grad, p.to(grad.dtype)), None


def precondition(images: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`images` [n, 3, H, W] unchanged; the gradient that flows back through it is P times each
    pixel's RGB gradient."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [n, 3, H, W], got shape {tuple(images.shape)}")
    return _Precondition.apply(images, p)
