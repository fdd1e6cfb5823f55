"""Frame windows, fps resampling, buckets, resizing and decoding (images with Pillow, videos written here with av)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from dataset.buckets import bucket_resolutions, select_bucket
from dataset.config import parse_dataset_config
from dataset.media import (
    MediaError,
    frame_windows,
    load_clips,
    nabla_resize,
    nabla_size,
    pixels_to_tensor,
    plan_clips,
    probe_media,
    resample_indices,
    resize_to_bucket,
)
from dataset.sources import iter_items


def _r(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


# ------------------------------------------------------------------------------------------------------------
# frame_windows: every mode against hand-computed indices
# ------------------------------------------------------------------------------------------------------------


def test_head():
    assert frame_windows(20, [1, 5, 9], "head") == [[0], _r(0, 5), _r(0, 9)]
    assert frame_windows(6, [5, 9], "head") == [_r(0, 5)]  # 9 > 6 frames: no clip
    assert frame_windows(4, [5], "head") == []


def test_chunk():
    assert frame_windows(20, [5], "chunk") == [_r(0, 5), _r(5, 5), _r(10, 5), _r(15, 5)]
    assert frame_windows(19, [5], "chunk") == [_r(0, 5), _r(5, 5), _r(10, 5)]  # [15, 20) does not fit
    assert frame_windows(20, [5, 9], "chunk") == [_r(0, 5), _r(5, 5), _r(10, 5), _r(15, 5), _r(0, 9), _r(9, 9)]


def test_slide():
    assert frame_windows(12, [5], "slide", stride=3) == [_r(0, 5), _r(3, 5), _r(6, 5)]  # start 9 would end at 14
    assert frame_windows(7, [5], "slide") == [_r(0, 5), _r(1, 5), _r(2, 5)]
    assert frame_windows(13, [5], "slide", stride=4) == [_r(0, 5), _r(4, 5), _r(8, 5)]


def test_uniform():
    # N - T = 15 spread over 4 samples: starts 0, 5, 10, 15
    assert frame_windows(20, [5], "uniform", sample=4) == [_r(0, 5), _r(5, 5), _r(10, 5), _r(15, 5)]
    # N - T = 10 over 4 samples: floor(0, 3.33, 6.67, 10) = 0, 3, 6, 10
    assert frame_windows(15, [5], "uniform", sample=4) == [_r(0, 5), _r(3, 5), _r(6, 5), _r(10, 5)]
    # N - T = 1 over 3 samples: 0, 0, 1 -> the duplicate start is dropped
    assert frame_windows(10, [9], "uniform", sample=3) == [_r(0, 9), _r(1, 9)]
    assert frame_windows(10, [9], "uniform", sample=1) == [_r(0, 9)]  # one sample = head


def test_full():
    assert frame_windows(50, [5], "full") == [_r(0, 49)]  # 50 rounded down to 4k+1
    assert frame_windows(200, [5], "full", max_frames=129) == [_r(0, 129)]
    assert frame_windows(200, [5], "full", max_frames=64) == [_r(0, 61)]
    assert frame_windows(3, [5], "full") == [[0]]
    assert frame_windows(0, [5], "full") == []


def test_unknown_mode():
    with pytest.raises(ValueError, match="head, chunk, slide, uniform, full"):
        frame_windows(10, [5], "tail")


def test_resample_indices():
    # 30 -> 24 fps: floor(i * 0.8) = 0 0 1 2 3 4 4 5 6 7 -> keep the first source frame of each target frame
    assert resample_indices(10, 30.0) == [0, 2, 3, 4, 5, 7, 8, 9]
    # 60 -> 24 fps: floor(i * 0.4) = 0 0 0 1 1 2 2 2 3 3 4
    assert resample_indices(11, 60.0) == [0, 3, 5, 8, 10]
    assert resample_indices(6, 12.0) == list(range(6))  # slower sources keep every frame
    assert resample_indices(6, None) == list(range(6))
    assert resample_indices(6, 24.0) == list(range(6))


# ------------------------------------------------------------------------------------------------------------
# Buckets and resizing
# ------------------------------------------------------------------------------------------------------------


def test_bucket_resolutions_follow_musubi_rule():
    buckets = bucket_resolutions((960, 544))
    assert (960, 544) in buckets and (544, 960) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 960 * 544 for w, h in buckets)
    assert min(min(b) for b in buckets) == 352  # floor16(isqrt(522240) // 2)
    assert buckets == tuple(sorted(buckets))


def test_select_bucket():
    assert select_bucket((1920, 1080), (960, 544)) == (960, 544)
    assert select_bucket((1080, 1920), (960, 544)) == (544, 960)
    assert select_bucket((1000, 1000), (512, 512)) == (512, 512)
    assert select_bucket((1920, 1080), (512, 512)) == (672, 384)  # 1.75 is the closest ratio to 16:9
    assert select_bucket((300, 200), (512, 512), no_upscale=True) == (288, 192)
    assert select_bucket((3000, 2000), (512, 512), no_upscale=True) == (624, 416)  # larger: normal bucket
    assert select_bucket((1920, 1080), (512, 512), enable_bucket=False) == (512, 512)


def _halves(width: int, height: int) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("source", [(200, 100), (40, 20)])  # shrink (area) and enlarge (lanczos)
def test_resize_to_bucket_covers_and_centre_crops(source):
    out = resize_to_bucket(_halves(*source), (64, 64))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[32, 2]) == (255, 0, 0) and tuple(out[32, 61]) == (0, 0, 255)  # centre crop keeps both halves
    tall = resize_to_bucket(np.asarray(_halves(64, 200)), (32, 48))
    assert tall.shape == (48, 32, 3)


def test_pixels_to_tensor_layout_and_range():
    pixels = np.zeros((2, 4, 6, 3), np.uint8)
    pixels[1, :, :, 0] = 255
    t = pixels_to_tensor(pixels)
    assert t.shape == (2, 3, 4, 6) and t.dtype == torch.float32
    assert t[0].max() == -1 and t[1, 0].min() == 1 and t[1, 1].max() == -1


def test_nabla_resize():
    assert nabla_size(500, 300) == (512, 384)
    assert nabla_size(512, 640) == (512, 640)
    frames = torch.rand(3, 3, 300, 500) * 2 - 1
    out = nabla_resize(frames)
    assert out.shape == (3, 3, 384, 512) and out.min() >= -1 and out.max() <= 1
    same = torch.zeros(1, 3, 128, 256)
    assert nabla_resize(same) is same


# ------------------------------------------------------------------------------------------------------------
# Decoding real files
# ------------------------------------------------------------------------------------------------------------


def write_video(path: Path, frames: int, fps: int = 30, size: tuple[int, int] = (96, 64)) -> Path:
    """Frame i is flat grey 8 * i + 10, so decoded means identify frames."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12"}
        for i in range(frames):
            image = np.full((height, width, 3), 8 * i + 10, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _frame_ids(pixels: np.ndarray) -> list[int]:
    return [round((float(f.mean()) - 10) / 8) for f in pixels]


def _video_spec(tmp_path: Path, **keys):
    table = {"video_directory": str(tmp_path), "caption_extension": ".txt", "resolution": [64, 48], **keys}
    return parse_dataset_config({"datasets": [table]}).datasets[0]


@pytest.mark.parametrize("ext", ["mp4", "mkv"])  # mkv has no frame count in the header: packets are counted
def test_probe_video(tmp_path, ext):
    info = probe_media(write_video(tmp_path / f"v.{ext}", 30), "video")
    assert (info.width, info.height, info.num_frames, info.size) == (96, 64, 30, (96, 64))


def test_video_plan_and_load_with_fps_resampling(tmp_path):
    write_video(tmp_path / "v.mp4", 30, fps=30)
    (tmp_path / "v.txt").write_text("grey")
    spec = _video_spec(tmp_path, target_frames=[5, 9], frame_extraction="chunk", source_fps=30.0)
    (item,) = iter_items(spec)
    plans = plan_clips(item, spec)
    # 30 frames at 30 fps -> 24 frames at 24 fps; chunk 5: 4 windows, chunk 9: 2 windows
    assert [(p.start, p.num_frames) for p in plans] == [(0, 5), (5, 5), (10, 5), (15, 5), (0, 9), (9, 9)]
    kept = resample_indices(30, 30.0)  # 0 2 3 4 5 7 8 9 10 12 ...
    assert plans[1].frame_indices == (5, 6, 7, 8, 9) and plans[1].source_indices == tuple(kept[5:10])
    assert plans[0].bucket_size == (64, 48) and plans[0].source_size == (96, 64)
    assert plans[0].bucket_key == (64, 48, 5) and plans[0].kind == "video"
    clips = list(load_clips(item, spec, plans[1:2]))
    assert len(clips) == 1 and clips[0].pixels.shape == (5, 48, 64, 3)
    assert _frame_ids(clips[0].pixels) == list(kept[5:10])
    tensor = clips[0].to_tensor()
    assert tensor.shape == (5, 3, 48, 64) and -1 <= tensor.min() and tensor.max() <= 1


def test_video_head_without_resampling_and_exact_resolution(tmp_path):
    write_video(tmp_path / "v.mkv", 12, size=(80, 80))
    (tmp_path / "v.txt").write_text("grey")
    spec = _video_spec(tmp_path, target_frames=[1, 9, 13], resolution=[64, 48])
    (item,) = iter_items(spec)
    clips = list(load_clips(item, spec))  # 13 > 12 frames: no clip for it
    assert [c.plan.frame_indices for c in clips] == [(0,), tuple(range(9))]
    assert [_frame_ids(c.pixels) for c in clips] == [[0], list(range(9))]
    assert clips[1].pixels.shape == (9, 48, 64, 3)  # enable_bucket = false: exactly the resolution, videos too


def test_video_too_short_gives_no_plans(tmp_path, caplog):
    write_video(tmp_path / "v.mp4", 4)
    (tmp_path / "v.txt").write_text("x")
    spec = _video_spec(tmp_path, target_frames=[5])
    (item,) = iter_items(spec)
    assert plan_clips(item, spec) == [] and list(load_clips(item, spec)) == []
    assert "fewer than the smallest target_frames" in caplog.text


def test_image_plan_and_load(tmp_path):
    _halves(200, 100).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("halves")
    table = {"image_directory": str(tmp_path), "caption_extension": ".txt", "resolution": 64, "enable_bucket": True}
    spec = parse_dataset_config({"datasets": [table]}).datasets[0]
    (item,) = iter_items(spec)
    (plan,) = plan_clips(item, spec)
    assert (plan.kind, plan.start, plan.num_frames, plan.frame_indices, plan.source_size) == (
        "image",
        None,
        1,
        (0,),
        (200, 100),
    )
    assert plan.bucket_size == select_bucket((200, 100), (64, 64))
    (clip,) = load_clips(item, spec)
    assert clip.pixels.shape == (1, plan.bucket_size[1], plan.bucket_size[0], 3)


def test_corrupt_media_raises_media_error(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    for path, kind in ((tmp_path / "bad.mp4", "video"), (tmp_path / "bad.png", "image")):
        with pytest.raises(MediaError) as info:
            probe_media(path, kind)
        assert info.value.path == path and info.value.reason


def test_truncated_image_fails_at_decode(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "t.txt").write_text("x")
    spec = parse_dataset_config(
        {"datasets": [{"image_directory": str(tmp_path), "caption_extension": ".txt", "resolution": 64}]}
    ).datasets[0]
    (item,) = iter_items(spec)
    plans = plan_clips(item, spec)  # the header is fine
    with pytest.raises(MediaError, match="cannot decode image"):
        list(load_clips(item, spec, plans))


def test_too_small_for_no_upscale(tmp_path):
    Image.new("RGB", (10, 40)).save(tmp_path / "s.png")
    (tmp_path / "s.txt").write_text("x")
    table = {
        "image_directory": str(tmp_path),
        "caption_extension": ".txt",
        "enable_bucket": True,
        "bucket_no_upscale": True,
    }
    spec = parse_dataset_config({"datasets": [table]}).datasets[0]
    with pytest.raises(MediaError, match="too small"):
        plan_clips(iter_items(spec)[0], spec)
