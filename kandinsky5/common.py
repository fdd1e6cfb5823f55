"""Small shared helpers: logging, dtype/device parsing, seeding, atomic file writes, user-facing errors.

Logging (every script): the root handler writes through ``tqdm.write``, so a log line never lands inside a progress
bar (open bars are cleared, the line is printed, the bars are redrawn); Python warnings go through it as well.  Known
third-party noise is dropped at the source logger, by message, so our own warnings and every other warning of those
libraries still show: bitsandbytes' "Failed to load CPU gemm_4bit_forward ... pip install kernels" (printed at import
on CPUs with AVX512-BF16; the kernel only matters for 4-bit matmuls on the CPU) and transformers' "Loading weights" /
"Writing model shards" bars (one per model, twice per script for Qwen + CLIP; see :func:`quiet_hf_progress`).

Nothing here imports a model; every other module may import this one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

__all__ = [
    "UserError",
    "get_logger",
    "configure_logging",
    "close_progress_bars",
    "quiet_hf_progress",
    "parse_dtype",
    "resolve_device",
    "seed_everything",
    "atomic_path",
    "run_cli",
    "DEBUG_FLAG",
    "DTYPES",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class UserError(Exception):
    """A problem with the user's input: scripts print its one-line message (no traceback) and exit 1."""


DEBUG_FLAG = "--debug"  # every script accepts it: errors then also print the full traceback
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def require_counts(args, names: Sequence[str]) -> None:
    """Each flag in ``names`` (argparse dests) that was given is >= 1: one line naming the first that is not."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``.  A ``UserError`` -- or an ``OSError`` of the environment (disk full, read-only,
    permission) that escaped the guarded writers -- becomes one ``error: ...`` line on stderr, the last thing
    printed, and exit status 1; with ``--debug`` in ``argv`` the full traceback comes first."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except (UserError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        close_progress_bars()
        if DEBUG_FLAG in args:
            import traceback

            traceback.print_exc()
        message = _one_line(str(exc)) if isinstance(exc, UserError) else f"{exc.filename or 'a file'}: {exc.strerror}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1


def _one_line(message: str) -> str:
    """A UserError re-raised by a DataLoader worker carries the worker's traceback text: keep its last line, the
    original message; anything else multi-line is joined."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and any("Traceback (most recent call last)" in line for line in lines):
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and head.replace(".", "").replace("_", "").isalnum() else last
    return " ".join(message.split())


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# logger name -> message prefixes dropped from it (third-party noise that says nothing about this run)
THIRD_PARTY_NOISE: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}
# transformers progress bars that only say a local file is being read or written
QUIET_HF_BARS = ("Loading weights", "Writing model shards")


class TqdmHandler(logging.Handler):
    """A stderr handler that prints through ``tqdm.write``: bars are cleared first and redrawn after the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the caller; the stdlib reports it on stderr
            self.handleError(record)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def configure_logging(level: int = logging.INFO) -> None:
    """Install the tqdm-aware root handler (unless the root logger already has one, e.g. under pytest or an
    application that configured logging itself) and the third-party noise filters.  Idempotent."""
    root = logging.getLogger()
    if not root.handlers:
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(True)  # warnings.warn output goes through the handler too, never into a bar
    for name, prefixes in THIRD_PARTY_NOISE.items():
        source = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in source.filters):
            source.addFilter(_DropMessages(prefixes))


def get_logger(name: str) -> logging.Logger:
    """A module logger; logging is configured (:func:`configure_logging`) the first time one is asked for."""
    configure_logging()
    return logging.getLogger(name)


def close_progress_bars() -> None:
    """Close every open tqdm bar (each ends its line), so that an error message that follows starts a line of its
    own and no bar is redrawn after it."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; without it there are no bars to close
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a bar that cannot close must not hide the error
            bar.close()


def quiet_hf_progress() -> None:
    """Hide transformers' per-file "Loading weights" / "Writing model shards" bars (a local read or write that takes
    a second); every other bar, the hub's download bars included, stays.  Call before ``from_pretrained``."""
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):  # older transformers: keep its bars
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in QUIET_HF_BARS:
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16 (and likewise fp16, fp32)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; use one of: bfloat16, float16, float32") from None


def resolve_device(name: str | None = None) -> torch.device:
    """'cuda' when available unless a device is named; a named CUDA device without CUDA is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no CUDA device is available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but seeding must not be what fails without it
        return
    np.random.seed(seed % 2**32)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on error delete it.

    Readers therefore see either the old file or the complete new one, never a half-written file.  The temporary
    name is ``.<name>.<8 random chars>.<pid>.tmp`` (``kandinsky5.files.remove_orphans`` recognises the leftovers of
    killed processes by it).  The final file gets the usual ``0666 & ~umask`` mode, whatever the writer did (mkstemp
    and safetensors create 0600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
