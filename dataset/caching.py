"""Machinery shared by the two caching scripts: what a cache must match, skip logic, prefetching, batching,
progress, the failure summary and stale-file cleanup.  No model code here (the scripts own the VAE / encoders).

The ``expect`` contract (for the trainer)
-----------------------------------------
Every cache records how it was made (``dataset.cache`` metadata).  ``read_latent_cache(path, expect)``,
``read_text_cache(path, expect)`` and ``read_cache_meta(path, stage, expect)`` raise ``CacheError`` (naming the
script to re-run) when any key of ``expect`` differs from the file.  Build ``expect`` with the helpers below so the
trainer and the cachers agree on one definition:

* latents -- ``latent_expect(vae=None, dtype=None, nabla_resize=None)`` gives
  ``{"stage": "latents", "format_version": FORMAT_VERSION}`` plus each argument that is not None:
  ``vae`` = ``VideoVAE.identity`` (``"<file name>:<12 hex>"``; pass it when the trainer has the VAE loaded, e.g.
  for sampling), ``dtype`` (``"float16"`` ...; only if the trainer needs one dtype -- it normally casts),
  ``nabla_resize`` (True only if the user asked for NABLA-resized caches; NABLA geometry itself is better checked
  on the latent shape).
* text -- ``text_expect(task, text_encoder=None, caption=None)`` gives
  ``{"stage": "text", "format_version": FORMAT_VERSION, "template": task.text_template,
  "max_length": task.text_max_length, "task_family": task_family(task)}`` -- for every video task that is
  ``"video"`` / ``256`` / ``"video"``, for image *and* video datasets alike, because the model is conditioned
  with the task's template at inference -- plus ``text_encoder`` = ``TextEncoder.identity`` (a dict) when the
  trainer has the encoders loaded, and ``caption`` = the item's current caption to catch edited caption files.

Metadata written (all readable back typed by ``read_*``): latents: ``format_version, stage, item_key, vae, dtype,
source_size, bucket_size, encoded_size, frame_indices, nabla_resize, kind, scaling_factor, posterior, vae_tiling,
source_path``; text: ``format_version, stage, item_key, template, max_length, task_family, text_encoder, caption,
dtype, qwen_4bit, task``.  The cachers' own ``--skip_existing`` check is stricter: it also compares the per-item
keys (item_key, sizes, frame indices, caption) and the settings (dtype, nabla_resize, qwen_4bit).

Memory
------
``prefetch_map`` keeps at most ``depth`` decoded items in flight, ``BucketBatcher`` at most ``batch_size - 1``
clips per bucket, and nothing else keeps tensors between batches, so memory is flat over long runs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from tqdm import tqdm

from dataset.cache import (
    FORMAT_VERSION,
    LATENT_SUFFIX,
    TEXT_SUFFIX,
    CacheError,
    is_valid_cache,
    list_cache_files,
    read_cache_meta,
)
from kandinsky5.common import get_logger
from kandinsky5.configs import TaskConfig

__all__ = [
    "EXIT_FAILURES",
    "task_family",
    "latent_expect",
    "text_expect",
    "needs_build",
    "Failures",
    "prefetch_map",
    "BucketBatcher",
    "progress_bar",
    "Throughput",
    "remove_stale",
]

log = get_logger(__name__)

EXIT_FAILURES = 2  # exit status of a run that finished but could not cache some items (1 = bad input, no run)
_TMP_MAX_AGE_S = 600  # leftover temp files of killed runs older than this are removed by the cleanup
T = TypeVar("T")
R = TypeVar("R")


# ------------------------------------------------------------------------------------------------------------
# What a cache must match
# ------------------------------------------------------------------------------------------------------------


def task_family(task: TaskConfig) -> str:
    """The family recorded in text caches: ``"video"`` for every video task (all registered ones), else "image"."""
    return "video" if task.frames > 1 else "image"


def latent_expect(vae: str | None = None, dtype: Any = None, nabla_resize: bool | None = None) -> dict[str, Any]:
    """``expect`` for latent caches: stage + format version, plus each setting that is given."""
    expect: dict[str, Any] = {"stage": "latents", "format_version": FORMAT_VERSION}
    given = {"vae": vae, "dtype": dtype, "nabla_resize": nabla_resize}
    expect.update({k: v for k, v in given.items() if v is not None})
    return expect


def text_expect(
    task: TaskConfig, text_encoder: Mapping[str, str] | None = None, caption: str | None = None
) -> dict[str, Any]:
    """``expect`` for text caches: the task's template and max length (and encoder / caption when given)."""
    expect: dict[str, Any] = {
        "stage": "text",
        "format_version": FORMAT_VERSION,
        "template": task.text_template,
        "max_length": task.text_max_length,
        "task_family": task_family(task),
    }
    if text_encoder is not None:
        expect["text_encoder"] = dict(text_encoder)
    if caption is not None:
        expect["caption"] = caption
    return expect


def needs_build(path: Path, expect: Mapping[str, Any], skip_existing: bool) -> bool:
    """True unless ``skip_existing`` and ``path`` is a readable cache matching ``expect`` (missing, damaged,
    truncated or made with other settings -> rebuilt)."""
    return not (skip_existing and is_valid_cache(path, expect))


# ------------------------------------------------------------------------------------------------------------
# Failures
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Failures:
    """Items that could not be cached: reported when they happen and listed again at the end."""

    entries: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    keys: set[tuple[int, str]] = field(default_factory=set)  # (dataset index, item key): protected from cleanup

    def add(self, path: Path | str, reason: str, dataset_index: int, item_key: str) -> None:
        log.error("skipped %s: %s", path, reason)
        self.entries.append((str(path), reason))
        self.keys.add((dataset_index, item_key))

    def __len__(self) -> int:
        return len(self.entries)

    def report(self) -> int:
        """Log the summary; return the exit status (0, or ``EXIT_FAILURES``)."""
        if not self.entries:
            return 0
        log.error("%d item(s) could not be cached (their old caches, if any, were kept):", len(self.entries))
        for path, reason in self.entries:
            log.error("  %s: %s", path, reason)
        return EXIT_FAILURES


# ------------------------------------------------------------------------------------------------------------
# Prefetching and batching
# ------------------------------------------------------------------------------------------------------------


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int | None = None) -> Iterator[R]:
    """``fn(item)`` for every item, in order, computed by ``workers`` threads ahead of the consumer.

    At most ``depth`` (default ``2 * workers``) results are running or waiting at any time, so a slow consumer
    (the VAE) bounds memory.  ``workers = 0`` runs ``fn`` in the caller's thread (no overlap).  ``fn`` should turn
    expected per-item errors into values; any other exception is re-raised here, in order.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    depth = max(1, depth or 2 * workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="cache-prefetch") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # consumer stopped early (error, Ctrl-C): do not decode what nobody will use
            for future in pending:
                future.cancel()


class BucketBatcher(Generic[T]):
    """Collects entries per key and hands out a batch as soon as a key has ``batch_size`` of them."""

    def __init__(self, batch_size: Callable[[Hashable], int] | int):
        self._size = batch_size if callable(batch_size) else (lambda _key: batch_size)
        self._pending: dict[Hashable, list[T]] = {}

    def add(self, key: Hashable, entry: T) -> list[T] | None:
        members = self._pending.setdefault(key, [])
        members.append(entry)
        if len(members) >= self._size(key):
            return self._pending.pop(key)
        return None

    def flush(self) -> Iterator[list[T]]:
        """The remaining partial batches (and forget them)."""
        while self._pending:
            yield self._pending.pop(next(iter(self._pending)))

    @property
    def pending(self) -> int:
        return sum(len(v) for v in self._pending.values())


# ------------------------------------------------------------------------------------------------------------
# Progress and throughput
# ------------------------------------------------------------------------------------------------------------


def progress_bar(total: int, desc: str, unit: str) -> tqdm:
    """A tqdm bar on stderr with rate and ETA."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1, mininterval=0.5)


@dataclass
class Throughput:
    """Counts for the closing log line: done / up to date, elapsed time and rate."""

    unit: str
    done: int = 0
    skipped: int = 0
    start: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        """Start the clock now (after model loading and planning), so the rate is the encoding rate."""
        self.start = time.perf_counter()

    def summary(self, failed_items: int | None = None) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        failed = "" if failed_items is None else f", {failed_items} item(s) failed"
        return (
            f"{self.done} {self.unit}(s) cached, {self.skipped} up to date (skipped){failed}; "
            f"{elapsed:.1f} s, {rate:.2f} {self.unit}/s"
        )


# ------------------------------------------------------------------------------------------------------------
# Stale-file cleanup
# ------------------------------------------------------------------------------------------------------------


def remove_stale(
    cache_dir: Path,
    stage: str,
    wanted: set[Path],
    protected_keys: set[str],
    keep_cache: bool,
) -> int:
    """Delete this stage's cache files in ``cache_dir`` that the current dataset no longer produces.

    A file is deleted only when it is *ours* (its header says this stage and names an item) and its item is not
    in ``protected_keys`` (items that failed this run keep their old caches).  Foreign files with our suffix
    (e.g. musubi-tuner caches) and damaged ones are left in place with a warning, since the trainer would refuse
    them.  Temp files of killed runs (``.<name>.*.tmp``, older than 10 minutes) are always removed.  With
    ``keep_cache`` nothing is deleted.  Returns the number of deleted cache files.
    """
    cache_dir = Path(cache_dir)
    _remove_old_temp_files(cache_dir, stage)
    if keep_cache:
        return 0
    wanted = {p.resolve() for p in wanted}
    removed = 0
    for path in list_cache_files(cache_dir, stage):
        if path.resolve() in wanted:
            continue
        try:
            key = read_cache_meta(path, stage).get("item_key")
        except CacheError as exc:
            log.warning("not deleting %s: not a cache made by this tool or damaged (%s); remove it by hand", path, exc)
            continue
        if key in protected_keys:
            continue
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("%s: removed %d stale %s cache file(s) (use --keep_cache to keep them)", cache_dir, removed, stage)
    return removed


def _remove_old_temp_files(cache_dir: Path, stage: str) -> None:
    if not cache_dir.is_dir():
        return
    suffix = LATENT_SUFFIX if stage == "latents" else TEXT_SUFFIX
    cutoff = time.time() - _TMP_MAX_AGE_S
    for path in cache_dir.glob(f".*{suffix}.*.tmp"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:  # raced with another process: nothing to clean
            continue
