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
from typing import TYPE_CHECKING, Any

import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.files import WriteError, guarded_write
from kandinsky5.train.config import TrainConfig
from kandinsky5.train.distributed import DistContext, Engine, broadcast_object, gather_rng
from kandinsky5.train.optim import optimizer_class_name, optimizer_name
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
    validator: Any = None  # kandinsky5.train.insight.validation.Validator, None without validation items
    monitor: Any = None  # kandinsky5.train.insight.monitor.Monitor: console, trackers, history (saved in the state)
    started_at: float = field(default_factory=time.time)
    engine: Engine | None = None  # single process, DDP or FSDP (kandinsky5.train.distributed)
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
    run.engine.load_state(run.optimizer, network_sd, opt_sd)
    run.scheduler.load_state_dict(sched_sd)
    _recompute_lr(run.scheduler)
    restore_rng(rng[run.ctx.rank], run.generator)
    run.seed, run.last_checkpoint = meta["seed"], path
    run.progress = Progress(meta["step"], meta["epoch"], meta["batches_in_epoch"])
    if run.monitor is not None:
        run.monitor.restore(path, run.progress.step)  # curves, moving average, run folder
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, *asdict(run.progress).values())


def state_info(run: Run, lora: Path) -> dict[str, object]:
    """What ``progress.json`` records besides the progress: enough to check a ``--resume`` before loading."""
    cfg, n = run.cfg, run.cfg.network
    return {
        "seed": run.seed, "world_size": run.ctx.world_size, "task": cfg.task.name, "lora": lora.name,
        "optimizer": optimizer_name(cfg.optimizer), "optimizer_class": optimizer_class_name(cfg.optimizer),
        "mixed_precision": cfg.mixed_precision, "network_module": n.module, "network_dim": n.dim,
        "network_alpha": n.alpha, "network_args": {k: repr(v) for k, v in dict(n.args).items()},
    }  # fmt: skip


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
    """Rank 0 writes ``<stem>.safetensors`` (and ``<stem>-state/``); every rank takes part in the RNG gather and,
    under --fsdp, in gathering the LoRA and writing the sharded optimizer state.

    The LoRA file and its state directory are written completely under temporary names before either is renamed,
    so a failed save (disk full, ...) leaves both as they were, and they always come from the same step.  A failure
    stops every rank with one line naming the last good checkpoint.
    """
    cfg, engine = run.cfg, run.engine
    rng = gather_rng(run.ctx, run.generator) if state else []
    network_sd = engine.network_state()  # collective under --fsdp
    error, optimizer_files = None, {}
    try:
        if state:  # collective under --fsdp: every rank writes its optimizer shard
            staging = cfg.save.output_dir / f".{stem}-state.optimizer-tmp"
            optimizer_files = engine.optimizer_files(run.optimizer, staging)
        if run.ctx.is_main:
            path = cfg.save.output_dir / f"{stem}.safetensors"
            _write_checkpoint(run, path, state, rng, network_sd, optimizer_files)
    except WriteError as exc:
        what = f"{stem}.safetensors" + (f" and {stem}-state" if state else "")
        error = (
            f"cannot save {what} in {cfg.save.output_dir}: {exc.reason}; nothing was replaced, last good "
            f"checkpoint: {run.last_checkpoint or 'none written yet'} (free space, then --resume a state)"
        )
    error = broadcast_object(run.ctx, error) if run.ctx.distributed else error
    if error is not None:
        raise UserError(error)
    run.ctx.barrier()


def _write_checkpoint(run: Run, path: Path, state: bool, rng: list[dict], network_sd: dict, optimizer_files) -> None:
    cfg = run.cfg
    with guarded_write(path, "LoRA") as tmp:  # renamed only after the state directory is complete
        network = run.engine.saveable_network(network_sd)
        run.module.save_lora(tmp, network, lora_metadata(run), format=cfg.save.format, dtype=cfg.save.precision)
        if run.monitor is not None:
            run.monitor.on_save(run.progress.step, path)  # recorded in the history (saved in the state); loss.png
        if state:
            info = {**state_info(run, path), "sharded": run.engine.sharded}
            writers = state_writers(network_sd, optimizer_files, run.scheduler, run.progress, rng, info)
            if run.monitor is not None:
                writers.update(run.monitor.state_files())
            state_dir = write_state_dir(path.with_name(f"{path.stem}-state"), writers)
    run.last_checkpoint = state_dir if state else path
    log.info("saved %s%s", path, " (+ state)" if state else "")


def save_and_rotate(run: Run, kind: str, number: int) -> None:
    """A step or epoch checkpoint, then deletion of the older LoRA files and state dirs (``SaveConfig.kept``)."""
    s = run.cfg.save
    stem = f"-step{number:08d}" if kind == "step" else f"-{number:06d}"
    save_checkpoint(run, s.output_name + stem, s.save_state)
    numbered = r"-step(\d+)" if kind == "step" else r"-(\d{6})"
    for suffix, keep in ((r"\.safetensors", s.kept(kind, False)), ("-state", s.kept(kind, True))):
        if keep and run.ctx.is_main:
            rotate(s.output_dir, f"{re.escape(s.output_name)}{numbered}{suffix}", keep, number)
