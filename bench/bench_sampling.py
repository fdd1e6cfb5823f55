"""Benchmark one denoising step with classifier-free guidance: batched cond+uncond vs two DiT calls, eager vs compiled.

    python bench/bench_sampling.py --quick            # CPU smoke run, a few seconds
    python bench/bench_sampling.py                    # D = 512, 4 visual blocks, 256x256x17 (1280 visual tokens)
    python bench/bench_sampling.py --sizes 128x128x9,256x256x17 --compile
    python bench/bench_sampling.py --model small --width 256 --height 256 --frames 17 --device cuda --dtype bfloat16

A step is exactly what ``kandinsky5.sampling.pipeline.sample_latents`` does per step, with the sampler's own CFG
code (``kandinsky5.sampling.guidance``): build the 33-channel input (B, T, h, w, 33), run the DiT on the cond and
negative texts (lengths differ: 40 and 24 tokens, so the batched call pads and masks), combine
``v_u + w (v_c - v_u)``, Euler update.  The DiT has random weights (its speed does not depend on them).
``--compile`` adds the same two modes on a copy of the DiT whose blocks are compiled
(``kandinsky5.memory.compile``, inductor; the compile happens in an untimed warm-up step and is reported).
Every (size, DiT, mode) is timed step by step, interleaved, so a drifting machine load hits all alike; prints a
markdown table of seconds per step (median and min) and the speed-ups, which is what ``--cfg_mode auto`` is set from.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.common import parse_dtype, resolve_device  # noqa: E402
from kandinsky5.configs import LITE_DIT, TINY_DIT, DiTConfig  # noqa: E402
from kandinsky5.memory.compile import CompileConfig, compile_blocks  # noqa: E402
from kandinsky5.model import flow  # noqa: E402
from kandinsky5.model.dit import DiT  # noqa: E402
from kandinsky5.model.text_encoders import TextEmbeds  # noqa: E402
from kandinsky5.sampling.guidance import cfg_inputs, velocity  # noqa: E402
from kandinsky5.sampling.pipeline import SamplingSpec, dit_input  # noqa: E402

SMALL_DIT = dataclasses.replace(TINY_DIT, model_dim=512, ff_dim=2048, time_dim=256, num_visual_blocks=4)
MODELS: dict[str, DiTConfig] = {"tiny": TINY_DIT, "small": SMALL_DIT, "lite": LITE_DIT}
COND_TOKENS, UNCOND_TOKENS = 40, 24
MODES = {"two calls": False, "batched": True}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", choices=sorted(MODELS), default="small", help="DiT size with random weights (small)")
    p.add_argument("--width", type=int, default=256, help="video width in pixels (256)")
    p.add_argument("--height", type=int, default=256, help="video height in pixels (256)")
    p.add_argument("--frames", type=int, default=17, help="video frames, 4k+1 (17)")
    p.add_argument("--sizes", default=None, help="several WxHxF sizes, comma-separated (overrides the three above)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode after one warm-up step (5)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG weight (5)")
    p.add_argument("--compile", action="store_true", help="also time a copy of the DiT with compiled blocks")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if present)")
    p.add_argument("--dtype", default="float32", help="DiT weight dtype: float32 / bfloat16 / float16 (float32)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 128x128x9, 2 timed steps")
    args = p.parse_args()
    if args.quick:
        args.model, args.width, args.height, args.frames, args.steps = "tiny", 128, 128, 9, 2
    sizes = args.sizes or f"{args.width}x{args.height}x{args.frames}"
    args.size_list = [tuple(int(v) for v in s.lower().split("x")) for s in sizes.split(",")]
    return args


def _text(cfg: DiTConfig, length: int, seed: int) -> TextEmbeds:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, cfg.in_text_dim, generator=g)
    return TextEmbeds(embeds, torch.ones(1, length, dtype=torch.bool), torch.randn(1, cfg.in_text_dim2, generator=g))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(cfg: DiTConfig, device, dtype) -> DiT:
    torch.manual_seed(0)
    dit = DiT(cfg).to(device=device, dtype=dtype).eval()
    for name, p in dit.named_parameters():  # keep the fp32 policy for time / modulation weights
        if name.startswith("time_embeddings.") or "modulation." in name:
            p.data = p.data.float()
    return dit


@dataclasses.dataclass
class Case:
    """One timed configuration: a size, a DiT (eager or compiled) and a CFG mode."""

    size: str
    dit_name: str
    mode: str
    step: object  # () -> None, one sampler step
    times: list[float] = dataclasses.field(default_factory=list)


def _case(size, spec: SamplingSpec, dit, dit_name, mode, texts, device, dtype) -> Case:
    x = torch.randn(1, *spec.latent_shape, device=device)
    sigmas = flow.sampling_sigmas(spec.steps + 1, spec.scheduler_scale)
    text = cfg_inputs(*texts, spec.guidance, MODES[mode], device, dtype)

    @torch.no_grad()
    def step(k: int = 0) -> None:
        v = velocity(dit, dit_input(x, first=False, last=False), text, sigmas[k], spec, dtype)
        flow.euler_step(x, v, sigmas[k], sigmas[k + 1])

    return Case(size, dit_name, mode, step)


def _timed(case: Case, device, k: int) -> float:
    _sync(device)
    start = time.perf_counter()
    case.step(k)
    _sync(device)
    return time.perf_counter() - start


def main() -> int:
    args = parse()
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    cfg = MODELS[args.model]
    texts = (_text(cfg, COND_TOKENS, 1), _text(cfg, UNCOND_TOKENS, 2))
    dits = {"eager": _build(cfg, device, dtype)}
    if args.compile:
        dits["compiled"] = copy.deepcopy(dits["eager"])
        compile_blocks(dits["compiled"], CompileConfig(enabled=True))
    cases = []
    for w, h, f in args.size_list:
        spec = SamplingSpec(w, h, f, args.steps, args.guidance, 5.0, seed=0)
        t, lh, lw, _ = spec.latent_shape
        size = f"{w}x{h}x{f} ({t * (lh // 2) * (lw // 2)} tokens)"
        for name, dit in dits.items():
            cases += [_case(size, spec, dit, name, mode, texts, device, dtype) for mode in MODES]
    warmup = {}
    for case in cases:  # untimed: the compile (and allocator warm-up) happens here
        warmup[id(case)] = _timed(case, device, 0)
    for k in range(args.steps):
        for case in cases if k % 2 else cases[::-1]:
            case.times.append(_timed(case, device, k))
    print(f"\nDiT `{args.model}` (D={cfg.model_dim}, {cfg.num_visual_blocks} visual blocks), text {COND_TOKENS}/"
          f"{UNCOND_TOKENS} tokens, {device}, {str(dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}, "
          f"guidance {args.guidance}\n")  # fmt: skip
    print("| size | DiT | CFG mode | s / step (median) | min | steps timed | first step (s) |")
    print("|---|---|---|---|---|---|---|")
    for c in cases:
        med = statistics.median(c.times)
        print(f"| {c.size} | {c.dit_name} | {c.mode} | {med:.4f} | {min(c.times):.4f} | {len(c.times)} "
              f"| {warmup[id(c)]:.2f} |")  # fmt: skip
    print()
    by_key = {(c.size, c.dit_name, c.mode): statistics.median(c.times) for c in cases}
    for size, name, _ in by_key:
        if _ == "batched":
            ratio = by_key[(size, name, "two calls")] / by_key[(size, name, "batched")]
            print(f"{size}, {name}: batched is {ratio:.2f}x the speed of two calls (median)")
    if args.compile:
        for size, name, mode in by_key:
            if name == "compiled":
                print(f"{size}, {mode}: compiled is {by_key[(size, 'eager', mode)] / by_key[(size, name, mode)]:.2f}x "
                      "the speed of eager (median)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
