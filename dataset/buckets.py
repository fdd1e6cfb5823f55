"""Aspect-ratio buckets (16-px steps, musubi rules) and per-bucket batching with seeded shuffling.

Sizes are always ``(width, height)`` in pixels.  A *bucket key* for batching is ``(width, height, frames)``: items
share a batch only when their latents have the same shape, so a video dataset with several ``target_frames`` gets
one frame-count bucket per length inside each resolution bucket (images use frames = 1).

Bucket rule (``enable_bucket = true``), for ``resolution = (W, H)`` and area ``A = W * H``:
candidate widths run from ``floor16(isqrt(A) // 2)`` to ``isqrt(A)`` in steps of 16, each paired with
``floor16(A // w)``; both orientations are kept.  An item goes to the candidate whose aspect ratio is closest to its
own (ties: the smaller width).  With ``bucket_no_upscale`` an item whose area is at most ``A`` keeps its own size
rounded down to multiples of 16.  With ``enable_bucket = false`` every item goes to exactly ``(W, H)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache
from typing import TypeVar

__all__ = ["RESO_STEP", "bucket_resolutions", "select_bucket", "make_batches", "floor_to"]

RESO_STEP = 16  # VAE /8 then DiT patch /2
T = TypeVar("T")


def floor_to(value: int, step: int = RESO_STEP) -> int:
    return value - value % step


@lru_cache(maxsize=64)
def bucket_resolutions(resolution: tuple[int, int], step: int = RESO_STEP) -> tuple[tuple[int, int], ...]:
    """All (width, height) buckets of about ``resolution``'s area, sorted."""
    area = resolution[0] * resolution[1]
    side = math.isqrt(area)
    buckets = set()
    for w in range(max(step, floor_to(side // 2, step)), side + step, step):
        h = floor_to(area // w, step)
        if h >= step:
            buckets.update({(w, h), (h, w)})
    return tuple(sorted(buckets))


def select_bucket(
    size: tuple[int, int],
    resolution: tuple[int, int],
    *,
    enable_bucket: bool = True,
    no_upscale: bool = False,
    step: int = RESO_STEP,
) -> tuple[int, int]:
    """The (width, height) bucket for media of ``size`` (width, height).  May be smaller than ``step`` only with
    ``no_upscale`` and media under ``step`` pixels on a side; callers treat a zero side as unusable media."""
    if not enable_bucket:
        return resolution
    width, height = size
    if no_upscale and width * height <= resolution[0] * resolution[1]:
        return floor_to(width, step), floor_to(height, step)
    aspect = width / height
    return min(bucket_resolutions(resolution, step), key=lambda b: abs(b[0] / b[1] - aspect))


def make_batches(
    entries: Sequence[T],
    key: Callable[[T], Hashable],
    batch_size: int,
    num_repeats: int = 1,
    seed: int | None = None,
) -> list[list[T]]:
    """Group entries by ``key`` (e.g. ``(W, H, frames)``) into batches of at most ``batch_size``.

    Each entry appears ``num_repeats`` times.  Without ``seed`` the order is deterministic: buckets sorted by key,
    entries in input order, the last batch of a bucket possibly short.  With ``seed`` (pass ``seed + epoch`` for
    a new order every epoch) each bucket is shuffled and then the list of batches is shuffled, reproducibly.
    Keys must be sortable (tuples of ints are).
    """
    if batch_size < 1 or num_repeats < 1:
        raise ValueError(f"batch_size and num_repeats must be >= 1, got {batch_size}, {num_repeats}")
    rng = random.Random(seed) if seed is not None else None
    buckets: dict[Hashable, list[T]] = {}
    for entry in entries:
        buckets.setdefault(key(entry), []).extend([entry] * num_repeats)
    batches = []
    for bucket_key in sorted(buckets):
        members = buckets[bucket_key]
        if rng is not None:
            rng.shuffle(members)
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    if rng is not None:
        rng.shuffle(batches)
    return batches
