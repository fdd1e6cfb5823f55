"""Are the caches still what the current dataset TOML (and ``--vae``) would make?  Checked by the trainer at
start-up, before the DiT loads, on headers only (``find_stale``).

Per latent cache (what ``kandinsky5_cache_latents.py`` recorded in it):

* its item is still in the dataset (when the media can be listed);
* ``bucket_size`` is the bucket the TOML's ``resolution`` / ``enable_bucket`` / ``bucket_no_upscale`` give for
  the recorded ``source_size``;
* videos: the frame count is one of ``target_frames`` (not for ``frame_extraction = "full"``) and, when the cache
  records ``source_frames``, its frame window is one the current ``frame_extraction`` / ``frame_stride`` /
  ``frame_sample`` / ``max_frames`` / ``source_fps`` cut from the video;
* with ``--vae``: the VAE identity (the digest part of ``vae``) equals that of the given file.

Per text cache: the recorded ``caption`` equals the current caption file / JSONL caption.  (Template, text length
and task family are checked by ``dataset.latent_dataset.discover_items``.)

Each problem is one sentence naming the cache file, what changed, and the caching script to re-run.  Items of the
dataset that have no cache at all (new media, or media the cacher could not read) and clips the frame settings now
cut that are not cached (a new ``target_frames`` value; also windows past a video's last decodable frame, which
are never cached) are reported as notes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dataset.buckets import select_bucket
from dataset.cache import read_cache_meta
from dataset.config import DatasetConfig, DatasetSpec
from dataset.latent_dataset import CachedItem
from dataset.media import frame_windows, resample_indices
from dataset.sources import Item, iter_items
from kandinsky5.common import UserError, get_logger

__all__ = ["LATENT_SCRIPT", "TEXT_SCRIPT", "Staleness", "find_stale", "check_stale", "vae_digest"]

log = get_logger(__name__)

LATENT_SCRIPT = "kandinsky5_cache_latents.py"
TEXT_SCRIPT = "kandinsky5_cache_text_encoder_outputs.py"


class Staleness:
    """Problems (cache differs from the settings) and notes (could not check / not cached), per caching script."""

    def __init__(self) -> None:
        self.problems: dict[str, list[str]] = {LATENT_SCRIPT: [], TEXT_SCRIPT: []}
        self.notes: list[str] = []

    def add(self, script: str, problem: str) -> None:
        self.problems[script].append(problem)

    def __bool__(self) -> bool:
        return any(self.problems.values())

    def message(self, dataset_config: Path | None) -> str:
        """One line: the first problem, how many more, and the command(s) to re-run."""
        scripts = [s for s, found in self.problems.items() if found]
        first = next(found[0] for found in self.problems.values() if found)
        more = sum(map(len, self.problems.values())) - 1
        rerun = " and ".join(f"{s} --dataset_config {dataset_config}" for s in scripts)
        extra = f" (and {more} more stale cache(s))" if more else ""
        return f"stale cache: {first}{extra}; re-run {rerun}, or pass --allow_stale_cache to train on them as they are"


def vae_digest(identity: str) -> str:
    """The content part of a VAE identity ``"<file name>:<12 hex>"`` (the file name may differ between copies)."""
    return identity.rsplit(":", 1)[-1]


def find_stale(config: DatasetConfig, items: Sequence[CachedItem], vae_identity: str | None = None) -> Staleness:
    """Compare every cached item with the dataset TOML (and the VAE identity when given); see the module doc."""
    result = Staleness()
    for spec in config.datasets:
        mine = [it for it in items if it.dataset_index == spec.index]
        media = _media(spec, result)
        _check_latents(spec, mine, media, vae_identity, result)
        _check_captions(spec, mine, media, result)
    return result


def check_stale(
    config: DatasetConfig, items: Sequence[CachedItem], vae_identity: str | None = None, allow: bool = False
) -> None:
    """``find_stale``; problems are one ``UserError`` line, or one warning with ``allow`` (--allow_stale_cache)."""
    result = find_stale(config, items, vae_identity)
    for note in result.notes:
        log.warning("%s", note)
    if not result:
        return
    if not allow:
        raise UserError(result.message(config.path))
    log.warning("--allow_stale_cache: training on them anyway: %s", result.message(config.path))


def _media(spec: DatasetSpec, result: Staleness) -> dict[str, Item] | None:
    try:
        return {item.key: item for item in iter_items(spec)}
    except UserError as exc:
        result.notes.append(f"{spec.name}: media not readable ({exc}); captions and item list of its caches unchecked")
        return None


def _check_latents(
    spec: DatasetSpec, items: list[CachedItem], media: dict[str, Item] | None, vae: str | None, result: Staleness
) -> None:
    cached_keys, windows = set(), {}
    for item in items:
        meta = read_cache_meta(item.latent_path, "latents")
        cached_keys.add(item.item_key)
        problem = _latent_problem(spec, meta, media, vae)
        if problem:
            result.add(LATENT_SCRIPT, f"{item.latent_path.name} {problem}")
        if spec.kind == "video" and meta.get("source_frames") is not None:
            cached = windows.setdefault(item.item_key, (int(meta["source_frames"]), set()))[1]
            cached.add(tuple(meta["frame_indices"]))
    missing = sum(len(_windows(spec, n) - cached) for n, cached in windows.values())
    if missing:  # a note, not an error: windows past a video's last decodable frame are never cached
        result.notes.append(
            f"{spec.name}: the frame settings cut {missing} clip(s) that are not cached (new target_frames or "
            f"extraction settings?); run {LATENT_SCRIPT} --skip_existing to add them"
        )
    if media is not None:
        uncached = sorted(set(media) - cached_keys)
        if uncached:
            result.notes.append(
                f"{spec.name}: {len(uncached)} item(s) have no latent cache and are not trained on "
                f"(e.g. {uncached[0]}; new media, or media {LATENT_SCRIPT} could not read)"
            )


def _latent_problem(spec: DatasetSpec, meta: dict[str, Any], media: dict[str, Item] | None, vae: str | None) -> str:
    key = meta.get("item_key")
    if media is not None and key not in media:
        return f"belongs to {key!r}, which is no longer in {spec.name}"
    source, bucket = tuple(meta["source_size"]), list(meta["bucket_size"])
    wanted = list(select_bucket(source, spec.resolution, enable_bucket=spec.enable_bucket,
                                no_upscale=spec.bucket_no_upscale))  # fmt: skip
    if bucket != wanted:
        return (
            f"was cached at {bucket[0]}x{bucket[1]} but the TOML's resolution / enable_bucket / bucket_no_upscale "
            f"now give {wanted[0]}x{wanted[1]}"
        )
    if spec.kind == "video":
        problem = _frames_problem(spec, list(meta["frame_indices"]), meta.get("source_frames"))
        if problem:
            return problem
    if vae is not None and vae_digest(str(meta.get("vae", ""))) != vae_digest(vae):
        return f"was encoded with VAE {meta.get('vae')}, not the --vae given ({vae})"
    return ""


def _frames_problem(spec: DatasetSpec, frames: list[int], source_frames: int | None) -> str:
    if spec.frame_extraction != "full" and len(frames) not in spec.target_frames:
        return f"has {len(frames)} frames but target_frames is now {list(spec.target_frames)}"
    if source_frames is None:
        return ""
    if tuple(frames) not in _windows(spec, int(source_frames)):
        return (
            f"holds frames {frames[0]}-{frames[-1]}, a clip the current frame settings (frame_extraction "
            f"{spec.frame_extraction!r}, frame_stride, frame_sample, max_frames, source_fps) no longer cut"
        )
    return ""


def _check_captions(
    spec: DatasetSpec, items: list[CachedItem], media: dict[str, Item] | None, result: Staleness
) -> None:
    if media is None:
        return
    for text in dict.fromkeys(item.text_path for item in items):
        meta = read_cache_meta(text, "text")
        item = media.get(str(meta.get("item_key")))
        if item is not None and meta.get("caption") is not None and meta["caption"] != item.caption:
            result.add(TEXT_SCRIPT, f"{text.name}: the caption changed (cache {_short(meta['caption'])}, now "
                                    f"{_short(item.caption)})")  # fmt: skip


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _windows(spec: DatasetSpec, source_frames: int) -> set[tuple[int, ...]]:
    """The frame windows (24 fps timeline) the current settings cut from a video of ``source_frames`` frames."""
    timeline = len(resample_indices(source_frames, spec.source_fps))
    cut = frame_windows(timeline, spec.target_frames, spec.frame_extraction, spec.frame_stride, spec.frame_sample,
                        spec.max_frames)  # fmt: skip
    return {tuple(w) for w in cut}
