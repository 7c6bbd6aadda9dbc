"""Training renders of the known objects, made the way SDS training renders a NeRF.

Every image comes out of the project's own `Renderer` (torch sampler, no jitter) looking at an
`AnalyticObject`, from cameras drawn by `sample_random_cameras` with the trainer's `CameraConfig`
and lit by the light those cameras carry. Its caption is the object's caption with the view
suffix the trainer would append for that camera (``view_prompt(caption, VIEWS[view_indices(...)])``),
or, for a share `plain_caption_prob` of the images, the bare caption, so the prior also serves runs
with ``prompt.view_dependent=false``.

Shading is drawn per image like the trainer's ``render.shading=random`` over a whole run: albedo
(the trainer's warm-up), lambertian (albedo lit by the camera's light, `ambient_ratio`) and
textureless (white material, same light). The prior thus knows what an unlit, a shaded and an
untextured version of each object look like, which are the three kinds of render SDS asks it about.
A textureless render keeps its object's caption, as in SDS training. The default draws no
textureless renders: a prior that had learned "a green sphere" may also be a white one let SDS
settle on white albedo (pale, washed-out objects in every run), so the shipped prior knows only
coloured objects, and its preset's ``render.textureless_ratio`` follows this share.

Backgrounds are white (`white_background_prob` = 1 by default; otherwise a uniformly random
solid colour), and a run with this prior renders on a solid white background too. A first prior
trained on random background colours accepted a screen filled with the object's colour as "a red
cube on a red background", so SDS filled the whole view with the colour; on white only, an object
has to leave white around it.

Cameras come from `PRIOR_CAMERA`: DreamFusion's elevation and azimuth ranges, but a nearly fixed
distance and field of view, seen from outside the box the NeRF lives in. A text-only prior cannot
tell a small object close by from a large one far away; with the distance and field of view pinned,
the size an object has in the image fixes its size in the world, which a scored run needs.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, replace

import torch

from ..cameras import get_rays, sample_random_cameras
from ..config import CameraConfig, FieldConfig, PromptConfig, RenderConfig
from ..field.background import Background
from ..guidance.text import VIEWS, view_indices, view_prompt
from ..render.renderer import Renderer
from .scenes import DEFAULT_WIDTH, KNOWN_CAPTIONS, KNOWN_OBJECTS

logger = logging.getLogger(__name__)

SHADINGS = ("albedo", "lambertian", "textureless")
PLAIN = len(VIEWS)  # view index of a caption without a view suffix


# The cameras of the prior's renders and of runs with the prior (its preset copies them): the
# object (inside [-0.5, 0.5]^3) fills about half the frame and the cameras stay outside the
# preset's field.bound (PRIOR_BOUND) box, so a run cannot fill the view with density.
PRIOR_CAMERA = CameraConfig(
    radius_range=(1.9, 2.1), fovy_range=(43.0, 47.0), val_radius=2.0, val_elevation=15.0, val_fovy=45.0,
)  # fmt: skip
PRIOR_BOUND = 0.6
# How far inside the surface the training objects' density is centred (world units): at the
# objects' edge width (scenes.DEFAULT_WIDTH, 0.01) a grazing ray renders the silhouette 14-25 %
# too large in area; 0.03 renders it at 0.98-1.04 of the true area (`prior_diagnosis
# --silhouette-widths 0.01 --silhouette-offsets ...`), so SDS sees each object at its own size.
PRIOR_OFFSET = 0.03


def prior_camera() -> CameraConfig:
    return replace(PRIOR_CAMERA)


@dataclass
class DatasetConfig:
    images_per_object: int = 1500
    multicolor_factor: int = 3  # the six-colored cube gets this many times more renders: its views all differ
    image_size: int = 64  # renders are image_size x image_size (the trainer's camera.render_size)
    num_samples: int = 96  # samples per ray of the torch renderer (the trainer marches about as finely)
    object_width: float = DEFAULT_WIDTH  # the objects' density edge (scenes.AnalyticObject's width), world units
    # How far inside the surface the objects' density is centred (AnalyticObject's offset), world
    # units: 0 renders silhouettes about a pixel outside the true one at width 0.01.
    object_offset: float = PRIOR_OFFSET
    shading_probs: tuple[float, float, float] = (0.4, 0.6, 0.0)  # albedo, lambertian, textureless
    ambient_ratio: float = 0.1  # the trainer's render.ambient_ratio
    white_background_prob: float = 1.0  # otherwise a uniformly random solid colour
    plain_caption_prob: float = 0.1  # share of captions without a view suffix
    batch: int = 64  # cameras per renderer call
    seed: int = 0
    captions: tuple[str, ...] = KNOWN_CAPTIONS  # which known objects to render
    camera: CameraConfig = field(default_factory=prior_camera)
    prompt: PromptConfig = field(default_factory=PromptConfig)


@dataclass
class RenderedDataset:
    """N renders with their labels; texts are indexed ``object * (len(VIEWS) + 1) + view`` where
    view ``len(VIEWS)`` means the bare caption."""

    images: torch.Tensor  # [N, 3, H, W] uint8
    object_index: torch.Tensor  # [N] long, into `captions`
    view_index: torch.Tensor  # [N] long, into VIEWS (the camera's view, also for bare captions)
    text_index: torch.Tensor  # [N] long, into `texts`
    shading_index: torch.Tensor  # [N] long, into SHADINGS
    elevation_deg: torch.Tensor  # [N] the cameras' elevations
    azimuth_deg: torch.Tensor  # [N] the cameras' azimuths
    captions: tuple[str, ...]  # the objects' captions
    texts: tuple[str, ...]  # every caption text, view variants included

    def __len__(self) -> int:
        return self.images.shape[0]

    def float_images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images as float in [0, 1], ``[n, 3, H, W]``."""
        imgs = self.images if index is None else self.images[index]
        return imgs.float() / 255.0

    def to(self, device: torch.device | str) -> "RenderedDataset":
        move = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return RenderedDataset(**move)


def caption_texts(captions: tuple[str, ...]) -> tuple[str, ...]:
    """Per caption: its four view variants in `VIEWS` order, then the bare caption."""
    return tuple(t for c in captions for t in (*(view_prompt(c, v) for v in VIEWS), c))


def text_index(object_index: int | torch.Tensor, view: int | torch.Tensor) -> int | torch.Tensor:
    return object_index * (len(VIEWS) + 1) + view


def _check(cfg: DatasetConfig) -> None:
    if not cfg.object_width > 0:
        raise ValueError(f"dataset object_width must be positive, got {cfg.object_width!r}")
    if not 0.0 <= cfg.object_offset < 0.1:
        raise ValueError(f"dataset object_offset must be in [0, 0.1) world units, got {cfg.object_offset!r}")
    if min(cfg.images_per_object, cfg.batch, cfg.num_samples, cfg.multicolor_factor) < 1 or cfg.image_size < 8:
        raise ValueError(
            f"dataset needs images_per_object, batch, num_samples, multicolor_factor >= 1 and image_size >= 8; got "
            f"{cfg.images_per_object!r}, {cfg.batch!r}, {cfg.num_samples!r}, {cfg.multicolor_factor!r}, {cfg.image_size!r}"
        )
    probs = torch.tensor(cfg.shading_probs, dtype=torch.float64)
    if probs.shape != (3,) or (probs < 0).any() or float(probs.sum()) <= 0:
        raise ValueError(f"shading_probs must be three non-negative weights, got {cfg.shading_probs!r}")
    unknown = [c for c in cfg.captions if c not in KNOWN_OBJECTS]
    if unknown or not cfg.captions:
        raise ValueError(f"dataset captions must be known objects, got {unknown or cfg.captions!r}")


@torch.no_grad()
def render_dataset(cfg: DatasetConfig, device: torch.device | str = "cpu") -> RenderedDataset:
    """Render ``images_per_object`` views of every object in ``cfg.captions`` on `device`
    (``multicolor_factor`` times as many of the six-colored cube).

    All random draws (cameras, shading, backgrounds, caption variants) of an object come from a
    CPU generator seeded from ``cfg.seed`` and its caption, so the dataset depends neither on the
    device nor on which other objects are rendered. Returns the images on `device`.
    """
    _check(cfg)
    device = torch.device(device)
    size = cfg.image_size
    render_cfg = RenderConfig(backend="torch", num_samples=cfg.num_samples, ambient_ratio=cfg.ambient_ratio)
    probs = torch.tensor(cfg.shading_probs, dtype=torch.float64)
    images, objects, views, texts, shadings, elevations, azimuths = [], [], [], [], [], [], []
    start = time.perf_counter()
    for o, caption in enumerate(cfg.captions):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(caption.encode()))
        n = cfg.images_per_object * (cfg.multicolor_factor if KNOWN_OBJECTS[caption].multicolored else 1)
        cams = sample_random_cameras(n, cfg.camera, gen)
        shading = torch.multinomial(probs, n, replacement=True, generator=gen)
        white = torch.rand(n, generator=gen) < cfg.white_background_prob
        bg = torch.where(white[:, None], torch.ones(n, 3), torch.rand(n, 3, generator=gen))
        plain = torch.rand(n, generator=gen) < cfg.plain_caption_prob
        view = view_indices(cams.elevation_deg, cams.azimuth_deg, cfg.prompt)
        out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
        obj = KNOWN_OBJECTS[caption].build(width=cfg.object_width, offset=cfg.object_offset).to(device)
        for s, mode in enumerate(SHADINGS):
            idx = torch.nonzero(shading == s)[:, 0]
            for chunk in idx.split(cfg.batch):
                k = len(chunk)
                renderer = Renderer(
                    obj.with_prompts(k), Background(FieldConfig(background="solid"), k), render_cfg, bound=obj.bound
                ).eval()
                sub = cams.take(chunk).to(device)
                rays_o, rays_d = get_rays(sub, size, size)  # [k, H*W, 3]
                result = renderer.render(
                    rays_o, rays_d, sub.light_dir, shading=mode, ambient_ratio=cfg.ambient_ratio,
                    stratified=False, background=bg[chunk, None, :].to(device),
                )  # fmt: skip
                rgb = result.rgb.reshape(k, size, size, 3).permute(0, 3, 1, 2)
                out[chunk.to(device)] = (rgb.clamp(0, 1) * 255.0).round().to(torch.uint8)
        images.append(out)
        objects.append(torch.full((n,), o, dtype=torch.long))
        views.append(view)
        texts.append(text_index(o, torch.where(plain, torch.full_like(view, PLAIN), view)))
        shadings.append(shading)
        elevations.append(cams.elevation_deg)
        azimuths.append(cams.azimuth_deg)
        logger.info("rendered %d views of %r (%d/%d objects, %.1f s)", n, caption, o + 1, len(cfg.captions),
                    time.perf_counter() - start)  # fmt: skip
    return RenderedDataset(
        images=torch.cat(images),
        object_index=torch.cat(objects).to(device),
        view_index=torch.cat(views).to(device),
        text_index=torch.cat(texts).to(device),
        shading_index=torch.cat(shadings).to(device),
        elevation_deg=torch.cat(elevations).to(device),
        azimuth_deg=torch.cat(azimuths).to(device),
        captions=tuple(cfg.captions),
        texts=caption_texts(tuple(cfg.captions)),
    )
