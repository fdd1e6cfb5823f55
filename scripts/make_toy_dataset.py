"""Write a small synthetic dataset (images + short clips + captions) and its dataset TOML, for the demo and tests.

Output layout (``--output_dir DIR``)::

    DIR/images/shape_{i}.png + .txt       128x128 RGB stills of coloured shapes
    DIR/videos/clip_{i}.mp4  + .txt       128x128, 17 frames, 24 fps h264: a square moving across a gradient
    DIR/dataset.toml                      musubi-style [general] + two [[datasets]] with their own cache dirs

Everything is generated deterministically from ``--seed``; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

COLOURS = [("red", (220, 40, 40)), ("green", (40, 180, 60)), ("blue", (40, 70, 220)), ("yellow", (230, 210, 40))]
SHAPES = ["circle", "square"]


def _still(colour: tuple[int, int, int], shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 60, 3)))
    draw = ImageDraw.Draw(img)
    x0, y0 = (int(v) for v in rng.integers(8, size // 2, 2))
    box = (x0, y0, x0 + size // 3, y0 + size // 3)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return img


def _clip_frames(colour: tuple[int, int, int], size: int, frames: int) -> list[np.ndarray]:
    ramp = np.linspace(0, 120, size, dtype=np.float32)
    out = []
    for f in range(frames):
        frame = np.zeros((size, size, 3), dtype=np.uint8)
        frame[..., 2] = ramp[None, :].astype(np.uint8)
        x = int(f * (size - size // 4) / max(frames - 1, 1))
        frame[size // 3 : size // 3 + size // 4, x : x + size // 4] = colour
        out.append(frame)
    return out


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = 24) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_toml(out: Path, size: int, frames: int, batch_size: int) -> Path:
    toml_path = out / "dataset.toml"
    toml_path.write_text(
        "# toy dataset written by scripts/make_toy_dataset.py\n"
        "[general]\n"
        f"resolution = [{size}, {size}]\n"
        'caption_extension = ".txt"\n'
        f"batch_size = {batch_size}\n"
        "enable_bucket = true\n"
        "bucket_no_upscale = false\n\n"
        "[[datasets]]\n"
        f'image_directory = "{(out / "images").as_posix()}"\n'
        f'cache_directory = "{(out / "cache" / "images").as_posix()}"\n'
        "num_repeats = 1\n\n"
        "[[datasets]]\n"
        f'video_directory = "{(out / "videos").as_posix()}"\n'
        f'cache_directory = "{(out / "cache" / "videos").as_posix()}"\n'
        f"target_frames = [{frames}]\n"
        'frame_extraction = "head"\n'
    )
    return toml_path


def make_toy_dataset(
    out: Path, images: int = 4, videos: int = 2, size: int = 128, frames: int = 9, seed: int = 0, batch_size: int = 2
) -> Path:
    """Write the dataset under ``out`` and return the path of its TOML."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        name, colour = COLOURS[i % len(COLOURS)]
        shape = SHAPES[i % len(SHAPES)]
        _still(colour, shape, size, rng).save(out / "images" / f"shape_{i}.png")
        (out / "images" / f"shape_{i}.txt").write_text(f"a {name} {shape} on a dark background, toy style")
    for i in range(videos):
        name, colour = COLOURS[(i + 1) % len(COLOURS)]
        write_mp4(out / "videos" / f"clip_{i}.mp4", _clip_frames(colour, size, 17))
        (out / "videos" / f"clip_{i}.txt").write_text(f"a {name} square slides from left to right, toy style")
    return write_toml(out, size, frames, batch_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", required=True, help="directory to write the images, clips and dataset.toml into")
    p.add_argument("--images", type=int, default=4, help="number of still images")
    p.add_argument("--videos", type=int, default=2, help="number of video clips")
    p.add_argument("--size", type=int, default=128, help="square image/video size in pixels")
    p.add_argument("--frames", type=int, default=9, help="target_frames of the video dataset (4k+1)")
    p.add_argument("--batch_size", type=int, default=2, help="batch_size written into [general]")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    toml_path = make_toy_dataset(Path(a.output_dir), a.images, a.videos, a.size, a.frames, a.seed, a.batch_size)
    print(f"toy dataset: {toml_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
