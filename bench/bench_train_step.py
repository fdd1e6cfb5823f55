"""Benchmark the LoRA training step: time, memory and achieved FLOP/s of the DiT part vs the matmul ceiling.

    python bench/bench_train_step.py --quick     # batch 1 and 2, two timed steps (about a minute on 2 CPU cores)
    python bench/bench_train_step.py             # batch 1, 2 and 4, four timed steps each

The step is the trainer's own (``kandinsky5.train.objective.flow_matching_loss``
on a random-weight DiT with a LoRA of rank
16 on the default targets, backward, ``finish_step`` with AdamW).  The default DiT is small but shaped like the
real ones (D = 512, F = 2048, 2 text + 4 visual blocks, head dim 64; 5 latent frames of 32x32 -> 1280 visual
tokens; 64 text tokens); ``--model_dim`` etc. change it.

* "DiT fwd+bwd" is the forward + backward of the loss (the DiT with its LoRA; frozen weights get no weight
  gradients, so backward costs about one forward);  "step" adds the gradient clip and the AdamW update.
* FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward (matmuls and attention;
  the CPU flash-attention ops are added with torch's own SDPA formulas, which the counter lacks for CPU).
* The ceiling is the best of a few large square matmuls (``--ceiling_size``) in the same dtype and thread count.
* Memory: "saved activations" is the total size of the tensors autograd keeps for backward (exact, any device);
  "peak" is ``torch.cuda.max_memory_allocated`` on CUDA or the process peak RSS on CPU (monotone over the run).

Prints a markdown table.  Timings on a shared machine are only as good as its load: the ceiling is re-measured next
to every row and the ratio uses the row's own ceiling.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.configs import DiTConfig  # noqa: E402
from kandinsky5.model.dit import DiT  # noqa: E402
from kandinsky5.train.distributed import DistContext  # noqa: E402
from kandinsky5.train.objective import TrainBatch, flow_matching_loss  # noqa: E402
from kandinsky5.train.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler  # noqa: E402
from kandinsky5.train.step import finish_step  # noqa: E402
from networks.lora_kandinsky import create_network  # noqa: E402

# FlopCounterMode knows the CUDA attention kernels but not PyTorch's CPU flash-attention ops: same formulas.
_ATEN = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(
        q, k, v
    ),
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, out_shape=None, **kw: (
        sdpa_backward_flop_count(g, q, k, v)
    ),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 1 and 2, two timed steps")
    p.add_argument("--batches", default="1,2,4", help="comma-separated batch sizes (1,2,4)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per batch size, after one warm-up (4)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights/autocast dtype (fp32)")
    p.add_argument("--model_dim", type=int, default=512, help="DiT width D (512)")
    p.add_argument("--text_blocks", type=int, default=2, help="text blocks (2)")
    p.add_argument("--visual_blocks", type=int, default=4, help="visual blocks (4)")
    p.add_argument("--frames", type=int, default=5, help="latent frames T (5)")
    p.add_argument("--size", type=int, default=32, help="latent height = width (32 -> 16x16 tokens per frame)")
    p.add_argument("--text_len", type=int, default=64, help="caption tokens (64)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (16)")
    p.add_argument("--ceiling_size", type=int, default=2048, help="square matmul size for the ceiling (2048)")
    args = p.parse_args()
    if args.quick:
        args.batches, args.steps = "1,2", 2
    return args


def matmul_ceiling(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, device, dtype):
    head = 64
    cfg = DiTConfig(
        model_dim=args.model_dim, ff_dim=4 * args.model_dim, time_dim=args.model_dim // 2,
        num_text_blocks=args.text_blocks, num_visual_blocks=args.visual_blocks, axes_dims=(16, 24, 24),
        in_text_dim=256, in_text_dim2=128,
    )  # fmt: skip
    assert cfg.head_dim == head
    torch.manual_seed(0)
    dit = DiT(cfg).to(device=device, dtype=dtype).requires_grad_(False)
    for p in dit.parameters():
        p.data.normal_(0, 0.02)
    network = create_network(1.0, args.rank, args.rank, dit)
    network.apply_to(dit)
    network.to(device)
    return cfg, dit, network


def make_batch(cfg: DiTConfig, args, b: int, device) -> TrainBatch:
    g = torch.Generator().manual_seed(b)
    mask = torch.ones(b, args.text_len, dtype=torch.bool)
    mask[1:, args.text_len // 2 :] = False  # mixed caption lengths, as in real batches
    return TrainBatch(
        latents=torch.randn(b, args.frames, args.size, args.size, 16, generator=g).to(device),
        text_embeds=torch.randn(b, args.text_len, cfg.in_text_dim, generator=g).to(device),
        text_mask=mask.to(device),
        pooled=torch.randn(b, cfg.in_text_dim2, generator=g).to(device),
    )


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_batch(cfg, dit, network, args, b: int, device, dtype) -> dict:
    batch = make_batch(cfg, args, b, device)
    opt = build_optimizer(network.parameters(), OptimizerConfig("AdamW", 1e-4))
    sched = build_scheduler(opt, SchedulerConfig("constant"), 100)
    params = [p for p in network.parameters() if p.requires_grad]
    gen = torch.Generator(device).manual_seed(0)
    ctx = DistContext(device=device)

    def loss_fn():
        t = torch.rand(b, generator=gen, device=device)
        noise = torch.randn(batch.latents.shape, generator=gen, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return flow_matching_loss(dit, batch, t, noise, (1.0, 2.0, 2.0))

    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        loss_fn().backward()
    flops = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)
    activations = saved_bytes(loss_fn)
    dit_times, step_times = [], []
    for i in range(args.steps + 1):
        _sync(device)
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        _sync(device)
        mid = time.perf_counter()
        finish_step(ctx, params, opt, sched, loss.detach(), 1, 1.0)
        _sync(device)
        if i:  # the first step is the warm-up
            dit_times.append(mid - start)
            step_times.append(time.perf_counter() - start)
    ceiling = matmul_ceiling(args.ceiling_size, dtype, device)
    dit_s = statistics.median(dit_times)
    return dict(
        batch=b, step=statistics.median(step_times), dit=dit_s, gflop=flops / 1e9, achieved=flops / dit_s / 1e9,
        ceiling=ceiling / 1e9, ratio=flops / dit_s / ceiling, act=activations / 2**20, peak=peak_memory_mb(device),
    )  # fmt: skip


def main() -> int:
    args = parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg, dit, network = build(args, device, dtype)
    tokens = args.frames * (args.size // 2) ** 2
    print(
        f"DiT D={cfg.model_dim} F={cfg.ff_dim} blocks {cfg.num_text_blocks}+{cfg.num_visual_blocks}, {tokens} visual "
        f"+ {args.text_len} text tokens, LoRA rank {args.rank} ({sum(p.numel() for p in network.parameters()):,} "
        f"params), {args.dtype}, {device.type}, {torch.get_num_threads()} threads\n"
    )
    print("| batch | step (s) | DiT fwd+bwd (s) | GFLOP / step | achieved GFLOP/s | matmul ceiling GFLOP/s "
          "| % of ceiling | saved activations (MB) | peak memory (MB)* |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in args.batches.split(",")):
        r = bench_batch(cfg, dit, network, args, b, device, dtype)
        print(
            f"| {r['batch']} | {r['step']:.3f} | {r['dit']:.3f} | {r['gflop']:.1f} | {r['achieved']:.1f} "
            f"| {r['ceiling']:.1f} | {100 * r['ratio']:.0f} % | {r['act']:.0f} | {r['peak']:.0f} |",
            flush=True,
        )
    print("\n* CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS of the whole process (monotone over the rows,")
    print("  includes the allocator's cached free memory and the libraries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
