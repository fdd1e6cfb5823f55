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
``warmup_stable_decay``, ...) plus ``adafactor`` (or musubi's ``adafactor:<initial lr>``), ``rex`` and diffusers'
``piecewise_constant`` (as musubi).
``--lr_warmup_steps`` / ``--lr_decay_steps`` are step counts, or a fraction of the total optimizer steps when below
1 (``0.05`` or ``5%`` = 5 %).  Each schedule gets musubi's arguments: ``num_cycles`` (``cosine_with_restarts``;
half of it for ``cosine_with_min_lr`` and ``warmup_stable_decay``), ``power`` (``polynomial``), ``timescale``
(``inverse_sqrt``), ``min_lr_rate`` / ``min_lr_ratio`` = ``--lr_scheduler_min_lr_ratio``, ``num_decay_steps`` and
the stable steps between (``warmup_stable_decay``); ``--lr_scheduler_args key=value`` adds or overrides any keyword
(e.g. ``min_lr=1e-6``, ``decay_type=linear``).  ``--lr_scheduler_type`` names any scheduler class
(``torch.optim.lr_scheduler`` name or ``package.Class``), built as ``Class(optimizer, **lr_scheduler_args)``.
The scheduler steps once per *optimizer* step, on every rank.

LoRA+ (``--network_args loraplus_lr_ratio=16``): :func:`lora_param_groups` gives the ``lora_up`` weights the
learning rate times the ratio.  :func:`check_build` builds the optimizer and the schedule on a stand-in parameter,
so bad arguments fail before the DiT loads.
"""

from __future__ import annotations

import ast
import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kandinsky5.common import UserError, get_logger

log = get_logger(__name__)

_ADAFACTOR_DEFAULTS = {"relative_step": False, "scale_parameter": False, "warmup_init": False}


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
    decay: float = 0  # --lr_decay_steps: steps, or a fraction of total_steps when < 1 (warmup_stable_decay)
    min_lr_ratio: float | None = None  # --lr_scheduler_min_lr_ratio (cosine_with_min_lr, warmup_stable_decay, rex)
    timescale: int | None = None  # --lr_scheduler_timescale (inverse_sqrt)
    type: str = ""  # --lr_scheduler_type: a scheduler class (overrides name)
    args: Mapping[str, Any] = field(default_factory=dict)  # --lr_scheduler_args, literal-parsed


def steps_or_fraction(text: str) -> float:
    """argparse type of ``--lr_warmup_steps`` / ``--lr_decay_steps``: ``100``, ``0.05`` or ``5%`` (= 0.05)."""
    import argparse

    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step count, a fraction or a percentage") from None


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


def _import_class(path: str, flag: str = "--optimizer_type") -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{flag} {path}: cannot import {module_name} ({exc}); pip install it") from None
    if not hasattr(module, class_name):
        raise UserError(f"{flag} {path}: {module_name} has no class {class_name}")
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


def build_optimizer(params: Iterable, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """``params``: parameters or parameter groups (:func:`lora_param_groups`)."""
    cls, defaults = optimizer_class(cfg.type)
    kwargs = {**defaults, **cfg.args}
    lr = None if kwargs.get("relative_step") else cfg.learning_rate  # Adafactor's own LR schedule
    params = list(params)
    if lr is None and any(isinstance(g, dict) and "lr" in g for g in params):
        raise UserError("LoRA+ (loraplus_lr_ratio) needs a fixed learning rate; Adafactor relative_step=True has none")
    try:
        return cls(params, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--optimizer_args do not fit {cls.__name__}: {exc}") from None


def check_configs(opt: OptimizerConfig, sched: SchedulerConfig) -> None:
    """Fail fast (before any model is loaded) on an unknown optimizer or schedule name."""
    optimizer_class(opt.type)
    if sched.type:
        _scheduler_class(sched.type)
        return
    names = _scheduler_names() + _EXTRA_SCHEDULERS
    if sched.name.partition(":")[0] != "adafactor" and sched.name not in names:
        raise UserError(f"unknown --lr_scheduler {sched.name!r}; valid: {', '.join(names)}")


def _steps(value: float, total_steps: int, flag: str) -> int:
    if not 0 <= value < math.inf:
        raise UserError(f"{flag} must be >= 0, got {value}")
    return int(round(value * total_steps)) if 0 < value < 1 else int(value)


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    """``--lr_warmup_steps`` as a step count (a value below 1 is a fraction of ``total_steps``)."""
    return _steps(cfg.warmup, total_steps, "--lr_warmup_steps")


def lora_param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float, loraplus_lr_ratio: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one, or with LoRA+ the ``lora_up`` weights apart at ``lr * ratio``."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if loraplus_lr_ratio is None:
        return [{"params": [p for _, p in params]}]
    up = [p for n, p in params if "lora_up" in n]
    if not up:
        raise UserError("--network_args loraplus_lr_ratio: this network has no lora_up weights")
    rest = [p for n, p in params if "lora_up" not in n]
    return [{"params": rest, "lr": lr}, {"params": up, "lr": lr * loraplus_lr_ratio}]


def check_build(opt: OptimizerConfig, sched: SchedulerConfig, total_steps: int, loraplus: float | None) -> None:
    """Build the optimizer and the schedule on stand-in parameters: their arguments fail now, not after the DiT."""
    stand_in = [(f"{n}.weight", torch.nn.Parameter(torch.zeros(2, 2))) for n in ("lora_down", "lora_up")]
    optimizer = build_optimizer(lora_param_groups(stand_in, opt.learning_rate, loraplus), opt)
    build_scheduler(optimizer, sched, total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR schedule over ``total_steps`` optimizer steps."""
    what = f"--lr_scheduler_type {cfg.type}" if cfg.type else f"--lr_scheduler {cfg.name}"
    if not cfg.power > 0:  # polynomial decay to the end: a power <= 0 divides by zero at the last step
        raise UserError(f"--lr_scheduler_power must be > 0, got {cfg.power}")
    if cfg.num_cycles < 1:  # cosine_with_restarts with 0 cycles is a constant LR
        raise UserError(f"--lr_scheduler_num_cycles must be >= 1, got {cfg.num_cycles}")
    try:
        return _build_scheduler(optimizer, cfg, total_steps)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what}: {exc} (fix --lr_scheduler_args or the --lr_* flags)") from None


def _build_scheduler(optimizer, cfg: SchedulerConfig, total_steps: int):
    if cfg.type:
        return _scheduler_class(cfg.type)(optimizer, **cfg.args)
    uses_relative_step = bool(optimizer.defaults.get("relative_step", False))
    adafactor, _, initial_lr = cfg.name.partition(":")  # musubi's "adafactor:<initial lr>" spelling
    if adafactor == "adafactor" or uses_relative_step:
        if not (adafactor == "adafactor" and uses_relative_step):
            raise UserError("--lr_scheduler adafactor goes with --optimizer_type Adafactor and 'relative_step=True'")
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, float(initial_lr or 0.0), **cfg.args)
    warmup = warmup_steps(cfg, total_steps)
    if cfg.name == "rex":
        return rex_schedule(optimizer, total_steps, warmup, cfg.min_lr_ratio, **cfg.args)
    if cfg.name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        return get_piecewise_constant_schedule(optimizer, **cfg.args)
    from transformers import get_scheduler

    names = _scheduler_names()
    if cfg.name not in names:
        raise UserError(f"unknown --lr_scheduler {cfg.name!r}; valid: {', '.join(names + _EXTRA_SCHEDULERS)}")
    specific = {**_scheduler_kwargs(cfg, total_steps, warmup), **cfg.args}
    if cfg.name in _MIN_LR_SCHEDULES and not {"min_lr", "min_lr_rate"} & set(specific):
        raise UserError(f"--lr_scheduler {cfg.name} needs --lr_scheduler_min_lr_ratio or --lr_scheduler_args min_lr=")
    return get_scheduler(cfg.name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=specific or None)  # fmt: skip


def _scheduler_kwargs(cfg: SchedulerConfig, total_steps: int, warmup: int) -> dict[str, Any]:
    """musubi's schedule-specific arguments of ``--lr_scheduler`` (before ``--lr_scheduler_args``)."""
    name = cfg.name
    if name == "cosine_with_restarts":
        return {"num_cycles": cfg.num_cycles}
    if name == "polynomial":
        return {"power": cfg.power}
    if name == "inverse_sqrt":
        return {"timescale": cfg.timescale} if cfg.timescale is not None else {}
    if name in _MIN_LR_SCHEDULES:
        ratio = {"min_lr_rate": cfg.min_lr_ratio} if cfg.min_lr_ratio is not None else {}
        return {"num_cycles": cfg.num_cycles / 2, **ratio}
    if name == "warmup_stable_decay":
        decay = _steps(cfg.decay, total_steps, "--lr_decay_steps")
        if warmup + decay > total_steps:
            raise UserError(f"--lr_warmup_steps ({warmup}) + --lr_decay_steps ({decay}) exceed the {total_steps} steps")
        # transformers derives the stable phase: total - warmup - decay steps (musubi's num_stable_steps)
        return {"num_decay_steps": decay, "num_cycles": cfg.num_cycles / 2, "min_lr_ratio": cfg.min_lr_ratio or 0.0}
    return {}


def rex_schedule(
    optimizer, total_steps: int, warmup: int, min_lr_ratio: float | None, rex_alpha: float = 0.1, rex_beta: float = 0.9
) -> torch.optim.lr_scheduler.LambdaLR:
    """REX (arXiv 2107.04197, musubi's ``rex``): linear warmup from ``min_lr_ratio`` (default 0.01) to 1, then
    ``r + (1 - r) * z / (alpha + beta * z)`` with ``z`` = fraction of the post-warmup steps left; ends at ``r``."""
    r = 0.01 if min_lr_ratio is None else min_lr_ratio
    if not 0 <= r <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {r}")
    remaining = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return r + (1 - r) * step / warmup
        z = max(0.0, (remaining - (step - warmup)) / remaining)
        return r + (1 - r) * z / (rex_alpha + rex_beta * z)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _scheduler_class(path: str) -> type:
    if "." not in path:
        cls = getattr(torch.optim.lr_scheduler, path, None)
        if not isinstance(cls, type):
            raise UserError(f"--lr_scheduler_type {path}: no such class in torch.optim.lr_scheduler")
        return cls
    return _import_class(path, "--lr_scheduler_type")


_EXTRA_SCHEDULERS = ["adafactor", "rex", "piecewise_constant"]
_MIN_LR_SCHEDULES = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")


def _scheduler_names() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType if s.value not in ("reduce_lr_on_plateau", "greedy")]
