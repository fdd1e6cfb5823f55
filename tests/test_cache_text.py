"""kandinsky5_cache_text_encoder_outputs.py on the tiny bundle: the seed command as written, metadata (video
template and 256 tokens for image *and* video items), batch == one caption at a time, skip / rebuild, truncation
to the task's max length, stale cleanup, one-line errors, and the trainer's ``expect`` contract.

The seed command runs as a subprocess; everything else calls ``main(argv)`` of the script loaded from its file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset.cache import TEXT_SUFFIX, CacheError, read_text_cache, text_cache_path
from dataset.caching import text_expect
from dataset.config import load_dataset_config
from dataset.sources import iter_items
from kandinsky5.cli import run_main
from kandinsky5.configs import get_task
from kandinsky5.model.text_encoders import TextEncoder
from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]
SEED_TASK = "k5-pro-t2v-5s-sd"


@pytest.fixture(scope="module")
def script():
    return load_module(ROOT / "kandinsky5_cache_text_encoder_outputs.py", "_cache_text_script")


@pytest.fixture(scope="module")
def toy():
    return load_module(ROOT / "scripts" / "make_toy_dataset.py", "_make_toy_dataset_text")


@pytest.fixture(scope="module")
def encoder_args(tiny_bundle) -> list[str]:
    return [
        "--text_encoder_qwen",
        str(tiny_bundle / "text_encoder"),
        "--text_encoder_clip",
        str(tiny_bundle / "text_encoder2"),
    ]


@pytest.fixture(scope="module")
def encoder(tiny_bundle) -> TextEncoder:
    return TextEncoder.load(str(tiny_bundle / "text_encoder"), str(tiny_bundle / "text_encoder2"), "cpu", "float32")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads and a shared CI box makes them slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def encode_calls(monkeypatch) -> list[list[str]]:
    """Prompts of every TextEncoder.encode call made while the test runs."""
    calls: list[list[str]] = []
    original = TextEncoder.encode

    def counted(self, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(TextEncoder, "encode", counted)
    return calls


def _items(toml: Path):
    return [(spec, item) for spec in load_dataset_config(toml).datasets for item in iter_items(spec)]


def _caches(toml: Path) -> dict[str, Path]:
    return {item.key: text_cache_path(spec.cache_directory, item.key) for spec, item in _items(toml)}


def _captions(root: Path, captions: dict[str, str]) -> Path:
    """A JSONL image dataset whose media are tiny PNGs (the text cacher never decodes them)."""
    from PIL import Image

    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, caption in captions.items():
        Image.new("RGB", (16, 16)).save(media / f"{name}.png")
        lines.append(json.dumps({"image_path": f"{(media / name).as_posix()}.png", "caption": caption}))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    toml = root / "dataset.toml"
    toml.write_text(
        f'[[datasets]]\nimage_jsonl_file = "{(root / "items.jsonl").as_posix()}"\n'
        f'cache_directory = "{(root / "cache").as_posix()}"\nresolution = 16\n'
    )
    return toml


# ------------------------------------------------------------------------------------------------------------
# the seed command, as written (subprocess)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, toy, encoder_args) -> Path:
    toml = toy.make_toy_dataset(tmp_path_factory.mktemp("toy_text"))
    cmd = [sys.executable, "kandinsky5_cache_text_encoder_outputs.py", "--dataset_config", str(toml), *encoder_args,
           "--batch_size", "4"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "template 'video' ('image' for 1-frame clips), max length 256 tokens (task k5-pro-t2v-5s-sd)" in run.stderr
    assert "device cpu, dtype float32" in run.stderr
    return toml


def test_seed_command_caches_every_item_with_the_inference_template(seed_run, encoder):
    caches = _caches(seed_run)
    assert len(caches) == 6  # 4 png + 2 mp4
    for (spec, item), path in zip(_items(seed_run), caches.values()):
        cache = read_text_cache(path, text_expect(get_task(SEED_TASK), encoder.identity, item.caption))
        meta = cache.meta
        # as the official sampler: one frame (the images) -> the image template, clips -> the video template
        template = "image" if spec.kind == "image" else "video"
        assert (meta["template"], meta["max_length"], meta["task_family"]) == (template, 256, "video"), spec.kind
        assert meta["templates"] == [template]
        embeds, pooled = encoder.encode([item.caption], template, 256).unpadded(0)
        torch.testing.assert_close(cache.embeds, embeds, atol=1e-5, rtol=1e-5)
        assert meta["caption"] == item.caption and meta["item_key"] == item.key and meta["task"] == SEED_TASK
        assert meta["text_encoder"] == encoder.identity and meta["dtype"] == "float32"
        assert meta["qwen_4bit"] is False and meta["stage"] == "text"
        assert cache.embeds.ndim == 2 and cache.embeds.shape[1] == 64 and cache.pooled.shape == (32,)


def test_batch_equals_one_caption_at_a_time(seed_run, script, encoder, encoder_args, tmp_path, toy):
    batched = {key: read_text_cache(path) for key, path in _caches(seed_run).items()}
    single_toml = toy.make_toy_dataset(tmp_path)  # same captions, separate caches
    assert script.main(["--dataset_config", str(single_toml), *encoder_args, "--batch_size", "1"]) == 0
    for (_, item), path in zip(_items(single_toml), _caches(single_toml).values()):
        single = read_text_cache(path)
        torch.testing.assert_close(single.embeds, batched[item.key].embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single.pooled, batched[item.key].pooled, atol=1e-5, rtol=1e-5)
        template = single.meta["template"]
        embeds, pooled = encoder.encode([item.caption], template, 256).unpadded(0)  # what inference computes
        torch.testing.assert_close(single.embeds, embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single.pooled, pooled, atol=1e-5, rtol=1e-5)


def test_expect_contract_refuses_other_settings(seed_run, encoder):
    path = next(p for p in _caches(seed_run).values() if p.name.endswith(".mp4_k5_te.safetensors"))
    read_text_cache(path, text_expect(get_task("k5-lite-t2v-5s-sd"), encoder.identity))  # any video task matches
    with pytest.raises(CacheError, match="holds the 'video' prompt template.*needs 'image'"):
        read_text_cache(path, template="image")
    with pytest.raises(CacheError, match="max_length=256 but the current settings need max_length=512"):
        read_text_cache(path, {**text_expect(get_task(SEED_TASK)), "max_length": 512})
    with pytest.raises(CacheError, match="template='video'.*template='image'"):
        read_text_cache(path, {**text_expect(get_task(SEED_TASK)), "template": "image"})
    with pytest.raises(CacheError, match="text_encoder"):
        read_text_cache(path, text_expect(get_task(SEED_TASK), {**encoder.identity, "qwen": "other"}))


# ------------------------------------------------------------------------------------------------------------
# skip / rebuild / truncation / cleanup
# ------------------------------------------------------------------------------------------------------------


def test_skip_existing_does_no_work_and_rebuilds_edited_or_damaged(script, encoder_args, tmp_path, encode_calls):
    toml = _captions(tmp_path, {"a": "a red ball", "b": "a blue cube rolls", "c": "green"})
    args = ["--dataset_config", str(toml), *encoder_args, "--batch_size", "2"]
    assert script.main(args) == 0
    assert sorted(len(c) for c in encode_calls) == [1, 2]
    paths = _caches(toml)
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}

    encode_calls.clear()
    assert script.main(args + ["--skip_existing"]) == 0
    assert encode_calls == [] and {k: p.stat().st_mtime_ns for k, p in paths.items()} == before

    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(jsonl.read_text().replace("a blue cube rolls", "a blue cube"))  # edited caption
    damaged = paths["c.png"]
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated file
    assert script.main(args + ["--skip_existing"]) == 0
    assert sorted(encode_calls[0]) == ["a blue cube", "green"]
    assert read_text_cache(paths["b.png"]).meta["caption"] == "a blue cube"
    assert paths["a.png"].stat().st_mtime_ns == before["a.png"]

    encode_calls.clear()  # default (and --overwrite): everything again, as musubi
    assert script.main(args + ["--overwrite"]) == 0 and sum(len(c) for c in encode_calls) == 3


def test_long_caption_is_cut_to_the_task_max_length(script, encoder_args, tmp_path):
    toml = _captions(tmp_path, {"long": " ".join(["a small red cube slides over the table"] * 80), "short": "a cat"})
    assert script.main(["--dataset_config", str(toml), *encoder_args]) == 0
    assert read_text_cache(_caches(toml)["long.png"]).embeds.shape[0] == 256
    assert read_text_cache(_caches(toml)["short.png"]).embeds.shape[0] < 20


def test_stale_text_caches_removed_unless_keep_cache(script, encoder_args, tmp_path):
    toml = _captions(tmp_path, {"a": "one", "b": "two"})
    args = ["--dataset_config", str(toml), *encoder_args]
    assert script.main(args) == 0
    gone = _caches(toml)["b.png"]
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(jsonl.read_text().splitlines()[0] + "\n")
    assert script.main(args + ["--skip_existing", "--keep_cache"]) == 0 and gone.exists()
    assert script.main(args + ["--skip_existing"]) == 0 and not gone.exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"a.png{TEXT_SUFFIX}"]


# ------------------------------------------------------------------------------------------------------------
# errors and CLI surface
# ------------------------------------------------------------------------------------------------------------


def test_errors_are_one_line(script, encoder_args, tmp_path, toy, capsys):
    toml = toy.make_toy_dataset(tmp_path)
    (tmp_path / "videos" / "clip_1.txt").unlink()
    assert run_main(script.main, ["--dataset_config", str(toml), *encoder_args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: datasets[1]: 1 video(s)") and "clip_1.txt" in err[0]

    (tmp_path / "videos" / "clip_1.txt").write_text("back")
    assert run_main(script.main, ["--dataset_config", str(toml), *encoder_args, "--task", "k5-nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k5-nope" in err[0] and SEED_TASK in err[0]
    assert run_main(script.main, ["--dataset_config", str(toml)]) == 1
    assert capsys.readouterr().err.strip() == "error: --text_encoder_qwen is required"


def test_help_documents_every_flag_and_the_default_task(script):
    from kandinsky5.musubi_compat import FIXED, REFUSED

    parser = script.build_parser()
    skip = {*REFUSED["cache_text"], *FIXED["cache_text"], "--debug"}  # musubi's refused / fixed; --debug: all
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    counted = [a for a in flags if a.option_strings[0] not in skip]
    assert len(counted) <= 12, [a.dest for a in counted]
    assert all(a.help for a in flags)
    text = " ".join(parser.format_help().split())
    assert f"default: {SEED_TASK}" in text and "256 tokens and the video template, 1-frame items the image" in text
    assert "bfloat16 on CUDA" in text and "float32 on CPU" in text
    assert parser.parse_args([]).task == SEED_TASK
