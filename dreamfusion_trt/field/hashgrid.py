"""Multi-resolution hash encoding (Instant-NGP) in pure PyTorch, stacked over K prompts.

Level ``l`` has resolution ``R_l = floor(base * b**l)`` cells per axis, with the growth factor
``b = (max_resolution / base_resolution) ** (1 / (L - 1))``, so ``(R_l + 1)**3`` vertices. A level
whose vertices fit in the table (``(R_l + 1)**3 <= T``) is indexed densely (one entry per vertex);
a finer level hashes each vertex with Instant-NGP's XOR of coordinates times the primes
``(1, 2654435761, 805459861)``, modulo ``T`` (a power of two, so only the low bits matter and
int64 arithmetic gives the same index as the uint32 original). Features of the 8 corners of the
cell holding a point are blended trilinearly, which keeps the output differentiable w.r.t. the
tables and w.r.t. the input positions. `forward_with_jacobian` also returns the features' spatial
derivative (the derivatives of the trilinear weights inside each point's cell), which gives analytic
normals from the same single query.

Every prompt k owns its own tables: parameters are ``[K, L, T, F]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import FieldConfig

HASH_PRIMES = (1, 2654435761, 805459861)


def level_resolutions(cfg: FieldConfig) -> list[int]:
    """Cells per axis of each level, geometric from base_resolution to max_resolution."""
    if cfg.num_levels < 1:
        raise ValueError(f"field.num_levels must be at least 1, got {cfg.num_levels!r}")
    if not 1 <= cfg.base_resolution <= cfg.max_resolution:
        raise ValueError(
            f"field.base_resolution ({cfg.base_resolution!r}) must be in [1, max_resolution "
            f"({cfg.max_resolution!r})]"
        )
    if cfg.num_levels == 1:
        return [cfg.base_resolution]
    growth = math.exp((math.log(cfg.max_resolution) - math.log(cfg.base_resolution)) / (cfg.num_levels - 1))
    # The small epsilon keeps exact powers (e.g. 16 * 2**l) from rounding down.
    return [int(math.floor(cfg.base_resolution * growth**level + 1e-6)) for level in range(cfg.num_levels)]


class HashGridEncoding(nn.Module):
    """``forward(x [K, N, 3] in [0, 1]) -> [K, N, L * F]``; ``forward_with_jacobian(x) ->
    ([K, N, L * F], [K, N, 3, L * F])``; tables ``[K, L, T, F]``."""

    def __init__(self, num_prompts: int, cfg: FieldConfig) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {num_prompts!r}")
        if not 1 <= cfg.log2_hashmap_size <= 30:
            raise ValueError(f"field.log2_hashmap_size must be in [1, 30], got {cfg.log2_hashmap_size!r}")
        if cfg.level_dim < 1:
            raise ValueError(f"field.level_dim must be at least 1, got {cfg.level_dim!r}")
        self.num_prompts = num_prompts
        self.num_levels = cfg.num_levels
        self.level_dim = cfg.level_dim
        self.table_size = 2**cfg.log2_hashmap_size
        self.resolutions = level_resolutions(cfg)
        self.dense = [(r + 1) ** 3 <= self.table_size for r in self.resolutions]
        self.output_dim = self.num_levels * self.level_dim
        self.tables = nn.Parameter(
            torch.empty(num_prompts, self.num_levels, self.table_size, self.level_dim).uniform_(-1e-4, 1e-4)
        )

    def vertex_index(self, coords: torch.Tensor, level: int) -> torch.Tensor:
        """Table row of integer grid vertices ``coords [..., 3]`` (each in [0, R_l]) at `level`."""
        if self.dense[level]:
            side = self.resolutions[level] + 1
            return coords[..., 0] + side * (coords[..., 1] + side * coords[..., 2])
        h = coords[..., 0] * HASH_PRIMES[0]
        h = h ^ (coords[..., 1] * HASH_PRIMES[1])
        h = h ^ (coords[..., 2] * HASH_PRIMES[2])
        return h & (self.table_size - 1)

    def _corner_rows(self, coords: torch.Tensor, level: int) -> torch.Tensor:
        """Rows of the 8 cell corners from per-axis vertex coordinates ``[..., 3, 2]`` -> ``[..., 8]``,
        corner c = x_bit + 2 * y_bit + 4 * z_bit (as in `vertex_index`, computed per axis first)."""
        cx, cy, cz = coords.unbind(dim=-2)  # each [..., 2]
        if self.dense[level]:
            side = self.resolutions[level] + 1
            rows = cz[..., :, None, None] * (side * side) + cy[..., None, :, None] * side + cx[..., None, None, :]
        else:
            hx, hy, hz = cx * HASH_PRIMES[0], cy * HASH_PRIMES[1], cz * HASH_PRIMES[2]
            rows = (hz[..., :, None, None] ^ hy[..., None, :, None] ^ hx[..., None, None, :]) & (self.table_size - 1)
        return rows.reshape(*rows.shape[:-3], 8)

    def forward(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        """Encode positions ``x [K', N, 3]`` in [0, 1] (clamped) -> features ``[K', N, L * F]``.

        `prompts` picks a contiguous subset of the stacked tables (default: all K); K' is its length.
        """
        return self._encode(x, prompts, jacobian=False)[0]

    def forward_with_jacobian(
        self, x: torch.Tensor, prompts: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and their spatial derivatives at ``x [K', N, 3]`` in [0, 1]:
        (``[K', N, L * F]``, ``jac [K', N, 3, L * F]`` with ``jac[k, n, j] = d features[k, n] / d x_j``).

        Per level, ``d/dx_j = R_l * sum_c (d w_c / d frac_j) * table[row_c]``: the derivative of the
        trilinear weights inside the point's cell (the features are continuous across cell faces, their
        derivative is not; this is the one-sided value of the cell `forward` picks). Zero along an axis
        where ``x_j`` lies outside [0, 1] (the clamp). Written with differentiable ops, so gradients
        reach the tables (and ``x``) by autograd; the fused twin's kernels give the same values.
        """
        return self._encode(x, prompts, jacobian=True)  # type: ignore[return-value]

    def _encode(
        self, x: torch.Tensor, prompts: slice | None, jacobian: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tables = self.tables if prompts is None else self.tables[prompts]
        if x.dim() != 3 or x.shape[-1] != 3 or x.shape[0] != tables.shape[0]:
            raise ValueError(f"expected positions of shape [{tables.shape[0]}, N, 3], got {tuple(x.shape)}")
        k, n = x.shape[0], x.shape[1]
        # float32 (float64 when the tables are, for gradcheck); clamp's gradient is 1 on [0, 1] inclusive.
        x = x.to(torch.float64 if tables.dtype == torch.float64 else torch.float32)
        inside = ((x >= 0.0) & (x <= 1.0)).to(x.dtype)  # [K', N, 3]: where d clamp(x) / dx = 1
        x = x.clamp(0.0, 1.0)
        flat = tables.reshape(-1, self.level_dim)  # [K' * L * T, F]
        # Row offset of prompt k, level 0 in `flat`.
        prompt_base = (torch.arange(k, device=x.device) * (self.num_levels * self.table_size)).view(k, 1, 1)
        sign = torch.arange(2, device=x.device, dtype=x.dtype) * 2.0 - 1.0  # d(1 - f)/df, df/df = -1, 1
        feats, jacs = [], []
        for level, res in enumerate(self.resolutions):
            pos = x * res  # [K', N, 3]
            cell = pos.detach().floor().clamp_(0, res - 1)
            frac = pos - cell  # [K', N, 3], differentiable w.r.t. x
            # Per axis, the two vertex coordinates and their linear weights: [K', N, 3, 2].
            coords = cell.long()[..., None] + torch.arange(2, device=x.device)  # arange: no host-to-device copy
            w_axis = torch.stack([1.0 - frac, frac], dim=-1)
            rows = self._corner_rows(coords, level) + prompt_base + level * self.table_size  # [K', N, 8]
            wx, wy, wz = w_axis[:, :, 0, None, None, :], w_axis[:, :, 1, None, :, None], w_axis[:, :, 2, :, None, None]
            w = (wz * wy * wx).reshape(k, n, 8)
            values = flat[rows]  # [K', N, 8, F]
            feats.append(torch.einsum("knc,kncf->knf", w, values))  # [K', N, F]
            if jacobian:
                dx, dy, dz = sign.view(1, 1, 1, 2), sign.view(1, 1, 2, 1), sign.view(2, 1, 1)
                dw = torch.stack(  # [K', N, 3, 8]: d w_c / d frac_j
                    [(wz * wy * dx).reshape(k, n, 8), (wz * dy * wx).reshape(k, n, 8), (dz * wy * wx).reshape(k, n, 8)],
                    dim=2,
                )
                jacs.append(res * torch.einsum("knjc,kncf->knjf", dw, values))  # [K', N, 3, F]
        out = torch.cat(feats, dim=-1)
        assert out.shape == (k, n, self.output_dim)
        if not jacobian:
            return out, None
        jac = torch.cat(jacs, dim=-1) * inside[..., None]  # [K', N, 3, L * F]
        return out, jac

    def extra_repr(self) -> str:
        return (
            f"prompts={self.num_prompts}, levels={self.num_levels}, level_dim={self.level_dim}, "
            f"table_size={self.table_size}, resolutions={self.resolutions[0]}..{self.resolutions[-1]}, "
            f"dense_levels={sum(self.dense)}"
        )
