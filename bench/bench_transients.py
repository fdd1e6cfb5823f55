"""Transient memory of the NABLA masks and the ``--fp8_fast`` activation quantisation, counted per allocation.

    python bench/bench_transients.py            # Pro shapes: STA at 3,904 blocks, mask 32 heads x 704 blocks, FFN out
    python bench/bench_transients.py --quick    # smaller shapes (used by bench/run_all)

Bytes are counted by ``tests/peak_memory.py`` (a dispatch mode that adds every new storage an op returns and
subtracts it when freed), so they are what the code allocates through torch ops on any device -- on a GPU the same
allocations go to the CUDA caching allocator.  Runs on the CPU with one thread; prints a markdown table.

* STA prior: ``sta_mask`` for a grid of T x 8 x 8 blocks (Pro 10 s HD: 61 latent frames of 64x64 tokens = 3,904).
* NABLA block mask: ``block_mask`` for q, k of one sample (bf16, requiring grad as in training).
* fp8 fast: ``_scaled_mm_linear`` on the Pro FFN out-layer (16384 -> 4096); "transient" excludes the output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.configs import NablaConfig  # noqa: E402
from kandinsky5.memory import fp8  # noqa: E402
from kandinsky5.model import nabla  # noqa: E402
from tests.peak_memory import PeakMemory  # noqa: E402


def _peak(fn) -> tuple[int, object]:
    with PeakMemory() as mem:
        out = fn()
    return mem.peak, out


def sta_row(frames: int) -> str:
    n = frames * 64
    peak, _ = _peak(lambda: nabla.sta_mask(frames, 8, 8, 11, 3, 3))
    size = f"{peak / 2**20:.1f} MiB ({peak / n**2:.2f} B per N^2)"
    return f"| STA prior | {frames} x 8 x 8 = {n:,} blocks | {size} |"


def mask_row(blocks: int, heads: int) -> str:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, blocks * 64, heads, 128, generator=g).bfloat16().requires_grad_() for _ in range(2))
    sta = nabla.sta_mask(blocks // 64, 8, 8, 11, 3, 3)
    peak, mask = _peak(lambda: nabla.block_mask(q, k, NablaConfig(P=0.7), sta))
    size = f"{peak / 2**20:.0f} MiB ({peak / mask.numel():.1f}x the bool mask)"
    return f"| block mask | {heads} heads x {blocks} blocks | {size} |"


def fp8_row(rows: int) -> str:
    layer = fp8.FP8Linear.from_linear(torch.nn.Linear(16384, 4096, bias=False), block=16384)
    x = torch.randn(rows, 16384, dtype=torch.bfloat16)
    peak, out = _peak(lambda: fp8._scaled_mm_linear(x, layer.weight, layer.scale_weight, None))
    transient = peak - out.untyped_storage().nbytes()
    size = f"{transient / 2**20:.0f} MiB ({transient / (x.numel() * x.element_size()):.2f}x the bf16 input)"
    return f"| fp8 fast | {rows:,} tokens x 16384 -> 4096 | {size} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes: STA 11 frames, mask 8 heads, 1,001 tokens")
    args = p.parse_args()
    torch.set_num_threads(1)
    frames, heads, rows = (11, 8, 1001) if args.quick else (61, 32, 4001)
    print(f"\nallocation counting, CPU, torch {torch.__version__}, 1 thread\n")
    print("| what | shape | peak transient |\n|---|---|---|")
    print(sta_row(frames))
    print(mask_row(704, heads))
    print(fp8_row(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
