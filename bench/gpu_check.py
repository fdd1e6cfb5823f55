"""GPU acceptance check: run the CUDA-only code paths once, in order of risk, and report one markdown table.

    python bench/gpu_check.py              # one H100/H200 (80 GB+), about 8 minutes, random weights only
    python bench/gpu_check.py --quick      # fits a 24 GB card: smaller NABLA grids and block-swap model
    python bench/gpu_check.py --dry_run    # CPU, tiny sizes, a few seconds: the test suite runs this

Checks (``CHECKS``, in order of risk):

1. ``gpu_tests`` -- ``pytest -m gpu`` (skipped in the dry run: on a CPU every such test skips).
2. ``nabla`` -- NABLA flex attention forward and backward against SDPA with the same block mask expanded to
   (S, S), at the Lite (28 x 64) and Pro (32 x 128) head shapes, a real NABLA mask (P = 0.7 + STA); then the
   compiled entries after more grids and a CFG batch of 2 (expected: one per grad mode and head shape).
3. ``block_swap`` -- a Pro-sized DiT (few blocks) loaded through ``build_dit``: LoRA training step with and without
   ``--blocks_to_swap`` for {plain, gradient checkpointing, + activation offload} x {bf16, fp8}: outputs must be
   bit-identical and LoRA gradients equal; peak memory of both; everything under
   ``torch.cuda.set_sync_debug_mode("warn")``, so a synchronising copy is counted.  Then inference with swap,
   pinned (the default) against pageable host memory, against no swap.
4. ``fp8`` -- ``--fp8_fast`` against ``--fp8_base`` and bf16 on the Pro FFN out-layer (16384 -> 4096) at 47,616
   tokens: relative error, transient memory (the fast path must stay below 1.5x its bf16 input), time.
5. ``memory_bench`` -- the ``bench/bench_memory.py`` table for Pro-sized blocks.
6. ``latency`` -- one Pro-sized visual block: forward at 2 x 31,744 tokens (Pro 5 s SD, CFG batch) and
   forward + backward at 1,280 tokens (256x256x17), extrapolated to 50 CFG steps of Pro 5 s SD and to one Pro LoRA
   step (visual + text blocks only: embeddings, VAE and text encoders are not counted).
7. ``magcache`` -- the block-swap DiT (Pro width, few blocks) sampling 50 CFG steps: ``--magcache_thresh 0`` must be
   bit-identical to the plain sampler; with the official Pro ratios and knobs, calls skipped, seconds per video
   against the full run and the latent deviation (random weights: the deviation is not a quality figure).

Output: the table (device, date, torch / CUDA versions first) on stdout, and the same table as ``<output>.md`` next
to ``<output>.json`` (every row with its raw numbers).  Exit status 1 if any row failed.

8. ``activation_model`` -- the start-up memory plan's activation model against ``torch.cuda.max_memory_allocated``
   for Pro-size blocks (a LoRA step with fp8 + checkpointing + swap, one without, a CFG sampling call).
9. ``compile`` -- ``--compile`` (per-block inductor) against eager on the swap-check DiT with a LoRA: a CFG sampling
   call and a LoRA step, compile time, speed-up, deviation (``gpu_check_speed.py``).
10. ``cfg_mode`` -- batched vs two-call CFG for one sampler step, and whether ``--cfg_mode auto`` picks the faster.

Adding a check (e.g. a whole-DiT torch.compile): append
``Check(name, function)`` to ``CHECKS``; the function takes :class:`Settings` and returns rows, and must honour
``settings.dry_run`` (tiny sizes on the CPU) so that ``tests/test_gpu_check.py`` keeps it from rotting.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import bench_activations  # noqa: E402
import bench_memory  # noqa: E402
from gpu_check_base import (  # noqa: E402
    DRY,
    FULL,
    QUICK,
    Row,
    Settings,
    free,
    gib,
    median_time,
    peak_memory,
    random_module,
    rel,
    sync_debug,
)
from gpu_check_speed import check_cfg_mode, check_compile  # noqa: E402

from kandinsky5.common import atomic_path  # noqa: E402
from kandinsky5.configs import PRO_DIT, TINY_DIT, NablaConfig, get_task  # noqa: E402
from kandinsky5.memory.build import MemoryConfig, build_dit, memory_plan  # noqa: E402
from kandinsky5.memory.fp8 import FP8Linear, convert_to_fp8, fp8_matmul_unavailable  # noqa: E402
from kandinsky5.memory_plan import stored_dtypes  # noqa: E402
from kandinsky5.model import nabla  # noqa: E402
from kandinsky5.model.attention import sdpa  # noqa: E402
from kandinsky5.model.dit import DiT, TextBlock, VisualBlock, text_rope, visual_rope  # noqa: E402
from kandinsky5.model.loading import checkpoint_files, read_header  # noqa: E402
from networks.lora import LoRANetwork  # noqa: E402
from networks.lora_kandinsky import DEFAULT_INCLUDE_PATTERNS  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# 1. the GPU-marked tests
# ----------------------------------------------------------------------------------------------------------------


def check_gpu_tests(s: Settings) -> list[Row]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"]
    if s.dry_run:
        return [Row("gpu_tests", "pytest -m gpu", "not run (dry run: every GPU test skips on a CPU)", "skip")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = (out.stdout.strip().splitlines() or ["no output"])[-1]
    status = "ok" if out.returncode == 0 else "FAIL"
    return [
        Row("gpu_tests", "pytest -m gpu", summary, status, {"returncode": out.returncode, "tail": out.stdout[-4000:]})
    ]


# ----------------------------------------------------------------------------------------------------------------
# 2. NABLA flex attention
# ----------------------------------------------------------------------------------------------------------------


def _nabla_inputs(s: Settings, batch: int, grid, heads: int, head_dim: int, grad: bool):
    g = torch.Generator(device=s.device).manual_seed(0)
    shape = (batch, grid[0] * grid[1] * grid[2], heads, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=s.device, dtype=s.dtype).requires_grad_(grad) for _ in range(3))
    sta = nabla.sta_mask(grid[0], grid[1] // 8, grid[2] // 8, 11, 3, 3, s.device)
    return q, k, v, nabla.block_mask(q, k, NablaConfig(P=0.7), sta)


def _nabla_accuracy(s: Settings, name: str, heads: int, head_dim: int) -> Row:
    grid, grad = s.sizes.nabla_grids[0], s.cuda  # CPU flex attention has no backward
    q, k, v, mask = _nabla_inputs(s, 1, grid, heads, head_dim, grad)
    with torch.set_grad_enabled(grad):
        out = nabla.flex_block_attention(q, k, v, mask)
    ref_inputs = [t.detach().float().requires_grad_(grad) for t in (q, k, v)]
    ref = nabla.dense_mask_attention(*ref_inputs, mask)  # fp32 SDPA with the (S, S) mask
    errors = {"out": rel(out, ref)}
    if grad:
        g = torch.randn_like(ref)
        ours = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
        theirs = torch.autograd.grad(ref, ref_inputs, g)
        errors.update({f"d{n}": rel(a, b) for n, a, b in zip("qkv", ours, theirs)})
    tol = 2e-2 if s.dtype in (torch.bfloat16, torch.float16) else 1e-4

    def step(fn):
        with torch.set_grad_enabled(grad):
            o = fn(q, k, v, mask)
            if grad:
                torch.autograd.grad(o, (q, k, v), torch.ones_like(o))

    flex_s = median_time(s, lambda: step(nabla.flex_block_attention))
    dense_s = median_time(s, lambda: step(nabla.dense_mask_attention))
    kept = float(mask.float().mean())
    config = f"{name} {heads}x{head_dim}, {grid[0]}x{grid[1]}x{grid[2]} tokens, {kept:.0%} of blocks kept"
    what = "fwd+bwd" if grad else "fwd (CPU: no flex backward)"
    result = f"{what}: max rel err " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    result += f"; flex {flex_s * 1e3:.1f} ms vs masked SDPA {dense_s * 1e3:.1f} ms"
    status = "ok" if max(errors.values()) <= tol else "FAIL"
    return Row("nabla", config, result, status, {"errors": errors, "tol": tol, "flex_s": flex_s, "dense_s": dense_s})


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def check_nabla(s: Settings) -> list[Row]:
    before = _graphs()
    rows = [_nabla_accuracy(s, *h) for h in s.sizes.nabla_heads]
    calls = 0
    for _, heads, head_dim in s.sizes.nabla_heads:
        for grid in s.sizes.nabla_grids:
            for batch, grad in ((1, s.cuda), (2, False)):  # a training step, a CFG sampling step
                q, k, v, mask = _nabla_inputs(s, batch, grid, heads, head_dim, grad)
                with torch.set_grad_enabled(grad):
                    nabla.flex_block_attention(q, k, v, mask)
                calls += 1
    new, expected = _graphs() - before, len(s.sizes.nabla_heads) * (2 if s.cuda else 1)
    result = f"{new} compiled entries for {calls} calls (grids {s.sizes.nabla_grids}, batch 1 and 2)"
    config = f"expected <= {expected}: one per grad mode and head shape"
    rows.append(Row("nabla", config, result, "ok" if new <= expected else "FAIL", {"graphs": new, "calls": calls}))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 3. block swap
# ----------------------------------------------------------------------------------------------------------------


def _swap_task(s: Settings):
    return dataclasses.replace(get_task("k5-tiny-t2v"), name="gpu-check", dit=s.sizes.swap_dit)


def _video_args(s: Settings) -> argparse.Namespace:
    width, height, frames = s.sizes.swap_video
    return argparse.Namespace(width=width, height=height, frames=frames, text_tokens=128 if not s.dry_run else 16)


def _lora(dit: DiT, s: Settings) -> LoRANetwork:
    net = LoRANetwork(dit, rank=16, default_include=DEFAULT_INCLUDE_PATTERNS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)  # non-zero up weights: the branch is active
    net.to(s.device).apply_to(dit)
    return net


def _swap_run(s: Settings, path: Path, memory: MemoryConfig, train: bool) -> dict:
    """One forward (+ backward of a LoRA) through ``build_dit``: output, LoRA grads, peak memory, syncs."""
    task = _swap_task(s)
    dit = build_dit(task, path, s.device, s.dtype, None, memory, training=train).requires_grad_(False)
    net = _lora(dit, s) if train else None
    inputs = bench_memory._inputs(task.dit, _video_args(s), s.device, s.dtype)

    def step():
        with torch.set_grad_enabled(train):
            out = dit(*inputs)
            if train:
                out.float().square().mean().backward()
            return out.detach()

    with sync_debug(s) as syncs:
        out, peak, _ = peak_memory(s, step)
    grads = [p.grad.detach().clone() for p in net.parameters()] if train else []
    seconds = None if train else median_time(s, step)
    dit = net = step = None  # noqa: F841 (free the model before the next configuration loads)
    free(s)
    return {"out": out, "grads": grads, "peak": peak, "syncs": syncs, "seconds": seconds}


def _swap_row(s: Settings, path: Path, fp8: bool, ckpt: bool, offload: bool) -> Row:
    base = MemoryConfig(fp8=fp8, gradient_checkpointing=ckpt, activation_cpu_offload=offload)
    ref = _swap_run(s, path, base, train=True)
    got = _swap_run(s, path, dataclasses.replace(base, blocks_to_swap=s.sizes.swap_n), train=True)
    exact = torch.equal(ref["out"], got["out"])
    grad_err = max((rel(a, b) for a, b in zip(got["grads"], ref["grads"])), default=0.0)
    planned = _planned_saving(s, path, fp8)
    saved = None if ref["peak"] is None else ref["peak"] - got["peak"]
    config = f"train, fp8 {'on' if fp8 else 'off'}, " + ("ckpt + offload" if offload else "ckpt" if ckpt else "plain")
    result = (f"swap {s.sizes.swap_n}: output {'bit-identical' if exact else 'DIFFERS'}, LoRA grad max rel "
              f"{grad_err:.1e}; peak {gib(ref['peak'])} -> {gib(got['peak'])} (plan: -{gib(planned)}); "
              f"sync calls {len(got['syncs'])}")  # fmt: skip
    short = saved is not None and saved < 0.8 * planned
    status = "FAIL" if not exact or grad_err > 1e-3 else "warn" if got["syncs"] or short else "ok"
    data = {"exact": exact, "grad_rel": grad_err, "peak_ref": ref["peak"], "peak_swap": got["peak"], "plan": planned}
    return Row("block_swap", config, result, status, {**data, "syncs": got["syncs"][:5]})


def _planned_saving(s: Settings, path: Path, fp8: bool) -> int:
    """GPU weight bytes that ``--blocks_to_swap`` saves according to the memory plan (what the scripts print)."""
    with torch.device("meta"):
        meta = DiT(s.sizes.swap_dit)
    if fp8:
        convert_to_fp8(meta)
    stored = stored_dtypes(read_header(checkpoint_files(path)))
    full, swapped = (memory_plan(meta, s.dtype, n, stored=stored).gpu for n in (0, s.sizes.swap_n))
    return full - swapped


def _swap_infer_row(s: Settings, path: Path) -> Row:
    runs = {
        "no swap": _swap_run(s, path, MemoryConfig(), train=False),
        "pinned": _swap_run(s, path, MemoryConfig(blocks_to_swap=s.sizes.swap_n), train=False),
        "pageable": _swap_run(s, path, MemoryConfig(blocks_to_swap=s.sizes.swap_n, pinned=False), train=False),
    }
    exact = all(torch.equal(r["out"], runs["no swap"]["out"]) for r in runs.values())
    times = ", ".join(f"{k} {r['seconds'] * 1e3:.0f} ms" for k, r in runs.items())
    syncs = len(runs["pinned"]["syncs"])
    result = f"output {'bit-identical' if exact else 'DIFFERS'}; forward {times}; sync calls (pinned) {syncs}"
    status = "FAIL" if not exact else "warn" if syncs else "ok"
    data = {k: {"seconds": r["seconds"], "peak": r["peak"], "syncs": r["syncs"][:5]} for k, r in runs.items()}
    return Row("block_swap", f"inference, swap {s.sizes.swap_n}", result, status, data)


def check_block_swap(s: Settings) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random_dit.safetensors"
        bench_memory.write_random_checkpoint(s.sizes.swap_dit, path)
        rows = [_swap_row(s, path, bool(fp8), bool(ckpt), bool(off)) for fp8, ckpt, off in s.sizes.swap_configs]
        rows.append(_swap_infer_row(s, path))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 4. fp8 linears
# ----------------------------------------------------------------------------------------------------------------


def _fp8_layers(s: Settings, lin: nn.Linear) -> dict[str, nn.Module | str]:
    """bf16 reference, --fp8_base and --fp8_fast layers (a reason string where the fast path cannot run)."""
    k = lin.in_features
    fast_reason = fp8_matmul_unavailable(s.device) if s.cuda else None  # torch._scaled_mm also runs on the CPU
    fast = fast_reason or FP8Linear.from_linear(lin, block=k, fast=True)
    return {"bf16": lin, "fp8_base": FP8Linear.from_linear(lin), "fp8_fast": fast}


def check_fp8(s: Settings) -> list[Row]:
    tokens, k, n = s.sizes.fp8_shape
    gen = torch.Generator(device=s.device).manual_seed(0)
    lin = nn.Linear(k, n, bias=False, device=s.device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=gen)
        x = torch.randn(tokens, k, generator=gen, device=s.device, dtype=torch.bfloat16)
        ref = lin(x)
        rows = []
        for name, layer in _fp8_layers(s, lin).items():
            rows.append(_fp8_row(s, name, layer, x, ref))
    return rows


def _fp8_row(s: Settings, name: str, layer, x: torch.Tensor, ref: torch.Tensor) -> Row:
    config = f"{name}, {x.shape[0]:,} tokens x {x.shape[1]} -> {ref.shape[1]}"
    if isinstance(layer, str):
        return Row("fp8", config, f"not run: {layer}", "skip")
    out, peak, before = peak_memory(s, lambda: layer(x))
    transient = None if peak is None else peak - before - out.numel() * out.element_size()
    seconds = median_time(s, lambda: layer(x))
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    result = f"rel err vs bf16 {err:.2%}; transient besides the output {gib(transient)} (input {gib(x.numel() * 2)})"
    result += f"; {seconds * 1e3:.1f} ms"
    too_big = name == "fp8_fast" and transient is not None and transient > 1.5 * x.numel() * x.element_size()
    status = "FAIL" if too_big or (name != "bf16" and err > 0.05) else "ok"
    return Row("fp8", config, result, status, {"rel_err": err, "transient": transient, "seconds": seconds})


# ----------------------------------------------------------------------------------------------------------------
# 5. bench_memory table
# ----------------------------------------------------------------------------------------------------------------


def check_memory_bench(s: Settings) -> list[Row]:
    args = bench_memory.parse([*s.sizes.memory_argv, "--device", str(s.device)])
    results, setup = bench_memory.run(args)
    rows = []
    for r in results:
        config = f"{r['mode']}, fp8 {'on' if r['fp8'] else 'off'}, swap {r['swap']}"
        result = f"planned {gib(r['planned'])}, peak {gib(r['peak'])}, {r['s']:.3f} s/step"
        rows.append(Row("memory_bench", config, result, "ok", {k: r[k] for k in ("planned", "peak", "s")}))
    rows.append(Row("memory_bench", "setup", setup, "ok"))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 6. latency of a Pro-sized block, extrapolated
# ----------------------------------------------------------------------------------------------------------------


def _block_times(s: Settings, grid, batch: int, train: bool) -> tuple[float, float]:
    """Seconds of one visual block and one text block (128 text tokens) at ``grid`` x ``batch``."""
    cfg = s.sizes.block
    visual, text_block = random_module(lambda: VisualBlock(cfg), s), random_module(lambda: TextBlock(cfg), s)
    tokens, length = grid[0] * grid[1] * grid[2], 128
    x = torch.randn(batch, tokens, cfg.model_dim, device=s.device, dtype=s.dtype, requires_grad=train)
    text = torch.randn(batch, length, cfg.model_dim, device=s.device, dtype=s.dtype, requires_grad=train)
    time_embed = torch.randn(batch, cfg.time_dim, device=s.device)
    rope = visual_rope(grid, cfg.axes_dims, (1.0, 2.0, 2.0), s.device)
    trope = text_rope(length, cfg.head_dim, s.device)

    def run(fn, inputs):
        with torch.set_grad_enabled(train):
            out = fn()
            if train:
                torch.autograd.grad(out, inputs, torch.ones_like(out))

    v = median_time(s, lambda: run(lambda: visual(x, text, time_embed, rope, None, sdpa), (x, text)))
    t = median_time(s, lambda: run(lambda: text_block(text, time_embed, trope, None), (text,)))
    return v, t


def check_latency(s: Settings) -> list[Row]:
    cfg, nv, nt = s.sizes.block, PRO_DIT.num_visual_blocks, PRO_DIT.num_text_blocks
    fwd_v, fwd_t = _block_times(s, s.sizes.infer_grid, 2, train=False)
    free(s)
    fb_v, fb_t = _block_times(s, s.sizes.train_grid, 1, train=True)
    fwd_train_v, _ = _block_times(s, s.sizes.train_grid, 1, train=False)
    free(s)
    sampling = 50 * (nv * fwd_v + nt * fwd_t)
    step, step_ckpt = nv * fb_v + nt * fb_t, nv * (fb_v + fwd_train_v) + nt * fb_t
    size = "Pro" if cfg == PRO_DIT else f"D={cfg.model_dim}"
    ti, tt = (_tokens(s.sizes.infer_grid), _tokens(s.sizes.train_grid))
    return [
        Row("latency", f"{size} visual block fwd, 2 x {ti:,} tokens (CFG batch)", f"{fwd_v * 1e3:.1f} ms", "ok"),
        Row("latency", f"{size} visual block fwd+bwd, 1 x {tt:,} tokens", f"{fb_v * 1e3:.1f} ms", "ok"),
        Row("latency", f"=> 50 CFG steps ({nv} visual + {nt} text blocks x {ti:,} tokens)", f"{sampling:.0f} s",
            "ok", {"seconds": sampling}),
        Row("latency", f"=> LoRA step ({tt:,} tokens, no ckpt / ckpt)", f"{step:.2f} s / {step_ckpt:.2f} s",
            "ok", {"seconds": step, "seconds_ckpt": step_ckpt}),
    ]  # fmt: skip


def _tokens(grid) -> int:
    return grid[0] * grid[1] * grid[2]


# ----------------------------------------------------------------------------------------------------------------
# 7. MagCache on a Pro-width DiT (few blocks)
# ----------------------------------------------------------------------------------------------------------------


def check_magcache(s: Settings) -> list[Row]:
    """Zero threshold == the plain sampler (bit-exact on the GPU too); the official Pro ratios at the official knobs:
    calls skipped, seconds per video against the full run, latent deviation."""
    from kandinsky5.model.text_encoders import TextEmbeds
    from kandinsky5.sampling import magcache as mc
    from kandinsky5.sampling.pipeline import SamplingSpec, sample_latents

    cfg, (w, h, f) = s.sizes.swap_dit, s.sizes.swap_video
    dit = random_module(lambda: DiT(cfg), s).eval()
    spec = SamplingSpec(w, h, f, 6 if s.dry_run else 50, 5.0, 5.0, seed=0)
    g = torch.Generator().manual_seed(0)
    cond, uncond = (TextEmbeds(torch.randn(1, n, cfg.in_text_dim, generator=g), torch.ones(1, n, dtype=torch.bool),
                               torch.randn(1, cfg.in_text_dim2, generator=g)) for n in (40, 24))  # fmt: skip
    config = mc.MagCacheConfig(mc.official_ratios(get_task("k5-pro-t2v-5s-sd")))
    runs: dict[str, object] = {}

    def sample(name: str, thresh: float | None):
        runs[name] = None if thresh is None else dataclasses.replace(config, thresh=thresh).start(spec.steps, True)
        return sample_latents(dit, cond, uncond, spec, progress=False, cache=runs[name])

    full, zero, cached = sample("full", None), sample("zero", 0.0), sample("magcache", config.thresh)
    t_full = median_time(s, lambda: sample("full", None))
    t_mc = median_time(s, lambda: sample("magcache", config.thresh))
    size = f"D={cfg.model_dim}, {cfg.num_visual_blocks} visual blocks, {w}x{h}x{f}, {spec.steps} steps, CFG"
    skipped, calls = runs["magcache"].skipped, runs["magcache"].calls
    err = float((cached - full).norm() / full.norm())
    return [
        Row("magcache", f"{size}: threshold 0", "bit-identical to the plain sampler" if torch.equal(zero, full)
            else f"differs: {rel(zero, full):.2e}", "ok" if torch.equal(zero, full) else "FAIL"),
        Row("magcache", f"{size}: official k5-pro-t2v-5s-sd ratios, {config.describe().split(', ratios')[0]}",
            f"{skipped}/{calls} calls skipped, {t_mc:.2f} s vs {t_full:.2f} s per video ({t_full / t_mc:.2f}x), "
            f"latent rel. L2 {err:.2e} (random weights)", "ok",
            {"skipped": skipped, "calls": calls, "seconds": t_mc, "seconds_full": t_full, "rel_l2": err}),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# 8. the activation model (kandinsky5.memory.activations) against torch.cuda.max_memory_allocated
# ----------------------------------------------------------------------------------------------------------------


def _activation_cases(s: Settings) -> list:
    """Pro-size blocks: a LoRA step (fp8, checkpointing, swap 1, rank 32) and a CFG sampling call; tiny on a dry run."""
    case, step = bench_activations.Case, bench_activations.StepShape
    if s.dry_run:
        return [case("tiny fp8 ckpt swap 2", TINY_DIT, step(1, 17, 256, 256, 64),
                     MemoryConfig(fp8=True, blocks_to_swap=2, gradient_checkpointing=True))]  # fmt: skip
    frames = 17 if s.quick else 25
    return [
        case(f"pro blocks, training 256x256x{frames}, fp8, ckpt, swap 1, rank 32", bench_activations.PRO_BLOCKS,
             step(1, frames, 256, 256, 256), MemoryConfig(fp8=True, blocks_to_swap=1, gradient_checkpointing=True),
             rank=32),
        case(f"pro blocks, training 256x256x{frames}, bf16, no ckpt, rank 32", bench_activations.PRO_BLOCKS,
             step(1, frames, 256, 256, 256), MemoryConfig(), rank=32),
        case("pro blocks, sampling 512x512x25 (CFG batch 2), fp8", bench_activations.PRO_BLOCKS,
             step(2, 25, 512, 512, 256), MemoryConfig(fp8=True), training=False, rank=32),
    ]  # fmt: skip


def check_activation_model(s: Settings) -> list[Row]:
    """Predicted tensor bytes vs the measured peak (CUDA) or the fake-tensor tracker (dry run); the stated error is
    3 % (docs/memory.md): ok within it, warn within 10 %, FAIL beyond."""
    rows = []
    for case in _activation_cases(s):
        r = bench_activations.gpu_memory_row(case) if s.cuda else bench_activations.compare(case)
        measured = r["measured"] if s.cuda else r["tracked"]
        what = "max_memory_allocated" if s.cuda else "fake-tensor tracker"
        status = "ok" if abs(r["error"]) <= 0.03 else "warn" if abs(r["error"]) <= 0.10 else "FAIL"
        result = f"predicted {gib(r['predicted'])}, {what} {gib(measured)} ({r['error']:+.1%})"
        rows.append(Row("activation_model", case.name, result, status, r))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Settings], list[Row]]


CHECKS: list[Check] = [
    Check("gpu_tests", check_gpu_tests),
    Check("nabla", check_nabla),
    Check("block_swap", check_block_swap),
    Check("fp8", check_fp8),
    Check("memory_bench", check_memory_bench),
    Check("latency", check_latency),
    Check("magcache", check_magcache),
    Check("activation_model", check_activation_model),
    Check("compile", check_compile),
    Check("cfg_mode", check_cfg_mode),
]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="sizes that fit a 24 GB card (default: H100/H200 sizes)")
    p.add_argument("--dry_run", action="store_true", help="CPU, tiny sizes, a few seconds (what the tests run)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(c.name for c in CHECKS)}")
    p.add_argument("--output", default=None, help="path stem of the .md and .json (default gpu_check_<date>)")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> Settings:
    if args.dry_run:
        return Settings(torch.device("cpu"), torch.float32, DRY, True, args.quick)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/gpu_check.py needs a CUDA GPU; on a CPU run it with --dry_run")
    return Settings(torch.device("cuda"), torch.bfloat16, QUICK if args.quick else FULL, False, args.quick)


def _header(s: Settings) -> str:
    if s.cuda:
        props = torch.cuda.get_device_properties(s.device)
        dev = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        dev = "CPU (dry run: tiny sizes, numbers are not measurements)"
    mode = "dry run" if s.dry_run else "quick" if s.quick else "full"
    return f"{datetime.date.today()}, {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}, mode {mode}"


def render(header: str, rows: list[Row]) -> str:
    lines = [header, "", "| check | configuration | result | status |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.config} | {r.result} | {r.status} |" for r in rows]
    return "\n".join(lines)


def _run_checks(s: Settings, names: set[str] | None) -> list[Row]:
    rows: list[Row] = []
    chosen = [c for c in CHECKS if names is None or c.name in names]
    for check in tqdm(chosen, desc="gpu_check", unit="check", file=sys.stderr):
        start = time.perf_counter()
        try:
            found = check.run(s)
        except Exception as exc:  # one broken check must not hide the others
            found = [Row(check.name, "-", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", "FAIL")]
        for row in found:
            row.data["check_seconds"] = time.perf_counter() - start
        rows += found
        free(s)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    s = _settings(args)
    names = set(args.only.split(",")) if args.only else None
    unknown = (names or set()) - {c.name for c in CHECKS}
    if unknown:
        raise SystemExit(f"error: --only {', '.join(sorted(unknown))}: no such check")
    start, threads = time.perf_counter(), torch.get_num_threads()
    k5_log = logging.getLogger("kandinsky5")
    level = k5_log.level
    k5_log.setLevel(logging.WARNING)  # build_dit's plan printout, once per model (restored: tests call main())
    if s.dry_run:
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and a shared CI machine is not oversubscribed
    try:
        rows = _run_checks(s, names)
    finally:
        torch.set_num_threads(threads)
        k5_log.setLevel(level)
    header = _header(s)
    table = render(header, rows)
    print(table)
    stem = Path(args.output or f"gpu_check_{datetime.date.today()}")
    report = {"header": header, "seconds": time.perf_counter() - start, "rows": [dataclasses.asdict(r) for r in rows]}
    for suffix, text in ((".md", table + "\n"), (".json", json.dumps(report, indent=1, default=str))):
        with atomic_path(stem.with_name(stem.name + suffix)) as tmp:
            tmp.write_text(text)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
