"""What the trainer checks before the DiT loads, so that a typo fails in seconds and not after loading 19 B weights.

* the LoRA network: :func:`import_network_module` + :func:`create_network`, which ``train.startup`` runs on a
  weightless (``meta``-device) DiT of the task (``--network_module`` imports, ``--network_args`` keys and
  include/exclude patterns are valid) and the trainer runs again on the real DiT;
* :func:`check_before_load`: the optimizer and the LR schedule are built on stand-in parameters
  (``optim.check_build``): ``--optimizer_args``, ``--lr_scheduler_args``, the ``--lr_*`` flags and LoRA+ fit.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.train import optim
from kandinsky5.train.config import NetworkConfig, TrainConfig

log = get_logger(__name__)


def import_network_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"--network_module {name}: cannot import it ({exc})") from None


def create_network(module: ModuleType, n: NetworkConfig, dit: torch.nn.Module) -> torch.nn.Module:
    """``module.create_network`` for ``dit``; a bad ``--network_args`` value is a one-line UserError."""
    try:
        return module.create_network(1.0, n.dim, n.alpha, dit, dict(n.args), neuron_dropout=n.dropout)
    except ValueError as exc:
        raise UserError(f"LoRA network ({n.module}, --network_args): {exc}") from None


def loraplus_ratio(n: NetworkConfig) -> float | None:
    """``loraplus_lr_ratio`` of ``--network_args`` (LoRA+: the lora_up weights learn ``ratio`` times faster)."""
    value = n.args.get("loraplus_lr_ratio")
    if value is None:
        return None
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        ratio = 0.0
    if not ratio > 0:
        raise UserError(f"--network_args loraplus_lr_ratio must be a positive number (e.g. 16), got {value!r}")
    return ratio


def check_before_load(cfg: TrainConfig, total_steps: int) -> None:
    """The optimizer and the schedule on stand-in parameters (LoRA+ groups included), on every rank.  The network
    itself is built on a meta-device DiT by ``train.startup.meta_network`` (start-up checks, rank 0) just before."""
    if cfg.distributed.fsdp and cfg.network.base_weights:
        raise UserError(
            "--base_weights with --fsdp: merging into a sharded DiT is not offered; train without --fsdp, or merge "
            "the adapters into the checkpoint first"
        )
    ratio = loraplus_ratio(cfg.network)
    optim.check_build(cfg.optimizer, cfg.scheduler, total_steps, ratio)
    if ratio is not None:
        log.info("LoRA+: lora_up weights learn at %g x the learning rate", ratio)
