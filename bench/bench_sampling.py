"""Benchmark one denoising step with classifier-free guidance: batched cond+uncond (ours) vs two DiT calls (official).

    python bench/bench_sampling.py --quick            # CPU smoke run, a few seconds
    python bench/bench_sampling.py --model small --width 256 --height 256 --frames 17 --device cuda --dtype bfloat16

A step is exactly what ``kandinsky5.sampling.pipeline.sample_latents`` does per step: build the 33-channel input
(B, T, h, w, 33), run the DiT on the cond and negative texts (lengths differ: 40 and 24 tokens, so the batched call
uses the text key mask), combine ``v_u + w (v_c - v_u)``, Euler update.  The DiT has random weights (its speed does
not depend on them).  Prints a markdown table of seconds per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.common import parse_dtype, resolve_device  # noqa: E402
from kandinsky5.configs import LITE_DIT, TINY_DIT, DiTConfig  # noqa: E402
from kandinsky5.model import flow  # noqa: E402
from kandinsky5.model.dit import DiT  # noqa: E402
from kandinsky5.model.text_encoders import TextEmbeds  # noqa: E402
from kandinsky5.sampling.pipeline import SamplingSpec, _cfg_text, _velocity, dit_input  # noqa: E402

SMALL_DIT = dataclasses.replace(TINY_DIT, model_dim=512, ff_dim=2048, time_dim=256, num_visual_blocks=4)
MODELS: dict[str, DiTConfig] = {"tiny": TINY_DIT, "small": SMALL_DIT, "lite": LITE_DIT}
COND_TOKENS, UNCOND_TOKENS = 40, 24
MODES = ("two calls", "batched")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", choices=sorted(MODELS), default="small", help="DiT size with random weights (small)")
    p.add_argument("--width", type=int, default=256, help="video width in pixels (256)")
    p.add_argument("--height", type=int, default=256, help="video height in pixels (256)")
    p.add_argument("--frames", type=int, default=17, help="video frames, 4k+1 (17)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode after one warm-up step (5)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG weight (5)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if present)")
    p.add_argument("--dtype", default="float32", help="DiT weight dtype: float32 / bfloat16 / float16 (float32)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 128x128x9, 2 timed steps")
    args = p.parse_args()
    if args.quick:
        args.model, args.width, args.height, args.frames, args.steps = "tiny", 128, 128, 9, 2
    return args


def _text(cfg: DiTConfig, length: int, seed: int) -> TextEmbeds:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, cfg.in_text_dim, generator=g)
    return TextEmbeds(embeds, torch.ones(1, length, dtype=torch.bool), torch.randn(1, cfg.in_text_dim2, generator=g))


def _two_calls(dit, model_in, cond, uncond, t, spec, dtype):
    """Official: a cond forward, then an uncond forward with the negative prompt's own length."""
    time_in = flow.dit_time(t).expand(1).to(model_in.device)
    outs = [
        dit(model_in.to(dtype), te.embeds, te.mask, te.pooled, time_in, scale_factor=spec.rope_scale).float()
        for te in (cond, uncond)
    ]
    return flow.cfg_combine(outs[0], outs[1], spec.guidance)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(mode: str, dit, x, k, sigmas, texts, spec, dtype) -> torch.Tensor:
    """One full sampler step in ``mode``; returns the updated latents."""
    model_in = dit_input(x, first=False, last=False)
    if mode == "batched":
        v = _velocity(dit, model_in, texts["batched"], sigmas[k], spec, dtype)
    else:
        v = _two_calls(dit, model_in, texts["cond"], texts["uncond"], sigmas[k], spec, dtype)
    return flow.euler_step(x, v, sigmas[k], sigmas[k + 1])


@torch.no_grad()
def time_modes(dit, spec: SamplingSpec, cond, uncond, steps: int, device, dtype) -> dict[str, list[float]]:
    """Seconds per step of each mode, the modes interleaved step by step (fair under a drifting machine load);
    the first, warm-up round is dropped."""
    x = torch.randn(1, *spec.latent_shape, device=device)
    sigmas = flow.sampling_sigmas(steps + 1, spec.scheduler_scale)
    texts = {
        "batched": _cfg_text(cond, uncond, spec.guidance).to(device, dtype),
        "cond": cond.to(device, dtype),
        "uncond": uncond.to(device, dtype),
    }
    times: dict[str, list[float]] = {MODES[0]: [], MODES[1]: []}
    for k in range(steps + 1):
        for mode in MODES if k % 2 else MODES[::-1]:
            _sync(device)
            start = time.perf_counter()
            _step(mode, dit, x, k, sigmas, texts, spec, dtype)
            _sync(device)
            times[mode].append(time.perf_counter() - start)
    return {mode: t[1:] for mode, t in times.items()}


def main() -> int:
    args = parse()
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    cfg = MODELS[args.model]
    spec = SamplingSpec(args.width, args.height, args.frames, args.steps, args.guidance, 5.0, seed=0)
    torch.manual_seed(0)
    dit = DiT(cfg).to(device=device, dtype=dtype).eval()
    for name, p in dit.named_parameters():  # keep the fp32 policy for time / modulation weights
        if name.startswith("time_embeddings.") or "modulation." in name:
            p.data = p.data.float()
    cond, uncond = _text(cfg, COND_TOKENS, 1), _text(cfg, UNCOND_TOKENS, 2)
    t, h, w, _ = spec.latent_shape
    tokens = t * (h // 2) * (w // 2)
    results = time_modes(dit, spec, cond, uncond, args.steps, device, dtype)
    size = f"{args.width}x{args.height}x{args.frames} ({tokens} visual tokens)"
    print(f"\nDiT `{args.model}` (D={cfg.model_dim}, {cfg.num_visual_blocks} visual blocks), {size}, text "
          f"{COND_TOKENS}/{UNCOND_TOKENS} tokens, {device}, {str(dtype).removeprefix('torch.')}, "
          f"threads {torch.get_num_threads()}\n")  # fmt: skip
    print("| CFG mode | s / step (median) | min | steps timed |")
    print("|---|---|---|---|")
    for mode, times in results.items():
        print(f"| {mode} | {statistics.median(times):.4f} | {min(times):.4f} | {len(times)} |")
    speedup = statistics.median(results["two calls"]) / statistics.median(results["batched"])
    print(f"\nspeed-up of batched over two calls (median): {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
