"""Latent / text cache format: names, round trips, metadata, damaged files and stale-settings detection."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

import dataset.cache as cache
from dataset.cache import (
    FORMAT_VERSION,
    CacheError,
    is_valid_cache,
    latent_cache_path,
    list_cache_files,
    read_cache_meta,
    read_latent_cache,
    read_text_cache,
    text_cache_path,
    write_latent_cache,
    write_text_cache,
)
from dataset.config import parse_dataset_config
from dataset.media import load_clips, plan_clips
from dataset.sources import iter_items

LATENT_META = {
    "vae": "hunyuanvideo-vae:abc123",
    "source_size": (1920, 1080),
    "bucket_size": (960, 544),
    "frame_indices": list(range(5, 14)),
    "item_key": "clip.mp4",
    "nabla_resize": False,
}
TEXT_META = {
    "template": "video",
    "max_length": 256,
    "text_encoder": "Qwen2.5-VL-7B-Instruct+clip-vit-large-patch14",
    "task_family": "video",
    "item_key": "clip.mp4",
    "caption": "a grey square",
}


def _latents(frames: int = 3, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    latents = torch.randn(frames, 68, 120, 16).to(dtype)
    return latents, torch.stack([latents[0], latents[-1]])


def _write_latent(tmp_path: Path, **meta) -> Path:
    path = latent_cache_path(tmp_path, "clip.mp4", (1920, 1080), 5, 9)
    write_latent_cache(path, *_latents(), {**LATENT_META, **meta})
    return path


def _write_text(tmp_path: Path, **meta) -> Path:
    path = text_cache_path(tmp_path, "clip.mp4")
    write_text_cache(path, torch.randn(11, 64).bfloat16(), torch.randn(32), {**TEXT_META, **meta})
    return path


def test_paths(tmp_path):
    assert latent_cache_path(tmp_path, "cat.jpg", (640, 480)).name == "cat.jpg_0640x0480_k5.safetensors"
    video = latent_cache_path(tmp_path, "clip.mp4", (1920, 1080), 24, 121)
    assert video == tmp_path / "clip.mp4_00024-121_1920x1080_k5.safetensors"
    assert text_cache_path(tmp_path, "clip.mp4") == tmp_path / "clip.mp4_k5_te.safetensors"


def test_latent_round_trip(tmp_path):
    latents, image = _latents()
    path = latent_cache_path(tmp_path, "clip.mp4", (1920, 1080), 5, 9)
    write_latent_cache(path, latents, image, LATENT_META)
    got = read_latent_cache(path, {"vae": LATENT_META["vae"], "dtype": torch.bfloat16, "bucket_size": (960, 544)})
    assert torch.equal(got.latents, latents) and got.latents.dtype == torch.bfloat16
    assert torch.equal(got.latents_image, image)
    assert got.meta["format_version"] == FORMAT_VERSION and got.meta["stage"] == "latents"
    assert got.meta["dtype"] == "bfloat16" and got.meta["nabla_resize"] is False
    assert got.meta["source_size"] == [1920, 1080] and got.meta["frame_indices"] == list(range(5, 14))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_latent_without_image_latents_and_extra_meta(tmp_path):
    path = tmp_path / "a.png_0064x0064_k5.safetensors"
    latents = torch.zeros(1, 8, 8, 16)
    write_latent_cache(path, latents, None, {**LATENT_META, "frame_indices": [0], "task": "k5-lite-t2v-5s-sd", "x": 3})
    got = read_latent_cache(path)
    assert got.latents_image is None and got.meta["dtype"] == "float32"
    assert got.meta["task"] == "k5-lite-t2v-5s-sd" and got.meta["x"] == 3  # extra keys come back typed


def test_text_round_trip(tmp_path):
    embeds, pooled = torch.randn(11, 64).bfloat16(), torch.randn(32)
    path = text_cache_path(tmp_path, "clip.mp4")
    write_text_cache(path, embeds, pooled, TEXT_META)
    got = read_text_cache(path, {"template": "video", "max_length": 256, "format_version": FORMAT_VERSION})
    assert torch.equal(got.embeds, embeds) and torch.equal(got.pooled, pooled) and got.pooled.dtype == torch.float32
    assert got.meta["max_length"] == 256 and got.meta["caption"] == "a grey square" and got.meta["stage"] == "text"


@pytest.mark.parametrize("stage", ["latents", "text"])
def test_truncated_file_detected(tmp_path, stage):
    path = _write_latent(tmp_path) if stage == "latents" else _write_text(tmp_path)
    data = path.read_bytes()
    script = "kandinsky5_cache_latents.py" if stage == "latents" else "kandinsky5_cache_text_encoder_outputs.py"
    reader = read_latent_cache if stage == "latents" else read_text_cache
    for cut in (len(data) - 7, len(data) // 2, 20, 3, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CacheError, match=f"damaged or truncated {stage} cache.*re-run {script}"):
            reader(path)
        assert not is_valid_cache(path, {})


def test_mismatch_message_names_key_values_stage_and_script(tmp_path):
    path = _write_text(tmp_path)
    with pytest.raises(CacheError) as info:
        read_text_cache(path, {"template": "video", "max_length": 512})
    message = str(info.value)
    for needle in ("text cache", "max_length=256", "max_length=512", "kandinsky5_cache_text_encoder_outputs.py"):
        assert needle in message
    assert "\n" not in message
    latent = _write_latent(tmp_path)
    with pytest.raises(
        CacheError, match=r"latents cache has vae='hunyuanvideo-vae:abc123' .* vae='other'.*latents\.py"
    ):
        read_latent_cache(latent, {"vae": "other"})
    with pytest.raises(CacheError, match="format_version='1' .* format_version='0'"):
        read_latent_cache(latent, {"format_version": "0"})
    with pytest.raises(CacheError, match="task='<missing>'"):
        read_latent_cache(latent, {"task": "k5-pro-t2v-5s-sd"})


def test_is_valid_cache(tmp_path):
    latent, text = _write_latent(tmp_path), _write_text(tmp_path)
    assert is_valid_cache(latent, {"vae": LATENT_META["vae"], "source_size": [1920, 1080], "nabla_resize": False})
    assert not is_valid_cache(latent, {"nabla_resize": True})
    assert not is_valid_cache(latent, {"bucket_size": (512, 512)})
    assert is_valid_cache(text, {"max_length": 256, "caption": "a grey square"})
    assert not is_valid_cache(text, {"caption": "an edited caption"})
    assert not is_valid_cache(tmp_path / "missing_k5.safetensors", {})
    assert not is_valid_cache(text, {"stage": "latents"})


def test_wrong_stage_and_missing_file(tmp_path):
    text = _write_text(tmp_path)
    with pytest.raises(CacheError, match="not a latents cache .*stage 'text'"):
        read_latent_cache(text)
    with pytest.raises(CacheError, match="latents cache not found; run kandinsky5_cache_latents.py"):
        read_latent_cache(tmp_path / "nope_k5.safetensors")
    assert read_cache_meta(text, "text")["template"] == "video"


def test_write_validation(tmp_path):
    latents, image = _latents()
    path = tmp_path / "x_k5.safetensors"
    with pytest.raises(ValueError, match="channels-last"):
        write_latent_cache(path, latents.permute(3, 0, 1, 2), None, LATENT_META)
    with pytest.raises(ValueError, match="latents_image"):
        write_latent_cache(path, latents, image[:1], LATENT_META)
    with pytest.raises(ValueError, match="NaN"):
        write_latent_cache(path, latents.float().fill_(float("nan")), None, LATENT_META)
    with pytest.raises(ValueError, match="lacks vae"):
        write_latent_cache(path, latents, None, {k: v for k, v in LATENT_META.items() if k != "vae"})
    with pytest.raises(ValueError, match=r"embeds \(L, D\)"):
        write_text_cache(tmp_path / "t_k5_te.safetensors", torch.randn(3), torch.randn(4), TEXT_META)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = _write_latent(tmp_path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(cache.UserError, match="cannot write latents cache .*: disk full; the existing file was kept"):
        write_latent_cache(path, *_latents(), LATENT_META)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_list_cache_files(tmp_path):
    latent, text = _write_latent(tmp_path), _write_text(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    assert list_cache_files(tmp_path, "latents") == [latent]
    assert list_cache_files(tmp_path, "text") == [text]
    assert list_cache_files(tmp_path / "missing", "text") == []


def _write_video(path: Path, frames: int, width: int = 96, height: int = 64) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 8 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_caching_flow_end_to_end(tmp_path):
    """What the latent cacher does: config -> items -> plans -> skip valid caches -> decode -> encode -> write."""
    _write_video(tmp_path / "walk.mp4", 14)
    (tmp_path / "walk.txt").write_text("grey")
    table = {"video_directory": str(tmp_path), "caption_extension": ".txt", "target_frames": [1, 5], "resolution": 64}
    spec = parse_dataset_config({"datasets": [{**table, "cache_directory": str(tmp_path / "cache")}]}).datasets[0]

    def run() -> int:
        written = 0
        for item in iter_items(spec):
            todo = []
            for plan in plan_clips(item, spec):
                path = latent_cache_path(spec.cache_directory, item.key, plan.source_size, plan.start, plan.num_frames)
                expect = {"vae": "fake", "bucket_size": plan.bucket_size, "frame_indices": plan.frame_indices}
                if not is_valid_cache(path, expect):
                    todo.append((plan, path))
            for clip, (plan, path) in zip(load_clips(item, spec, [p for p, _ in todo]), todo):
                frames = clip.to_tensor()  # (F, 3, H, W)
                latents = torch.zeros((frames.shape[0] - 1) // 4 + 1, frames.shape[2] // 8, frames.shape[3] // 8, 16)
                meta = {"vae": "fake", "source_size": plan.source_size, "bucket_size": plan.bucket_size,
                        "frame_indices": plan.frame_indices, "item_key": item.key, "nabla_resize": False}  # fmt: skip
                write_latent_cache(path, latents, torch.stack([latents[0], latents[-1]]), meta)
                written += 1
        return written

    assert run() == 2 and run() == 0  # the second run skips both valid caches
    names = [p.name for p in list_cache_files(spec.cache_directory, "latents")]
    assert names == ["walk.mp4_00000-001_0096x0064_k5.safetensors", "walk.mp4_00000-005_0096x0064_k5.safetensors"]
    got = read_latent_cache(spec.cache_directory / names[1], {"frame_indices": [0, 1, 2, 3, 4]})
    assert got.latents.shape == (2, 8, 8, 16) and got.meta["item_key"] == "walk.mp4"
