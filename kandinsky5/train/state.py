"""Training state on disk (``--save_state`` / ``--resume``): progress, the RNG states of every rank, state
directories and the rotation of numbered checkpoints.

A state *directory* is created under a temporary name and renamed when complete
(:func:`write_state_dir`), so a crash never leaves a half-written state.  It holds::

    network.safetensors   LoRA parameters + alpha buffers (the network module's own state_dict, whole)
    optimizer.pt          optimizer.state_dict() -- or, under --fsdp, optimizer/: the sharded optimizer state as a
                          torch.distributed.checkpoint directory (one file per rank + .metadata)
    scheduler.pt          LR scheduler state_dict()
    rng.pt                per rank: python / numpy / torch CPU / CUDA RNG states + the noise generator's state
    progress.json         format, step, epoch, batches done in the epoch, seed, world size, task, LoRA file name,
                          and what ``--resume`` must match: mixed precision, optimizer class, network module,
                          dim, alpha and args (``kandinsky5.train.startup.check_resume``); written last
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.files import (
    WriteError,
    load_safetensors,
    load_torch,
    read_json,
    save_safetensors,
    save_torch,
    write_reason,
    write_text,
)

log = get_logger(__name__)


STATE_FORMAT = 1


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

    An existing ``path`` is replaced only after the new one is complete; a failed write (disk full ...) is a
    ``WriteError`` line and leaves the old directory as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, write in writers.items():
            write(tmp / name)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        reason = write_reason(exc, path.parent)
        raise WriteError(f"cannot write the state directory {path}: {reason}", reason) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def state_writers(
    network_sd: Mapping[str, torch.Tensor],
    optimizer_files: Mapping[str, Callable[[Path], None]],
    scheduler,
    progress: Progress,
    rng: list[dict],
    info: Mapping[str, Any],
) -> dict[str, Callable[[Path], None]]:
    """What a state directory holds (see ``read_state_dir``); ``optimizer_files`` come from the training engine
    (``optimizer.pt``, or the sharded ``optimizer/`` directory under --fsdp)."""
    lora = {k: v.detach().cpu().contiguous() for k, v in network_sd.items()}
    meta = {"format": STATE_FORMAT, **progress.to_json(), **info}
    return {
        "network.safetensors": lambda p: save_safetensors(lora, p),
        **optimizer_files,
        "scheduler.pt": lambda p: save_torch(scheduler.state_dict(), p),
        "rng.pt": lambda p: save_torch(rng, p),
        "progress.json": lambda p: write_text(p, json.dumps(meta, indent=1)),  # last: its presence marks a full state
    }


_STATE_FILES = ("progress.json", "network.safetensors", "scheduler.pt", "rng.pt")


def read_progress(path: Path) -> dict:
    """``progress.json`` of a state directory, checked for the files and the format (no tensors are read);
    ``sharded`` is set when the optimizer state is a ``torch.distributed.checkpoint`` directory (--fsdp)."""
    path = Path(path)
    missing = [n for n in _STATE_FILES if not (path / n).is_file()]
    sharded = (path / "optimizer" / ".metadata").is_file()
    if not sharded and not (path / "optimizer.pt").is_file():
        missing.append("optimizer.pt")
    if not path.is_dir() or missing:
        raise UserError(f"--resume {path}: not a training state directory (missing {', '.join(missing) or path})")
    meta = read_json(path / "progress.json", "--resume")
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"--resume {path}: state format {found} is not {STATE_FORMAT}")
    return {**meta, "sharded": sharded}


def read_state_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict | Path, dict, list[dict]]:
    """(progress json, network state dict, optimizer state -- or the path of a sharded one, scheduler state,
    per-rank RNG states)."""
    path = Path(path)
    meta = read_progress(path)
    return (
        meta,
        load_safetensors(path / "network.safetensors", "--resume")[0],
        path / "optimizer" if meta["sharded"] else load_torch(path / "optimizer.pt", "--resume"),
        load_torch(path / "scheduler.pt", "--resume"),
        load_torch(path / "rng.pt", "--resume", weights_only=False),  # python/numpy RNG tuples; our own file
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
        if p.is_dir():  # renamed first, so a state folder never stays half-deleted under its real name
            gone = p.with_name(f".{p.name}.del-{os.getpid()}")
            os.replace(p, gone)
            shutil.rmtree(gone)
        else:
            p.unlink()
    return doomed
