"""Benchmark SDPA's backends and input layouts for the DiT's attention shapes, with their error against fp64.

    python bench/bench_attention.py            # the training bench's shapes (B 2, 1280 visual / 64 text tokens)
    python bench/bench_attention.py --quick    # fewer repeats

Rows: visual self-attention (no mask) and cross-attention to padded text (boolean key mask), forward and
forward + backward, for each SDPA backend that runs on the device (CPU: the flash kernel and the math
reference; CUDA adds cuDNN and memory-efficient), in bf16 and fp32, with q/k/v passed either as the DiT makes them
-- (B, S, H, D) transposed to (B, H, S, D) views, no copy -- or copied to contiguous (B, H, S, D) first; bf16 also
as "fp32 kernel" (upcast, fp32 kernel, cast back: the conversions are included in its time).  Timings
are interleaved (every variant once per round) and the median and minimum over rounds are reported; "max error" is
``max|out - ref| / max|ref|`` against fp64 math attention on the same inputs.  What this decided is written in
``kandinsky5.model.attention`` and docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "math": SDPBackend.MATH,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2, help="batch size (2)")
    p.add_argument("--tokens", type=int, default=1280, help="visual tokens S (1280)")
    p.add_argument("--text", type=int, default=64, help="text tokens L of the cross-attention, half padded (64)")
    p.add_argument("--heads", type=int, default=8, help="heads (8)")
    p.add_argument("--head_dim", type=int, default=64, help="head dim (64)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up (7)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if present)")
    p.add_argument("--quick", action="store_true", help="3 rounds")
    args = p.parse_args()
    if args.quick:
        args.rounds = 3
    return args


def _inputs(args, kind: str, device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    b, s, h, d = args.batch, args.tokens, args.heads, args.head_dim
    sk = s if kind == "self" else args.text
    q = torch.randn(b, s, h, d, generator=g)
    k, v = (torch.randn(b, sk, h, d, generator=g) for _ in range(2))
    mask = None
    if kind == "cross":
        mask = torch.ones(b, sk, dtype=torch.bool)
        mask[1:, sk // 2 :] = False
        mask = mask[:, None, None, :].to(device)
    return q.to(device), k.to(device), v.to(device), mask


def _attend(q, k, v, mask, backend: SDPBackend, layout: str) -> torch.Tensor:
    """(B, S, H, D) in and out, as kandinsky5.model.attention does."""
    if layout == "views, fp32 kernel":  # half-precision inputs run through the fp32 kernel, result cast back
        with torch.autocast(q.device.type, enabled=False):
            return _attend(q.float(), k.float(), v.float(), mask, backend, "views").to(q.dtype)
    if layout == "views":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    else:
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _runs(q, k, v, mask, backend, layout) -> bool:
    try:
        _attend(q[:1, :64], k[:1, :64], v[:1, :64], None if mask is None else mask[:1, ..., :64], backend, layout)
    except RuntimeError:
        return False
    return True


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    args = parse()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = []
    for kind in ("self", "cross"):
        base = _inputs(args, kind, device)
        ref = _attend(*(t.double() for t in base[:3]), base[3], SDPBackend.MATH, "views")
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (t.to(dtype) for t in base[:3])
            for name, backend in BACKENDS.items():
                layouts = ("views", "contiguous") + (("views, fp32 kernel",) if dtype == torch.bfloat16 else ())
                for layout in layouts:
                    if _runs(q, k, v, base[3], backend, layout):
                        variants.append((kind, dtype, name, layout, (q, k, v, base[3]), backend, ref))
    times = {i: {"fwd": [], "bwd": []} for i in range(len(variants))}
    errors = {}
    for r in range(args.rounds + 1):
        order = range(len(variants)) if r % 2 else reversed(range(len(variants)))
        for i in order:
            _kind, _dtype, _name, layout, (q, k, v, mask), backend, ref = variants[i]
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                out = _attend(q, k, v, mask, backend, layout)
            _sync(device)
            mid = time.perf_counter()
            _attend(*leaves, mask, backend, layout).float().sum().backward()
            _sync(device)
            if r:
                times[i]["fwd"].append(mid - start)
                times[i]["bwd"].append(time.perf_counter() - mid)
            errors[i] = float((out.double() - ref).abs().max() / ref.abs().max())
    threads = torch.get_num_threads()
    print(f"\nSDPA on {device} ({threads} threads): B={args.batch}, S={args.tokens}, L={args.text} (cross, half "
          f"padded), H={args.heads}, D={args.head_dim}; {args.rounds} interleaved rounds\n")  # fmt: skip
    print(
        "| attention | dtype | backend | q/k/v layout | fwd ms (median / min) | fwd+bwd ms (median / min) | max error |"
    )
    print("|---|---|---|---|---:|---:|---:|")
    for i, (kind, dtype, name, layout, *_rest) in enumerate(variants):
        f, b = (1e3 * statistics.median(times[i][p]) for p in ("fwd", "bwd"))
        fm, bm = (1e3 * min(times[i][p]) for p in ("fwd", "bwd"))
        dt = str(dtype).removeprefix("torch.")
        print(f"| {kind} | {dt} | {name} | {layout} | {f:.1f} / {fm:.1f} | {b:.1f} / {bm:.1f} | {errors[i]:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
