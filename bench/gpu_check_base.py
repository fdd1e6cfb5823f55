"""Shared pieces of ``bench/gpu_check.py``: the result row, the problem sizes of each mode (full, ``--quick``,
``--dry_run``), the run settings, and the measuring helpers (synchronised median time, peak CUDA memory, the
synchronisation debug mode, random Pro-like weights).  Times are seconds; memory is bytes, printed as GiB."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from kandinsky5.configs import PRO_DIT, TINY_DIT, DiTConfig


@dataclass
class Row:
    check: str
    config: str
    result: str
    status: str  # ok | FAIL | warn | skip
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode (full, quick or dry run)."""

    nabla_heads: tuple[tuple[str, int, int], ...]  # (name, heads, head dim)
    nabla_grids: tuple[tuple[int, int, int], ...]  # token grids (T, Hg, Wg); the first is the accuracy grid
    swap_dit: DiTConfig
    swap_n: int
    swap_configs: tuple[tuple[bool, bool, bool], ...]  # (fp8, gradient checkpointing, activation offload)
    swap_video: tuple[int, int, int]  # width, height, frames
    fp8_shape: tuple[int, int, int]  # tokens, in, out
    block: DiTConfig
    infer_grid: tuple[int, int, int]
    train_grid: tuple[int, int, int]
    memory_argv: tuple[str, ...]


_PRO_FEW = dataclasses.replace(PRO_DIT, num_text_blocks=1, num_visual_blocks=6)
FULL = Sizes(
    nabla_heads=(("Lite", 28, 64), ("Pro", 32, 128)),
    nabla_grids=((8, 32, 32), (4, 32, 48)),
    swap_dit=_PRO_FEW,
    swap_n=4,
    swap_configs=tuple((fp8, ckpt, off) for fp8 in (False, True) for ckpt, off in ((0, 0), (1, 0), (1, 1))),
    swap_video=(512, 512, 25),
    fp8_shape=(47_616, 16_384, 4096),
    block=PRO_DIT,
    infer_grid=(31, 32, 32),  # 512x512x121: 31 latent frames of 64x64 -> 32x32 tokens
    train_grid=(5, 16, 16),  # 256x256x17
    memory_argv=(),
)
QUICK = dataclasses.replace(
    FULL,
    nabla_grids=((4, 32, 32), (2, 32, 48)),
    swap_dit=dataclasses.replace(PRO_DIT, num_text_blocks=1, num_visual_blocks=4),
    swap_n=2,
    swap_video=(256, 256, 25),
    memory_argv=("--steps", "2"),
)
DRY = Sizes(
    nabla_heads=(("tiny", 4, 16),),
    nabla_grids=((1, 16, 16), (1, 16, 24)),
    swap_dit=TINY_DIT,
    swap_n=2,
    swap_configs=((False, False, False), (True, True, True)),
    swap_video=(64, 64, 5),
    fp8_shape=(1000, 2048, 512),
    block=TINY_DIT,
    infer_grid=(2, 8, 8),
    train_grid=(1, 4, 4),
    memory_argv=("--quick", "--swaps", "2", "--fp8", "off", "--modes", "infer", "--steps", "1"),
)


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    sizes: Sizes
    dry_run: bool
    quick: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def repeats(self) -> int:
        """Timed repeats after a warm-up (the dry run times one call, without warm-up: it only must not rot)."""
        return 0 if self.dry_run else 3


# ----------------------------------------------------------------------------------------------------------------
# measuring helpers
# ----------------------------------------------------------------------------------------------------------------


def sync(s: Settings) -> None:
    if s.cuda:
        torch.cuda.synchronize(s.device)


def median_time(s: Settings, fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` over ``s.repeats`` calls after one warm-up call (dry run: one call)."""
    if s.repeats:
        fn()
    times = []
    for _ in range(max(1, s.repeats)):
        sync(s)
        start = time.perf_counter()
        fn()
        sync(s)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(s: Settings, fn: Callable[[], object]) -> tuple[object, int | None, int | None]:
    """(result, peak bytes allocated while ``fn`` ran, bytes allocated before it); Nones on the CPU."""
    if not s.cuda:
        return fn(), None, None
    sync(s)
    torch.cuda.reset_peak_memory_stats(s.device)
    before = torch.cuda.memory_allocated(s.device)
    out = fn()
    sync(s)
    return out, torch.cuda.max_memory_allocated(s.device), before


@contextmanager
def sync_debug(s: Settings):
    """Count the synchronising CUDA calls (``set_sync_debug_mode("warn")``) inside the block; [] on the CPU."""
    found: list[str] = []
    if not s.cuda:
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))


def free(s: Settings) -> None:
    gc.collect()
    if s.cuda:
        torch.cuda.empty_cache()


def gib(nbytes: int | None) -> str:
    return "n/a (CPU)" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in fp32."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def random_module(build: Callable[[], nn.Module], s: Settings) -> nn.Module:
    with torch.device(s.device):
        module = build().to(s.dtype)
    gen = torch.Generator(device=s.device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    return module.requires_grad_(False)
