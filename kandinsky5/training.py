"""LoRA training building blocks: run config, distributed context, the flow-matching objective, the optimizer step,
state save/resume with RNG, and sample-during-training.  ``kandinsky5_train_network.py`` is the flat loop over them.

Objective (``architecture.md`` 4.1; t = 1 noise, t = 0 data)::

    x_t    = (1 - t) * x0 + t * eps                  flow.noisy_input
    target = eps - x0                                flow.velocity_target
    v      = DiT([x_t | cond | mask], text, 1000 * t)
    loss   = mean over unconditioned frames of (v - target)^2, in fp32

Layouts: latents ``x0``, ``eps``, ``x_t``, ``v`` are ``(B, T, h, w, 16)`` channels-last; the DiT input is
``(B, T, h, w, 33)`` = noisy latents | 16 cond channels | 1 mask channel; ``t`` is ``(B,)``; text is ``(B, L, D)`` with
a ``(B, L)`` bool mask (right-padded, one copy per sample), pooled CLIP ``(B, Dc)``; ``latents_image`` is
``(B, 2, h, w, 16)`` = [first, last] clean frame latents.

I2V conditioning follows official inference (``architecture.md`` 4.5), not musubi (defects #4, #5): the clean image
latent *replaces* frame 0 of the noisy input (and frame T-1 with ``first_last``), the mask channel is 1 on exactly
those frames, the cond channels stay zero, and the conditioned frames are left out of the loss (inference overwrites
them, so there is nothing to learn there).  ``first`` conditions frame 0 when T >= 2; ``first_last`` also frame T-1
when T >= 3; a 1-frame item (an image) is trained unconditioned.  T2V: ``[x_t | 0 | 0]``.

Distributed: ``accelerate launch`` / ``torchrun`` only start the processes; :func:`init_distributed` joins them
(NCCL on CUDA, gloo on CPU).  The DiT is *not* wrapped in DDP (it may be fp8 or block-swapped and is frozen): after
backward the LoRA gradients are averaged with one flat all-reduce, so every rank applies the identical update.

Saving: LoRA files and state directories are written to a temporary name and renamed (``common.atomic_path`` /
:func:`write_state_dir`); a state directory holds the LoRA weights, optimizer, scheduler, progress (step, epoch,
batches done in the epoch, seed) and every rank's RNG states, which is all that ``--resume`` needs to continue
bit-for-bit.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from kandinsky5 import flow, pipeline
from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TaskConfig
from kandinsky5.optim import (
    OptimizerConfig,
    Progress,
    SchedulerConfig,
    capture_rng,
    optimizer_name,
    read_state_dir,
    restore_rng,
    rotate,
    state_writers,
    write_state_dir,
)
from kandinsky5.prompts import read_prompt_file

if TYPE_CHECKING:
    from kandinsky5.dit import AttentionSpec
    from kandinsky5.memory import MemoryConfig

__all__ = [
    "I2V_MODES",
    "SAVE_FORMATS",
    "NetworkConfig",
    "SaveConfig",
    "SampleConfig",
    "TrainConfig",
    "DistContext",
    "init_distributed",
    "TrainBatch",
    "batch_to_device",
    "conditioned_frames",
    "dit_input",
    "masked_mse",
    "flow_matching_loss",
    "StepStats",
    "finish_step",
    "NonFiniteLoss",
    "Run",
    "resume_run",
    "lora_metadata",
    "save_checkpoint",
    "save_and_rotate",
    "TrainingSampler",
]

log = get_logger(__name__)

I2V_MODES = ("first", "first_last")
SAVE_FORMATS = ("comfyui", "diffusers", "musubi")


# ----------------------------------------------------------------------------------------------------------------
# run configuration (built once from the command line by the script)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkConfig:
    module: str = "networks.lora_kandinsky"  # --network_module, imported by name
    dim: int = 4  # --network_dim (rank)
    alpha: float = 1.0  # --network_alpha (scale = alpha / rank)
    dropout: float | None = None  # --network_dropout (rank-activation dropout)
    args: Mapping[str, Any] = field(default_factory=dict)  # --network_args, literal-parsed
    weights: Path | None = None  # --network_weights: start from this LoRA


@dataclass(frozen=True)
class SaveConfig:
    output_dir: Path
    output_name: str
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    last_n_epochs: int | None = None  # keep only the newest N epoch checkpoints (and their states)
    last_n_steps: int | None = None  # keep only the newest N step checkpoints (and their states)
    save_state: bool = False  # write a resumable state directory with every checkpoint and at the end
    format: str = "diffusers"


@dataclass(frozen=True)
class SampleConfig:
    prompts: Path | None = None
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False
    text_encoder_qwen: str | None = None
    text_encoder_clip: str | None = None
    vae: str | None = None

    @property
    def enabled(self) -> bool:
        return self.prompts is not None


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; built once from the command line, never mutated."""

    task: TaskConfig  # with --scheduler_scale applied (used by sampling, stored in the LoRA metadata)
    dit_path: Path
    dataset_config: Path
    attention: AttentionSpec
    memory: MemoryConfig
    mixed_precision: str  # "bf16" (DiT weights bf16 + autocast) | "no" (fp32)
    seed: int | None
    max_train_steps: int | None
    max_train_epochs: int | None
    gradient_accumulation_steps: int
    max_grad_norm: float  # 0 disables clipping (the norm is still measured and logged)
    i2v_mode: str
    timesteps: flow.TimestepConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    network: NetworkConfig
    save: SaveConfig
    sample: SampleConfig
    num_workers: int = 1
    persistent_workers: bool = False
    resume: Path | None = None
    logging_dir: Path | None = None

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)

    @property
    def autocast(self) -> bool:
        return self.mixed_precision in ("bf16", "fp16")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: epochs x steps/epoch, --max_train_steps, the smaller if both; default 1600."""
        limits = [n for n in (self.max_train_steps,) if n]
        if self.max_train_epochs:
            limits.append(self.max_train_epochs * steps_per_epoch)
        return min(limits) if limits else 1600


# ----------------------------------------------------------------------------------------------------------------
# distributed context
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(timeout_minutes: int = 60) -> DistContext:
    """Join the process group started by ``accelerate launch`` / ``torchrun`` (env RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)  # rank 0 may sample for a while
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    rank = dist.get_rank() if world > 1 else 0
    return DistContext(rank=rank, world_size=world, device=device)


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_ranks_agree(ctx: DistContext, params: Iterable[torch.Tensor]) -> str:
    """SHA-256 of this rank's LoRA weights; with several ranks, every rank's digest is compared and logged, and a
    difference (a broken all-reduce) is an error."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()[:16]
    if ctx.distributed:
        digests: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(digests, digest)
        if ctx.is_main:
            log.info("LoRA weights per rank: %s", " ".join(digests))
        if len(set(digests)) > 1:
            raise RuntimeError(f"LoRA weights differ between ranks ({digests}); the gradient all-reduce failed")
    return digest


def broadcast_params_(ctx: DistContext, params: Iterable[torch.Tensor]) -> None:
    """Make every rank start from rank 0's LoRA weights."""
    if ctx.distributed:
        for p in params:
            dist.broadcast(p.data, src=0)


# ----------------------------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainBatch:
    latents: torch.Tensor  # x0 (B, T, h, w, 16) fp32
    text_embeds: torch.Tensor  # (B, L, D)
    text_mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, Dc)
    latents_image: torch.Tensor | None = None  # (B, 2, h, w, 16): [first, last]; I2V tasks only


def batch_to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainBatch:
    """Collated cache tensors -> fp32 tensors on ``device`` (autocast takes the DiT's matmuls to bf16)."""

    def f32(t):
        return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)

    return TrainBatch(
        latents=f32(batch["latents"]),
        text_embeds=f32(batch["text_embeds"]),
        text_mask=batch["text_mask"].to(device),
        pooled=f32(batch["pooled"]),
        latents_image=f32(batch.get("latents_image")),
    )


def conditioned_frames(num_frames: int, i2v_mode: str) -> list[int]:
    """Latent frames that carry a clean image latent: [0] (first, T >= 2), [0, T-1] (first_last, T >= 3)."""
    if i2v_mode not in I2V_MODES:
        raise ValueError(f"i2v_mode must be one of {I2V_MODES}, got {i2v_mode!r}")
    if num_frames < 2:
        return []
    return [0, num_frames - 1] if i2v_mode == "first_last" and num_frames >= 3 else [0]


def dit_input(
    x_t: torch.Tensor, latents_image: torch.Tensor | None, i2v_mode: str = "first"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 33-channel DiT input and the (B, T) loss weight of each frame (None = every frame counts).

    ``latents_image`` None -> T2V ``[x_t | 0 | 0]``.  Otherwise the official I2V layout, built with the sampler's own
    :func:`~kandinsky5.pipeline.paste_condition` and :func:`~kandinsky5.pipeline.dit_input`, so training conditions
    exactly as inference does; the conditioned frames get loss weight 0.
    """
    b, t = x_t.shape[:2]
    frames = conditioned_frames(t, i2v_mode) if latents_image is not None else []
    if not frames:
        return pipeline.dit_input(x_t, first=False, last=False), None
    last = latents_image[:, 1:2] if len(frames) == 2 else None  # frame T-1 <- the last-frame latent
    x_in = pipeline.paste_condition(x_t.clone(), latents_image[:, :1], last)
    weight = torch.ones(b, t, dtype=torch.float32, device=x_t.device)
    weight[:, frames] = 0.0
    return pipeline.dit_input(x_in, first=True, last=last is not None), weight


def masked_mse(pred: torch.Tensor, target: torch.Tensor, frame_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of (pred - target)^2 in fp32 over the frames whose weight is 1 (all frames when None)."""
    err = (pred.float() - target.float()).square()
    if frame_weight is None:
        return err.mean()
    w = frame_weight.view(*frame_weight.shape, 1, 1, 1)
    per_frame = err[0, 0].numel()
    return (err * w).sum() / (w.sum() * per_frame)


def flow_matching_loss(
    dit: Callable[..., torch.Tensor],
    batch: TrainBatch,
    t: torch.Tensor,
    noise: torch.Tensor,
    rope_scale: Sequence[float],
    i2v_mode: str = "first",
) -> torch.Tensor:
    """The rectified-flow loss of one batch (see the module docstring); ``t`` (B,), ``noise`` like the latents."""
    x0 = batch.latents
    x_t = flow.noisy_input(x0, noise, t)  # (1 - t) x0 + t eps
    target = flow.velocity_target(x0, noise)  # eps - x0
    x_in, frame_weight = dit_input(x_t, batch.latents_image, i2v_mode)
    v = dit(x_in, batch.text_embeds, batch.text_mask, batch.pooled, flow.dit_time(t), scale_factor=tuple(rope_scale))
    return masked_mse(v, target, frame_weight)


# ----------------------------------------------------------------------------------------------------------------
# optimizer step (gradient all-reduce, finiteness check, clipping)
# ----------------------------------------------------------------------------------------------------------------


class NonFiniteLoss(UserError):
    """The loss or the gradient norm became NaN/inf; nothing is saved at that step."""


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean loss of the step over micro-batches and ranks
    grad_norm: float  # before clipping
    lr: float


def _all_reduce_mean_(ctx: DistContext, tensors: list[torch.Tensor], bucket_bytes: int = 64 << 20) -> None:
    """Average ``tensors`` in place over ranks: flattened (fp32) into buckets of about ``bucket_bytes``, one
    all-reduce each, so a large LoRA needs one bucket of extra memory, not a second copy of its gradients."""
    if not ctx.distributed:
        return
    start, size = 0, 0
    for i, t in enumerate(tensors):
        size += t.numel() * 4
        if size < bucket_bytes and i < len(tensors) - 1:
            continue
        bucket = tensors[start : i + 1]
        flat = torch.cat([b.reshape(-1).float() for b in bucket])
        dist.all_reduce(flat)
        flat /= ctx.world_size
        for b, v in zip(bucket, flat.split([b.numel() for b in bucket])):
            b.copy_(v.view_as(b))
        start, size = i + 1, 0


def finish_step(
    ctx: DistContext,
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_sum: torch.Tensor,
    micro_batches: int,
    max_grad_norm: float,
    grad_scale: float = 1.0,
) -> StepStats:
    """Average grads and loss over ranks, refuse non-finite values, clip, step optimizer and LR schedule.

    ``loss_sum`` is the sum of the (unscaled) micro-batch losses of this step on this rank; ``grad_scale`` fixes the
    gradient of a short accumulation at the end of an epoch (``accumulation / micro_batches``).  Raises
    ``NonFiniteLoss`` *before* the weights change, on every rank at once (the flag travels in the all-reduce).
    """
    grads = [p.grad for p in params if p.grad is not None]
    loss = (loss_sum.detach().float() / micro_batches).reshape(1)
    _all_reduce_mean_(ctx, [*grads, loss])
    if grad_scale != 1.0:
        torch._foreach_mul_(grads, grad_scale)
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if grads else torch.zeros(())
    loss_value, norm_value = float(loss), float(grad_norm)
    if not (np.isfinite(loss_value) and np.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        what = "loss" if not np.isfinite(loss_value) else "gradient norm"
        raise NonFiniteLoss(f"{what} became {loss_value if what == 'loss' else norm_value}")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_value, norm_value, float(lr) if lr is not None else float("nan"))


# ----------------------------------------------------------------------------------------------------------------
# one run: its mutable state, RNG of all ranks, checkpoints, resume
# ----------------------------------------------------------------------------------------------------------------


def gather_rng(ctx: DistContext, generator: torch.Generator) -> list[dict]:
    """Every rank's RNG states, on every rank (rank order)."""
    state = capture_rng(generator)
    if not ctx.distributed:
        return [state]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


@dataclass
class Run:
    """The mutable parts of one run: models, optimizer, progress, and what was saved last."""

    cfg: TrainConfig
    ctx: DistContext
    dit: torch.nn.Module
    network: torch.nn.Module
    module: ModuleType  # the --network_module (create_network, save_lora, training_metadata, ...)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # noise and timesteps of this rank
    seed: int
    total_steps: int
    num_items: int
    fingerprint: str  # of the base DiT checkpoint
    progress: Progress = field(default_factory=Progress)
    last_checkpoint: Path | None = None
    sampler: TrainingSampler | None = None
    started_at: float = field(default_factory=time.time)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]


def _recompute_lr(scheduler) -> None:
    """Set the learning rate of the restored step from *this* run's schedule (its length may have changed since the
    state was saved; the saved optimizer still holds the old schedule's last value).  Same schedule: same value."""
    if type(scheduler) is not torch.optim.lr_scheduler.LambdaLR:  # other schedulers keep their saved state as is
        return
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def resume_run(run: Run, path: Path) -> None:
    """Restore LoRA, optimizer, schedule, progress and this rank's RNG from a state directory."""
    meta, network_sd, opt_sd, sched_sd, rng = read_state_dir(path)
    if meta["world_size"] != run.ctx.world_size:
        raise UserError(
            f"--resume {path} was saved by {meta['world_size']} process(es); resume with the same --num_processes "
            "(the data order and RNG streams are per process)"
        )
    run.network.load_state_dict(network_sd)
    run.optimizer.load_state_dict(opt_sd)
    run.scheduler.load_state_dict(sched_sd)
    _recompute_lr(run.scheduler)
    restore_rng(rng[run.ctx.rank], run.generator)
    run.seed, run.last_checkpoint = meta["seed"], path
    run.progress = Progress(meta["step"], meta["epoch"], meta["batches_in_epoch"])
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, *asdict(run.progress).values())


def lora_metadata(run: Run) -> dict[str, object]:
    """Metadata of a saved LoRA: what it was trained on and how (K5 keys + kohya-style ss_* keys)."""
    cfg, p = run.cfg, run.progress
    extra = {
        "k5_scheduler_scale": cfg.task.scheduler_scale, "ss_base_model_version": "kandinsky5",
        "ss_sd_model_name": cfg.dit_path.name, "ss_output_name": cfg.save.output_name, "ss_steps": p.step,
        "ss_epoch": p.epoch, "ss_max_train_steps": run.total_steps, "ss_num_train_items": run.num_items,
        "ss_learning_rate": cfg.optimizer.learning_rate, "ss_optimizer": optimizer_name(cfg.optimizer),
        "ss_lr_scheduler": cfg.scheduler.name, "ss_lr_warmup_steps": cfg.scheduler.warmup, "ss_seed": run.seed,
        "ss_mixed_precision": cfg.mixed_precision, "ss_fp8_base": cfg.memory.fp8,
        "ss_gradient_checkpointing": cfg.memory.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps, "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_network_dropout": cfg.network.dropout, "ss_training_started_at": run.started_at,
        "ss_training_finished_at": time.time(),
    }  # fmt: skip
    return run.module.training_metadata(
        run.network,
        task=cfg.task.name,
        base_checkpoint_hash=run.fingerprint,
        i2v_mode=cfg.i2v_mode if cfg.task.is_i2v else None,
        timestep=asdict(cfg.timesteps),
        network_args=dict(cfg.network.args),
        **{k: str(v) for k, v in extra.items()},
    )


def save_checkpoint(run: Run, stem: str, state: bool) -> None:
    """Rank 0 writes ``<stem>.safetensors`` (and ``<stem>-state/``); every rank takes part in the RNG gather."""
    cfg = run.cfg
    rng = gather_rng(run.ctx, run.generator) if state else []
    if run.ctx.is_main:
        path = cfg.save.output_dir / f"{stem}.safetensors"
        run.module.save_lora(path, run.network, lora_metadata(run), format=cfg.save.format)
        run.last_checkpoint = path
        if state:
            info = {"seed": run.seed, "world_size": run.ctx.world_size, "task": cfg.task.name, "lora": path.name}
            writers = state_writers(run.network, run.optimizer, run.scheduler, run.progress, rng, info)
            run.last_checkpoint = write_state_dir(cfg.save.output_dir / f"{stem}-state", writers)
        log.info("saved %s%s", path, " (+ state)" if state else "")
    run.ctx.barrier()


def save_and_rotate(run: Run, kind: str, number: int) -> None:
    """A step or epoch checkpoint, then deletion of the older ones beyond --save_last_n_steps/epochs."""
    s = run.cfg.save
    stem, keep = (f"-step{number:08d}", s.last_n_steps) if kind == "step" else (f"-{number:06d}", s.last_n_epochs)
    save_checkpoint(run, s.output_name + stem, s.save_state)
    if keep and run.ctx.is_main:
        numbered = r"-step(\d+)" if kind == "step" else r"-(\d{6})"
        pattern = f"{re.escape(s.output_name)}{numbered}(?:\\.safetensors|-state)"
        rotate(s.output_dir, pattern, keep, number)


# ----------------------------------------------------------------------------------------------------------------
# sampling during training (rank 0)
# ----------------------------------------------------------------------------------------------------------------


def sample_requests(task: TaskConfig, prompts: Path) -> list[pipeline.GenerationRequest]:
    """Parse and check the ``--sample_prompts`` file (no model needed); errors name the flag, file and line.

    The trainer calls this at start-up, before the DiT loads, so a bad prompt file fails in seconds, not at the
    first sample after hours of training.
    """
    if not Path(prompts).is_file():
        raise UserError(f"--sample_prompts {prompts} does not exist")
    requests = []
    for line in read_prompt_file(prompts):
        try:
            requests.append(pipeline.request_from_line(task, line))
        except UserError as exc:
            raise UserError(f"--sample_prompts {prompts}: prompt {line.prompt[:40]!r}: {exc}") from None
    return requests


class TrainingSampler:
    """Prompts from ``--sample_prompts`` encoded once (text encoders then freed), images encoded once; each call
    denoises with the current LoRA, decodes with the VAE and writes ``<output_dir>/sample/<name>_<step>_<i>.mp4``.

    Global RNG states are restored afterwards, so sampling never changes the training trajectory.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, requests: list[pipeline.GenerationRequest]):
        self.cfg, self.task, self.requests = cfg, cfg.task, requests
        self.out_dir = cfg.save.output_dir / "sample"
        s = cfg.sample
        self.pipeline = pipeline.Kandinsky5Pipeline(
            self.task,
            text_encoder_qwen=s.text_encoder_qwen,
            text_encoder_clip=s.text_encoder_clip,
            vae_path=s.vae,
            device=device,
            dtype=cfg.weight_dtype,
        )
        self.prepared: list[pipeline.PreparedRequest] = []

    def prepare(self) -> None:
        """Encode every prompt and image now (text encoders are released afterwards)."""
        self.prepared = [self.pipeline.prepare(r) for r in self.requests]
        self.pipeline.encode_prompts(p.request for p in self.prepared)
        self.pipeline.release_text_encoder()
        log.info("sampling: %d prompt(s) encoded once; videos go to %s", len(self.prepared), self.out_dir)

    def __call__(self, dit: torch.nn.Module, network: torch.nn.Module, step: int, generator: torch.Generator):
        from kandinsky5.video_io import write_image, write_video

        if not self.prepared:
            self.prepare()
        rng = capture_rng(generator)
        was_training = network.training
        network.eval()
        try:
            offload = self.cfg.memory.offload_during_sampling
            results = self.pipeline.generate_iter(dit, self.prepared, offload_dit=offload, progress=False)
            for i, result in enumerate(results):
                stem = self.out_dir / f"{self.cfg.save.output_name}_{step:06d}_{i:02d}_{result.request.spec.seed}"
                meta = {**result.metadata, "training_step": str(step)}
                if result.frames.shape[0] == 1:
                    write_image(stem.with_suffix(".png"), result.frames[0], meta, overwrite=True)
                else:
                    write_video(stem.with_suffix(".mp4"), result.frames, self.task.fps, meta, overwrite=True)
        finally:
            network.train(was_training)
            restore_rng(rng, generator)
        log.info("step %d: wrote %d sample(s) to %s", step, len(self.prepared), self.out_dir)
