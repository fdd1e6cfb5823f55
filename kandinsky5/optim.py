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

Training state on disk (``--save_state`` / ``--resume``): a state *directory* is created under a temporary name and
renamed when complete (:func:`write_state_dir`), so a crash never leaves a half-written state.  It holds::

    network.safetensors   LoRA parameters + alpha buffers (the network module's own state_dict)
    optimizer.pt          optimizer.state_dict()
    scheduler.pt          LR scheduler state_dict()
    rng.pt                per rank: python / numpy / torch CPU / CUDA RNG states + the noise generator's state
    progress.json         format, step, epoch, batches done in the epoch, seed, world size, task, LoRA file name

:func:`rotate` deletes numbered checkpoints (files and state directories) beyond the newest N.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kandinsky5.common import UserError, get_logger

__all__ = [
    "OptimizerConfig",
    "SchedulerConfig",
    "parse_kv_args",
    "build_optimizer",
    "build_scheduler",
    "warmup_steps",
    "check_configs",
    "optimizer_name",
    "Progress",
    "capture_rng",
    "restore_rng",
    "write_state_dir",
    "state_writers",
    "read_state_dir",
    "rotate",
]

log = get_logger(__name__)

STATE_FORMAT = 1
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


# ----------------------------------------------------------------------------------------------------------------
# training state on disk (see the module docstring)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # micro-batches of `epoch` this rank has consumed

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def capture_rng(generator: torch.Generator) -> dict:
    """Python, numpy, torch CPU/CUDA global RNG states and the training generator's state."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state(),
    }


def restore_rng(state: Mapping, generator: torch.Generator | None = None) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        generator.set_state(state["generator"])


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def write_state_dir(path: Path, writers: Mapping[str, Callable[[Path], None]]) -> Path:
    """Create directory ``path`` atomically: each ``writers[name](file)`` writes into a temp dir, then renames.

    An existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, write in writers.items():
            write(tmp / name)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def state_writers(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    progress: Progress,
    rng: list[dict],
    info: Mapping[str, Any],
) -> dict[str, Callable[[Path], None]]:
    """What a state directory holds (see ``read_state_dir``)."""
    from safetensors.torch import save_file

    lora = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    meta = {"format": STATE_FORMAT, **progress.to_json(), **info}
    return {
        "network.safetensors": lambda p: save_file(lora, str(p)),
        "optimizer.pt": lambda p: torch.save(optimizer.state_dict(), p),
        "scheduler.pt": lambda p: torch.save(scheduler.state_dict(), p),
        "rng.pt": lambda p: torch.save(rng, p),
        "progress.json": lambda p: p.write_text(json.dumps(meta, indent=1)),
    }


def read_state_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict, dict, list[dict]]:
    """(progress json, network state dict, optimizer state, scheduler state, per-rank RNG states)."""
    from safetensors.torch import load_file

    path = Path(path)
    needed = ("progress.json", "network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
    missing = [n for n in needed if not (path / n).is_file()]
    if not path.is_dir() or missing:
        raise UserError(f"--resume {path}: not a training state directory (missing {', '.join(missing) or path})")
    meta = json.loads((path / "progress.json").read_text())
    if meta.get("format") != STATE_FORMAT:
        raise UserError(f"--resume {path}: state format {meta.get('format')} is not {STATE_FORMAT}")
    return (
        meta,
        load_file(str(path / "network.safetensors")),
        torch.load(path / "optimizer.pt", weights_only=True),
        torch.load(path / "scheduler.pt", weights_only=True),
        torch.load(path / "rng.pt", weights_only=False),  # python/numpy RNG tuples; our own file
    )


def rotate(directory: Path, pattern: str, keep: int, current: int) -> list[Path]:
    """Delete the checkpoints matching ``pattern`` (one ``(\\d+)`` group: the step or epoch) numbered <= ``current``,
    except the newest ``keep`` numbers; a number's LoRA file and state directory go together.  Returns what was
    deleted.  Higher numbers (e.g. left by an earlier, longer run) are never touched."""
    rx = re.compile(pattern)
    found: dict[int, list[Path]] = {}
    for p in sorted(Path(directory).iterdir()) if Path(directory).is_dir() else ():
        m = rx.fullmatch(p.name)
        if m and int(m.group(1)) <= current:
            found.setdefault(int(m.group(1)), []).append(p)
    numbers = sorted(found)
    doomed = [p for n in numbers[: max(0, len(numbers) - keep)] for p in found[n]] if keep > 0 else []
    for p in doomed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return doomed
