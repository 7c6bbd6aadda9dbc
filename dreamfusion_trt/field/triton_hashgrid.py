"""Fused Triton hash-grid encoding: the fast twin of `HashGridEncoding`.

`TritonHashGridEncoding` subclasses the pure-PyTorch `HashGridEncoding`, so it owns the same
parameter (``tables [K, L, T, F]``) and its checkpoints are interchangeable with the reference. Its
forward runs one Triton kernel over all levels (one program per block of points and prompt: loop
over levels, 8 corner rows computed exactly as `HashGridEncoding.vertex_index` does, trilinear
weights, fp32 accumulation) and its backward scatters ``weight * grad`` into fp32 table gradients
with ``tl.atomic_add``.

Corner rows: a dense level uses ``x + side * (y + side * z)``; a hashed level XORs the coordinates
times the primes ``(1, 2654435761, 805459861)``. The kernel multiplies in uint32, which wraps
modulo 2**32; since ``T`` is a power of two no larger than 2**30, ``& (T - 1)`` keeps only low bits
that are the same as those of the int64 products the reference computes.

Gradient w.r.t. the positions is *not* computed by the kernels: when ``x`` requires grad (autograd
normals, or anything upstream that needs d(features)/dx) the forward falls back to the PyTorch
reference path, which is exact and twice differentiable. Finite-difference normals and the usual
training step (positions without grad) take the fused path.

CPU tensors are only accepted under the Triton interpreter (``TRITON_INTERPRET=1``), which is how
the tests run the kernels without a GPU. Benchmark: ``python -m dreamfusion_trt.field.triton_hashgrid
--bench`` (CUDA).
"""

import argparse
import json
import logging
import os
import sys

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
        N,
        T,
        L,
        F: tl.constexpr,
        F_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        k = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        point = k * N + offs  # int64 row in [K * N]
        px = tl.minimum(tl.maximum(tl.load(x_ptr + point * 3 + 0, mask=mask, other=0.0), 0.0), 1.0)
        py = tl.minimum(tl.maximum(tl.load(x_ptr + point * 3 + 1, mask=mask, other=0.0), 0.0), 1.0)
        pz = tl.minimum(tl.maximum(tl.load(x_ptr + point * 3 + 2, mask=mask, other=0.0), 0.0), 1.0)
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
                acc += w[:, None] * tl.load(ptrs, mask=mask2, other=0.0).to(tl.float32)
            out_ptrs = out_ptr + point[:, None] * (L * F) + level * F + feat[None, :]
            tl.store(out_ptrs, acc, mask=mask2)

    def _backward_kernel(
        x_ptr,  # [K, N, 3] float32, contiguous
        grad_out_ptr,  # [K, N, L * F] float32, contiguous
        info_ptr,  # [L, 2] int32
        grad_tables_ptr,  # [K, L, T, F] float32, zero-initialised
        N,
        T,
        L,
        F: tl.constexpr,
        F_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        k = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        point = k * N + offs
        px = tl.minimum(tl.maximum(tl.load(x_ptr + point * 3 + 0, mask=mask, other=0.0), 0.0), 1.0)
        py = tl.minimum(tl.maximum(tl.load(x_ptr + point * 3 + 1, mask=mask, other=0.0), 0.0), 1.0)
        pz = tl.minimum(tl.maximum(tl.load(x_ptr + point * 3 + 2, mask=mask, other=0.0), 0.0), 1.0)
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
            for c in tl.static_range(8):
                # Corner c = x_bit + 2 * y_bit + 4 * z_bit; row as HashGridEncoding.vertex_index.
                vx, vy, vz = ix + (c & 1), iy + ((c >> 1) & 1), iz + (c >> 2)
                hashed = vx.to(tl.uint32) ^ (vy.to(tl.uint32) * 2654435761) ^ (vz.to(tl.uint32) * 805459861)
                row = tl.where(dense != 0, vz * (side * side) + vy * side + vx, (hashed & table_mask).to(tl.int32))
                wx = fx if (c & 1) == 1 else 1.0 - fx
                wy = fy if ((c >> 1) & 1) == 1 else 1.0 - fy
                wz = fz if (c >> 2) == 1 else 1.0 - fz
                w = (wz * wy) * wx  # the reference's product order
                ptrs = grad_tables_ptr + (base + row)[:, None] * F + feat[None, :]
                tl.atomic_add(ptrs, w[:, None] * g, mask=mask2)

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
    """Fused encoding ``(x [K, N, 3] float32, tables [K, L, T, F], level_info [L, 2] int32) ->
    [K, N, L * F] float32``; differentiable w.r.t. the tables only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tables: torch.Tensor, level_info: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        k, lv, t, f = tables.shape
        n = x.shape[1]
        interpret, block = _launch_config(x.device)
        out = torch.empty(k, n, lv * f, device=x.device, dtype=torch.float32)
        if n > 0:
            forward_kernel, _ = _kernels(interpret)
            grid = (triton.cdiv(n, block), k)
            # No fused multiply-add: pos = x * res, then pos - floor(pos), rounded as PyTorch does.
            # With FMA the finest levels (res 2048) differed from the twin by ~2e-4 on the H200.
            forward_kernel[grid](
                x, tables, level_info, out, n, t, lv,
                F=f, F_POW2=triton.next_power_of_2(f), BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False,
            )  # fmt: skip
        ctx.save_for_backward(x, level_info)
        ctx.table_shape, ctx.table_dtype = tables.shape, tables.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, level_info = ctx.saved_tensors
        k, lv, t, f = ctx.table_shape
        n = x.shape[1]
        interpret, block = _launch_config(x.device)
        grad_tables = torch.zeros(ctx.table_shape, device=x.device, dtype=torch.float32)
        if n > 0:
            _, backward_kernel = _kernels(interpret)
            grid = (triton.cdiv(n, block), k)
            backward_kernel[grid](
                x, grad_out.float().contiguous(), level_info, grad_tables, n, t, lv,
                F=f, F_POW2=triton.next_power_of_2(f), BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False,
            )  # fmt: skip
        return None, grad_tables.to(ctx.table_dtype), None


class TritonHashGridEncoding(HashGridEncoding):
    """`HashGridEncoding` with fused Triton kernels: same ``tables [K, L, T, F]`` parameter and
    state_dict, same ``forward(x [K', N, 3] in [0, 1], prompts) -> [K', N, L * F]`` (float32).

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

    def forward(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        """Encode positions ``x [K', N, 3]`` in [0, 1] (clamped) -> features ``[K', N, L * F]``
        (float32); `prompts` picks a contiguous subset of the K stacked tables (default: all)."""
        if self.cpu_fallback and x.device.type != "cuda" and not triton_interpreting():
            return super().forward(x, prompts)
        _launch_config(x.device)  # ValueError on the CPU outside the interpreter, on either path
        if x.requires_grad and torch.is_grad_enabled():
            return super().forward(x, prompts)
        tables = self.tables if prompts is None else self.tables[prompts]  # a view: grads reach self.tables
        if x.dim() != 3 or x.shape[-1] != 3 or x.shape[0] != tables.shape[0]:
            raise ValueError(f"expected positions of shape [{tables.shape[0]}, N, 3], got {tuple(x.shape)}")
        if tables.device != x.device:
            raise ValueError(f"positions on {str(x.device)!r} but hash tables on {str(tables.device)!r}")
        x = x.detach().float().contiguous()
        return _HashGridFunction.apply(x, tables.contiguous(), self._level_info_on(x.device))


# -- benchmark ------------------------------------------------------------------------------------


def benchmark(num_points: int, num_prompts: int = 1, warmup: int = 3, iters: int = 10) -> list[dict]:
    """Median ms of forward, and of forward + backward to the tables, for the PyTorch and Triton
    encodings with the same tables on random CUDA points ``[K, num_points, 3]`` (default FieldConfig:
    16 levels, T = 2**19, F = 2)."""
    if not torch.cuda.is_available():
        raise ValueError("the hash-grid benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
    cfg = FieldConfig()
    device = torch.device("cuda")
    reference = HashGridEncoding(num_prompts, cfg).to(device)
    fused = TritonHashGridEncoding(num_prompts, cfg).to(device)
    fused.load_state_dict(reference.state_dict())
    x = torch.rand(num_prompts, num_points, 3, device=device)
    grad = torch.randn(num_prompts, num_points, reference.output_dim, device=device)
    rows = []
    for name, enc in (("torch", reference), ("triton", fused)):
        for stage in ("forward", "forward+backward"):
            times = []
            torch.cuda.reset_peak_memory_stats()
            for i in range(warmup + iters):
                enc.tables.grad = None
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                if stage == "forward":
                    with torch.no_grad():
                        enc(x)
                else:
                    enc(x).backward(grad)
                end.record()
                torch.cuda.synchronize()
                if i >= warmup:
                    times.append(start.elapsed_time(end))
            rows.append(
                {
                    "impl": name,
                    "stage": stage,
                    "median_ms": sorted(times)[len(times) // 2],
                    "max_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
                }
            )
    return rows


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time both encodings on the GPU")
    parser.add_argument("--points", type=int, default=64 * 64 * 96 * 7, help="points per prompt")
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO)
    try:
        rows = benchmark(args.points, args.prompts, iters=args.iters)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"hash grid, K={args.prompts}, N={args.points}, {torch.cuda.get_device_name()}")
    print(f"{'impl':<8} {'stage':<18} {'median ms':>10} {'peak MiB':>10}")
    for row in rows:
        print(f"{row['impl']:<8} {row['stage']:<18} {row['median_ms']:>10.3f} {row['max_memory_mib']:>10.0f}")
    if args.json:
        from ..atomic import atomic_path  # noqa: PLC0415

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
