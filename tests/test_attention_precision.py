"""Dense attention kernels without fp32 kernels are refused with fp32 compute at parse time (issue 11 item 7):
FlashAttention 2/3 and SageAttention take fp16/bf16 only, so ``--mixed_precision no`` (trainer) or ``--dtype
float32`` (generator) with them would fail at the first step after loading the models.  SDPA and xformers (CUTLASS
kernels) run fp32; NABLA tasks do not use the dense backend for visual self-attention."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from kandinsky5.cli import run_main
from kandinsky5.common import UserError
from kandinsky5.model.attention import DENSE_BACKENDS, check_backend_dtype
from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
def test_which_backends_refuse_fp32(backend):
    for dtype in (torch.bfloat16, torch.float16):
        check_backend_dtype(backend, dtype, "--dtype x")
    if backend in ("flash_attn", "flash3", "sage_attn"):
        with pytest.raises(UserError, match=f"--{backend} computes in bfloat16/float16 only, but --dtype float32"):
            check_backend_dtype(backend, torch.float32, "--dtype float32")
    else:
        check_backend_dtype(backend, torch.float32, "--dtype float32")


def _train(argv: list[str]) -> int:
    main = runpy.run_path(str(ROOT / "kandinsky5_train_network.py"), run_name="k5_train")["main"]
    return run_main(main, argv)


def _train_args(tmp_path: Path, task: str = "k5-tiny-t2v") -> list[str]:
    return ["--task", task, "--dit", str(tmp_path / "dit.safetensors"), "--dataset_config", str(tmp_path / "d.toml"),
            "--output_dir", str(tmp_path / "out"), "--output_name", "x"]  # fmt: skip


def test_trainer_refuses_flash_attn_in_fp32_before_loading(tmp_path, capsys, monkeypatch):
    assert _train([*_train_args(tmp_path), "--mixed_precision", "no", "--flash_attn"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--flash_attn computes in bfloat16/float16 only" in err[0], err
    assert "--mixed_precision no" in err[0] and "--sdpa" in err[0]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch --mixed_precision no
    assert _train([*_train_args(tmp_path), "--flash3"]) == 1
    assert "accelerate's setting" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--xformers"], ["--flash_attn", "--task", "k5-lite-t2v-10s-sd"]])
def test_trainer_keeps_fp32_kernels_and_nabla_tasks(tmp_path, capsys, flags):
    """xformers runs fp32; a NABLA task does not run the dense kernel: no precision error (what remains here is
    only the missing package, which this machine does not have)."""
    _train([*_train_args(tmp_path), "--mixed_precision", "no", *flags])
    assert "computes in bfloat16/float16 only" not in capsys.readouterr().err


def test_generator_refuses_sage_attn_in_fp32(tiny_bundle, tmp_path, capsys):
    main = load_module(ROOT / "kandinsky5_generate_video.py", "kandinsky5_generate_video").main
    argv = ["--task", "k5-tiny-t2v", "--dit", str(tiny_bundle / "model" / "k5_tiny_t2v.safetensors"),
            "--dtype", "float32", "--sage_attn", "--prompt", "x", "--output", str(tmp_path / "o.mp4")]  # fmt: skip
    assert run_main(main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "--sage_attn computes in bfloat16/float16 only, but --dtype float32" in err[-1], err
    assert not (tmp_path / "o.mp4").exists()
