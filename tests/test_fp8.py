"""fp8 weights: quantisation error bound, whole-model tolerance, untouched layers, LoRA on fp8, merge, pre-quantised
checkpoints, streaming quantisation, the dtype policy and the ``--fp8_fast`` guards.

Tolerances (stated here, measured values in the comments):
* per element ``|dq(q(w)) - w| <= 2^-4 |w| + 2^-10 s_block`` (e4m3 half-ulp / half subnormal step); relative
  Frobenius error of a Gaussian weight with block 64 ~ 2.5 %;
* whole tiny DiT (fp32 compute, fp8 weights vs the same weights unquantised): cosine >= 0.999 and
  ``max|d| <= 5e-2 max|ref|`` (measured: cosine 0.99976, max 2.5e-2;
  bf16 weights alone: 0.99997, 8.2e-3).
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kandinsky5.common import UserError
from kandinsky5.configs import get_task
from kandinsky5.memory import fp8
from kandinsky5.memory.build import MemoryConfig, build_dit
from kandinsky5.memory.dtype_policy import FP8_DTYPE, LORA_DTYPE, is_fp8_linear, param_dtype
from kandinsky5.memory.fp8 import FP8Linear, convert_to_fp8, dequantize, quantize_weight
from kandinsky5.model.dit import DiT
from networks.lora import LoRANetwork
from networks.lora_kandinsky import DEFAULT_INCLUDE_PATTERNS
from tests.helpers import randomize_

TASK = get_task("k5-tiny-t2v")
CFG = TASK.dit
FP8 = MemoryConfig(fp8=True)


def _inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 8, 8, CFG.in_channels, generator=g)
    text = torch.randn(batch, 7, CFG.in_text_dim, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[-1, 5:] = False
    pooled = torch.randn(batch, CFG.in_text_dim2, generator=g)
    return x, text, mask, pooled, torch.tensor([500.0, 992.0][:batch])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A randomised tiny DiT saved in bf16 (official keys); the fp32 reference model holds the same bf16 values."""
    ref = randomize_(DiT(CFG), seed=3)
    path = tmp_path_factory.mktemp("fp8") / "tiny.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}, str(path))
    return path


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


# ---- quantisation ------------------------------------------------------------------------------------------------


def test_quantize_error_bound_per_element():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.05
    w[3, 7], w[10, 100], w[20, :64] = 2.0, -1.5, 0.0  # outliers and an all-zero block
    q, scale = quantize_weight(w, 64)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and scale.shape == (96, 4, 1) and scale.dtype == torch.float32
    deq = dequantize(q, scale)
    s = scale.expand(96, 4, 64).reshape(96, 256)
    bound = 2**-4 * w.abs() + 2**-10 * s
    assert bool(((deq - w).abs() <= bound * (1 + 1e-6)).all())
    assert bool((deq[20, :64] == 0).all())
    rel = float((deq - w).norm() / w.norm())
    assert rel < 0.035  # measured 0.025
    assert float(deq.abs().max()) == pytest.approx(2.0, rel=1e-6)  # the block maximum maps to 448 exactly


@pytest.mark.parametrize("block,shape", [(None, (1,)), (256, (96, 1, 1))])
def test_per_tensor_and_per_row_layouts(block, shape):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    q, scale = quantize_weight(w, block)
    assert scale.shape == shape
    assert float((dequantize(q, scale) - w).norm() / w.norm()) < 0.04
    row = scale.reshape(96, 1) if block else scale  # musubi's (out, 1) per-row layout dequantises the same way
    assert torch.equal(dequantize(q, row), dequantize(q, scale))
    with pytest.raises(ValueError, match="multiple"):
        quantize_weight(torch.zeros(4, 100), 64)


def test_fp8_linear_equals_linear_holding_dequantized_weight():
    lin = nn.Linear(256, 96)
    layer = FP8Linear.from_linear(lin)
    ref = nn.Linear(256, 96)
    ref.weight.data, ref.bias.data = layer.dequantized_weight(), lin.bias.data.clone()
    x = torch.randn(3, 5, 256, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, ref(x))
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref(x).square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(layer(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    assert not layer.weight.requires_grad and layer.weight.dtype == FP8_DTYPE


def test_dtype_casts_keep_fp8_storage():
    model = nn.Sequential(FP8Linear.from_linear(nn.Linear(128, 64)))
    layer = model[0]
    before = layer.dequantized_weight()
    model.to(torch.bfloat16)
    assert layer.weight.dtype == FP8_DTYPE and layer.scale_weight.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and isinstance(layer.weight, nn.Parameter)
    model.float().to("cpu")
    assert torch.equal(layer.dequantized_weight(), before)
    assert list(layer.state_dict()) == ["weight", "bias", "scale_weight"]


# ---- whole model ------------------------------------------------------------------------------------------------


def test_whole_tiny_dit_fp8_within_tolerance(ckpt):
    ref = build_dit(TASK, ckpt, "cpu", torch.float32, None, MemoryConfig())
    model = build_dit(TASK, ckpt, "cpu", torch.float32, None, FP8)
    with torch.no_grad():
        out, expected = model(*_inputs()), ref(*_inputs())
    cos = _cos(out, expected)
    rel = float((out - expected).abs().max() / expected.abs().max())
    assert cos >= 0.999 and rel <= 5e-2, (cos, rel)


def test_excluded_layers_untouched_bitwise(ckpt):
    plain = build_dit(TASK, ckpt, "cpu", torch.bfloat16, None, MemoryConfig()).state_dict()
    model = build_dit(TASK, ckpt, "cpu", torch.bfloat16, None, FP8)
    converted = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert converted == {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_fp8_linear(n)}
    assert len(converted) == 6 * CFG.num_text_blocks + 10 * CFG.num_visual_blocks
    for key, value in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in converted and not key.endswith(".bias"):
            continue
        assert value.dtype == plain[key].dtype and torch.equal(value, plain[key]), key


def test_dtype_policy_bf16_and_fp8_runs(ckpt):
    for memory in (MemoryConfig(), FP8):
        model = build_dit(TASK, ckpt, "cpu", torch.bfloat16, None, memory)
        for key, value in model.state_dict().items():
            assert value.dtype == param_dtype(key, torch.bfloat16, fp8=memory.fp8, stored=torch.bfloat16), key
        sd = model.state_dict()
        block = "visual_transformer_blocks.0"
        expected_ffn = FP8_DTYPE if memory.fp8 else torch.bfloat16
        assert sd[f"{block}.feed_forward.in_layer.weight"].dtype == expected_ffn
        # conditioning weights keep the checkpoint's precision (bf16 here) and are computed in fp32
        assert sd[f"{block}.visual_modulation.out_layer.weight"].dtype == torch.bfloat16
        assert sd["time_embeddings.out_layer.weight"].dtype == torch.bfloat16
        assert sd["text_embeddings.in_layer.weight"].dtype == torch.bfloat16
        assert sd[f"{block}.self_attention.query_norm.weight"].dtype == torch.bfloat16
        assert sd["out_layer.out_layer.weight"].dtype == torch.bfloat16
        if memory.fp8:
            assert sd[f"{block}.feed_forward.in_layer.scale_weight"].shape == (CFG.ff_dim, CFG.model_dim // 64, 1)
        net = LoRANetwork(model, rank=4, default_include=DEFAULT_INCLUDE_PATTERNS)
        assert {p.dtype for p in net.parameters()} == {LORA_DTYPE}


# ---- LoRA on an fp8 base --------------------------------------------------------------------------------------


def _dequantized_copy(model: DiT) -> DiT:
    """Same architecture with plain Linears holding each fp8 layer's dequantised weight."""
    ref = DiT(CFG)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(".scale_weight")}
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            sd[f"{name}.weight"] = m.dequantized_weight()
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    return ref.requires_grad_(False)


def _lora(model: DiT, seed: int = 7) -> LoRANetwork:
    torch.manual_seed(seed)
    net = LoRANetwork(model, rank=4, alpha=2.0, default_include=DEFAULT_INCLUDE_PATTERNS)
    for lora in net.lora_modules:
        nn.init.normal_(lora.lora_up.weight, std=0.05)
    return net


def test_lora_on_fp8_equals_lora_on_dequantized_weights(ckpt):
    model = build_dit(TASK, ckpt, "cpu", torch.float32, None, FP8).requires_grad_(False)
    ref = _dequantized_copy(model)
    net, net_ref = _lora(model), _lora(ref)
    net.apply_to(model)
    net_ref.apply_to(ref)
    out, expected = model(*_inputs()), ref(*_inputs())
    assert torch.equal(out, expected)
    out.square().mean().backward()
    expected.square().mean().backward()
    for p, q in zip(net.parameters(), net_ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)


def test_merge_into_fp8_uses_the_scales(ckpt):
    model = build_dit(TASK, ckpt, "cpu", torch.float32, None, FP8)
    net = _lora(model)
    name = "visual_transformer_blocks.1.cross_attention.to_value"
    layer = model.get_submodule(name)
    before = layer.dequantized_weight()
    net.merge_into(model)
    expected = before + net[name].delta_weight()
    merged = layer.dequantized_weight()
    s = layer.scale_weight.expand(-1, -1, 64).reshape(merged.shape)
    assert bool(((merged - expected).abs() <= 2**-4 * expected.abs() + 2**-10 * s + 1e-7).all())
    assert layer.weight.dtype == FP8_DTYPE and layer.scale_weight.shape == (CFG.model_dim, CFG.model_dim // 64, 1)
    naive = layer.weight.float() + net[name].delta_weight()  # what ignoring scale_weight would compute
    assert float((naive - expected).abs().max()) > 100 * float((merged - expected).abs().max())


# ---- checkpoints ------------------------------------------------------------------------------------------------


def test_prequantized_checkpoint_round_trip(ckpt, tmp_path):
    model = build_dit(TASK, ckpt, "cpu", torch.bfloat16, None, FP8)
    path = tmp_path / "tiny_fp8.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    for memory in (MemoryConfig(), FP8):  # a pre-quantised file loads as it is, with or without --fp8_base
        again = build_dit(TASK, path, "cpu", torch.bfloat16, None, memory)
        ref_sd, sd = model.state_dict(), again.state_dict()
        assert sd.keys() == ref_sd.keys()
        assert all(sd[k].dtype == ref_sd[k].dtype and torch.equal(sd[k], ref_sd[k]) for k in sd)
        x, text, mask, pooled, t = _inputs()
        bf16 = (x.bfloat16(), text.bfloat16(), mask, pooled.bfloat16(), t)
        with torch.no_grad():
            assert torch.equal(again(*bf16), model(*bf16))


def test_musubi_style_file_with_per_row_and_per_tensor_scales(ckpt, tmp_path):
    plain = build_dit(TASK, ckpt, "cpu", torch.float32, None, MemoryConfig()).state_dict()
    row = "visual_transformer_blocks.0.feed_forward.in_layer"
    tensor = "text_transformer_blocks.0.self_attention.to_key"
    mod = "visual_transformer_blocks.2.visual_modulation.out_layer"  # musubi also quantises modulation
    sd = dict(plain)
    for name, block in ((row, plain[f"{row}.weight"].shape[1]), (tensor, None), (mod, 64)):
        q, scale = quantize_weight(plain[f"{name}.weight"], block)
        sd[f"{name}.weight"] = q
        sd[f"{name}.scale_weight"] = scale.reshape(-1, 1) if name == row else scale.to(torch.bfloat16)
    path = tmp_path / "musubi_fp8.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = build_dit(TASK, path, "cpu", torch.float32, None, MemoryConfig())
    for name in (row, tensor, mod):
        layer = model.get_submodule(name)
        assert isinstance(layer, FP8Linear) and layer.scale_weight.dtype == torch.float32
        scale = sd[f"{name}.scale_weight"].float()
        torch.testing.assert_close(layer.dequantized_weight(), dequantize(sd[f"{name}.weight"], scale))
    assert not isinstance(model.get_submodule("visual_transformer_blocks.0.feed_forward.out_layer"), FP8Linear)
    sd[f"{row}.scale_weight_tensor"] = torch.ones(1)  # newer musubi two-level scales: a clear error, not a guess
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(UserError, match="two-level"):
        build_dit(TASK, path, "cpu", torch.float32, None, MemoryConfig())


def test_streaming_quantization_holds_one_high_precision_tensor(ckpt, monkeypatch):
    alive: list[weakref.ref] = []
    peak = []
    original = fp8.quantize_weight

    def tracking(w, block=fp8.DEFAULT_BLOCK):
        peak.append(sum(r() is not None for r in alive))  # earlier high-precision inputs still in memory
        alive.append(weakref.ref(w))
        return original(w, block)

    monkeypatch.setattr(fp8, "quantize_weight", tracking)
    model = build_dit(TASK, ckpt, "cpu", torch.bfloat16, None, FP8)
    n_targets = sum(isinstance(m, FP8Linear) for m in model.modules())
    assert len(peak) == n_targets == len(fp8.fp8_targets(DiT(CFG)))
    assert max(peak) == 0  # each bf16 tensor is gone before the next one is read


# ---- fast path --------------------------------------------------------------------------------------------------


def test_fp8_fast_is_an_error_without_fp8_matmul(ckpt):
    assert fp8.fp8_matmul_unavailable("cpu") is not None
    with pytest.raises(UserError, match="--fp8_fast needs fp8 matmul.*drop --fp8_fast"):
        build_dit(TASK, ckpt, "cpu", torch.bfloat16, None, dataclasses.replace(FP8, fp8_fast=True))


def test_scaled_mm_kernel_math_on_cpu():
    """The fast kernel's maths (per-token x scales, per-row w scales) where torch can run _scaled_mm on the CPU."""
    lin = nn.Linear(256, 96)
    layer = FP8Linear.from_linear(lin, block=256)
    x = torch.randn(4, 256)
    try:
        out = fp8._scaled_mm_linear(x, layer.weight, layer.scale_weight, layer.bias)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm is not available on this CPU build: {exc}")
    ref = nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    assert _cos(out.float(), ref) > 0.999 and float((out.float() - ref).norm() / ref.norm()) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_fast_on_gpu_matches_dequantized_path():
    if fp8.fp8_matmul_unavailable("cuda") is not None:
        pytest.skip(fp8.fp8_matmul_unavailable("cuda"))
    lin = nn.Linear(1024, 512, device="cuda", dtype=torch.bfloat16)
    fast = FP8Linear.from_linear(lin, block=1024, fast=True)
    slow = FP8Linear.from_linear(lin, block=1024)
    x = torch.randn(2, 77, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y_fast, y_slow = fast(x), slow(x)
    assert y_fast.dtype == torch.bfloat16 and _cos(y_fast, y_slow) > 0.999
    (g_fast,) = torch.autograd.grad(y_fast.float().sum(), x)
    (g_slow,) = torch.autograd.grad(y_slow.float().sum(), x)
    torch.testing.assert_close(g_fast, g_slow)


def test_convert_to_fp8_on_a_materialised_model_keeps_keys():
    model = randomize_(DiT(CFG), seed=4)
    keys = set(model.state_dict())
    names = convert_to_fp8(model)
    new_keys = set(model.state_dict())
    assert new_keys == keys | {f"{n}.scale_weight" for n in names}
    assert all(isinstance(model.get_submodule(n), FP8Linear) for n in names)


def _old_formula_scaled_mm(x, q, scale, bias):
    """The straightforward formula (fp32 copy of x, pad, divide, clamp, cast): the numerics the fast path keeps."""
    x2d = x.reshape(-1, x.shape[-1]).float()
    rows = x2d.shape[0]
    x2d = nn.functional.pad(x2d, (0, 0, 0, -rows % 16))
    x_scale = (x2d.abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX).clamp(min=1e-12)
    xq = (x2d / x_scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(FP8_DTYPE)
    w_scale = scale.float().reshape(1, -1).contiguous()
    out = torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)[:rows]
    return (out + bias.to(out.dtype)).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("rows", [1000, 1008])  # padded to 1008 / already a multiple of 16
def test_fp8_fast_makes_no_float_copy_of_the_activation(rows):
    """Issue 11 item 4: peak transient of the fast path <= 1.5x the bf16 input (was ~6x: four fp32 copies + pad)."""
    from tests.peak_memory import PeakMemory

    layer = FP8Linear.from_linear(nn.Linear(2048, 256), block=2048)
    x = torch.randn(1, rows, 2048, dtype=torch.bfloat16) * 3
    x[0, 7] = 0.0  # an all-zero row
    with PeakMemory() as mem:
        out = fp8._scaled_mm_linear(x, layer.weight, layer.scale_weight, layer.bias)
    transient = mem.peak - out.untyped_storage().nbytes()
    assert transient <= 1.5 * x.numel() * x.element_size(), (transient, x.numel() * 2)
    ref = _old_formula_scaled_mm(x, layer.weight, layer.scale_weight, layer.bias)
    assert out.shape == (1, rows, 256) and torch.equal(out, ref)  # same numerics, bit for bit
    xq, x_scale = fp8._quantize_rows(x[0], chunk=2048 * 100)  # many chunks: the same values
    assert torch.equal(xq.view(torch.uint8), fp8._quantize_rows(x[0])[0].view(torch.uint8))
    assert xq.shape[0] % 16 == 0 and bool((xq[rows:].float() == 0).all()) and bool((x_scale[rows:] == 1).all())
