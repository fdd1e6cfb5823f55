"""Dataset TOML (or JSON) configuration: musubi-tuner's ``[general]`` + ``[[datasets]]`` format, strictly validated.

A musubi-tuner dataset config works here unchanged; see ``docs/dataset_config.md`` for every key.  Values are
resolved per dataset as *dataset table -> [general] -> built-in default*.  Problems raise ``UserError`` with one
line naming the file, the place (``general`` or ``datasets[1]``), the key and the valid values.

Public API of the ``dataset`` package (what the caching scripts and the trainer use)
------------------------------------------------------------------------------------
Configuration (this module)::

    cfg = load_dataset_config("dataset.toml")       # -> DatasetConfig (frozen)
    for spec in cfg.datasets:                        # DatasetSpec: one [[datasets]] entry, fully resolved
        spec.kind, spec.cache_directory, spec.resolution, spec.target_frames, ...

Items and media (``dataset.sources``, ``dataset.media``)::

    items = iter_items(spec)                         # list[Item]: key, path, caption, kind, dataset_index
    plans = plan_clips(item, spec)                   # list[ClipPlan]: cheap (header probe only, no decode)
    clips = load_clips(item, spec, plans)            # list[Clip]: plan + frames (F, 3, H, W) float32 in [-1, 1]
    frames = nabla_resize(clip.frames)               # optional, for --nabla_resize (sides up to multiples of 128)

Caches (``dataset.cache``)::

    path = latent_cache_path(spec.cache_directory, item.key, plan.source_size, plan.start, plan.num_frames)
    if not is_valid_cache(path, expect):             # --skip_existing: keep only files that match the settings
        write_latent_cache(path, latents_thwc, latents_image_2hwc, meta)
    text_cache_path(spec.cache_directory, item.key)  # one text cache per item, shared by all its clips
    read_latent_cache(path, expect) / read_text_cache(path, expect)   # CacheError says which stage to re-run
    list_cache_files(spec.cache_directory, "latents")  # trainer: pair with text_cache_path(dir, meta["item_key"])

The metadata each writer requires is listed in ``dataset.cache``'s docstring; ``MediaError`` (unreadable media)
comes from ``plan_clips`` or the first ``next()`` of ``load_clips`` and means "report and skip this item".

Buckets and batches (``dataset.buckets``)::

    select_bucket((w, h), spec.resolution, enable_bucket=..., no_upscale=...)   # -> (W, H), multiples of 16
    make_batches(entries, key=lambda e: e.bucket_key, batch_size=spec.batch_size,
                 num_repeats=spec.num_repeats, seed=seed + epoch)              # -> list of per-bucket batches

Decisions where musubi is silent or wrong (all documented in docs/dataset_config.md):

* ``target_frames`` values that are not 4k+1 are rounded *down* to 4k+1 with a warning (as musubi); 0 or less is
  an error.  The list is de-duplicated and sorted.
* Video frame keys (``target_frames``, ``frame_extraction``, ...) may also be given in ``[general]`` as defaults
  for the video datasets (musubi rejects them there); in an image dataset table they are an error.
* ``enable_bucket`` is honoured for video datasets too (musubi always buckets videos); a video dataset that does not
  set it (nor ``[general]``) gets a warning saying so, once per dataset each time the config is read.
* ``cache_directory`` defaults to the media directory; it is required for JSONL datasets; two datasets that
  resolve to the same directory are an error.
* Control images (``control_directory``, ``multiple_target = true``) are rejected; FramePack-only and
  control-resize keys are accepted and ignored with a warning, so musubi configs still load.
* Relative paths are relative to the current working directory (as musubi), not to the config file.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kandinsky5.common import UserError, get_logger

try:
    import tomllib as _toml_reader
except ImportError:  # Python 3.10: fall back to the `toml` package from requirements.txt
    _toml_reader = None
    import toml as _toml_package

__all__ = [
    "DatasetConfig",
    "DatasetSpec",
    "load_dataset_config",
    "parse_dataset_config",
    "round_to_4k1",
    "FRAME_EXTRACTION_MODES",
    "DEFAULTS",
]

log = get_logger(__name__)

FRAME_EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")
MEDIA_KEYS = ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file")
COMMON_KEYS = ("resolution", "caption_extension", "batch_size", "num_repeats", "enable_bucket", "bucket_no_upscale")
VIDEO_KEYS = ("target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames", "source_fps")
GENERAL_KEYS = COMMON_KEYS + VIDEO_KEYS
DATASET_KEYS = MEDIA_KEYS + ("cache_directory", "is_validation") + GENERAL_KEYS
# musubi keys that mean nothing for Kandinsky 5 (FramePack, control resizing): accepted, warned about, ignored.
IGNORED_KEYS = (
    "fp_latent_window_size",
    "fp_1f_clean_indices",
    "fp_1f_target_index",
    "fp_1f_no_post",
    "no_resize_control",
    "control_resolution",
    "flux_kontext_no_resize_control",
    "qwen_image_edit_no_resize_control",
    "qwen_image_edit_control_resolution",
    "multiple_target",  # false is harmless; true is rejected in _reject_unsupported
)

DEFAULTS: dict[str, Any] = {
    "resolution": (960, 544),
    "caption_extension": None,
    "batch_size": 1,
    "num_repeats": 1,
    "enable_bucket": False,
    "bucket_no_upscale": False,
    "target_frames": (1,),
    "frame_extraction": "head",
    "frame_stride": 1,
    "frame_sample": 1,
    "max_frames": 129,
    "source_fps": None,
}


@dataclass(frozen=True)
class DatasetSpec:
    """One ``[[datasets]]`` entry with every value resolved.  Sizes are (width, height); frames are pixel frames."""

    index: int  # position in [[datasets]], used in messages as datasets[index]
    kind: str  # "image" | "video"
    directory: Path | None  # image_directory / video_directory
    jsonl_file: Path | None  # image_jsonl_file / video_jsonl_file
    cache_directory: Path
    caption_extension: str | None
    resolution: tuple[int, int]
    batch_size: int
    num_repeats: int
    enable_bucket: bool
    bucket_no_upscale: bool
    target_frames: tuple[int, ...] = (1,)  # video only; each 4k+1, sorted, unique
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None
    is_validation: bool = False  # held out: cached like the others, never trained on, used for the validation loss

    @property
    def name(self) -> str:
        return f"datasets[{self.index}]"

    @property
    def media_key(self) -> str:
        """The TOML key that names this dataset's media, e.g. ``video_jsonl_file`` (for messages)."""
        return f"{self.kind}_{'directory' if self.directory is not None else 'jsonl_file'}"


@dataclass(frozen=True)
class DatasetConfig:
    """A whole dataset config file."""

    path: Path | None
    datasets: tuple[DatasetSpec, ...]

    @property
    def image_datasets(self) -> tuple[DatasetSpec, ...]:
        return tuple(d for d in self.datasets if d.kind == "image")

    @property
    def video_datasets(self) -> tuple[DatasetSpec, ...]:
        return tuple(d for d in self.datasets if d.kind == "video")


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def load_dataset_config(path: str | Path) -> DatasetConfig:
    """Read and validate a ``.toml`` (or musubi-style ``.json``) dataset config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset config {path} not found (--dataset_config)")
    data = _read_file(path)
    try:
        return parse_dataset_config(data, path=path)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _read_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(f"dataset config {path} must end in .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            return json.loads(text)
        return _toml_reader.loads(text) if _toml_reader else _toml_package.loads(text)
    except (ValueError, TypeError) as e:  # TOML/JSON decode errors and UnicodeDecodeError are ValueErrors
        raise UserError(f"dataset config {path} is not valid {suffix[1:].upper()}: {e}") from None


def parse_dataset_config(data: Mapping[str, Any], path: Path | None = None) -> DatasetConfig:
    """Validate an already-parsed config (the dict a TOML file gives)."""
    if not isinstance(data, Mapping):
        raise UserError("the dataset config must be a table with [general] and [[datasets]]")
    _check_keys(data, ("general", "datasets"), "top level")
    general = data.get("general", {})
    tables = data.get("datasets")
    if not isinstance(general, Mapping):
        raise UserError("general: must be a table ([general])")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, Mapping) for t in tables):
        raise UserError("datasets: needs at least one [[datasets]] table")
    defaults = _parse_general(general)
    specs = tuple(_parse_dataset(i, table, defaults) for i, table in enumerate(tables))
    _check_unique_cache_dirs(specs)
    return DatasetConfig(path=path, datasets=specs)


def _parse_general(general: Mapping[str, Any]) -> dict[str, Any]:
    _reject_unsupported(general, "general")
    misplaced = [k for k in ("cache_directory",) + MEDIA_KEYS if k in general]
    if misplaced:
        raise UserError(f"general.{misplaced[0]}: not allowed in [general]; set it in each [[datasets]] table")
    _check_keys(general, GENERAL_KEYS + IGNORED_KEYS, "general")
    return {k: _parse_value(k, v, "general") for k, v in general.items() if k in GENERAL_KEYS}


def _parse_dataset(index: int, table: Mapping[str, Any], defaults: Mapping[str, Any]) -> DatasetSpec:
    where = f"datasets[{index}]"
    _reject_unsupported(table, where)
    _check_keys(table, DATASET_KEYS + IGNORED_KEYS, where)
    media_key = _media_key(table, where)
    kind = media_key.split("_")[0]
    if kind == "image":
        bad = [k for k in VIDEO_KEYS if k in table]
        if bad:
            raise UserError(f"{where}.{bad[0]}: only valid for video datasets (this dataset has {media_key})")
    own = {k: _parse_value(k, v, where) for k, v in table.items() if k in GENERAL_KEYS}
    values = {**DEFAULTS, **defaults, **own}
    if kind == "image":
        values.update({k: DEFAULTS[k] for k in VIDEO_KEYS})
    media = _path(table[media_key], f"{where}.{media_key}")
    is_dir = media_key.endswith("_directory")
    cache_dir = _cache_directory(table, where, media_key, media, is_dir)
    spec = DatasetSpec(
        index=index,
        kind=kind,
        directory=media if is_dir else None,
        jsonl_file=None if is_dir else media,
        cache_directory=cache_dir,
        is_validation=_bool(table.get("is_validation", False), f"{where}.is_validation"),
        **values,
    )
    _check_spec(spec, where)
    if kind == "video" and "enable_bucket" not in table and "enable_bucket" not in defaults:
        w, h = spec.resolution
        log.warning(
            "%s: enable_bucket is not set, so every clip is resized and centre-cropped to %dx%d; musubi always "
            "buckets videos: set enable_bucket = true to match it (false silences this)", where, w, h,
        )  # fmt: skip
    return spec


def _media_key(table: Mapping[str, Any], where: str) -> str:
    present = [k for k in MEDIA_KEYS if k in table]
    if len(present) != 1:
        found = f"found {', '.join(present)}" if present else "found none"
        raise UserError(f"{where}: give exactly one of {', '.join(MEDIA_KEYS)} ({found})")
    return present[0]


def _cache_directory(table: Mapping[str, Any], where: str, media_key: str, media: Path, is_dir: bool) -> Path:
    if "cache_directory" in table:
        return _path(table["cache_directory"], f"{where}.cache_directory")
    if not is_dir:
        raise UserError(f"{where}.cache_directory: required for {media_key} datasets (a directory path)")
    return media


def _check_spec(spec: DatasetSpec, where: str) -> None:
    if spec.directory is not None and spec.caption_extension is None:
        raise UserError(f'{where}.caption_extension: required for {spec.media_key} datasets (e.g. ".txt")')
    if not spec.enable_bucket and any(s % 16 for s in spec.resolution):
        w, h = spec.resolution
        raise UserError(
            f"{where}.resolution: {w}x{h} must be multiples of 16 when enable_bucket is false; "
            f"valid: e.g. [{w - w % 16}, {h - h % 16}]"
        )
    if spec.bucket_no_upscale and not spec.enable_bucket:
        log.warning("%s: bucket_no_upscale has no effect without enable_bucket = true", where)
    if spec.kind == "video" and spec.frame_extraction == "chunk" and 1 in spec.target_frames:
        log.warning("%s: frame_extraction 'chunk' with target_frames 1 caches every single frame", where)


def _check_unique_cache_dirs(specs: tuple[DatasetSpec, ...]) -> None:
    seen: dict[Path, int] = {}
    for spec in specs:
        resolved = spec.cache_directory.resolve()
        if resolved in seen:
            raise UserError(
                f"datasets[{spec.index}].cache_directory: {spec.cache_directory} is also the cache directory of "
                f"datasets[{seen[resolved]}]; every dataset needs its own (set cache_directory explicitly)"
            )
        seen[resolved] = spec.index


# ------------------------------------------------------------------------------------------------------------
# Key checks
# ------------------------------------------------------------------------------------------------------------


def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        valid = ", ".join(k for k in allowed if k not in IGNORED_KEYS)
        raise UserError(f"{where}: unknown key {key!r}{hint}; valid keys: {valid}")
    for key in table:
        if key in IGNORED_KEYS:
            log.warning("%s.%s: musubi-only key (FramePack / control images); ignored for Kandinsky 5", where, key)


def _reject_unsupported(table: Mapping[str, Any], where: str) -> None:
    if "control_directory" in table:
        raise UserError(
            f"{where}.control_directory: control images are not supported for Kandinsky 5 "
            "(musubi ignores them for this model too); remove the key"
        )
    if table.get("multiple_target", False) is not False:
        raise UserError(f"{where}.multiple_target: only false is supported (multiple targets are Qwen-Image only)")


# ------------------------------------------------------------------------------------------------------------
# Value parsers: (value, "where.key") -> normalised value, or UserError
# ------------------------------------------------------------------------------------------------------------


def _fail(at: str, value: Any, valid: str) -> UserError:
    return UserError(f"{at}: invalid value {value!r}; valid: {valid}")


def _int(minimum: int) -> Callable[[Any, str], int]:
    def parse(value: Any, at: str) -> int:
        if type(value) is not int or value < minimum:
            raise _fail(at, value, f"an integer >= {minimum}")
        return value

    return parse


def _bool(value: Any, at: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(at, value, "true or false")
    return value


def _path(value: Any, at: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _fail(at, value, "a non-empty path string")
    return Path(value).expanduser()


def _caption_extension(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(at, value, 'a non-empty string appended to the media file stem, e.g. ".txt"')
    return value


def _resolution(value: Any, at: str) -> tuple[int, int]:
    valid = "an integer >= 16 (square) or [width, height] of integers >= 16"
    if type(value) is int:
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(at, value, valid)
    if any(type(v) is not int or v < 16 for v in value):
        raise _fail(at, value, valid)
    return int(value[0]), int(value[1])


def round_to_4k1(frames: int) -> int:
    """Round a frame count down to the nearest 4k+1 (1, 5, 9, ...): the VAE compresses 4 frames into one."""
    return (frames - 1) // 4 * 4 + 1


def _target_frames(value: Any, at: str) -> tuple[int, ...]:
    values = [value] if type(value) is int else value
    if not isinstance(values, list) or not values or any(type(v) is not int or v < 1 for v in values):
        raise _fail(at, value, "a list of frame counts >= 1, each 4k+1 (1, 5, 9, ..., 121)")
    rounded = sorted({round_to_4k1(v) for v in values})
    changed = [v for v in values if round_to_4k1(v) != v]
    if changed:
        log.warning("%s: %s rounded down to 4k+1 frames: now %s", at, changed, rounded)
    return tuple(rounded)


def _frame_extraction(value: Any, at: str) -> str:
    if value not in FRAME_EXTRACTION_MODES:
        raise _fail(at, value, ", ".join(FRAME_EXTRACTION_MODES))
    return value


def _fps(value: Any, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _fail(at, value, "a frame rate > 0, e.g. 30.0")
    return float(value)


_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "resolution": _resolution,
    "caption_extension": _caption_extension,
    "batch_size": _int(1),
    "num_repeats": _int(1),
    "enable_bucket": _bool,
    "bucket_no_upscale": _bool,
    "target_frames": _target_frames,
    "frame_extraction": _frame_extraction,
    "frame_stride": _int(1),
    "frame_sample": _int(1),
    "max_frames": _int(1),
    "source_fps": _fps,
}


def _parse_value(key: str, value: Any, where: str) -> Any:
    return _PARSERS[key](value, f"{where}.{key}")
