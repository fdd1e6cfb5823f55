"""One training run: its mutable state (``Run``), the LoRA metadata, checkpoints (LoRA file + resumable state
directory, written to a temporary name and renamed), rotation and resume.

Saving: LoRA files and state directories are written to a temporary name and renamed (``common.atomic_path`` /
:func:`write_state_dir`); a state directory holds the LoRA weights, optimizer, scheduler, progress (step, epoch,
batches done in the epoch, seed) and every rank's RNG states, which is all that ``--resume`` needs to continue
bit-for-bit.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.train.config import TrainConfig
from kandinsky5.train.distributed import DistContext, gather_rng
from kandinsky5.train.optim import optimizer_name
from kandinsky5.train.sampler import TrainingSampler
from kandinsky5.train.state import (
    Progress,
    read_state_dir,
    restore_rng,
    rotate,
    state_writers,
    write_state_dir,
)

if TYPE_CHECKING:
    pass


log = get_logger(__name__)


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
    datasets: list | None = None  # ss_datasets summary (dataset.summary)
    base_sha256: str | None = None  # full sha256 of the base checkpoint (None with --no_metadata)

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
    from kandinsky5.train.adapters import file_metadata

    full = run.module.training_metadata(
        run.network,
        task=cfg.task.name,
        base_checkpoint_hash=run.fingerprint,
        i2v_mode=cfg.i2v_mode if cfg.task.is_i2v else None,
        timestep=asdict(cfg.timesteps),
        network_args=dict(cfg.network.args),
        **{k: str(v) for k, v in extra.items()},
    )
    return file_metadata(run, full)


def save_checkpoint(run: Run, stem: str, state: bool) -> None:
    """Rank 0 writes ``<stem>.safetensors`` (and ``<stem>-state/``); every rank takes part in the RNG gather."""
    cfg = run.cfg
    rng = gather_rng(run.ctx, run.generator) if state else []
    if run.ctx.is_main:
        path = cfg.save.output_dir / f"{stem}.safetensors"
        run.module.save_lora(path, run.network, lora_metadata(run), format=cfg.save.format, dtype=cfg.save.precision)
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
