"""Training data over the caches: item discovery and checks, a torch Dataset, collate, and a bucketed batch sampler.

Discovery (``discover_items``) globs every ``[[datasets]]`` cache directory for latent caches, pairs each with the
text cache of its ``item_key`` and checks both *headers* up front (no tensor data is read), so a missing, damaged
or mismatched cache fails before the DiT is loaded, with a message naming the script to re-run.  Checked:

* text caches match ``dataset.caching.text_expect(task)`` (the task's max length -- 256 tokens for every video
  task -- and task family), hold the prompt template each of their clips needs (``configs.prompt_template``: one
  frame "image", longer clips the task's "video", as the official sampler), and their Qwen / CLIP widths equal
  the task's DiT (``in_text_dim`` / ``in_text_dim2``), so a cache of another model is refused;
* latent caches match ``dataset.caching.latent_expect()`` (stage, format version);
* every latent cache has ``latents_image`` when the task is I2V.

Layouts (one sample -> a collated batch of B samples from one bucket, so latents stack without padding):

================  =================  ===================  ==========================================================
key               sample             batch                meaning
================  =================  ===================  ==========================================================
``latents``       (T, h, w, 16)      (B, T, h, w, 16)     clean latents x0, channels last, already VAE-scaled
``latents_image`` (2, h, w, 16)      (B, 2, h, w, 16)     [first, last] frame latents (I2V tasks only)
``text_embeds``   (L_i, D)           (B, L, D)            Qwen states, right-padded to the longest caption
``text_mask``     --                 (B, L) bool          True = real token
``pooled``        (Dc,)              (B, Dc)              CLIP pooled vector
================  =================  ===================  ==========================================================

One copy of the text per sample: the trainer never repeats it per frame (musubi defect #1).

Batching (``BucketBatchSampler``): each dataset's items are grouped by latent shape ``(T, h, w)`` into batches of
that dataset's ``batch_size`` with ``num_repeats`` (``dataset.buckets.make_batches``), the batches of all datasets
are shuffled together with ``random.Random(seed + epoch)``, the list is padded by wrapping around (as many times as
needed, so fewer batches than ranks works too) to a multiple of the world size and rank ``r`` takes batches
``r, r + W, ...``: every rank gets the same number of batches, which DDP and FSDP need (each rank runs the same
number of forwards and backwards).  ``set_epoch(epoch, skip)`` restarts the order and
skips the first ``skip`` batches of this rank (exact mid-epoch resume).  Everything is a pure function of
``(seed, epoch)``: no RNG state is involved.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from dataset.buckets import make_batches
from dataset.cache import (
    CacheError,
    cache_templates,
    list_cache_files,
    read_cache_meta,
    read_cache_shapes,
    read_latent_cache,
    read_text_cache,
    text_cache_path,
)
from dataset.caching import latent_expect, text_expect
from dataset.config import DatasetConfig
from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TaskConfig, prompt_template

__all__ = ["CachedItem", "discover_items", "LatentDataset", "collate", "BucketBatchSampler"]

log = get_logger(__name__)

_TE_SCRIPT = "kandinsky5_cache_text_encoder_outputs.py"
_LATENT_SCRIPT = "kandinsky5_cache_latents.py"


@dataclass(frozen=True)
class CachedItem:
    """One cached training sample (a clip or an image) and the text cache of its media item."""

    latent_path: Path
    text_path: Path
    shape: tuple[int, int, int]  # latent (T, h, w)
    dataset_index: int
    batch_size: int
    num_repeats: int
    item_key: str = ""  # the media item (all clips of one video share it); the validation split hashes it
    template: str = "video"  # prompt template of the text embeddings this clip trains with


# ------------------------------------------------------------------------------------------------------------
# discovery and header checks
# ------------------------------------------------------------------------------------------------------------


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return read_cache_shapes(path)


def _check_text(path: Path, task: TaskConfig, templates: set[str]) -> None:
    meta = read_cache_meta(path, "text", text_expect(task))  # CacheError names the script to re-run
    missing = sorted(templates - set(cache_templates(meta)))
    if missing:
        raise CacheError(
            f"{path}: text cache holds the {', '.join(map(repr, cache_templates(meta)))} prompt template(s) but "
            f"clips of this item need {', '.join(map(repr, missing))} (1-frame clips are conditioned with 'image', "
            f"as at inference); re-run {_TE_SCRIPT} to rebuild it"
        )
    shapes = _tensor_shapes(path)
    widths = (shapes["text_embeds"][-1], shapes["pooled_embed"][-1])
    wanted = (task.dit.in_text_dim, task.dit.in_text_dim2)
    if widths != wanted:
        raise CacheError(
            f"{path}: text cache has Qwen/CLIP widths {widths} but task {task.name} needs {wanted} "
            f"(made with other text encoders?); re-run {_TE_SCRIPT} with the encoders of this task"
        )


def _latent_shape(path: Path, task: TaskConfig) -> tuple[tuple[int, int, int], str]:
    meta = read_cache_meta(path, "latents", latent_expect())
    shapes = _tensor_shapes(path)
    if task.is_i2v and "latents_image" not in shapes:
        raise CacheError(
            f"{path}: latent cache has no latents_image, which I2V task {task.name} needs; "
            f"re-run {_LATENT_SCRIPT} (it stores first/last frame latents)"
        )
    t, h, w, _ = shapes["latents"]
    return (t, h, w), str(meta["item_key"])


def discover_items(config: DatasetConfig, task: TaskConfig) -> list[CachedItem]:
    """Every cached sample of every dataset, header-checked; ``UserError`` on any cache problem."""
    items: list[CachedItem] = []
    try:
        for spec in config.datasets:
            latents = list_cache_files(spec.cache_directory, "latents")
            if not latents:
                raise CacheError(
                    f"{spec.name}: no latent caches in {spec.cache_directory}; run {_LATENT_SCRIPT} "
                    f"--dataset_config {config.path} first"
                )
            found = []
            for path in latents:
                shape, key = _latent_shape(path, task)
                template = prompt_template(4 * (shape[0] - 1) + 1, task)
                found.append(CachedItem(path, text_cache_path(spec.cache_directory, key), shape, spec.index,
                                        spec.batch_size, spec.num_repeats, key, template))  # fmt: skip
            needs: dict[Path, set[str]] = {}
            for item in found:
                needs.setdefault(item.text_path, set()).add(item.template)
            for text, templates in needs.items():
                _check_text(text, task, templates)
            items += found
    except CacheError as exc:
        raise UserError(str(exc)) from None
    return items


# ------------------------------------------------------------------------------------------------------------
# dataset and collate
# ------------------------------------------------------------------------------------------------------------


class LatentDataset(Dataset):
    """``dataset[i]`` reads item i's latent and text caches (tensors only; headers were checked at discovery)."""

    def __init__(self, items: Sequence[CachedItem], with_image: bool):
        self.items = list(items)
        self.with_image = with_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        latent = read_latent_cache(item.latent_path)
        text = read_text_cache(item.text_path, template=item.template)
        sample = {"latents": latent.latents, "text_embeds": text.embeds, "pooled": text.pooled}
        if self.with_image:
            sample["latents_image"] = latent.latents_image
        return sample


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack one bucket's samples; right-pad the captions to the longest and return the mask."""
    width = max(s["text_embeds"].shape[0] for s in samples)
    first = samples[0]["text_embeds"]
    embeds = first.new_zeros((len(samples), width, first.shape[-1]))
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for row, s in enumerate(samples):
        length = s["text_embeds"].shape[0]
        embeds[row, :length] = s["text_embeds"]
        mask[row, :length] = True
    batch = {
        "latents": torch.stack([s["latents"] for s in samples]),
        "text_embeds": embeds,
        "text_mask": mask,
        "pooled": torch.stack([s["pooled"] for s in samples]),
    }
    if "latents_image" in samples[0]:
        batch["latents_image"] = torch.stack([s["latents_image"] for s in samples])
    return batch


# ------------------------------------------------------------------------------------------------------------
# bucketed, sharded, resumable batch order
# ------------------------------------------------------------------------------------------------------------


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of item indices (one same-shape batch each) for this rank; see the module docstring."""

    def __init__(self, items: Sequence[CachedItem], seed: int, rank: int = 0, world_size: int = 1):
        self.items = list(items)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.skip = 0, 0
        count = len(self._shuffled(0))
        if count == 0:
            raise UserError("the dataset config yields no batches (no cached items); check its cache directories")
        if count < world_size and rank == 0:
            log.warning("%d batch(es) per epoch for %d processes: some processes repeat batches in every epoch",
                        count, world_size)  # fmt: skip

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order of ``epoch``; the first ``skip`` batches of this rank are left out (resume)."""
        self.epoch, self.skip = epoch, skip

    def _shuffled(self, epoch: int) -> list[list[int]]:
        batches: list[list[int]] = []
        for index in sorted({it.dataset_index for it in self.items}):
            members = [i for i, it in enumerate(self.items) if it.dataset_index == index]
            first = self.items[members[0]]
            batches += make_batches(
                members,
                key=lambda i: self.items[i].shape,
                batch_size=first.batch_size,
                num_repeats=first.num_repeats,
                seed=self.seed + epoch,
            )
        random.Random(self.seed + epoch).shuffle(batches)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch`` (before sharding), padded by wrapping around (several times when there
        are fewer batches than ranks) to a multiple of the world size."""
        batches = self._shuffled(epoch)
        pad = -len(batches) % self.world_size
        return batches + [batches[i % len(batches)] for i in range(pad)]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.epoch_batches(self.epoch)[self.rank :: self.world_size]
        return iter(mine[self.skip :])

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the same for every epoch)."""
        return len(self.epoch_batches(0)) // self.world_size

    def __len__(self) -> int:
        """Batches left in the current epoch for this rank."""
        return self.batches_per_epoch - self.skip
