"""A kohya-style ``ss_datasets`` summary of a training run's datasets, for the LoRA file's metadata.

One dict per ``[[datasets]]`` entry: kind, source directory / jsonl *names* (full paths only when asked, so a
shared LoRA does not reveal the trainer's file system), resolution, batch size, repeats, bucketing settings,
video frame settings, the number of cached items and the buckets as ``"WxHxF": count`` (pixels and frames).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dataset.config import DatasetConfig
from dataset.latent_dataset import CachedItem

__all__ = ["dataset_summary"]


def _name(path: Path | None, full: bool) -> str | None:
    if path is None:
        return None
    return str(Path(path).resolve()) if full else Path(path).name


def _bucket(shape: tuple[int, int, int]) -> str:
    t, h, w = shape
    return f"{w * 8}x{h * 8}x{4 * (t - 1) + 1}"


def dataset_summary(config: DatasetConfig, items: list[CachedItem], full_paths: bool = False) -> list[dict]:
    """The ``ss_datasets`` list (JSON-ready) for ``config`` and the items discovered from its caches."""
    out = []
    for spec in config.datasets:
        mine = [i for i in items if i.dataset_index == spec.index]
        entry = {
            "kind": spec.kind,
            f"{spec.kind}_directory": _name(spec.directory, full_paths),
            f"{spec.kind}_jsonl_file": _name(spec.jsonl_file, full_paths),
            "resolution": list(spec.resolution),
            "batch_size_per_device": spec.batch_size,
            "num_repeats": spec.num_repeats,
            "enable_bucket": spec.enable_bucket,
            "bucket_no_upscale": spec.bucket_no_upscale,
            "num_items": len(mine),
            "buckets": dict(sorted(Counter(_bucket(i.shape) for i in mine).items())),
        }
        if spec.kind == "video":
            entry.update(target_frames=list(spec.target_frames), frame_extraction=spec.frame_extraction,
                         frame_stride=spec.frame_stride, frame_sample=spec.frame_sample, max_frames=spec.max_frames,
                         source_fps=spec.source_fps)  # fmt: skip
        out.append({k: v for k, v in entry.items() if v is not None})
    return out
