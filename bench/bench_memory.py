"""Benchmark the memory switches: peak accelerator memory and step time vs --blocks_to_swap, with and without fp8.

    python bench/bench_memory.py --quick     # CPU smoke run: tiny model, a few seconds (used by bench/run_all)
    python bench/bench_memory.py             # CUDA: Pro-sized blocks (D=4096), 1 text + 4 visual blocks

The DiT has random weights (speed and memory do not depend on them); they are written once as a bf16 checkpoint
and every configuration is loaded through ``kandinsky5.memory.build_dit``, i.e. the same path the scripts use
(fp8 quantised while streaming, swapped blocks placed in CPU memory).  Per configuration: one warm-up step, then
``--steps`` timed steps.  Training = LoRA (rank 16, attention + FFN) forward + backward + AdamW step with gradient
checkpointing (``--no_checkpointing`` to turn it off); inference = one no-grad forward.  ``--blocks_to_swap`` values
are clipped to the model's maximum (blocks - 2) and de-duplicated.  "planned GPU weights" is the start-up memory
plan; "peak" is ``torch.cuda.max_memory_allocated`` (weights + activations + LoRA/optimizer state), n/a on CPU.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.common import parse_dtype, resolve_device  # noqa: E402
from kandinsky5.configs import LITE_DIT, PRO_DIT, TINY_DIT, DiTConfig, get_task  # noqa: E402
from kandinsky5.memory.build import MemoryConfig, build_dit, memory_plan  # noqa: E402
from kandinsky5.memory.fp8 import convert_to_fp8  # noqa: E402
from kandinsky5.memory_plan import max_blocks_to_swap  # noqa: E402
from kandinsky5.model.dit import DiT  # noqa: E402
from networks.lora import LoRANetwork  # noqa: E402
from networks.lora_kandinsky import DEFAULT_INCLUDE_PATTERNS  # noqa: E402

MODELS: dict[str, DiTConfig] = {"tiny": TINY_DIT, "lite": LITE_DIT, "pro": PRO_DIT}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", choices=sorted(MODELS), default="pro", help="block size (D, F) of the random DiT (pro)")
    p.add_argument("--text_blocks", type=int, default=1, help="text blocks of the random DiT (1)")
    p.add_argument("--visual_blocks", type=int, default=4, help="visual blocks of the random DiT (4)")
    p.add_argument("--swaps", default="0,10,20,40", help="comma-separated --blocks_to_swap values (0,10,20,40)")
    p.add_argument("--fp8", default="off,on", help="comma-separated fp8 settings to run: off, on (off,on)")
    p.add_argument("--modes", default="infer,train", help="comma-separated: infer, train (infer,train)")
    p.add_argument("--width", type=int, default=512, help="video width in pixels (512)")
    p.add_argument("--height", type=int, default=512, help="video height in pixels (512)")
    p.add_argument("--frames", type=int, default=25, help="video frames, 4k+1 (25)")
    p.add_argument("--text_tokens", type=int, default=128, help="text tokens (128)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration after one warm-up (3)")
    p.add_argument("--pinned", action="store_true", help="pinned swapped blocks on CUDA: the default (old commands)")
    p.add_argument("--no_pinned", action="store_true", help="as --no_pinned_memory_for_block_swap (off: pinned)")
    p.add_argument("--no_checkpointing", action="store_true", help="training without gradient checkpointing")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="weight dtype (bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 64x64x5, 3 timed steps")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.width, args.height, args.frames, args.text_tokens, args.steps = "tiny", 64, 64, 5, 16, 3
        args.device = args.device or "cpu"
    return args


def _task(args: argparse.Namespace):
    cfg = dataclasses.replace(
        MODELS[args.model], num_text_blocks=args.text_blocks, num_visual_blocks=args.visual_blocks
    )
    return dataclasses.replace(get_task("k5-tiny-t2v"), name=f"bench-{args.model}", dit=cfg)


def write_random_checkpoint(cfg: DiTConfig, path: Path) -> None:
    """bf16 random weights (std 0.02; norms 1) with the official keys, generated tensor by tensor."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiT(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in shapes.items():
        base = 1.0 if "norm" in key and key.endswith("weight") else 0.0
        sd[key] = (torch.randn(shape, generator=gen) * 0.02 + base).to(torch.bfloat16)
    save_file(sd, str(path))


def _inputs(cfg: DiTConfig, args, device, dtype):
    t, h, w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, t, h, w, cfg.in_channels, generator=g)
    text = torch.randn(1, args.text_tokens, cfg.in_text_dim, generator=g)
    pooled = torch.randn(1, cfg.in_text_dim2, generator=g)
    move = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
    return move(x), move(text), None, move(pooled), torch.tensor([500.0], device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(dit, inputs, train: bool, steps: int, device) -> list[float]:
    """Warm-up + timed steps; returns seconds per timed step."""
    step = _train_step(dit, inputs) if train else lambda: dit(*inputs)
    times = []
    for k in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        with torch.set_grad_enabled(train):
            step()
        _sync(device)
        if k:
            times.append(time.perf_counter() - start)
    return times


def _train_step(dit, inputs):
    net = LoRANetwork(dit, rank=16, default_include=DEFAULT_INCLUDE_PATTERNS).to(inputs[0].device)
    net.apply_to(dit)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step():
        dit(*inputs).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_one(task, path, args, device, dtype, mode: str, fp8: bool, swap: int) -> dict:
    train = mode == "train"
    ckpt = not args.no_checkpointing
    memory = MemoryConfig(fp8=fp8, blocks_to_swap=swap, pinned=not args.no_pinned, gradient_checkpointing=ckpt)
    with torch.device("meta"):
        meta = DiT(task.dit)
    if fp8:
        convert_to_fp8(meta)
    planned = memory_plan(meta, dtype, swap).gpu
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dit = build_dit(task, path, device, dtype, None, memory, training=train).requires_grad_(False)
    times = _steps(dit, _inputs(task.dit, args, device, dtype), train, args.steps, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del dit
    gc.collect()
    return {"mode": mode, "fp8": fp8, "swap": swap, "planned": planned, "peak": peak, "s": statistics.median(times)}


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _row(r: dict) -> str:
    peak = _size(r["peak"]) if r["peak"] is not None else "n/a (CPU)"
    fp8 = "on" if r["fp8"] else "off"
    return f"| {r['mode']} | {fp8} | {r['swap']} | {_size(r['planned'])} | {peak} | {r['s']:.3f} |"


def run(args: argparse.Namespace) -> tuple[list[dict], str]:
    """Every configuration of ``args`` (one dict per row) and the line that describes the setup."""
    logging.getLogger("kandinsky5").setLevel(logging.WARNING)  # build_dit's plan printout, once per configuration
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    task = _task(args)
    with torch.device("meta"):
        top = max_blocks_to_swap(DiT(task.dit))
    swaps = sorted({min(int(s), top) for s in args.swaps.split(",")})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random_dit.safetensors"
        write_random_checkpoint(task.dit, path)
        for mode in args.modes.split(","):
            for fp8 in [f == "on" for f in args.fp8.split(",")]:
                for swap in swaps:
                    results.append(run_one(task, path, args, device, dtype, mode, fp8, swap))
    cfg = task.dit
    where = "CPU run: no accelerator memory to measure" if device.type == "cpu" else torch.cuda.get_device_name(device)
    setup = (f"DiT `{args.model}`-sized blocks (D={cfg.model_dim}, F={cfg.ff_dim}), {cfg.num_text_blocks} text + "
             f"{cfg.num_visual_blocks} visual blocks, {args.width}x{args.height}x{args.frames}, "
             f"{args.text_tokens} text tokens, {str(dtype).removeprefix('torch.')}, {where}; training: LoRA r16"
             f"{'' if args.no_checkpointing else ' + gradient checkpointing'}")  # fmt: skip
    return results, setup


def main() -> int:
    results, setup = run(parse())
    print(f"\n{setup}\n")
    print("| mode | fp8 | blocks_to_swap | planned GPU weights | peak accelerator memory | s / step (median) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
