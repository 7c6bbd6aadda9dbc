"""Fused Triton hash-grid encoding: the fast twin of `HashGridEncoding`.

`TritonHashGridEncoding` subclasses the pure-PyTorch `HashGridEncoding`, so it owns the same
parameter (``tables [K, L, T, F]``) and its checkpoints are interchangeable with the reference. Its
forward runs one Triton kernel over all levels (one program per block of points and prompt: loop
over levels, 8 corner rows computed exactly as `HashGridEncoding.vertex_index` does, trilinear
weights, fp32 accumulation) and its backward scatters ``weight * grad`` into fp32 table gradients
with ``tl.atomic_add``.

`forward_with_jacobian` (analytic normals) runs the same kernels with ``JACOBIAN=True``: the forward
also accumulates the 8 corners times the derivatives of their trilinear weights, ``jac [K, N, 3,
L * F]``, and the backward adds the scatter of those derivatives times the upstream gradient of
``jac``. The Jacobian is linear in the tables, so this backward is exact and needs no second pass.

Corner rows: a dense level uses ``x + side * (y + side * z)``; a hashed level XORs the coordinates
times the primes ``(1, 2654435761, 805459861)``. The kernel multiplies in uint32, which wraps
modulo 2**32; since ``T`` is a power of two no larger than 2**30, ``& (T - 1)`` keeps only low bits
that are the same as those of the int64 products the reference computes. The cell a point falls in
is computed as the reference does (``x * R``, floor, no fused multiply-add), so both agree on it
exactly and so on the Jacobian, which jumps across cell faces.

Gradient w.r.t. the positions is *not* computed by the kernels: when ``x`` requires grad (autograd
normals, or anything upstream that needs d(features)/dx) the forward falls back to the PyTorch
reference path, which is exact and twice differentiable. Analytic and finite-difference normals and
the usual training step (positions without grad) take the fused path.

CPU tensors are only accepted under the Triton interpreter (``TRITON_INTERPRET=1``), which is how
the tests run the kernels without a GPU. Benchmark: ``python -m dreamfusion_trt.bench.field`` (CUDA).
"""

import logging
import os

import torch
from torch.autograd.function import once_differentiable

from ..config import FieldConfig
from .hashgrid import HASH_PRIMES, HashGridEncoding

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency; TritonHashGridEncoding raises ValueError without it
    triton = None
    tl = None

logger = logging.getLogger(__name__)

BLOCK_POINTS = 128  # points per program on the GPU
BLOCK_POINTS_INTERPRETED = 1024  # the interpreter pays per program, not per lane
NUM_WARPS = 4

assert HASH_PRIMES[0] == 1, "the kernels hard-code the primes of hashgrid.HASH_PRIMES"

if triton is not None:
    # Plain functions, jitted lazily by `_kernels`: `triton.jit` decides between compiling and
    # interpreting when it is applied, so deferring it lets TRITON_INTERPRET be set at run time
    # (e.g. per test). For the same reason the kernels use only builtins of triton.language
    # (`tl.full`, not the jitted `tl.zeros`): the library's own jitted helpers were fixed in one mode
    # when triton was first imported.

    def _forward_kernel(
        x_ptr,  # [K, N, 3] float32, contiguous
        tables_ptr,  # [K, L, T, F], contiguous
        info_ptr,  # [L, 2] int32: (resolution, dense)
        out_ptr,  # [K, N, L * F] float32
        jac_ptr,  # [K, N, 3, L * F] float32 when JACOBIAN (else unused)
        N,
        T,
        L,
        F: tl.constexpr,
        F_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
        JACOBIAN: tl.constexpr,
    ):
        k = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        point = k * N + offs  # int64 row in [K * N]
        rx = tl.load(x_ptr + point * 3 + 0, mask=mask, other=0.0)
        ry = tl.load(x_ptr + point * 3 + 1, mask=mask, other=0.0)
        rz = tl.load(x_ptr + point * 3 + 2, mask=mask, other=0.0)
        px = tl.minimum(tl.maximum(rx, 0.0), 1.0)
        py = tl.minimum(tl.maximum(ry, 0.0), 1.0)
        pz = tl.minimum(tl.maximum(rz, 0.0), 1.0)
        # Where d clamp(x) / dx = 1 (inclusive bounds, as torch.clamp's backward).
        in_x = ((rx >= 0.0) & (rx <= 1.0)).to(tl.float32)
        in_y = ((ry >= 0.0) & (ry <= 1.0)).to(tl.float32)
        in_z = ((rz >= 0.0) & (rz <= 1.0)).to(tl.float32)
        feat = tl.arange(0, F_POW2)
        mask2 = mask[:, None] & (feat < F)[None, :]
        table_mask = (T - 1).to(tl.uint32)
        for level in range(L):
            res = tl.load(info_ptr + 2 * level)
            dense = tl.load(info_ptr + 2 * level + 1)
            side = res + 1
            resf = res.to(tl.float32)
            # Lower cell corner and fraction exactly as the reference: floor, clamp to [0, R - 1].
            pos_x, pos_y, pos_z = px * resf, py * resf, pz * resf
            cell_x = tl.minimum(tl.maximum(tl.floor(pos_x), 0.0), resf - 1.0)
            cell_y = tl.minimum(tl.maximum(tl.floor(pos_y), 0.0), resf - 1.0)
            cell_z = tl.minimum(tl.maximum(tl.floor(pos_z), 0.0), resf - 1.0)
            fx, fy, fz = pos_x - cell_x, pos_y - cell_y, pos_z - cell_z
            ix, iy, iz = cell_x.to(tl.int32), cell_y.to(tl.int32), cell_z.to(tl.int32)
            base = (k * L + level) * T  # int64 row of (prompt k, level) in [K * L * T]
            acc = tl.full([BLOCK, F_POW2], 0.0, tl.float32)
            jx = tl.full([BLOCK, F_POW2], 0.0, tl.float32)
            jy = tl.full([BLOCK, F_POW2], 0.0, tl.float32)
            jz = tl.full([BLOCK, F_POW2], 0.0, tl.float32)
            for c in tl.static_range(8):
                # Corner c = x_bit + 2 * y_bit + 4 * z_bit; row as HashGridEncoding.vertex_index.
                vx, vy, vz = ix + (c & 1), iy + ((c >> 1) & 1), iz + (c >> 2)
                hashed = vx.to(tl.uint32) ^ (vy.to(tl.uint32) * 2654435761) ^ (vz.to(tl.uint32) * 805459861)
                row = tl.where(dense != 0, vz * (side * side) + vy * side + vx, (hashed & table_mask).to(tl.int32))
                wx = fx if (c & 1) == 1 else 1.0 - fx
                wy = fy if ((c >> 1) & 1) == 1 else 1.0 - fy
                wz = fz if (c >> 2) == 1 else 1.0 - fz
                w = (wz * wy) * wx  # the reference's product order
                ptrs = tables_ptr + (base + row)[:, None] * F + feat[None, :]
                v = tl.load(ptrs, mask=mask2, other=0.0).to(tl.float32)
                acc += w[:, None] * v
                if JACOBIAN:
                    # d w / d frac_j: the weight with axis j's factor replaced by its slope (+1 or -1).
                    dwx = wz * wy if (c & 1) == 1 else -(wz * wy)
                    dwy = wz * wx if ((c >> 1) & 1) == 1 else -(wz * wx)
                    dwz = wy * wx if (c >> 2) == 1 else -(wy * wx)
                    jx += dwx[:, None] * v
                    jy += dwy[:, None] * v
                    jz += dwz[:, None] * v
            out_ptrs = out_ptr + point[:, None] * (L * F) + level * F + feat[None, :]
            tl.store(out_ptrs, acc, mask=mask2)
            if JACOBIAN:  # d frac / d x = R_l inside the clamp, 0 outside
                jac_ptrs = jac_ptr + point[:, None] * (3 * L * F) + level * F + feat[None, :]
                tl.store(jac_ptrs, (jx * resf) * in_x[:, None], mask=mask2)
                tl.store(jac_ptrs + L * F, (jy * resf) * in_y[:, None], mask=mask2)
                tl.store(jac_ptrs + 2 * L * F, (jz * resf) * in_z[:, None], mask=mask2)

    def _backward_kernel(
        x_ptr,  # [K, N, 3] float32, contiguous
        grad_out_ptr,  # [K, N, L * F] float32, contiguous
        grad_jac_ptr,  # [K, N, 3, L * F] float32, contiguous, when JACOBIAN (else unused)
        info_ptr,  # [L, 2] int32
        grad_tables_ptr,  # [K, L, T, F] float32, zero-initialised
        N,
        T,
        L,
        F: tl.constexpr,
        F_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
        JACOBIAN: tl.constexpr,
    ):
        k = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        point = k * N + offs
        rx = tl.load(x_ptr + point * 3 + 0, mask=mask, other=0.0)
        ry = tl.load(x_ptr + point * 3 + 1, mask=mask, other=0.0)
        rz = tl.load(x_ptr + point * 3 + 2, mask=mask, other=0.0)
        px = tl.minimum(tl.maximum(rx, 0.0), 1.0)
        py = tl.minimum(tl.maximum(ry, 0.0), 1.0)
        pz = tl.minimum(tl.maximum(rz, 0.0), 1.0)
        in_x = ((rx >= 0.0) & (rx <= 1.0)).to(tl.float32)
        in_y = ((ry >= 0.0) & (ry <= 1.0)).to(tl.float32)
        in_z = ((rz >= 0.0) & (rz <= 1.0)).to(tl.float32)
        feat = tl.arange(0, F_POW2)
        mask2 = mask[:, None] & (feat < F)[None, :]
        table_mask = (T - 1).to(tl.uint32)
        for level in range(L):
            res = tl.load(info_ptr + 2 * level)
            dense = tl.load(info_ptr + 2 * level + 1)
            side = res + 1
            resf = res.to(tl.float32)
            # Lower cell corner and fraction exactly as the reference: floor, clamp to [0, R - 1].
            pos_x, pos_y, pos_z = px * resf, py * resf, pz * resf
            cell_x = tl.minimum(tl.maximum(tl.floor(pos_x), 0.0), resf - 1.0)
            cell_y = tl.minimum(tl.maximum(tl.floor(pos_y), 0.0), resf - 1.0)
            cell_z = tl.minimum(tl.maximum(tl.floor(pos_z), 0.0), resf - 1.0)
            fx, fy, fz = pos_x - cell_x, pos_y - cell_y, pos_z - cell_z
            ix, iy, iz = cell_x.to(tl.int32), cell_y.to(tl.int32), cell_z.to(tl.int32)
            base = (k * L + level) * T
            g_ptrs = grad_out_ptr + point[:, None] * (L * F) + level * F + feat[None, :]
            g = tl.load(g_ptrs, mask=mask2, other=0.0)
            gx = tl.full([BLOCK, F_POW2], 0.0, tl.float32)
            gy = tl.full([BLOCK, F_POW2], 0.0, tl.float32)
            gz = tl.full([BLOCK, F_POW2], 0.0, tl.float32)
            if JACOBIAN:  # upstream gradient of jac, times d jac / d (sum_c dw_c * table_c) = R_l * inside
                gj_ptrs = grad_jac_ptr + point[:, None] * (3 * L * F) + level * F + feat[None, :]
                gx = tl.load(gj_ptrs, mask=mask2, other=0.0) * (resf * in_x)[:, None]
                gy = tl.load(gj_ptrs + L * F, mask=mask2, other=0.0) * (resf * in_y)[:, None]
                gz = tl.load(gj_ptrs + 2 * L * F, mask=mask2, other=0.0) * (resf * in_z)[:, None]
            for c in tl.static_range(8):
                # Corner c = x_bit + 2 * y_bit + 4 * z_bit; row as HashGridEncoding.vertex_index.
                vx, vy, vz = ix + (c & 1), iy + ((c >> 1) & 1), iz + (c >> 2)
                hashed = vx.to(tl.uint32) ^ (vy.to(tl.uint32) * 2654435761) ^ (vz.to(tl.uint32) * 805459861)
                row = tl.where(dense != 0, vz * (side * side) + vy * side + vx, (hashed & table_mask).to(tl.int32))
                wx = fx if (c & 1) == 1 else 1.0 - fx
                wy = fy if ((c >> 1) & 1) == 1 else 1.0 - fy
                wz = fz if (c >> 2) == 1 else 1.0 - fz
                w = (wz * wy) * wx  # the reference's product order
                contrib = w[:, None] * g
                if JACOBIAN:  # the scatter of interpolation-weight derivatives
                    dwx = wz * wy if (c & 1) == 1 else -(wz * wy)
                    dwy = wz * wx if ((c >> 1) & 1) == 1 else -(wz * wx)
                    dwz = wy * wx if (c >> 2) == 1 else -(wy * wx)
                    contrib += dwx[:, None] * gx + dwy[:, None] * gy + dwz[:, None] * gz
                ptrs = grad_tables_ptr + (base + row)[:, None] * F + feat[None, :]
                tl.atomic_add(ptrs, contrib, mask=mask2)

    _KERNEL_CACHE: dict[bool, tuple] = {}

    def _kernels(interpret: bool) -> tuple:
        """(forward, backward) kernels, compiled or interpreted (jitted once per mode)."""
        if interpret not in _KERNEL_CACHE:
            _KERNEL_CACHE[interpret] = (triton.jit(_forward_kernel), triton.jit(_backward_kernel))
        return _KERNEL_CACHE[interpret]


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read now."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


def _launch_config(device: torch.device) -> tuple[bool, int]:
    """(interpret, points per program) for tensors on `device`; ValueError where Triton can't run."""
    if triton is None:
        raise ValueError("field.backend=triton needs the triton package, which is not installed")
    interpret = triton_interpreting()
    if device.type != "cuda" and not interpret:
        raise ValueError(
            f"TritonHashGridEncoding runs on CUDA tensors, got a tensor on {str(device)!r}; use "
            "field.backend=torch on the CPU (or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
        )
    return interpret, BLOCK_POINTS_INTERPRETED if interpret else BLOCK_POINTS


class _HashGridFunction(torch.autograd.Function):
    """Fused encoding ``(x [K, N, 3] float32, tables [K, L, T, F], level_info [L, 2] int32,
    jacobian) -> features [K, N, L * F] float32``, and with `jacobian` also ``jac [K, N, 3, L * F]``
    (d features / dx); differentiable w.r.t. the tables only (the backward scatters both)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tables: torch.Tensor, level_info: torch.Tensor, jacobian: bool):  # type: ignore[override]
        k, lv, t, f = tables.shape
        n = x.shape[1]
        interpret, block = _launch_config(x.device)
        out = torch.empty(k, n, lv * f, device=x.device, dtype=torch.float32)
        jac = torch.empty(k, n, 3, lv * f, device=x.device, dtype=torch.float32) if jacobian else out
        if n > 0:
            forward_kernel, _ = _kernels(interpret)
            grid = (triton.cdiv(n, block), k)
            # No fused multiply-add: pos = x * res, then pos - floor(pos), rounded as PyTorch does.
            # With FMA the finest levels (res 2048) differed from the twin by ~2e-4 on the H200.
            forward_kernel[grid](
                x, tables, level_info, out, jac, n, t, lv,
                F=f, F_POW2=triton.next_power_of_2(f), BLOCK=block, JACOBIAN=jacobian,
                num_warps=NUM_WARPS, enable_fp_fusion=False,
            )  # fmt: skip
        ctx.save_for_backward(x, level_info)
        ctx.table_shape, ctx.table_dtype, ctx.jacobian = tables.shape, tables.dtype, jacobian
        return (out, jac) if jacobian else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor, grad_jac: torch.Tensor | None = None):  # type: ignore[override]
        x, level_info = ctx.saved_tensors
        k, lv, t, f = ctx.table_shape
        n = x.shape[1]
        interpret, block = _launch_config(x.device)
        grad_tables = torch.zeros(ctx.table_shape, device=x.device, dtype=torch.float32)
        if n > 0:
            _, backward_kernel = _kernels(interpret)
            grid = (triton.cdiv(n, block), k)
            grad_out = grad_out.float().contiguous()
            grad_jac = grad_jac.float().contiguous() if ctx.jacobian else grad_out
            backward_kernel[grid](
                x, grad_out, grad_jac, level_info, grad_tables, n, t, lv,
                F=f, F_POW2=triton.next_power_of_2(f), BLOCK=block, JACOBIAN=ctx.jacobian,
                num_warps=NUM_WARPS, enable_fp_fusion=False,
            )  # fmt: skip
        return None, grad_tables.to(ctx.table_dtype), None, None


class TritonHashGridEncoding(HashGridEncoding):
    """`HashGridEncoding` with fused Triton kernels: same ``tables [K, L, T, F]`` parameter and
    state_dict, same ``forward(x [K', N, 3] in [0, 1], prompts) -> [K', N, L * F]`` (float32) and
    ``forward_with_jacobian(x, prompts) -> ([K', N, L * F], [K', N, 3, L * F])``.

    Positions that require grad take the inherited PyTorch path (the kernels give no d/dx).
    """

    def __init__(self, num_prompts: int, cfg: FieldConfig, cpu_fallback: bool = False) -> None:
        """`cpu_fallback`: CPU positions take the PyTorch path (field.backend=auto) instead of
        raising (field.backend=triton)."""
        if triton is None:
            raise ValueError(
                "field.backend=triton needs the triton package, which is not installed (pip install triton); "
                "use field.backend=torch"
            )
        super().__init__(num_prompts, cfg)
        # [L, 2] int32 (resolution, dense) per level; a plain attribute (not a buffer) so the
        # state_dict stays identical to HashGridEncoding's. Copied per device on first use.
        self._level_info_cpu = torch.tensor(
            [[res, int(dense)] for res, dense in zip(self.resolutions, self.dense)], dtype=torch.int32
        )
        self._level_info: dict[torch.device, torch.Tensor] = {}
        self.cpu_fallback = cpu_fallback

    def _level_info_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._level_info:
            self._level_info[device] = self._level_info_cpu.to(device)
        return self._level_info[device]

    def _encode(
        self, x: torch.Tensor, prompts: slice | None, jacobian: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused kernels behind `forward` and `forward_with_jacobian` (the PyTorch path for CPU
        positions under `cpu_fallback`, and for positions that require grad)."""
        if self.cpu_fallback and x.device.type != "cuda" and not triton_interpreting():
            return super()._encode(x, prompts, jacobian)
        _launch_config(x.device)  # ValueError on the CPU outside the interpreter, on either path
        if x.requires_grad and torch.is_grad_enabled():
            return super()._encode(x, prompts, jacobian)
        tables = self.tables if prompts is None else self.tables[prompts]  # a view: grads reach self.tables
        if x.dim() != 3 or x.shape[-1] != 3 or x.shape[0] != tables.shape[0]:
            raise ValueError(f"expected positions of shape [{tables.shape[0]}, N, 3], got {tuple(x.shape)}")
        if tables.device != x.device:
            raise ValueError(f"positions on {str(x.device)!r} but hash tables on {str(tables.device)!r}")
        if tables.dtype != torch.float32:
            raise ValueError(f"the fused hash grid needs float32 tables, got {tables.dtype}; use field.backend=torch")
        x = x.detach().float().contiguous()
        result = _HashGridFunction.apply(x, tables.contiguous(), self._level_info_on(x.device), jacobian)
        return result if jacobian else (result, None)
