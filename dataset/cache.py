"""Self-describing latent and text-encoder caches, shared by the two caching scripts and the trainer.

Files (one safetensors each, written atomically: temp file then rename, so a reader never sees half a file)::

    <cache_dir>/<item_key>_<W:04d>x<H:04d>_k5.safetensors                       image latent
    <cache_dir>/<item_key>_<start:05d>-<frames:03d>_<W:04d>x<H:04d>_k5.safetensors   video clip latent
    <cache_dir>/<item_key>_k5_te.safetensors                                    text encoder outputs

``W x H`` is the *source* media size (as musubi) so re-caching with other bucket settings overwrites the same file;
the bucket used is in the metadata.  ``start`` / ``frames`` are on the 24 fps timeline.

Tensors (no batch axis, channels last as the DiT takes them):

* latent cache: ``latents`` (T, h, w, 16), already multiplied by the VAE scaling factor, T = (frames - 1) // 4 + 1;
  optional ``latents_image`` (2, h, w, 16) = [first, last] latent frame for I2V conditioning.
* text cache: ``text_embeds`` (L, D) packed Qwen2.5-VL hidden states of the L valid tokens (L varies per caption,
  so a collate function must pad; D = 3584), ``pooled_embed`` (Dc,) CLIP pooled (Dc = 768), both made with the
  prompt template named in ``template``.  An item that yields both 1-frame and longer clips (a video dataset with
  ``target_frames = [1, 25]``) needs two templates (one frame: "image", as the official sampler): the further ones
  are stored as ``text_embeds_<template>`` / ``pooled_embed_<template>`` and all are listed in ``templates``.

Metadata (safetensors ``__metadata__``, all strings; lists, numbers and booleans JSON-encoded and named in the
``json_keys`` entry, so ``read_*`` gives them back typed):

* both: ``format_version``, ``stage`` ("latents" / "text"), ``item_key``;
* latents: ``vae`` (identity string), ``dtype`` (filled in from the tensor), ``source_size`` [W, H],
  ``bucket_size`` [W, H], ``frame_indices`` [...], ``nabla_resize`` (bool);
* text: ``template`` ("video" / "image": the template of ``text_embeds``), ``templates`` (list, every template in
  the file; absent in older caches = ``[template]``), ``max_length`` (int), ``text_encoder`` (identity string),
  ``task_family`` ("video" / "image": videos use the video template), ``caption`` (so an edited caption is seen).

``read_*_cache(path, expect)`` and ``is_valid_cache(path, expect)`` compare every key in ``expect`` with the
metadata; a mismatch or a damaged file raises ``CacheError`` that names the script to re-run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kandinsky5.common import UserError
from kandinsky5.files import WriteError, load_safetensors, read_safetensors_header, save_safetensors

__all__ = [
    "FORMAT_VERSION",
    "LATENT_SUFFIX",
    "TEXT_SUFFIX",
    "CacheError",
    "LatentCache",
    "TextCache",
    "latent_cache_path",
    "text_cache_path",
    "list_cache_files",
    "write_latent_cache",
    "write_text_cache",
    "read_latent_cache",
    "read_text_cache",
    "cache_templates",
    "read_cache_meta",
    "read_cache_shapes",
    "is_valid_cache",
]

FORMAT_VERSION = "1"
ARCH_TAG = "k5"
LATENT_SUFFIX = f"_{ARCH_TAG}.safetensors"
TEXT_SUFFIX = f"_{ARCH_TAG}_te.safetensors"
LATENT_CHANNELS = 16

_SCRIPTS = {"latents": "kandinsky5_cache_latents.py", "text": "kandinsky5_cache_text_encoder_outputs.py"}
_TENSORS = {"latents": ("latents",), "text": ("text_embeds", "pooled_embed")}
_REQUIRED_META = {
    "latents": ("vae", "source_size", "bucket_size", "frame_indices", "item_key", "nabla_resize"),
    "text": ("template", "max_length", "text_encoder", "task_family", "item_key"),
}
_JSON_KEYS = "json_keys"  # metadata entry listing the keys whose values are JSON-encoded (all non-strings)


class CacheError(UserError):
    """A cache file that is missing, damaged or made with other settings; the message says what to re-run (a
    ``UserError``: the scripts print it as one line, also when a DataLoader worker raised it)."""


@dataclass(frozen=True)
class LatentCache:
    latents: torch.Tensor  # (T, h, w, 16)
    latents_image: torch.Tensor | None  # (2, h, w, 16) first/last latent frame, or None
    meta: dict[str, Any]


@dataclass(frozen=True)
class TextCache:
    embeds: torch.Tensor  # (L, D)
    pooled: torch.Tensor  # (Dc,)
    meta: dict[str, Any]


# ------------------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------------------


def latent_cache_path(
    cache_dir: str | Path,
    item_key: str,
    source_size: tuple[int, int],
    start: int | None = None,
    num_frames: int | None = None,
) -> Path:
    """Latent cache path; ``start=None`` gives the image form (no frame part)."""
    width, height = source_size
    frames = "" if start is None else f"_{start:05d}-{num_frames:03d}"
    return Path(cache_dir) / f"{item_key}{frames}_{width:04d}x{height:04d}{LATENT_SUFFIX}"


def text_cache_path(cache_dir: str | Path, item_key: str) -> Path:
    return Path(cache_dir) / f"{item_key}{TEXT_SUFFIX}"


def list_cache_files(cache_dir: str | Path, stage: str) -> list[Path]:
    """Existing cache files of one stage ("latents" / "text") in ``cache_dir``, sorted (for stale-file cleanup)."""
    suffix = LATENT_SUFFIX if stage == "latents" else TEXT_SUFFIX
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return sorted(p for p in cache_dir.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------


def write_latent_cache(
    path: str | Path, latents: torch.Tensor, latents_image: torch.Tensor | None, meta: Mapping[str, Any]
) -> None:
    """Write a latent cache.  ``latents`` (T, h, w, 16); ``latents_image`` (2, h, w, 16) or None."""
    _check_latents(latents, latents_image)
    tensors = {"latents": latents}
    if latents_image is not None:
        tensors["latents_image"] = latents_image
    _write(path, tensors, {**meta, "dtype": _dtype_name(latents.dtype)}, "latents")


def write_text_cache(
    path: str | Path,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    meta: Mapping[str, Any],
    extra: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Write a text-encoder cache.  ``embeds`` (L, D) valid tokens only; ``pooled`` (Dc,), made with
    ``meta["template"]``; ``extra`` maps further templates to their (embeds, pooled)."""
    tensors = {}
    for template, (emb, pool) in {meta.get("template"): (embeds, pooled), **(extra or {})}.items():
        if emb.ndim != 2 or emb.shape[0] < 1 or pool.ndim != 1:
            shapes = f"{tuple(emb.shape)}, {tuple(pool.shape)}"
            raise ValueError(f"text cache wants embeds (L, D) and pooled (Dc,), got {shapes}")
        _check_finite("text_embeds", emb)
        names = _text_tensor_names(template, primary=not tensors)
        tensors.update({names[0]: emb, names[1]: pool})
    _write(path, tensors, {**meta, "templates": [meta.get("template"), *(extra or {})]}, "text")


def _text_tensor_names(template: str | None, primary: bool) -> tuple[str, str]:
    return ("text_embeds", "pooled_embed") if primary else (f"text_embeds_{template}", f"pooled_embed_{template}")


def cache_templates(meta: Mapping[str, Any]) -> list[str]:
    """Every prompt template a text cache holds (older caches: just ``template``)."""
    return list(meta.get("templates") or [meta.get("template")])


def _check_latents(latents: torch.Tensor, latents_image: torch.Tensor | None) -> None:
    if latents.ndim != 4 or latents.shape[-1] != LATENT_CHANNELS:
        raise ValueError(f"latents must be (T, h, w, {LATENT_CHANNELS}) channels-last, got {tuple(latents.shape)}")
    if latents_image is not None and (latents_image.shape[0] != 2 or latents_image.shape[1:] != latents.shape[1:]):
        raise ValueError(f"latents_image must be (2, h, w, 16) like latents, got {tuple(latents_image.shape)}")
    _check_finite("latents", latents)


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contain NaN or Inf (VAE/encoder overflow?); refusing to cache them")


def _write(path: str | Path, tensors: dict[str, torch.Tensor], meta: Mapping[str, Any], stage: str) -> None:
    missing = [k for k in _REQUIRED_META[stage] if k not in meta]
    if missing:
        raise ValueError(f"{stage} cache metadata lacks {', '.join(missing)}")
    full = {**meta, "format_version": FORMAT_VERSION, "stage": stage}
    encoded = {k: v if isinstance(v, str) else json.dumps(_normalise(v)) for k, v in full.items()}
    encoded[_JSON_KEYS] = json.dumps(sorted(k for k, v in full.items() if not isinstance(v, str)))
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    try:
        save_safetensors(tensors, path, encoded, what=f"{stage} cache")
    except WriteError as exc:  # disk full, read-only ...: one line; every cache written so far stays valid
        hint = f"free space, then re-run {_SCRIPTS[stage]} with --skip_existing to keep what is already cached"
        raise WriteError(f"{exc}; {hint}", exc.reason) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------------------
# Reading and validation
# ------------------------------------------------------------------------------------------------------------


def read_latent_cache(path: str | Path, expect: Mapping[str, Any] | None = None) -> LatentCache:
    tensors, meta = _read(path, "latents", expect or {})
    return LatentCache(tensors["latents"], tensors.get("latents_image"), meta)


def read_text_cache(
    path: str | Path, expect: Mapping[str, Any] | None = None, template: str | None = None
) -> TextCache:
    """The text cache's embeddings for ``template`` (default: the file's main template)."""
    tensors, meta = _read(path, "text", expect or {})
    templates = cache_templates(meta)
    if template is not None and template not in templates:
        raise CacheError(
            f"{path}: text cache holds the {', '.join(map(repr, templates))} prompt template(s) but a clip of this "
            f"item needs {template!r} (1-frame clips use 'image'); re-run {_SCRIPTS['text']} to rebuild it"
        )
    names = _text_tensor_names(template, primary=template in (None, templates[0]))
    return TextCache(tensors[names[0]], tensors[names[1]], meta)


def read_cache_meta(path: str | Path, stage: str, expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Metadata only (no tensor data is read); checks the stage, the tensor names and ``expect``."""
    meta, _ = _open_header(Path(path), stage)
    _check_expect(Path(path), stage, meta, expect or {})
    return meta


def is_valid_cache(path: str | Path, expect: Mapping[str, Any]) -> bool:
    """True when ``path`` exists, is readable and matches ``expect`` (for ``--skip_existing``).

    The stage comes from ``expect["stage"]`` if given, else from the file name suffix.
    """
    path = Path(path)
    stage = expect.get("stage") or ("text" if path.name.endswith(TEXT_SUFFIX) else "latents")
    try:
        read_cache_meta(path, stage, expect)
    except CacheError:
        return False
    return True


def _read(path: str | Path, stage: str, expect: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    meta, _ = _open_header(path, stage)
    _check_expect(path, stage, meta, expect)
    try:
        tensors, _ = load_safetensors(path)
    except UserError as e:
        raise _damaged(path, stage, e) from None
    return tensors, meta


def read_cache_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a cache file (header only; ``CacheError`` if damaged)."""
    try:
        return read_safetensors_header(path).shapes()
    except UserError as e:
        raise _damaged(Path(path), "latents" if not str(path).endswith(TEXT_SUFFIX) else "text", e) from None


def _open_header(path: Path, stage: str) -> tuple[dict[str, Any], list[str]]:
    if not path.is_file():
        raise CacheError(f"{path}: {stage} cache not found; run {_SCRIPTS[stage]} first")
    try:
        header = read_safetensors_header(path)
        raw, keys = dict(header.metadata), list(header.tensors)
        json_keys = set(json.loads(raw.pop(_JSON_KEYS, "[]")))
        meta = {k: json.loads(v) if k in json_keys else v for k, v in raw.items()}
    except (UserError, ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise _damaged(path, stage, e) from None
    if meta.get("stage") != stage or any(k not in keys for k in _TENSORS[stage]):
        found = meta.get("stage", "no stage")
        raise CacheError(
            f"{path}: not a {stage} cache (stage {found!r}, tensors {keys}); re-run {_SCRIPTS[stage]} to rebuild it"
        )
    return meta, keys


def _damaged(path: Path, stage: str, error: Exception) -> CacheError:
    detail = str(error).replace(f"{path} ", "").replace(str(path), "the file")
    return CacheError(f"{path}: damaged or truncated {stage} cache ({detail}); re-run {_SCRIPTS[stage]} to rebuild it")


def _check_expect(path: Path, stage: str, meta: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    for key, wanted in expect.items():
        found = meta.get(key, "<missing>")
        if _normalise(found) != _normalise(wanted):
            raise CacheError(
                f"{path}: {stage} cache has {key}={found!r} but the current settings need {key}={wanted!r}; "
                f"re-run {_SCRIPTS[stage]} to rebuild it (--skip_existing keeps only caches that match)"
            )


def _normalise(value: Any) -> Any:
    """JSON form of a metadata value, so (512, 512) == [512, 512] and torch.bfloat16 == "bfloat16"."""
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    return value if isinstance(value, str) else json.loads(json.dumps(value))
