"""Why do red objects come out worse than blue ones, and why do objects come out too big? Measures
each stage of the known-answer path on the red and the blue version of one shape, and writes JSON.

    python -m dreamfusion_trt.bench.prior_diagnosis --shape torus --out diagnosis.json
    python -m dreamfusion_trt.bench.prior_diagnosis --runs 'runs/bench/*/*' --out diagnosis.json
    python -m dreamfusion_trt.bench.prior_diagnosis --shape cube --colors red --inflation-scales 1,3,7.5,15,50 --inflation-only --renders 8 --out inflation.json
    python -m dreamfusion_trt.bench.prior_diagnosis --janus-scales 7.5,30,100 --inflation-only --renders 32 --out janus.json

Per colour (true renders from the prior's own training distribution, 64x64, white background):

- ``vae``: the prior VAE's reconstruction error (mean absolute, on the object's pixels and on the
  background) and the mean colour of the object's pixels before and after.
- ``unet``: at several timesteps, the noise-prediction error (MSE) of the prior's UNet on noised
  latents of the true renders, with the object's caption and with the empty prompt.
- ``sds_at_truth``: the SDS gradient in latent space at the true render (CFG as the preset, weight
  1 - alpha_bar): the norm of its mean over noise draws against the mean of its norms (0 when the
  true object is a fixed point of SDS, 1 when every draw pushes the same way).
- ``sds_towards_truth``: at a faint render (the true render half blended with the white
  background, like a translucent shell) and at a bleached one (object colour halfway to grey),
  the pixel gradient of latent SDS (through the VAE encoder, the preset's RGB phase) and of
  image-space SDS (``sds.rgb_mode=image``: D(z0^) - x); the mean cosine, per draw, between minus
  that gradient and the step that would restore the true render. Positive: SDS pulls the faint
  object towards the truth; near 0: the push is mostly in other directions.
- ``linear_map``: the fitted RGB -> latent map's relative residual against the encoder on the
  object's latent pixels; and the latent distance of a flat object colour from flat white
  (encoder and map), i.e. how visible the colour is against the background in latent space.
- ``albedo``: the logits the albedo head's sigmoid needs for the true colour.
- ``janus`` (``--janus-scales``, the six-colored cube): at each guidance scale and t, the share
  of the pixels where a cube painted one colour differs from the true one that x0^ draws nearer
  the truth, from noised renders of the one-colour cube and of the true one, with view captions
  and with the bare caption (does SDS recolour the faces, and does it need the view to?).
- ``hole`` (``--hole-scales``, a torus): at each guidance scale and t, the share of a filled
  torus's hole that x0^ shows as background, from noised renders of the filled torus (does SDS
  open the hole?) and of the true one (does it keep it open?).
- ``silhouette_halo`` (``--silhouette-widths``, no prior loaded): where the known objects'
  renders put their edge at each density edge width: the rendered silhouette's area and IoU
  against the true one, and the level `export.mesh_level` would cut that density at; with
  ``--silhouette-offsets`` also for the density moved that far inside the surface.
- ``pixel_ceiling`` (``--pixel-offsets``, no prior loaded): what one pixel of the preset's
  renders is worth in IoU, per shape (the true solid grown by k pixels), and with
  ``--pixel-results`` each run's volume as a size error in pixels with the IoU that size alone
  allows (`measure_pixel_ceiling`).
- ``radial_error`` (``--radial-runs``, no prior loaded): where finished runs' surfaces are off,
  along rays from the centre, in pixels, near sharp features and elsewhere (`measure_radial_error`).
- ``guidance_inflation`` (``--inflation-scales``): where SDS at the true render points. At each
  guidance scale and timestep, the decoded one-step prediction x0^ (classifier-free guidance at
  that scale, averaged over noise draws) from noised latents of the true renders; its silhouette
  area over the true one, and how far from white it is outside the true silhouette. SDS moves a
  render towards x0^, so a ratio above 1 is a push to grow the object (a ratio of 1 at every t:
  the true object is a fixed point).

``--runs`` adds per run folder the IoU at the mesh's threshold against the best over thresholds
(score.json), the trained albedo at the true surface, and the density up the z axis with the
share the network added on top of the init's blob (``axis``; from the checkpoint).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import shlex
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..prior import WEIGHTS_DIR
from ..prior.dataset import DatasetConfig, render_dataset
from ..prior.scenes import PALETTE, SHAPES, resolve_caption
from ..prior.score import grid_axes, pixel_footprint, radial_error

log = logging.getLogger(__name__)

TIMESTEPS = (50, 200, 400, 600, 800, 950)
TOWARDS_TIMESTEPS = (100, 400, 700)  # the pixel-gradient numbers need a backward pass through the encoder
JANUS_TIMESTEPS = TIMESTEPS  # the preset draws t <= 600; above it is where SDS would have to settle the colours


class _Prior:
    """The prior's frozen networks and its text embeddings, fp32 on the CPU or a GPU."""

    def __init__(self, folder: str | Path, device: torch.device) -> None:
        from ..sdmodel import load_diffusion

        self.m = load_diffusion(str(folder), device=device, dtype=torch.float32)
        self.device = device
        self.alphas = self.m.alphas_cumprod.to(device)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:  # [T, 77, D]
        ids = self.m.tokenizer(list(texts), padding="max_length", max_length=self.m.max_length, truncation=True,
                               return_tensors="pt").input_ids.to(self.device)  # fmt: skip
        return self.m.text_encoder(ids)[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1] -> scaled latent means [N, C, h, w] (differentiable)."""
        return self.m.vae.encode(images * 2.0 - 1.0).latent_dist.mean * self.m.vae_scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.m.vae.decode(latents / self.m.vae_scaling_factor).sample + 1.0) / 2.0).clamp(0, 1)

    def eps(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.m.unet(x, t, encoder_hidden_states=emb).sample

    def sds_grad(self, z: torch.Tensor, t: int, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 scale: float, negatives: torch.Tensor | None = None, negative_weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(1 - alpha_bar_t) (eps_cfg - noise) for latents z [N, C, h, w]; no graph. With
        `negatives` [M, N, 77, D] and `negative_weights` [M, N], the guided direction loses, per
        render, each negative's direction's part perpendicular to the caption's (Perp-Neg,
        Armandpour et al. 2023): eps_u + s (d - sum_m w_m perp_d(d_m)), d = eps_c - eps_u."""
        a = self.alphas[t]
        with torch.no_grad():
            x = a.sqrt() * z + (1 - a).sqrt() * noise
            m = 0 if negatives is None else len(negatives)
            tt = torch.full((len(z) * (2 + m),), t, device=z.device, dtype=torch.long)
            embs = [uncond.expand_as(cond), cond, *([] if negatives is None else negatives)]
            e_u, e_c, *e_n = self.eps(torch.cat([x] * (2 + m)), tt, torch.cat(embs)).chunk(2 + m)
            d = e_c - e_u
            for e, w in zip(e_n, [] if negative_weights is None else negative_weights):
                d_n = e - e_u
                along = (d_n * d).flatten(1).sum(1) / d.flatten(1).square().sum(1).clamp_min(1e-12)
                d = d - w.view(-1, 1, 1, 1) * (d_n - along.view(-1, 1, 1, 1) * d)
            return (1 - a) * (e_u + scale * d - noise)

    def x0_latents(self, z: torch.Tensor, t: int, noise: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The guided one-step prediction of the clean latents from z noised with `noise` at t,
        given that draw's `sds_grad` (which is (1 - alpha_bar_t) (eps_cfg - noise))."""
        a = self.alphas[t]
        eps_hat = grad / (1 - a) + noise
        x = a.sqrt() * z + (1 - a).sqrt() * noise
        return (x - (1 - a).sqrt() * eps_hat) / a.sqrt()


def object_mask(images: torch.Tensor, level: float = 0.05) -> torch.Tensor:
    """[N, 1, H, W] bool: pixels that differ from the white background by more than `level`."""
    return (1.0 - images).amax(dim=1, keepdim=True) > level


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.expand_as(x).float()
    return float((x * m).sum() / m.sum().clamp_min(1))


def measure_color(prior: _Prior, caption: str, n: int, draws: int, scale: float, seed: int) -> dict[str, Any]:
    ds = render_dataset(DatasetConfig(images_per_object=n, image_size=64, captions=(caption,), seed=seed), prior.device)
    img = ds.float_images()  # [n, 3, 64, 64]
    mask = object_mask(img)
    emb = prior.embed([*ds.texts, ""])
    cond, uncond = emb[ds.text_index], emb[-1:]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, Any] = {"caption": caption, "renders": n, "object_pixel_share": float(mask.float().mean())}

    with torch.no_grad():
        z = prior.encode(img)
        rec = prior.decode(z)
    out["vae"] = {
        "mae_object": _masked_mean((rec - img).abs(), mask),
        "mae_background": _masked_mean((rec - img).abs(), ~mask),
        "mean_rgb_object_true": [_masked_mean(img[:, c : c + 1], mask) for c in range(3)],
        "mean_rgb_object_reconstructed": [_masked_mean(rec[:, c : c + 1], mask) for c in range(3)],
    }
    lmask = F.adaptive_max_pool2d(mask.float(), z.shape[-1]) > 0  # latent pixels that see the object
    unet, at_truth = {}, {}
    for t in TIMESTEPS:
        a = prior.alphas[t]
        mse_c, mse_u, grads = [], [], []
        for _ in range(draws):
            noise = torch.randn(z.shape, generator=gen).to(z)
            x = a.sqrt() * z + (1 - a).sqrt() * noise
            tt = torch.full((n,), t, device=z.device, dtype=torch.long)
            with torch.no_grad():
                e_c, e_u = prior.eps(x, tt, cond), prior.eps(x, tt, uncond.expand_as(cond))
            mse_c.append(float((e_c - noise).square().mean()))
            mse_u.append(float((e_u - noise).square().mean()))
            grads.append((1 - a) * (e_u + scale * (e_c - e_u) - noise))
        g = torch.stack(grads)  # [draws, n, C, h, w]
        mean_norm = g.mean(0).flatten(1).norm(dim=1)  # per render
        norm_mean = g.flatten(2).norm(dim=2).mean(0)
        unet[str(t)] = {"mse_cond": sum(mse_c) / draws, "mse_uncond": sum(mse_u) / draws}
        at_truth[str(t)] = {"mean_grad_norm": float(mean_norm.mean()), "grad_norm": float(norm_mean.mean()),
                            "coherence": float((mean_norm / norm_mean.clamp_min(1e-12)).mean())}  # fmt: skip
    out["unet"] = unet
    out["sds_at_truth"] = at_truth
    out["latent_object_share"] = float(lmask.float().mean())

    # Does SDS pull a faint (translucent) or a bleached render back towards the true one?
    grey = torch.full_like(img, 0.5)
    variants = {"faint": 0.5 * img + 0.5, "bleached": torch.where(mask, 0.5 * img + 0.5 * grey, img)}
    towards: dict[str, Any] = {}
    for name, start in variants.items():
        step = (img - start).repeat(draws, 1, 1, 1).flatten(1)  # [draws * n, 3HW]
        latent_cos, image_cos = {}, {}
        for t in TOWARDS_TIMESTEPS:
            x = start.repeat(draws, 1, 1, 1).requires_grad_(True)  # [draws * n, 3, H, W]
            zz = prior.encode(x)
            noise = torch.randn(zz.shape, generator=gen).to(zz)
            c = cond.repeat(draws, 1, 1)
            g = prior.sds_grad(zz.detach(), t, noise, c, uncond, scale)
            (gi,) = torch.autograd.grad((zz * g).sum(), x)  # latent SDS, through the encoder
            latent_cos[str(t)] = float(F.cosine_similarity(-gi.flatten(1), step, dim=1).mean())
            # image-space SDS (sds.rgb_mode=image): minus its gradient is D(z0^) - x
            target = prior.decode(prior.x0_latents(zz.detach(), t, noise, g))
            image_cos[str(t)] = float(F.cosine_similarity((target - x.detach()).flatten(1), step, dim=1).mean())
        towards[name] = {"latent_sds": latent_cos, "image_sds": image_cos}
    out["sds_towards_truth"] = towards
    return out


def measure_linear_map(prior: _Prior, captions: Sequence[str], n: int, seed: int) -> dict[str, Any]:
    from ..guidance.latents import fit_rgb_to_latent

    encoder = lambda x: prior.m.vae.encode(x).latent_dist.mean * prior.m.vae_scaling_factor  # noqa: E731
    lmap = fit_rgb_to_latent(encoder, prior.device, torch.float32, size=64, seed=seed)
    out: dict[str, Any] = {"r2": float(lmap.r2)}
    white = torch.ones(1, 3, 64, 64, device=prior.device)
    with torch.no_grad():
        z_white = prior.encode(white)[..., 4:-4, 4:-4].mean((-1, -2))
        for caption in captions:
            ds = render_dataset(DatasetConfig(images_per_object=n, image_size=64, captions=(caption,), seed=seed + 1), prior.device)
            img = ds.float_images()
            z = prior.encode(img)
            factor = img.shape[-1] // z.shape[-1]
            approx = lmap(F.avg_pool2d(img, factor))
            lmask = (F.adaptive_max_pool2d(object_mask(img).float(), z.shape[-1]) > 0).expand_as(z)
            res = ((approx - z)[lmask]).square().sum() / (z[lmask] - z[lmask].mean()).square().sum()
            color = torch.tensor(PALETTE[resolve_caption(caption).colors[0]], device=prior.device)
            flat = color[None, :, None, None].expand(1, 3, 64, 64)
            z_flat = prior.encode(flat)[..., 4:-4, 4:-4].mean((-1, -2))
            m_flat = lmap(color[None, :, None, None]).flatten(1)
            m_white = lmap(torch.ones(1, 3, 1, 1, device=prior.device)).flatten(1)
            out[caption] = {
                "relative_residual_object": float(res),
                "latent_distance_from_white_encoder": float((z_flat - z_white).norm()),
                "latent_distance_from_white_map": float((m_flat - m_white).norm()),
                "rgb_distance_from_white": float((color - 1).norm()),
            }
    return out


@torch.no_grad()
def mean_x0(prior: _Prior, z: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor, scale: float, draws: int,
            gen: torch.Generator, negatives: torch.Tensor | None = None, negative_weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The decoded guided one-step prediction x0^ from latents `z` noised at t, averaged over
    `draws` noise draws from `gen` (a CPU generator); `negatives` as in `_Prior.sds_grad`."""
    acc = None
    for _ in range(draws):
        noise = torch.randn(z.shape, generator=gen).to(z)
        grad = prior.sds_grad(z, t, noise, cond, uncond, scale, negatives, negative_weights)
        x0 = prior.decode(prior.x0_latents(z, t, noise, grad))
        acc = x0 if acc is None else acc + x0
    return acc / draws


@torch.no_grad()
def measure_guidance_inflation(prior: _Prior, caption: str, scales: Sequence[float], timesteps: Sequence[int], n: int,
                               draws: int, seed: int) -> dict[str, Any]:  # fmt: skip
    """Silhouette area of the guided one-step prediction x0^ at the true renders, over the true area, per scale and t."""
    ds = render_dataset(DatasetConfig(images_per_object=n, image_size=64, captions=(caption,), seed=seed), prior.device)
    img = ds.float_images()
    mask = object_mask(img)
    emb = prior.embed([*ds.texts, ""])
    cond, uncond = emb[ds.text_index], emb[-1:]
    z = prior.encode(img)
    true_area = float(mask.float().mean())
    out: dict[str, Any] = {"caption": caption, "renders": n, "draws": draws, "true_area": true_area,
                           "vae_reconstruction_area_ratio": float(object_mask(prior.decode(z)).float().mean()) / true_area,
                           "by_scale": {}}  # fmt: skip
    for scale in scales:
        gen = torch.Generator(device="cpu").manual_seed(seed)  # the same draws for every scale
        rows = {}
        for t in timesteps:
            x0 = mean_x0(prior, z, t, cond, uncond, scale, draws, gen)
            darkness = (1.0 - x0).amax(dim=1, keepdim=True)
            rows[str(t)] = {"area_ratio": float(object_mask(x0).float().mean()) / true_area,
                            "non_white_outside": float(darkness[~mask].mean()),
                            "non_white_inside": float(darkness[mask].mean())}  # fmt: skip
        out["by_scale"][f"{scale:g}"] = rows
    return out


def sd_filled_torus(x: torch.Tensor, major: float, minor: float) -> torch.Tensor:
    """The torus of `sd_torus` with its hole filled: points within `minor` of the disc of radius
    `major` in the xy-plane (a rounded disc), the shape the torus runs come out as."""
    from ..prior.scenes import _radial

    q = torch.stack([(_radial(x) - major).clamp_min(0.0), x[..., 2]], dim=-1)
    return q.norm(dim=-1) - minor


def measure_hole(prior: _Prior, caption: str, scales: Sequence[float], timesteps: Sequence[int], n: int, draws: int,
                 seed: int) -> dict[str, Any]:  # fmt: skip
    """Does SDS open a filled torus's hole, and at which timesteps and guidance scales?

    Renders the true torus and the same torus with its hole filled (`sd_filled_torus`) from the
    same cameras; the hole's pixels are those the filled one covers and the true one does not.
    For each scale and t, the guided one-step prediction x0^ from noised latents of the filled
    renders (the run's state) and of the true ones (the answer): the share of the hole's pixels
    x0^ shows as background. SDS moves a render towards x0^, so a share near 1 from the filled
    renders is a push to open the hole, and a share near 1 from the true ones says the open
    hole is kept."""
    from ..prior import scenes

    cfg = DatasetConfig(images_per_object=n, image_size=64, captions=(caption,), seed=seed)
    true = render_dataset(cfg, prior.device)
    spec = scenes.SHAPES["torus"]
    scenes.SHAPES["torus"] = scenes.ShapeSpec(lambda x: sd_filled_torus(x, 0.34, 0.14), spec.half_extent)
    try:
        filled = render_dataset(cfg, prior.device)  # the same cameras: they are drawn from the caption's seed
    finally:
        scenes.SHAPES["torus"] = spec
    img_t, img_f = true.float_images(), filled.float_images()
    hole = object_mask(img_f) & ~object_mask(img_t)  # [n, 1, H, W]
    emb = prior.embed([*true.texts, ""])
    cond, uncond = emb[true.text_index], emb[-1:]
    out: dict[str, Any] = {"caption": caption, "renders": n, "draws": draws,
                           "hole_pixels_per_render": float(hole.float().sum() / n),
                           "renders_with_a_hole": int((hole.flatten(1).sum(1) >= 4).sum()), "by_scale": {}}  # fmt: skip
    latents = {"filled": prior.encode(img_f), "true": prior.encode(img_t)}
    for scale in scales:
        rows: dict[str, Any] = {}
        for t in timesteps:
            row = {}
            for name, z in latents.items():
                gen = torch.Generator(device="cpu").manual_seed(seed)  # the same draws for both states
                open_ = ~object_mask(mean_x0(prior, z, t, cond, uncond, scale, draws, gen))
                row[f"hole_open_from_{name}"] = float((open_ & hole).float().sum() / hole.float().sum().clamp_min(1))
            rows[str(t)] = row
        out["by_scale"][f"{scale:g}"] = rows
    return out


def measure_janus(prior: _Prior, scales: Sequence[float], timesteps: Sequence[int], n: int, draws: int,
                  seed: int, one_colour: str = "magenta", perp_neg: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Does SDS recolour a six-colored cube whose faces all took one colour, and does it need the
    view in the caption to do so?

    Renders the six-colored cube and the same cube painted `one_colour` on every face (the state
    the CPU runs reach: the top face's colour carried to all six) from the same cameras and
    shadings. The pixels that tell them apart are the other faces'. For each guidance scale and t,
    the guided one-step prediction x0^ (averaged over `draws` noise draws) from noised latents of
    the one-colour renders (does SDS pull the faces to their own colours?) and of the true ones
    (does it keep them?), captioned with the camera's view suffix (as with view-dependent prompts)
    and with the bare caption: the share of those pixels where x0^ is nearer the true render than
    the one-colour one. Near 1 from the one-colour state: SDS recolours; near 0.5: no preference.
    ``view_over_plain``: the view captions guided from the bare caption's prediction instead of
    the unconditional one, at the same scale: the view-specific part of the guidance alone,
    without the caption's common pull (one colour for the whole object) that the trace of a run
    shows dominating (BENCHMARKS.md, twenty-second session).
    `perp_neg` > 0: the view captions' guidance also takes the other two of front / side / back
    as Perp-Neg negatives of that weight (overhead views take none; `_Prior.sds_grad`)."""
    from ..guidance.text import VIEWS
    from ..prior import scenes
    from ..prior.dataset import PLAIN, text_index

    caption = scenes.SIX_COLORED_CAPTION
    cfg = DatasetConfig(images_per_object=n, multicolor_factor=1, image_size=64, captions=(caption,), seed=seed,
                        plain_caption_prob=0.0)  # fmt: skip
    true = render_dataset(cfg, prior.device)
    spec = scenes.KNOWN_OBJECTS[caption]
    scenes.KNOWN_OBJECTS[caption] = scenes.ObjectSpec(caption, spec.shape, (one_colour,) * len(spec.colors))
    try:
        painted = render_dataset(cfg, prior.device)  # the same cameras and shadings: drawn from the caption's seed
    finally:
        scenes.KNOWN_OBJECTS[caption] = spec
    img_t, img_p = true.float_images(), painted.float_images()
    differs = (img_t - img_p).abs().amax(dim=1, keepdim=True) > 0.1  # [n, 1, H, W] the other faces' pixels
    emb = prior.embed([*true.texts, ""])
    uncond = emb[-1:]
    conds = {"view": emb[true.text_index], "plain": emb[text_index(0, torch.full_like(true.view_index, PLAIN))]}
    bases = {"view": uncond, "plain": uncond, "view_over_plain": conds["plain"]}  # what each guides from
    conds["view_over_plain"] = conds["view"]
    horizontal = [VIEWS.index(v) for v in ("front", "side", "back")]
    negatives, negative_weights = None, None
    if perp_neg > 0:  # per render: the two horizontal views that are not its own
        others = torch.tensor([[o for o in horizontal if o != v][:2] if v in horizontal else horizontal[1:] for v in range(len(VIEWS))])
        picked = others[true.view_index.cpu()].T  # [2, n]
        negatives = torch.stack([emb[text_index(0, row.to(true.view_index.device))] for row in picked])
        on = torch.tensor([v in horizontal for v in true.view_index.tolist()], dtype=torch.float32, device=emb.device)
        negative_weights = torch.stack([perp_neg * on, perp_neg * on])
    out: dict[str, Any] = {"caption": caption, "one_colour": one_colour, "perp_neg": perp_neg, "renders": n, "draws": draws,
                           "differing_pixels_per_render": float(differs.float().sum() / n), "by_scale": {}}  # fmt: skip
    with torch.no_grad():
        latents = {"one_colour": prior.encode(img_p), "true": prior.encode(img_t)}
    for scale in scales:
        rows: dict[str, Any] = {}
        for t in timesteps:
            row = {}
            for cname, cond in conds.items():
                for name, z in latents.items():
                    gen = torch.Generator(device="cpu").manual_seed(seed)  # the same draws everywhere
                    neg = (negatives, negative_weights) if cname == "view" else (None, None)
                    x0 = mean_x0(prior, z, t, cond, bases[cname], scale, draws, gen, *neg)
                    nearer = (x0 - img_t).norm(dim=1, keepdim=True) < (x0 - img_p).norm(dim=1, keepdim=True)
                    row[f"{cname}_faces_right_from_{name}"] = float((nearer & differs).float().sum() / differs.float().sum().clamp_min(1))
                    by_view = {}
                    for v, view in enumerate(VIEWS):  # the camera's view (the suffix of the view captions)
                        sel = true.view_index == v
                        if bool(sel.any()):
                            by_view[view] = float((nearer & differs)[sel].float().sum() / differs[sel].float().sum().clamp_min(1))
                    row[f"{cname}_faces_right_from_{name}_by_view"] = by_view
            rows[str(t)] = row
        out["by_scale"][f"{scale:g}"] = rows
    return out


def _face_colours(field: Any, obj: Any, n: int = 6000) -> dict[str, Any]:
    """The field's mean albedo just inside each true face of the cube `obj`, the nearest of the
    six face colours to it, and how many faces get their own colour."""
    from ..prior.scenes import FACES, SIX_FACE_COLORS, face_index

    pts = obj.sample_surface(n, torch.Generator().manual_seed(0))
    inner = pts - 0.02 * obj.normals(pts[None])[0]
    with torch.no_grad():
        _, albedo = field(inner[None])
    face = face_index(pts, obj.shape.half_extent)
    palette = torch.tensor([PALETTE[c] for c in SIX_FACE_COLORS], device=albedo.device)
    out: dict[str, Any] = {"faces": {}, "right": 0}
    for f, name in enumerate(FACES):
        mean = albedo[0][face == f].mean(0)
        guess = SIX_FACE_COLORS[int((palette - mean).norm(dim=-1).argmin())]
        out["faces"][name] = {"albedo": [round(float(c), 3) for c in mean], "nearest": guess, "true": SIX_FACE_COLORS[f]}
        out["right"] += int(guess == SIX_FACE_COLORS[f])
    return out


def _field_iou(field: Any, obj: Any, threshold: float, bound: float, res: int = 48) -> float:
    """IoU of {sigma > threshold} of `field` with the true object on a res^3 grid over the box."""
    return _level_scores(field.density, obj, threshold, bound, res)["iou"]


def _random_colours(amplitude: float, seed: int, device: torch.device, waves: int = 8, frequency: float = 4.0) -> Any:
    """A random smooth colour field over space, x [..., 3] -> RGB [..., 3]: per channel, the
    sigmoid of `waves` random plane waves (wave numbers ~ N(0, frequency^2), about one change of
    colour across a face), `amplitude` in logits. Seeded, and blind to the object."""
    gen = torch.Generator().manual_seed(seed + 7919)
    k = (torch.randn(3, waves, 3, generator=gen) * frequency).to(device)
    phase = (torch.rand(3, waves, generator=gen) * 2 * math.pi).to(device)

    def colours(x: torch.Tensor) -> torch.Tensor:
        from ..field.nerf import plane_wave_sum

        logits = plane_wave_sum(x.reshape(1, -1, 3), k[None], phase[None]).reshape(*x.shape[:-1], 3)
        return torch.sigmoid(logits * (amplitude / math.sqrt(waves)))

    return colours


def measure_janus_oracle(steps: int, view_dependent: bool, seed: int, fit_steps: int = 300,
                         device: torch.device | str = "cpu", t_max: float | None = None, hold: int = 0,
                         flags: dict[str, Any] | None = None, albedo_noise: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """SDS on the colour alone, on the right shape: can the prior colour a six-colored cube's faces?

    A fresh field of the prior's preset (its CPU preset on a CPU) is fitted to the true cube's
    density (`fit_steps` Adam steps on log(1 + sigma)); then `steps` SDS steps of the preset train
    it with every step a colour step (``sds.high_noise_t 0 --sds.high_noise_colour_only true``: no
    gradient through the weights, opacity or normals) and the regularisers off, with view-dependent
    prompts on or off; `t_max` replaces the preset's (annealed) sds.t_max, and `flags` (run flags
    as nested dicts) go on top of all that. `albedo_noise` A > 0 first fits the albedo to a random
    smooth colour field that knows nothing of the object (`_random_colours`, amplitude A in logits),
    so the faces start apart. The colour's gradient
    still moves the shape through the parameters the albedo shares with the density; `hold`
    fitting steps after every SDS step keep it at the truth. Reports the faces whose mean albedo
    is nearest their own colour, and the shape's IoU, before and after. Many right faces here and
    few in a full run: the geometry's own dynamics lose them. Few here: the prior's SDS signal
    does not carry them."""
    from ..config import from_dict
    from ..prior.preset import preset_config
    from ..prior.scenes import KNOWN_OBJECTS, SIX_COLORED_CAPTION
    from ..train import frozen as frozen_mod

    device = torch.device(device)
    cfg = preset_config(None, on_cpu=device.type == "cpu")
    cfg = from_dict({"model": {"model": str(WEIGHTS_DIR)},
                     "prompt": {"text": SIX_COLORED_CAPTION, "view_dependent": view_dependent},
                     "train": {"iters": steps, "seed": seed, "device": str(device)},
                     "sds": {"high_noise_t": 0.0, "high_noise_colour_only": True, **({} if t_max is None else {"t_max": t_max})},
                     "reg": {"orientation": 0.0, "entropy": 0.0, "sparsity": 0.0}}, cfg)  # fmt: skip
    cfg = from_dict(flags or {}, cfg)
    frozen, embeddings = frozen_mod.load_frozen(cfg, device, [cfg.prompt], max_prompts=1)
    trainer = frozen_mod.new_trainer(frozen, cfg, 1, device, step_graph=False)
    trainer.assign(0, cfg, embeddings[0])
    field = trainer.renderer.field
    obj = KNOWN_OBJECTS[SIX_COLORED_CAPTION].build(bound=cfg.field.bound).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)

    def fit_step() -> None:
        x = ((torch.rand(1, 8192, 3, generator=gen) * 2 - 1) * cfg.field.bound).to(device)
        with torch.no_grad():
            target = obj.density(x)
        loss = (torch.log1p(field.density(x)) - torch.log1p(target)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(fit_steps):
        fit_step()
    if albedo_noise > 0:
        colours = _random_colours(albedo_noise, seed, device)
        for _ in range(fit_steps):
            x = ((torch.rand(1, 8192, 3, generator=gen) * 2 - 1) * cfg.field.bound).to(device)
            loss = (field(x)[1] - colours(x)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            fit_step()
    threshold = cfg.output.mesh_threshold
    out: dict[str, Any] = {"steps": steps, "view_dependent": view_dependent, "seed": seed, "fit_steps": fit_steps, "t_max": cfg.sds.t_max, "hold": hold,
                           "albedo_noise": albedo_noise,
                           "flags": flags or {}, "guidance_scale": cfg.sds.guidance_scale,
                           "t_max_final": cfg.sds.t_max_final if cfg.sds.t_anneal != "none" else None,
                           "iou_before": _field_iou(field, obj, threshold, cfg.field.bound),
                           "colours_before": _face_colours(field, obj)}  # fmt: skip
    for _ in range(steps):
        trainer.train_step()
        for _ in range(hold):
            fit_step()
    out["iou_after"] = _field_iou(field, obj, threshold, cfg.field.bound)
    out["colours_after"] = _face_colours(field, obj)
    return out


def _level_scores(density: Any, obj: Any, threshold: float, bound: float, res: int = 64) -> dict[str, float]:
    """{`density` > threshold} on a res^3 grid over the box (`density`: a field's or the true
    object's, ``[1, N, 3] -> [1, N]``) against the true solid (``iou``), against the true
    object's own {sigma > threshold} (``iou_true_level``: what a field that renders exactly like
    the prior's training objects scores), and its volume over the true solid's (``volume_ratio``)."""
    axis = torch.linspace(-bound, bound, res)
    x = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)
    x = x.to(obj.colors.device)
    with torch.no_grad():
        mine = density(x)[0] > threshold
        level = obj.density(x)[0] > threshold
    true = obj.occupancy(x[0])

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        return round(float((a & b).sum() / (a | b).sum().clamp_min(1)), 4)

    return {"iou": iou(mine, true), "iou_true_level": iou(mine, level), "volume_ratio": round(float(mine.sum() / true.sum().clamp_min(1)), 4)}


def measure_shape_oracle(caption: str, steps: int, view_dependent: bool, seed: int, fit_steps: int = 600,
                         device: torch.device | str = "cpu", flags: dict[str, Any] | None = None,
                         checkpoints: int = 4) -> dict[str, Any]:  # fmt: skip
    """SDS from the truth: is the true object where the preset's SDS leaves it?

    A fresh field of the prior's preset (its CPU preset on a CPU, `flags` on top) is fitted to
    the true object's density (log(1 + sigma), uniform points in the box and points near the
    surface) and colour (points just inside the surface), `fit_steps` Adam steps; then the
    preset's `steps` SDS steps train it as a run would, schedule and regularisers and all, from
    there. Reports `_level_scores` (and, for the six-colored cube, the faces) after the fit and
    at `checkpoints` points of the run. A shape that stays: the prior holds the truth and a run's
    error comes from its way there (the init, the early steps). A shape that drifts to what runs
    from the blob end at: the error is SDS's own fixed point on this prior."""
    from ..config import from_dict
    from ..prior.preset import preset_config
    from ..prior.scenes import SIX_COLORED_CAPTION, resolve_caption
    from ..train import frozen as frozen_mod

    spec = resolve_caption(caption)
    device = torch.device(device)
    cfg = preset_config(None, on_cpu=device.type == "cpu")
    cfg = from_dict({"model": {"model": str(WEIGHTS_DIR)},
                     "prompt": {"text": spec.caption, "view_dependent": view_dependent},
                     "train": {"iters": steps, "seed": seed, "device": str(device)}}, cfg)  # fmt: skip
    cfg = from_dict(flags or {}, cfg)
    frozen, embeddings = frozen_mod.load_frozen(cfg, device, [cfg.prompt], max_prompts=1)
    trainer = frozen_mod.new_trainer(frozen, cfg, 1, device, step_graph=False)
    trainer.assign(0, cfg, embeddings[0])
    field = trainer.renderer.field
    obj = spec.build(bound=cfg.field.bound).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    pool = obj.sample_surface(1 << 17, gen)  # surface points, drawn once
    pool_normals = obj.normals(pool[None])[0]
    for _ in range(fit_steps):
        box = ((torch.rand(1, 8192, 3, generator=gen) * 2 - 1) * cfg.field.bound).to(device)
        pick = torch.randint(len(pool), (4096,), generator=gen).to(device)
        surf, normal = pool[pick], pool_normals[pick]
        near = surf + (torch.rand(4096, 1, generator=gen).to(device) * 0.1 - 0.05) * normal
        inner = (surf - 0.02 * normal)[None]
        x = torch.cat([box, near[None]], dim=1)
        with torch.no_grad():
            target = obj.density(x)
            colour = obj.surface_color(inner)
        sigma = field.density(x)
        _, albedo = field(inner)
        loss = (torch.log1p(sigma) - torch.log1p(target)).square().mean() + (albedo - colour).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    threshold, bound = cfg.output.mesh_threshold, cfg.field.bound
    six = spec.caption == SIX_COLORED_CAPTION

    def scores(step: int) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step, **_level_scores(field.density, obj, threshold, bound)}
        if six:
            row["faces_right"] = _face_colours(field, obj)["right"]
        return row

    truth = _level_scores(obj.density, obj, threshold, bound)
    out: dict[str, Any] = {"caption": spec.caption, "steps": steps, "view_dependent": view_dependent, "seed": seed,
                           "fit_steps": fit_steps, "flags": flags or {}, "mesh_threshold": threshold,
                           "truth_at_mesh_threshold": truth, "trajectory": [scores(0)]}  # fmt: skip
    marks = {round(steps * (i + 1) / checkpoints) for i in range(checkpoints)}
    for step in range(1, steps + 1):
        trainer.train_step()
        if step in marks:
            out["trajectory"].append(scores(step))
    return out


def measure_silhouette_halo(widths: Sequence[float], size: int = 64, samples: int = 256,
                            offsets: Sequence[float] = (0.0,)) -> dict[str, Any]:
    """Where the known objects' renders put their edge, per shape (its blue version), density
    edge width (the prior's training objects: `scenes.DEFAULT_WIDTH`) and density offset (rows
    ``"W"`` at offset 0, ``"W@O"`` otherwise: the density centred O inside the surface). The
    object is rendered like a field (albedo, `samples` per ray) from the mesh level's 12 cameras
    (`export.mesh_level.level_cameras` on the prior's validation orbit) at ``size x size``; its
    silhouette (opacity > 0.5) against the true one (sdf < 0): area ratio and IoU; and the level
    `export.mesh_level.choose_level` cuts its own density at, with the IoU of the true solid and
    that level's set (64^3), and of the true solid and {density > 10}."""
    from ..cameras import get_rays
    from ..config import FieldConfig, RenderConfig
    from ..export.mesh import grid_coordinates, sample_density_grid
    from ..export.mesh_level import LEVEL_GRID, choose_level, level_cameras
    from ..field.background import Background
    from ..prior.dataset import PRIOR_BOUND, PRIOR_CAMERA
    from ..prior.scenes import make_object
    from ..prior.score import occupancy_iou, true_silhouette
    from ..render.renderer import Renderer

    bound, cam_cfg = PRIOR_BOUND, PRIOR_CAMERA
    cams = level_cameras(cam_cfg.val_elevation, cam_cfg.val_radius, cam_cfg.val_fovy)
    out: dict[str, Any] = {"size": size, "samples": samples, "views": len(cams), "by_shape": {}}
    for shape in ("cube", "sphere", "cone", "torus", "cylinder"):
        rows = {}
        for width, offset in ((w, o) for w in widths for o in offsets):
            obj = make_object(f"a blue {shape}", bound=bound, width=width, offset=offset)
            renderer = Renderer(obj, Background(FieldConfig(background="solid"), 1),
                                RenderConfig(backend="torch", num_samples=samples), bound=bound).eval()  # fmt: skip
            rendered, truth, opacity, rays_o, rays_d = 0, 0, [], [], []
            inter = union = 0
            for i in range(len(cams)):
                cam = cams.take(i)
                op = renderer.render_image(cam, size, size, shading="albedo")["opacity"].reshape(-1)
                hit = true_silhouette(obj, cam, size, bound)
                sil = op > 0.5
                rendered, truth = rendered + int(sil.sum()), truth + int(hit.sum())
                inter, union = inter + int((sil & hit).sum()), union + int((sil | hit).sum())
                o, d = get_rays(cam, size, size)
                opacity.append(op)
                rays_o.append(o[0])
                rays_d.append(d[0])
            grid = torch.from_numpy(sample_density_grid(lambda x, obj=obj: obj.density(x[None])[0].float(), bound, LEVEL_GRID))
            level = choose_level(grid, bound, torch.cat(opacity), torch.cat(rays_o), torch.cat(rays_d), 10.0)
            axis = torch.as_tensor(grid_coordinates(bound, LEVEL_GRID), dtype=torch.float32)  # the density grid's points
            pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
            inside = obj.occupancy(pts)
            rows[f"{width:g}" if offset == 0 else f"{width:g}@{offset:g}"] = {
                "silhouette_area_ratio": rendered / max(truth, 1), "silhouette_iou": inter / max(union, 1),
                "opacity_level": level.threshold, "iou_at_opacity_level": occupancy_iou(grid.reshape(-1) > level.threshold, inside),
                "iou_at_10": occupancy_iou(grid.reshape(-1) > 10.0, inside),
            }  # fmt: skip
        out["by_shape"][shape] = rows
    return out


def measure_pixel_ceiling(offsets_px: Sequence[float], pixel: float, results: Sequence[str] = (), resolution: int = 128,
                          bound: float = 0.6) -> dict[str, Any]:  # fmt: skip
    """What one pixel of the renders is worth in IoU. Per shape of `scenes.SHAPES`, the true
    solid grown by k pixels (shrunk for k < 0), {sdf < k * pixel} (the shapes' SDFs are exact
    distances, so that is the solid offset by k pixels), against the true solid on the score's
    ``resolution``^3 grid over the box: IoU and volume ratio.

    With `results` (`bench prior` JSON files), each run's mesh volume over the truth's becomes
    the offset, in pixels, of its shape's offset solid of the same volume (`offset_px`: its size
    error), and that solid's IoU (`size_only_iou`: what the run would score if its size were its
    only error). The run's IoU below `size_only_iou` is its shape's error."""
    axes = grid_axes(bound, resolution)
    pts = torch.stack(torch.meshgrid(*[torch.as_tensor(a, dtype=torch.float64) for a in axes], indexing="ij"), dim=-1).reshape(-1, 3)
    sdfs, by_shape = {}, {}
    for name, spec in SHAPES.items():
        sdf = spec.sdf(pts)
        sdfs[name] = sdf
        by_shape[name] = {f"{k:g}": _offset_scores(sdf, k * pixel) for k in offsets_px}
    runs = []
    for path in results:
        data = json.loads(Path(path).read_text())
        for setting, block in data.get("settings", {}).items():
            for row in block.get("rows") or []:
                mesh, true = row.get("mesh_volume_fraction"), row.get("true_volume_fraction")
                if not mesh or not true or row.get("iou") is None:
                    continue
                shape = resolve_caption(row["object"]).shape
                sdf = sdfs[shape]
                ratio = mesh / true
                rank = min(max(round(ratio * int((sdf < 0).sum())), 1), sdf.numel())
                offset = float(torch.kthvalue(sdf, rank).values)  # the level whose solid has the run's volume
                runs.append({"file": Path(path).name, "setting": setting, "object": row["object"], "seed": row.get("seed"),
                             "iou": row["iou"], "volume_ratio": ratio, "offset_px": offset / pixel,
                             "size_only_iou": _offset_scores(sdf, offset)["iou"]})  # fmt: skip
    return {"pixel": pixel, "resolution": resolution, "bound": bound, "by_shape": by_shape, "runs": runs}


def _preset_pixel(render_size: int = 0) -> float:
    """World size of one pixel at the object's centre for the GPU preset's cameras, at
    `render_size` (default: the preset's own)."""
    from ..prior.preset import preset_config

    cam = preset_config(None, on_cpu=False).camera
    return pixel_footprint(sum(cam.radius_range) / 2, sum(cam.fovy_range) / 2, render_size or cam.render_size)


def _px(stats: dict[str, float] | None) -> str:
    return "-" if stats is None else f"{stats['median_px']:+.2f} [{stats['q25_px']:+.2f}, {stats['q75_px']:+.2f}]"


def _offset_scores(sdf: torch.Tensor, offset: float) -> dict[str, float]:
    """IoU and volume ratio of {sdf < offset} against {sdf < 0}."""
    truth, grown = sdf < 0, sdf < offset
    return {"iou": float((truth & grown).sum() / (truth | grown).sum()), "volume_ratio": float(grown.sum() / truth.sum())}


def measure_radial_error(folder: Path, pixel: float, directions: int = 2000) -> dict[str, Any] | None:
    """Where a finished run's surface is off (`score.radial_error` at its mesh level, in pixels of
    `pixel` world units), with the run's folder and object; None for a torus or a folder without
    a checkpoint and score."""
    from ..checkpoint import load_checkpoint
    from ..scene import scene_from_checkpoint

    score_path = folder / "score.json"
    if not score_path.is_file() or not (folder / "checkpoint.json").is_file():
        return None
    caption = json.loads(score_path.read_text())["object"]
    ckpt = load_checkpoint(folder)
    renderer = scene_from_checkpoint(ckpt, "cpu")
    obj = resolve_caption(caption).build(bound=ckpt.config.field.bound)
    level = float(ckpt.config.output.mesh_threshold)
    result = radial_error(renderer.field, obj, level, pixel, directions=directions)
    return None if result is None else {"folder": str(folder), "object": caption, "level": level, **result}


def albedo_logits(caption: str) -> dict[str, Any]:
    rgb = PALETTE[resolve_caption(caption).colors[0]]
    logits = [math.log(c / (1 - c)) for c in rgb]
    # d sigmoid / d logit at the target: how much a logit step moves the colour there
    slopes = [c * (1 - c) for c in rgb]
    return {"rgb": list(rgb), "logits": logits, "sigmoid_slope": slopes, "reachable": all(abs(v) < 10 for v in logits)}


@torch.no_grad()
def measure_run(folder: Path) -> dict[str, Any] | None:
    """A finished run's threshold numbers (score.json) and its albedo at the true surface."""
    from ..checkpoint import load_checkpoint
    from ..scene import scene_from_checkpoint

    score_path = folder / "score.json"
    if not score_path.is_file() or not (folder / "checkpoint.json").is_file():
        return None
    score = json.loads(score_path.read_text())
    row = {k: score.get(k) for k in ("object", "iou", "best_iou", "best_threshold", "field_iou", "opacity_on_object",
                                     "opacity_off_object", "color_error", "iou_by_threshold")}  # fmt: skip
    ckpt = load_checkpoint(folder)
    renderer = scene_from_checkpoint(ckpt, "cpu")
    obj = resolve_caption(score["object"]).build(bound=ckpt.config.field.bound)
    pts = obj.sample_surface(4000, torch.Generator().manual_seed(0))
    normals = obj.normals(pts[None])[0]
    inner = pts - 0.02 * normals  # just inside the true surface, where the albedo is seen
    _, albedo = renderer.field(inner[None])
    albedo = albedo[0]
    truth = obj.surface_color(pts)
    row["albedo_mean_inside_surface"] = albedo.mean(0).tolist()
    row["albedo_error_inside_surface"] = float((albedo - truth).norm(dim=-1).mean())
    row["albedo_logit_mean"] = torch.logit(albedo.clamp(1e-6, 1 - 1e-6)).mean(0).tolist()
    row["density_median_inside_surface"] = float(renderer.field.density(inner[None])[0].median())
    row["mesh_threshold"] = ckpt.config.output.mesh_threshold
    row["axis"] = axis_profile(renderer.field, ckpt.config.field)
    return row


AXIS_Z = (0.0, 0.1, 0.2, 0.25, 0.3, 0.35)


def axis_profile(field: Any, cfg: Any, zs: Sequence[float] = AXIS_Z) -> list[dict[str, float]]:
    """The trained density up the z axis (through a torus's hole) and what the network itself
    added there: ``raw = log(sigma) - blob``. The blob is `density_blob`, the init's density
    before activation (exp). raw near 0 is where training left the init as it was; raw > 0 is
    where it built density on top of the blob. With the albedo there (is a hole painted the
    background's colour instead of carved?)."""
    from ..field.nerf import density_blob

    pts = torch.tensor([[0.0, 0.0, float(z)] for z in zs])
    with torch.no_grad():
        sigma, albedo = (v[0].float() for v in field(pts[None]))
    blob = density_blob(pts, cfg.blob_density, cfg.blob_radius)
    raw = sigma.clamp_min(1e-30).log() - blob if cfg.density_activation == "exp" else torch.full_like(sigma, float("nan"))
    return [{"z": float(z), "sigma": float(s), "raw": float(r), "blob": float(b), "albedo": [round(float(c), 4) for c in a]}
            for z, s, r, b, a in zip(zs, sigma, raw, blob, albedo)]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreamfusion_trt.bench.prior_diagnosis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shape", default="torus", help="a known shape with red and blue versions (default: %(default)s)")
    p.add_argument("--colors", default="red,blue")
    p.add_argument("--model", default=str(WEIGHTS_DIR), help="prior folder (default: the built-in one)")
    p.add_argument("--renders", type=int, default=16, help="true renders per colour (default: %(default)s)")
    p.add_argument("--draws", type=int, default=4, help="noise draws per timestep (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=50.0, help="CFG of the SDS numbers (the preset's: %(default)s)")
    p.add_argument("--inflation-scales", default="",
                   help="comma-separated guidance scales for guidance_inflation (default: skipped), e.g. 1,3,7.5,15,50")
    p.add_argument("--inflation-shape", default="", help="the shape of guidance_inflation (default: --shape, first colour)")
    p.add_argument("--inflation-only", action="store_true", help="with --inflation-scales or --hole-scales: skip the per-colour numbers")
    p.add_argument("--hole-scales", default="",
                   help="comma-separated guidance scales for hole (a torus only; default: skipped), e.g. 1,7.5,50")
    p.add_argument("--janus-scales", default="",
                   help="comma-separated guidance scales: recolouring of a one-colour six-colored cube by x0^ (measure_janus)")
    p.add_argument("--janus-one-colour", default="magenta", help="with --janus-scales: the colour of the one-colour cube (default: %(default)s)")
    p.add_argument("--janus-perp-neg", type=float, default=0.0,
                   help="with --janus-scales: Perp-Neg weight of the other horizontal views' captions (default: 0, off)")
    p.add_argument("--janus-oracle-steps", type=int, default=0,
                   help="colour-only SDS steps on a field fitted to the true six-colored cube, VD on and off (measure_janus_oracle)")
    p.add_argument("--janus-oracle-t-max", type=float, help="with --janus-oracle-steps: sds.t_max instead of the preset's")
    p.add_argument("--janus-oracle-hold", type=int, default=0, help="with --janus-oracle-steps: density-fitting steps after each SDS step")
    p.add_argument("--janus-oracle-albedo-noise", type=float, default=0.0,
                   help="with --janus-oracle-steps: start the albedo from a random smooth colour field of this amplitude (logits)")
    p.add_argument("--shape-oracle-steps", type=int, default=0,
                   help="SDS steps of the preset on a field fitted to each true object of --shape-oracle-objects (measure_shape_oracle)")
    p.add_argument("--shape-oracle-objects", default="a red cube", help="comma-separated known captions (default: %(default)s)")
    p.add_argument("--shape-oracle-vd", default="on", help="with --shape-oracle-steps: view-dependent prompts on, off or on,off")
    p.add_argument("--run-flags", default="", help="with --shape-oracle-steps or --janus-oracle-steps: run flags on top of the preset, e.g. '--sds.guidance_scale 30'")
    p.add_argument("--silhouette-widths", default="",
                   help="comma-separated density edge widths: where the known objects' renders put their edge (no prior loaded)")
    p.add_argument("--silhouette-offsets", default="0",
                   help="with --silhouette-widths: comma-separated density offsets inside the surface, world units (default: %(default)s)")
    p.add_argument("--pixel-offsets", default="",
                   help="comma-separated offsets in pixels of the preset's renders: the IoU of each true solid grown by that much (no prior loaded), e.g. -1,-0.5,0.5,1")
    p.add_argument("--pixel-results", nargs="*", default=[],
                   help="with --pixel-offsets: bench prior JSON files whose runs' volumes become size errors in pixels")
    p.add_argument("--pixel-render-size", type=int, default=0, help="with --pixel-offsets: the renders' size (default: the GPU preset's)")
    p.add_argument("--radial-runs", nargs="*", default=[],
                   help="finished run folders (globs): where each surface is off along rays from the centre, at sharp turns and elsewhere, in pixels (no prior loaded)")
    p.add_argument("--runs", nargs="*", default=[], help="finished run folders (globs) to read thresholds and albedo from")
    p.add_argument("--skip-model", action="store_true", help="only the albedo and --runs numbers (no prior loaded)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="prior_diagnosis.json")
    args = p.parse_args(argv)
    from .prior import parse_run_flags

    try:  # a bad flag: one error line before any work
        run_flags = parse_run_flags(shlex.split(args.run_flags))
    except ValueError as exc:
        p.error(f"--run-flags: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    captions = [f"a {c} {args.shape}" for c in args.colors.split(",")]
    for c in captions:
        resolve_caption(c)
    result: dict[str, Any] = {"shape": args.shape, "model": args.model, "guidance_scale": args.guidance_scale,
                              "timesteps": list(TIMESTEPS), "towards_timesteps": list(TOWARDS_TIMESTEPS), "albedo": {c: albedo_logits(c) for c in captions}}  # fmt: skip
    if not args.skip_model:
        prior = _Prior(args.model, torch.device(args.device))
        if not (args.inflation_only and (args.inflation_scales or args.hole_scales or args.janus_scales)):
            result["colors"] = {}
            for c in captions:
                result["colors"][c] = measure_color(prior, c, args.renders, args.draws, args.guidance_scale, args.seed)
                log.info("%s: %s", c, json.dumps(result["colors"][c])[:600])
            result["linear_map"] = measure_linear_map(prior, captions, args.renders, args.seed)
        if args.inflation_scales:
            scales = [float(v) for v in args.inflation_scales.split(",")]
            caption = f"a {args.colors.split(',')[0]} {args.inflation_shape or args.shape}"
            result["guidance_inflation"] = measure_guidance_inflation(prior, resolve_caption(caption).caption, scales,
                                                                      TIMESTEPS, args.renders, args.draws, args.seed)  # fmt: skip
            for scale, rows in result["guidance_inflation"]["by_scale"].items():
                log.info("%s, guidance %s: x0^ area / true area by t: %s", caption, scale,
                         ", ".join(f"{t} {r['area_ratio']:.2f}" for t, r in rows.items()))  # fmt: skip
        if args.hole_scales:
            if args.shape != "torus":
                raise ValueError(f"--hole-scales measures a torus's hole; --shape is {args.shape!r}")
            scales = [float(v) for v in args.hole_scales.split(",")]
            result["hole"] = {c: measure_hole(prior, c, scales, TIMESTEPS, args.renders, args.draws, args.seed) for c in captions}
            for c, res in result["hole"].items():
                for scale, rows in res["by_scale"].items():
                    log.info("%s, guidance %s: hole open in x0^ from the filled / the true torus by t: %s", c, scale,
                             ", ".join(f"{t} {r['hole_open_from_filled']:.2f}/{r['hole_open_from_true']:.2f}" for t, r in rows.items()))  # fmt: skip
        if args.janus_scales:
            scales = [float(v) for v in args.janus_scales.split(",")]
            result["janus"] = measure_janus(prior, scales, JANUS_TIMESTEPS, args.renders, args.draws, args.seed,
                                            one_colour=args.janus_one_colour, perp_neg=args.janus_perp_neg)  # fmt: skip
            for scale, rows in result["janus"]["by_scale"].items():
                log.info("six-colored cube, guidance %s: faces right in x0^ from one colour / from the truth, view captions | bare, by t: %s",
                         scale, ", ".join(f"{t} {r['view_faces_right_from_one_colour']:.2f}/{r['view_faces_right_from_true']:.2f}"
                                          f" | {r['plain_faces_right_from_one_colour']:.2f}/{r['plain_faces_right_from_true']:.2f}"
                                          for t, r in rows.items()))  # fmt: skip
    if args.janus_oracle_steps > 0:
        result["janus_oracle"] = {}
        for vd in (True, False):
            res = measure_janus_oracle(args.janus_oracle_steps, vd, args.seed, device=args.device, t_max=args.janus_oracle_t_max,
                                       hold=args.janus_oracle_hold, flags=run_flags,
                                       albedo_noise=args.janus_oracle_albedo_noise)  # fmt: skip
            result["janus_oracle"]["on" if vd else "off"] = res
            log.info("six-colored cube on its true shape, VD %s: faces right %d -> %d of 6, IoU %.3f -> %.3f; after: %s",
                     "on" if vd else "off", res["colours_before"]["right"], res["colours_after"]["right"], res["iou_before"],
                     res["iou_after"], {f: v["nearest"] for f, v in res["colours_after"]["faces"].items()})  # fmt: skip
    if args.shape_oracle_steps > 0:
        result["shape_oracle"] = []
        for caption in [c.strip() for c in args.shape_oracle_objects.split(",")]:
            for vd in args.shape_oracle_vd.split(","):
                if vd not in ("on", "off"):
                    raise ValueError(f"--shape-oracle-vd takes on, off or on,off; got {vd!r}")
                res = measure_shape_oracle(caption, args.shape_oracle_steps, vd == "on", args.seed, device=args.device, flags=run_flags)
                result["shape_oracle"].append(res)
                log.info("%s from its true shape, VD %s (truth at the mesh level: IoU %.3f, volume %.2f): %s", caption, vd,
                         res["truth_at_mesh_threshold"]["iou"], res["truth_at_mesh_threshold"]["volume_ratio"],
                         "; ".join(f"step {r['step']}: IoU {r['iou']:.3f} (against the true level {r['iou_true_level']:.3f}), "
                                   f"volume {r['volume_ratio']:.2f}" + (f", faces {r['faces_right']}" if "faces_right" in r else "")
                                   for r in res["trajectory"]))  # fmt: skip
    if args.silhouette_widths:
        result["silhouette_halo"] = measure_silhouette_halo([float(w) for w in args.silhouette_widths.split(",")],
                                                            offsets=[float(o) for o in args.silhouette_offsets.split(",")])  # fmt: skip
        for shape, rows in result["silhouette_halo"]["by_shape"].items():
            log.info("%s: rendered / true silhouette area by width[@offset]: %s", shape,
                     ", ".join(f"{w} {r['silhouette_area_ratio']:.3f} (level {r['opacity_level']:.3g})" for w, r in rows.items()))  # fmt: skip
    if args.pixel_render_size < 0:
        p.error(f"--pixel-render-size must be positive, got {args.pixel_render_size}")
    if args.pixel_offsets:
        pixel = _preset_pixel(args.pixel_render_size)
        result["pixel_ceiling"] = res = measure_pixel_ceiling([float(v) for v in args.pixel_offsets.split(",")], pixel, args.pixel_results)
        for shape, rows in res["by_shape"].items():
            log.info("%s grown by k pixels (%.4f each): IoU %s", shape, pixel, ", ".join(f"{k}: {r['iou']:.3f}" for k, r in rows.items()))
        for r in res["runs"]:
            log.info("%s %s %s seed %s: IoU %.3f, volume %.2fx = %+.2f px, size-only IoU %.3f", r["file"], r["setting"], r["object"],
                     r["seed"], r["iou"], r["volume_ratio"], r["offset_px"], r["size_only_iou"])  # fmt: skip
    if args.radial_runs:
        pixel = _preset_pixel()
        radial = sorted({Path(f) for pattern in args.radial_runs for f in glob.glob(pattern)})
        result["radial_error"] = [r for r in (measure_radial_error(f, pixel) for f in radial if f.is_dir()) if r is not None]
        for r in result["radial_error"]:
            log.info("%s: surface off by %s px in median (sharp features %s, elsewhere %s)", r["object"], _px(r["all"]),
                     _px(r["sharp"]), _px(r["smooth"]))  # fmt: skip
    folders = sorted({Path(f) for pattern in args.runs for f in glob.glob(pattern)})
    result["runs"] = [r for r in (measure_run(f) for f in folders if f.is_dir()) if r is not None]
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
