"""Train a LoRA for a Kandinsky 5 video DiT on pre-cached latents and text embeddings (flow matching).

    accelerate launch --mixed_precision bf16 kandinsky5_train_network.py --task k5-pro-t2v-5s-sd --dit DIT \\
        --dataset_config dataset.toml --network_module networks.lora_kandinsky --output_dir out --output_name lora ...

Flow: command line (+ ``--config_file`` TOML) -> one frozen ``TrainConfig`` -> cached items checked -> DiT built
(fp8 / block swap / checkpointing via ``kandinsky5.memory.build``) -> LoRA injected -> flat loop: batch -> loss ->
backward -> (all-reduce) -> clip -> optimizer and LR step -> save / sample.  See ``docs/training.md``.

Tensor layouts (``kandinsky5.train``): latents ``(B, T, h, w, 16)`` channels-last, DiT input ``(B, T, h, w, 33)``,
text ``(B, L, D)`` + ``(B, L)`` mask, pooled ``(B, Dc)``, flow time ``t`` ``(B,)`` in [0, 1].

Multi-GPU / multi-node: ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun``); data is sharded per
batch; the LoRA is trained under torch's DDP, or with ``--fsdp`` everything is sharded with FSDP2
(``kandinsky5.train.distributed`` / ``kandinsky5.train.fsdp``); only rank 0 saves and logs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch

from kandinsky5 import cli, musubi_compat
from kandinsky5.common import UserError, get_logger, seed_everything
from kandinsky5.model import flow
from kandinsky5.sampling.magcache import magcache_from_args
from kandinsky5.train import adapters, optim, prechecks, startup
from kandinsky5.train import args as train_args
from kandinsky5.train.config import I2V_MODES, SAVE_FORMATS, NetworkConfig, SampleConfig, SaveConfig, TrainConfig
from kandinsky5.train.distributed import (
    DistContext,
    add_distributed_args,
    broadcast_object,
    build_engine,
    check_ranks_agree,
    close_distributed,
    default_timeout_minutes,
    distributed_config_from_args,
    init_distributed,
)
from kandinsky5.train.insight import tracker, validation
from kandinsky5.train.insight.monitor import monitor_for
from kandinsky5.train.objective import batch_to_device, flow_matching_loss
from kandinsky5.train.regularize import max_norm_
from kandinsky5.train.run import Run, resume_run, save_and_rotate, save_checkpoint
from kandinsky5.train.sampler import TrainingSampler, sample_requests
from kandinsky5.train.step import NonFiniteLoss, StepStats, finish_step

log = get_logger("kandinsky5.train")


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kandinsky5_train_network.py",
        description="LoRA training for Kandinsky 5 video DiTs on cached latents/text (see docs/training.md).",
        formatter_class=cli.HelpFormatter,
    )
    cli.add_config_file_arg(p)
    cli.add_model_args(p)
    cli.add_attention_args(p)
    cli.add_memory_args(p, training=True)
    cli.add_compile_args(p)
    _add_run_args(p)
    cli.add_magcache_args(p, calibrate=False)
    _add_optimizer_args(p)
    _add_network_args(p)
    _add_timestep_args(p)
    _add_save_args(p)
    adapters.add_adapter_file_args(p)
    add_distributed_args(p)
    startup.add_safety_args(p)
    cli.add_debug_arg(p)
    validation.add_validation_args(p)
    tracker.add_tracker_args(p)
    musubi_compat.add_musubi_args(p, "train")
    return p


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--dataset_config", help="dataset TOML whose caches were built by the two caching scripts")
    g.add_argument("--max_data_loader_n_workers", type=int, default=2, help="DataLoader workers (capped at CPUs)")
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep workers alive across epochs")
    g.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="bf16: DiT weights bf16 + autocast (default, or accelerate's setting); no: everything fp32; fp16 is "
        "refused (a bf16 model)",
    )
    g.add_argument("--seed", type=int, default=None, help="seed of LoRA init, noise, timesteps, data (default: random)")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (default 1600 without epochs)")
    g.add_argument("--max_train_epochs", type=int, default=None, help="epochs; wins over --max_train_steps (musubi)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument(
        "--scheduler_scale",
        type=float,
        default=None,
        help="sampling time-shift of the task (used by --sample_prompts, stored in the LoRA metadata)",
    )
    g.add_argument(
        "--i2v_mode",
        choices=I2V_MODES,
        default=None,
        help="I2V tasks: condition on the first frame (default) or on the first and last frames",
    )
    train_args.add_run_args(g)
    s = p.add_argument_group("sampling during training (rank 0; see docs/sampling_during_training.md)")
    s.add_argument("--sample_prompts", default=None,
                   help="prompt file: text lines with --w --h --f ..., or musubi's .toml / .json")  # fmt: skip
    s.add_argument("--sample_every_n_steps", type=int, default=None, help="sample every N optimizer steps")
    s.add_argument("--sample_every_n_epochs", type=int, default=None, help="sample at the end of every N epochs")
    s.add_argument("--sample_at_first", action="store_true", help="sample before the first step")


def _add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="learning rate of the LoRA weights")
    g.add_argument(
        "--optimizer_type",
        default="AdamW",
        help="AdamW, AdamW8bit, Adafactor, a torch.optim name or package.Class (case-insensitive)",
    )
    g.add_argument(
        "--optimizer_args",
        nargs="*",
        default=None,
        help='key=value constructor args, values as Python literals: "betas=(0.9,0.95)"',
    )
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the LoRA gradient norm (0 = no clip)")
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        help="transformers schedule: constant, constant_with_warmup, linear, cosine, ... or adafactor",
    )
    g.add_argument("--lr_warmup_steps", type=optim.steps_or_fraction, default=0,
                   help="warmup steps (or a fraction < 1 or a percentage of the total, e.g. 5%%)")  # fmt: skip
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    g.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial schedule")
    train_args.add_schedule_args(g)


def _add_network_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA network")
    g.add_argument("--network_module", default="networks.lora_kandinsky",
                   help="module providing create_network: networks.lora_kandinsky (default), "
                   "networks.loha_kandinsky (LoHa) or networks.lokr_kandinsky (LoKr)")  # fmt: skip
    g.add_argument("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    g.add_argument("--network_alpha", type=float, default=None, help="LoRA alpha, scale = alpha / rank (default 1)")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on the rank activations")
    g.add_argument(
        "--network_args",
        nargs="*",
        default=None,
        help="key=value: include_patterns=[...], exclude_patterns=[...], rank_dropout=, module_dropout=, "
        "loraplus_lr_ratio= (LoRA+), verbose=True",
    )
    g.add_argument("--network_weights", default=None,
                   help="start from this adapter file (any supported format; default: none)")  # fmt: skip
    g.add_argument("--scale_weight_norms", type=float, default=None,
                   help="max-norm regularisation: after each step shrink LoRA deltas with a larger norm")  # fmt: skip


def _add_timestep_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training timesteps (t = 1 noise; see docs/timestep_sampling.md)")
    g.add_argument("--timestep_sampling", choices=flow.TIMESTEP_MODES, default="shift", help="t distribution")
    g.add_argument("--discrete_flow_shift", type=float, default=5.0, help="shift s of mode 'shift'")
    g.add_argument("--weighting_scheme", choices=(*flow.WEIGHTING_SCHEMES, "none"), default="none",
                   help="density of mode 'sigma' (none = uniform); sigma_sqrt / cosmap weight the loss")  # fmt: skip
    g.add_argument("--sigmoid_scale", type=float, default=1.0, help="scale of the normal draw (sigmoid, shift)")
    g.add_argument("--logit_mean", type=float, default=0.0, help="mean of logsnr / sigma(logit_normal)")
    g.add_argument("--logit_std", type=float, default=1.0, help="std of logsnr / sigma(logit_normal)")
    g.add_argument("--mode_scale", type=float, default=1.29, help="scale of sigma(mode), in (-1, 1.75)")
    g.add_argument("--min_timestep", type=float, default=0.0, help="lower bound of 1000*t (all modes)")
    g.add_argument("--max_timestep", type=float, default=1000.0, help="upper bound of 1000*t (all modes)")
    train_args.add_timestep_args(g)


def _add_save_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("saving and resuming")
    g.add_argument("--output_dir", help="where LoRA files, states and samples go")
    g.add_argument("--output_name", help="file stem: <name>.safetensors, <name>-step00000100.safetensors, ...")
    g.add_argument(
        "--save_format",
        choices=SAVE_FORMATS,
        default=None,
        help="key format: diffusers (default for LoRA; loads in ComfyUI, diffusers and the official repo), comfyui "
        "(default for LoHa/LoKr), musubi",
    )
    g.add_argument("--save_every_n_epochs", type=int, default=None, help="save a LoRA every N epochs")
    g.add_argument("--save_every_n_steps", type=int, default=None, help="save a LoRA every N optimizer steps")
    g.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the newest N epoch saves")
    g.add_argument("--save_last_n_steps", type=int, default=None, help="keep the step saves of the last N steps")
    g.add_argument("--save_state", action="store_true", help="also save resumable state dirs (<file stem>-state)")
    train_args.add_state_args(g)
    g.add_argument("--resume", default=None, help="state directory to continue from (written by --save_state)")


# ----------------------------------------------------------------------------------------------------------------
# args -> TrainConfig (the only place that reads args)
# ----------------------------------------------------------------------------------------------------------------


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if not vars(args)[name]:
            raise UserError(f"--{name} is required")


def _mixed_precision(flag: str | None) -> str:
    value = flag or os.environ.get("ACCELERATE_MIXED_PRECISION") or "bf16"
    if value not in ("no", "bf16"):
        raise UserError(f"--mixed_precision {value} is not offered: Kandinsky 5 is a bf16 model (musubi casts its "
                        "kernels to bf16 too); use bf16, or no for fp32")  # fmt: skip
    return value


def _precision(flag: str | None) -> tuple[torch.dtype, str]:
    """(compute dtype, what set it) for the attention-kernel check."""
    value = _mixed_precision(flag)
    source = f"--mixed_precision {value}" if flag else f"mixed precision {value!r} (accelerate's setting)"
    return (torch.float32 if value == "no" else torch.bfloat16), source


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from kandinsky5.memory.build import memory_config_from_args
    from kandinsky5.memory.compile import compile_config_from_args

    _require(args, "task", "dit", "dataset_config", "output_dir", "output_name")
    task = cli.task_from_args(args)
    if args.scheduler_scale is not None:
        task = replace(task, scheduler_scale=args.scheduler_scale)
    if args.sage_attn:
        raise UserError("--sage_attn has no backward pass; train with --sdpa, --flash_attn, --flash3 or --xformers")
    if args.i2v_mode and not task.is_i2v:
        raise UserError(f"--i2v_mode applies to I2V tasks; {task.name} is text-to-video")
    if args.sample_prompts and not (args.text_encoder_qwen and args.text_encoder_clip and args.vae):
        raise UserError("--sample_prompts needs --text_encoder_qwen, --text_encoder_clip and --vae")
    if (args.magcache or args.magcache_ratios) and not args.sample_prompts:
        raise UserError("--magcache speeds up sampling during training: it needs --sample_prompts")
    timesteps = train_args.timestep_config(args)
    train_args.check_args(args)
    opt_cfg = optim.OptimizerConfig(
        args.optimizer_type, args.learning_rate, optim.parse_kv_args(args.optimizer_args, "--optimizer_args")
    )
    sched_cfg = train_args.scheduler_config(args)
    optim.check_configs(opt_cfg, sched_cfg)
    base_weights, base_multipliers = adapters.check_adapter_file_args(args)
    return TrainConfig(
        task=task,
        dit_path=Path(args.dit),
        dataset_config=Path(args.dataset_config),
        attention=cli.attention_spec_from_args(args, task, _precision(args.mixed_precision)),
        memory=memory_config_from_args(args),
        mixed_precision=_mixed_precision(args.mixed_precision),
        seed=args.seed,
        max_train_steps=args.max_train_steps,
        max_train_epochs=args.max_train_epochs,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        i2v_mode=args.i2v_mode or "first",
        timesteps=timesteps,
        optimizer=opt_cfg,
        scheduler=sched_cfg,
        network=NetworkConfig(
            module=args.network_module,
            dim=4 if args.network_dim is None else args.network_dim,
            alpha=1.0 if args.network_alpha is None else args.network_alpha,
            dropout=args.network_dropout,
            args=optim.parse_kv_args(args.network_args, "--network_args"),
            weights=Path(args.network_weights) if args.network_weights else None,
            dim_from_weights=args.dim_from_weights,
            base_weights=base_weights,
            base_multipliers=base_multipliers,
        ),  # fmt: skip
        save=SaveConfig(
            output_dir=Path(args.output_dir),
            output_name=args.output_name,
            every_n_epochs=args.save_every_n_epochs,
            every_n_steps=args.save_every_n_steps,
            last_n_epochs=args.save_last_n_epochs,
            last_n_steps=args.save_last_n_steps,
            save_state=args.save_state,
            format=args.save_format,
            precision=adapters.save_dtype_from_args(args),
            last_n_epochs_state=args.save_last_n_epochs_state,
            last_n_steps_state=args.save_last_n_steps_state,
            state_on_train_end=args.save_state_on_train_end,
        ),  # fmt: skip
        sample=SampleConfig(
            prompts=Path(args.sample_prompts) if args.sample_prompts else None,
            every_n_steps=args.sample_every_n_steps,
            every_n_epochs=args.sample_every_n_epochs,
            at_first=args.sample_at_first,
            text_encoder_qwen=args.text_encoder_qwen,
            text_encoder_clip=args.text_encoder_clip,
            vae=args.vae,
            magcache=magcache_from_args(args, task),
            vae_dtype=train_args.vae_dtype(args),
        ),  # fmt: skip
        num_workers=min(args.max_data_loader_n_workers, os.cpu_count() or 1),
        persistent_workers=args.persistent_data_loader_workers,
        resume=Path(args.resume) if args.resume else None,
        distributed=distributed_config_from_args(args, optim.parse_kv_args(args.network_args, "--network_args")),
        overwrite=args.overwrite,
        allow_stale_cache=args.allow_stale_cache,
        tracking=tracker.tracker_config_from_args(args),
        validation=validation.validation_config_from_args(args),
        cuda_allow_tf32=args.cuda_allow_tf32,
        cudnn_benchmark=args.cuda_cudnn_benchmark,
        scale_weight_norms=args.scale_weight_norms,
        metadata=adapters.metadata_config_from_args(args),
        compile=compile_config_from_args(args, blocks_to_swap=args.blocks_to_swap),
    )


# ----------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------


def _build_network(cfg: TrainConfig, dit) -> tuple[torch.nn.Module, ModuleType]:
    return adapters.build_network(cfg, dit)


def _log_setup(cfg: TrainConfig, ctx, items: list, total: int, per_epoch: int) -> None:
    log.info(
        "task %s | attention %s%s | DiT weights %s, autocast %s, LoRA fp32 | %s | %d process(es) on %s",
        cfg.task.name, cfg.attention.backend, " + NABLA" if cfg.attention.nabla else "",
        str(cfg.weight_dtype).removeprefix("torch."), cfg.mixed_precision, cfg.memory.describe(), ctx.world_size,
        ctx.device.type,
    )  # fmt: skip
    log.info(
        "%d cached samples in %d shape buckets; %d optimizer steps (%d per epoch, %d epochs), accumulation %d, "
        "optimizer %s, schedule %s", len(items), len({i.shape for i in items}), total, per_epoch,
        math.ceil(total / per_epoch), cfg.gradient_accumulation_steps, optim.optimizer_name(cfg.optimizer),
        cfg.scheduler.name,
    )  # fmt: skip


def setup(cfg: TrainConfig, ctx: DistContext, requests: list):
    """Check the caches, build DiT + LoRA + optimizer + schedule and the data loader."""
    from torch.utils.data import DataLoader

    from dataset.config import load_dataset_config
    from dataset.latent_dataset import BucketBatchSampler, LatentDataset, collate, discover_items
    from dataset.split import split_validation
    from dataset.staleness import check_stale
    from dataset.summary import dataset_summary
    from kandinsky5.model.checkpoint_hash import checkpoint_sha256
    from kandinsky5.model.loading import file_fingerprint
    from kandinsky5.model.nabla import check_geometry
    from kandinsky5.model.vae import vae_file_identity
    from kandinsky5.train.memory_check import check_training_memory

    seed = broadcast_object(ctx, cfg.seed if cfg.seed is not None else random.randrange(2**31))
    dataset_cfg = load_dataset_config(cfg.dataset_config)
    items = discover_items(dataset_cfg, cfg.task)
    check_stale(dataset_cfg, items, cfg.sample.vae and vae_file_identity(cfg.sample.vae), cfg.allow_stale_cache)
    held = {d.index for d in dataset_cfg.datasets if d.is_validation}
    items, val_items = split_validation(items, held, cfg.validation.split)
    validator = validation.build_validator(cfg, val_items, LatentDataset(val_items, cfg.task.is_i2v), collate)
    sampler = BucketBatchSampler(items, seed, ctx.rank, ctx.world_size)
    per_epoch = math.ceil(sampler.batches_per_epoch / cfg.gradient_accumulation_steps)
    total = cfg.total_steps(per_epoch)
    prechecks.check_before_load(cfg, total)  # optimizer and schedule (LoRA+ too) on stand-ins: bad arguments fail now
    startup.check_run(cfg, ctx, total, per_epoch)  # earlier run, --resume, checkpoints, disk space: before loading
    _log_setup(cfg, ctx, items, total, per_epoch)
    if cfg.attention.nabla is not None:  # geometry errors now, not after loading a 19B model
        for _, h, w in sorted({i.shape for i in items + val_items}):
            check_geometry(h // 2, w // 2)
    cfg = check_training_memory(cfg, ctx, items, requests)  # weights + activations vs the budget; auto
    train_args.apply_cuda_switches(cfg.cuda_allow_tf32, cfg.cudnn_benchmark)
    training_sampler = None
    if requests and (ctx.is_main or cfg.distributed.fsdp):  # rank 0 samples (all ranks in lockstep under --fsdp)
        training_sampler = TrainingSampler(cfg, ctx.device, requests, writes=ctx.is_main)
        training_sampler.prepare()  # prompts encoded now, before the DiT exists (memory)
    engine = build_engine(cfg, ctx, seed, lambda dit: _build_network(cfg, dit))  # one process, DDP or FSDP
    dit, network, module = engine.dit, engine.network, engine.module
    groups = optim.lora_param_groups(network.named_parameters(), cfg.optimizer.learning_rate,
                                     prechecks.loraplus_ratio(cfg.network))  # fmt: skip
    optimizer = optim.build_optimizer(groups, cfg.optimizer)
    scheduler = optim.build_scheduler(optimizer, cfg.scheduler, total)
    seed_everything(seed + ctx.rank)  # dropout masks differ per rank
    generator = torch.Generator(ctx.device).manual_seed(seed * 1009 + ctx.rank)
    sha256 = checkpoint_sha256(cfg.dit_path) if cfg.metadata.enabled and ctx.is_main else None
    run = Run(cfg, ctx, dit, network, module, optimizer, scheduler, generator, seed, total, len(items),
              file_fingerprint(cfg.dit_path), sampler=training_sampler, validator=validator, engine=engine,
              datasets=dataset_summary(dataset_cfg, items, cfg.metadata.full_paths), base_sha256=sha256)  # fmt: skip
    loader = DataLoader(
        LatentDataset(items, with_image=cfg.task.is_i2v),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
        pin_memory=ctx.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),  # its worker seed draw must not touch the global RNG
    )
    return run, loader, sampler


# ----------------------------------------------------------------------------------------------------------------
# saving and sampling
# ----------------------------------------------------------------------------------------------------------------


def sample(run: Run) -> None:
    """Rank 0 writes the sample videos and their contact sheet; the other ranks wait."""
    if run.sampler is not None:
        step = run.progress.step
        outputs = run.sampler(run.dit, run.network, step, run.generator)
        run.monitor.on_samples(step, outputs, run.sampler.sheet_path(step))
    run.ctx.barrier()


def after_step(run: Run) -> None:
    save, smp, val, step = run.cfg.save, run.cfg.sample, run.cfg.validation, run.progress.step
    if val.every_n_steps and step % val.every_n_steps == 0:
        validation.validate(run)
    if run.cfg.scale_weight_norms:
        max_norm_(run.network, run.cfg.scale_weight_norms)
    if save.every_n_steps and step % save.every_n_steps == 0 and step < run.total_steps:
        save_and_rotate(run, "step", step)
    if smp.every_n_steps and step % smp.every_n_steps == 0:
        sample(run)


def after_epoch(run: Run, epoch: int) -> None:
    """``epoch`` counts finished epochs (1-based); the last one is covered by the final save."""
    save, smp, val = run.cfg.save, run.cfg.sample, run.cfg.validation
    if val.every_n_epochs and epoch % val.every_n_epochs == 0:
        validation.validate(run)
    run.monitor.on_epoch(epoch, run.progress.step)
    if save.every_n_epochs and epoch % save.every_n_epochs == 0 and run.progress.step < run.total_steps:
        save_and_rotate(run, "epoch", epoch)
    if smp.every_n_epochs and epoch % smp.every_n_epochs == 0:
        sample(run)


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------


def micro_step(run: Run, batch: dict[str, torch.Tensor], last: bool = True) -> torch.Tensor:
    """Forward + backward of one micro-batch: draw t and noise, flow-matching loss; returns the loss.  Gradients are
    reduced over ranks only on the ``last`` micro-batch of a step."""
    cfg, device = run.cfg, run.ctx.device
    b = batch_to_device(batch, device)
    shape = b.latents.shape  # (B, T, h, w, 16): one bucket, one (h, w) per batch
    t = flow.sample_timesteps(cfg.timesteps, shape[0], run.generator, device, latent_hw=(shape[2], shape[3]))
    noise = torch.randn(shape, generator=run.generator, device=device, dtype=torch.float32)
    with run.engine.sync(last):
        with torch.autocast(device.type, dtype=cfg.weight_dtype, enabled=cfg.autocast):
            loss = flow_matching_loss(run.engine.model, b, t, noise, cfg.task.rope_scale, cfg.i2v_mode,
                                      sample_weight=flow.loss_weight(cfg.timesteps, t))  # fmt: skip
        (loss / cfg.gradient_accumulation_steps).backward()
    return loss.detach()


def optimizer_step(run: Run, loss_sum: torch.Tensor, micro: int) -> StepStats:
    """All-reduce, clip and step; a NaN/inf loss stops the run, leaving every saved file as it was."""
    cfg, p = run.cfg, run.progress
    try:
        return finish_step(run.ctx, run.params, run.optimizer, run.scheduler, loss_sum, micro,
                                    cfg.max_grad_norm, grad_scale=cfg.gradient_accumulation_steps / micro)  # fmt: skip
    except NonFiniteLoss as exc:
        raise UserError(
            f"{exc} at step {p.step + 1}; last good checkpoint: {run.last_checkpoint or 'none written yet'}; lower "
            f"--learning_rate (now {cfg.optimizer.learning_rate:g}), keep --max_grad_norm at 1.0, or check the "
            "caches for extreme values"
        ) from None


def train_epoch(run: Run, loader, batches_per_epoch: int) -> bool:
    """The rest of the current epoch; True once the step budget is reached."""
    p, accum = run.progress, run.cfg.gradient_accumulation_steps
    loss_sum, micro = torch.zeros((), device=run.ctx.device), 0
    for batch in loader:
        last = micro + 1 >= accum or p.batches_in_epoch + 1 >= batches_per_epoch
        loss_sum, micro = loss_sum + micro_step(run, batch, last), micro + 1
        p.batches_in_epoch += 1
        if micro < accum and p.batches_in_epoch < batches_per_epoch:
            continue
        stats = optimizer_step(run, loss_sum, micro)
        p.step, loss_sum, micro = p.step + 1, torch.zeros_like(loss_sum), 0
        run.monitor.on_step(p.step, stats.loss, stats.lr, stats.grad_norm)
        after_step(run)
        if p.step >= run.total_steps:
            return True
    return False


def train(cfg: TrainConfig, ctx: DistContext, requests: list | None = None) -> Path | None:
    """The whole run; returns the final LoRA (or state) path written by rank 0."""
    run, loader, sampler = setup(cfg, ctx, requests or [])
    per_epoch = sampler.batches_per_epoch
    epochs = math.ceil(run.total_steps / math.ceil(per_epoch / cfg.gradient_accumulation_steps))
    run.monitor = monitor_for(run, math.ceil(per_epoch / cfg.gradient_accumulation_steps), epochs)
    try:
        if cfg.resume is not None:
            resume_run(run, cfg.resume)
        p = run.progress
        run.monitor.open(p.step if cfg.resume is not None else None)
        if p.step == 0 or not run.monitor.history.validation:
            validation.validate(run)
        if cfg.sample.at_first:
            sample(run)
        run.monitor.start_loop(p.step)
        done = p.step >= run.total_steps
        while not done and p.epoch < epochs:
            sampler.set_epoch(p.epoch, skip=p.batches_in_epoch)
            done = train_epoch(run, loader, per_epoch)
            if p.batches_in_epoch >= per_epoch:
                p.epoch, p.batches_in_epoch = p.epoch + 1, 0
                after_epoch(run, p.epoch)
        check_ranks_agree(ctx, run.params)
        validation.validate(run)
        save_checkpoint(run, cfg.save.output_name, cfg.save.save_state or cfg.save.state_on_train_end)
        run.monitor.finish(run.last_checkpoint)
    finally:
        run.monitor.close()  # closes the bar before any error is printed
    return run.last_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if args.show_timesteps:
        return train_args.show_timesteps(args)
    cfg = config_from_args(args)
    # the prompt file is read and checked once, now: a bad one fails before training, not at the first sample
    requests = sample_requests(cfg.task, cfg.sample.prompts, cfg.metadata.trigger_word) if cfg.sample.enabled else []
    timeout = cfg.distributed.timeout_minutes or default_timeout_minutes(cfg.task, requests)
    ctx = init_distributed(timeout, fsdp=cfg.distributed.fsdp)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the setup log, from rank 0
    musubi_compat.log_default_differences("train", train_args.musubi_view(cfg, args))
    try:
        train(cfg, ctx, requests)
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run_main(main))
