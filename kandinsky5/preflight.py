"""Start-up checks shared by the four scripts, run before any model loads: output directories are writable and
have room for what the run will write, and this tool's leftovers of killed runs are cleaned up.

* :func:`check_output_dir` creates the directory (and any missing parents), creates and removes a probe file in it,
  and compares the free space with the estimated size of the outputs; every directory it created is removed again,
  so a run that stops at a later check leaves no trace.  Problems are one :class:`~kandinsky5.common.UserError`
  line naming the flag, the directory, the problem and the fix.
* :func:`clean_leftovers` removes orphaned temporary files (``kandinsky5.files.remove_orphans``) and logs them.
* :func:`check_not_overwriting` refuses existing files unless the user asked to replace them (``--overwrite``).
* :func:`warn_task_mismatch` compares the ``k5_task`` recorded in a checkpoint with the task of the run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TaskConfig
from kandinsky5.files import remove_orphans, write_reason

__all__ = [
    "human_bytes",
    "check_output_dir",
    "check_output_files",
    "clean_leftovers",
    "check_not_overwriting",
    "warn_task_mismatch",
]

log = get_logger(__name__)

_MARGIN = 16 << 20  # headroom on top of every estimate (headers, logs, the file system's own needs)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _missing_dirs(directory: Path) -> list[Path]:
    """``directory`` and its parents that do not exist yet, outermost last."""
    missing, p = [], directory.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def check_output_dir(directory: str | os.PathLike, what: str, need_bytes: int = 0, fix: str = "") -> None:
    """Raise one line unless ``directory`` can be created and written and has ``need_bytes`` (+ margin) free.

    ``what`` names the flag (``--output_dir``); ``fix`` is added to the free-space message (e.g. "or lower
    --save_last_n_steps").
    """
    directory = Path(directory)
    created = _missing_dirs(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _probe(directory, what)
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise UserError(f"{what} {directory} cannot be used: {_dir_reason(exc, directory)}") from None
    finally:
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()
    if need_bytes and free < need_bytes + _MARGIN:
        raise UserError(
            f"{what} {directory}: only {human_bytes(free)} free on its disk, but this run writes about "
            f"{human_bytes(need_bytes)}; free some space{', ' + fix if fix else ''} or choose another {what}"
        )


def check_output_files(files: Iterable[tuple[Path, int]], what: str, fix: str = "") -> None:
    """:func:`check_output_dir` for the directories of ``(path, estimated bytes)`` pairs (bytes summed per
    directory), after removing this tool's leftovers there."""
    per_dir: dict[Path, int] = {}
    for path, nbytes in files:
        per_dir[Path(path).parent] = per_dir.get(Path(path).parent, 0) + nbytes
    clean_leftovers(per_dir)
    for directory, nbytes in per_dir.items():
        check_output_dir(directory, what, nbytes, fix)


def _probe(directory: Path, what: str) -> None:
    if not directory.is_dir():
        raise UserError(f"{what} {directory} is not a directory (a file is in the way); choose another {what}")
    probe = directory / f".k5-write-probe.{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"k5")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _dir_reason(exc: OSError, directory: Path) -> str:
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way (a path component is a file, not a directory)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (not writable by this user)"
    return write_reason(exc, directory)


def clean_leftovers(directories: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove this tool's orphaned temporary files in each existing directory (logged); returns what went."""
    removed: list[Path] = []
    for directory in dict.fromkeys(Path(d) for d in directories):
        removed += remove_orphans(directory)
    return removed


def check_not_overwriting(paths: Iterable[Path], overwrite: bool, what: str, fix: str) -> None:
    """One line listing the existing ``paths`` unless ``overwrite``; ``fix`` says how to proceed."""
    existing = [p for p in paths if p.exists()]
    if not existing or overwrite:
        return
    names = ", ".join(p.name for p in existing[:3]) + (f" (+{len(existing) - 3} more)" if len(existing) > 3 else "")
    raise UserError(f"{what} {existing[0].parent} already holds {names}; {fix}")


def _family(task_name: str) -> str:
    return "I2V" if "i2v" in task_name else "T2V"


def warn_task_mismatch(path: str | os.PathLike, metadata: dict[str, str], task: TaskConfig, what: str) -> None:
    """Warn once when a checkpoint's recorded ``k5_task`` is of another family (T2V/I2V) or model than ``task``."""
    trained = metadata.get("k5_task")
    if not trained or trained == task.name:
        return
    if _family(trained) != _family(task.name):
        log.warning(
            "%s %s was made for %s (%s) but is used with %s (%s); pick the matching --task or file",
            what, path, trained, _family(trained), task.name, _family(task.name),
        )  # fmt: skip
    elif trained.split("-")[:2] != task.name.split("-")[:2]:
        log.warning("%s %s was made for %s but is used with %s", what, path, trained, task.name)
