"""Memory order of sampling (issue: a 24 GB card cannot hold Qwen2.5-VL-7B next to the DiT): the trainer and the
generator encode every prompt, free the text encoders, and only then build the DiT; the encoders are never
loaded again (the trainer's later sampling events use the kept embeddings)."""

from __future__ import annotations

import gc
from pathlib import Path

from kandinsky5.memory import build
from kandinsky5.model.text_encoders import TextEncoder
from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]


def _record(monkeypatch) -> list[str]:
    events: list[str] = []
    real_load, real_build = TextEncoder.load.__func__, build.build_dit

    def load(cls, *args, **kwargs):
        events.append("text encoders loaded")
        return real_load(cls, *args, **kwargs)

    def build_dit(*args, **kwargs):
        gc.collect()
        alive = sum(isinstance(o, TextEncoder) for o in gc.get_objects())
        events.append(f"DiT built with {alive} text encoder(s) alive")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(TextEncoder, "load", classmethod(load))
    monkeypatch.setattr(build, "build_dit", build_dit)
    return events


def test_prompts_are_encoded_and_encoders_freed_before_the_dit_is_built(tiny_bundle, tmp_path, monkeypatch):
    from tests.test_train_cli import base_args, train
    from tests.test_training import write_toy_cache

    events = _record(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A red square. --w 32 --h 32 --f 1 --s 1 --g 1\n")
    encoders = ["--text_encoder_qwen", str(tiny_bundle / "text_encoder"), "--text_encoder_clip",
                str(tiny_bundle / "text_encoder2"), "--vae", str(tiny_bundle / "vae")]  # fmt: skip
    sampling = ["--sample_prompts", str(prompts), "--sample_every_n_steps", "1", "--log_with", "none"]
    from kandinsky5.model.vae import vae_file_identity

    toml = write_toy_cache(tmp_path / "data", n_items=2, vae=vae_file_identity(tiny_bundle / "vae"))
    assert train(base_args(tiny_bundle, toml, tmp_path / "out", steps=2) + encoders + sampling) == 0
    assert len(list((tmp_path / "out" / "sample").glob("lora_00000[12]_00_42.png"))) == 2  # two sampling events
    assert events == ["text encoders loaded", "DiT built with 0 text encoder(s) alive"]

    events.clear()
    generate = load_module(ROOT / "kandinsky5_generate_video.py", "kandinsky5_generate_video").main
    from kandinsky5.cli import run_main

    argv = ["--task", "k5-tiny-t2v", "--dit", str(tiny_bundle / "model" / "k5_tiny_t2v.safetensors"), *encoders,
            "--prompt", "a cat", "--width", "32", "--height", "32", "--frames", "1", "--steps", "1",
            "--device", "cpu", "--output", str(tmp_path / "cat.png")]  # fmt: skip
    assert run_main(generate, argv) == 0
    assert events == ["text encoders loaded", "DiT built with 0 text encoder(s) alive"]
