"""Shared pytest fixtures.  Append new fixtures below; keep each one small and documented."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The offline tiny-weights bundle (``python -m kandinsky5.tiny_weights``), built once per test session.

    Layout: ``vae/``, ``text_encoder/`` (Qwen2.5-VL, hidden 64), ``text_encoder2/`` (CLIP, hidden 32),
    ``model/k5_tiny_t2v.safetensors`` and ``model/k5_tiny_i2v.safetensors`` (DiT, official keys, bf16).
    """
    from kandinsky5.tiny_weights import write_bundle

    return write_bundle(tmp_path_factory.mktemp("tiny_bundle"), seed=0)
