"""The fused eager fp32 chains of ``kandinsky5.model.dit`` are bit-identical to the plain formulas they replace.

The references (``tests.helpers.plain_*``) are the pre-fusion code, verbatim: one operation per term of the
formula, with fp32 copies of every input.  Forward values and gradients must be ``torch.equal`` in fp32 and in bf16,
per helper and for the whole DiT (which the diffusers / official parity tests then cover transitively).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kandinsky5.configs import TINY_DIT
from kandinsky5.model import dit as dit_module
from kandinsky5.model.dit import DiT, apply_rope, gated_residual, modulate
from tests.helpers import plain_gated_residual, plain_modulate, plain_rope, randomize_

DTYPES = [torch.float32, torch.bfloat16]


def _same_forward_and_grads(fused, ref, *inputs, constants=()):
    a = [t.detach().clone().requires_grad_() for t in inputs]
    b = [t.detach().clone().requires_grad_() for t in inputs]
    a, b = a + list(constants), b + list(constants)
    out_a, out_b = fused(*a), ref(*b)
    assert out_a.dtype == out_b.dtype and torch.equal(out_a, out_b)
    grad = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(9)).to(out_a.dtype)
    out_a.backward(grad)
    out_b.backward(grad)
    for i, (ga, gb) in enumerate(zip(a[: len(inputs)], b[: len(inputs)])):
        assert torch.equal(ga.grad, gb.grad), f"gradient of input {i} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_modulate_and_gated_residual_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    x, out = (torch.randn(2, 37, 24, generator=g).to(dtype) for _ in range(2))
    shift, scale, gate = (torch.randn(2, 1, 24, generator=g) for _ in range(3))
    _same_forward_and_grads(modulate, plain_modulate, x, shift, scale)
    _same_forward_and_grads(gated_residual, plain_gated_residual, x, gate, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [4, 12, 64])
def test_rope_bit_exact(dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    x = torch.randn(2, 19, 3, head_dim, generator=g).to(dtype)
    angles = torch.rand(19, head_dim // 2, generator=g) * 40
    _same_forward_and_grads(apply_rope, plain_rope, x, constants=(angles.cos(), angles.sin()))  # tables: no grad


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_whole_dit_bit_exact_against_the_plain_formulas(dtype, monkeypatch):
    cfg = dataclasses.replace(TINY_DIT, num_visual_blocks=1, in_text_dim=48, in_text_dim2=24, ff_dim=256)
    model = randomize_(DiT(cfg), seed=2).to(dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 8, 8, cfg.in_channels, generator=g).to(dtype)
    text = torch.randn(2, 6, cfg.in_text_dim, generator=g).to(dtype)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    pooled = torch.randn(2, cfg.in_text_dim2, generator=g).to(dtype)
    time = torch.tensor([500.0, 992.0])

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x, text, mask, pooled, time)
        out.float().square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    fused_out, fused_grads = run()
    refs = {"modulate": plain_modulate, "gated_residual": plain_gated_residual, "apply_rope": plain_rope}
    for name, ref in refs.items():
        monkeypatch.setattr(dit_module, name, ref)
    ref_out, ref_grads = run()
    assert torch.equal(fused_out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(fused_grads, ref_grads))
