"""Images and videos people look at: uint8 conversion, image grids, PNG and MP4 writers.

Every image here is channels-last RGB: float in [0, 1] (torch or numpy) or uint8, shaped
[H, W, 3] for one image and [N, H, W, 3] for a batch. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from pathlib import Path
from typing import Iterable, Protocol, Sequence

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


# MP4 writers, in order of preference: (name, pip package that provides it).
VIDEO_WRITERS = (("imageio-ffmpeg", "imageio-ffmpeg"), ("opencv", "opencv-python-headless"), ("pyav", "av"))


class NoVideoWriter(ValueError):
    """No MP4 writer is installed; the message names what to install."""


def _import(name: str):
    """importlib.import_module, as one seam (tests hide writers through it)."""
    return importlib.import_module(name)


class _FrameSink(Protocol):
    def append(self, frame: np.ndarray) -> None: ...  # uint8 [H, W, 3] RGB, even H and W
    def close(self) -> None: ...


class _ImageioSink:
    """H.264 yuv420p through imageio's FFMPEG plugin (the ffmpeg binary of imageio-ffmpeg)."""

    def __init__(self, path: Path, fps: float, width: int, height: int) -> None:
        _import("imageio_ffmpeg").get_ffmpeg_exe()  # RuntimeError when its binary is missing
        imageio = _import("imageio.v2")
        self._writer = imageio.get_writer(
            path,
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

    def append(self, frame: np.ndarray) -> None:
        self._writer.append_data(frame)

    def close(self) -> None:
        self._writer.close()


class _OpenCVSink:
    """OpenCV's VideoWriter: H.264 ('avc1') where its build encodes it, else MPEG-4 ('mp4v')."""

    def __init__(self, path: Path, fps: float, width: int, height: int) -> None:
        cv2 = self._cv2 = _import("cv2")
        for fourcc in ("avc1", "mp4v"):
            with _quiet_opencv(cv2):  # a build without an H.264 encoder says so on stderr
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height))
            if writer.isOpened():
                self._writer = writer
                return
            writer.release()
        raise RuntimeError("OpenCV's VideoWriter opens neither an 'avc1' nor an 'mp4v' MP4 stream")

    def append(self, frame: np.ndarray) -> None:
        self._writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR

    def close(self) -> None:
        self._writer.release()


class _PyAVSink:
    """PyAV (libav* bindings): H.264 yuv420p where its build has an encoder for it, else MPEG-4."""

    def __init__(self, path: Path, fps: float, width: int, height: int) -> None:
        from fractions import Fraction

        av = self._av = _import("av")
        self._container = av.open(str(path), mode="w", format="mp4")
        for codec in ("libx264", "h264", "mpeg4"):
            try:
                stream = self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                break
            except Exception:  # noqa: BLE001 -- av raises codec-specific errors for missing encoders
                continue
        else:
            self._container.close()
            raise RuntimeError("PyAV has no H.264 or MPEG-4 encoder")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        self._stream = stream

    def append(self, frame: np.ndarray) -> None:
        packets = self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24"))
        self._container.mux(packets)

    def close(self) -> None:
        try:
            self._container.mux(self._stream.encode(None))  # flush the encoder
        finally:
            self._container.close()


@contextlib.contextmanager
def _quiet_opencv(cv2):
    utils = getattr(getattr(cv2, "utils", None), "logging", None)
    if utils is None:
        yield
        return
    level = utils.getLogLevel()
    utils.setLogLevel(utils.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        utils.setLogLevel(level)


_SINKS = {"imageio-ffmpeg": _ImageioSink, "opencv": _OpenCVSink, "pyav": _PyAVSink}


def _open_sink(path: Path, fps: float, width: int, height: int, final: Path) -> tuple[str, _FrameSink]:
    """The first MP4 writer that is installed and opens; NoVideoWriter when none does."""
    reasons = []
    for name, _package in VIDEO_WRITERS:
        try:
            return name, _SINKS[name](path, fps, width, height)
        except (ImportError, RuntimeError, OSError) as exc:
            reasons.append(f"{name}: {' '.join(str(exc).split()) or type(exc).__name__}")
            logger.debug("MP4 writer %s unavailable: %s", name, exc)
    packages = [pkg for _, pkg in VIDEO_WRITERS]
    raise NoVideoWriter(
        f"no MP4 writer is available for '{final}' ({'; '.join(reasons)}); "
        f"install one: pip install {packages[0]} (or {', or '.join(packages[1:])})"
    )


def write_video(frames: Iterable[ImageLike] | ImageLike, path: str | Path, fps: float = 30) -> Path:
    """Encode frames (each [H, W, 3] float in [0, 1] or uint8) to an MP4, atomically.

    `frames` may be a [N, H, W, 3] array/tensor or any iterable of frames (streamed, so a generator
    never holds the whole video in memory). The writer is the first of `VIDEO_WRITERS` that is
    installed: imageio-ffmpeg (H.264 yuv420p), OpenCV's VideoWriter, PyAV; none raises
    `NoVideoWriter` naming what to install. yuv420p needs even sizes: odd heights or widths are
    padded by one replicated edge row/column (pixels are never resampled). All frames must share
    one shape; a mismatch raises ValueError and leaves no file behind.
    """
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
    even = _even(first).shape
    count = 0
    with atomic_path(path) as tmp:
        name, sink = _open_sink(tmp, fps, even[1], even[0], path)
        try:
            frame = first
            while True:
                if frame.shape != shape:
                    raise ValueError(f"video frame {count} has shape {frame.shape}, expected {shape} like frame 0")
                sink.append(_even(frame))
                count += 1
                try:
                    frame = to_uint8(next(it))
                except StopIteration:
                    break
        finally:
            sink.close()
    logger.info("wrote %s with %s (%d frames of %dx%d at %g fps)", path, name, count, shape[1], shape[0], fps)
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
