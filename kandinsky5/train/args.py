"""Trainer flags that came with musubi-tuner parity and their translation into the typed configs.

``kandinsky5_train_network.py`` adds these groups to its parser and reads them through the functions below:

* schedule extras: ``--lr_decay_steps``, ``--lr_scheduler_timescale``, ``--lr_scheduler_min_lr_ratio``,
  ``--lr_scheduler_type``, ``--lr_scheduler_args`` (-> :class:`~kandinsky5.train.optim.SchedulerConfig`);
* state rotation: ``--save_last_n_epochs_state``, ``--save_last_n_steps_state``, ``--save_state_on_train_end``;
* run extras: ``--vae_dtype`` (the VAE that decodes samples), ``--cuda_allow_tf32``, ``--cuda_cudnn_benchmark``;
* ``--show_timesteps console|image``: draw the configured timestep distribution, print or plot it, and exit.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from kandinsky5.common import UserError, get_logger, parse_dtype, require_counts
from kandinsky5.model import flow
from kandinsky5.train import optim

log = get_logger(__name__)

POSITIVE = ("gradient_accumulation_steps", "max_train_steps", "max_train_epochs", "network_dim",
            "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps",
            "save_last_n_epochs_state", "save_last_n_steps_state", "sample_every_n_steps", "sample_every_n_epochs",
            "lr_scheduler_timescale")  # fmt: skip


def add_schedule_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--lr_decay_steps",
        type=optim.steps_or_fraction,
        default=0,
        help="decay steps of warmup_stable_decay: a count, a fraction < 1 or a percentage of the total (5%%)",
    )
    g.add_argument("--lr_scheduler_timescale", type=int, default=None,
                   help="timescale of inverse_sqrt (default: transformers' choice, the warmup steps)")  # fmt: skip
    g.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        default=None,
        help="final LR / initial LR of cosine_with_min_lr (required there), warmup_stable_decay (0) and rex (0.01)",
    )
    g.add_argument(
        "--lr_scheduler_type",
        default="",
        help="a scheduler class instead of --lr_scheduler: torch.optim.lr_scheduler name or package.Class, built "
        "as Class(optimizer, **lr_scheduler_args) (default: none)",
    )
    g.add_argument(
        "--lr_scheduler_args",
        nargs="*",
        default=None,
        help='key=value keywords for the schedule, values as Python literals: "min_lr=1e-6" "decay_type=\'linear\'"',
    )


def add_state_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--save_last_n_epochs_state", type=int, default=None,
                   help="keep only the newest N epoch state dirs (default: as --save_last_n_epochs)")  # fmt: skip
    g.add_argument("--save_last_n_steps_state", type=int, default=None,
                   help="keep the step state dirs of the last N steps (default: as --save_last_n_steps)")  # fmt: skip
    g.add_argument(
        "--save_state_on_train_end",
        action="store_true",
        help="write <name>-state at the end of training even without --save_state",
    )


def add_run_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--vae_dtype",
        default=None,
        help="dtype of the VAE that encodes/decodes the --sample_prompts videos: bfloat16, float16 or float32 "
        "(default: the DiT weight dtype)",
    )
    g.add_argument("--cuda_allow_tf32", action="store_true", help="allow TF32 matmuls and cuDNN convolutions")
    g.add_argument("--cuda_cudnn_benchmark", action="store_true", help="let cuDNN benchmark convolution algorithms")


def add_timestep_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--show_timesteps",
        choices=("console", "image"),
        default=None,
        help="draw 100000 training timesteps with these settings, show their histogram and loss weights, and exit: "
        "console = text bars, image = <output_dir>/<output_name>_timesteps.png (no model is loaded)",
    )


def check_args(args: argparse.Namespace) -> None:
    """Value checks of the flags above; notes that --max_train_epochs wins over --max_train_steps (as musubi)."""
    if args.max_train_epochs and args.max_train_steps:
        log.info("--max_train_epochs %d and --max_train_steps %d: the epochs decide (as musubi)",
                 args.max_train_epochs, args.max_train_steps)  # fmt: skip
    require_counts(args, POSITIVE)
    if args.scale_weight_norms is not None and not args.scale_weight_norms > 0:
        raise UserError(f"--scale_weight_norms must be > 0, got {args.scale_weight_norms}")
    if not 0 < args.learning_rate < math.inf:
        raise UserError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    if args.network_dropout is not None and not 0 <= args.network_dropout < 1:
        raise UserError(f"--network_dropout must be in [0, 1), got {args.network_dropout}")
    if not 0 <= args.max_grad_norm < math.inf:
        raise UserError(f"--max_grad_norm must be >= 0 (0 = no clipping), got {args.max_grad_norm}")
    if args.network_alpha is not None and not 0 <= args.network_alpha < math.inf:
        raise UserError(f"--network_alpha must be >= 0 (0 means alpha = rank), got {args.network_alpha}")


def scheduler_config(args: argparse.Namespace) -> optim.SchedulerConfig:
    return optim.SchedulerConfig(
        name=args.lr_scheduler,
        warmup=args.lr_warmup_steps,
        num_cycles=args.lr_scheduler_num_cycles,
        power=args.lr_scheduler_power,
        decay=args.lr_decay_steps,
        min_lr_ratio=args.lr_scheduler_min_lr_ratio,
        timescale=args.lr_scheduler_timescale,
        type=args.lr_scheduler_type or "",
        args=optim.parse_kv_args(args.lr_scheduler_args, "--lr_scheduler_args"),
    )


def vae_dtype(args: argparse.Namespace) -> torch.dtype | None:
    try:
        return parse_dtype(args.vae_dtype) if args.vae_dtype else None
    except UserError as exc:
        raise UserError(f"--vae_dtype: {exc}") from None


def apply_cuda_switches(allow_tf32: bool, cudnn_benchmark: bool) -> None:
    """``--cuda_allow_tf32`` / ``--cuda_cudnn_benchmark`` (process-wide torch switches; no-ops without CUDA)."""
    if allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


def timestep_config(args: argparse.Namespace) -> flow.TimestepConfig:
    try:
        return flow.TimestepConfig(
            mode=args.timestep_sampling, shift=args.discrete_flow_shift, sigmoid_scale=args.sigmoid_scale,
            logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
            weighting_scheme="uniform" if args.weighting_scheme == "none" else args.weighting_scheme,
            min_timestep=args.min_timestep, max_timestep=args.max_timestep,
        )  # fmt: skip
    except ValueError as exc:
        raise UserError(f"timestep settings: {exc}") from None


def show_timesteps(args: argparse.Namespace) -> int:
    """``--show_timesteps``: histogram of this run's timestep settings, then exit (nothing else is needed)."""
    from kandinsky5.cli import task_from_args
    from kandinsky5.train.insight import timestep_report

    cfg = timestep_config(args)
    task = task_from_args(args) if args.task else None
    latent_hw = (task.height // 8, task.width // 8) if task else (128, 128)  # musubi's 1024 px without a task
    png = None
    if args.show_timesteps == "image":
        if not args.output_dir:
            raise UserError("--show_timesteps image writes <output_dir>/<output_name>_timesteps.png: give --output_dir")
        png = Path(args.output_dir) / f"{args.output_name or 'timesteps'}_timesteps.png"
    log.info("timestep histogram of mode %s for a %dx%d latent", cfg.mode, *latent_hw)
    timestep_report.show(cfg, args.show_timesteps, latent_hw, png)
    return 0


def musubi_view(cfg, args: argparse.Namespace) -> dict[str, object]:
    """The effective values of the settings whose defaults differ from musubi's (``musubi_compat.MUSUBI_DEFAULTS``)."""
    return {
        "timestep_sampling": cfg.timesteps.mode,
        "discrete_flow_shift": cfg.timesteps.shift,
        "learning_rate": cfg.optimizer.learning_rate,
        "mixed_precision": cfg.mixed_precision,
        "max_data_loader_n_workers": args.max_data_loader_n_workers,
        "save_format": cfg.save.format,
        "optimizer_type": cfg.optimizer.type,
    }
