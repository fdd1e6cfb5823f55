"""The fused eager fp32 chains of ``kandinsky5.model.dit`` are bit-identical to the plain formulas they replace.

The reference functions below are the pre-fusion code, verbatim: one operation per line of the formula, with fp32
copies of every input.  Forward values and gradients must be ``torch.equal`` in fp32 and in bf16, per helper and
for the whole DiT (which the diffusers / official parity tests then cover transitively).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kandinsky5.configs import TINY_DIT
from kandinsky5.model import dit as dit_module
from kandinsky5.model.dit import DiT, apply_rope, gated_residual, modulate
from tests.helpers import randomize_


def ref_modulate(x, shift, scale):
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5)
    return (normed * (scale + 1.0) + shift).type_as(x)


def ref_gated_residual(x, gate, out):
    return (x.float() + gate * out.float()).type_as(x)


def ref_apply_rope(x, cos, sin):
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)
    return rotated.to(torch.bfloat16).type_as(x)


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
    _same_forward_and_grads(modulate, ref_modulate, x, shift, scale)
    _same_forward_and_grads(gated_residual, ref_gated_residual, x, gate, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [4, 12, 64])
def test_rope_bit_exact(dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    x = torch.randn(2, 19, 3, head_dim, generator=g).to(dtype)
    angles = torch.rand(19, head_dim // 2, generator=g) * 40
    _same_forward_and_grads(apply_rope, ref_apply_rope, x, constants=(angles.cos(), angles.sin()))  # tables: no grad


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_whole_dit_bit_exact_against_the_plain_formulas(dtype, monkeypatch):
    cfg = dataclasses.replace(TINY_DIT, num_visual_blocks=2, in_text_dim=48, in_text_dim2=24)
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
    refs = {"modulate": ref_modulate, "gated_residual": ref_gated_residual, "apply_rope": ref_apply_rope}
    for name, ref in refs.items():
        monkeypatch.setattr(dit_module, name, ref)
    ref_out, ref_grads = run()
    assert torch.equal(fused_out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(fused_grads, ref_grads))
