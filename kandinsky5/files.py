"""Guarded file I/O: every ``.safetensors``, ``.pt`` and ``.json`` file the project reads or writes goes through here.

Layer 0 (stdlib, torch, safetensors and ``kandinsky5.common`` only), so ``dataset`` and ``networks`` use it too.

Reading.  :func:`read_safetensors_header` checks a file before safetensors touches it: the 8-byte header size is
bounded (by the file size and 100 MB, so a bogus size never allocates gigabytes), the header is a JSON object,
every tensor entry has a known dtype, a shape and ``data_offsets`` that lie inside the file and match the shape.
Anything else is one :class:`~kandinsky5.common.UserError` line naming the file (and the flag that gave it), the
problem and the likely cause, e.g. "``--dit x.safetensors`` is not a complete .safetensors file (header says 9 GB
of tensor data, the file has 2 GB after the header: truncated download?)".  :func:`open_safetensors`,
:func:`load_safetensors`, :func:`load_torch` and :func:`read_json` build on it.

Writing.  :func:`save_safetensors`, :func:`save_torch` and :func:`write_text` write to a temporary name and rename
(``common.atomic_path``); :func:`guarded_write` wraps any other writer (PyAV, Pillow).  A failure -- ``OSError``
(no space, read-only, permission), a ``SafetensorError`` or torch's ``RuntimeError`` from a short write -- is a
:class:`WriteError` line naming the file and the reason; the temporary file is removed and the old file is kept.

Temporary names (all start with ``.``, so listings skip them) and :func:`remove_orphans`:

===================================  ==================================================================
``.<name>.<8 chars>.<pid>.tmp``      a file being written (``common.atomic_path``)
``.<name>.tmp-<pid>``                a state directory being written (``kandinsky5.train.state``)
``.<name>.old-<pid>``                the previous state directory while the new one is renamed in
``.<name>.del-<pid>``                a rotated-out checkpoint directory being deleted
===================================  ==================================================================

A killed process leaves them behind; :func:`remove_orphans` deletes those whose process is no longer running
(an ``.old-`` directory whose real name is missing is renamed back instead: it is the last complete state).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kandinsky5.common import UserError, atomic_path, get_logger

__all__ = [
    "WriteError",
    "TensorInfo",
    "SafetensorsHeader",
    "read_safetensors_header",
    "open_safetensors",
    "load_safetensors",
    "load_torch",
    "read_json",
    "guarded_write",
    "save_safetensors",
    "save_torch",
    "write_text",
    "write_reason",
    "remove_orphans",
    "pid_alive",
]

log = get_logger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_WRITE_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file is in the way of the directory",
    errno.EISDIR: "a directory is in the way of the file",
    errno.EEXIST: "a file is in the way of the directory",
}
_LEGACY_TMP_AGE_S = 600  # temp files without a pid (older versions) are removed once this old


class WriteError(UserError):
    """A file could not be written (disk full, read-only, permission ...); the previous file is untouched."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # begin, end within the data section


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file (no tensor data read)."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def _name(path: Path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------------------


def _require_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise UserError(f"{_name(path, what)} is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{_name(path, what)} does not exist")


def _not_safetensors(path: Path, what: str, head: bytes) -> UserError:
    """Say what the file looks like instead (pickle, zip, text, Git LFS pointer, HTML page)."""
    if head.startswith(b"version https://git-lfs"):
        kind = "a Git LFS pointer, not the weights (run `git lfs pull`, or download the file itself)"
    elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        kind = "a PyTorch pickle (.pt / .bin / .ckpt), not .safetensors; convert it or pass a .safetensors file"
    elif head.lstrip()[:1] == b"<":
        kind = "an HTML/XML page (a failed download?), not .safetensors"
    elif head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256]):
        kind = "a text file, not .safetensors"
    else:
        kind = "not a .safetensors file (no valid header)"
    return UserError(f"{_name(path, what)} is {kind}")


def _truncated(path: Path, what: str, detail: str) -> UserError:
    return UserError(f"{_name(path, what)} is not a complete .safetensors file ({detail}: truncated download?)")


def read_safetensors_header(path: str | os.PathLike, what: str = "") -> SafetensorsHeader:
    """Validate and return the header of a safetensors file; one-line ``UserError`` for anything wrong."""
    path = Path(path)
    _require_file(path, what)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
                raise _bad_length(path, what, head + fh.read(248), length, size)
            raw = fh.read(length)
    except OSError as exc:
        raise UserError(f"{_name(path, what)} cannot be read: {_first_line(exc)}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):  # the size prefix fits the file, but no JSON object follows it
        raise UserError(
            f"{_name(path, what)} is not a valid .safetensors file (corrupt header); re-download or rebuild it"
        )
    return _parse_header(path, what, header, size - 8 - length)


def _bad_length(path: Path, what: str, head: bytes, length: int, size: int) -> UserError:
    if size == 0:
        return UserError(f"{_name(path, what)} is empty (0 bytes: an interrupted download or copy?)")
    if head[8:9] == b"{" and 2 <= length <= MAX_HEADER_BYTES:
        return _truncated(path, what, f"its header needs {length} bytes, the file has {size}")
    return _not_safetensors(path, what, head)


def _parse_header(path: Path, what: str, header: dict, data_bytes: int) -> SafetensorsHeader:
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{_name(path, what)} has a malformed __metadata__ entry (values must be strings)")
    tensors: dict[str, TensorInfo] = {}
    needed = 0
    for key, info in header.items():
        tensors[key] = _tensor_info(path, what, key, info)
        needed = max(needed, tensors[key].offsets[1])
    if needed > data_bytes:
        detail = f"its header lists {needed} bytes of tensor data, the file has {data_bytes}"
        raise _truncated(path, what, detail)
    return SafetensorsHeader(path, tensors, dict(metadata))


def _tensor_info(path: Path, what: str, key: str, info: Any) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = isinstance(dtype, str) and all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok or end < begin:
        raise UserError(f"{_name(path, what)} has a malformed header entry for tensor {key!r}")
    numel = 1
    for n in shape:
        numel *= n
    if dtype in DTYPE_BYTES and numel * DTYPE_BYTES[dtype] != end - begin:
        raise UserError(
            f"{_name(path, what)}: tensor {key!r} {dtype}{list(shape)} needs {numel * DTYPE_BYTES[dtype]} bytes but "
            f"the header gives it {end - begin}; the file is damaged"
        )
    return TensorInfo(dtype, shape, (begin, end))


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, what: str = "", device: str = "cpu") -> Iterator[Any]:
    """``safe_open`` after :func:`read_safetensors_header`; read errors inside the block become one line."""
    path = Path(path)
    read_safetensors_header(path, what)
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            yield handle
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserError(f"{_name(path, what)} cannot be read as safetensors: {_first_line(exc)}") from None


def load_safetensors(
    path: str | os.PathLike, what: str = "", keys: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a validated safetensors file; ``keys`` filters which tensors are read."""
    with open_safetensors(path, what) as f:
        return {k: f.get_tensor(k) for k in f.keys() if keys is None or keys(k)}, dict(f.metadata() or {})


def load_torch(path: str | os.PathLike, what: str = "", weights_only: bool = True) -> Any:
    """``torch.load`` to the CPU; a missing, truncated or foreign file is one line."""
    import pickle
    import zipfile

    path = Path(path)
    _require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise UserError(f"{_name(path, what)} is damaged or not a PyTorch checkpoint ({_first_line(exc)})") from None


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    path = Path(path)
    _require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{_name(path, what)} is not valid JSON (damaged?): {_first_line(exc)}") from None


# ------------------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------------------


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    found = re.search(r"os error (\d+)|code: (\d+)", str(exc))
    return int(found.group(1) or found.group(2)) if found else None


def write_reason(exc: BaseException, directory: Path | None = None) -> str:
    """Short reason for a failed write: 'no space left on device', 'read-only file system', ..."""
    code = _errno_of(exc)
    if code in _WRITE_REASONS:
        return _WRITE_REASONS[code]
    if directory is not None and code is None:  # torch.save reports a short write as "unexpected pos ..."
        with contextlib.suppress(OSError):
            if shutil.disk_usage(_existing_parent(directory)).free < 1 << 20:
                return _WRITE_REASONS[errno.ENOSPC]
    return _first_line(exc)


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def guarded_write(path: str | os.PathLike, what: str = "") -> Iterator[Path]:
    """``atomic_path(path)`` whose failures (OSError, SafetensorError, torch's short-write RuntimeError) are a
    :class:`WriteError` naming the file; the old file, if any, is kept."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except WriteError:
        raise
    except (OSError, SafetensorError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _is_write_runtime_error(exc):
            raise
        reason = write_reason(exc, path.parent)
        kept = "; the existing file was kept" if path.exists() else ""
        raise WriteError(f"cannot write {_name(path, what)}: {reason}{kept}", reason) from None


def _is_write_runtime_error(exc: RuntimeError) -> bool:
    text = str(exc)
    return "inline_container" in text or "file write failed" in text or "PytorchStreamWriter" in text


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
    what: str = "",
) -> None:  # fmt: skip
    from safetensors.torch import save_file

    with guarded_write(path, what) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)


def save_torch(obj: Any, path: str | os.PathLike, what: str = "") -> None:
    with guarded_write(path, what) as tmp:
        torch.save(obj, tmp)


def write_text(path: str | os.PathLike, text: str, what: str = "") -> None:
    with guarded_write(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------
# orphaned temporary files
# ------------------------------------------------------------------------------------------------------------

_TMP_FILE = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.(?P<pid>\d+)\.tmp")
_LEGACY_TMP_FILE = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
_TMP_DIR = re.compile(r"\.(?P<target>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or not ours to judge): leave its files alone
    return True


def remove_orphans(directory: str | os.PathLike) -> list[Path]:
    """Delete this tool's temporary files and folders in ``directory`` left by killed processes; returns them.

    Only names made by ``common.atomic_path`` and the state writer match (see the module docstring), and only when
    their process is gone; everything else is left alone.  An orphaned ``.old-`` state whose real name is missing
    is restored to that name.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        action = _orphan_action(entry)
        if action is None:
            continue
        try:
            if action == "restore":
                target = entry.with_name(_TMP_DIR.fullmatch(entry.name)["target"])
                os.replace(entry, target)
                log.warning("restored %s from the leftover %s of an interrupted save", target, entry.name)
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError as exc:
            log.warning("could not remove the leftover %s: %s", entry, _first_line(exc))
            continue
        removed.append(entry)
    if removed:
        log.info("removed %d leftover temporary file(s) of interrupted runs in %s: %s", len(removed), directory,
                 ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def _orphan_action(entry: Path) -> str | None:
    """'delete', 'restore' or None (not ours, or its process still runs)."""
    name = entry.name
    if (m := _TMP_FILE.fullmatch(name)) and entry.is_file():
        return None if pid_alive(int(m["pid"])) else "delete"
    if (m := _TMP_DIR.fullmatch(name)) and entry.is_dir():
        if pid_alive(int(m["pid"])):
            return None
        if m["kind"] == "old" and not entry.with_name(m["target"]).exists():
            return "restore"
        return "delete"
    if _LEGACY_TMP_FILE.fullmatch(name) and entry.is_file():
        with contextlib.suppress(OSError):
            if entry.stat().st_mtime < time.time() - _LEGACY_TMP_AGE_S:
                return "delete"
    return None
