"""Decode images (Pillow) and videos (PyAV), pick frame windows, resize to buckets: items -> clips to encode.

Layouts
-------
* ``Clip.pixels``: ``(F, H, W, 3)`` uint8 RGB numpy array at the bucket size (F = 1 for images).
* ``Clip.to_tensor()``: ``(F, 3, H, W)`` float32 in [-1, 1] (``x / 127.5 - 1``), what the VAE encoder takes
  after the caller adds the batch axis and moves channels: ``frames.permute(1, 0, 2, 3)[None]`` is (1, 3, F, H, W).
* Sizes are ``(width, height)``; frame indices count frames *after* ``source_fps`` resampling (the 24 fps
  timeline), while ``ClipPlan.source_indices`` are the matching positions in the decoded file.

Pipeline per item: ``plan_clips`` probes the header only (size, frame count; no decode), resamples the frame
timeline to 24 fps when ``source_fps`` is set, cuts it into windows (``frame_windows``) and picks the bucket from
the source size.  ``load_clips`` decodes just the frames those plans need, resizes each to the bucket (scale to
cover: LANCZOS when enlarging, BOX = area averaging when shrinking, as musubi's LANCZOS / INTER_AREA; then centre
crop) and yields one ``Clip`` per plan.  Unreadable media raises ``MediaError`` so a caller can report and skip.

``source_fps`` resampling follows musubi: a source frame i is kept when ``floor(i * 24 / source_fps)`` is new, so
30 fps keeps 4 of every 5 frames; a source slower than 24 fps keeps every frame (nothing is duplicated).  Without
``source_fps`` every decoded frame is used, whatever the file's own rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.buckets import select_bucket
from dataset.config import FRAME_EXTRACTION_MODES, DatasetSpec, round_to_4k1
from dataset.sources import Item
from kandinsky5.common import get_logger

__all__ = [
    "MediaError",
    "MediaInfo",
    "ClipPlan",
    "Clip",
    "TARGET_FPS",
    "NABLA_MULTIPLE",
    "probe_media",
    "resample_indices",
    "frame_windows",
    "plan_clips",
    "load_clips",
    "load_image",
    "resize_to_bucket",
    "pixels_to_tensor",
    "nabla_size",
    "nabla_resize",
]

log = get_logger(__name__)

TARGET_FPS = 24.0  # every Kandinsky 5 video model runs at 24 fps
NABLA_MULTIPLE = 128  # NABLA needs pixel H and W divisible by 128 (latent /8, patch /2, 8x8 token tiles)
_IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)  # PIL raises SyntaxError for broken PNG chunks
_VIDEO_ERRORS = (av.FFmpegError, OSError, ValueError)


class MediaError(Exception):
    """A media file that cannot be probed or decoded (corrupt, empty, too small, unsupported)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class MediaInfo:
    width: int
    height: int
    num_frames: int  # decodable frames claimed by the container (1 for images)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(frozen=True)
class ClipPlan:
    """One clip to encode, known before decoding."""

    kind: str  # "image" | "video"
    bucket_size: tuple[int, int]  # (W, H) the pixels are resized and cropped to
    source_size: tuple[int, int]  # (W, H) of the media file (part of the cache file name, as in musubi)
    frame_indices: tuple[int, ...]  # on the 24 fps timeline; (0,) for images
    source_indices: tuple[int, ...]  # decoded-frame positions in the file
    source_frames: int = 1  # frames in the media file (recorded in the cache: the trainer re-derives the windows)

    @property
    def start(self) -> int | None:
        """First frame index for the cache file name; None for images (their names have no frame part)."""
        return self.frame_indices[0] if self.kind == "video" else None

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def bucket_key(self) -> tuple[int, int, int]:
        """(W, H, frames): items batch together only with equal keys."""
        return (*self.bucket_size, self.num_frames)


@dataclass(frozen=True)
class Clip:
    plan: ClipPlan
    pixels: np.ndarray  # (F, H, W, 3) uint8

    def to_tensor(self) -> torch.Tensor:
        """(F, 3, H, W) float32 in [-1, 1]."""
        return pixels_to_tensor(self.pixels)


# ------------------------------------------------------------------------------------------------------------
# Pure helpers: fps resampling and frame windows
# ------------------------------------------------------------------------------------------------------------


def resample_indices(num_frames: int, source_fps: float | None, target_fps: float = TARGET_FPS) -> list[int]:
    """Source positions kept when converting ``num_frames`` frames from ``source_fps`` to ``target_fps``."""
    if not source_fps:
        return list(range(num_frames))
    ratio = Fraction(str(target_fps)) / Fraction(str(source_fps))
    kept, previous = [], -1
    for i in range(num_frames):
        target = math.floor(i * ratio)
        if target != previous:
            kept.append(i)
            previous = target
    return kept


def frame_windows(
    num_frames: int,
    target_frames: Sequence[int],
    mode: str,
    stride: int = 1,
    sample: int = 1,
    max_frames: int = 129,
) -> list[list[int]]:
    """Frame-index windows cut from a video of ``num_frames`` frames (see docs/dataset_config.md for examples).

    For each T in ``target_frames`` (in order; T larger than the video gives nothing):
    ``head`` [0, T); ``chunk`` [0, T), [T, 2T), ... while they fit; ``slide`` starts 0, stride, 2*stride, ...
    up to N - T; ``uniform`` ``sample`` starts evenly spread over [0, N - T] (start_i = floor(i * (N - T) /
    (sample - 1)), duplicates dropped).  ``full`` ignores ``target_frames``: one window of min(N, max_frames)
    frames rounded down to 4k+1.
    """
    if mode not in FRAME_EXTRACTION_MODES:
        raise ValueError(f"frame_extraction {mode!r} is not one of {', '.join(FRAME_EXTRACTION_MODES)}")
    if mode == "full":
        return [list(range(round_to_4k1(min(num_frames, max_frames))))] if num_frames >= 1 else []
    windows = []
    for t in target_frames:
        if t <= num_frames:
            windows += [list(range(s, s + t)) for s in _window_starts(num_frames, t, mode, stride, sample)]
    return windows


def _window_starts(n: int, t: int, mode: str, stride: int, sample: int) -> list[int]:
    if mode == "head":
        return [0]
    if mode == "chunk":
        return list(range(0, n - t + 1, t))
    if mode == "slide":
        return list(range(0, n - t + 1, stride))
    if sample == 1:  # uniform
        return [0]
    return list(dict.fromkeys(i * (n - t) // (sample - 1) for i in range(sample)))


# ------------------------------------------------------------------------------------------------------------
# Probing and planning
# ------------------------------------------------------------------------------------------------------------


def probe_media(path: str | Path, kind: str) -> MediaInfo:
    """Size and frame count from the file header (and, for videos without a frame count, the packet index)."""
    return _probe_image(Path(path)) if kind == "image" else _probe_video(Path(path))


def _probe_image(path: Path) -> MediaInfo:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except _IMAGE_ERRORS as e:
        raise MediaError(path, f"cannot read image: {e}") from None
    return MediaInfo(width, height, 1)


def _probe_video(path: Path) -> MediaInfo:
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = _video_stream(container, path)
            width, height = stream.codec_context.width, stream.codec_context.height
            count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except _VIDEO_ERRORS as e:
        raise MediaError(path, f"cannot open video: {e}") from None
    if count < 1 or width < 1 or height < 1:
        raise MediaError(path, f"video has no frames ({count} frames, {width}x{height})")
    return MediaInfo(width, height, count)


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video or container.streams.video[0].codec_context is None:
        raise MediaError(path, "no decodable video stream")
    return container.streams.video[0]


def plan_clips(item: Item, spec: DatasetSpec) -> list[ClipPlan]:
    """The clips an item yields under ``spec`` (bucket, frame windows); reads only the media header."""
    info = probe_media(item.path, item.kind)
    bucket = _bucket(item, spec, info.size)
    if item.kind == "image":
        return [ClipPlan("image", bucket, info.size, (0,), (0,))]
    source = resample_indices(info.num_frames, spec.source_fps)
    args = (spec.frame_extraction, spec.frame_stride, spec.frame_sample, spec.max_frames)
    windows = frame_windows(len(source), spec.target_frames, *args)
    if not windows:
        log.warning(
            "%s: %d frames at 24 fps, fewer than the smallest target_frames %d; no clip",
            item.path,
            len(source),
            spec.target_frames[0],
        )
    n = info.num_frames
    return [ClipPlan("video", bucket, info.size, tuple(w), tuple(source[i] for i in w), n) for w in windows]


def _bucket(item: Item, spec: DatasetSpec, size: tuple[int, int]) -> tuple[int, int]:
    bucket = select_bucket(size, spec.resolution, enable_bucket=spec.enable_bucket, no_upscale=spec.bucket_no_upscale)
    if min(bucket) < 16:
        raise MediaError(item.path, f"{size[0]}x{size[1]} is too small (bucket_no_upscale gives {bucket})")
    return bucket


# ------------------------------------------------------------------------------------------------------------
# Decoding and resizing
# ------------------------------------------------------------------------------------------------------------


def load_clips(item: Item, spec: DatasetSpec, plans: Sequence[ClipPlan] | None = None) -> Iterator[Clip]:
    """Decode ``plans`` (default: ``plan_clips(item, spec)``) and yield their clips one at a time.

    All needed frames are decoded (at bucket size, uint8) before the first clip is yielded, so a ``MediaError``
    comes from the first ``next()``.  Windows past the last frame the decoder actually delivers (a container that
    over-reports its frame count) are dropped with a warning; if none is left, ``MediaError``.
    """
    plans = list(plan_clips(item, spec) if plans is None else plans)
    if not plans:
        return
    if item.kind == "image":
        frames = {0: resize_to_bucket(load_image(item.path), plans[0].bucket_size)}
    else:
        wanted = {i for plan in plans for i in plan.source_indices}
        frames = _decode_video(item.path, wanted, plans[0].bucket_size)
    usable = [p for p in plans if all(i in frames for i in p.source_indices)]
    if not usable:
        raise MediaError(item.path, f"only {len(frames)} of the needed frames could be decoded")
    if len(usable) < len(plans):
        log.warning("%s: %d clip(s) end past the last decodable frame; skipped", item.path, len(plans) - len(usable))
    for plan in usable:
        yield Clip(plan, np.stack([frames[i] for i in plan.source_indices]))


def load_image(path: str | Path) -> Image.Image:
    """Fully decoded RGB image (alpha dropped, as musubi)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except _IMAGE_ERRORS as e:
        raise MediaError(path, f"cannot decode image: {e}") from None


def _decode_video(path: Path, wanted: set[int], bucket: tuple[int, int]) -> dict[int, np.ndarray]:
    last, frames = max(wanted), {}
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = resize_to_bucket(frame.to_image(), bucket)
                if i >= last:
                    break
    except _VIDEO_ERRORS as e:
        raise MediaError(path, f"cannot decode video: {e}") from None
    return frames


def resize_to_bucket(image: Image.Image | np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Scale to cover ``bucket`` (W, H) keeping the aspect ratio, centre-crop; returns (H, W, 3) uint8."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    (w, h), (bw, bh) = image.size, bucket
    if (w, h) != (bw, bh):
        scale = max(bw / w, bh / h)
        nw, nh = max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))
        image = image.resize((nw, nh), Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX)
        left, top = (nw - bw) // 2, (nh - bh) // 2
        image = image.crop((left, top, left + bw, top + bh))
    return np.asarray(image)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, H, W) float32 in [-1, 1]."""
    frames = torch.from_numpy(np.ascontiguousarray(pixels))
    return frames.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def nabla_size(width: int, height: int) -> tuple[int, int]:
    """(W, H) rounded *up* to multiples of 128, the size ``--nabla_resize`` encodes at."""
    up = NABLA_MULTIPLE
    return -(-width // up) * up, -(-height // up) * up


def nabla_resize(frames: torch.Tensor) -> torch.Tensor:
    """Stretch (F, 3, H, W) frames bilinearly up to the next multiple of 128 on both sides (no-op if already)."""
    height, width = frames.shape[-2:]
    new_w, new_h = nabla_size(width, height)
    if (new_w, new_h) == (width, height):
        return frames
    return F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False)
