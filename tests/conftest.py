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


@pytest.fixture(autouse=True, scope="session")
def _checkpoint_hash_cache(tmp_path_factory):
    """The trainer caches the base checkpoint's sha256 (``kandinsky5.model.checkpoint_hash``): keep it in the
    session's temp dir, never in the user's ~/.cache."""
    import os

    old = os.environ.get("K5_HASH_CACHE")
    os.environ["K5_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash_cache") / "checkpoint_sha256.json")
    yield
    if old is None:
        os.environ.pop("K5_HASH_CACHE", None)
    else:
        os.environ["K5_HASH_CACHE"] = old
