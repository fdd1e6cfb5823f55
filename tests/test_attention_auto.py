"""The default attention backend (``auto``): what it picks per machine, that it routes per tensor, logs once."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from kandinsky5.cli import add_attention_args, attention_spec_from_args, parse_args, task_from_args
from kandinsky5.model import attention
from kandinsky5.model.attention import auto_cuda_kernel, backend_from_flags, resolve_backend, sdpa


def _fake_gpu(monkeypatch, capability, installed=()):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    real_import = attention.importlib.import_module

    def fake_import(name):
        if name in installed:
            return types.SimpleNamespace(flash_attn_func=lambda q, k, v: ["fa", name])
        if name in ("flash_attn", "flash_attn_interface"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name)

    monkeypatch.setattr(attention.importlib, "import_module", fake_import)


@pytest.mark.parametrize(
    "capability,installed,expected",
    [
        ((9, 0), ("flash_attn_interface", "flash_attn"), "flash3"),
        ((9, 0), ("flash_attn",), "flash_attn"),
        ((8, 6), ("flash_attn_interface", "flash_attn"), "flash_attn"),  # FA3 is Hopper-only
        ((8, 0), (), "sdpa limited to cuDNN / flash"),
        ((7, 5), ("flash_attn",), "sdpa limited to cuDNN / flash"),  # FA2 needs sm80+
    ],
)
def test_auto_picks_the_exact_fast_kernel_installed(monkeypatch, capability, installed, expected):
    _fake_gpu(monkeypatch, capability, installed)
    name, fn = auto_cuda_kernel()
    assert name.startswith(expected)
    if expected.startswith("flash"):
        assert fn(None, None, None)[0] == "fa"


def test_auto_routes_per_tensor(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0), ("flash_attn_interface",))
    attend = resolve_backend("auto", log_choice=False)
    half_cuda = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert attend(half_cuda, half_cuda, half_cuda) == ["fa", "flash_attn_interface"]
    q, k, v = (torch.randn(1, 5, 2, 8).bfloat16() for _ in range(3))  # CPU tensors: plain SDPA
    assert torch.equal(attend(q, k, v), sdpa(q, k, v))


def test_cpu_machine_and_default_flag(monkeypatch):
    assert backend_from_flags(sdpa=False, flash_attn=False) == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_cuda_kernel()[0] == "sdpa (no CUDA device)"


def test_exact_cuda_sdpa_restricts_kernels_not_results():
    q, k, v = (torch.randn(2, 7, 2, 8) for _ in range(3))  # the flash kernel also runs on the CPU
    assert torch.allclose(attention._exact_cuda_sdpa(q, k, v), sdpa(q, k, v), atol=1e-6)


def test_logged_once(caplog):
    import argparse

    from kandinsky5.model.dit import DiT

    p = argparse.ArgumentParser()
    p.add_argument("--task")
    add_attention_args(p)
    args = parse_args(p, ["--task", "k5-tiny-t2v"])
    with caplog.at_level(logging.INFO, logger="kandinsky5"):
        spec = attention_spec_from_args(args, task_from_args(args))
        DiT(task_from_args(args).dit, spec)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]
    assert spec.backend == "auto" and len(lines) == 1 and "auto" in lines[0]
