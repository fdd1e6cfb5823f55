"""Full sha256 of a base checkpoint, computed once per file and cached (a Pro checkpoint is 38 GB).

``k5_base_checkpoint_hash`` (``loading.file_fingerprint``) stays the quick check; this is the exact identity that
kohya's tools call ``ss_new_sd_model_hash``.  Cache: one JSON file, ``$K5_HASH_CACHE`` or
``$XDG_CACHE_HOME/kandinsky5-tuner/checkpoint_sha256.json`` (default ``~/.cache/...``), keyed by the resolved path
and valid while size and modification time are unchanged; written atomically.  A directory of shards hashes to
the sha256 of its ``<file name> <sha256>\\n`` lines (sorted by name).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kandinsky5.common import atomic_path, get_logger

__all__ = ["checkpoint_sha256", "cache_file"]

log = get_logger(__name__)
_CHUNK = 16 << 20


def cache_file() -> Path:
    if os.environ.get("K5_HASH_CACHE"):
        return Path(os.environ["K5_HASH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kandinsky5-tuner" / "checkpoint_sha256.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _file_sha256(path: Path) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                      disable=size < (1 << 30), leave=False) as bar:  # fmt: skip
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _cached_file_sha256(path: Path, cache: dict) -> tuple[str, bool]:
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"], False
    log.info("computing the sha256 of %s once (%.1f GB; cached in %s)", path, stat.st_size / 1e9, cache_file())
    digest = _file_sha256(path)
    cache[key] = {"stamp": stamp, "sha256": digest}
    return digest, True


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 hex digest of a checkpoint file (or of a directory's ``*.safetensors`` shards), cached."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    store = cache_file()
    cache = _read_cache(store)
    digests, changed = [], False
    for file in files:
        digest, new = _cached_file_sha256(file, cache)
        digests.append(digest)
        changed |= new
    if changed:
        try:
            with atomic_path(store) as tmp:
                tmp.write_text(json.dumps(cache, indent=1))
        except OSError as exc:  # a read-only home must not stop training: the hash is just recomputed next time
            log.warning("could not write the checkpoint hash cache %s (%s)", store, exc)
    if not path.is_dir():
        return digests[0]
    lines = "".join(f"{f.name} {d}\n" for f, d in zip(files, digests))
    return hashlib.sha256(lines.encode()).hexdigest()
