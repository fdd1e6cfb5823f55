"""Benchmark the LoRA training step: ours eager (before / after the fused code paths) and compiled, vs musubi-tuner.

    python bench/bench_train_step.py                              # bf16, batch 2, rank 32, ours eager before/after
    python bench/bench_train_step.py --compile --musubi ~/musubi-tuner    # + compiled + musubi's own step
    python bench/bench_train_step.py --quick                      # 2 timed rounds (about a minute on 2 CPU cores)
    python bench/bench_train_step.py --dtype fp32 --batches 1,2,4 # the fp32 sweep

Config (the defaults): a random-weight DiT shaped like the real ones (D = 512, F = 2048, 2 text + 4 visual blocks,
head dim 64), 5 latent frames of 32x32 -> 1280 visual tokens, batch 2 with captions of 64 and 40 tokens (padded +
masked in our batched call), LoRA rank 32 (alpha 32) on the default targets, bf16 weights + autocast, AdamW.

Variants (every one runs the whole step: loss forward, backward, gradient clip, AdamW):

* ``musubi-tuner``: musubi's own code from a checkout (``--musubi PATH`` or ``MUSUBI_TUNER_PATH``; skipped when
  absent), see ``bench/musubi_step.py``; the same weights, shapes, captions and rank;
* ``ours, eager, before``: our trainer's step with the pre-fusion code paths swapped in for the run (the plain
  fp32 formulas of ``modulate`` / ``gated_residual`` / RoPE, the unfused LoRA branch ``y + up(down(x))``);
* ``ours, eager``: the trainer's step as shipped (``kandinsky5.train.objective.flow_matching_loss``);
* ``ours, compiled`` (``--compile``): the same with ``kandinsky5.memory.compile.compile_blocks`` (inductor; the
  compile happens in an untimed warm-up step and its time is reported).

Timing: every round runs every variant once, in alternating order, so a drifting machine load hits all alike;
medians (and minima) over rounds.  "CPU s" is the process CPU time per step (all threads), less sensitive than
wall time to other jobs on a shared machine.  FLOPs of the DiT part (forward + backward of the loss) are counted by
``torch.utils.flop_counter.FlopCounterMode`` (plus torch's own SDPA formulas for the CPU flash kernels, which the
counter lacks); the ceilings are the best 2048^3 matmul in bf16 and in fp32, re-measured every round.  Peak RSS is
measured per variant in a fresh child process (warm-up + 2 steps; Linux VmHWM), so variants do not share one
high-water mark.
The profile table splits one step's forward + backward (self CPU time) into attention, base linears, LoRA matmuls
(by the rank in their shapes) and everything else (elementwise chains, norms, copies; for the compiled variant
mostly its fused kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import musubi_step  # noqa: E402

from kandinsky5.configs import DiTConfig  # noqa: E402
from kandinsky5.memory.compile import CompileConfig, compile_blocks  # noqa: E402
from kandinsky5.model import dit as dit_module  # noqa: E402
from kandinsky5.model.dit import DiT  # noqa: E402
from kandinsky5.train.distributed import DistContext  # noqa: E402
from kandinsky5.train.objective import TrainBatch, flow_matching_loss  # noqa: E402
from kandinsky5.train.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler  # noqa: E402
from kandinsky5.train.step import finish_step  # noqa: E402
from networks.lora_kandinsky import create_network  # noqa: E402
from tests.helpers import plain_gated_residual, plain_modulate, plain_rope  # noqa: E402 -- the pre-fusion formulas

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
VARIANTS = ("musubi-tuner", "ours, eager, before", "ours, eager", "ours, compiled")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 timed rounds")
    p.add_argument("--batches", default="2", help="comma-separated batch sizes (2)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds after one warm-up round (6)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="weights/autocast dtype (bf16)")
    p.add_argument("--model_dim", type=int, default=512, help="DiT width D (512)")
    p.add_argument("--text_blocks", type=int, default=2, help="text blocks (2)")
    p.add_argument("--visual_blocks", type=int, default=4, help="visual blocks (4)")
    p.add_argument("--frames", type=int, default=5, help="latent frames T (5)")
    p.add_argument("--size", type=int, default=32, help="latent height = width (32 -> 16x16 tokens per frame)")
    p.add_argument("--text_len", type=int, default=64, help="caption tokens of the first sample (64)")
    p.add_argument("--short_text_len", type=int, default=40, help="caption tokens of the other samples (40)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank = alpha (32)")
    p.add_argument("--ceiling_size", type=int, default=2048, help="square matmul size for the ceilings (2048)")
    p.add_argument("--compile", action="store_true", help="add the compiled variant (inductor)")
    p.add_argument("--compile_mode", default="default", help="inductor mode of the compiled variant (default)")
    p.add_argument("--no_before", action="store_true", help="skip the 'eager, before' variant")
    p.add_argument("--musubi", default=None, help="musubi-tuner checkout (default: $MUSUBI_TUNER_PATH; else skipped)")
    p.add_argument("--no_profile", action="store_true", help="skip the per-op profile table")
    p.add_argument("--no_rss", action="store_true", help="skip the per-variant peak RSS child processes")
    p.add_argument("--rss_child", default=None, help=argparse.SUPPRESS)  # internal: measure one variant's peak RSS
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 2
    return args


# ----------------------------------------------------------------------------------------------------------------
# the pre-fusion code paths ("before")
# ----------------------------------------------------------------------------------------------------------------


def _plain_lora_forward(self, x, *args, **kwargs):
    y = self._attached[1](x, *args, **kwargs)
    return y if self.multiplier == 0.0 else y + self.branch(x).to(y.dtype)


@contextlib.contextmanager
def _plain_helpers():
    names = {"modulate": plain_modulate, "gated_residual": plain_gated_residual, "apply_rope": plain_rope}
    saved = {n: getattr(dit_module, n) for n in names}
    for n, f in names.items():
        setattr(dit_module, n, f)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(dit_module, n, f)


# ----------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------


def dit_config(args) -> DiTConfig:
    return DiTConfig(
        model_dim=args.model_dim, ff_dim=4 * args.model_dim, time_dim=args.model_dim // 2,
        num_text_blocks=args.text_blocks, num_visual_blocks=args.visual_blocks, axes_dims=(16, 24, 24),
        in_text_dim=256, in_text_dim2=128,
    )  # fmt: skip


def base_dit(cfg: DiTConfig, dtype) -> DiT:
    torch.manual_seed(0)
    dit = DiT(cfg).requires_grad_(False)
    for p in dit.parameters():
        p.data.normal_(0, 0.02)
    return dit.to(dtype)


def make_batch(cfg: DiTConfig, args, b: int) -> TrainBatch:
    g = torch.Generator().manual_seed(b)
    mask = torch.zeros(b, args.text_len, dtype=torch.bool)
    mask[0] = True
    mask[1:, : args.short_text_len] = True  # mixed caption lengths, as in real batches
    return TrainBatch(
        latents=torch.randn(b, args.frames, args.size, args.size, 16, generator=g),
        text_embeds=torch.randn(b, args.text_len, cfg.in_text_dim, generator=g) * mask[..., None],
        text_mask=mask,
        pooled=torch.randn(b, cfg.in_text_dim2, generator=g),
    )


class Ours:
    """Our trainer's step on one DiT copy: eager, eager with the pre-fusion code, or compiled."""

    def __init__(self, name: str, base: DiT, args, batch: TrainBatch, dtype):
        self.name, self.batch, self.dtype = name, batch, dtype
        self.dit = copy.deepcopy(base)
        torch.manual_seed(1)
        self.network = create_network(1.0, args.rank, args.rank, self.dit)
        self.network.apply_to(self.dit)
        self.plain = name == "ours, eager, before"
        if self.plain:
            for _, lora in self.network.items():
                lora._attached[0].forward = types.MethodType(_plain_lora_forward, lora)
        if name == "ours, compiled":
            compile_blocks(self.dit, CompileConfig(enabled=True, mode=args.compile_mode))
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, OptimizerConfig("AdamW", 1e-4))
        self.scheduler = build_scheduler(self.optimizer, SchedulerConfig("constant"), 10**6)
        self.gen = torch.Generator().manual_seed(0)
        self.ctx = DistContext(device=torch.device("cpu"))

    def lora_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def loss(self) -> torch.Tensor:
        b = self.batch.latents.shape[0]
        t = torch.rand(b, generator=self.gen)
        noise = torch.randn(self.batch.latents.shape, generator=self.gen)
        with _plain_helpers() if self.plain else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                return flow_matching_loss(self.dit, self.batch, t, noise, (1.0, 2.0, 2.0))

    def backward(self, loss: torch.Tensor) -> None:
        with _plain_helpers() if self.plain else contextlib.nullcontext():
            loss.backward()

    def finish(self) -> None:
        finish_step(self.ctx, self.params, self.optimizer, self.scheduler, torch.zeros(()), 1, 1.0)


class Musubi:
    """musubi-tuner's step (bench/musubi_step.py) with the same weights and batch."""

    name = "musubi-tuner"

    def __init__(self, src: Path, cfg: DiTConfig, base: DiT, args, batch: TrainBatch, workdir: Path):
        self.step = musubi_step.MusubiStep(src, cfg, base.state_dict(), args.rank, workdir, torch.device("cpu"))
        self.batch = self.step.batch(batch.latents, batch.text_embeds, batch.text_mask, batch.pooled)

    def lora_parameters(self) -> int:
        return self.step.lora_parameters()

    def loss(self) -> torch.Tensor:
        return self.step.loss(self.batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def finish(self) -> None:
        self.step.finish()


def build_variants(args, b: int, names, workdir: Path) -> list:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = dit_config(args)
    base = base_dit(cfg, dtype)
    batch = make_batch(cfg, args, b)
    out = []
    for name in names:
        if name == "musubi-tuner":
            out.append(Musubi(musubi_step.checkout_path(args.musubi), cfg, base, args, batch, workdir))
        else:
            out.append(Ours(name, base, args, batch, dtype))
    return out


def wanted_variants(args) -> list[str]:
    names = []
    if musubi_step.checkout_path(args.musubi) is not None:
        names.append("musubi-tuner")
    if not args.no_before:
        names.append("ours, eager, before")
    names.append("ours, eager")
    if args.compile:
        names.append("ours, compiled")
    return names


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------


def run_step(v) -> tuple[float, float, float]:
    """(fwd+bwd wall s, step wall s, step process CPU s)."""
    cpu, start = time.process_time(), time.perf_counter()
    v.backward(v.loss())
    mid = time.perf_counter()
    v.finish()
    return mid - start, time.perf_counter() - start, time.process_time() - cpu


def matmul_ceiling(n: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def count_flops(v) -> float:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        v.backward(v.loss())
    v.finish()
    return counter.get_total_flops()


def count_all_flops(variants) -> dict[str, float]:
    """Counted eagerly: ours once (all our variants run the same maths; a dispatch mode would bypass the compiled
    code anyway), musubi separately (it repeats the caption per latent frame, so it does more work)."""
    ours = next(v for v in variants if v.name == "ours, eager")
    counted = {"ours": count_flops(ours)}
    for v in variants:
        if v.name == "musubi-tuner":
            counted["musubi"] = count_flops(v)
    return {v.name: counted["musubi" if v.name == "musubi-tuner" else "ours"] for v in variants}


def saved_bytes(v) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v.loss()
    return total


def measure(variants, args) -> dict:
    res = {v.name: {"dit": [], "step": [], "cpu": []} for v in variants}
    ceil = {"bf16": [], "fp32": []}
    first = {}
    for v in variants:  # warm-up (and, for the compiled variant, the compile)
        first[v.name] = run_step(v)[1]
    for r in range(args.rounds):
        for v in variants if r % 2 else variants[::-1]:
            dit_s, step_s, cpu_s = run_step(v)
            res[v.name]["dit"].append(dit_s)
            res[v.name]["step"].append(step_s)
            res[v.name]["cpu"].append(cpu_s)
        ceil["bf16"].append(matmul_ceiling(args.ceiling_size, torch.bfloat16))
        ceil["fp32"].append(matmul_ceiling(args.ceiling_size, torch.float32))
    return {"times": res, "ceiling": {k: statistics.median(c) for k, c in ceil.items()}, "first": first}


_ATTENTION = ("scaled_dot_product", "flash_attention")
_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def profile_shares(v, rank: int) -> dict[str, float]:
    """Shares of one forward + backward's self CPU time: attention, base linears, LoRA, everything else."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        v.backward(v.loss())
    v.finish()
    lora_dims = {rank, 2 * rank, 3 * rank}
    totals = {"attention": 0.0, "base linears": 0.0, "LoRA matmuls": 0.0, "other (elementwise, norms, copies)": 0.0}
    for evt in prof.key_averages(group_by_input_shape=True):
        t = evt.self_cpu_time_total
        if any(a in evt.key for a in _ATTENTION):
            totals["attention"] += t
        elif evt.key in _MATMULS:
            dims = {d for shape in evt.input_shapes if len(shape) == 2 for d in shape}
            totals["LoRA matmuls" if dims & lora_dims else "base linears"] += t
        else:
            totals["other (elementwise, norms, copies)"] += t
    whole = sum(totals.values()) or 1.0
    return {k: t / whole for k, t in totals.items()}


def child_rss(args, name: str) -> float | None:
    """Peak RSS (MB) of a fresh process that builds only ``name`` and runs a warm-up + 2 steps."""
    cmd = [sys.executable, __file__, "--rss_child", name, "--batches", args.batches.split(",")[0]]
    for flag in ("dtype", "model_dim", "text_blocks", "visual_blocks", "frames", "size", "text_len",
                 "short_text_len", "rank", "compile_mode"):  # fmt: skip
        cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.musubi:
        cmd += ["--musubi", args.musubi]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("peak_rss_mb="):
            return float(line.split("=")[1])
    print(f"(peak RSS of {name} not measured: {out.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
    return None


def rss_child(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        (v,) = build_variants(args, int(args.batches), [args.rss_child], Path(tmp))
        for _ in range(3):
            run_step(v)
    print(f"peak_rss_mb={peak_rss_mb():.0f}")
    return 0


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (Linux; reset at exec, unlike ru_maxrss, which a child inherits from the
    parent it was forked from), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def report_batch(b: int, variants, m: dict, flops: dict, acts: dict, rss: dict) -> None:
    times, ceil = m["times"], m["ceiling"]
    ref = times.get("musubi-tuner")
    bf16, fp32 = ceil["bf16"] / 1e9, ceil["fp32"] / 1e9
    print(f"\nbatch {b}: matmul ceilings {bf16:.0f} GFLOP/s bf16, {fp32:.0f} GFLOP/s fp32\n")
    print("| variant | step s (median) | min | CPU s / step | DiT fwd+bwd s | GFLOP | % bf16 ceiling | % fp32 ceiling "
          "| saved activations MB | peak RSS MB | speed vs musubi (wall / CPU) | first step s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        t = times[v.name]
        dit_s = _med(t["dit"])
        rate = flops[v.name] / dit_s
        vs = "–"
        if ref is not None:
            vs = f"{_med(ref['step']) / _med(t['step']):.2f}x / {_med(ref['cpu']) / _med(t['cpu']):.2f}x"
        peak = f"{rss[v.name]:.0f}" if rss.get(v.name) else "–"
        print(f"| {v.name} | {_med(t['step']):.3f} | {min(t['step']):.3f} | {_med(t['cpu']):.3f} | {dit_s:.3f} "
              f"| {flops[v.name] / 1e9:.1f} | {100 * rate / ceil['bf16']:.0f} % | {100 * rate / ceil['fp32']:.0f} % "
              f"| {acts[v.name] / 2**20:.0f} | {peak} | {vs} | {m['first'][v.name]:.1f} |")  # fmt: skip


def report_profiles(shares: dict) -> None:
    if not shares:
        return
    cats = list(next(iter(shares.values())))
    print("\nwhere one forward + backward goes (share of self CPU time, torch.profiler):\n")
    print("| variant | " + " | ".join(cats) + " |")
    print("|---|" + "---:|" * len(cats))
    for name, s in shares.items():
        print(f"| {name} | " + " | ".join(f"{100 * s[c]:.0f} %" for c in cats) + " |")


def main(argv=None) -> int:
    args = parse(argv)
    if args.rss_child:
        return rss_child(args)
    cfg = dit_config(args)
    names = wanted_variants(args)
    tokens = args.frames * (args.size // 2) ** 2
    print(f"DiT D={cfg.model_dim} F={cfg.ff_dim} blocks {cfg.num_text_blocks}+{cfg.num_visual_blocks}, {tokens} visual "
          f"tokens, captions {args.text_len}/{args.short_text_len} tokens, LoRA rank {args.rank}, {args.dtype}, cpu, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    if "musubi-tuner" not in names:
        print("musubi-tuner comparison skipped: pass --musubi PATH or set MUSUBI_TUNER_PATH to a checkout")
    results = {}
    for b in (int(x) for x in args.batches.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            variants = build_variants(args, b, names, Path(tmp))
            if isinstance(variants[0], Musubi) and variants[0].step.stubbed:
                print(f"(musubi import-only modules stubbed: {', '.join(variants[0].step.stubbed)})")
            flops = count_all_flops(variants)
            acts = {v.name: saved_bytes(v) for v in variants}
            m = measure(variants, args)
            shares = {} if args.no_profile else {v.name: profile_shares(v, args.rank) for v in variants}
        rss = {} if args.no_rss else {n: child_rss(args, n) for n in names}
        report_batch(b, variants, m, flops, acts, rss)
        report_profiles(shares)
        results[b] = m
    print(
        f"\nload average {os.getloadavg()[0]:.1f} at the end; raw medians: "
        + json.dumps({b: {n: round(_med(t["step"]), 3) for n, t in m["times"].items()} for b, m in results.items()})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
