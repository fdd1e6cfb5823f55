"""Shared test utilities: random re-initialisation of models and diffusers reference construction."""

from __future__ import annotations

import torch
from torch import nn

from kandinsky5.configs import DiTConfig


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Redraw every parameter away from its init (norm weights around 1, everything else ~N(0, std))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_((base + noise).to(p.dtype))
    return module


def tiny_random_dit():
    """The tiny task's DiT with :func:`randomize_` weights (seed 0), in eval mode."""
    from kandinsky5.configs import get_task
    from kandinsky5.model.dit import DiT

    torch.manual_seed(0)
    return randomize_(DiT(get_task("k5-tiny-t2v").dit).eval(), 0)


def tiny_dit_inputs() -> tuple:
    """(x (1, 2, 8, 8, C), text (1, 7, D_text), no mask, pooled (1, D_pooled)) for the tiny DiT, seed 1."""
    from kandinsky5.configs import get_task

    cfg, g = get_task("k5-tiny-t2v").dit, torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 8, 8, cfg.in_channels, generator=g)
    return x, torch.randn(1, 7, cfg.in_text_dim, generator=g), None, torch.randn(1, cfg.in_text_dim2, generator=g)


def diffusers_dit(cfg: DiTConfig):
    """diffusers' Kandinsky5Transformer3DModel with the same architecture as ``cfg`` (dense attention)."""
    from diffusers import Kandinsky5Transformer3DModel

    return Kandinsky5Transformer3DModel(
        in_visual_dim=cfg.in_visual_dim,
        in_text_dim=cfg.in_text_dim,
        in_text_dim2=cfg.in_text_dim2,
        time_dim=cfg.time_dim,
        out_visual_dim=cfg.out_visual_dim,
        patch_size=cfg.patch_size,
        model_dim=cfg.model_dim,
        ff_dim=cfg.ff_dim,
        num_text_blocks=cfg.num_text_blocks,
        num_visual_blocks=cfg.num_visual_blocks,
        axes_dims=cfg.axes_dims,
        visual_cond=cfg.visual_cond,
        attention_type="regular",
    )


def diffusers_forward(model, x, text, pooled, time, scale_factor=(1.0, 2.0, 2.0)):
    """Run diffusers' transformer on one unpadded sample batch; x (B, T, H, W, C) channels-last."""
    b, t, h, w, _ = x.shape
    grid = (t, h // 2, w // 2)
    visual_pos = tuple(torch.arange(n) for n in grid)
    text_pos = torch.arange(text.shape[1])
    out = model(x, text, time, pooled, visual_pos, text_pos, scale_factor=scale_factor, return_dict=False)
    return out


def rel_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> tuple[bool, float]:
    """``max|out - ref| <= rel * max|ref|`` (architecture.md section 9 whole-model tolerance)."""
    err = (out.float() - ref.float()).abs().max().item()
    bound = rel * ref.float().abs().max().item()
    return err <= bound, err / max(ref.float().abs().max().item(), 1e-30)


def load_module(path, name: str):
    """Load a script (or any .py file) as a module by path; tests/test_layering.py forbids importing a script.

    The module is registered in ``sys.modules`` under ``name`` because dataclasses look their module up there.
    """
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- the DiT's fp32 chains written plainly (one op per term, fp32 copies of every input): the pre-fusion code, the
# -- reference of tests/test_fused_numerics.py and the "before" variant of bench/bench_train_step.py


def plain_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    normed = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=1e-5)
    return (normed * (scale + 1.0) + shift).type_as(x)


def plain_gated_residual(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (x.float() + gate * out.float()).type_as(x)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if cos.dim() == 3:  # the DiT's (S, 1, D) rows ([c, c], [-s, s] per pair): back to the (S, D/2) tables
        cos, sin = cos[:, 0, 0::2], sin[:, 0, 1::2]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)


def plain_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs, rounded to bf16 afterwards (as official)."""
    return _rotate_pairs(x, cos, sin).to(torch.bfloat16).type_as(x)


def rope_without_bf16_rounding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE without the official bf16 rounding of q/k: that rounding turns fp32 round-off differences (another
    summation order, another batch size) into bf16 ulps; tests monkeypatch this in to compare tightly."""
    return _rotate_pairs(x, cos, sin).type_as(x)
