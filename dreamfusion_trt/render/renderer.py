"""The renderer: rays in, shaded pixels out, for K prompts at once.

Two samplers feed one compositing path:

- ``torch``: `num_samples` stratified samples between each ray's entry into and exit from the box
  ``[-bound, bound]^3`` (jittered inside their bins in training mode, bin centres otherwise),
  composited with the fixed-count functions of `volrend`. Runs anywhere.
- ``nerfacc`` (CUDA): one `nerfacc.OccGridEstimator` per prompt marches each ray with a constant
  step through occupied cells only, skips samples behind opaque ones (early stop), and the packed
  samples of all prompts are composited with nerfacc's `render_weight_from_density` and
  `accumulate_along_rays`. The march step is ``render.render_step_size`` or, when that is 0,
  ``2 * sqrt(3) * bound / num_samples``: the box diagonal cut into `num_samples` steps, so no ray
  gets more samples than the torch renderer would give it. The occupancy grids are buffers of this
  module (saved in its state_dict) and start fully occupied, so a fresh renderer renders before
  its first `update_occupancy`. Every renderer holds them, whichever backend it uses (without
  nerfacc an `OccupancyGrid` stand-in keeps the same tensors), so its state_dict is the same
  with or without nerfacc: ``estimators.<k>.occs [R^3]`` and ``estimators.<k>.binaries [1, R, R, R]``.
- ``auto``: nerfacc when the rays are on CUDA and nerfacc imports, else torch.

Shading happens per sample (see `shading.py`), one mode for all prompts or one mode per prompt,
then colours, opacity, depth, normals and the Ref-NeRF orientation penalty are accumulated along
the rays and the background is composited. A trainer that keeps each prompt's randomness apart
passes the stratified jitter and the background in (``jitter=``, ``background=``) instead of a
generator.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..cameras import CameraBatch, get_rays
from ..config import RenderConfig
from ..field.background import Background
from ..field.nerf import FieldOutput, NeRFField
from . import volrend
from .nerfacc_kernels import load_kernels
from .occupancy import DERIVED_GRID_BUFFERS, OccupancyGrid, upgrade_scene_state
from .sampling import ray_aabb_intersect, stratified_intervals
from .shading import NEEDS_NORMALS, SHADING_MODES, shade, shade_per_prompt

logger = logging.getLogger(__name__)

EARLY_STOP_EPS = 1e-4  # nerfacc marching drops samples behind a transmittance below this
OCC_EVAL_CHUNK = 2**18  # points per density query while refreshing an occupancy grid

# weights, per-sample values [..., C] -> per-ray [K, R, C]
Accumulator = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
# One mode for every prompt, one per prompt, or [K] indices into SHADING_MODES (device-side choice).
Shading = str | Sequence[str] | torch.Tensor


def to_device_async(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to `device` without a host synchronisation (pinned memory and a
    non-blocking copy on CUDA)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


@dataclass
class _PromptShading:
    """Per-prompt shading resolved for one render: `modes` to evaluate and `index` [K] (long, on
    the rays' device) picking one of them per prompt."""

    modes: tuple[str, ...]
    index: torch.Tensor


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [K, R, 3] shaded colour composited over the background
    opacity: torch.Tensor  # [K, R] accumulated weight, in [0, 1]
    depth: torch.Tensor  # [K, R] expected distance along the ray given a hit (sum w t / opacity); 0 where empty
    background: torch.Tensor | None = None  # [K, R, 3] the background colour behind each ray
    normal: torch.Tensor | None = None  # [K, R, 3] sum of w * world normal (not renormalised)
    orientation: torch.Tensor | None = None  # [K] Ref-NeRF penalty, mean over rays of sum w max(0, n.d)^2
    orientation_rays: torch.Tensor | None = None  # [K, R] the penalty of each ray (before that mean)
    num_samples: int = 0  # field samples composited (for logs)
    rgb_opacity: torch.Tensor | None = None  # [K, R] the opacity in front of the background, with the colour's geometry gradient (internal)


def scale_grad(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x` in value; its gradient multiplied by `scale` (broadcast against `x`) on the way back."""
    d = x.detach()
    return d + scale * (x - d)


def bucket_size(n: int, per_octave: int = 8) -> int:
    """`n` rounded up to one of `per_octave` sizes per power of two (at most 1/`per_octave` more,
    and at least 256): the nerfacc marcher's sample count changes every step, and a network call
    on a new shape pays for it on the host (cuBLAS heuristics, a dynamic compile's
    specialisation); padded to these sizes, a run sees a few dozen shapes instead of one per step."""
    if n <= 256:
        return 256
    step = 1 << max((n - 1).bit_length() - 1 - (per_octave.bit_length() - 1), 0)
    return -(-n // step) * step


def _nerfacc():
    try:
        import nerfacc  # noqa: PLC0415
    except ImportError:
        return None
    return nerfacc


class Renderer(nn.Module):
    """Holds the field, the background and one occupancy grid per prompt (marched by nerfacc,
    carried along by the torch sampler): one state_dict, the same with or without nerfacc.

    ``render(rays_o [K, R, 3], rays_d [K, R, 3], light_dir [K, 3], ...) -> RenderOutput``.
    """

    def __init__(
        self,
        field: NeRFField,
        background: Background,
        cfg: RenderConfig,
        bound: float | None = None,
    ) -> None:
        super().__init__()
        if cfg.backend not in ("auto", "nerfacc", "torch"):
            raise ValueError(f"render.backend must be 'auto', 'nerfacc' or 'torch', got {cfg.backend!r}")
        if cfg.num_samples < 1:
            raise ValueError(f"render.num_samples must be at least 1, got {cfg.num_samples!r}")
        if cfg.render_step_size < 0:
            raise ValueError(f"render.render_step_size must be >= 0, got {cfg.render_step_size!r}")
        if cfg.grid_warmup < 0:
            raise ValueError(f"render.grid_warmup must be >= 0 steps, got {cfg.grid_warmup!r}")
        self.field = field
        self.background = background
        self.cfg = cfg
        self.num_prompts = field.num_prompts
        self.bound = float(field.bound if bound is None else bound)
        self.step_size = cfg.render_step_size or 2.0 * math.sqrt(3.0) * self.bound / cfg.num_samples
        # One occupancy grid per prompt, always: a nerfacc estimator where nerfacc imports and may
        # be used, otherwise a stand-in holding the same tensors. The state_dict is the same
        # either way (see `OccupancyGrid`), so a scene saved with or without nerfacc opens in both.
        self._marcher = False
        nerfacc = None
        if cfg.backend in ("auto", "nerfacc"):
            nerfacc = _nerfacc()
            if nerfacc is None:
                if cfg.backend == "nerfacc":
                    raise ValueError("render.backend='nerfacc' needs the nerfacc package, which does not import")
                logger.info("nerfacc does not import; the torch renderer will be used")
        grids = []
        for _ in range(self.num_prompts):
            if nerfacc is not None:
                b = self.bound
                est = nerfacc.OccGridEstimator(roi_aabb=[-b, -b, -b, b, b, b], resolution=cfg.grid_resolution)
                # The box and resolution follow from the config; saving them would make the
                # state depend on the backend. (torch's own set of buffers left out of state_dict.)
                est._non_persistent_buffers_set.update(DERIVED_GRID_BUFFERS)
            else:
                est = OccupancyGrid(cfg.grid_resolution)
            est.binaries.fill_(True)
            grids.append(est)
        self.estimators = nn.ModuleList(grids)
        self._marcher = nerfacc is not None
        # "torch" makes `backend_for` pick the torch sampler whatever render.backend auto would:
        # set by a trainer that replays its steps as CUDA graphs (static shapes). Not saved.
        self.sampler: str | None = None

    # -- saved state ------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict` after `upgrade_scene_state` (scenes saved by older versions,
        with or without nerfacc, load into either backend)."""
        state = upgrade_scene_state(state_dict, self.num_prompts, self.cfg.grid_resolution)
        return super().load_state_dict(state, strict=strict, assign=assign)

    # -- backend choice ---------------------------------------------------------------------------

    def backend_for(self, device: torch.device) -> str:
        """The sampler used for rays on `device`: "nerfacc" or "torch"."""
        if self.cfg.backend == "torch" or self.sampler == "torch":
            return "torch"
        if self.cfg.backend == "nerfacc":
            if device.type != "cuda":
                raise ValueError(f"render.backend='nerfacc' needs CUDA tensors, got rays on {str(device)!r}")
            load_kernels()
            return "nerfacc"
        if device.type == "cuda" and self._marcher:
            try:
                load_kernels()  # once per process; the first build on a machine is logged
            except ValueError as exc:
                logger.warning("%s; rendering with the torch sampler", exc)
                self._marcher = False
                return "torch"
            return "nerfacc"
        return "torch"

    def _device(self) -> torch.device:
        return next(self.field.parameters()).device

    # -- rendering --------------------------------------------------------------------------------

    def render(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        light_dir: torch.Tensor,
        shading: str = "albedo",
        ambient_ratio: float = 0.1,
        generator: torch.Generator | None = None,
        need_normals: bool = False,
        stratified: bool | None = None,
        background: torch.Tensor | None = None,
        jitter: torch.Tensor | None = None,
        geometry_grad: torch.Tensor | None = None,
    ) -> RenderOutput:
        """Render rays ``[K, R, 3]`` (unit directions) lit from ``light_dir [K, 3]`` (towards the light).

        `shading` is one mode for all prompts, a sequence of K modes (one per prompt), or a long
        tensor ``[K]`` of indices into `SHADING_MODES` (chosen on the device: normals are then
        always computed). Normals (and the orientation penalty) are computed when the shading
        needs them or when `need_normals` is set. `stratified` (default: training mode) jitters
        the samples; the torch sampler and the "random" background draw from `generator` when
        given. `jitter` (``[K, R, S]`` uniform numbers in [0, 1), S = ``render.num_samples``)
        places the torch sampler's stratified samples instead (the nerfacc marcher ignores it).
        `background` (``[K, R, 3]`` or ``[K, 1, 3]``) replaces the Background module's colours.
        `geometry_grad` (``[K]`` float in [0, 1], default all 1) scales the part of each prompt's
        ``rgb`` gradient that reaches the density: through the weights, the opacity in front of the
        background and the shading normals. At 0 the colour is differentiable in the albedo only
        (and the background); opacity, depth, normals and the orientation penalty keep their full
        gradient either way.
        """
        k = self.num_prompts
        self._check_rays(rays_o, rays_d, light_dir)
        mode = self._resolve_shading(shading, k, rays_o.device)
        if geometry_grad is not None and tuple(geometry_grad.shape) != (k,):
            raise ValueError(f"expected geometry_grad of shape [{k}], got {tuple(geometry_grad.shape)}")
        return self._render_many(
            rays_o, rays_d, light_dir, [mode], ambient_ratio, generator, need_normals, stratified, background, jitter,
            geometry_grad,
        )[0]

    def render_shadings(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        light_dir: torch.Tensor,
        shadings: Sequence[str],
        ambient_ratio: float = 0.1,
        generator: torch.Generator | None = None,
        stratified: bool | None = None,
        background: torch.Tensor | None = None,
        jitter: torch.Tensor | None = None,
    ) -> dict[str, RenderOutput]:
        """`render` for several shading modes at once: the samples, the field query (density,
        albedo, normals), the weights, opacity, depth and normals are computed once and only the
        shading differs, so N modes cost about one render. Returns ``{mode: RenderOutput}``, each
        equal to ``render(..., shading=mode, need_normals=<any mode needs them>)``; the outputs
        share every tensor but ``rgb``."""
        self._check_rays(rays_o, rays_d, light_dir)
        modes = list(dict.fromkeys(shadings))
        if not modes:
            raise ValueError("render_shadings needs at least one shading mode")
        resolved = [self._resolve_shading(m, self.num_prompts, rays_o.device) for m in modes]
        outs = self._render_many(
            rays_o, rays_d, light_dir, resolved, ambient_ratio, generator, False, stratified, background, jitter
        )
        return dict(zip(modes, outs))

    def _check_rays(self, rays_o: torch.Tensor, rays_d: torch.Tensor, light_dir: torch.Tensor) -> None:
        k = self.num_prompts
        if rays_o.dim() != 3 or rays_o.shape[0] != k or rays_o.shape[-1] != 3 or rays_d.shape != rays_o.shape:
            raise ValueError(
                f"expected rays_o and rays_d of shape [{k}, R, 3], got {tuple(rays_o.shape)} and {tuple(rays_d.shape)}"
            )
        if light_dir.shape != (k, 3):
            raise ValueError(f"expected light_dir of shape [{k}, 3], got {tuple(light_dir.shape)}")

    def _render_many(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        light_dir: torch.Tensor,
        modes: list[str | _PromptShading],
        ambient_ratio: float,
        generator: torch.Generator | None,
        need_normals: bool,
        stratified: bool | None,
        background: torch.Tensor | None,
        jitter: torch.Tensor | None,
        geometry_grad: torch.Tensor | None = None,
    ) -> list[RenderOutput]:
        """One sampling and field query, one RenderOutput per resolved shading in `modes`."""
        k = self.num_prompts
        for mode in modes:
            if isinstance(mode, str):
                need_normals = need_normals or mode in NEEDS_NORMALS
            else:
                need_normals = need_normals or any(m in NEEDS_NORMALS for m in mode.modes)
        stratify = self.training if stratified is None else stratified
        if jitter is not None:
            want = (k, rays_o.shape[1], self.cfg.num_samples)
            if tuple(jitter.shape) != want:
                raise ValueError(f"expected jitter of shape {list(want)}, got {tuple(jitter.shape)}")
        rays_o, rays_d, light_dir = rays_o.float(), rays_d.float(), light_dir.float()
        if self.backend_for(rays_o.device) == "nerfacc":
            outs = self._render_nerfacc(rays_o, rays_d, light_dir, modes, ambient_ratio, need_normals, stratify, geometry_grad)
        else:
            outs = self._render_torch(rays_o, rays_d, light_dir, modes, ambient_ratio, need_normals, stratify, generator, jitter,
                                      geometry_grad)  # fmt: skip
        if background is None:
            bg = self.background(rays_d, generator=generator)  # [K, R, 3]
        else:
            if background.dim() != 3 or background.shape[0] != k or background.shape[-1] != 3:
                raise ValueError(
                    f"expected a background of shape [{k}, R, 3] or [{k}, 1, 3], got {tuple(background.shape)}"
                )
            bg = background.to(rays_d.device, torch.float32).expand(rays_d.shape)
        for out in outs:
            out.background = bg
            opacity = out.opacity if out.rgb_opacity is None else out.rgb_opacity
            out.rgb = volrend.composite_background(out.rgb, opacity[..., None], bg)
            out.rgb_opacity = None
        return outs

    @staticmethod
    def _resolve_shading(shading: Shading, k: int, device: torch.device) -> str | _PromptShading:
        if isinstance(shading, str):
            if shading not in SHADING_MODES:
                raise ValueError(f"shading must be one of {', '.join(SHADING_MODES)}, got {shading!r}")
            return shading
        if isinstance(shading, torch.Tensor):
            if shading.shape != (k,) or shading.dtype != torch.long:
                raise ValueError(f"a shading tensor must be long of shape [{k}], got {shading.dtype} {tuple(shading.shape)}")
            return _PromptShading(SHADING_MODES, shading.to(device))
        modes = list(shading)
        if len(modes) != k:
            raise ValueError(f"expected one shading mode per prompt ({k}), got {len(modes)}: {modes!r}")
        for m in modes:
            if m not in SHADING_MODES:
                raise ValueError(f"shading must be one of {', '.join(SHADING_MODES)}, got {m!r}")
        present = tuple(m for m in SHADING_MODES if m in modes)
        if len(present) == 1:
            return present[0]
        index = torch.tensor([present.index(m) for m in modes], dtype=torch.long)
        return _PromptShading(present, to_device_async(index, device))

    def _render_torch(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        light_dir: torch.Tensor,
        shadings: list[str | _PromptShading],
        ambient_ratio: float,
        need_normals: bool,
        stratify: bool,
        generator: torch.Generator | None,
        jitter: torch.Tensor | None = None,
        geometry_grad: torch.Tensor | None = None,
    ) -> list[RenderOutput]:
        k, r = rays_o.shape[:2]
        s = self.cfg.num_samples
        near, far, _ = ray_aabb_intersect(rays_o, rays_d, self.bound)  # [K, R]
        if jitter is not None and stratify:
            t_starts, t_ends, _ = stratified_intervals(near, far, s, False)
            t = t_starts + (t_ends - t_starts) * jitter.to(t_starts.dtype)  # [K, R, S]
        else:
            t_starts, t_ends, t = stratified_intervals(near, far, s, stratify, generator)  # [K, R, S]
        pts = rays_o[:, :, None, :] + rays_d[:, :, None, :] * t[..., None]  # [K, R, S, 3]
        fo = self.field.query(pts.reshape(k, r * s, 3), with_normals=need_normals)
        sigma = fo.sigma.reshape(k, r, s)
        weights, _, _ = volrend.weights_from_density(t_starts, t_ends, sigma)  # [K, R, S]
        per_sample = FieldOutput(
            sigma=sigma,
            albedo=fo.albedo.reshape(k, r, s, 3),
            normal=None if fo.normal is None else fo.normal.reshape(k, r, s, 3),
        )
        return self._composite(
            acc=volrend.accumulate,
            weights=weights,
            t_mid=t,
            fo=per_sample,
            dirs=rays_d[:, :, None, :],
            light=light_dir[:, None, None, :],
            shadings=shadings,
            ambient_ratio=ambient_ratio,
            num_samples=k * r * s,
            sample_prompt=torch.arange(k, device=rays_o.device).view(k, 1, 1),
            geometry_grad=geometry_grad,
        )

    def _march_each(self, flat_o: torch.Tensor, flat_d: torch.Tensor, k: int, r: int, jitter: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:  # fmt: skip
        """March every prompt's rays through its own occupancy grid, one nerfacc call per prompt
        (the twin of `_march_together`). Returns packed (global ray index [N] long, t_starts,
        t_ends) and each prompt's sample count."""
        ray_ids, starts, ends = [], [], []
        for i, est in enumerate(self.estimators):
            o_i, d_i = flat_o[i * r : (i + 1) * r], flat_d[i * r : (i + 1) * r]

            def sigma_fn(t0, t1, ri, o_i=o_i, d_i=d_i, i=i):
                x = o_i[ri] + d_i[ri] * ((t0 + t1) * 0.5)[:, None]
                n = x.shape[0]  # padded to a bucket of sizes (see `bucket_size`), the padding's densities dropped
                x = torch.cat([x, x.new_zeros(bucket_size(n) - n, 3)])
                return self.field.density(x[None], prompts=slice(i, i + 1))[0, :n]

            ri, t0, t1 = est.sampling(
                o_i,
                d_i,
                sigma_fn=sigma_fn,
                render_step_size=self.step_size,
                early_stop_eps=EARLY_STOP_EPS,
                stratified=jitter,
            )
            ray_ids.append(ri.long() + i * r)
            starts.append(t0)
            ends.append(t1)
        return torch.cat(ray_ids), torch.cat(starts), torch.cat(ends), [len(x) for x in ray_ids]

    @torch.no_grad()
    def _march_together(self, flat_o: torch.Tensor, flat_d: torch.Tensor, k: int, r: int, jitter: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:  # fmt: skip
        """All K prompts in one nerfacc traversal: prompt k's box is moved to x + 2 * bound * k,
        its grid fills cells [k R, (k + 1) R) of one [K R, R, R] grid, and each ray marches the
        lattice its own prompt's march would (from 0, or the jitter, in steps of the march step)
        between its own box's faces only. The early-stop density probe is one stacked field call.
        A handful of host synchronisations per step instead of about three per prompt; the
        samples are `_march_each`'s up to float rounding of the shifted coordinates."""
        from nerfacc.grid import traverse_grids  # noqa: PLC0415
        from nerfacc.volrend import render_visibility_from_density  # noqa: PLC0415

        b, dt, device = self.bound, self.step_size, flat_o.device
        shift = (2.0 * b) * torch.arange(k, device=device, dtype=flat_o.dtype).repeat_interleave(r)  # [K R]
        shifted_o = flat_o.clone()
        shifted_o[:, 0] += shift
        near, far, _ = ray_aabb_intersect(flat_o, flat_d, b)  # own box, unshifted frame [K R]
        # The lattice of a lone march (nerfacc starts it at the near plane 0, plus a jitter of up to
        # one step), started at its first sample whose midpoint is inside the box.
        origin = torch.rand_like(near) * dt if jitter else torch.zeros_like(near)
        first = torch.ceil((near - origin - 0.5 * dt) / dt).clamp_min(0.0)
        start = origin + first * dt
        stop = torch.where(far > near, far, start)  # a ray that misses marches nothing
        binaries = torch.cat([est.binaries for est in self.estimators], dim=1)  # [1, K R, R, R]
        aabb = torch.tensor([[-b, -b, -b, -b + 2.0 * b * k, b, b]], device=device, dtype=torch.float32)
        intervals, samples, _ = traverse_grids(shifted_o, flat_d, binaries, aabb, near_planes=start, far_planes=stop,
                                               step_size=dt, cone_angle=0.0)  # fmt: skip
        t_starts = intervals.vals[intervals.is_left]
        t_ends = intervals.vals[intervals.is_right]
        ray_indices = samples.ray_indices.long()
        if EARLY_STOP_EPS > 0 and len(ray_indices):
            x = flat_o[ray_indices] + flat_d[ray_indices] * ((t_starts + t_ends) * 0.5)[:, None]
            counts = torch.bincount(ray_indices // r, minlength=k)
            slot, n_max = self._sample_slots(ray_indices // r, counts, counts.tolist())
            x_pad = torch.zeros(k * n_max, 3, device=device, dtype=x.dtype).index_copy(0, slot, x)
            sigmas = self.field.density(x_pad.view(k, n_max, 3)).reshape(-1)[slot]
            keep = render_visibility_from_density(t_starts, t_ends, sigmas, packed_info=samples.packed_info,
                                                  early_stop_eps=EARLY_STOP_EPS, alpha_thre=0.0)  # fmt: skip
            ray_indices, t_starts, t_ends = ray_indices[keep], t_starts[keep], t_ends[keep]
        return ray_indices, t_starts, t_ends, torch.bincount(ray_indices // r, minlength=k).tolist()

    @staticmethod
    def _sample_slots(prompt_of: torch.Tensor, counts: torch.Tensor, counts_host: list[int]) -> tuple[torch.Tensor, int]:
        """Row of each packed sample in a [K, n_max] stack (prompts' samples are contiguous and in
        prompt order); n_max is the largest count rounded up to a bucket size."""
        n_max = bucket_size(max(counts_host))
        offsets = torch.cumsum(counts, 0) - counts
        slot = prompt_of * n_max + (torch.arange(len(prompt_of), device=prompt_of.device) - offsets[prompt_of])
        return slot, n_max

    def _render_nerfacc(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        light_dir: torch.Tensor,
        shadings: list[str | _PromptShading],
        ambient_ratio: float,
        need_normals: bool,
        jitter: bool,
        geometry_grad: torch.Tensor | None = None,
    ) -> list[RenderOutput]:
        import nerfacc  # noqa: PLC0415  (backend_for checked it imports)

        k, r = rays_o.shape[:2]
        n_rays = k * r
        flat_o = rays_o.reshape(n_rays, 3).contiguous()
        flat_d = rays_d.reshape(n_rays, 3).contiguous()

        if self.cfg.batched_marching and k > 1:
            ray_indices, t_starts, t_ends, counts_host = self._march_together(flat_o, flat_d, k, r, jitter)
        else:
            ray_indices, t_starts, t_ends, counts_host = self._march_each(flat_o, flat_d, k, r, jitter)
        t_mid = (t_starts + t_ends) * 0.5

        # Evaluate all prompts in one stacked field call: pad each prompt's samples to the longest,
        # rounded up to a bucket of sizes so the network sees few distinct shapes.
        prompt_of = ray_indices // r  # [N]
        slot, n_max = self._sample_slots(prompt_of, torch.tensor(counts_host, device=flat_o.device), counts_host)
        x = flat_o[ray_indices] + flat_d[ray_indices] * t_mid[:, None]  # [N, 3]
        x_pad = torch.zeros(k * n_max, 3, device=x.device, dtype=x.dtype).index_copy(0, slot, x)
        fo = self.field.query(x_pad.view(k, n_max, 3), with_normals=need_normals)
        per_sample = FieldOutput(
            sigma=fo.sigma.reshape(-1)[slot].contiguous(),
            albedo=fo.albedo.reshape(-1, 3)[slot],
            normal=None if fo.normal is None else fo.normal.reshape(-1, 3)[slot],
        )
        weights, _, _ = nerfacc.render_weight_from_density(
            t_starts, t_ends, per_sample.sigma, ray_indices=ray_indices, n_rays=n_rays
        )

        def acc(w: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
            return nerfacc.accumulate_along_rays(w, values, ray_indices=ray_indices, n_rays=n_rays).view(k, r, -1)

        return self._composite(
            acc=acc,
            weights=weights,
            t_mid=t_mid,
            fo=per_sample,
            dirs=flat_d[ray_indices],
            light=light_dir[prompt_of],
            shadings=shadings,
            ambient_ratio=ambient_ratio,
            num_samples=len(ray_indices),
            sample_prompt=prompt_of,
            geometry_grad=geometry_grad,
        )

    def _composite(
        self,
        acc: Accumulator,
        weights: torch.Tensor,
        t_mid: torch.Tensor,
        fo: FieldOutput,
        dirs: torch.Tensor,
        light: torch.Tensor,
        shadings: list[str | _PromptShading],
        ambient_ratio: float,
        num_samples: int,
        sample_prompt: torch.Tensor | None = None,
        geometry_grad: torch.Tensor | None = None,
    ) -> list[RenderOutput]:
        """Shade samples and accumulate them into per-ray ``[K, R, C]`` quantities, once per
        entry of `shadings` (everything but the colour is computed once and shared); `dirs` and
        `light` broadcast against the per-sample values (fixed-count or packed alike), and so
        does `sample_prompt` (the prompt of each sample, for per-prompt shading). With
        `geometry_grad`, the colour is composited with weights and normals whose gradient is
        scaled by each sample's prompt's entry (`scale_grad`)."""
        rgb_weights, rgb_normal, rgb_opacity = weights, fo.normal, None
        if geometry_grad is not None:
            g = geometry_grad.to(weights.device, weights.dtype)[sample_prompt]  # broadcasts like the weights
            rgb_weights = scale_grad(weights, g)
            rgb_normal = None if fo.normal is None else scale_grad(fo.normal, g[..., None])
            rgb_opacity = acc(rgb_weights, None)[..., 0]  # [K, R]
        rgbs = []
        for shading in shadings:
            if isinstance(shading, str):
                colors = shade(shading, fo.albedo, rgb_normal, light, ambient_ratio)
            else:
                index = shading.index[sample_prompt]  # mode of each sample's prompt
                colors = shade_per_prompt(shading.modes, index, fo.albedo, rgb_normal, light, ambient_ratio)
            rgbs.append(acc(rgb_weights, colors))  # [K, R, 3]
        rgb = rgbs[0]
        opacity = acc(weights, None)[..., 0]  # [K, R]
        depth_sum = acc(weights, t_mid[..., None])[..., 0]
        depth = torch.where(opacity > 1e-6, depth_sum / opacity.clamp_min(1e-6), torch.zeros_like(opacity))
        out = RenderOutput(rgb=rgb, opacity=opacity, depth=depth, num_samples=num_samples, rgb_opacity=rgb_opacity)
        if fo.normal is not None:
            out.normal = acc(weights, fo.normal)
            # Ref-NeRF orientation penalty: visible normals should not face away from the camera
            # (n . d > 0). Weights are detached, as stable-dreamfusion does, so the penalty turns
            # normals rather than thinning out density.
            facing_away = (fo.normal * dirs).sum(dim=-1, keepdim=True).clamp_min(0.0).square()
            out.orientation_rays = acc(weights.detach(), facing_away)[..., 0]  # [K, R]
            out.orientation = out.orientation_rays.mean(dim=-1)  # [K]
        return [out] + [dataclasses.replace(out, rgb=other) for other in rgbs[1:]]


    # -- occupancy grids --------------------------------------------------------------------------

    @torch.no_grad()
    def update_occupancy(self, step: int | Sequence[int | None]) -> None:
        """Refresh the nerfacc occupancy grids every ``render.grid_update_every`` steps with the
        field's density times the march step (threshold ``render.occupancy_threshold``).
        `step` is the training step of every prompt, or one step per prompt (None skips that
        prompt's grid). Call once per training step before rendering. No-op for the torch
        sampler and in eval mode."""
        if not self._marcher or not self.training or self.backend_for(self._device()) != "nerfacc":
            return
        steps = [step] * self.num_prompts if isinstance(step, int) else list(step)
        if len(steps) != self.num_prompts:
            raise ValueError(f"expected one step per prompt ({self.num_prompts}), got {len(steps)}")
        for i, est in enumerate(self.estimators):
            grid_step = self.grid_refresh_step(steps[i])
            if grid_step is None:
                continue

            def occ_eval_fn(x: torch.Tensor, i: int = i) -> torch.Tensor:  # [N, 3] -> [N]
                sigma = torch.cat(
                    [
                        self.field.density(chunk[None], prompts=slice(i, i + 1))[0]
                        for chunk in x.split(OCC_EVAL_CHUNK)
                    ]
                )
                return sigma * self.step_size

            est.update_every_n_steps(
                step=grid_step,
                occ_eval_fn=occ_eval_fn,
                occ_thre=self.cfg.occupancy_threshold,
                n=max(self.cfg.grid_update_every, 1),
            )

    def grid_refresh_step(self, step: int | None) -> int | None:
        """The step nerfacc's refresh schedule sees for a prompt at training `step`: None while
        ``render.grid_warmup`` keeps its grid untouched (or for no prompt), else ``step - grid_warmup``
        (nerfacc refreshes on multiples of ``grid_update_every`` and samples every cell for its first 256)."""
        if step is None or step < self.cfg.grid_warmup:
            return None
        return step - self.cfg.grid_warmup

    def occupied_fraction(self) -> list[float]:
        """Share of occupied cells in each prompt's grid (for logs); empty for the torch sampler."""
        if not self._marcher:
            return []
        return [float(est.binaries.float().mean()) for est in self.estimators]

    # -- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def render_image(
        self,
        cams: CameraBatch,
        height: int,
        width: int,
        shading: str = "albedo",
        ambient_ratio: float = 0.1,
        chunk: int = 4096,
        need_normals: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Full images for K cameras, rendered `chunk` rays per prompt at a time, without jitter.

        Returns ``rgb [K, H, W, 3]``, ``opacity [K, H, W, 1]``, ``depth [K, H, W, 1]`` and, when
        normals were computed, ``normal [K, H, W, 3]``."""
        return self._render_images(cams, height, width, [shading], ambient_ratio, chunk, need_normals, generator)[shading]

    @torch.no_grad()
    def render_image_shadings(
        self,
        cams: CameraBatch,
        height: int,
        width: int,
        shadings: Sequence[str],
        ambient_ratio: float = 0.1,
        chunk: int = 4096,
        generator: torch.Generator | None = None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """`render_image` in every mode of `shadings` from one render pass (see
        `render_shadings`): ``{mode: {"rgb", "opacity", "depth"[, "normal"]}}``, shaped as
        `render_image` returns them; only ``rgb`` differs between the modes."""
        return self._render_images(cams, height, width, list(shadings), ambient_ratio, chunk, False, generator)

    def _render_images(
        self,
        cams: CameraBatch,
        height: int,
        width: int,
        shadings: list[str],
        ambient_ratio: float,
        chunk: int,
        need_normals: bool,
        generator: torch.Generator | None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        if len(cams) != self.num_prompts:
            raise ValueError(f"expected {self.num_prompts} cameras (one per prompt), got {len(cams)}")
        if height < 1 or width < 1 or chunk < 1:
            raise ValueError(f"image size and chunk must be positive, got {height!r}x{width!r}, chunk={chunk!r}")
        if not shadings:
            raise ValueError("at least one shading mode is needed")
        device = self._device()
        cams = cams.to(device)
        rays_o, rays_d = get_rays(cams, height, width)  # [K, H*W, 3]
        # A random background is drawn once per image, not once per chunk.
        bg = self.background(rays_d[:, :1], generator=generator) if self.background.kind == "random" else None
        modes = list(dict.fromkeys(shadings))
        rgb: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
        parts: dict[str, list[torch.Tensor]] = {"opacity": [], "depth": [], "normal": []}
        for s in range(0, height * width, chunk):
            o, d = rays_o[:, s : s + chunk], rays_d[:, s : s + chunk]
            if len(modes) == 1:
                outs = {modes[0]: self.render(o, d, cams.light_dir, shading=modes[0], ambient_ratio=ambient_ratio,
                                              generator=generator, need_normals=need_normals, stratified=False, background=bg)}  # fmt: skip
            else:
                outs = self.render_shadings(o, d, cams.light_dir, modes, ambient_ratio=ambient_ratio,
                                            generator=generator, stratified=False, background=bg)  # fmt: skip
            for m, out in outs.items():
                rgb[m].append(out.rgb)
            out = outs[modes[0]]
            parts["opacity"].append(out.opacity[..., None])
            parts["depth"].append(out.depth[..., None])
            if out.normal is not None:
                parts["normal"].append(out.normal)
        k = self.num_prompts

        def image(chunks: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(chunks, dim=1).reshape(k, height, width, -1)

        shared = {name: image(chunks) for name, chunks in parts.items() if chunks}
        return {m: {"rgb": image(rgb[m]), **shared} for m in modes}
