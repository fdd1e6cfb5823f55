"""Benchmark one denoising step with classifier-free guidance: batched cond+uncond vs two DiT calls, eager vs compiled;
with ``--magcache``, whole videos on the tiny bundle with and without MagCache step skipping.

    python bench/bench_sampling.py --quick            # CPU smoke run, a few seconds
    python bench/bench_sampling.py                    # D = 512, 4 visual blocks, 256x256x17 (1280 visual tokens)
    python bench/bench_sampling.py --sizes 128x128x9,256x256x17 --compile
    python bench/bench_sampling.py --model small --width 256 --height 256 --frames 17 --device cuda --dtype bfloat16
    python bench/bench_sampling.py --magcache [--quick]   # MagCache rows (calibrates the tiny DiT first)

A step is exactly what ``kandinsky5.sampling.pipeline.sample_latents`` does per step, with the sampler's own CFG
code (``kandinsky5.sampling.guidance``): build the 33-channel input (B, T, h, w, 33), run the DiT on the cond and
negative texts (lengths differ: 40 and 24 tokens, so the batched call pads and masks), combine
``v_u + w (v_c - v_u)``, Euler update.  The DiT has random weights (its speed does not depend on them).
``--compile`` adds the same two modes on a copy of the DiT whose blocks are compiled
(``kandinsky5.memory.compile``, inductor; the compile happens in an untimed warm-up step and is reported).
Every (size, DiT, mode) is timed step by step, interleaved, so a drifting machine load hits all alike; prints a
markdown table of seconds per step (median and min) and the speed-ups, which is what ``--cfg_mode auto`` is set from.

``--magcache``: the offline tiny bundle (``kandinsky5.tiny_weights``, real text encoders / VAE / DiT formats) makes
one calibration video (``--magcache_calibrate``'s code path; the tiny task has no official ratios) on one prompt and
seed, then samples another prompt and seed in full and with MagCache at each ``--thresholds`` value (official K and
retention), the runs interleaved ``--repeats`` times.  Rows: DiT calls whose visual blocks ran, seconds per video
(denoising only; the VAE decode is the same for all rows), speed-up, and the deviation from the full run: relative L2
of the latents and PSNR of the decoded uint8 frames (mean and worst frame).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
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
    m = p.add_argument_group("--magcache mode")
    m.add_argument("--magcache", action="store_true", help="benchmark MagCache on whole tiny-bundle videos instead")
    m.add_argument("--video_steps", type=int, default=50, help="denoising steps per video (50, official)")
    m.add_argument("--thresholds", type=float, nargs="+", default=[0.06, 0.12, 0.24], help="MagCache thresholds")
    m.add_argument("--repeats", type=int, default=3, help="timed repetitions of every row, interleaved (3)")
    m.add_argument("--bundle", default=None, help="tiny bundle dir (default: written to a temporary dir)")
    args = p.parse_args()
    if args.quick and args.magcache:
        args.video_steps, args.thresholds, args.repeats = 20, [0.12], 2
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


# ----------------------------------------------------------------------------------------------------------------
# --magcache: whole videos on the tiny bundle
# ----------------------------------------------------------------------------------------------------------------

CALIBRATION_PROMPT, CALIBRATION_SEED = "A red ball bounces on a wooden floor.", 1
EVAL_PROMPT, EVAL_SEED = "A cat walks on the grass, realistic style.", 42


def _psnr(a, b) -> list[float]:
    """Per-frame PSNR (dB) of two (F, H, W, 3) uint8 videos; inf for identical frames."""
    import numpy as np

    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    return [float("inf") if e == 0 else 10 * math.log10(255.0**2 / e) for e in mse]


def _tiny_pipeline(args, tmp: Path, device, dtype):
    from kandinsky5.configs import get_task
    from kandinsky5.memory.build import MemoryConfig, build_dit
    from kandinsky5.model.dit import AttentionSpec
    from kandinsky5.sampling.pipeline import Kandinsky5Pipeline
    from kandinsky5.tiny_weights import write_bundle

    bundle = Path(args.bundle) if args.bundle else write_bundle(tmp / "bundle", seed=0)
    task = get_task("k5-tiny-t2v")
    pipe = Kandinsky5Pipeline(task, text_encoder_qwen=str(bundle / "text_encoder"),
                              text_encoder_clip=str(bundle / "text_encoder2"), vae_path=str(bundle / "vae"),
                              device=device, dtype=dtype)  # fmt: skip
    dit = build_dit(task, bundle / "model" / "k5_tiny_t2v.safetensors", device, dtype, AttentionSpec(), MemoryConfig())
    return task, pipe, dit


def _timed_sample(pipe, dit, prepared, device) -> tuple[torch.Tensor, float, float]:
    """Latents, wall seconds and process CPU seconds (all threads; steadier than wall time on a shared CPU)."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    latents = pipe.sample(dit, prepared, progress=False)
    _sync(device)
    return latents, time.perf_counter() - start, time.process_time() - cpu


def magcache_rows(args, device, dtype) -> tuple[str, list[str]]:
    """(setup line, markdown rows) of the --magcache benchmark."""
    import tempfile

    from kandinsky5.sampling import magcache as mc
    from kandinsky5.sampling.pipeline import GenerationRequest, PreparedRequest

    with tempfile.TemporaryDirectory() as tmp:
        task, pipe, dit = _tiny_pipeline(args, Path(tmp), device, dtype)
        spec = SamplingSpec(args.width, args.height, args.frames, args.video_steps, args.guidance, 5.0, seed=EVAL_SEED)
        calibration = PreparedRequest(GenerationRequest(CALIBRATION_PROMPT, replace_seed(spec, CALIBRATION_SEED)))
        prepared = PreparedRequest(GenerationRequest(EVAL_PROMPT, spec))
        pipe.encode_prompts([calibration.request, prepared.request])  # outside the timed sampling
        pipe.release_text_encoder()
        pipe.magcache = calibrator = mc.Calibrator(task)
        pipe.sample(dit, calibration, progress=False)
        ratios = mc.MagRatios(tuple(calibrator.values()), spec.steps, "tiny calibration", True)
        configs = {"full": None, **{f"MagCache {t}": mc.MagCacheConfig(ratios, thresh=t) for t in args.thresholds}}
        times: dict[str, list[float]] = {name: [] for name in configs}
        cpu: dict[str, list[float]] = {name: [] for name in configs}
        latents, runs = {}, {}
        for _ in range(args.repeats):
            for name, config in configs.items():
                pipe.magcache = None if config is None else _Recording(config, runs, name)
                latents[name], seconds, cpu_seconds = _timed_sample(pipe, dit, prepared, device)
                times[name].append(seconds)
                cpu[name].append(cpu_seconds)
        frames = {name: pipe.decode(x)[0] for name, x in latents.items()}
    full_time, full_cpu, rows = statistics.median(times["full"]), statistics.median(cpu["full"]), []
    for name in configs:
        calls = 2 * spec.steps - (runs[name].skipped if name in runs else 0)
        err = ((latents[name] - latents["full"]).norm() / latents["full"].norm()).item()
        psnr = _psnr(frames[name], frames["full"])
        t, c = statistics.median(times[name]), statistics.median(cpu[name])
        rows.append(f"| {name} | {calls} / {2 * spec.steps} | {t:.3f} | {full_time / t:.2f}x | {c:.3f} | "
                    f"{full_cpu / c:.2f}x | {err:.2e} | {statistics.mean(psnr):.1f} | {min(psnr):.1f} |")  # fmt: skip
    setup = (f"tiny bundle DiT (D={task.dit.model_dim}, {task.dit.num_visual_blocks} visual blocks), "
             f"{spec.width}x{spec.height}x{spec.frames}, {spec.steps} steps, CFG {spec.guidance}, {device}, "
             f"{str(dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}, repeats {args.repeats}; "
             f"ratios calibrated on another prompt and seed")  # fmt: skip
    return setup, rows


def replace_seed(spec: SamplingSpec, seed: int) -> SamplingSpec:
    return dataclasses.replace(spec, seed=seed)


class _Recording:
    """A MagCache config whose runs are kept (for the skip count of each row)."""

    def __init__(self, config, runs: dict, name: str):
        self.config, self.runs, self.name = config, runs, name

    def start(self, steps: int, cfg: bool):
        self.runs[self.name] = run = self.config.start(steps, cfg)
        return run


def magcache_main(args) -> int:
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    setup, rows = magcache_rows(args, device, dtype)
    print(f"\n{setup}\n")
    print("| run | DiT calls run | s / video (median) | speed-up | CPU s / video | CPU speed-up | latent rel. L2 | "
          "PSNR mean (dB) | PSNR worst (dB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


def main() -> int:
    args = parse()
    if args.magcache:
        return magcache_main(args)
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
