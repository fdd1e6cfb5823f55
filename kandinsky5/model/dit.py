"""The Kandinsky 5 video DiT ("CrossDiT"), batched, with the official parameter names.

Public forward (used by the sampler, the trainer and outside scripts)::

    v = dit(x, text_embed, text_mask, pooled_text_embed, time, scale_factor=(1.0, 2.0, 2.0))

======================  ===============  =========================================================================
argument                shape            meaning
======================  ===============  =========================================================================
``x``                   (B, T, H, W, C)  channels-last latents, C = 33 (noisy 16 | cond 16 | mask 1) for video
``text_embed``          (B, L, 3584)     Qwen2.5-VL states, right-padded
``text_mask``           (B, L) bool      True = real token; None = every token is real
``pooled_text_embed``   (B, 768)         CLIP pooled vector
``time``                (B,)             flow time on the official 0..1000 scale (1000 = pure noise)
``scale_factor``        3 floats         RoPE position interpolation per axis (t, h, w)
return                  (B, T, H, W, 16) predicted velocity ``noise - x0``
======================  ===============  =========================================================================

Inside, the visual stream is ``(B, S, D)`` with ``S = T * H/2 * W/2`` tokens in row-major (t, h, w) order, or in
NABLA's fractal order when NABLA is on.  Attention tensors are ``(B, S, heads, head_dim)``.

Numerics follow the official model (``architecture.md`` 1.2-1.7): the time MLP and all modulation linears run in
fp32 with autocast off (``FP32Linear`` upcasts weights stored in bf16); LayerNorm, the ``(1 + scale)`` modulation
and residual adds are computed in fp32 and cast back to the stream dtype; q/k RMSNorm in fp32 with eps = fp32
machine epsilon; RoPE on interleaved pairs in fp32 with q and k rounded to bf16 right after rotation (as official,
diffusers and musubi do even in fp32 models).

Text of different lengths batches exactly: padded keys are masked in text self-attention and in every
cross-attention, and real tokens keep positions 0..L_i-1, so each sample gets the output it would get alone.

This file knows nothing about fp8, block swap, checkpointing, step caching or flags: those attach from outside
through the plain ``text_transformer_blocks`` / ``visual_transformer_blocks`` ModuleLists, and step caching
(MagCache, ``kandinsky5/sampling/magcache.py``) through ``forward(..., visual_blocks=fn)``, which replaces
``run_visual_blocks`` (the loop over the visual blocks, on tokens (B, S, D)) for one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky5.configs import DiTConfig, NablaConfig
from kandinsky5.model.attention import AttentionFn, masked_sdpa, resolve_backend
from kandinsky5.model.nabla import TILE, fractal_permutation, nabla_attention, sta_mask

__all__ = ["DiT", "AttentionSpec"]

ROPE_THETA = 10000.0

# visual_blocks(run_visual_blocks, tokens, text, time_embed, rope, text_mask, self_attend) -> tokens
VisualBlocksFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionSpec:
    """How visual self-attention runs: a dense backend name, or NABLA (which then ignores the backend)."""

    backend: str = "auto"
    nabla: NablaConfig | None = None


# ----------------------------------------------------------------------------------------------------------------
# numerics helpers
# ----------------------------------------------------------------------------------------------------------------


def _freqs(n: int, device: torch.device) -> torch.Tensor:
    """n frequencies ``theta^(-j/n)`` in fp32 (official ``get_freqs``)."""
    return torch.exp(-math.log(ROPE_THETA) * torch.arange(n, dtype=torch.float32, device=device) / n)


class FP32Linear(nn.Linear):
    """A conditioning Linear that always computes in fp32, whatever dtype its weights are stored in.

    The official model stores these weights as the checkpoint has them (bf16) and runs them under
    ``autocast(fp32)``, i.e. upcasts them at use; this does the same, so a bf16 checkpoint needs no fp32 copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Run a conditioning Linear with autocast off, in fp32 (see :class:`FP32Linear`)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return layer(x.float()).float()


# The three chains below run on every token of every block.  Each is written as few full-width passes as possible
# with the same fp32 operations in the same order as the plain formula, so results and gradients are bit-identical
# to it (tests/test_fused_numerics.py): in-place steps on fresh fp32 temporaries (autograd needs none of the
# overwritten values), no fp32 copy of a bf16 input that is read once (mixed-dtype ops upcast on the fly), and RoPE
# on whole contiguous rows (pair-swapped copy times signed sin) instead of stride-2 halves stacked back together.
# No fused multiply-add anywhere: it would round differently from official.


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` in fp32 (LayerNorm without affine, eps 1e-5), cast to x's dtype."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5)
    return normed.mul_(scale + 1.0).add_(shift).type_as(x)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x + gate * out`` in fp32, cast to x's dtype."""
    return (gate.float() * out).add_(x).type_as(x)


def rope_rows(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, D/2) cos/sin tables -> the (S, 1, D) fp32 rows :func:`apply_rope` multiplies by: ``[c, c]`` and
    ``[-s, s]`` per pair.  The DiT builds them once per call for all blocks (built inside every attention, autograd
    would save two more (S, D) fp32 tensors for q and two for k in each block)."""
    return cos.repeat_interleave(2, dim=-1)[:, None, :], torch.stack([-sin, sin], dim=-1).flatten(-2)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, S, H, D) by angles given as cos/sin (S, D/2) tables or as the (S, 1, D)
    rows of :func:`rope_rows`; returns bf16-rounded x.

    Pair (x0, x1) -> (x0 c - x1 s, x1 c + x0 s), computed as ``x * [c, c] + [x1, x0] * [-s, s]`` per pair.
    """
    if cos.dim() == 2:
        cos, sin = rope_rows(cos, sin)
    xf = x.to(torch.float32, copy=True)  # fresh, so it may be scaled in place (autograd keeps only cos and sin)
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    rotated = xf.mul_(cos).add_(swapped.mul_(sin))
    del swapped  # two fp32 temporaries at most, not three
    return rotated.to(torch.bfloat16).type_as(x)


def text_rope(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE1D angles for positions 0..L-1: cos, sin of shape (L, head_dim/2)."""
    pos = torch.arange(length, dtype=torch.float32, device=device)
    args = torch.outer(pos, _freqs(head_dim // 2, device))
    return torch.cos(args), torch.sin(args)


def visual_rope(
    grid: tuple[int, int, int], axes_dims: tuple[int, int, int], scale: tuple[float, float, float], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE3D angles for a (T, Hg, Wg) grid in row-major order: cos, sin of shape (S, head_dim/2)."""
    per_axis = []
    for n, dim, s in zip(grid, axes_dims, scale):
        pos = torch.arange(n, dtype=torch.float32, device=device)
        per_axis.append(torch.outer(pos, _freqs(dim // 2, device)) / s)
    t, h, w = grid
    args = torch.cat(
        [
            per_axis[0][:, None, None, :].expand(t, h, w, -1),
            per_axis[1][None, :, None, :].expand(t, h, w, -1),
            per_axis[2][None, None, :, :].expand(t, h, w, -1),
        ],
        dim=-1,
    ).reshape(t * h * w, -1)
    return torch.cos(args), torch.sin(args)


# ----------------------------------------------------------------------------------------------------------------
# modules (names are the official checkpoint's)
# ----------------------------------------------------------------------------------------------------------------


class TimeEmbeddings(nn.Module):
    """Sinusoid of width D (cos first) of the 0..1000 time -> Linear(D, Tm) -> SiLU -> Linear(Tm, Tm), in fp32."""

    def __init__(self, model_dim: int, time_dim: int):
        super().__init__()
        self.model_dim = model_dim
        self.in_layer = FP32Linear(model_dim, time_dim)
        self.out_layer = FP32Linear(time_dim, time_dim)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        args = torch.outer(time.float(), _freqs(self.model_dim // 2, time.device))
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return fp32_linear(self.out_layer, F.silu(fp32_linear(self.in_layer, emb)))


class TextEmbeddings(nn.Module):
    """Linear(in, out) + affine LayerNorm (fp32), result in the Linear's output dtype.  Also used for CLIP."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_layer(x)
        w, b = self.norm.weight.float(), self.norm.bias.float()
        return F.layer_norm(h.float(), (h.shape[-1],), w, b, eps=1e-5).type_as(h)


class VisualEmbeddings(nn.Module):
    """Patchify (1, 2, 2) with feature index ((pt*2+ph)*2+pw)*C + c, then Linear(4C, D)."""

    def __init__(self, in_channels: int, model_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.in_layer = nn.Linear(math.prod(patch_size) * in_channels, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(b, t // pt, pt, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return self.in_layer(x.flatten(4))  # (B, T', Hg, Wg, D)


class Modulation(nn.Module):
    """SiLU -> Linear(Tm, n*D) in fp32 (zero-initialised, as official)."""

    def __init__(self, time_dim: int, model_dim: int, num_params: int):
        super().__init__()
        self.out_layer = FP32Linear(time_dim, num_params * model_dim)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, time_embed: torch.Tensor) -> torch.Tensor:
        return fp32_linear(self.out_layer, F.silu(time_embed.float()))


class Attention(nn.Module):
    """Multi-head attention with per-head q/k RMSNorm; self-attention when ``context`` is None."""

    def __init__(self, model_dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.to_query = nn.Linear(model_dim, model_dim)
        self.to_key = nn.Linear(model_dim, model_dim)
        self.to_value = nn.Linear(model_dim, model_dim)
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)
        self.out_layer = nn.Linear(model_dim, model_dim)

    def _norm(self, x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.head_dim,), norm.weight.float(), eps=None).type_as(x)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, S, D); context (B, L, D) for cross-attention; rope (cos, sin): see :func:`apply_rope`;
        attend(q, k, v)."""
        src = x if context is None else context
        q = self._norm(self.to_query(x).unflatten(-1, (-1, self.head_dim)), self.query_norm)
        k = self._norm(self.to_key(src).unflatten(-1, (-1, self.head_dim)), self.key_norm)
        v = self.to_value(src).unflatten(-1, (-1, self.head_dim))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.out_layer(attend(q, k, v).flatten(-2))


class FeedForward(nn.Module):
    """Linear(D, F, no bias) -> exact GELU -> Linear(F, D, no bias)."""

    def __init__(self, model_dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(model_dim, ff_dim, bias=False)
        self.out_layer = nn.Linear(ff_dim, model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(x)))


class TextBlock(nn.Module):
    """Linguistic token refiner block: modulated bidirectional self-attention + FFN (6 modulation vectors)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.text_modulation = Modulation(cfg.time_dim, cfg.model_dim, 6)
        self.self_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.feed_forward = FeedForward(cfg.model_dim, cfg.ff_dim)

    def forward(self, x, time_embed, rope, text_mask):
        """x (B, L, D); time_embed (B, Tm); rope (cos, sin) (see apply_rope); text_mask (B, L) bool or None."""
        mods = self.text_modulation(time_embed)[:, None, :].chunk(6, dim=-1)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
        attend = lambda q, k, v: masked_sdpa(q, k, v, text_mask)  # noqa: E731
        out = self.self_attention(modulate(x, shift_sa, scale_sa), rope=rope, attend=attend)
        x = gated_residual(x, gate_sa, out)
        out = self.feed_forward(modulate(x, shift_ff, scale_ff))
        return gated_residual(x, gate_ff, out)


class VisualBlock(nn.Module):
    """Visual decoder block: self-attention (RoPE3D), cross-attention to text, FFN (9 modulation vectors)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.visual_modulation = Modulation(cfg.time_dim, cfg.model_dim, 9)
        self.self_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.cross_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.feed_forward = FeedForward(cfg.model_dim, cfg.ff_dim)

    def forward(self, x, text, time_embed, rope, text_mask, self_attend):
        """x (B, S, D); text (B, L, D); rope (cos, sin) (see apply_rope); self_attend(q, k, v) for visual tokens."""
        mods = self.visual_modulation(time_embed)[:, None, :].chunk(9, dim=-1)
        out = self.self_attention(modulate(x, mods[0], mods[1]), rope=rope, attend=self_attend)
        x = gated_residual(x, mods[2], out)
        cross = lambda q, k, v: masked_sdpa(q, k, v, text_mask)  # noqa: E731
        out = self.cross_attention(modulate(x, mods[3], mods[4]), context=text, attend=cross)
        x = gated_residual(x, mods[5], out)
        out = self.feed_forward(modulate(x, mods[6], mods[7]))
        return gated_residual(x, mods[8], out)


class OutLayer(nn.Module):
    """Modulated LayerNorm, Linear(D, 16*prod(patch)), unpatchify with feature index c*4 + (pt*2+ph)*2+pw."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.modulation = Modulation(cfg.time_dim, cfg.model_dim, 2)
        self.out_layer = nn.Linear(cfg.model_dim, math.prod(cfg.patch_size) * cfg.out_visual_dim)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        """x (B, T, Hg, Wg, D) -> (B, T*pt, Hg*ph, Wg*pw, C_out)."""
        shift, scale = self.modulation(time_embed)[:, None, None, None, :].chunk(2, dim=-1)
        x = self.out_layer(modulate(x, shift, scale))
        b, t, h, w, _ = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(b, t, h, w, -1, pt, ph, pw).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, t * pt, h * ph, w * pw, -1)


class DiT(nn.Module):
    """Kandinsky 5 CrossDiT.  ``state_dict()`` keys and shapes equal the official checkpoints (1514 tensors Pro)."""

    def __init__(self, config: DiTConfig, attention: AttentionSpec | None = None):
        super().__init__()
        self.config = config
        cfg = config
        self.time_embeddings = TimeEmbeddings(cfg.model_dim, cfg.time_dim)
        self.text_embeddings = TextEmbeddings(cfg.in_text_dim, cfg.model_dim)
        self.pooled_text_embeddings = TextEmbeddings(cfg.in_text_dim2, cfg.time_dim)
        self.visual_embeddings = VisualEmbeddings(cfg.in_channels, cfg.model_dim, cfg.patch_size)
        self.text_transformer_blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.num_text_blocks))
        self.visual_transformer_blocks = nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.num_visual_blocks))
        self.out_layer = OutLayer(cfg)
        self.set_attention(attention or AttentionSpec(), log_choice=False)

    def set_attention(self, spec: AttentionSpec, log_choice: bool = True) -> None:
        """Choose the visual self-attention kernel (resolved and logged now, never silently replaced)."""
        self.attention = spec
        self._dense_attend: AttentionFn = resolve_backend(spec.backend, log_choice=log_choice)

    # -- forward pieces -----------------------------------------------------------------------------------------

    def run_visual_blocks(self, tokens, text, time_embed, rope, text_mask, self_attend) -> torch.Tensor:
        """The visual decoder stack: tokens (B, S, D), text (B, L, D), time_embed (B, Tm), text_mask (B, L) or None.

        Rows are independent, so any subset of rows (with its rows of text / time_embed / mask) may run alone."""
        for block in self.visual_transformer_blocks:
            tokens = block(tokens, text, time_embed, rope, text_mask, self_attend)
        return tokens

    def embed_text(self, text_embed, text_mask, time_embed):
        """Project and refine the text: (B, L, 3584) -> (B, L, D)."""
        text = self.text_embeddings(text_embed)
        rope = rope_rows(*text_rope(text.shape[1], self.config.head_dim, text.device))
        for block in self.text_transformer_blocks:
            text = block(text, time_embed, rope, text_mask)
        return text

    def _visual_attention(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor | None, Callable]:
        """Token permutation (None = row-major) and the self-attention function for this grid."""
        nabla = self.attention.nabla
        if nabla is None:
            return None, self._dense_attend
        t, gh, gw = grid
        perm = fractal_permutation(t, gh, gw, device)
        sta = sta_mask(t, gh // TILE, gw // TILE, nabla.wT, nabla.wH, nabla.wW, device) if nabla.add_sta else None
        return perm, lambda q, k, v: nabla_attention(q, k, v, nabla, sta)

    def forward(
        self,
        x: torch.Tensor,
        text_embed: torch.Tensor,
        text_mask: torch.Tensor | None,
        pooled_text_embed: torch.Tensor,
        time: torch.Tensor,
        scale_factor: tuple[float, float, float] = (1.0, 2.0, 2.0),
        visual_blocks: VisualBlocksFn | None = None,
    ) -> torch.Tensor:
        """Predict the velocity (B, T, H, W, 16) for latents x (B, T, H, W, C_in); see the module docstring.

        ``visual_blocks`` replaces :meth:`run_visual_blocks` for this call (step caching such as MagCache decides
        there, outside the blocks); it gets ``run_visual_blocks`` and the same arguments."""
        if text_mask is not None and bool(text_mask.all()):
            text_mask = None  # nothing padded: skip the mask (same result, faster kernels)
        time_embed = self.time_embeddings(time) + self.pooled_text_embeddings(pooled_text_embed).float()
        text = self.embed_text(text_embed, text_mask, time_embed)

        visual = self.visual_embeddings(x)  # (B, T, Hg, Wg, D)
        shape, grid = visual.shape, tuple(visual.shape[1:4])
        rope = rope_rows(*visual_rope(grid, self.config.axes_dims, scale_factor, x.device))
        perm, self_attend = self._visual_attention(grid, x.device)
        tokens = visual.flatten(1, 3)
        del visual  # keep only the shape: the embedding output is not needed after the first block
        if perm is not None:
            tokens, rope = tokens[:, perm], (rope[0][perm], rope[1][perm])
        if visual_blocks is None:  # the loop inline: a call would keep its input tokens alive through every block
            for block in self.visual_transformer_blocks:
                tokens = block(tokens, text, time_embed, rope, text_mask, self_attend)
        else:
            tokens = visual_blocks(self.run_visual_blocks, tokens, text, time_embed, rope, text_mask, self_attend)
        if perm is not None:
            tokens = tokens[:, torch.argsort(perm)]
        return self.out_layer(tokens.view(shape), time_embed)


def num_blocks(dit: DiT) -> int:
    """Total transformer blocks (text + visual)."""
    return len(dit.text_transformer_blocks) + len(dit.visual_transformer_blocks)
