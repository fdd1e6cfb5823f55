"""NABLA: fractal order, STA prior, block selection, sparse == masked dense, geometry errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers.models.transformers import transformer_kandinsky as ref

from kandinsky5.common import UserError
from kandinsky5.configs import NablaConfig, get_task
from kandinsky5.model.attention import sdpa
from kandinsky5.model.dit import AttentionSpec, DiT
from kandinsky5.model.nabla import block_mask, check_geometry, dense_mask_attention, fractal_permutation, sta_mask
from tests.helpers import randomize_, rel_close


def test_fractal_order_matches_diffusers():
    t, gh, gw = 2, 16, 24
    x = torch.randn(1, t, gh, gw, 3)
    rope = torch.randn(1, t, gh, gw, 5)
    ref_x, _ = ref.fractal_flatten(x, rope, (1, t, gh, gw), block_mask=True)
    perm = fractal_permutation(t, gh, gw)
    assert torch.equal(x.flatten(1, 3)[:, perm], ref_x)
    assert torch.equal(x.flatten(1, 3)[:, perm][:, torch.argsort(perm)], x.flatten(1, 3))


@pytest.mark.parametrize("shape", [(3, 2, 2, 11, 3, 3), (12, 1, 3, 11, 3, 3), (4, 3, 4, 3, 1, 5), (1, 2, 2, 1, 1, 1)])
def test_sta_mask_brute_force(shape):
    t, hb, wb, wt, wh, ww = shape
    mask = sta_mask(t, hb, wb, wt, wh, ww)
    coords = list(itertools.product(range(t), range(hb), range(wb)))
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            keep = abs(a[0] - b[0]) <= wt // 2 and abs(a[1] - b[1]) <= wh // 2 and abs(a[2] - b[2]) <= ww // 2
            assert bool(mask[i, j]) == keep


def test_block_selection_matches_diffusers_fp32():
    torch.manual_seed(0)
    t, hb, wb, heads, d = 3, 2, 2, 2, 32
    s = t * hb * wb * 64
    q, k = torch.randn(1, s, heads, d) * 3, torch.randn(1, s, heads, d) * 3
    sta = sta_mask(t, hb, wb, 3, 1, 1)
    for p in (0.3, 0.7, 0.9):
        ours = block_mask(q, k, NablaConfig(P=p), sta)
        theirs = ref.nablaT_v2(q, k, sta[None, None], thr=p).to_dense().bool()
        assert torch.equal(ours, theirs), p
        assert ours[..., sta].all()  # the prior is always kept


def test_topk_and_no_sta():
    torch.manual_seed(1)
    q, k = torch.randn(2, 8 * 64, 2, 16), torch.randn(2, 8 * 64, 2, 16)
    mask = block_mask(q, k, NablaConfig(P=0.25, method="topk", add_sta=False), None)
    assert (mask.sum(-1) == math.ceil(0.25 * 8)).all()


def test_sparse_attention_equals_explicitly_masked_dense():
    torch.manual_seed(2)
    b, n, h, d = 1, 4, 2, 16
    q, k, v = (torch.randn(b, n * 64, h, d) for _ in range(3))
    mask = torch.rand(b, h, n, n) > 0.5
    mask[..., torch.arange(n), torch.arange(n)] = True
    out = dense_mask_attention(q, k, v, mask)
    full = mask.repeat_interleave(64, -2).repeat_interleave(64, -1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    probs = scores.masked_fill(~full, float("-inf")).softmax(-1)
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", probs, v), rtol=1e-5, atol=1e-5)
    keep_all = torch.ones(b, h, n, n, dtype=torch.bool)
    torch.testing.assert_close(dense_mask_attention(q, k, v, keep_all), sdpa(q, k, v), rtol=1e-5, atol=1e-6)


def test_dit_with_nabla_keeping_every_block_equals_dense():
    cfg = get_task("k5-tiny-t2v").dit
    dense = randomize_(DiT(cfg), seed=4).eval()
    sparse = DiT(cfg, AttentionSpec(nabla=NablaConfig(P=1.0)))
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(1, 2, 32, 32, cfg.in_channels)  # grid 16x16: four 8x8 tiles per frame
    text, pooled, time = torch.randn(1, 5, cfg.in_text_dim), torch.randn(1, cfg.in_text_dim2), torch.tensor([700.0])
    with torch.no_grad():
        ok, rel = rel_close(sparse(x, text, None, pooled, time), dense(x, text, None, pooled, time), 1e-4)
    assert ok, f"token reordering changed more than summation order: {rel:.2e}"


def test_dit_with_real_sparsity_differs_but_is_finite():
    cfg = get_task("k5-tiny-t2v").dit
    dit = randomize_(DiT(cfg, AttentionSpec(nabla=NablaConfig(P=0.3, wT=1, wH=1, wW=1))), seed=4)
    x = torch.randn(1, 2, 32, 32, cfg.in_channels)
    out = dit(x, torch.randn(1, 5, cfg.in_text_dim), None, torch.randn(1, cfg.in_text_dim2), torch.tensor([700.0]))
    assert torch.isfinite(out).all()


def test_geometry_errors_name_the_sizes_and_the_fix():
    check_geometry(32, 48)
    with pytest.raises(UserError) as err:
        check_geometry(30, 48)
    msg = str(err.value)
    assert "multiples of 128" in msg and "768x480" in msg and "--nabla_resize" in msg and "384 or 512" in msg
    cfg = get_task("k5-tiny-t2v").dit
    dit = DiT(cfg, AttentionSpec(nabla=NablaConfig()))
    with pytest.raises(UserError, match="multiples of 128"):
        dit(torch.randn(1, 1, 16, 24, 33), torch.randn(1, 3, 64), None, torch.randn(1, 32), torch.tensor([1.0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention path needs CUDA")
def test_flex_path_matches_dense_mask_on_gpu():
    from kandinsky5.model.nabla import flex_block_attention

    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 8 * 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(1, 2, 8, 8, device="cuda") > 0.5
    mask[..., torch.arange(8), torch.arange(8)] = True
    torch.testing.assert_close(
        flex_block_attention(q, k, v, mask), dense_mask_attention(q, k, v, mask), atol=2e-2, rtol=2e-2
    )


# ---- issue 11: the flex kernel's compile settings, recompiles, mask cost ----------------------------------------


def _flex_compile_settings(monkeypatch) -> dict:
    """The keyword arguments the project hands to torch.compile for the flex kernel (captured, nothing compiled)."""
    from kandinsky5.model import nabla

    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    nabla._compiled_flex.cache_clear()
    try:
        nabla._compiled_flex()
    finally:
        nabla._compiled_flex.cache_clear()
    return seen


def _fits(*blocks: int) -> bool:
    return all(64 % b == 0 for b in blocks)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_flex_configs_fit_the_64_token_block_on_every_gpu_family(monkeypatch, capability, dtype):
    """Inductor skips configs whose tiles do not divide the BlockMask's 64x64 blocks; with one candidate only (the
    default mode) it raises instead.  Under the project's settings every GPU family must keep at least one config
    forward and backward (sm80-sm120 default forward BLOCK_M is 128; sm90 backward is (64, 128, 128, 64))."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

    settings = _flex_compile_settings(monkeypatch)
    options = {**list_mode_options(settings.get("mode"), settings.get("dynamic")), **settings.get("options", {})}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    head_dims = {get_task(n).dit.head_dim for n in ("k5-lite-t2v-10s-sd", "k5-pro-t2v-10s-hd")}
    with inductor_config.patch(options):
        for head_dim in head_dims:
            fwd = CUDAConfigHeuristic().get_flex_attn_fwd_configs(head_dim, dtype)
            bwd = CUDAConfigHeuristic().get_flex_attn_bwd_configs(head_dim, dtype)
            assert any(_fits(c.block_m, c.block_n) for c in fwd), (head_dim, fwd)
            assert any(_fits(c.block_m1, c.block_n1, c.block_m2, c.block_n2) for c in bwd), (head_dim, bwd)


def _random_case(b: int, h: int, n: int, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n * 64, h, d, generator=g) for _ in range(3))
    mask = torch.rand(b, h, n, n, generator=g) > 0.6
    mask[..., torch.arange(n), torch.arange(n)] = True
    return q, k, v, mask


def test_one_compiled_flex_kernel_serves_every_bucket_and_the_cfg_batch():
    """Issue 11 item 2: 3 buckets (4, 6 and 9 blocks; 4 = the head count, which duck sizing would tie to the
    sequence length) and a CFG batch of 2 compile the flex kernel once (forward only: CPU flex has no backward)."""
    from torch._dynamo.utils import counters

    from kandinsky5.model import nabla
    from kandinsky5.model.nabla import flex_block_attention

    torch._dynamo.reset()  # forget entries compiled earlier in this process (e.g. by bench/gpu_check.py --dry_run)
    nabla._compiled_flex.cache_clear()
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for b, n in ((1, 4), (1, 6), (1, 9), (2, 6)):
            q, k, v, mask = _random_case(b, 4, n, seed=n + b)
            out = flex_block_attention(q, k, v, mask)
            torch.testing.assert_close(out, dense_mask_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - before == 1


def test_hitting_the_recompile_limit_is_an_error_not_the_eager_fallback():
    from kandinsky5.model.nabla import flex_block_attention

    q, k, v, mask = _random_case(1, 4, 4)
    with torch.no_grad():
        flex_block_attention(q, k, v, mask)  # compiled (or cached) entry for no-grad
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(RuntimeError, match="recompile_limit"):
        flex_block_attention(q, k, v, mask)  # grad mode on: a second entry is needed, over the limit of 1


def test_block_mask_is_built_without_autograd():
    q, k = (torch.randn(1, 4 * 64, 2, 16, requires_grad=True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mask = block_mask(q * 1.0, k * 1.0, NablaConfig(P=0.5), sta_mask(1, 2, 2, 1, 1, 1))
    assert mask.dtype == torch.bool and not mask.requires_grad
    assert len(saved) == 0  # softmax / matmul of the block means recorded nothing for a backward


def test_block_mask_in_head_chunks_equals_one_chunk(monkeypatch):
    from kandinsky5.model import nabla

    torch.manual_seed(5)
    q, k = torch.randn(2, 6 * 64, 3, 16) * 3, torch.randn(2, 6 * 64, 3, 16) * 3
    sta = sta_mask(3, 2, 1, 3, 1, 1)
    for cfg in (NablaConfig(P=0.7), NablaConfig(P=0.4, method="topk")):
        whole = block_mask(q, k, cfg, sta)
        monkeypatch.setattr(nabla, "_CHUNK_ELEMS", 1)  # one head per chunk
        assert torch.equal(block_mask(q, k, cfg, sta), whole)
        monkeypatch.undo()


def test_sta_prior_is_cached_per_grid_and_compact():
    """Issue 11 item 3: the prior is built once per latent grid, as bool, without (N, N, 3) int64 intermediates."""
    from tests.peak_memory import PeakMemory

    grid = (7, 5, 6, 11, 3, 3)  # N = 210 blocks, a grid no other test uses
    with PeakMemory() as mem:
        first = sta_mask(*grid)
    n = 7 * 5 * 6
    assert first.dtype == torch.bool and first.shape == (n, n)
    assert mem.peak <= 1.5 * n * n  # bool (N, N) plus per-axis scraps; was ~50 N^2 bytes (int64 deltas)
    assert sta_mask(*grid) is first  # the next forward on this grid reuses it


def test_autocast_state_does_not_add_a_compiled_version():
    from torch._dynamo.utils import counters

    from kandinsky5.model.nabla import flex_block_attention

    q, k, v, mask = _random_case(1, 4, 5)
    with torch.no_grad():
        flex_block_attention(q, k, v, mask)
        before = counters["stats"]["unique_graphs"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = flex_block_attention(q, k, v, mask)
    assert counters["stats"]["unique_graphs"] == before and out.dtype == torch.float32
