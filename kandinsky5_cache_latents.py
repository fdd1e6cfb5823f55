"""Cache the VAE latents of every image and video clip of a dataset config, for training.

    python kandinsky5_cache_latents.py --dataset_config dataset.toml --vae vae/diffusion_pytorch_model.safetensors
    python kandinsky5_cache_latents.py --dataset_config dataset.toml --vae ... --nabla_resize   # NABLA geometry

For every item (``dataset.sources``) and clip (``dataset.media.plan_clips``) one safetensors file is written
atomically by ``dataset.cache`` (file names and metadata: ``docs/dataset_config.md``, ``dataset/caching.py``):

* ``latents`` (T, h, w, 16): the clip (F = 4k+1 frames, 1 for images) through the HunyuanVideo VAE, posterior
  mode, already multiplied by the scaling factor, stored in the VAE dtype;
* ``latents_image`` (2, h, w, 16): [first, last] frame, each encoded on its own as a 1-frame video -- exactly what
  I2V inference encodes from an image (a clip's own latent frame 0 differs slightly: the VAE's GroupNorms see all
  frames).  For images and 1-frame clips both entries are the clip latent itself (latents == latents_image[0]).

Work is done in three passes: (1) probe every file header in ``--num_workers`` threads and decide what to (re)build,
(2) decode + resize the next items in those threads while the VAE encodes the current batch (clips of one dataset
with the same bucket size and frame count are batched up to ``--batch_size``), (3) remove stale cache files.
Unreadable media is reported and skipped; the run ends with a summary and exit status 2 if anything failed
(1 = bad arguments or config, nothing done).  Caches already written stay valid, so ``--skip_existing`` resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataset.cache import latent_cache_path, write_latent_cache
from dataset.caching import (
    EXIT_FAILURES,
    BucketBatcher,
    Failures,
    Throughput,
    check_cache_dirs,
    latent_expect,
    latent_item_bytes,
    needs_build,
    prefetch_map,
    progress_bar,
    remove_stale,
)
from dataset.config import DatasetSpec, load_dataset_config
from dataset.media import Clip, ClipPlan, MediaError, load_clips, nabla_resize, plan_clips
from dataset.sources import Item, iter_items
from kandinsky5.cli import HelpFormatter, add_config_file_arg, add_debug_arg, parse_args, run_main
from kandinsky5.common import UserError, get_logger, parse_dtype, resolve_device
from kandinsky5.model.vae import SCALING_FACTOR, VideoVAE
from kandinsky5.musubi_compat import add_musubi_args

log = get_logger("kandinsky5_cache_latents")

DEFAULT_TILE = 256  # --vae_tiling without a value: diffusers' spatial tile size in pixels


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Encode every image / video clip of a dataset config with the HunyuanVideo VAE into latent "
        "caches for kandinsky5_train_network.py.",
        epilog=f"Exit status: 0 all cached, 1 bad arguments or config (nothing done), {EXIT_FAILURES} some media "
        "could not be read (listed at the end; everything else was cached).",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--dataset_config", default=None, help="dataset TOML/JSON (docs/dataset_config.md); required")
    parser.add_argument(
        "--vae",
        default=None,
        help="HunyuanVideo VAE: diffusion_pytorch_model.safetensors, its diffusers directory, or pytorch_model.pt; "
        "required",
    )
    parser.add_argument(
        "--nabla_resize",
        action="store_true",
        help="stretch each bucketed clip up to the next multiple of 128 px on both sides before encoding "
        "(NABLA attention needs it); recorded in the metadata",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="max clips per VAE call; clips batch only with the same size and frame count "
        "(default: each dataset's batch_size). Lower it if you run out of VRAM",
    )
    parser.add_argument("--device", default=None, help="encode device, e.g. cuda, cuda:1, cpu (default: cuda if any)")
    parser.add_argument(
        "--vae_dtype",
        default=None,
        help="VAE weights/compute dtype, also the dtype the latents are stored in: float16, bfloat16 or float32 "
        "(fp16, bf16, fp32 too) "
        "(default: float16 on CUDA as musubi and the official code, float32 on CPU where float16 is slow)",
    )
    parser.add_argument(
        "--vae_tiling",
        type=int,
        nargs="?",
        const=DEFAULT_TILE,
        default=0,
        metavar="TILE_PX",
        help=f"encode in overlapping spatial tiles to save VRAM; optional tile size in pixels (default "
        f"{DEFAULT_TILE}, stride 3/4 of it). Off by default",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--skip_existing",
        action="store_true",
        help="keep cache files that are complete and match the current settings (VAE, dtype, bucket, frames, "
        "--nabla_resize); rebuild only missing, damaged or mismatched ones. Use it to resume",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="re-encode everything (the default, as in musubi); wins over skip_existing from --config_file",
    )
    parser.add_argument(
        "--keep_cache",
        action="store_true",
        help="do not delete latent caches of items/clips no longer in the dataset (default: delete those made "
        "by this tool; foreign files are never deleted)",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="threads that probe, decode and resize media ahead of the VAE; 0 = no prefetch "
        "(default: CPU count - 1, at most 8)",
    )
    parser.add_argument(
        "--disable_cudnn_backend",
        action="store_true",
        help="turn off PyTorch's cuDNN backend for the VAE convolutions (a workaround for some AMD/ROCm GPUs)",
    )
    add_config_file_arg(parser)
    add_debug_arg(parser)
    add_musubi_args(parser, "cache_latents")
    return parser


@dataclass(frozen=True)
class Settings:
    dataset_config: Path
    vae: Path
    device: torch.device
    dtype: torch.dtype
    tile: int  # 0 = no spatial tiling
    batch_size: int | None  # None = each dataset's batch_size
    num_workers: int
    nabla_resize: bool
    skip_existing: bool
    keep_cache: bool
    disable_cudnn: bool = False

    def describe(self) -> str:
        tiling = f"{self.tile} px tiles (stride {_tile_stride(self.tile)})" if self.tile else "off"
        return (
            f"latent caching: device {self.device}, VAE dtype {_name(self.dtype)} (latents stored as "
            f"{_name(self.dtype)}), tiling {tiling}, nabla_resize {'on' if self.nabla_resize else 'off'}, "
            f"batch size {self.batch_size or 'per dataset'}, {self.num_workers} decode thread(s), existing caches "
            f"{'kept when valid' if self.skip_existing else 'rebuilt'}, stale caches "
            f"{'kept' if self.keep_cache else 'removed'}"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tile_stride(tile: int) -> int:
    return max(8, tile * 3 // 4 // 8 * 8)


def settings_from_args(args: argparse.Namespace) -> Settings:
    for flag in ("dataset_config", "vae"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.vae_tiling and (args.vae_tiling < 64 or args.vae_tiling % 8):
        raise UserError(f"--vae_tiling {args.vae_tiling}: tile size must be a multiple of 8 and >= 64, e.g. 256")
    if args.skip_existing and args.overwrite:
        log.info("--overwrite given: ignoring skip_existing from --config_file")
    device = resolve_device(args.device)
    try:
        dtype = parse_dtype(args.vae_dtype or ("float16" if device.type == "cuda" else "float32"))
    except UserError as exc:
        raise UserError(f"--vae_dtype: {exc}") from None
    workers = args.num_workers if args.num_workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    return Settings(
        dataset_config=Path(args.dataset_config),
        vae=Path(args.vae),
        device=device,
        dtype=dtype,
        tile=args.vae_tiling or 0,
        batch_size=args.batch_size,
        num_workers=workers,
        nabla_resize=args.nabla_resize,
        skip_existing=args.skip_existing and not args.overwrite,
        keep_cache=args.keep_cache,
        disable_cudnn=args.disable_cudnn_backend,
    )


# ------------------------------------------------------------------------------------------------------------
# pass 1: plan (header probe) and skip decision
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One media item and the clips of it that need (re)building."""

    spec: DatasetSpec
    item: Item
    paths: tuple[Path, ...]  # every cache file the item should have (for stale cleanup)
    todo: tuple[tuple[ClipPlan, Path], ...]  # clips to encode now
    error: str | None = None


def plan_job(spec: DatasetSpec, item: Item, base_expect: dict, skip_existing: bool) -> Job:
    try:
        plans = plan_clips(item, spec)
    except MediaError as exc:
        return Job(spec, item, (), (), exc.reason)
    entries = [
        (p, latent_cache_path(spec.cache_directory, item.key, p.source_size, p.start, p.num_frames)) for p in plans
    ]
    todo = tuple((p, path) for p, path in entries if needs_build(path, _expect(base_expect, item, p), skip_existing))
    return Job(spec, item, tuple(path for _, path in entries), todo)


def _expect(base: dict, item: Item, plan: ClipPlan) -> dict:
    per_clip = {
        "item_key": item.key,
        "source_size": plan.source_size,
        "bucket_size": plan.bucket_size,
        "frame_indices": plan.frame_indices,
    }
    return {**base, **per_clip}


# ------------------------------------------------------------------------------------------------------------
# pass 2: decode ahead, batch, encode, write
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """A decoded clip waiting for its batch."""

    job: Job
    plan: ClipPlan
    path: Path
    pixels: np.ndarray  # (F, H, W, 3) uint8 at the bucket size


def decode_job(job: Job) -> tuple[Job, list[Pending] | None, str | None]:
    """Decode the clips a job needs (runs in a prefetch thread).  Returns (job, clips, error reason)."""
    paths = dict(job.todo)
    try:
        clips: list[Clip] = list(load_clips(job.item, job.spec, [plan for plan, _ in job.todo]))
    except MediaError as exc:
        return job, None, exc.reason
    return job, [Pending(job, c.plan, paths[c.plan], c.pixels) for c in clips], None


def to_video(pixels_bfhwc: torch.Tensor, device: torch.device, nabla: bool) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, 3, F, H', W') float32 in [-1, 1] on ``device`` (H', W' NABLA-resized)."""
    x = pixels_bfhwc.to(device).permute(0, 1, 4, 2, 3).float().div_(127.5).sub_(1.0)  # (B, F, 3, H, W)
    if nabla:
        b, f = x.shape[:2]
        x = nabla_resize(x.flatten(0, 1)).unflatten(0, (b, f))
    return x.permute(0, 2, 1, 3, 4).contiguous()


def first_last_latents(vae: VideoVAE, video: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w, 16): first and last pixel frame, each encoded alone as a 1-frame video."""
    if video.shape[2] == 1:  # images / 1-frame clips: the clip latent *is* the 1-frame encode
        return torch.cat([latents, latents], dim=1)
    b = video.shape[0]
    frames = torch.cat([video[:, :, :1], video[:, :, -1:]], dim=0)  # (2B, 3, 1, H, W)
    z = vae.encode(frames)[:, 0]  # (2B, h, w, 16)
    return torch.stack([z[:b], z[b:]], dim=1)


def encode_batch(vae: VideoVAE, batch: list[Pending], s: Settings, failures: Failures) -> int:
    """Encode one same-shape batch and write one cache file per clip; returns the number written."""
    pixels = torch.from_numpy(np.stack([p.pixels for p in batch]))
    try:
        video = to_video(pixels, s.device, s.nabla_resize)
        del pixels
        latents = vae.encode(video)
        images = first_last_latents(vae, video, latents)
    except torch.cuda.OutOfMemoryError:
        shape = "x".join(map(str, batch[0].pixels.shape[:3]))
        raise UserError(
            f"out of GPU memory encoding {len(batch)} clip(s) of {shape} (frames x H x W); lower --batch_size or "
            "add --vae_tiling, then re-run with --skip_existing to keep what is already cached"
        ) from None
    encoded_size = [video.shape[-1], video.shape[-2]]
    del video
    written = 0
    for i, p in enumerate(batch):
        meta = {
            "item_key": p.job.item.key,
            "kind": p.plan.kind,
            "source_path": str(p.job.item.path),
            "source_size": p.plan.source_size,
            "bucket_size": p.plan.bucket_size,
            "encoded_size": encoded_size,
            "frame_indices": p.plan.frame_indices,
            "source_frames": p.plan.source_frames,
            "nabla_resize": s.nabla_resize,
            "vae": vae.identity,
            "vae_tiling": s.tile,
            "scaling_factor": SCALING_FACTOR,
            "posterior": "mode",
        }
        try:
            write_latent_cache(p.path, latents[i].to(s.dtype), images[i].to(s.dtype), meta)
            written += 1
        except ValueError as exc:  # NaN / Inf latents (fp16 overflow): never cache them
            failures.add(p.job.item.path, f"{exc}; try --vae_dtype float32", p.job.spec.index, p.job.item.key)
    return written


def encode_jobs(vae: VideoVAE, jobs: list[Job], s: Settings, failures: Failures, stats: Throughput) -> None:
    sizes = {job.spec.index: s.batch_size or job.spec.batch_size for job in jobs}
    batcher: BucketBatcher[Pending] = BucketBatcher(lambda key: sizes[key[0]])
    with progress_bar(sum(len(j.todo) for j in jobs), "encoding latents", "clip") as bar:

        def run(batch: list[Pending]) -> None:
            stats.done += encode_batch(vae, batch, s, failures)
            bar.update(len(batch))

        for job, clips, error in prefetch_map(decode_job, jobs, s.num_workers):
            if error is not None:
                failures.add(job.item.path, error, job.spec.index, job.item.key)
                bar.update(len(job.todo))
                continue
            bar.update(len(job.todo) - len(clips))  # windows past the last decodable frame (media.py warns)
            for clip in clips:
                batch = batcher.add((job.spec.index, *clip.plan.bucket_key), clip)
                if batch is not None:
                    run(batch)
            del clips
        for batch in batcher.flush():
            run(batch)


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def plan_all(
    datasets: list[tuple[DatasetSpec, list[Item]]], vae: VideoVAE, s: Settings, failures: Failures
) -> list[Job]:
    base = latent_expect(vae=vae.identity, dtype=s.dtype, nabla_resize=s.nabla_resize)
    pairs = [(spec, item) for spec, items in datasets for item in items]
    jobs = []
    with progress_bar(len(pairs), "checking media and caches", "item") as bar:
        for job in prefetch_map(lambda pair: plan_job(*pair, base, s.skip_existing), pairs, s.num_workers):
            if job.error is not None:
                failures.add(job.item.path, job.error, job.spec.index, job.item.key)
            jobs.append(job)
            bar.update(1)
    return jobs


def cleanup(datasets: list[tuple[DatasetSpec, list[Item]]], jobs: list[Job], failures: Failures, keep: bool) -> None:
    for spec, _ in datasets:
        wanted = {path for job in jobs if job.spec.index == spec.index for path in job.paths}
        protected = {key for index, key in failures.keys if index == spec.index}
        remove_stale(spec.cache_directory, "latents", wanted, protected, keep)


def main(argv: Sequence[str] | None = None) -> int:
    s = settings_from_args(parse_args(build_parser(), argv))
    config = load_dataset_config(s.dataset_config)
    datasets = [(spec, iter_items(spec)) for spec in config.datasets]  # config / caption errors before loading
    check_cache_dirs(datasets, "latents", lambda spec: latent_item_bytes(spec, s.dtype.itemsize, s.nabla_resize))
    if s.device.type == "cpu" and s.num_workers:  # decode threads + all-core intra-op threads thrash (10x slower)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - s.num_workers))
    if s.disable_cudnn:
        torch.backends.cudnn.enabled = False
        log.info("--disable_cudnn_backend: cuDNN is off for this run")
    vae = VideoVAE.load(str(s.vae), s.device, s.dtype)
    if s.tile:
        vae.enable_tiling(s.tile, _tile_stride(s.tile))
    log.info("%s; VAE %s", s.describe(), vae.identity)
    failures, stats = Failures(), Throughput("clip")
    jobs = plan_all(datasets, vae, s, failures)
    stats.skipped = sum(len(j.paths) - len(j.todo) for j in jobs)
    todo = [job for job in jobs if job.todo]
    log.info("%d clip(s) to encode from %d item(s), %d up to date", sum(len(j.todo) for j in todo), len(todo),
             stats.skipped)  # fmt: skip
    stats.restart()
    encode_jobs(vae, todo, s, failures, stats)
    cleanup(datasets, jobs, failures, s.keep_cache)
    log.info("latent caching done: %s", stats.summary(len(failures)))
    return failures.report()


if __name__ == "__main__":
    sys.exit(run_main(main))
