"""kandinsky5_cache_latents.py on the tiny bundle: the seed commands as written, metadata, first/last-frame latents,
--nabla_resize sizes, skip / rebuild, corrupt media, stale cleanup, config errors, batching and flat memory.

The script is run as a subprocess for the seed commands and in-process (``main(argv)``, loaded from its file: no
package imports a script) everywhere else, so VAE calls can be counted.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dataset.cache import FORMAT_VERSION, LATENT_SUFFIX, latent_cache_path, read_latent_cache
from dataset.caching import EXIT_FAILURES, BucketBatcher, latent_expect, prefetch_map
from dataset.config import load_dataset_config
from dataset.media import load_clips, nabla_size, plan_clips
from dataset.sources import iter_items
from kandinsky5.cli import run_main
from kandinsky5.model.vae import SCALING_FACTOR, VideoVAE
from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_module(ROOT / "kandinsky5_cache_latents.py", "_cache_latents_script")


@pytest.fixture(scope="module")
def toy():
    return load_module(ROOT / "scripts" / "make_toy_dataset.py", "_make_toy_dataset")


@pytest.fixture(scope="module")
def vae_file(tiny_bundle) -> Path:
    return tiny_bundle / "vae" / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def vae(vae_file) -> VideoVAE:
    return VideoVAE.load(str(vae_file), "cpu", torch.float32)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CI box they make encodes 10x slower; main()
    also changes the thread count on CPU, so restore it after every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def encode_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of every VideoVAE.encode call made while the test runs."""
    calls: list[tuple[int, ...]] = []
    original = VideoVAE.encode

    def counted(self, video, *args, **kwargs):
        calls.append(tuple(video.shape))
        return original(self, video, *args, **kwargs)

    monkeypatch.setattr(VideoVAE, "encode", counted)
    return calls


def _images(root: Path, sizes: dict[str, tuple[int, int]], resolution, enable_bucket=False, extra="") -> Path:
    """Image dataset: ``name -> (W, H)`` random PNGs with captions; returns the TOML path."""
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(sizes))
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(media / f"{name}.png")
        (media / f"{name}.txt").write_text(f"caption of {name}")
    toml = root / "dataset.toml"
    toml.write_text(
        f'[general]\nresolution = {list(resolution)}\ncaption_extension = ".txt"\n'
        f"enable_bucket = {str(enable_bucket).lower()}\n{extra}\n"
        f'[[datasets]]\nimage_directory = "{media.as_posix()}"\ncache_directory = "{(root / "cache").as_posix()}"\n'
    )
    return toml


def _cache_files(toml: Path) -> list[Path]:
    return sorted(
        p for spec in load_dataset_config(toml).datasets for p in spec.cache_directory.glob(f"*{LATENT_SUFFIX}")
    )


def _mtimes(paths) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


# ------------------------------------------------------------------------------------------------------------
# the seed commands, as written (subprocess), and what they write
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory, toy, vae_file) -> dict[str, Path]:
    """The two seed latent commands, each on its own copy of the toy dataset (4 png + 2 mp4)."""
    out = {}
    for name, extra in (("plain", []), ("nabla", ["--nabla_resize"])):
        toml = toy.make_toy_dataset(tmp_path_factory.mktemp(f"toy_{name}"))
        cmd = [sys.executable, "kandinsky5_cache_latents.py", "--dataset_config", str(toml), "--vae", str(vae_file)]
        run = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "device cpu, VAE dtype float32" in run.stderr and "tiling off" in run.stderr
        out[name] = toml
    return out


@pytest.mark.parametrize("name", ["plain", "nabla"])
def test_seed_commands_write_self_describing_caches(seed_runs, vae, name):
    toml = seed_runs[name]
    files = _cache_files(toml)
    names = sorted(p.name for p in files)
    assert names == sorted(
        [f"shape_{i}.png_0128x0128{LATENT_SUFFIX}" for i in range(4)]
        + [f"clip_{i}.mp4_00000-009_0128x0128{LATENT_SUFFIX}" for i in range(2)]
    )
    for path in files:
        cache = read_latent_cache(path, latent_expect(vae=vae.identity, dtype="float32", nabla_resize=name == "nabla"))
        meta = cache.meta
        video = meta["kind"] == "video"
        assert cache.latents.shape == ((3 if video else 1), 16, 16, 16)  # 9 frames -> 3 latent frames; 128 / 8
        assert cache.latents_image.shape == (2, 16, 16, 16)
        assert meta["format_version"] == FORMAT_VERSION and meta["stage"] == "latents"
        assert meta["source_size"] == [128, 128] and meta["bucket_size"] == [128, 128]
        assert meta["encoded_size"] == [128, 128]  # already a multiple of 128: --nabla_resize changes nothing
        assert meta["frame_indices"] == (list(range(9)) if video else [0])
        assert meta["scaling_factor"] == SCALING_FACTOR and meta["posterior"] == "mode"
        assert meta["item_key"].endswith(".mp4" if video else ".png") and path.name.startswith(meta["item_key"] + "_")


def test_latents_image_is_first_and_last_frame_encoded_alone(seed_runs, vae):
    spec = load_dataset_config(seed_runs["plain"]).datasets
    for ds in spec:
        for item in iter_items(ds):
            plans = plan_clips(item, ds)
            (clip,) = list(load_clips(item, ds, plans))
            path = latent_cache_path(ds.cache_directory, item.key, clip.plan.source_size, clip.plan.start,
                                     clip.plan.num_frames)  # fmt: skip
            cache = read_latent_cache(path)
            video = clip.to_tensor().permute(1, 0, 2, 3)[None]  # (1, 3, F, H, W)
            torch.testing.assert_close(cache.latents, vae.encode(video)[0], atol=1e-4, rtol=1e-4)
            first, last = vae.encode(video[:, :, :1])[0, 0], vae.encode(video[:, :, -1:])[0, 0]
            torch.testing.assert_close(cache.latents_image[0], first, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cache.latents_image[1], last, atol=1e-4, rtol=1e-4)
            if ds.kind == "image":  # a 1-frame video: both entries are the latent itself, bit for bit
                assert torch.equal(cache.latents_image[0], cache.latents[0])
                assert torch.equal(cache.latents_image[1], cache.latents[0])
            else:  # the clip's own frame 0 is not the image encode (GroupNorm sees all frames): why we encode alone
                assert not torch.allclose(cache.latents[0], first, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# --nabla_resize geometry
# ------------------------------------------------------------------------------------------------------------


def test_nabla_resize_sizes(script, vae_file, tmp_path):
    # 100x130 source, fixed 112x144 bucket (scale to cover, centre crop); NABLA rounds each side up to 128:
    # 112 -> 128, 144 -> 256, so the latent is 256/8 x 128/8 = 32 x 16 instead of 18 x 14.
    toml = _images(tmp_path, {"tall": (100, 130)}, resolution=(112, 144))
    assert nabla_size(112, 144) == (128, 256)
    path = latent_cache_path(tmp_path / "cache", "tall.png", (100, 130))
    assert path.name == f"tall.png_0100x0130{LATENT_SUFFIX}"
    args = ["--dataset_config", str(toml), "--vae", str(vae_file), "--num_workers", "0"]
    assert script.main(args) == 0
    plain = read_latent_cache(path)
    assert plain.latents.shape == (1, 144 // 8, 112 // 8, 16) and plain.meta["nabla_resize"] is False
    assert script.main(args + ["--nabla_resize"]) == 0
    nabla = read_latent_cache(path)
    assert nabla.latents.shape == (1, 256 // 8, 128 // 8, 16) and nabla.latents_image.shape == (2, 32, 16, 16)
    assert nabla.meta["nabla_resize"] is True and nabla.meta["encoded_size"] == [128, 256]
    assert nabla.meta["bucket_size"] == [112, 144] and nabla.meta["source_size"] == [100, 130]


# ------------------------------------------------------------------------------------------------------------
# skip / rebuild / stale cleanup
# ------------------------------------------------------------------------------------------------------------


def test_skip_existing_does_no_work_and_rebuilds_damaged_or_mismatched(script, vae_file, tmp_path, encode_calls):
    toml = _images(tmp_path, {"a": (32, 32), "b": (40, 32), "c": (32, 48)}, resolution=(32, 32))
    args = ["--dataset_config", str(toml), "--vae", str(vae_file), "--batch_size", "1"]
    assert script.main(args) == 0
    files = _cache_files(toml)
    assert len(files) == 3 and len(encode_calls) == 3
    before = _mtimes(files)

    encode_calls.clear()
    assert script.main(args + ["--skip_existing"]) == 0
    assert encode_calls == [] and _mtimes(files) == before  # nothing encoded, nothing rewritten

    damaged = files[1]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a truncated file
    assert script.main(args + ["--skip_existing"]) == 0
    assert len(encode_calls) == 1 and read_latent_cache(damaged).latents.shape == (1, 4, 4, 16)
    assert all(_mtimes(files)[p] == before[p] for p in files if p != damaged)

    encode_calls.clear()  # other settings (--nabla_resize, dtype) make every file stale
    assert script.main(args + ["--skip_existing", "--nabla_resize"]) == 0
    assert len(encode_calls) == 3
    encode_calls.clear()  # default (and --overwrite): re-encode everything, as musubi
    assert script.main(args + ["--nabla_resize"]) == 0 and len(encode_calls) == 3
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # atomic writes leave no temp files


def test_stale_caches_removed_only_if_ours(script, vae_file, tmp_path, caplog):
    toml = _images(tmp_path, {"keep": (32, 32), "gone": (32, 32)}, resolution=(32, 32))
    args = ["--dataset_config", str(toml), "--vae", str(vae_file), "--num_workers", "0"]
    assert script.main(args) == 0
    gone = latent_cache_path(tmp_path / "cache", "gone.png", (32, 32))
    foreign = tmp_path / "cache" / f"musubi_0032x0032{LATENT_SUFFIX}"  # e.g. a musubi cache: not ours
    save_file(
        {"latents_1x4x4_float16": torch.zeros(16, 1, 4, 4)}, str(foreign), metadata={"architecture": "kandinsky5"}
    )
    (tmp_path / "media" / "gone.png").unlink()

    assert script.main(args + ["--keep_cache", "--skip_existing"]) == 0
    assert gone.exists() and foreign.exists()
    with caplog.at_level(logging.WARNING):
        assert script.main(args + ["--skip_existing"]) == 0
    assert not gone.exists() and foreign.exists()
    assert f"not deleting {foreign}" in caplog.text
    assert latent_cache_path(tmp_path / "cache", "keep.png", (32, 32)).exists()


# ------------------------------------------------------------------------------------------------------------
# corrupt media, config errors
# ------------------------------------------------------------------------------------------------------------


def test_corrupt_media_reported_skipped_and_nonzero_exit(script, toy, vae_file, tmp_path, caplog):
    toml = _images(tmp_path, {"good": (32, 32), "bad": (32, 32)}, resolution=(32, 32))
    videos = tmp_path / "videos"
    videos.mkdir()
    toy.write_mp4(videos / "ok.mp4", [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(5)])
    toy.write_mp4(videos / "broken.mp4", [np.zeros((32, 32, 3), np.uint8)] * 5)
    for name in ("ok", "broken"):
        (videos / f"{name}.txt").write_text(name)
    with toml.open("a") as f:
        f.write(f'\n[[datasets]]\nvideo_directory = "{videos.as_posix()}"\ntarget_frames = [5]\n')
    args = ["--dataset_config", str(toml), "--vae", str(vae_file)]
    assert script.main(args) == 0  # everything readable the first time
    bad_cache = latent_cache_path(tmp_path / "cache", "bad.png", (32, 32))
    (tmp_path / "media" / "bad.png").write_bytes(b"not a png at all")
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(500))

    with caplog.at_level(logging.ERROR):
        assert script.main(args) == EXIT_FAILURES
    bad_png, broken = tmp_path / "media" / "bad.png", videos / "broken.mp4"
    summary = caplog.text.split("could not be cached")[1]
    assert str(bad_png) in summary and str(broken) in summary and str(videos / "ok.mp4") not in summary
    assert latent_cache_path(tmp_path / "cache", "good.png", (32, 32)).exists()
    assert latent_cache_path(videos, "ok.mp4", (32, 32), 0, 5).exists()
    assert bad_cache.exists()  # failed items keep their old caches: not treated as stale
    assert latent_cache_path(videos, "broken.mp4", (32, 32), 0, 5).exists()


def test_nan_latents_are_a_failure_not_a_cache(script, vae_file, tmp_path, monkeypatch, caplog):
    toml = _images(tmp_path, {"a": (32, 32)}, resolution=(32, 32))
    original = VideoVAE.encode
    monkeypatch.setattr(VideoVAE, "encode", lambda self, video: original(self, video) * float("nan"))
    with caplog.at_level(logging.ERROR):
        assert script.main(["--dataset_config", str(toml), "--vae", str(vae_file)]) == EXIT_FAILURES
    assert "NaN or Inf" in caplog.text and "--vae_dtype float32" in caplog.text
    assert _cache_files(toml) == []


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("resolutoin = 64", "general: unknown key 'resolutoin' (did you mean 'resolution'?)"),
        ("batch_size = 0", "general.batch_size: invalid value 0; valid: an integer >= 1"),
    ],
)
def test_config_errors_are_one_line(script, vae_file, tmp_path, capsys, edit, needle):
    toml = _images(tmp_path, {"a": (32, 32)}, resolution=(32, 32), extra=edit)
    assert run_main(script.main, ["--dataset_config", str(toml), "--vae", str(vae_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_missing_caption_and_missing_flag_are_one_line(script, vae_file, tmp_path, capsys):
    toml = _images(tmp_path, {"a": (32, 32)}, resolution=(32, 32))
    (tmp_path / "media" / "a.txt").unlink()
    assert run_main(script.main, ["--dataset_config", str(toml), "--vae", str(vae_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "have no caption file" in err[0] and "a.txt" in err[0]
    assert run_main(script.main, ["--dataset_config", str(toml)]) == 1
    assert capsys.readouterr().err.strip() == "error: --vae is required"


# ------------------------------------------------------------------------------------------------------------
# batching, memory, CLI surface
# ------------------------------------------------------------------------------------------------------------


def test_batches_only_same_shape_and_match_single(script, vae_file, tmp_path, encode_calls):
    sizes = {"w1": (64, 32), "w2": (64, 32), "w3": (64, 32), "t1": (32, 64), "t2": (32, 64)}
    toml = _images(tmp_path, sizes, resolution=(48, 48), enable_bucket=True)
    args = ["--dataset_config", str(toml), "--vae", str(vae_file)]
    assert script.main(args + ["--batch_size", "2"]) == 0
    assert sorted(c[0] for c in encode_calls) == [1, 2, 2]  # wide: 2 + 1, tall: 2; never mixed
    assert all(c[2] == 1 for c in encode_calls)  # images are 1-frame videos
    batched = {p: read_latent_cache(p).latents for p in _cache_files(toml)}
    assert script.main(args + ["--batch_size", "1"]) == 0
    for path, latents in batched.items():
        torch.testing.assert_close(read_latent_cache(path).latents, latents, atol=1e-5, rtol=1e-5)


def test_memory_stays_flat_over_many_items(script, vae_file, tmp_path, monkeypatch):
    toml = _images(tmp_path, {f"i{n:02d}": (16, 16) for n in range(24)}, resolution=(16, 16))
    live: list[int] = []
    calls: list[int] = []
    write = script.write_latent_cache

    def counting_write(*args, **kwargs):
        write(*args, **kwargs)
        calls.append(1)
        if len(calls) % 4 == 0:  # a full gc scan is slow: sample every 4th write
            gc.collect()
            live.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))

    monkeypatch.setattr(script, "write_latent_cache", counting_write)
    args = ["--dataset_config", str(toml), "--vae", str(vae_file), "--batch_size", "2", "--num_workers", "2"]
    assert script.main(args) == 0
    assert len(calls) == 24 and len(live) == 6
    # the number of live tensors must not grow with the number of items written (a leak adds >= 2 per batch)
    assert max(live[1:]) <= live[0] + 4, live


def test_help_documents_every_flag(script):
    parser = script.build_parser()
    from kandinsky5.musubi_compat import REFUSED

    skip = {*REFUSED["cache_latents"], "--debug"}  # musubi's refused flags; --debug: every script's
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    counted = [a for a in flags if a.option_strings[0] not in skip]
    assert len(counted) <= 13, [a.dest for a in counted]  # 12 + musubi's --disable_cudnn_backend
    assert all(a.help for a in flags)
    text = parser.format_help()
    for needle in ("--vae_tiling", "float16 on CUDA", "float32 on CPU", "--skip_existing", "--overwrite",
                   "--keep_cache", "--num_workers", "--config_file", "--nabla_resize"):  # fmt: skip
        assert needle in " ".join(text.split()), needle


# ------------------------------------------------------------------------------------------------------------
# the helpers behind overlap and flat memory
# ------------------------------------------------------------------------------------------------------------


def test_prefetch_map_is_ordered_bounded_overlapping_and_reraises():
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        time.sleep(0.002 * (i % 3))  # finish out of order
        if i == 7:
            raise ValueError("item 7")
        return i * 10

    out: list[int] = []
    with pytest.raises(ValueError, match="item 7"):
        for value in prefetch_map(work, range(20), workers=2, depth=3):
            if not out:
                time.sleep(0.05)  # a slow consumer (the VAE) ...
                assert len(started) >= 2  # ... while the next items are already being decoded
            out.append(value)
            assert len(started) <= len(out) + 3  # never more than `depth` items ahead of the consumer
    assert out == [i * 10 for i in range(7)]  # in order, up to the failing item
    assert list(prefetch_map(lambda i: i + 1, range(4), workers=0)) == [1, 2, 3, 4]  # no threads


def test_bucket_batcher_emits_full_batches_then_flushes_the_rest():
    batcher: BucketBatcher[str] = BucketBatcher(2)
    assert batcher.add("a", "a1") is None and batcher.add("b", "b1") is None
    assert batcher.add("a", "a2") == ["a1", "a2"] and batcher.pending == 1
    assert list(batcher.flush()) == [["b1"]] and batcher.pending == 0
