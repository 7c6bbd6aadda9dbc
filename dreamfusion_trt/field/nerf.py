"""The NeRF field: hash-grid encoding + small MLP -> density and albedo, stacked over K prompts.

World positions live in ``[-bound, bound]^3``; points outside get zero density. The density is
``activation(raw + blob(x))`` where ``blob`` is DreamFusion's initial density blob, the linear cone
``blob_density * (1 - |x| / blob_radius)`` of the paper's appendix. It is deliberately *not*
clamped at zero outside ``blob_radius``: the negative values there suppress the density of the
freshly initialised MLP (exp(0) = 1 everywhere would fill the box with fog), so training starts from
an isolated ball of radius ~blob_radius. Activation: ``exp`` with its input clamped at
`EXP_CLAMP` in the forward pass (no overflow, also under fp16 autocast) while the backward keeps
the gradient of the clamped exponential (Instant-NGP's "truncated exp"), or ``softplus``.

Normals are ``-grad(sigma) / |grad(sigma)|`` (outward for a blob), by one of (``field.normals``):

- ``analytic``: the encoding returns its spatial Jacobian with the features (one grid query), the
  MLP its input gradient by an explicit reverse pass, and the chain rule gives grad(sigma) with
  ordinary differentiable ops, so an orientation loss reaches the tables (through the Jacobian's
  backward, a scatter of interpolation-weight derivatives) and the MLP without double backward;
- ``finite_difference``: central differences (6 extra density queries);
- ``autograd``: ``torch.autograd.grad`` of the density (``create_graph`` when gradients are
  enabled), through the PyTorch encoding.

``analytic`` and ``autograd`` give the same exact gradient of the piecewise-trilinear field; all
three are differentiable w.r.t. the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, get_args, get_type_hints

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FieldConfig, NormalsMode
from .hashgrid import HashGridEncoding
from .mlp import StackedMLP

NORMALS_MODES: tuple[str, ...] = get_args(NormalsMode)
FIELD_BACKENDS: tuple[str, ...] = get_args(get_type_hints(FieldConfig)["backend"])
ALBEDO_NOISE_WAVES = 8  # plane waves per colour channel of field.albedo_noise
SOFTPLUS_THRESHOLD = 20.0  # F.softplus returns its input above this (and its derivative is 1 there)
EXP_CLAMP = 15.0  # exp(15) ~ 3.3e6: far above any useful density, far below the fp16 limit

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # [K, N, 3] -> [K, N]


@dataclass
class FieldOutput:
    sigma: torch.Tensor  # [K, N] density, >= 0
    albedo: torch.Tensor  # [K, N, 3] in (0, 1)
    normal: torch.Tensor | None = None  # [K, N, 3] unit world normals, when asked for


class _TruncExp(torch.autograd.Function):
    """exp(min(x, EXP_CLAMP)) forward; backward uses the same clamped exp but lets the gradient
    through where x > EXP_CLAMP. Written with differentiable ops, so double backward works
    (needed for autograd normals under an orientation loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x.clamp(max=EXP_CLAMP))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=EXP_CLAMP))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def density_blob(x: torch.Tensor, blob_density: float, blob_radius: float) -> torch.Tensor:
    """DreamFusion's blob ``blob_density * (1 - |x| / blob_radius)`` for ``x [..., 3]`` -> ``[...]``:
    positive inside the radius, negative (density-suppressing) outside it."""
    if blob_density == 0.0:
        return torch.zeros_like(x[..., 0])
    if blob_radius <= 0.0:
        raise ValueError(f"field.blob_radius must be positive, got {blob_radius!r}")
    # sqrt of a clamped square keeps the gradient finite at the centre.
    r = (x.square().sum(dim=-1)).clamp_min(1e-12).sqrt()
    return blob_density * (1.0 - r / blob_radius)


def density_blob_gradient(x: torch.Tensor, blob_density: float, blob_radius: float) -> torch.Tensor:
    """d `density_blob` / dx for ``x [..., 3]`` -> ``[..., 3]``, the same value autograd gives
    (zero at the centre, where the clamped square has no gradient)."""
    if blob_density == 0.0:
        return torch.zeros_like(x)
    if blob_radius <= 0.0:
        raise ValueError(f"field.blob_radius must be positive, got {blob_radius!r}")
    sq = x.square().sum(dim=-1, keepdim=True)
    r = sq.clamp_min(1e-12).sqrt()
    return torch.where(sq >= 1e-12, (-blob_density / blob_radius) * x / r, torch.zeros_like(x))


def plane_wave_sum(x: torch.Tensor, waves: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Per prompt and channel, the sum of its plane waves sin(k . x + phase): points ``x [K, N, 3]``,
    wave vectors ``waves [K, C, W, 3]``, phases ``phase [K, C, W]`` -> ``[K, N, C]``."""
    arg = torch.einsum("knd,kcwd->kncw", x, waves.to(x.dtype)) + phase[:, None].to(x.dtype)
    return torch.sin(arg).sum(dim=-1)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when `t` is (a float64 field is how gradcheck runs it)."""
    return t if t.dtype == torch.float64 else t.float()


def normals_from_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Unit normals ``-grad / |grad|`` for a density gradient ``[..., 3]``; zero gradient -> zero."""
    return -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def finite_difference_gradient(density_fn: DensityFn, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Central differences of ``density_fn`` at ``x [K, N, 3]`` -> ``[K, N, 3]`` (6 queries in one
    call); differentiable w.r.t. whatever ``density_fn`` depends on."""
    offsets = eps * torch.cat([torch.eye(3, device=x.device), -torch.eye(3, device=x.device)])  # [6, 3]
    n = x.shape[1]
    probes = (x[:, None, :, :] + offsets[None, :, None, :].to(x.dtype)).reshape(x.shape[0], 6 * n, 3)
    s = density_fn(probes).reshape(x.shape[0], 6, n)
    return ((s[:, :3] - s[:, 3:]) / (2.0 * eps)).permute(0, 2, 1)


def autograd_gradient(density_fn: DensityFn, x: torch.Tensor) -> torch.Tensor:
    """Exact gradient of ``density_fn`` at ``x [K, N, 3]`` -> ``[K, N, 3]``; keeps the graph
    (``create_graph``) when gradients are enabled by the caller."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        sigma = density_fn(xg)
        (grad,) = torch.autograd.grad(sigma.sum(), xg, create_graph=create_graph)
    return grad


class NeRFField(nn.Module):
    """Density + albedo field for K prompts.

    ``density(x [K, N, 3]) -> [K, N]``; ``forward(x) -> (sigma [K, N], albedo [K, N, 3])``;
    ``normals(x) -> [K, N, 3]``; ``query(x, with_normals)`` returns all three from shared queries.
    Every method takes ``prompts``: a slice of the K stacked prompts to evaluate (x then has that
    many rows), e.g. ``slice(k, k + 1)`` for one prompt's occupancy-grid update.
    """

    def __init__(self, cfg: FieldConfig, num_prompts: int = 1) -> None:
        super().__init__()
        if cfg.bound <= 0:
            raise ValueError(f"field.bound must be positive, got {cfg.bound!r}")
        if cfg.fd_eps <= 0:
            raise ValueError(f"field.fd_eps must be positive, got {cfg.fd_eps!r}")
        self.cfg = cfg
        self.num_prompts = num_prompts
        self.bound = float(cfg.bound)
        self.encoding = make_encoding(num_prompts, cfg)
        if cfg.albedo_features not in ("shared", "own"):
            raise ValueError(f"field.albedo_features must be 'shared' or 'own', got {cfg.albedo_features!r}")
        own = cfg.albedo_features == "own"
        # shared: one MLP -> (raw density, 3 albedo logits); own: the MLP gives the density alone and
        # the albedo has its own grid and MLP (drawn after the density's parameters).
        self.mlp = StackedMLP(num_prompts, self.encoding.output_dim, cfg.hidden_dim, 1 if own else 4, cfg.num_layers)
        self.albedo_encoding = make_encoding(num_prompts, cfg) if own else None
        self.albedo_mlp = StackedMLP(num_prompts, self.encoding.output_dim, cfg.hidden_dim, 3, cfg.num_layers) if own else None
        if not 0.0 <= cfg.coarse_to_fine <= 1.0:
            raise ValueError(f"field.coarse_to_fine must be a share of the iterations in [0, 1], got {cfg.coarse_to_fine!r}")
        if not 1 <= cfg.coarse_levels <= cfg.num_levels:
            raise ValueError(f"field.coarse_levels must be in [1, field.num_levels = {cfg.num_levels}], got {cfg.coarse_levels!r}")
        # Per prompt and feature, the weight of its hash-grid level (coarse to fine); all ones unless
        # the trainer ramps the levels in. Not in the state_dict: it follows from the step.
        self.register_buffer("feature_weights", torch.ones(num_prompts, self.encoding.output_dim), persistent=False)
        self._level_weights_host: list[tuple[float, ...] | None] = [None] * num_prompts
        if not 0.0 <= cfg.blob_fade <= 1.0:
            raise ValueError(f"field.blob_fade must be a share of the iterations in [0, 1], got {cfg.blob_fade!r}")
        if cfg.blob_fade > 0:
            # Per prompt, how much of the blob is left (field.blob_fade). Part of the scene's state,
            # so a checkpoint, a resumed run and the outputs see the blob where training left it.
            self.register_buffer("blob_scale", torch.ones(num_prompts))
        if cfg.albedo_noise < 0 or cfg.albedo_noise_frequency <= 0:
            raise ValueError(f"field.albedo_noise must be >= 0 and field.albedo_noise_frequency > 0, got "
                             f"{cfg.albedo_noise!r} and {cfg.albedo_noise_frequency!r}")  # fmt: skip
        if cfg.albedo_noise > 0:
            # Per prompt, the plane waves of a fixed random colour field added to the albedo logits,
            # drawn (after the parameters) from the RNG that draws the prompt's parameters. Part of
            # the scene, so a checkpoint carries the field its albedo was trained against.
            w = ALBEDO_NOISE_WAVES
            self.register_buffer("albedo_waves", torch.randn(num_prompts, 3, w, 3) * cfg.albedo_noise_frequency)
            self.register_buffer("albedo_phase", torch.rand(num_prompts, 3, w) * (2.0 * math.pi))
        if not 0.0 <= cfg.albedo_noise_fade <= 1.0:
            raise ValueError(f"field.albedo_noise_fade must be a share of the iterations in [0, 1], got {cfg.albedo_noise_fade!r}")
        if cfg.albedo_noise > 0 and cfg.albedo_noise_fade > 0:
            # Per prompt, how much of the colour field is left (field.albedo_noise_fade). Scene
            # state like blob_scale; ones, so it draws nothing and the waves above stay the same.
            self.register_buffer("albedo_noise_scale", torch.ones(num_prompts))

    def set_level_weights(self, weights: Sequence[Sequence[float] | None]) -> None:
        """Per prompt, the weight of each hash-grid level in [0, 1] (None: all ones), e.g. from
        `coarse_to_fine_weights`. Uploaded only when some prompt's weights changed, without a host
        synchronisation (pinned memory, a non-blocking copy)."""
        if len(weights) != self.num_prompts:
            raise ValueError(f"expected level weights for {self.num_prompts} prompts, got {len(weights)}")
        rows = [None if w is None else tuple(float(v) for v in w) for w in weights]
        if rows == self._level_weights_host:
            return
        levels, dim = self.encoding.num_levels, self.encoding.level_dim
        if any(r is not None and len(r) != levels for r in rows):
            raise ValueError(f"expected {levels} level weights per prompt, got {[len(r) for r in rows if r is not None]}")
        host = torch.tensor([r if r is not None else (1.0,) * levels for r in rows]).repeat_interleave(dim, dim=1)
        dev = self.feature_weights.device
        self.feature_weights.copy_(host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host)
        self._level_weights_host = rows

    def set_blob_scales(self, scales: Sequence[float]) -> None:
        """Per prompt, the share of the density blob left, in [0, 1] (field.blob_fade), uploaded
        without a host synchronisation. Every call uploads: the buffer is scene state that
        loading a prompt's checkpoint also writes, so a host-side copy of it could go stale."""
        if self.cfg.blob_fade <= 0:
            raise ValueError("set_blob_scales needs field.blob_fade > 0")
        if len(scales) != self.num_prompts:
            raise ValueError(f"expected blob scales for {self.num_prompts} prompts, got {len(scales)}")
        host, dev = torch.tensor([min(max(float(v), 0.0), 1.0) for v in scales]), self.blob_scale.device
        self.blob_scale.copy_(host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host)

    def set_albedo_noise_scales(self, scales: Sequence[float]) -> None:
        """Per prompt, the share of field.albedo_noise's offset left, in [0, 1]
        (field.albedo_noise_fade), uploaded as `set_blob_scales` uploads: every call, no sync."""
        if self.cfg.albedo_noise <= 0 or self.cfg.albedo_noise_fade <= 0:
            raise ValueError("set_albedo_noise_scales needs field.albedo_noise > 0 and field.albedo_noise_fade > 0")
        if len(scales) != self.num_prompts:
            raise ValueError(f"expected albedo noise scales for {self.num_prompts} prompts, got {len(scales)}")
        host, dev = torch.tensor([min(max(float(v), 0.0), 1.0) for v in scales]), self.albedo_noise_scale.device
        self.albedo_noise_scale.copy_(host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host)

    def _blob_share(self, prompts: slice | None) -> torch.Tensor | float:
        """[K', 1] share of the blob left per prompt, or 1.0 when it never fades."""
        if self.cfg.blob_fade <= 0:
            return 1.0
        scale = self.blob_scale if prompts is None else self.blob_scale[prompts]
        return scale.float()[:, None]

    def _weighted(self, feats: torch.Tensor, prompts: slice | None) -> torch.Tensor:
        """Features [K', N, D] (or their Jacobian [K', N, 3, D]) times their levels' weights."""
        if self.cfg.coarse_to_fine <= 0.0:
            return feats
        w = self.feature_weights if prompts is None else self.feature_weights[prompts]  # [K', D]
        w = w[:, None, None, :] if feats.dim() == 4 else w[:, None, :]
        return feats * w.to(feats.dtype)

    def _albedo_offset(self, x: torch.Tensor, prompts: slice | None) -> torch.Tensor:
        """field.albedo_noise's logits at ``x [K', N, 3]`` -> ``[K', N, 3]``: per channel, the sum
        of its prompt's plane waves sin(k . x + phase), scaled so its spread is about the amplitude
        (and, with field.albedo_noise_fade, by the share of it left)."""
        waves = self.albedo_waves if prompts is None else self.albedo_waves[prompts]  # [K', 3, W, 3]
        phase = self.albedo_phase if prompts is None else self.albedo_phase[prompts]  # [K', 3, W]
        offset = plane_wave_sum(x, waves, phase) * (self.cfg.albedo_noise * math.sqrt(2.0 / ALBEDO_NOISE_WAVES))
        if self.cfg.albedo_noise_fade <= 0:
            return offset
        scale = self.albedo_noise_scale if prompts is None else self.albedo_noise_scale[prompts]  # [K']
        return offset * scale[:, None, None].to(offset.dtype)

    def _own_albedo_logits(self, x: torch.Tensor, prompts: slice | None) -> torch.Tensor:
        """field.albedo_features own: albedo logits ``[K', N, 3]`` at ``x [K', N, 3]`` from the
        albedo's own grid and MLP (plus field.albedo_noise's offset), sharing no parameter with
        the density."""
        unit = (x + self.bound) / (2.0 * self.bound)
        logits = _at_least_fp32(self.albedo_mlp(self._weighted(self.albedo_encoding(unit, prompts), prompts), prompts))
        return logits if self.cfg.albedo_noise <= 0 else logits + self._albedo_offset(_at_least_fp32(x), prompts)

    # -- raw network ------------------------------------------------------------------------------

    def _evaluate(
        self, x: torch.Tensor, prompts: slice | None, with_gradient: bool = False, with_albedo: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``x [K', N, 3]`` world -> (sigma [K', N] float32, albedo logits [K', N, 3], and with
        `with_gradient` d sigma / dx [K', N, 3] by the chain rule through encoding and MLP).
        Without `with_albedo` the logits are None (nothing of the albedo is computed)."""
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"expected positions of shape [K, N, 3], got {tuple(x.shape)}")
        unit = (x + self.bound) / (2.0 * self.bound)
        if with_gradient:
            feats, jac = self.encoding.forward_with_jacobian(unit, prompts)  # [K', N, D], [K', N, 3, D]
            feats, jac = self._weighted(feats, prompts), self._weighted(jac, prompts)
            h, dh_dfeats = self.mlp.forward_with_input_gradient(feats, prompts, output=0)  # [K', N, 4], [K', N, D]
        else:
            h = self.mlp(self._weighted(self.encoding(unit, prompts), prompts), prompts)  # [K', N, 4]
        h, xf = _at_least_fp32(h), _at_least_fp32(x)
        blob_share = self._blob_share(prompts)
        raw = h[..., 0] + blob_share * density_blob(xf, self.cfg.blob_density, self.cfg.blob_radius)
        if self.cfg.density_activation == "exp":
            sigma = trunc_exp(raw)
            dsigma_draw = torch.exp(raw.clamp(max=EXP_CLAMP))  # _TruncExp's backward, as autograd differentiates it
        elif self.cfg.density_activation == "softplus":
            sigma = F.softplus(raw)
            dsigma_draw = torch.where(raw > SOFTPLUS_THRESHOLD, torch.ones_like(raw), torch.sigmoid(raw))
        else:
            raise ValueError(
                f"field.density_activation must be 'exp' or 'softplus', got {self.cfg.density_activation!r}"
            )
        inside = (x.abs() <= self.bound).all(dim=-1)
        sigma_out = torch.where(inside, sigma, torch.zeros_like(sigma))
        if not with_albedo:  # density-only queries skip the albedo's own grid and field.albedo_noise's waves
            logits = None
        elif self.albedo_encoding is not None:  # field.albedo_features own
            logits = self._own_albedo_logits(x, prompts)
        else:
            logits = h[..., 1:] if self.cfg.albedo_noise <= 0 else h[..., 1:] + self._albedo_offset(xf, prompts)
        if not with_gradient:
            return sigma_out, logits, None
        draw_dx = (jac * dh_dfeats[:, :, None, :].to(jac.dtype)).sum(dim=-1) / (2.0 * self.bound)  # [K', N, 3]
        blob_dx = density_blob_gradient(xf, self.cfg.blob_density, self.cfg.blob_radius)
        draw_dx = draw_dx + (blob_share[..., None] * blob_dx if isinstance(blob_share, torch.Tensor) else blob_dx)
        grad = torch.where(inside[..., None], dsigma_draw[..., None] * draw_dx, torch.zeros_like(draw_dx))
        return sigma_out, logits, grad

    # -- public API -------------------------------------------------------------------------------

    def density(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        """``x [K, N, 3]`` -> sigma ``[K, N]``."""
        return self._evaluate(x, prompts, with_albedo=False)[0]

    def forward(self, x: torch.Tensor, prompts: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [K, N, 3]`` -> (sigma ``[K, N]``, albedo ``[K, N, 3]``)."""
        sigma, logits, _ = self._evaluate(x, prompts)
        return sigma, torch.sigmoid(logits)

    def density_gradient(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        """d sigma / d x at ``x [K, N, 3]`` -> ``[K, N, 3]`` by the configured method."""
        fn = lambda p: self.density(p, prompts)  # noqa: E731
        if self.cfg.normals == "analytic":
            return self._evaluate(x, prompts, with_gradient=True, with_albedo=False)[2]
        if self.cfg.normals == "finite_difference":
            return finite_difference_gradient(fn, x, self.cfg.fd_eps)
        if self.cfg.normals == "autograd":
            return autograd_gradient(fn, x)
        raise ValueError(f"field.normals must be one of {NORMALS_MODES}, got {self.cfg.normals!r}")

    def normals(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        """Unit normals ``-grad(sigma) / |grad(sigma)|`` at ``x [K, N, 3]`` -> ``[K, N, 3]``."""
        return normals_from_gradient(self.density_gradient(x, prompts))

    def query(self, x: torch.Tensor, with_normals: bool, prompts: slice | None = None) -> FieldOutput:
        """Sigma, albedo and (optionally) normals at ``x [K, N, 3]`` without recomputing anything:
        analytic normals come from the same single grid query as sigma; finite differences run the
        centre and its 6 probes through one network call; autograd differentiates the same sigma
        that is returned."""
        if not with_normals:
            sigma, albedo = self.forward(x, prompts)
            return FieldOutput(sigma, albedo)
        k, n = x.shape[0], x.shape[1]
        if self.cfg.normals == "analytic":
            sigma, logits, grad = self._evaluate(x, prompts, with_gradient=True)
            return FieldOutput(sigma, torch.sigmoid(logits), normals_from_gradient(grad))
        if self.cfg.normals == "finite_difference":
            eps = self.cfg.fd_eps
            offsets = eps * torch.cat(
                [torch.zeros(1, 3, device=x.device), torch.eye(3, device=x.device), -torch.eye(3, device=x.device)]
            )  # [7, 3]: centre, +x +y +z, -x -y -z
            pts = (x[:, None, :, :] + offsets[None, :, None, :].to(x.dtype)).reshape(k, 7 * n, 3)
            own = self.albedo_encoding is not None  # then only the centre's albedo is queried
            sigma_all, logits, _ = self._evaluate(pts, prompts, with_albedo=not own)
            sigma_all = sigma_all.reshape(k, 7, n)
            grad = ((sigma_all[:, 1:4] - sigma_all[:, 4:7]) / (2.0 * eps)).permute(0, 2, 1)
            albedo = torch.sigmoid(self._own_albedo_logits(x, prompts) if own else logits.reshape(k, 7, n, 3)[:, 0])
            return FieldOutput(sigma_all[:, 0], albedo, normals_from_gradient(grad))
        if self.cfg.normals == "autograd":
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                xg = x if x.requires_grad else x.detach().requires_grad_(True)
                sigma, logits, _ = self._evaluate(xg, prompts)
                (grad,) = torch.autograd.grad(sigma.sum(), xg, create_graph=create_graph)
            if not create_graph:
                sigma, logits = sigma.detach(), logits.detach()
            return FieldOutput(sigma, torch.sigmoid(logits), normals_from_gradient(grad))
        raise ValueError(f"field.normals must be one of {NORMALS_MODES}, got {self.cfg.normals!r}")


def coarse_to_fine_weights(num_levels: int, coarse_levels: int, progress: float) -> tuple[float, ...]:
    """Each hash-grid level's weight at ramp `progress` in [0, 1]: the first `coarse_levels` are
    on throughout; the others switch on one after another, each fading in linearly, so that at
    progress 1 every level is on."""
    p = min(max(float(progress), 0.0), 1.0)
    active = coarse_levels + (num_levels - coarse_levels) * p
    return tuple(min(max(active - level, 0.0), 1.0) for level in range(num_levels))


def make_encoding(num_prompts: int, cfg: FieldConfig) -> HashGridEncoding:
    """The hash grid for ``cfg.backend``: pure PyTorch or fused Triton kernels (same parameters and
    state_dict either way; ValueError for backend=triton without the triton package)."""
    if cfg.backend == "auto":  # the fused kernels where they run (24x the PyTorch grid on an H200)
        try:
            from .triton_hashgrid import TritonHashGridEncoding  # noqa: PLC0415
        except ImportError:
            return HashGridEncoding(num_prompts, cfg)
        try:
            return TritonHashGridEncoding(num_prompts, cfg, cpu_fallback=True)
        except ValueError:  # triton is not installed
            return HashGridEncoding(num_prompts, cfg)
    if cfg.backend == "torch":
        return HashGridEncoding(num_prompts, cfg)
    if cfg.backend == "triton":
        from .triton_hashgrid import TritonHashGridEncoding  # noqa: PLC0415

        return TritonHashGridEncoding(num_prompts, cfg)
    raise ValueError(f"field.backend must be one of {FIELD_BACKENDS}, got {cfg.backend!r}")
