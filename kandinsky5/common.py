"""Small shared helpers: logging, dtype/device parsing, seeding, atomic file writes, user-facing errors.

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


def _close_progress_bars() -> None:
    """Close every open tqdm bar, so nothing is redrawn after (or glued to) the error line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        with contextlib.suppress(Exception):  # a bar that cannot close must not hide the error
            bar.close()


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
        _close_progress_bars()
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


def get_logger(name: str) -> logging.Logger:
    """A module logger; the root handler is configured once, at INFO, the first time one is asked for."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return logging.getLogger(name)


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
