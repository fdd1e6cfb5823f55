"""Load official Kandinsky 5 DiT checkpoints (``.safetensors``) into :class:`kandinsky5.model.dit.DiT`, strictly
and streamed.

The model is built on the meta device (no memory), every tensor is read from the memory-mapped safetensors file one
at a time, converted to its target dtype/device and assigned in place, so peak host memory is about one copy of the
model in its *target* dtype (never a full fp32 copy of a 19B model).

Accepted inputs: one ``.safetensors`` file (official release, bf16 or fp32), or a directory of them (diffusers-style
shards); keys may carry a ComfyUI ``model.diffusion_model.`` / ``diffusion_model.`` prefix, which is stripped.

Every check is strict: a checkpoint that does not fit the task fails with one line naming the task, the file and the
first missing / unexpected / mis-shaped key.

dtype policy: :mod:`kandinsky5.memory.dtype_policy` (``param_dtype`` is re-exported here).
A :class:`LoadTransform` may take
over the per-tensor step (fp8 quantisation and per-block placement in :func:`kandinsky5.memory.build_dit`): it sees
each tensor alone, so quantising while streaming never holds more than one high-precision tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TaskConfig
from kandinsky5.files import open_safetensors, read_safetensors_header
from kandinsky5.memory.dtype_policy import FP32_PARAMS, load_dtype, param_dtype
from kandinsky5.model.dit import AttentionSpec, DiT

__all__ = [
    "load_dit",
    "param_dtype",
    "checkpoint_files",
    "read_header",
    "checkpoint_metadata",
    "file_fingerprint",
    "FP32_PARAMS",
    "LoadTransform",
    "check_checkpoint_fits",
    "iter_row_slices",
]

log = get_logger(__name__)

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


@dataclass(frozen=True)
class LoadTransform:
    """Per-tensor hook of :func:`load_dit`: ``fn(key, cpu_tensor) -> {key: final tensor, ...}``.

    ``fn`` chooses dtype and device of what it returns and may create keys the checkpoint lacks (e.g. an fp8
    ``<module>.scale_weight``); those must be listed in ``adds`` so the strict fit check accepts their absence.
    """

    fn: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]
    adds: frozenset[str] = frozenset()


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) behind ``--dit``; a clear error when there are none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError(f"--dit {path} is a directory without .safetensors files; pass the checkpoint file")
        return files
    if not path.exists():
        raise UserError(f"DiT checkpoint not found: {path} (check --dit)")
    if path.suffix != ".safetensors":
        raise UserError(f"DiT checkpoint {path} is not a .safetensors file; the official releases are safetensors")
    return [path]


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def read_header(files: list[Path], what: str = "--dit") -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """key -> (shape, safetensors dtype string, file), reading only the (validated) JSON headers."""
    out: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for file in files:
        for key, info in read_safetensors_header(file, what).tensors.items():
            key = _strip(key)
            if key in out:  # shards split the keys; a repeat means several whole checkpoints side by side
                first = out[key][2].name
                raise UserError(f"{what} {file.parent}: {first} and {file.name} both hold {key!r}, so they are "
                                "separate checkpoints, not shards of one; pass one file")  # fmt: skip
            out[key] = (info.shape, info.dtype, file)
    return out


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a DiT checkpoint (first shard), e.g. ``k5_task`` in files written by this tool."""
    return read_safetensors_header(checkpoint_files(path)[0], "--dit").metadata


def _check_fit(task: TaskConfig, expected: dict[str, tuple[int, ...]], found: dict, name: str) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [k for k in expected if k in found and tuple(found[k][0]) != tuple(expected[k])]
    if not (missing or unexpected or misshaped):
        return
    if misshaped:
        k = misshaped[0]
        first = f"mis-shaped key {k!r} (checkpoint {list(found[k][0])}, task {list(expected[k])})"
    elif missing:
        first = f"missing key {missing[0]!r}"
    else:
        first = f"unexpected key {unexpected[0]!r}"
    raise UserError(
        f"checkpoint {name} does not fit task {task.name}: {first} "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped); "
        f"pick the --task that matches this checkpoint (python kandinsky5_generate_video.py --help lists them)"
    )


def check_checkpoint_fits(
    task: TaskConfig, dit: torch.nn.Module, files: list[Path], adds: frozenset[str] = frozenset(), name: str = ""
) -> dict[str, tuple[int, ...]]:
    """Strict fit of the checkpoint ``files`` to the (meta) model ``dit``; ``adds`` are keys a loader makes itself.
    Returns key -> expected shape; a misfit is a one-line ``UserError``."""
    expected = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    made = {k: (expected[k], "made by transform", None) for k in adds if k in expected}
    _check_fit(task, expected, {**made, **read_header(files)}, name or str(files[0]))
    return expected


def iter_row_slices(files: list[Path], rows: dict[str, tuple[int, int]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (stripped key, CPU tensor of rows [start, stop) along dim 0) for the keys in ``rows``, reading only those
    rows from the memory-mapped files (what one rank of a sharded load keeps)."""
    for file in files:
        with open_safetensors(file, "--dit") as f:
            for raw in f.keys():
                key = _strip(raw)
                if key in rows:
                    start, stop = rows[key]
                    yield key, f.get_slice(raw)[start:stop]


def iter_tensors(files: list[Path], keys: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (stripped key, CPU tensor) one at a time from memory-mapped files."""
    for file in files:
        with open_safetensors(file, "--dit") as f:
            for raw in f.keys():
                key = _strip(raw)
                if key in keys:
                    yield key, f.get_tensor(raw)


def load_dit(
    task: TaskConfig,
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attention: AttentionSpec | None = None,
    convert: Callable[[DiT], None] | None = None,
    transform: LoadTransform | None = None,
) -> DiT:
    """Build ``task``'s DiT on meta, stream the checkpoint into it (strict) and return it on ``device``.

    ``convert`` may change the meta model before loading (e.g. swap Linears for fp8 ones); it must keep the keys.
    ``transform`` replaces the default per-tensor cast/move (``device``/``dtype`` are then the transform's business).
    """
    files = checkpoint_files(path)
    with torch.device("meta"):
        dit = DiT(task.dit, attention)
    if convert is not None:
        convert(dit)
    expected = check_checkpoint_fits(task, dit, files, transform.adds if transform else frozenset(), str(path))
    state = {}
    for key, tensor in iter_tensors(files, expected):
        if transform is not None:
            state.update(transform.fn(key, tensor))
            continue
        state[key] = tensor.to(device=device, dtype=load_dtype(key, tensor, dtype))
    dit.load_state_dict(state, strict=True, assign=True)
    log.info("loaded DiT %s for %s: %d tensors, weights %s (time/modulation as stored)", path, task.name, len(state),
             dtype)  # fmt: skip
    return dit


def file_fingerprint(path: str | Path, nbytes: int = 1 << 20) -> str:
    """Short, cheap identity of a (large) file: sha256 of its size, header and first ``nbytes`` bytes."""
    h = hashlib.sha256()
    for file in checkpoint_files(path) if Path(path).is_dir() else [Path(path)]:
        h.update(str(file.stat().st_size).encode())
        with open(file, "rb") as fh:
            h.update(fh.read(nbytes))
    return h.hexdigest()[:16]
