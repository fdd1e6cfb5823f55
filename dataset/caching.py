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
* text -- ``text_expect(task, text_encoder=None, caption=None, templates=None)`` gives
  ``{"stage": "text", "format_version": FORMAT_VERSION, "max_length": task.text_max_length,
  "task_family": task_family(task)}`` -- ``256`` / ``"video"`` for every video task -- plus ``templates`` (the
  exact list, for the cacher's ``--skip_existing``), ``text_encoder`` = ``TextEncoder.identity`` (a dict) and
  ``caption`` = the item's current caption when given.  Templates follow the official sampler
  (``configs.prompt_template``): one frame -> ``"image"``, more -> the task's ``"video"``; ``item_templates``
  lists what an item's clips need (a video dataset with ``target_frames = [1, 25]`` needs both) and the trainer
  checks that each clip's template is in its text cache.

Metadata written (all readable back typed by ``read_*``): latents: ``format_version, stage, item_key, vae, dtype,
source_size, bucket_size, encoded_size, frame_indices, source_frames, nabla_resize, kind, scaling_factor, posterior,
vae_tiling, source_path``; text: ``format_version, stage, item_key, template, templates, max_length, task_family,
text_encoder, caption, dtype, qwen_4bit, task``.  The trainer compares them with the current dataset TOML
(``dataset.staleness``).  The cachers' own ``--skip_existing`` check is stricter: it also compares the per-item
keys (item_key, sizes, frame indices, caption) and the settings (dtype, nabla_resize, qwen_4bit).

Memory
------
``prefetch_map`` keeps at most ``depth`` decoded items in flight, ``BucketBatcher`` at most ``batch_size - 1``
clips per bucket, and nothing else keeps tensors between batches, so memory is flat over long runs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from tqdm import tqdm

from dataset.cache import (
    FORMAT_VERSION,
    CacheError,
    is_valid_cache,
    list_cache_files,
    read_cache_meta,
)
from dataset.config import DatasetSpec
from dataset.sources import Item
from kandinsky5.common import get_logger
from kandinsky5.configs import TaskConfig, prompt_template
from kandinsky5.preflight import check_output_dir, clean_leftovers

__all__ = [
    "EXIT_FAILURES",
    "task_family",
    "latent_expect",
    "text_expect",
    "clip_frame_counts",
    "item_templates",
    "needs_build",
    "Failures",
    "prefetch_map",
    "BucketBatcher",
    "progress_bar",
    "Throughput",
    "remove_stale",
    "latent_item_bytes",
    "text_item_bytes",
    "check_cache_dirs",
]

log = get_logger(__name__)

EXIT_FAILURES = 2  # exit status of a run that finished but could not cache some items (1 = bad input, no run)
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
    task: TaskConfig,
    text_encoder: Mapping[str, str] | None = None,
    caption: str | None = None,
    templates: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``expect`` for text caches: the task's max length and family (and encoder / caption / the exact template
    list when given; the trainer instead checks that the template each clip needs is among the file's)."""
    expect: dict[str, Any] = {
        "stage": "text",
        "format_version": FORMAT_VERSION,
        "max_length": task.text_max_length,
        "task_family": task_family(task),
    }
    if templates is not None:
        expect["templates"] = list(templates)
    if text_encoder is not None:
        expect["text_encoder"] = dict(text_encoder)
    if caption is not None:
        expect["caption"] = caption
    return expect


def clip_frame_counts(spec: DatasetSpec, item: Item | None = None) -> set[int]:
    """Pixel frame counts of the clips an item of ``spec`` can yield: {1} for images, ``target_frames`` for videos
    (``frame_extraction = "full"``: probed from the media header when ``item`` is given)."""
    if spec.kind == "image":
        return {1}
    if spec.frame_extraction != "full":
        return set(spec.target_frames)
    if item is not None:
        from dataset.media import MediaError, plan_clips

        try:
            return {len(plan.frame_indices) for plan in plan_clips(item, spec)} or {1}
        except MediaError:
            pass
    return {1, 5} if spec.max_frames >= 5 else {1}


def item_templates(spec: DatasetSpec, task: TaskConfig, item: Item | None = None) -> list[str]:
    """The prompt templates an item's text cache must hold, main one first (``configs.prompt_template``)."""
    found = {prompt_template(f, task) for f in clip_frame_counts(spec, item)}
    return sorted(found, key=lambda t: t != task.text_template)


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
    them.  Temp files of killed runs (``kandinsky5.files.remove_orphans``) are always removed.  With
    ``keep_cache`` nothing is deleted.  Returns the number of deleted cache files.
    """
    cache_dir = Path(cache_dir)
    clean_leftovers([cache_dir])
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


# ------------------------------------------------------------------------------------------------------------
# Start-up checks: writable cache directories with room for the caches, leftovers of killed runs
# ------------------------------------------------------------------------------------------------------------


def latent_item_bytes(spec: DatasetSpec, dtype_bytes: int, nabla: bool = False) -> int:
    """Upper estimate of one item's latent caches: every clip at the full resolution, plus its two image frames.

    ``chunk`` / ``slide`` extraction counts one clip per target length (their real count depends on the video)."""
    width, height = spec.resolution
    if nabla:
        width, height = -(-width // 128) * 128, -(-height // 128) * 128
    frame_bytes = (width // 8) * (height // 8) * 16 * dtype_bytes
    if spec.kind == "image":
        return 3 * frame_bytes
    lengths = [spec.max_frames] if spec.frame_extraction == "full" else list(spec.target_frames)
    clips = spec.frame_sample if spec.frame_extraction == "uniform" else 1
    return sum(clips * ((f - 1) // 4 + 1 + 2) * frame_bytes for f in lengths)


def text_item_bytes(spec: DatasetSpec, task: TaskConfig, dtype_bytes: int) -> int:
    """Upper estimate of one item's text cache (every template its clips need, full text length)."""
    templates = len(item_templates(spec, task))  # "full" extraction without a probe: both templates
    return templates * (task.text_max_length * task.dit.in_text_dim + task.dit.in_text_dim2) * dtype_bytes


def check_cache_dirs(
    datasets: Iterable[tuple[DatasetSpec, list[Item]]], stage: str, item_bytes: Callable[[DatasetSpec], int]
) -> None:
    """Before any model loads: remove this tool's leftovers, and check each ``cache_directory`` can be written
    and has room for its items' caches (less what its existing caches of this stage already take)."""
    for spec, items in datasets:
        clean_leftovers([spec.cache_directory])
        existing = sum(p.stat().st_size for p in list_cache_files(spec.cache_directory, stage))
        need = max(0, len(items) * item_bytes(spec) - existing)
        check_output_dir(spec.cache_directory, f"{spec.name}.cache_directory", need, "lower the resolution")
