"""Run every ``bash`` block of docs/kandinsky5.md against the tiny model set, so the guide cannot drift from the code.

Paths, tasks and a few sizes are swapped for the tiny ones (table ``SUBSTITUTIONS``); nothing else in a command is
changed.  The blocks run in document order (caching, then training, then inference with the trained LoRA).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.test_report import assert_clean_console

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "kandinsky5.md"

pytestmark = pytest.mark.slow


def bash_blocks(text: str) -> list[str]:
    """The ``bash`` fenced blocks of a markdown text, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [re.sub(r"\\\n\s*", " ", b).strip() for b in blocks]


def substitutions(bundle: Path, work: Path, toml: Path) -> list[tuple[str, str]]:
    model = bundle / "model"
    return [
        ("path/to/dataset.toml", str(toml)),
        ("Qwen/Qwen2.5-VL-7B-Instruct", str(bundle / "text_encoder")),
        ("openai/clip-vit-large-patch14", str(bundle / "text_encoder2")),
        ("path/to/vae/", f"{bundle / 'vae'}/"),
        ("path/to/kandinsky5pro_t2v_pretrain_5s.safetensors", str(model / "k5_tiny_t2v.safetensors")),
        ("path/to/kandinsky5pro_i2v_sft_5s.safetensors", str(model / "k5_tiny_i2v.safetensors")),
        ("k5-pro-t2v-5s-sd", "k5-tiny-t2v"),
        ("k5-pro-i2v-5s-sd", "k5-tiny-i2v"),
        ("path/to/lora.safetensors", str(work / "output" / "k5_lora.safetensors")),
        ("path/to/output.mp4", str(work / "t2v.mp4")),
        ("path/to/i2v.mp4", str(work / "i2v.mp4")),
        ("path/to/output", str(work / "output")),
        ("path/to/first.png", str(work / "first.png")),
        ("path/to/last.png", str(work / "last.png")),
        ("--max_train_epochs 50", "--max_train_epochs 1"),
        ("--lr_warmup_steps 100", "--lr_warmup_steps 1"),
        ("--steps 50", "--steps 2"),
        ("--width 512", "--width 128"),
        ("--height 512", "--height 128"),
        ("accelerate launch", f"{shlex.quote(sys.executable)} -m accelerate.commands.launch"),
        ("python kandinsky5_", f"{shlex.quote(sys.executable)} kandinsky5_"),
    ]


def localise(command: str, subs: list[tuple[str, str]]) -> str:
    for old, new in subs:
        command = command.replace(old, new)
    assert "path/to" not in command, f"unsubstituted path in: {command}"
    return command


def test_every_bash_block_of_the_guide_runs(tiny_bundle, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_toy_dataset import make_toy_dataset

    toml = make_toy_dataset(tmp_path / "data")
    for name, colour in (("first", (200, 30, 30)), ("last", (30, 30, 200))):
        Image.new("RGB", (160, 128), colour).save(tmp_path / f"{name}.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    blocks = bash_blocks(DOC.read_text())
    assert len(blocks) >= 6, "the guide lost its command blocks"
    for block in blocks:
        command = localise(block, substitutions(tiny_bundle, tmp_path, toml))
        run = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        output = run.stdout[-3000:] + run.stderr[-3000:]
        assert run.returncode == 0, f"command failed:\n{command}\n--- output ---\n{output}"
        assert_clean_console(run.stdout + run.stderr)  # no traceback, no bitsandbytes noise, no log line in a bar
    assert (tmp_path / "t2v.mp4").stat().st_size > 0
    assert (tmp_path / "i2v.mp4").stat().st_size > 0
