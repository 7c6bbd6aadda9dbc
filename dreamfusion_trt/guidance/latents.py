"""How a NeRF render becomes the latents that SDS scores.

RGB phase: the render [K, 3, H, W] is resized to `encode_size` and encoded by the VAE encoder
with autograd, so the SDS gradient reaches the pixels through the encoder's Jacobian.

Latent phase: the render at 64x64 is used directly as a 64x64 latent through a per-pixel linear
map colour -> latent, W [C, 3] and b [C], fitted by least squares to what the VAE encoder itself
produces for flat colours and smooth colour gradients. The field keeps one RGB colour head for
both phases; because the map is the encoder's own (linearised) response to colour, a field
trained in latent space already has the colours the encoder will see, so the RGB phase starts
from what the latent phase learned instead of re-learning its appearance. (A separate 4-channel
latent head would leave the RGB head untrained until the switch.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engines.base import ImageEncoder

logger = logging.getLogger(__name__)


def encode_rgb(images: torch.Tensor, encoder: ImageEncoder, size: int) -> torch.Tensor:
    """images [K, 3, H, W] in [0, 1] -> latents [K, C, size/8, size/8], differentiable."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [K, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return encoder(images * 2.0 - 1.0)


class LinearLatentMap(torch.nn.Module):
    """Per-pixel affine colour -> latent map: images [K, 3, h, w] in [0, 1] -> latents [K, C, h, w].

    `weight` [C, 3], `bias` [C] and the fit's `r2` are buffers, so ``state_dict()`` saves them.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, r2: float | torch.Tensor = float("nan")) -> None:
        super().__init__()
        if weight.ndim != 2 or weight.shape[1] != 3 or bias.shape != weight.shape[:1]:
            raise ValueError(f"expected weight [C, 3] and bias [C], got {tuple(weight.shape)} and {tuple(bias.shape)}")
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        self.register_buffer("r2", torch.as_tensor(r2, dtype=torch.float32).clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [K, 3, h, w], got shape {tuple(images.shape)}")
        w, b = self.weight.to(images.dtype), self.bias.to(images.dtype)
        return torch.einsum("cj,kjhw->kchw", w, images) + b[None, :, None, None]


def fit_rgb_to_latent(
    encoder: ImageEncoder,
    device: torch.device | str,
    dtype: torch.dtype,
    n_colors: int = 64,
    size: int = 64,
    seed: int = 0,
) -> LinearLatentMap:
    """Fit a `LinearLatentMap` to `encoder` from `n_colors` flat-colour images and as many
    smooth two-colour gradients, all size x size; each latent pixel (but the outer ring) is
    paired with the mean colour of the image patch it covers. Logs the fit's R^2."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.rand(n_colors, 3, 1, 1, generator=gen).expand(n_colors, 3, size, size)
    # Gradients from colour c0 to c1 along a random direction across the image.
    c0, c1 = torch.rand(2, n_colors, 3, 1, 1, generator=gen)
    angle = torch.rand(n_colors, 1, 1, generator=gen) * 2 * torch.pi
    ys, xs = torch.meshgrid(torch.linspace(-0.5, 0.5, size), torch.linspace(-0.5, 0.5, size), indexing="ij")
    s = (xs * angle.cos() + ys * angle.sin() + 0.5).clamp(0, 1)[:, None]  # [n, 1, size, size]
    images = torch.cat([flat, c0 + (c1 - c0) * s]).to(device=device, dtype=dtype)  # [2n, 3, size, size]

    with torch.no_grad():
        latents = torch.cat([encoder(chunk * 2.0 - 1.0) for chunk in images.split(16)]).double()
    factor = size // latents.shape[-1]
    colors = F.avg_pool2d(images.double(), factor)  # [2n, 3, h, w], the patch under each latent pixel
    if latents.shape[-1] > 4:  # the outer ring carries the encoder's zero padding, not the colour
        latents, colors = latents[..., 1:-1, 1:-1], colors[..., 1:-1, 1:-1]
    x = colors.permute(0, 2, 3, 1).reshape(-1, 3).cpu()
    y = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).cpu()  # [N, C]
    design = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [N, 4]
    solution = torch.linalg.lstsq(design, y).solution  # [4, C]
    r2 = float(1.0 - (y - design @ solution).square().sum() / (y - y.mean(0)).square().sum())
    logger.info("fitted RGB -> latent map to the VAE encoder on %d pixels: R^2 = %.4f", x.shape[0], r2)
    return LinearLatentMap(solution[:3].T, solution[3], r2).to(device)


def latent_map_cache_path(cache_dir: str | Path, model_key: str, device: torch.device | str, dtype: torch.dtype,
                          n_colors: int = 64, size: int = 64, seed: int = 0) -> Path:  # fmt: skip
    """``<cache_dir>/colour_map/<model key>/<device type>-<dtype>-n{n}-s{size}-seed{seed}.safetensors``:
    the fit depends on the weights (the key), the fit's settings and the arithmetic it ran in."""
    tag = f"{torch.device(device).type}-{str(dtype).removeprefix('torch.')}-n{n_colors}-s{size}-seed{seed}"
    return Path(cache_dir).expanduser() / "colour_map" / model_key / f"{tag}.safetensors"


def load_or_fit_rgb_to_latent(
    encoder: ImageEncoder,
    model_key: str,
    cache_dir: str | Path | None,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
) -> LinearLatentMap:
    """`fit_rgb_to_latent`, cached on disk per model (`latent_map_cache_path`); a cache file that
    does not read back as a [C, 3] map is fitted again and rewritten. `cache_dir` None: no cache."""
    if cache_dir is None:
        return fit_rgb_to_latent(encoder, device=device, dtype=dtype, seed=seed)
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from ..atomic import atomic_path

    path = latent_map_cache_path(cache_dir, model_key, device, dtype, seed=seed)
    if path.is_file():
        try:
            t = load_file(str(path))
            latent_map = LinearLatentMap(t["weight"], t["bias"], t["r2"])
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            logger.warning("colour -> latent map cache '%s' is unreadable (%s); fitting again", path, exc)
        else:
            logger.info("RGB -> latent map from the cache (R^2 = %.4f): %s", float(latent_map.r2), path)
            return latent_map.to(device)
    latent_map = fit_rgb_to_latent(encoder, device=device, dtype=dtype, seed=seed)
    try:
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in latent_map.state_dict().items()}, str(tmp))
    except OSError as exc:  # a read-only cache must not stop the run
        logger.warning("could not cache the colour -> latent map in '%s': %s", path, exc)
    return latent_map
