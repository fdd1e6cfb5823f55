"""The speed checks of ``bench/gpu_check.py`` (issue 15): ``compile`` and ``cfg_mode``.

* ``compile`` -- the swap-check DiT (Pro width, few blocks) with a rank-16 LoRA built as the trainer builds it
  (``networks.lora_kandinsky.create_network``: fused branch, shared q/k/v down-projections), eager and with every
  block compiled (``kandinsky5.memory.compile``, inductor, default mode): a CFG sampling call (batch 2) and a LoRA
  training step (bf16 autocast, fwd + bwd); rows give the compile time, seconds eager / compiled, the speed-up and
  the compiled-vs-eager deviation (output and LoRA gradients; bf16 tolerance 3e-2 relative to the largest value).
* ``cfg_mode`` -- one guided sampler step (``kandinsky5.sampling.guidance``, the sampler's own code) with 40- and
  24-token texts, batched vs two calls, on the same DiT: seconds each, the ratio, and whether ``--cfg_mode auto``
  (``cfg_batched``) picks the faster one on this device (warn if not: the rule in guidance.py needs the number).

The dry run (CPU, tiny DiT, fp32) compiles with the ``aot_eager`` backend (traces and runs the same graphs, no
C++ build: seconds instead of a minute) and times single calls; its numbers are not measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from gpu_check_base import Row, Settings, free, median_time, random_module, rel

from kandinsky5.memory.compile import CompileConfig, compile_blocks
from kandinsky5.model import flow
from kandinsky5.model.dit import DiT
from kandinsky5.model.text_encoders import TextEmbeds
from kandinsky5.sampling.guidance import cfg_batched, cfg_inputs, velocity, visual_tokens
from kandinsky5.sampling.pipeline import SamplingSpec, dit_input
from networks.lora_kandinsky import create_network

BF16_TOLERANCE = 3e-2


def _dit_with_lora(s: Settings) -> tuple[DiT, object]:
    """The swap-check DiT with random weights and a rank-16 LoRA whose up weights are non-zero."""
    dit = random_module(lambda: DiT(s.sizes.swap_dit), s)
    net = create_network(1.0, 16, 16.0, dit)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    net.to(s.device).apply_to(dit)
    return dit, net


def _texts(s: Settings) -> tuple[TextEmbeds, TextEmbeds]:
    cfg, g = s.sizes.swap_dit, torch.Generator().manual_seed(0)
    return tuple(TextEmbeds(torch.randn(1, n, cfg.in_text_dim, generator=g), torch.ones(1, n, dtype=torch.bool),
                            torch.randn(1, cfg.in_text_dim2, generator=g)) for n in (40, 24))  # fmt: skip


def _spec(s: Settings) -> SamplingSpec:
    w, h, f = s.sizes.swap_video
    return SamplingSpec(w, h, f, 2, 5.0, 5.0, seed=0)


def _sampler_step(s: Settings, dit, batched: bool) -> Callable[[], torch.Tensor]:
    """One guided Euler step (batched or two DiT calls) on fixed latents; returns the new latents."""
    spec, (cond, uncond) = _spec(s), _texts(s)
    x = torch.randn(1, *spec.latent_shape, generator=torch.Generator().manual_seed(2)).to(s.device)
    text = cfg_inputs(cond, uncond, spec.guidance, batched, s.device, s.dtype)
    sigmas = flow.sampling_sigmas(spec.steps, spec.scheduler_scale)

    @torch.no_grad()
    def step() -> torch.Tensor:
        v = velocity(dit, dit_input(x, first=False, last=False), text, sigmas[0], spec, s.dtype)
        return flow.euler_step(x, v, sigmas[0], sigmas[1])

    return step


def _train_step(s: Settings, dit, net) -> Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]:
    """A LoRA step's forward + backward (bf16 autocast on CUDA) -> (output, LoRA gradients)."""
    spec, (cond, _) = _spec(s), _texts(s)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, *spec.latent_shape[:-1], s.sizes.swap_dit.in_channels, generator=g).to(s.device)
    te = cond.to(s.device, torch.float32)
    params = [p for p in net.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.cuda):
            out = dit(x, te.embeds, te.mask, te.pooled, torch.tensor([500.0], device=s.device))
        out.float().square().mean().backward()
        return out.detach().float(), [p.grad.detach().clone() for p in params]

    return step


def _compiled_twin(s: Settings) -> tuple[DiT, object]:
    """The same DiT and LoRA as :func:`_dit_with_lora` (same seeds), with every block compiled."""
    dit, net = _dit_with_lora(s)
    compile_blocks(dit, CompileConfig(enabled=True, backend="aot_eager" if s.dry_run else "inductor"))
    return dit, net


def _first_call(fn) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def check_compile(s: Settings) -> list[Row]:
    cfg, (w, h, f) = s.sizes.swap_dit, s.sizes.swap_video
    (dit, net), (twin, twin_net) = _dit_with_lora(s), _compiled_twin(s)
    size = f"D={cfg.model_dim}, {cfg.num_visual_blocks} visual blocks, {w}x{h}x{f}, LoRA rank 16"
    backend = "aot_eager (dry run)" if s.dry_run else "inductor"
    rows = [_compile_row(s, _sampler_step(s, dit, True), _sampler_step(s, twin, True),
                         f"{size}: CFG sampling call (batch 2), {backend}")]  # fmt: skip
    free(s)
    rows.append(_compile_row(s, _train_step(s, dit, net), _train_step(s, twin, twin_net),
                             f"{size}: LoRA training step (fwd + bwd, output and LoRA grads), {backend}"))  # fmt: skip
    return rows


def _compile_row(s: Settings, eager, compiled, config: str) -> Row:
    """Eager vs compiled ``fn``: compile + first call, median seconds each, the largest relative deviation."""
    ref = _flat(eager())
    got, first = _first_call(compiled)
    t_eager, t_comp = median_time(s, eager), median_time(s, compiled)
    err = max(rel(a, b) for a, b in zip(_flat(got), ref))
    return Row("compile", config, f"compile + first call {first:.1f} s; {t_eager:.3f} s eager vs {t_comp:.3f} s "
               f"compiled ({t_eager / t_comp:.2f}x); rel. deviation {err:.1e}", _status(err),
               {"first_call": first, "eager": t_eager, "compiled": t_comp, "rel": err})  # fmt: skip


def _flat(out) -> list[torch.Tensor]:
    """A step's result (tensor, or (output, [grads])) as a flat list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [out[0], *out[1]]


def _status(err: float) -> str:
    return "ok" if err <= BF16_TOLERANCE else "FAIL"


def check_cfg_mode(s: Settings) -> list[Row]:
    cfg, (w, h, f) = s.sizes.swap_dit, s.sizes.swap_video
    dit = random_module(lambda: DiT(cfg), s).eval()
    batched, two = _sampler_step(s, dit, True), _sampler_step(s, dit, False)
    err = rel(batched(), two())
    t_batched, t_two = median_time(s, batched), median_time(s, two)
    faster_batched = t_batched < t_two
    auto = cfg_batched("auto", s.device, visual_tokens(torch.zeros(1, *_spec(s).latent_shape)))
    status = "ok" if auto == faster_batched or s.dry_run else "warn"  # the rule needs this number
    size = f"D={cfg.model_dim}, {cfg.num_visual_blocks} visual blocks, {w}x{h}x{f}, texts 40 / 24 tokens"
    return [
        Row("cfg_mode", f"{size}: one guided step", f"batched {t_batched:.3f} s, two calls {t_two:.3f} s "
            f"(batched {t_two / t_batched:.2f}x the speed); auto picks {'batched' if auto else 'two calls'}; "
            f"batched vs two calls rel. {err:.1e}", status if err <= BF16_TOLERANCE else "FAIL",
            {"batched": t_batched, "two_calls": t_two, "auto_batched": auto, "rel": err}),
    ]  # fmt: skip
