"""LyCORIS adapters for ``nn.Linear``: LoHa (Hadamard product of two low-rank products) and LoKr (Kronecker
product).  Parameter names are the LyCORIS / ComfyUI key suffixes, and ``ΔW`` is what ComfyUI's
``comfy/weight_adapter/{loha,lokr}.py`` computes for a file holding these tensors (docs/lora_formats.md)::

    LoHa   ΔW = m · (alpha / r) · (hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b)
           hada_w1_a, hada_w2_a (out, r); hada_w1_b, hada_w2_b (r, in); r = hada_w1_b.shape[0]
    LoKr   ΔW = m · s · kron(w1, w2),   w1 (out_l, in_m) = lokr_w1 or lokr_w1_a @ lokr_w1_b,
                                        w2 (out_k, in_n) = lokr_w2 or lokr_w2_a @ lokr_w2_b
           out = out_l · out_k, in = in_m · in_n;  s = alpha / r with r = lokr_w2_b.shape[0] when w2 is
           factored, else lokr_w1_b.shape[0] when w1 is, else s = 1 (two full factors: alpha is not used)

Layout of a new LoKr (as LyCORIS): ``(in_m, in_n) = factorization(in, factor)``, ``(out_l, out_k) =
factorization(out, factor)`` (the smaller factor first); ``w2`` is factored with rank ``network_dim`` unless
``full_matrix`` or ``network_dim >= max(out_k, in_n) / 2``; ``w1`` is full unless ``decompose_both`` and
``network_dim < max(out_l, in_m) / 2``.

Initialisation gives ΔW = 0: LoHa ``hada_w2_a = 0`` (others random), LoKr ``w2 = 0`` (full) or ``lokr_w2_b = 0``.
Runtime branch: LoKr computes ``w1 · X · w2ᵀ`` on ``x`` reshaped to (N, in_m, in_n) as two GEMMs (never the full
ΔW);
LoHa forms ΔW per call; for layers above ``RECOMPUTE_NUMEL`` elements inside a checkpointed function, so
backward keeps only the factors, not one ΔW per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from networks.adapters import AdapterModule

__all__ = ["LoHaModule", "LoKrModule", "factorization", "lokr_layout", "RECOMPUTE_NUMEL"]

# LoHa layers with a larger ΔW (out * in elements) form it in a checkpointed function: backward keeps the factors
# and recomputes ΔW instead of keeping one ΔW per layer alive (Pro: 16.8 M elements per attention projection).
# Smaller ΔWs are cheaper to keep than to recompute.
RECOMPUTE_NUMEL = 1 << 20


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = dimension``, ``m <= n``, m the largest divisor <= sqrt(dimension) that is also
    <= factor (factor <= 0: no limit).  Same results as LyCORIS' / ComfyUI's ``factorization`` (e.g. 128 -> (8, 16),
    factor 4: 128 -> (4, 32), 127 -> (1, 127))."""
    limit = math.isqrt(dimension)
    if factor > 0:
        limit = min(limit, factor)
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m


def lokr_layout(in_features: int, out_features: int, rank: int, factor: int = -1, decompose_both: bool = False,
                full_matrix: bool = False) -> dict[str, int | None]:  # fmt: skip
    """Factor shapes of a new LoKr: out_l, out_k, in_m, in_n, and rank_w1 / rank_w2 (None = full matrix)."""
    in_m, in_n = factorization(in_features, factor)
    out_l, out_k = factorization(out_features, factor)
    rank_w1 = rank if decompose_both and rank < max(out_l, in_m) / 2 else None
    rank_w2 = None if full_matrix or rank >= max(out_k, in_n) / 2 else rank
    return dict(out_l=out_l, out_k=out_k, in_m=in_m, in_n=in_n, rank_w1=rank_w1, rank_w2=rank_w2)


def _hada_linear(x, w1a, w1b, w2a, w2b, scale: float):
    delta = (w1a @ w1b) * (w2a @ w2b) * scale
    return F.linear(x, delta.to(x.dtype))


class LoHaModule(AdapterModule):
    """LoHa branch for one Linear: parameters ``hada_w1_a/b``, ``hada_w2_a/b`` (fp32 by default), buffer ``alpha``."""

    kind = "loha"

    def __init__(self, name: str, in_features: int, out_features: int, rank: int, alpha: float | None = None,
                 dtype: torch.dtype = torch.float32, **opts):  # fmt: skip
        super().__init__(name, in_features, out_features, rank, **opts)
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, rank, dtype=dtype))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        with torch.no_grad():
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w2_b, std=1.0)
        self.set_alpha(alpha)

    def _factors(self) -> tuple[torch.Tensor, ...]:
        return self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b

    def memory_profile(self, act_bytes: int) -> tuple[int, int, int, int]:
        """No rank activations (x times ΔW); layers up to RECOMPUTE_NUMEL keep both fp32 Hadamard factors for
        backward.  Working sets per ΔW element (fitted to the fake-tensor tracker, bench/bench_activations.py):
        backward (recomputed) 2 fp32 factors + the cast ΔW; a no-grad forward both factors and their product."""
        numel = self.in_features * self.out_features
        return 0, (8 * numel if numel <= RECOMPUTE_NUMEL else 0), (8 + act_bytes) * numel, 12 * numel

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        scale, factors = self.multiplier * self.scale, self._factors()
        recompute = self.in_features * self.out_features > RECOMPUTE_NUMEL
        if recompute and torch.is_grad_enabled() and any(p.requires_grad for p in factors):
            out = checkpoint(_hada_linear, x, *factors, scale, use_reentrant=False)
        else:
            out = _hada_linear(x, *factors, scale)
        return self.regularise_output(out)

    @torch.no_grad()
    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        m = self.multiplier if multiplier is None else multiplier
        w1a, w1b, w2a, w2b = (p.float() for p in self._factors())
        return (w1a @ w1b) * (w2a @ w2b) * (m * self.scale)

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        """ΔW <- ratio · ΔW (max-norm regularisation): both Hadamard factors by sqrt(ratio)."""
        self.hada_w1_a.mul_(ratio**0.5)
        self.hada_w2_a.mul_(ratio**0.5)


class LoKrModule(AdapterModule):
    """LoKr branch for one Linear; ``layout`` as returned by :func:`lokr_layout` (or read from a file).

    Parameters: ``lokr_w1`` or ``lokr_w1_a`` (out_l, r1) / ``lokr_w1_b`` (r1, in_m); ``lokr_w2`` or ``lokr_w2_a``
    (out_k, r2) / ``lokr_w2_b`` (r2, in_n); buffer ``alpha``.
    """

    kind = "lokr"

    def __init__(self, name: str, in_features: int, out_features: int, layout: dict, alpha: float | None = None,
                 dtype: torch.dtype = torch.float32, **opts):  # fmt: skip
        ol, ok, im, in_ = layout["out_l"], layout["out_k"], layout["in_m"], layout["in_n"]
        if ol * ok != out_features or im * in_ != in_features:
            raise ValueError(
                f"LoKr {name}: kron of ({ol}, {im}) and ({ok}, {in_}) is not ({out_features}, {in_features})"
            )
        r1, r2 = layout.get("rank_w1"), layout.get("rank_w2")
        super().__init__(name, in_features, out_features, r2 if r2 is not None else r1, **opts)
        self.layout = dict(out_l=ol, out_k=ok, in_m=im, in_n=in_, rank_w1=r1, rank_w2=r2)
        kaiming = dict(a=math.sqrt(5))
        if r1 is None:
            self.lokr_w1 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(ol, im, dtype=dtype), **kaiming))
        else:
            self.lokr_w1_a = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(ol, r1, dtype=dtype), **kaiming))
            self.lokr_w1_b = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(r1, im, dtype=dtype), **kaiming))
        if r2 is None:
            self.lokr_w2 = nn.Parameter(torch.zeros(ok, in_, dtype=dtype))
        else:
            self.lokr_w2_a = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(ok, r2, dtype=dtype), **kaiming))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r2, in_, dtype=dtype))
        self.set_alpha(alpha)

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.layout["rank_w1"] is None else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.layout["rank_w2"] is None else self.lokr_w2_a @ self.lokr_w2_b

    def memory_profile(self, act_bytes: int) -> tuple[int, int, int, int]:
        """Backward keeps the (in_m, out_k) block ``X · w2ᵀ`` of every token (about the layer's width)."""
        return self.layout["in_m"] * self.layout["out_k"], 0, 0, 0

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        w1, w2 = self.w1().to(x.dtype), self.w2().to(x.dtype)
        blocks = x.reshape(-1, lay["in_m"], lay["in_n"])  # (N, in_m, in_n)
        z = torch.matmul(blocks, w2.t())  # (N, in_m, out_k): one GEMM over N * in_m rows
        y = torch.matmul(z.transpose(1, 2), w1.t())  # (N, out_k, out_l): w1 · X · w2ᵀ, transposed
        out = y.transpose(1, 2).reshape(*x.shape[:-1], self.out_features)  # kron(w1, w2) x
        return self.regularise_output(out * (self.multiplier * self.scale))

    @torch.no_grad()
    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        m = self.multiplier if multiplier is None else multiplier
        return torch.kron(self.w1().float(), self.w2().float()) * (m * self.scale)

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        """ΔW <- ratio · ΔW (max-norm regularisation): both Kronecker factors by sqrt(ratio)."""
        (self.lokr_w1 if self.layout["rank_w1"] is None else self.lokr_w1_a).mul_(ratio**0.5)
        (self.lokr_w2 if self.layout["rank_w2"] is None else self.lokr_w2_a).mul_(ratio**0.5)
