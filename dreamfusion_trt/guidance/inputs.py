"""How a render becomes what the noise predictor scores: one strategy per training phase.

Each strategy turns renders ``[n, 3, R, R]`` in [0, 1] (R = its `render_size`) into the model
input SDS works on, differentiably, and says which space that input lives in:

- ``latent``: the input *is* a latent ``[n, C, h, w]``; SDS pushes w(t)(eps_hat - eps) into it.
  `ColourMap` (the latent phase: a per-pixel linear colour -> latent map fitted to the VAE),
  `VAEEncoding` (the RGB phase: resize to the VAE's input size and encode with autograd) and
  `DistilledEncoding` (the RGB phase through a small network fitted to that same function and
  its vector-Jacobian products, `render_encoder.py`; the full VAE is its tested twin).
- ``image``: the input is the image the VAE encoder sees, ``[n, 3, E, E]`` in [-1, 1];
  `ImageSpace` encodes and decodes it inference-only (so both VAE halves may be engines) and
  SDS compares the image with the decoded denoised latent (`image_sds.py`).

`SDSGuidance` (sds.py) holds one strategy per phase, chosen once from the config; the trainer
never asks which one it has. A new way to encode renders is a new class here.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from ..engines.base import ImageEncoder, LatentDecoder
from .latents import LinearLatentMap, encode_rgb
from .precondition import precondition

Space = Literal["latent", "image"]


class RenderInput(Protocol):
    """Renders [n, 3, R, R] in [0, 1] -> the model input SDS scores (differentiable)."""

    space: Space
    render_size: int  # R: the size the phase renders at
    latent_shape: tuple[int, int, int]  # (C, h, w) of the latents the noise is drawn for

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class ColourMap:
    """The latent phase: the render at the latent resolution, mapped colour -> latent per pixel."""

    space: Space = "latent"

    def __init__(self, latent_map: LinearLatentMap, latent_size: int) -> None:
        self.latent_map = latent_map
        self.render_size = latent_size
        self.latent_shape = (int(latent_map.weight.shape[0]), latent_size, latent_size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.latent_map(images)  # [n, C, h, w]: the render is the latent


class VAEEncoding:
    """The RGB phase: resize to `encode_size` and encode with the VAE encoder, with autograd."""

    space: Space = "latent"

    def __init__(self, encoder: ImageEncoder, encode_size: int, render_size: int, latent_shape: tuple[int, int, int]) -> None:
        self.encoder = encoder
        self.encode_size = encode_size
        self.render_size = render_size
        self.latent_shape = latent_shape

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return encode_rgb(images, self.encoder, self.encode_size)  # [n, C, h, w]


class DistilledEncoding:
    """The RGB phase through a distilled render encoder: render -> latents in one small network."""

    space: Space = "latent"

    def __init__(self, encoder: torch.nn.Module, render_size: int, latent_shape: tuple[int, int, int]) -> None:
        self.encoder = encoder
        self.render_size = render_size
        self.latent_shape = latent_shape

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)  # [n, C, h, w]


class ImageSpace:
    """The RGB phase without gradient through the VAE: the model input is the encoder's image."""

    space: Space = "image"

    def __init__(
        self, encoder: ImageEncoder, decoder: LatentDecoder, encode_size: int, render_size: int, latent_shape: tuple[int, int, int]
    ) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.encode_size = encode_size
        self.render_size = render_size
        self.latent_shape = latent_shape

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.encode_size, self.encode_size)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False) * 2.0 - 1.0  # [n, 3, E, E]


class ColourPreconditioned:
    """A latent-space strategy whose renders' gradients are colour-preconditioned
    (`precondition.py`): the same model input, the pull of every colour direction evened out."""

    space: Space = "latent"

    def __init__(self, inner: RenderInput, preconditioner: torch.Tensor) -> None:
        if inner.space != "latent":
            raise ValueError("colour preconditioning applies to latent-space SDS (sds.rgb_mode latent)")
        self.inner = inner
        self.preconditioner = preconditioner
        self.render_size = inner.render_size
        self.latent_shape = inner.latent_shape

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(precondition(images, self.preconditioner.to(images.device)))
