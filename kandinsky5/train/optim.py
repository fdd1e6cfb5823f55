"""Optimizers and learning-rate schedules for LoRA training, built from typed configs.

``--optimizer_type`` (case-insensitive):

=====================  =====================================================================================
``AdamW`` (default)    ``torch.optim.AdamW``
``AdamW8bit``          ``bitsandbytes.optim.AdamW8bit`` (8-bit moments; also works on CPU tensors)
``Adafactor``          ``transformers.optimization.Adafactor``; unless ``relative_step=True`` is passed in
                       ``--optimizer_args`` it runs with ``relative_step=False, scale_parameter=False`` so that
                       ``--learning_rate`` and ``--lr_scheduler`` mean what they say.  With ``relative_step=True``
                       the LR comes from Adafactor itself and the schedule must be ``adafactor``.
any torch.optim name   e.g. ``SGD``, ``Adam``, ``RAdam`` (looked up case-insensitively in ``torch.optim``)
``package.Class``      any importable class, e.g. ``prodigyopt.Prodigy``, ``bitsandbytes.optim.Lion8bit``
=====================  =====================================================================================

``--optimizer_args`` / ``--network_args`` are ``key=value`` strings; values are parsed with ``ast.literal_eval``
(numbers, tuples, lists, booleans, quoted strings; never ``eval``), and a value that is not a Python literal stays
a plain string: ``"betas=(0.9,0.95)" "weight_decay=0.001" "decouple=True"``.

``--lr_scheduler``: every ``transformers.get_scheduler`` name (``constant``, ``constant_with_warmup``, ``linear``,
``cosine``, ``cosine_with_restarts``, ``polynomial``, ``inverse_sqrt``, ``cosine_with_min_lr``,
``warmup_stable_decay``, ...) plus ``adafactor``.  ``--lr_warmup_steps`` is a step count, or a fraction of the
total optimizer steps when below 1 (``0.05`` = 5 %).  The scheduler steps once per *optimizer* step, on every rank.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kandinsky5.common import UserError, get_logger

log = get_logger(__name__)


log = get_logger(__name__)

_ADAFACTOR_DEFAULTS = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
_SCHEDULER_KWARGS = {"cosine_with_restarts": ("num_cycles",), "polynomial": ("power",)}


@dataclass(frozen=True)
class OptimizerConfig:
    type: str = "AdamW"  # --optimizer_type (see the module docstring)
    learning_rate: float = 1e-4
    args: Mapping[str, Any] = field(default_factory=dict)  # --optimizer_args, literal-parsed


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "constant"  # --lr_scheduler
    warmup: float = 0  # --lr_warmup_steps: steps, or a fraction of total_steps when < 1
    num_cycles: int = 1  # --lr_scheduler_num_cycles (cosine_with_restarts)
    power: float = 1.0  # --lr_scheduler_power (polynomial)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as  foo=adam  stays a string


def parse_kv_args(values: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["betas=(0.9,0.95)", "weight_decay=0.001"]`` -> ``{"betas": (0.9, 0.95), "weight_decay": 0.001}``."""
    out: dict[str, Any] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f'{flag} expects key=value items, got {item!r} (e.g. {flag} "weight_decay=0.01")')
        out[key.strip()] = _literal(value.strip())
    return out


def _import_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--optimizer_type {path}: cannot import {module_name} ({exc}); pip install it") from None
    if not hasattr(module, class_name):
        raise UserError(f"--optimizer_type {path}: {module_name} has no class {class_name}")
    return getattr(module, class_name)


def _torch_optimizer(name: str) -> type:
    by_lower = {n.lower(): n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)}
    if name.lower() not in by_lower:
        raise UserError(
            f"unknown --optimizer_type {name!r}; use AdamW, AdamW8bit, Adafactor, a torch.optim class name "
            "or a full path such as prodigyopt.Prodigy"
        )
    return getattr(torch.optim, by_lower[name.lower()])


def optimizer_class(name: str) -> tuple[type, dict[str, Any]]:
    """The optimizer class for ``--optimizer_type`` and the defaults this project adds to its kwargs."""
    lower = name.lower()
    if lower == "adamw8bit":
        return _import_class("bitsandbytes.optim.AdamW8bit"), {}
    if lower == "adafactor":
        return _import_class("transformers.optimization.Adafactor"), dict(_ADAFACTOR_DEFAULTS)
    if "." in name:
        return _import_class(name), {}
    return _torch_optimizer(name), {}


def optimizer_class_name(cfg: OptimizerConfig) -> str:
    """``module.Class`` of ``--optimizer_type`` (recorded in states: a resume must use the same class)."""
    cls, _ = optimizer_class(cfg.type)
    return f"{cls.__module__}.{cls.__name__}"


def optimizer_name(cfg: OptimizerConfig) -> str:
    """``module.Class(k=v, ...)`` for logs and LoRA metadata."""
    cls, _ = optimizer_class(cfg.type)
    args = ", ".join(f"{k}={v!r}" for k, v in cfg.args.items())
    return f"{cls.__module__}.{cls.__name__}({args})"


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    cls, defaults = optimizer_class(cfg.type)
    kwargs = {**defaults, **cfg.args}
    lr = None if kwargs.get("relative_step") else cfg.learning_rate  # Adafactor's own LR schedule
    try:
        return cls(list(params), lr=lr, **kwargs)
    except TypeError as exc:
        raise UserError(f"--optimizer_args do not fit {cls.__name__}: {exc}") from None


def check_configs(opt: OptimizerConfig, sched: SchedulerConfig) -> None:
    """Fail fast (before any model is loaded) on an unknown optimizer or schedule name."""
    optimizer_class(opt.type)
    names = _scheduler_names() + ["adafactor"]
    if sched.name not in names:
        raise UserError(f"unknown --lr_scheduler {sched.name!r}; valid: {', '.join(names)}")


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    """``--lr_warmup_steps`` as a step count (a value below 1 is a fraction of ``total_steps``)."""
    if cfg.warmup < 0:
        raise UserError(f"--lr_warmup_steps must be >= 0, got {cfg.warmup}")
    if 0 < cfg.warmup < 1:
        return int(round(cfg.warmup * total_steps))
    return int(cfg.warmup)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR schedule over ``total_steps`` optimizer steps."""
    uses_relative_step = bool(optimizer.defaults.get("relative_step", False))
    if cfg.name == "adafactor" or uses_relative_step:
        if not (cfg.name == "adafactor" and uses_relative_step):
            raise UserError("--lr_scheduler adafactor goes with --optimizer_type Adafactor and 'relative_step=True'")
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from transformers import get_scheduler

    names = _scheduler_names()
    if cfg.name not in names:
        raise UserError(f"unknown --lr_scheduler {cfg.name!r}; valid: {', '.join(names)}, adafactor")
    extra = {"num_cycles": cfg.num_cycles, "power": cfg.power}
    specific = {k: extra[k] for k in _SCHEDULER_KWARGS.get(cfg.name, ())}
    return get_scheduler(
        cfg.name,
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=specific or None,
    )


def _scheduler_names() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType if s.value not in ("reduce_lr_on_plateau", "greedy")]
