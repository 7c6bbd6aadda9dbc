"""Images and videos people look at: uint8 conversion, image grids, PNG and MP4 writers.

Every image here is channels-last RGB: float in [0, 1] (torch or numpy) or uint8, shaped
[H, W, 3] for one image and [N, H, W, 3] for a batch. Files are written atomically.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..atomic import atomic_path

logger = logging.getLogger(__name__)

ImageLike = np.ndarray | torch.Tensor


def to_uint8(images: ImageLike) -> np.ndarray:
    """[..., H, W, 3] float in [0, 1] (clamped; NaN -> 0) or uint8 -> uint8 numpy, same shape."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        if images.dtype == torch.uint8:
            images = images.numpy()
        else:
            images = images.float().numpy()
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"expected images shaped [..., H, W, 3], got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"expected float images in [0, 1] or uint8 images, got dtype {images.dtype}")
    images = np.nan_to_num(images.astype(np.float32), nan=0.0)
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def image_grid(
    images: ImageLike | Sequence[ImageLike], cols: int | None = None, pad: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tile N images [N, H, W, 3] into rows of `cols` (default ceil(sqrt(N))) -> uint8 [H', W', 3].

    ``H' = rows * H + (rows - 1) * pad`` and ``W' = cols * W + (cols - 1) * pad``: `pad` pixels of
    `pad_value` between tiles, no outer border; unfilled cells of the last row are `pad_value`.
    """
    batch = _stack(images)  # [N, H, W, 3] uint8
    n, h, w, _ = batch.shape
    if cols is None:
        cols = math.ceil(math.sqrt(n))
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols!r}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad!r}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    out = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), pad_value, dtype=np.uint8)
    for i, img in enumerate(batch):
        r, c = divmod(i, cols)
        y, x = r * (h + pad), c * (w + pad)
        out[y : y + h, x : x + w] = img
    return out


def side_by_side(panels: Sequence[ImageLike], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Join panels left to right: each [..., H, W, 3] with the same leading dims -> uint8 [..., H, W', 3].

    Works on single images and on whole frame stacks alike, e.g. a turntable's
    ``side_by_side([rgb, normals, textureless])`` with each [N, H, W, 3] gives [N, H, 3W + 2 pad, 3].
    """
    if len(panels) == 0:
        raise ValueError("side_by_side needs at least one panel")
    arrays = [to_uint8(p) for p in panels]
    lead = arrays[0].shape[:-2]
    for a in arrays[1:]:
        if a.shape[:-2] != lead:
            raise ValueError(
                f"side_by_side panels must share leading dims and height, got shapes {[x.shape for x in arrays]}"
            )
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad!r}")
    gap = np.full((*lead, pad, 3), pad_value, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, a in enumerate(arrays):
        if i and pad:
            parts.append(gap)
        parts.append(a)
    return np.concatenate(parts, axis=-2)


def write_png(image: ImageLike, path: str | Path) -> Path:
    """Write one image [H, W, 3] (float in [0, 1] or uint8) to a .png file, atomically."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"write_png writes .png files, got '{path}'")
    img = to_uint8(image)
    if img.ndim != 3:
        raise ValueError(f"write_png expects one image [H, W, 3], got shape {img.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG")
    return path


def write_video(frames: Iterable[ImageLike] | ImageLike, path: str | Path, fps: float = 30) -> Path:
    """Encode frames (each [H, W, 3] float in [0, 1] or uint8) to an H.264 yuv420p MP4, atomically.

    `frames` may be a [N, H, W, 3] array/tensor or any iterable of frames (streamed, so a generator
    never holds the whole video in memory). yuv420p needs even sizes: odd heights or widths are
    padded by one replicated edge row/column (pixels are never resampled). All frames must share
    one shape; a mismatch raises ValueError and leaves no file behind.
    """
    import imageio.v2 as imageio

    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"write_video writes .mp4 files, got '{path}'")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    it = iter(frames)
    try:
        first = to_uint8(next(it))
    except StopIteration:
        raise ValueError(f"no frames to write to '{path}'") from None
    if first.ndim != 3:
        raise ValueError(f"video frames must be [H, W, 3], got shape {first.shape}")
    shape = first.shape
    count = 0
    with atomic_path(path) as tmp:
        writer = imageio.get_writer(
            tmp,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=8,
            macro_block_size=1,  # sizes are made even here; no silent resize by the plugin
            ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart"],
        )
        try:
            frame = first
            while True:
                if frame.shape != shape:
                    raise ValueError(f"video frame {count} has shape {frame.shape}, expected {shape} like frame 0")
                writer.append_data(_even(frame))
                count += 1
                try:
                    frame = to_uint8(next(it))
                except StopIteration:
                    break
        finally:
            writer.close()
    logger.info("wrote %s (%d frames of %dx%d at %g fps)", path, count, shape[1], shape[0], fps)
    return path


# ---------------------------------------------------------------------------------------------
# helpers


def _stack(images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
    """A batch [N, H, W, 3] or a sequence of [H, W, 3] images -> uint8 [N, H, W, 3]."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        batch = to_uint8(images)
    else:
        items = [to_uint8(x) for x in images]
        if not items:
            raise ValueError("no images given")
        shapes = {x.shape for x in items}
        if len(shapes) != 1:
            raise ValueError(f"all images must share one shape, got {sorted(shapes)}")
        batch = np.stack(items)
    if batch.ndim != 4:
        raise ValueError(f"expected images shaped [N, H, W, 3], got shape {batch.shape}")
    if batch.shape[0] == 0:
        raise ValueError("no images given")
    return batch


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad [H, W, 3] to even H and W by replicating the last row/column."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
