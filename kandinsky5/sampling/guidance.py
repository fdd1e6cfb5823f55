"""Classifier-free guidance calls of the sampler: the text batches and the DiT call(s) of one guided step.

``v = v_u + w (v_c - v_u)``; the unconditional pass is skipped when ``|w - 1| <= 1e-6`` (``flow.needs_uncond``).
Two ways to get ``v_c`` and ``v_u`` for latents ``x`` (B, T, h, w, C), the same numbers up to round-off:

* two DiT calls, as official: the cond texts (B rows) and the uncond texts (B rows, one shared negative repeated)
  each padded on their own (``cfg_inputs(..., batched=False)`` returns the pair);
* one batched call: x repeated to 2B rows, cond rows then uncond rows of text right-padded to one length with a
  key mask, which the DiT handles exactly (``cfg_text``).

:func:`cfg_batched` picks one for ``--cfg_mode`` (``auto``: the rule measured by ``bench/bench_sampling.py``, by
device and size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kandinsky5.common import UserError
from kandinsky5.model import flow
from kandinsky5.model.text_encoders import TextEmbeds

if TYPE_CHECKING:
    from kandinsky5.sampling.pipeline import SamplingSpec

__all__ = ["CFG_MODES", "CPU_BATCHED_MAX_TOKENS", "cfg_batched", "visual_tokens", "cfg_text", "cfg_inputs", "velocity"]

CFG_MODES = ("auto", "batched", "two_calls")
CPU_BATCHED_MAX_TOKENS = 1024  # measured crossover on the CPU (see cfg_batched)


def cfg_text(cond: TextEmbeds, uncond: TextEmbeds | None, guidance: float) -> TextEmbeds:
    """cond rows, followed by the uncond rows (one uncond row is repeated for every cond row) when CFG is on."""
    if not flow.needs_uncond(guidance):
        return cond
    if uncond is None:
        raise ValueError(f"guidance {guidance} needs unconditional (negative-prompt) embeddings")
    rows = range(len(cond))
    uncond_rows = [0] * len(cond) if len(uncond) == 1 else rows
    if len(uncond) not in (1, len(cond)):
        raise ValueError(f"{len(uncond)} negative embeddings for {len(cond)} prompts")
    items = [cond.unpadded(i) for i in rows] + [uncond.unpadded(j) for j in uncond_rows]
    return TextEmbeds.pad_stack(items)


def cfg_batched(mode: str, device: torch.device, tokens: int | None = None) -> bool:
    """Whether cond and uncond run as one batched DiT call (``--cfg_mode``: auto, batched, two_calls).

    auto is the measured rule (``bench/bench_sampling.py``, docs/performance.md): on CUDA the batched call (one
    launch sequence, weights read once); on the CPU the batched call up to ``CPU_BATCHED_MAX_TOKENS`` visual tokens
    per video (1.08-1.22x faster on an idle 2-core machine at 192-768 tokens), two calls above (0.91-0.94x for
    batched at 1280 tokens: its padded, masked text attention and the doubled attention batch cost more than the
    saved per-call overhead).  ``tokens`` None (unknown) counts as large.
    """
    if mode not in CFG_MODES:
        raise UserError(f"--cfg_mode must be one of {', '.join(CFG_MODES)}; got {mode!r}")
    if mode == "auto":
        return device.type == "cuda" or (tokens is not None and tokens <= CPU_BATCHED_MAX_TOKENS)
    return mode == "batched"


def visual_tokens(latents: torch.Tensor) -> int:
    """Visual tokens of one video in latents (B, T, h, w, C): T * h/2 * w/2 (the DiT's 1x2x2 patches)."""
    return latents.shape[1] * (latents.shape[2] // 2) * (latents.shape[3] // 2)


def cfg_inputs(cond: TextEmbeds, uncond: TextEmbeds | None, guidance: float, batched: bool, device, dtype):
    """The text side of the CFG calls: one padded batch (batched) or the (cond, uncond) pair (two calls)."""
    if batched or not flow.needs_uncond(guidance):
        return cfg_text(cond, uncond, guidance).to(device, dtype)
    rows = cfg_text(cond, uncond, guidance)
    n = len(cond)
    uncond_rows = TextEmbeds.pad_stack([rows.unpadded(i) for i in range(n, 2 * n)])
    return cond.to(device, dtype), uncond_rows.to(device, dtype)


def velocity(dit, model_in: torch.Tensor, text, t: torch.Tensor, spec: SamplingSpec, dtype, cache=None, step: int = 0):
    """Guided velocity in fp32: ``text`` is one batch (cond rows, then uncond rows when CFG is on; one DiT call)
    or a (cond, uncond) pair (two DiT calls, as official).

    ``cache`` (a MagCache run, ``magcache.py``) supplies each call's ``visual_blocks`` for step ``step``: the
    batched call carries streams (0, 1) (cond, uncond), the two calls carry (0,) and (1,), so every stream keeps
    its own residual and skip decisions either way."""
    time = flow.dit_time(t).to(model_in.device)
    if isinstance(text, tuple):
        v_cond, v_uncond = (_call(dit, model_in, te, time, spec, dtype, cache, step, (s,)) for s, te in enumerate(text))
        return flow.cfg_combine(v_cond, v_uncond, spec.guidance)
    cfg = flow.needs_uncond(spec.guidance)
    x = torch.cat([model_in, model_in]) if cfg else model_in
    v = _call(dit, x, text, time, spec, dtype, cache, step, (0, 1) if cfg else (0,))
    if not cfg:
        return v
    v_cond, v_uncond = v.split(model_in.shape[0])
    return flow.cfg_combine(v_cond, v_uncond, spec.guidance)


def _call(dit, x: torch.Tensor, text: TextEmbeds, time, spec: SamplingSpec, dtype, cache, step, streams):
    """One DiT call on rows ``x`` (fp32 result); with a MagCache run, its ``visual_blocks`` for ``streams``."""
    extra = {} if cache is None else {"visual_blocks": cache.blocks(step, streams)}
    time = time.expand(x.shape[0])
    return dit(x.to(dtype), text.embeds, text.mask, text.pooled, time, scale_factor=spec.rope_scale, **extra).float()
