"""NABLA block-sparse visual self-attention (``architecture.md`` section 2.3).

Geometry.  The visual tokens of one sample form a grid ``(T, Hg, Wg)`` (latent frames, latent H/2, latent W/2).
NABLA reorders them "fractally" into tiles of 1x8x8 tokens so that each run of 64 consecutive tokens is one 8x8
spatial tile of one frame.  Attention is then decided per pair of 64-token blocks:

* the STA prior keeps block pairs within ``wT//2`` frames and ``wH//2`` / ``wW//2`` tiles of each other;
* the dynamic map averages q and k over each block, takes ``softmax(qa ka^T / sqrt(D))`` per query block and keeps
  the key blocks that together hold the top ``P`` of the mass ("topcdf"), or the top ``ceil(P*N)`` blocks ("topk");
* the union is the block mask ``(B, H, N, N)`` bool with ``N = S / 64``; every kept block is attended densely.

Cost.  The STA prior depends only on the latent grid and the windows, so it is built once per grid (separably, as
the official ``fast_sta_nabla``; bool ``(N, N)``) and cached.  The block mask is a selection, not a function to
differentiate: it is built under ``no_grad``, a few heads at a time, so its sort / cumsum / index transients stay
below ``_CHUNK_ELEMS`` elements instead of several ``(B, H, N, N)`` int64 tensors (15 GB at Pro 10 s HD).

Kernels.  On CUDA the mask becomes a flex-attention ``BlockMask`` (64x64 blocks, every kept block "full") and runs
under ``torch.compile`` with the official settings (:data:`FLEX_COMPILE`).  Why these settings:

* ``mode="max-autotune-no-cudagraphs"``: in the default mode Inductor tries one kernel config per GPU family, and
  for head dim 128 in bf16 its forward ``BLOCK_M`` is 128 on sm80-sm120, which does not divide the 64-token
  blocks ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N"), and the sm90 backward config
  (64, 128, 128, 64) does not either (``NoValidChoicesError``).  Max-autotune adds torch's config list, which
  holds 64x64 forward and 32/64 backward tiles (checked for sm80/86/89/90/120 in ``tests/test_nabla.py``).
* ``dynamic=True`` and one sample per call: one compiled kernel serves every bucket and batch size.  The batch is
  run sample by sample (a CFG batch of 2 is two calls of the same kernel), because Dynamo specialises a batch of 1
  and flex marks the head count static; shapes are traced without "duck sizing" (``use_duck_shape=False``), so a
  block count that happens to equal the head count does not pin the sequence length.  What still makes a new
  compiled entry: grad mode (training vs sampling), dtype and a 1-block grid (the kernel runs outside autocast,
  whose state would count too).
* ``fullgraph=True``: a graph break or Dynamo's recompile limit (8 entries) is an error, never the silent eager
  fallback (which materialises the S x S scores: ~145 GB at 47,616 tokens).

On CPU flex-attention has no backward, so :func:`nabla_attention` expands the same mask to a dense
``(B, H, S, S)`` boolean mask for SDPA: exact, only slower.  :func:`flex_block_attention` itself also runs on the
CPU without grad (the tests use that).

Layouts: ``q, k, v`` are ``(B, S, H, D)`` in fractal token order, like the rest of ``kandinsky5.model.attention``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from kandinsky5.common import UserError
from kandinsky5.configs import NablaConfig

__all__ = [
    "TILE",
    "BLOCK",
    "FLEX_COMPILE",
    "check_geometry",
    "fractal_permutation",
    "sta_mask",
    "block_mask",
    "nabla_attention",
    "dense_mask_attention",
    "flex_block_attention",
]

TILE = 8  # tokens per tile side
BLOCK = TILE * TILE  # tokens per attention block
FLEX_COMPILE = {"mode": "max-autotune-no-cudagraphs", "dynamic": True, "fullgraph": True}
_CHUNK_ELEMS = 1 << 25  # block-mask work per head chunk: at most this many (N x N) elements at a time


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


# ----------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------


def _near(n: int, window: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: |i - j| <= window // 2 along one axis."""
    r = torch.arange(n, device=device)
    return (r[:, None] - r[None, :]).abs() <= window // 2


@functools.lru_cache(maxsize=8)
def _sta_cached(t: int, hb: int, wb: int, wT: int, wH: int, wW: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        near_t, near_h, near_w = _near(t, wT, device), _near(hb, wH, device), _near(wb, wW, device)
        prior = near_t[:, None, None, :, None, None] & near_h[None, :, None, None, :, None]
        return (prior & near_w[None, None, :, None, None, :]).reshape(t * hb * wb, t * hb * wb)


def sta_mask(t: int, hb: int, wb: int, wT: int, wH: int, wW: int, device: torch.device | None = None) -> torch.Tensor:
    """Sliding-tile prior: bool (N, N), N = t*hb*wb blocks in (t, hb, wb) order; kept iff all |deltas| <= w//2.

    Cached per (grid, windows, device): the same tensor comes back for the same grid, so never modify it in place.
    """
    return _sta_cached(t, hb, wb, wT, wH, wW, torch.device("cpu" if device is None else device))


def _head_chunks(b: int, h: int, n: int) -> Iterator[slice]:
    """Head ranges whose (b, heads, n, n) work stays under ``_CHUNK_ELEMS`` elements (at least one head)."""
    step = max(1, _CHUNK_ELEMS // max(1, b * n * n))
    for start in range(0, h, step):
        yield slice(start, min(h, start + step))


def _select(probs: torch.Tensor, cfg: NablaConfig, out: torch.Tensor) -> None:
    """Write the kept key blocks of ``probs`` (..., N, N) into the bool ``out`` (zeros) of the same shape."""
    if cfg.method == "topcdf":
        vals, order = probs.sort(dim=-1)
        out.scatter_(-1, order, vals.cumsum_(dim=-1) >= 1 - cfg.P)
    else:  # topk: a fixed fraction of the key blocks
        count = max(1, math.ceil(cfg.P * probs.shape[-1]))
        out.scatter_(-1, probs.topk(count, dim=-1).indices, True)


@torch.no_grad()
def block_mask(q: torch.Tensor, k: torch.Tensor, cfg: NablaConfig, sta: torch.Tensor | None) -> torch.Tensor:
    """Dynamic NABLA block mask ``(B, H, N, N)`` bool from q, k ``(B, S, H, D)`` in fractal order (no autograd)."""
    b, s, h, d = q.shape
    n = s // BLOCK
    qa = q.view(b, n, BLOCK, h, d).mean(2).transpose(1, 2)  # (B, H, N, D), block means
    ka = k.view(b, n, BLOCK, h, d).mean(2).transpose(1, 2)
    mask = torch.zeros(b, h, n, n, dtype=torch.bool, device=q.device)
    for heads in _head_chunks(b, h, n):
        probs = torch.softmax(qa[:, heads] @ ka[:, heads].transpose(-2, -1) / math.sqrt(d), dim=-1)
        part = mask[:, heads]  # a view: written in place
        _select(probs, cfg, part)
        if cfg.add_sta and sta is not None:
            part |= sta
    return mask


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


def dense_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact reference: expand the (B, H, N, N) block mask to (B, H, S, S) and run SDPA."""
    full = mask.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=full)
    return out.transpose(1, 2)


def _flex_sample(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor):
    """Compiled body: q, k, v (1, H, S, D); counts (1, H, N) int32; indices (1, H, N, N) int32 -> (1, H, S, D)."""
    # No partial blocks (kv_num_blocks = 0), so their indices are never read.  CUDA: the full-block indices, as the
    # official code passes them (no extra memory); CPU: Inductor's C++ template fails when both are one buffer.
    no_partial = indices if indices.is_cuda else indices.new_zeros(()).expand_as(indices)
    bm = BlockMask.from_kv_blocks(
        torch.zeros_like(counts), no_partial, counts, indices, BLOCK_SIZE=BLOCK, mask_mod=None,
        compute_q_blocks=torch.is_grad_enabled(),  # the transposed indices are only needed by the backward
    )  # fmt: skip
    return flex_attention(q, k, v, block_mask=bm)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(_flex_sample, **FLEX_COMPILE)


def _kv_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (1, H, N) int32, indices (1, H, N, N) int32: kept key blocks first) of one sample's mask (1, H, N, N)."""
    counts = mask.sum(-1, dtype=torch.int32)
    indices = torch.empty(mask.shape, dtype=torch.int32, device=mask.device)
    for heads in _head_chunks(1, mask.shape[1], mask.shape[-1]):
        indices[:, heads] = mask[:, heads].to(torch.int8).argsort(dim=-1, descending=True, stable=True)
    return counts, indices


def _run_compiled(*args: torch.Tensor) -> torch.Tensor:
    """The compiled kernel, traced without duck sizing and outside autocast (q, k, v already have the compute
    dtype; an autocast state is part of Dynamo's guards, so leaving it on would add compiled versions)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit
    from torch.fx.experimental import _config as shape_config

    try:
        with shape_config.patch(use_duck_shape=False), torch.autocast(args[0].device.type, enabled=False):
            return _compiled_flex()(*args)
    except FailOnRecompileLimitHit as exc:
        limit = torch._dynamo.config.recompile_limit
        raise RuntimeError(
            f"NABLA flex attention needed more than torch._dynamo.config.recompile_limit = {limit} compiled versions "
            "(one per grad mode and dtype is expected); refusing the eager fallback, which would materialise the "
            "full S x S attention. Run with TORCH_LOGS=recompiles to see which input changed"
        ) from exc


def flex_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GPU path: the block mask as a flex-attention BlockMask of full 64x64 blocks, one compiled call per sample."""
    outs = []
    for i in range(q.shape[0]):
        with torch.no_grad():
            counts, indices = _kv_blocks(mask[i : i + 1])
        sample = (t[i : i + 1].transpose(1, 2) for t in (q, k, v))
        outs.append(_run_compiled(*sample, counts, indices).transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def nabla_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: NablaConfig, sta: torch.Tensor | None
) -> torch.Tensor:
    """NABLA attention for q, k, v ``(B, S, H, D)`` in fractal order; flex on CUDA, dense-mask SDPA elsewhere."""
    mask = block_mask(q, k, cfg, sta)
    if q.is_cuda:
        return flex_block_attention(q, k, v, mask)
    return dense_mask_attention(q, k, v, mask)
