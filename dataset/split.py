"""The validation split: which cached items are held out of training and used for the validation loss.

Two sources, which combine:

* every item of a ``[[datasets]]`` table with ``is_validation = true`` (cached like the others, never trained on);
* ``--validation_split F`` (0 <= F < 1): an item of the other datasets is held out when the hash of its item key
  is below F, the hash being the first 8 bytes of SHA-256(UTF-8 key) read as an integer / 2**64 (uniform in [0, 1)).

The choice is a pure function of the item key, so it is the same on every rank, in every run and at every resume,
and an item never changes side when other items are added or removed.  All clips cut from one media file share its
item key, so they are always on the same side (no clip of a held-out video is trained on).  When F > 0 selects no
item (a small dataset), the item with the smallest hash is held out, so that a split always gives a validation set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from dataset.latent_dataset import CachedItem
from kandinsky5.common import UserError

__all__ = ["key_fraction", "split_validation"]


def key_fraction(key: str) -> float:
    """The item key's position in [0, 1): first 8 bytes of its SHA-256 / 2**64."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_validation(
    items: Sequence[CachedItem], validation_datasets: set[int], fraction: float = 0.0
) -> tuple[list[CachedItem], list[CachedItem]]:
    """(training items, validation items), both in the input order; see the module docstring."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--validation_split must be in [0, 1), got {fraction}")
    held = [it.dataset_index in validation_datasets for it in items]
    candidates = [i for i, it in enumerate(items) if not held[i]]
    if fraction > 0 and candidates:
        picked = [i for i in candidates if key_fraction(items[i].item_key) < fraction]
        if not picked:  # a small dataset: hold out the item (all its clips) with the smallest hash
            lowest = min(key_fraction(items[i].item_key) for i in candidates)
            picked = [i for i in candidates if key_fraction(items[i].item_key) == lowest]
        for i in picked:
            held[i] = True
    train = [it for it, h in zip(items, held) if not h]
    if not train:
        raise UserError(
            "no training items left after the validation split (every dataset has is_validation = true, or "
            "--validation_split holds out every item); lower --validation_split or mark fewer datasets"
        )
    return train, [it for it, h in zip(items, held) if h]
