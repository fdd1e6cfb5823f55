"""Enumerate the media items of one dataset: directory + caption files, or a JSONL manifest.

An ``Item`` is one media file with its caption.  Its ``key`` names every cache file made from it and is unique
within the dataset:

* directory datasets: the file name *with* its extension (``cat.jpg``), so ``cat.jpg`` and ``cat.png`` no longer
  share a cache file (musubi used the stem and let them collide);
* JSONL datasets: the file name as well; when two lines name different files with the same name (``a/clip.mp4``,
  ``b/clip.mp4``) each of them gets ``-<first 8 hex of sha1(path as written)>`` appended (``clip.mp4-1f0c9a2e``).

Directory datasets are read non-recursively and sorted by file name; extensions match in any case.  The caption
of ``dir/cat.jpg`` is ``dir/cat`` + ``caption_extension`` (``dir/cat.txt``), read as UTF-8 and stripped.  A media
file without its caption file is an error listing the missing files (musubi silently dropped such images).

JSONL lines are ``{"image_path": ..., "caption": ...}`` or ``{"video_path": ..., "caption": ...}``; other keys are
ignored, control keys are rejected, blank lines are skipped.  Paths are used as written (relative to the current
working directory, as in musubi).  No tensors here: decoding lives in ``dataset.media``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import features

from dataset.config import DatasetSpec
from kandinsky5.common import UserError

__all__ = ["Item", "iter_items", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp") + (
    (".avif",) if features.check("avif") else ()
)
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg")
_CONTROL_PREFIXES = ("control_path", "image_path_")
_MAX_LISTED = 5  # files named in one error message


@dataclass(frozen=True)
class Item:
    """One media file of a dataset and its caption."""

    key: str  # unique within the dataset; the prefix of every cache file name made from this item
    path: Path
    caption: str
    kind: str  # "image" | "video" (the dataset's kind)
    dataset_index: int


def iter_items(spec: DatasetSpec) -> list[Item]:
    """All items of a dataset, in a stable order.  Raises ``UserError`` for missing media or captions."""
    items = _directory_items(spec) if spec.directory is not None else _jsonl_items(spec)
    if not items:
        source = spec.directory if spec.directory is not None else spec.jsonl_file
        raise UserError(f"{spec.name}.{spec.media_key}: no {spec.kind}s found in {source}")
    return items


def _extensions(kind: str) -> tuple[str, ...]:
    return IMAGE_EXTENSIONS if kind == "image" else VIDEO_EXTENSIONS


def _listing(paths: Iterable[Path | str]) -> str:
    paths = list(paths)
    shown = ", ".join(str(p) for p in paths[:_MAX_LISTED])
    return shown + (f", ... ({len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else "")


# ------------------------------------------------------------------------------------------------------------
# Directory datasets
# ------------------------------------------------------------------------------------------------------------


def _directory_items(spec: DatasetSpec) -> list[Item]:
    directory = spec.directory
    if not directory.is_dir():
        raise UserError(f"{spec.name}.{spec.media_key}: directory {directory} not found")
    exts = _extensions(spec.kind)
    media = sorted(p for p in directory.iterdir() if p.suffix.lower() in exts and p.is_file())
    captions = {p: p.with_name(p.stem + spec.caption_extension) for p in media}
    missing = [c for c in captions.values() if not c.is_file()]
    if missing:
        raise UserError(
            f"{spec.name}: {len(missing)} {spec.kind}(s) in {directory} have no caption file "
            f"(caption_extension {spec.caption_extension!r}): missing {_listing(missing)}; add them or move the media"
        )
    return [Item(p.name, p, _read_caption(captions[p]), spec.kind, spec.index) for p in media]


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"caption file {path} cannot be read as UTF-8 text: {e}") from None


# ------------------------------------------------------------------------------------------------------------
# JSONL datasets
# ------------------------------------------------------------------------------------------------------------


def _jsonl_items(spec: DatasetSpec) -> list[Item]:
    jsonl = spec.jsonl_file
    if not jsonl.is_file():
        raise UserError(f"{spec.name}.{spec.media_key}: file {jsonl} not found")
    try:
        lines = jsonl.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{spec.name}.{spec.media_key}: {jsonl} cannot be read as UTF-8 text: {e}") from None
    entries = [_parse_line(spec, jsonl, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    _check_jsonl_media(spec, entries)
    keys = _jsonl_keys([path for _, path, _ in entries], spec)
    return [Item(key, path, caption, spec.kind, spec.index) for key, (_, path, caption) in zip(keys, entries)]


def _parse_line(spec: DatasetSpec, jsonl: Path, number: int, line: str) -> tuple[int, Path, str]:
    where = f"{jsonl}:{number}"
    path_key = f"{spec.kind}_path"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(entry, dict):
        raise UserError(f"{where}: each line must be a JSON object with {path_key!r} and 'caption'")
    control = [k for k in entry if k.startswith(_CONTROL_PREFIXES)]
    if control:
        raise UserError(f"{where}: key {control[0]!r} is not supported (no control images for Kandinsky 5)")
    path, caption = entry.get(path_key), entry.get("caption")
    if not isinstance(path, str) or not path:
        raise UserError(f"{where}: missing {path_key!r} (a media file path); valid keys: {path_key}, caption")
    if not isinstance(caption, str):
        raise UserError(f"{where}: missing 'caption' (a string); valid keys: {path_key}, caption")
    return number, Path(path).expanduser(), caption.strip()


def _check_jsonl_media(spec: DatasetSpec, entries: list[tuple[int, Path, str]]) -> None:
    jsonl = spec.jsonl_file
    dirs = [f"line {n}: {p}" for n, p, _ in entries if p.is_dir()]
    if dirs:
        raise UserError(f"{jsonl}: directories of frames are not supported, encode them as video files ({dirs[0]})")
    missing = [f"line {n}: {p}" for n, p, _ in entries if not p.is_file()]
    if missing:
        raise UserError(f"{jsonl}: {len(missing)} media file(s) not found: {_listing(missing)}")
    lines_by_path: dict[Path, list[int]] = {}
    for n, p, _ in entries:
        lines_by_path.setdefault(p.resolve(), []).append(n)
    dupes = [f"{p} (lines {', '.join(map(str, ns))})" for p, ns in lines_by_path.items() if len(ns) > 1]
    if dupes:
        raise UserError(f"{jsonl}: the same media file is listed more than once: {_listing(dupes)}")


def _jsonl_keys(paths: list[Path], spec: DatasetSpec) -> list[str]:
    bad = [p for p in paths if p.suffix.lower() not in _extensions(spec.kind)]
    if bad:
        raise UserError(
            f"{spec.jsonl_file}: {_listing(bad)} is not a {spec.kind} file; valid extensions: "
            f"{', '.join(_extensions(spec.kind))}"
        )
    counts = Counter(p.name.casefold() for p in paths)  # casefold: cache files must not collide on macOS/Windows
    keys = [p.name if counts[p.name.casefold()] == 1 else f"{p.name}-{_short_hash(p)}" for p in paths]
    if len({k.casefold() for k in keys}) != len(keys):  # only on a 32-bit hash collision
        raise UserError(f"{spec.jsonl_file}: cannot make unique cache keys; rename media files with equal names")
    return keys


def _short_hash(path: Path) -> str:
    return hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:8]
