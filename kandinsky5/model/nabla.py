"""NABLA block-sparse visual self-attention (``architecture.md`` section 2.3).

Geometry.  The visual tokens of one sample form a grid ``(T, Hg, Wg)`` (latent frames, latent H/2, latent W/2).
NABLA reorders them "fractally" into tiles of 1x8x8 tokens so that each run of 64 consecutive tokens is one 8x8
spatial tile of one frame.  Attention is then decided per pair of 64-token blocks:

* the STA prior keeps block pairs within ``wT//2`` frames and ``wH//2`` / ``wW//2`` tiles of each other;
* the dynamic map averages q and k over each block, takes ``softmax(qa ka^T / sqrt(D))`` per query block and keeps
  the key blocks that together hold the top ``P`` of the mass ("topcdf"), or the top ``ceil(P*N)`` blocks ("topk");
* the union is the block mask ``(B, H, N, N)`` bool with ``N = S / 64``; every kept block is attended densely.

Kernels.  On CUDA the mask becomes a flex-attention ``BlockMask`` (64x64 blocks, every kept block "full") and runs
under ``torch.compile``.  On CPU flex-attention cannot run this (no backward, eager mode ignores the block mask), so
the same mask is expanded to a dense ``(B, H, S, S)`` boolean mask for SDPA: exact, only slower.

Layouts: ``q, k, v`` are ``(B, S, H, D)`` in fractal token order, like the rest of ``kandinsky5.model.attention``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from kandinsky5.common import UserError
from kandinsky5.configs import NablaConfig

__all__ = [
    "TILE",
    "BLOCK",
    "check_geometry",
    "fractal_permutation",
    "sta_mask",
    "block_mask",
    "nabla_attention",
    "dense_mask_attention",
]

TILE = 8  # tokens per tile side
BLOCK = TILE * TILE  # tokens per attention block


def check_geometry(grid_h: int, grid_w: int) -> None:
    """Raise a UserError unless the token grid tiles into 8x8 blocks (pixel sizes multiples of 128)."""
    if grid_h % TILE == 0 and grid_w % TILE == 0:
        return
    px_h, px_w = grid_h * 16, grid_w * 16

    def near(v: int) -> str:
        lo = max(128, v // 128 * 128)
        return f"{lo}" if lo == v else f"{lo} or {lo + 128}"

    raise UserError(
        f"NABLA attention needs pixel height and width that are multiples of 128, got {px_w}x{px_h} "
        f"(nearest valid width {near(px_w)}, height {near(px_h)}); pick such a size, or cache latents with "
        f"kandinsky5_cache_latents.py --nabla_resize, or train without NABLA"
    )


@functools.lru_cache(maxsize=16)
def _fractal_permutation_cpu(t: int, grid_h: int, grid_w: int) -> torch.Tensor:
    idx = torch.arange(t * grid_h * grid_w).view(t, grid_h // TILE, TILE, grid_w // TILE, TILE)
    return idx.permute(0, 1, 3, 2, 4).reshape(-1)


def fractal_permutation(t: int, grid_h: int, grid_w: int, device: torch.device | None = None) -> torch.Tensor:
    """Token permutation ``perm`` (S,) so that ``x_fractal = x_rowmajor[:, perm]``; tiles of 8x8, order (t, hb, wb)."""
    check_geometry(grid_h, grid_w)
    return _fractal_permutation_cpu(t, grid_h, grid_w).to(device)


def sta_mask(t: int, hb: int, wb: int, wT: int, wH: int, wW: int, device: torch.device | None = None) -> torch.Tensor:
    """Sliding-tile prior: bool (N, N), N = t*hb*wb blocks in (t, hb, wb) order; kept iff all |deltas| <= w//2."""
    tt, hh, ww = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(hb, device=device), torch.arange(wb, device=device), indexing="ij"
    )
    coords = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], dim=-1)  # (N, 3)
    delta = (coords[:, None, :] - coords[None, :, :]).abs()
    limits = torch.tensor([wT // 2, wH // 2, wW // 2], device=device)
    return (delta <= limits).all(dim=-1)


def block_mask(q: torch.Tensor, k: torch.Tensor, cfg: NablaConfig, sta: torch.Tensor | None) -> torch.Tensor:
    """Dynamic NABLA block mask ``(B, H, N, N)`` bool from q, k ``(B, S, H, D)`` in fractal order."""
    b, s, h, d = q.shape
    n = s // BLOCK
    qa = q.transpose(1, 2).reshape(b, h, n, BLOCK, d).mean(-2)
    ka = k.transpose(1, 2).reshape(b, h, n, BLOCK, d).mean(-2)
    probs = torch.softmax(qa @ ka.transpose(-2, -1) / math.sqrt(d), dim=-1)
    if cfg.method == "topcdf":
        vals, order = probs.sort(dim=-1)
        keep_sorted = vals.cumsum(dim=-1) >= 1 - cfg.P
        mask = keep_sorted.gather(-1, order.argsort(dim=-1))
    else:  # topk: a fixed fraction of the key blocks
        count = max(1, math.ceil(cfg.P * n))
        top = probs.topk(count, dim=-1).indices
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
    if cfg.add_sta and sta is not None:
        mask = mask | sta
    return mask


def dense_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact reference: expand the (B, H, N, N) block mask to (B, H, S, S) and run SDPA."""
    full = mask.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=full)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GPU path: the block mask as a flex-attention BlockMask of full 64x64 blocks (official construction)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = mask.sum(-1, dtype=torch.int32)
    indices = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    bm = BlockMask.from_kv_blocks(torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=BLOCK, mask_mod=None)
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm)
    return out.transpose(1, 2)


def nabla_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: NablaConfig, sta: torch.Tensor | None
) -> torch.Tensor:
    """NABLA attention for q, k, v ``(B, S, H, D)`` in fractal order; flex on CUDA, dense-mask SDPA elsewhere."""
    mask = block_mask(q, k, cfg, sta)
    if q.is_cuda:
        return flex_block_attention(q, k, v, mask)
    return dense_mask_attention(q, k, v, mask)
