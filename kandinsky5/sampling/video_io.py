"""Reading and writing generated media: h264 ``.mp4`` via PyAV, ``.png`` via Pillow, both with settings metadata.

Layouts
-------
==================  ===========================  ===========================================================
tensor              shape                        meaning
==================  ===========================  ===========================================================
decoded pixels      (B, 3, F, H, W) float        VAE output in [-1, 1] (what ``VideoVAE.decode`` returns)
frames              (F, H, W, 3) uint8 numpy     what is written / read; RGB
image tensor        (1, 3, 1, H, W) float        an input image as a 1-frame video in [-1, 1] (VAE input)
==================  ===========================  ===========================================================

Pixels -> uint8 follows the official code exactly: ``uint8((clamp(x, -1, 1) + 1) * 127.5)`` (truncation).

Metadata: a flat ``dict[str, str]`` (prompt, seed, steps, ...).  In an mp4 it is stored as container tags: ``comment``
holds the whole dict as JSON and ``description`` the prompt (both are shown by ``ffprobe`` and most players).  In a
png each key becomes a ``tEXt``/``iTXt`` chunk, plus ``parameters`` with the same JSON.  ``read_video`` /
``read_image`` return the dict again.

Nothing is ever overwritten unless ``overwrite=True``: an existing file is a one-line ``UserError``.  Files are
written to a temporary name and renamed, so an interrupted run never leaves a half-written output, and a failed
write (disk full, read-only) is one ``WriteError`` line (``kandinsky5.files.guarded_write``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from kandinsky5.common import UserError
from kandinsky5.files import guarded_write

__all__ = [
    "VIDEO_SUFFIXES",
    "IMAGE_SUFFIXES",
    "to_uint8_frames",
    "check_writable",
    "estimate_bytes",
    "write_video",
    "write_image",
    "read_video",
    "read_image",
    "load_image",
    "image_to_tensor",
]

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".png",)
_JSON_KEY = "comment"
_PNG_JSON_KEY = "parameters"


def to_uint8_frames(video: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, F, H, W) in [-1, 1] -> one (F, H, W, 3) uint8 array per sample (official rounding)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected (B, 3, F, H, W) pixels, got {tuple(video.shape)}")
    pixels = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)
    return [sample.permute(1, 2, 3, 0).contiguous().cpu().numpy() for sample in pixels]


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """The output path, refusing an existing file unless ``overwrite`` and an unsupported suffix."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise UserError(f"output {path}: unsupported file type {path.suffix!r}; use .mp4 (video) or .png (image)")
    if path.is_dir():
        raise UserError(f"output {path} is a directory; pass a file name ending in .mp4 or .png")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite to replace it")
    return path


def estimate_bytes(path: str | Path, frames: int, width: int, height: int) -> int:
    """Generous size estimate of an output file, for the free-space check: raw RGB for a .png, a tenth of the raw
    frames for an h264 .mp4 (crf 17 of generated video typically compresses 20-100x)."""
    raw = frames * width * height * 3
    return raw if Path(path).suffix.lower() in IMAGE_SUFFIXES else raw // 10 + (64 << 10)


def _str_metadata(metadata: Mapping[str, object] | None) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 24,
    metadata: Mapping[str, object] | None = None,
    overwrite: bool = False,
    crf: int = 17,
) -> Path:
    """Write (F, H, W, 3) uint8 frames as h264 yuv420p mp4 at ``fps``; metadata as container tags."""
    import av

    path = check_writable(path, overwrite)
    _check_frames(frames)
    meta = _str_metadata(metadata)
    with guarded_write(path, "output") as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            container.metadata[_JSON_KEY] = json.dumps(meta, ensure_ascii=False)
            if "prompt" in meta:
                container.metadata["description"] = meta["prompt"]
            stream = container.add_stream("libx264", rate=_fps_fraction(fps))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def _fps_fraction(fps: float):
    from fractions import Fraction

    if fps <= 0:
        raise UserError(f"fps must be positive, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (F, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"h264 yuv420p needs even width and height, got {frames.shape[2]}x{frames.shape[1]}")


def write_image(
    path: str | Path, frame: np.ndarray, metadata: Mapping[str, object] | None = None, overwrite: bool = False
) -> Path:
    """Write one (H, W, 3) uint8 frame as png; each metadata key becomes a text chunk."""
    from PIL import Image, PngImagePlugin

    path = check_writable(path, overwrite)
    meta = _str_metadata(metadata)
    info = PngImagePlugin.PngInfo()
    for key, value in meta.items():
        info.add_itxt(key, value)
    info.add_itxt(_PNG_JSON_KEY, json.dumps(meta, ensure_ascii=False))
    with guarded_write(path, "output") as tmp:
        Image.fromarray(frame).save(tmp, format="PNG", pnginfo=info)
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float, dict[str, str]]:
    """(frames (F, H, W, 3) uint8, fps, metadata dict) of an mp4 written by ``write_video`` (or any video)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        tags = dict(container.metadata)
    return frames, fps, _parse_json_tag(tags.get(_JSON_KEY))


def read_image(path: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    """((H, W, 3) uint8, metadata dict) of a png written by ``write_image``."""
    from PIL import Image

    with Image.open(path) as img:
        meta = _parse_json_tag(img.info.get(_PNG_JSON_KEY))
        return np.asarray(img.convert("RGB")), meta


def _parse_json_tag(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def load_image(path: str | Path, what: str = "--image"):
    """Open an image file as RGB PIL image; a missing or unreadable file is a one-line UserError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{what} {path} is not a readable image: {exc}") from None


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB image -> (1, 3, 1, H, W) float32 in [-1, 1] (official ``uint8 / 127.5 - 1``)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return (array.permute(2, 0, 1).float() / 127.5 - 1.0)[None, :, None]
