"""Which blocks block swap streams, and the weight-memory plan the flags imply (computed on the meta model).

Blocks in forward order are ``text_transformer_blocks.0 .. nt-1`` then ``visual_transformer_blocks.0 .. nv-1``.
``--blocks_to_swap N`` (N > 0) streams the last N + :data:`STAGING` of them through :data:`STAGING` GPU slots
(``kandinsky5.memory.build`` explains the stream model),
so the GPU holds exactly N blocks fewer when the streamed blocks
have one size (always, unless N + 2 > nv and text blocks are streamed too).

The plan counts bytes per state-dict entry with the storage dtype of ``kandinsky5.memory.dtype_policy`` (meta tensors
carry shapes only; fp8 layers carry their fp8 / fp32-scale dtypes after ``fp8.convert_to_fp8``).  It covers
weights only -- activations, LoRA parameters, optimizer state and the CUDA context come on top.

Pro (19,311,325,248 parameters; 2,381,539,328 of them in the fp32 time/modulation set):

* bf16 policy: 2 B x 19.31 B = 38.62 GB if everything were bf16; with the fp32 set 43,385,729,152 B (43.39 GB).
* ``--fp8_base``: the 16,911,433,728 block-linear weights go from 2 B to 1 B + 1/16 B (fp32 scale per 64):
  17,968,398,336 B instead of 33,822,867,456 B, i.e. 15,854,469,120 B (15.85 GB) less: 27,531,260,032 B total.
* each swapped visual block saves 688,079,872 B (bf16) or 436,421,632 B (fp8) of GPU memory.

``--fsdp`` (:func:`sharded_plan`): every tensor is split along dim 0 over the N ranks (FSDP2 pads dim 0 to a
multiple of N), so a rank keeps about 1/N of the weights; on top, while a step runs, the root's weights (embeddings,
time MLP, out layer) are gathered whole, and the blocks are gathered one at a time, with the next one prefetched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from kandinsky5.common import UserError
from kandinsky5.memory.dtype_policy import FP8_DTYPE, SCALE_DTYPE, param_dtype

__all__ = [
    "STAGING",
    "MemoryPlan",
    "memory_plan",
    "block_names",
    "max_blocks_to_swap",
    "streamed_block_names",
    "storage_dtype",
    "stored_dtypes",
    "ShardedPlan",
    "sharded_plan",
]

STAGING = 2  # streamed blocks resident at once: the one computing and the one being copied


def block_names(dit: nn.Module) -> list[str]:
    """Transformer block paths in forward order."""
    text = [f"text_transformer_blocks.{i}" for i in range(len(dit.text_transformer_blocks))]
    return text + [f"visual_transformer_blocks.{j}" for j in range(len(dit.visual_transformer_blocks))]


def max_blocks_to_swap(dit: nn.Module) -> int:
    """Largest useful ``--blocks_to_swap``: every block streamed, 2 of them on the GPU."""
    return len(block_names(dit)) - STAGING


def streamed_block_names(dit: nn.Module, blocks_to_swap: int) -> list[str]:
    """The blocks that live on the CPU for ``--blocks_to_swap N``: the last N + 2 in forward order ([] for 0)."""
    if blocks_to_swap == 0:
        return []
    top = max_blocks_to_swap(dit)
    if not 0 < blocks_to_swap <= top:
        nt, nv = len(dit.text_transformer_blocks), len(dit.visual_transformer_blocks)
        raise UserError(
            f"--blocks_to_swap {blocks_to_swap} is out of range: this model has {nt + nv} blocks ({nt} text + "
            f"{nv} visual) and {STAGING} must stay on the GPU, so the maximum is {top}"
        )
    return block_names(dit)[-(blocks_to_swap + STAGING) :]


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": FP8_DTYPE}


def stored_dtypes(header: dict) -> dict[str, torch.dtype]:
    """key -> checkpoint dtype, from ``loading.read_header`` output (key -> (shape, dtype string, file))."""
    return {k: _SAFETENSORS_DTYPES[v[1]] for k, v in header.items() if v[1] in _SAFETENSORS_DTYPES}


def storage_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype, stored: dict | None = None) -> torch.dtype:
    """The dtype ``key`` is stored in: fp8 layers keep their meta dtypes, everything else follows the policy."""
    if tensor.dtype == FP8_DTYPE:
        return FP8_DTYPE
    if key.endswith(".scale_weight"):
        return SCALE_DTYPE
    return param_dtype(key, dtype, stored=(stored or {}).get(key))


@dataclass(frozen=True)
class MemoryPlan:
    """Weight bytes per place and category (see :func:`memory_plan`)."""

    params: int  # parameter count (scales excluded)
    gpu_fp8: int  # fp8 weights + scales of resident (not streamed) blocks
    gpu_hp: int  # every other resident tensor
    gpu_staging: int  # STAGING x the largest streamed block (0 without swap)
    cpu_swapped: int  # all streamed blocks' masters
    baseline: int  # the same model without fp8 and without swap (policy dtypes)
    blocks_to_swap: int
    streamed: int

    @property
    def gpu(self) -> int:
        return self.gpu_fp8 + self.gpu_hp + self.gpu_staging

    @property
    def total(self) -> int:
        """All weight bytes (GPU resident + CPU masters)."""
        return self.gpu_fp8 + self.gpu_hp + self.cpu_swapped

    def table(self) -> str:
        """The start-up printout: GPU / CPU bytes per category and what fp8 and block swap bought."""
        rows = [("fp8 block linears (resident)", self.gpu_fp8, 0), ("high-precision params (resident)", self.gpu_hp, 0)]
        if self.streamed:
            label = f"swapped blocks ({self.streamed} streamed, {STAGING} on GPU)"
            rows.append((label, self.gpu_staging, self.cpu_swapped))
        rows.append(("total", self.gpu, self.cpu_swapped))
        lines = [f"  {'weights':<44} {'GPU':>10} {'CPU':>10}"]
        lines += [f"  {name:<44} {_fmt(g):>10} {_fmt(c):>10}" for name, g, c in rows]
        lines.append(
            f"  {self.params:,} params; {_fmt(self.baseline)} without fp8 and swap; fp8 saves "
            f"{_fmt(self.baseline - self.total)}, --blocks_to_swap {self.blocks_to_swap} saves "
            f"{_fmt(self.total - self.gpu)} more on the GPU"
        )
        return "\n".join(lines)

    def cpu_line(self) -> str:
        """The printout of a run without a GPU: one line (every weight is in CPU memory; swap moves nothing)."""
        return (
            f"CPU run: {_fmt(self.total)} of weights in CPU memory, {self.params:,} params; fp8 saves "
            f"{_fmt(self.baseline - self.total)} (block swap moves nothing without a GPU)"
        )


def _fmt(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def memory_plan(
    dit: nn.Module, dtype: torch.dtype, blocks_to_swap: int = 0, stored: dict[str, torch.dtype] | None = None
) -> MemoryPlan:
    """Weight bytes implied by the flags, from a (meta) model already converted to fp8 if fp8 is on.

    ``stored`` (key -> checkpoint dtype, see :func:`stored_dtypes`) lets the plan count the conditioning weights in
    the precision they will really have; without it they count as fp32 (the upper bound).
    """
    streamed = streamed_block_names(dit, blocks_to_swap)
    prefixes = tuple(f"{n}." for n in streamed)
    per_block: dict[str, int] = defaultdict(int)
    gpu_fp8 = gpu_hp = params = baseline = 0
    for key, t in dit.state_dict().items():
        nbytes = t.numel() * storage_dtype(key, t, dtype, stored).itemsize
        if not key.endswith(".scale_weight"):
            params += t.numel()
            baseline += t.numel() * param_dtype(key, dtype, stored=(stored or {}).get(key)).itemsize
        if prefixes and key.startswith(prefixes):
            per_block[key[: key.index(".", key.index(".") + 1)]] += nbytes
        elif t.dtype == FP8_DTYPE or key.endswith(".scale_weight"):
            gpu_fp8 += nbytes
        else:
            gpu_hp += nbytes
    staging = min(STAGING, len(per_block)) * max(per_block.values(), default=0)
    swapped = sum(per_block.values())
    return MemoryPlan(params, gpu_fp8, gpu_hp, staging, swapped, baseline, blocks_to_swap, len(streamed))


@dataclass(frozen=True)
class ShardedPlan:
    """Weight bytes of one rank under ``--fsdp`` (see :func:`sharded_plan`)."""

    world_size: int
    full: int  # every weight, unsharded (what one GPU holds without sharding)
    shard: int  # this rank's shards of every tensor (dim 0 padded to a multiple of N, as FSDP2 does)
    root: int  # the root module's weights, gathered whole for the whole step
    gather: int  # all-gather buffers: the two largest blocks whole (the computing one and the prefetched one)

    @property
    def peak(self) -> int:
        return self.shard + self.root + self.gather

    def table(self) -> str:
        n = self.world_size
        rows = [
            (f"shards (1/{n} of every tensor)", self.shard),
            ("root weights gathered for the step", self.root),
            ("all-gather buffers (2 blocks whole)", self.gather),
            ("peak per rank", self.peak),
        ]
        lines = [f"  {'weights per rank, --fsdp over ' + str(n) + ' rank(s)':<44} {'GPU':>10}"]
        lines += [f"  {name:<44} {_fmt(b):>10}" for name, b in rows]
        lines.append(f"  unsharded: {_fmt(self.full)} on every GPU; sharding saves {_fmt(self.full - self.peak)}")
        return "\n".join(lines)


def _shard_bytes(t: torch.Tensor, nbytes: int, world_size: int) -> int:
    rows = t.shape[0] if t.ndim else 1
    return -(-rows // world_size) * (nbytes // max(rows, 1))


def sharded_plan(
    dit: nn.Module, dtype: torch.dtype, world_size: int, stored: dict[str, torch.dtype] | None = None
) -> ShardedPlan:
    """Per-rank weight bytes under ``--fsdp`` over ``world_size`` ranks, from a (meta, fp8-converted) model."""
    blocks = tuple(f"{n}." for n in block_names(dit))
    per_block: dict[str, int] = defaultdict(int)
    full = shard = root = 0
    for key, t in dit.state_dict().items():
        nbytes = t.numel() * storage_dtype(key, t, dtype, stored).itemsize
        full += nbytes
        shard += _shard_bytes(t, nbytes, world_size)
        if key.startswith(blocks):
            per_block[key[: key.index(".", key.index(".") + 1)]] += nbytes
        else:
            root += nbytes
    gather = sum(sorted(per_block.values())[-STAGING:])
    return ShardedPlan(world_size, full, shard, root, gather)


def main(argv=None) -> int:
    """``python -m kandinsky5.memory_plan``: weights + activations plan and the auto choice (``memory.plan_cli``)."""
    from kandinsky5.memory.plan_cli import main as plan_main

    return plan_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
