"""Cache the text-encoder outputs (Qwen2.5-VL token states + CLIP pooled vector) of every caption, for training.

    python kandinsky5_cache_text_encoder_outputs.py --dataset_config dataset.toml \\
        --text_encoder_qwen Qwen/Qwen2.5-VL-7B-Instruct --text_encoder_clip openai/clip-vit-large-patch14 \\
        --batch_size 4

One ``<item_key>_k5_te.safetensors`` per item (shared by all clips of a video), written atomically by
``dataset.cache``: ``text_embeds`` (L, D) -- the L <= max_length real Qwen tokens after the template prefix, no
padding -- and ``pooled_embed`` (Dc,), both in the encoder dtype.

Prompt template and max length follow inference exactly: 256 tokens (``--task``, default ``k5-pro-t2v-5s-sd``, so
the command above works without it), the *video* template for clips of more than one frame and the *image*
template for images and 1-frame clips, as the official sampler picks it (``configs.prompt_template``).  An item
whose clips need both (a video dataset with ``target_frames = [1, 25]``) gets both in its one cache file.  (musubi
used the image template and 512 tokens for everything: its defects #2 and #3.)  The metadata records templates, max
length, task family, encoder identity and caption, so the trainer refuses a cache made otherwise
(``dataset/caching.py`` documents the ``expect`` contract).

Captions are encoded in batches of ``--batch_size`` (sorted by length, so little padding is computed); a batch
gives the same rows as one caption at a time (right padding, causal Qwen, per-prompt CLIP).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset.cache import text_cache_path, write_text_cache
from dataset.caching import (
    Throughput,
    check_cache_dirs,
    item_templates,
    needs_build,
    progress_bar,
    remove_stale,
    text_expect,
    text_item_bytes,
)
from dataset.config import DatasetSpec, load_dataset_config
from dataset.sources import Item, iter_items
from kandinsky5.cli import (
    HelpFormatter,
    add_config_file_arg,
    add_debug_arg,
    add_model_args,
    parse_args,
    run_main,
    task_from_args,
)
from kandinsky5.common import UserError, get_logger, parse_dtype, resolve_device
from kandinsky5.configs import TaskConfig
from kandinsky5.model.text_encoders import TextEncoder
from kandinsky5.musubi_compat import add_musubi_args

log = get_logger("kandinsky5_cache_text_encoder_outputs")

DEFAULT_TASK = "k5-pro-t2v-5s-sd"
DTYPE_CHOICES = ("bfloat16", "float16", "float32")


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Encode every caption of a dataset config with Qwen2.5-VL + CLIP into text caches for "
        "kandinsky5_train_network.py.",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--dataset_config", default=None, help="dataset TOML/JSON (docs/dataset_config.md); required")
    add_model_args(parser, dit=False, vae=False, text=True)
    for action in parser._actions:  # the shared --task flag: give it this script's default and say what it sets
        if action.dest == "task":
            action.default = DEFAULT_TASK
            action.help = (
                f"task whose text length and video template are used (default: {DEFAULT_TASK}; every video task "
                f"uses 256 tokens and the video template, 1-frame items the image template as at inference). "
                f"{action.help}"
            )
        elif action.dest in ("text_encoder_qwen", "text_encoder_clip"):
            action.help += "; required"
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="captions per encoder call (default: each dataset's batch_size); lower it if you run out of VRAM",
    )
    parser.add_argument(
        "--qwen_4bit",
        "--quantized_qwen",
        dest="qwen_4bit",
        action="store_true",
        help="load Qwen2.5-VL in 4-bit NF4 (bitsandbytes, CUDA) to save VRAM; slightly different embeddings, "
        "recorded in the metadata",
    )
    parser.add_argument("--device", default=None, help="encode device, e.g. cuda, cuda:1, cpu (default: cuda if any)")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="encoder dtype, also the dtype the embeddings are stored in "
        "(default: bfloat16 on CUDA as the official code, float32 on CPU)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--skip_existing",
        action="store_true",
        help="keep text caches that are complete and match the current settings (template, max length, encoders, "
        "dtype, caption); rebuild only missing, damaged, mismatched or edited ones. Use it to resume",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="re-encode every caption (the default, as in musubi); wins over skip_existing from --config_file",
    )
    parser.add_argument(
        "--keep_cache",
        action="store_true",
        help="do not delete text caches of items no longer in the dataset (default: delete those made by this "
        "tool; foreign files are never deleted)",
    )
    add_config_file_arg(parser)
    add_debug_arg(parser)
    add_musubi_args(parser, "cache_text")
    return parser


@dataclass(frozen=True)
class Settings:
    dataset_config: Path
    qwen: str
    clip: str
    task: TaskConfig
    device: torch.device
    dtype: torch.dtype
    batch_size: int | None
    qwen_4bit: bool
    skip_existing: bool
    keep_cache: bool

    def describe(self) -> str:
        return (
            f"text caching: device {self.device}, dtype {_name(self.dtype)}, template {self.task.text_template!r} "
            f"('image' for 1-frame clips), "
            f"max length {self.task.text_max_length} tokens (task {self.task.name}), Qwen "
            f"{'4-bit NF4' if self.qwen_4bit else 'not quantized'}, batch size {self.batch_size or 'per dataset'}, "
            f"existing caches {'kept when valid' if self.skip_existing else 'rebuilt'}, stale caches "
            f"{'kept' if self.keep_cache else 'removed'}"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def settings_from_args(args: argparse.Namespace) -> Settings:
    for flag in ("dataset_config", "text_encoder_qwen", "text_encoder_clip"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    task = task_from_args(args)
    device = resolve_device(args.device)
    if args.qwen_4bit and device.type != "cuda":
        raise UserError("--qwen_4bit needs a CUDA device (bitsandbytes 4-bit); drop it or use --device cuda")
    if args.skip_existing and args.overwrite:
        log.info("--overwrite given: ignoring skip_existing from --config_file")
    return Settings(
        dataset_config=Path(args.dataset_config),
        qwen=str(args.text_encoder_qwen),
        clip=str(args.text_encoder_clip),
        task=task,
        device=device,
        dtype=parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32")),
        batch_size=args.batch_size,
        qwen_4bit=args.qwen_4bit,
        skip_existing=args.skip_existing and not args.overwrite,
        keep_cache=args.keep_cache,
    )


# ------------------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    item: Item
    path: Path
    templates: tuple[str, ...]  # prompt templates its clips need, main one first (1 frame: "image")


def plan(spec: DatasetSpec, items: list[Item], base_expect: dict, s: Settings) -> list[Job]:
    """Items whose text cache must be (re)built, sorted by caption length (similar lengths share a batch)."""
    jobs = []
    for item in items:
        path = text_cache_path(spec.cache_directory, item.key)
        templates = tuple(item_templates(spec, s.task, item))
        expect = {**base_expect, "item_key": item.key, "caption": item.caption, "templates": list(templates)}
        if needs_build(path, expect, s.skip_existing):
            jobs.append(Job(item, path, templates))
    return sorted(jobs, key=lambda job: len(job.item.caption))


def encode_batch(encoder: TextEncoder, batch: list[Job], s: Settings, base_meta: dict) -> None:
    """Encode a batch of captions with every template they need; write one cache file per item (padding removed)."""
    encoded: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for template in dict.fromkeys(t for job in batch for t in job.templates):
        rows = [i for i, job in enumerate(batch) if template in job.templates]
        try:
            out = encoder.encode([batch[i].item.caption for i in rows], template, s.task.text_max_length)
        except torch.cuda.OutOfMemoryError:
            raise UserError(
                f"out of GPU memory encoding {len(rows)} caption(s); lower --batch_size or add --qwen_4bit, then "
                "re-run with --skip_existing to keep what is already cached"
            ) from None
        for row, i in enumerate(rows):
            embeds, pooled = out.unpadded(row)
            encoded[template, i] = embeds.to(s.dtype), pooled.to(s.dtype)
    for i, job in enumerate(batch):
        main, *rest = job.templates
        meta = {**base_meta, "item_key": job.item.key, "caption": job.item.caption, "template": main}
        write_text_cache(job.path, *encoded[main, i], meta, {t: encoded[t, i] for t in rest})


def main(argv: Sequence[str] | None = None) -> int:
    s = settings_from_args(parse_args(build_parser(), argv))
    config = load_dataset_config(s.dataset_config)
    datasets = [(spec, iter_items(spec)) for spec in config.datasets]  # config / caption errors before loading
    check_cache_dirs(datasets, "text", lambda spec: text_item_bytes(spec, s.task, s.dtype.itemsize))
    encoder = TextEncoder.load(s.qwen, s.clip, s.device, s.dtype, qwen_4bit=s.qwen_4bit)
    log.info("%s; encoders %s", s.describe(), encoder.identity)
    base = {**text_expect(s.task, encoder.identity), "dtype": _name(s.dtype), "qwen_4bit": s.qwen_4bit}
    base_meta = {k: v for k, v in base.items() if k not in ("stage", "format_version")} | {"task": s.task.name}
    stats = Throughput("caption")
    work = [(spec, plan(spec, items, base, s)) for spec, items in datasets]
    stats.skipped = sum(len(items) for _, items in datasets) - sum(len(jobs) for _, jobs in work)
    log.info("%d caption(s) to encode, %d up to date", sum(len(jobs) for _, jobs in work), stats.skipped)
    stats.restart()
    with progress_bar(sum(len(jobs) for _, jobs in work), "encoding captions", "caption") as bar:
        for spec, jobs in work:
            size = s.batch_size or spec.batch_size
            for start in range(0, len(jobs), size):
                batch = jobs[start : start + size]
                encode_batch(encoder, batch, s, base_meta)
                stats.done += len(batch)
                bar.update(len(batch))
    for spec, items in datasets:
        wanted = {text_cache_path(spec.cache_directory, item.key) for item in items}
        remove_stale(spec.cache_directory, "text", wanted, set(), s.keep_cache)
    log.info("text caching done: %s", stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
