"""CFG calls (``kandinsky5.sampling.guidance``): the two modes agree, and ``--cfg_mode`` picks them as documented."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kandinsky5.common import UserError
from kandinsky5.configs import TINY_DIT
from kandinsky5.model.dit import DiT
from kandinsky5.model.text_encoders import TextEmbeds
from kandinsky5.sampling.guidance import cfg_batched, cfg_inputs, velocity, visual_tokens
from kandinsky5.sampling.pipeline import SamplingSpec, dit_input, sample_latents
from tests.helpers import randomize_, rel_close

SMALL = dataclasses.replace(TINY_DIT, num_visual_blocks=1)


def _text(rows: int, lengths: list[int], seed: int) -> TextEmbeds:
    g = torch.Generator().manual_seed(seed)
    items = [(torch.randn(n, TINY_DIT.in_text_dim, generator=g), torch.randn(TINY_DIT.in_text_dim2, generator=g))
             for n in lengths[:rows]]  # fmt: skip
    return TextEmbeds.pad_stack(items)


def test_rule_and_flag_values():
    cpu = torch.device("cpu")
    assert not cfg_batched("auto", cpu)  # size unknown: large
    assert cfg_batched("auto", cpu, 768) and not cfg_batched("auto", cpu, 1280)  # the measured CPU crossover
    assert cfg_batched("auto", torch.device("cuda")) and cfg_batched("auto", torch.device("cuda"), 10**5)
    assert visual_tokens(torch.zeros(1, 5, 32, 32, 16)) == 1280
    assert cfg_batched("batched", torch.device("cpu")) and not cfg_batched("two_calls", torch.device("cuda"))
    with pytest.raises(UserError, match="--cfg_mode"):
        cfg_batched("fast", torch.device("cpu"))


@pytest.mark.parametrize("shared_negative", [True, False])
def test_two_calls_equal_the_batched_call(shared_negative):
    dit = randomize_(DiT(SMALL), seed=1).eval()
    spec = SamplingSpec(64, 64, 5, 1, 5.0, 5.0, seed=0)
    cond = _text(2, [5, 9], 1)
    uncond = _text(1 if shared_negative else 2, [12, 3], 2)
    x = dit_input(torch.randn(2, 2, 8, 8, 16), first=False, last=False)
    t = torch.tensor(0.7)
    with torch.no_grad():
        batched = velocity(dit, x, cfg_inputs(cond, uncond, 5.0, True, "cpu", torch.float32), t, spec, torch.float32)
        pair = cfg_inputs(cond, uncond, 5.0, False, "cpu", torch.float32)
        assert isinstance(pair, tuple) and len(pair[1]) == 2
        two = velocity(dit, x, pair, t, spec, torch.float32)
    # q/k are rounded to bf16 after RoPE (as official): batch-dependent fp32 round-off flips a few bf16 ulps
    assert rel_close(two, batched, 1e-4)[0]
    if not shared_negative:
        return
    with torch.no_grad():  # the sampler's own loop, one step
        a = sample_latents(dit, cond, uncond, spec, progress=False, cfg_mode="two_calls")
        b = sample_latents(dit, cond, uncond, spec, progress=False, cfg_mode="batched")
    assert rel_close(a, b, 1e-3)[0]
