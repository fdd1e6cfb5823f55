"""LoHa and LoKr networks (issue 17): ΔW = 0 at init, ΔW equals the ComfyUI formula of docs/lora_formats.md,
runtime == merged, files in ComfyUI's K5 key names round-trip, fp8 merge honours the scales, dropouts, and the
trainer -> generator path on the tiny bundle."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kandinsky5.configs import get_task
from kandinsky5.model.dit import DiT
from networks import loha_kandinsky, lokr_kandinsky
from networks.lora_kandinsky import read_adapter, save_lora
from networks.lycoris import LoKrModule, factorization, lokr_layout
from tests.helpers import randomize_, tiny_dit_inputs, tiny_random_dit

TINY = get_task("k5-tiny-t2v").dit
KINDS = {
    "loha": (loha_kandinsky, {}),
    "lokr": (lokr_kandinsky, {}),
    "lokr_factor4_both": (lokr_kandinsky, {"factor": 4, "decompose_both": True}),
    "lokr_full": (lokr_kandinsky, {"full_matrix": True}),
}


@pytest.fixture(scope="module")
def dit() -> DiT:
    return tiny_random_dit()


@pytest.fixture(scope="module")
def inputs() -> tuple:
    return tiny_dit_inputs()


def _forward(model, inputs):
    with torch.no_grad():
        return model(*inputs, torch.tensor([500.0]))


def _network(dit, kind, rank=4, alpha=2.0, seed=2, randomize=True):
    module, args = KINDS[kind]
    torch.manual_seed(seed)
    net = module.create_network(1.0, rank, alpha, dit, network_args=args or None)
    if randomize:
        randomize_(net, seed, std=0.1)
    return net


def _comfyui_delta(t: dict, alpha: float) -> torch.Tensor:
    """ΔW as docs/lora_formats.md gives ComfyUI's weight_adapter formulas (strength 1)."""
    if "hada_w1_a" in t:
        return (alpha / t["hada_w1_b"].shape[0]) * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    return (alpha / dim if dim else 1.0) * torch.kron(w1, w2)


def test_factorization_is_the_most_square_split_within_the_factor():
    for dim in (1, 7, 12, 64, 127, 128, 250, 360, 512, 1024, 1792, 4096, 7168):
        for factor in (-1, 2, 4, 8, 16):
            pairs = [(m, dim // m) for m in range(1, dim + 1) if dim % m == 0 and m <= dim // m]
            pairs = [p for p in pairs if factor < 0 or p[0] <= factor]
            assert factorization(dim, factor) == min(pairs, key=sum), (dim, factor)


def test_lokr_layout_follows_lycoris_rules():
    assert lokr_layout(128, 128, 4) == dict(out_l=8, out_k=16, in_m=8, in_n=16, rank_w1=None, rank_w2=4)
    assert lokr_layout(128, 128, 8)["rank_w2"] is None  # rank >= max(16, 16) / 2: w2 full
    assert lokr_layout(4096, 4096, 4, factor=8, decompose_both=True)["rank_w1"] is None  # 4 >= 8 / 2
    assert lokr_layout(4096, 4096, 1, factor=8, decompose_both=True)["rank_w1"] == 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_zero_at_init_and_same_targets_as_lora(dit, inputs, kind):
    model = copy.deepcopy(dit)
    net = _network(model, kind, randomize=False)
    assert len(net) == 46
    base = _forward(model, inputs)
    net.apply_to(model)
    assert torch.equal(_forward(model, inputs), base)
    assert all(float(m.delta_weight().abs().max()) == 0 for m in net.lora_modules)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_delta_is_comfyui_formula_and_runtime_equals_merged(dit, inputs, kind):
    model, merged = copy.deepcopy(dit), copy.deepcopy(dit)
    net = _network(model, kind)
    for _, module in net.items():
        tensors = {k: v for k, v in module.state_dict().items() if k != "alpha"}
        ref = _comfyui_delta(tensors, float(module.alpha))
        assert float((module.delta_weight() - ref).abs().max() / ref.abs().max()) <= 1e-5
        x = torch.randn(2, 3, module.in_features)
        expected = x @ ref.T
        assert float((module.branch(x) - expected).abs().max() / expected.abs().max()) <= 1e-5
    net.merge_into(merged)
    net.apply_to(model)
    a, b = _forward(model, inputs), _forward(merged, inputs)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-4  # whole model (bf16-rounded q/k after RoPE)
    assert float((a - _forward(dit, inputs)).abs().max()) > 1e-4


@pytest.mark.parametrize("fmt", ["comfyui", "musubi"])
@pytest.mark.parametrize("kind", ["loha", "lokr_factor4_both"])
def test_file_keys_and_round_trip(tmp_path, dit, kind, fmt):
    net = _network(dit, kind)
    meta = save_lora(tmp_path / "a.safetensors", net, {"trigger": "k5lokr"}, format=fmt)
    assert meta["ss_network_module"] == f"networks.{kind[:4]}_kandinsky" and "lora_adapter_metadata" not in meta
    adapter = read_adapter(tmp_path / "a.safetensors")
    prefix = "diffusion_model.visual_transformer_blocks.0.self_attention.to_key" if fmt == "comfyui" else (
        "lora_unet_visual_transformer_blocks_0_self_attention_to_key")  # fmt: skip
    suffix = "hada_w1_a" if kind == "loha" else "lokr_w2_a"
    assert f"{prefix}.{suffix}" in adapter.origins.values() and f"{prefix}.alpha" in adapter.origins.values()
    sd = net.lora_state_dict()
    assert sd.keys() == adapter.sd.keys() and all(torch.equal(sd[k], adapter.sd[k]) for k in sd)
    with pytest.raises(ValueError, match="holds LoRA tensors only"):
        save_lora(tmp_path / "b.safetensors", net, format="diffusers")
    assert save_lora(tmp_path / "c.safetensors", net)["k5_format"] == "comfyui"  # the default for LoHa/LoKr


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_fp8_merge_requantises_with_fresh_scales(kind):
    from kandinsky5.memory.fp8 import FP8Linear

    torch.manual_seed(4)
    holder = nn.Module()
    holder.lin = FP8Linear.from_linear(nn.Linear(128, 128))
    before = holder.lin.dequantized_weight()
    scales_before = holder.lin.scale_weight.clone()
    module = KINDS[kind][0].create_network(1.0, 4, 4.0, holder, {"include_patterns": ["lin"]})
    randomize_(module, 3, std=0.5)
    delta = module["lin"].delta_weight()
    expected = FP8Linear.from_linear(nn.Linear(128, 128))
    expected.set_weight(before + delta)
    module.merge_into(holder)
    assert torch.equal(holder.lin.dequantized_weight(), expected.dequantized_weight())
    assert not torch.equal(holder.lin.scale_weight, scales_before)
    err = (holder.lin.dequantized_weight() - (before + delta)).abs().max()
    assert err <= 0.07 * (before + delta).abs().max()  # fp8 e4m3 step, not the size of ΔW lost


def test_network_args_and_dropouts(dit):
    with pytest.raises(ValueError, match="factor"):
        lokr_kandinsky.create_network(1.0, 4, 1.0, dit, {"factor": 0})
    with pytest.raises(ValueError, match="unknown network_args.*for loha"):
        loha_kandinsky.create_network(1.0, 4, 1.0, dit, {"factor": 4})
    net = lokr_kandinsky.create_network(1.0, 4, 1.0, dit, {"rank_dropout": 0.5, "module_dropout": 0.0})
    randomize_(net, 1, std=0.1)
    module, x = net.lora_modules[0], torch.randn(4, 128)
    net.train()
    assert not torch.equal(module.branch(x), module.branch(x))  # per-call masks while training
    net.eval()
    assert torch.equal(module.branch(x), module.branch(x))


def test_loha_recomputed_delta_gives_the_same_gradients(monkeypatch):
    """Large LoHa layers recompute ΔW in backward (checkpoint) instead of keeping it: same values, same grads."""
    from networks import lycoris

    module = lycoris.LoHaModule("m", 64, 32, 4, 2.0)
    randomize_(module, 1, std=0.3)
    x = torch.randn(3, 64, requires_grad=True)
    grads = []
    for numel in (1 << 30, 0):  # keep ΔW / recompute it
        monkeypatch.setattr(lycoris, "RECOMPUTE_NUMEL", numel)
        module.zero_grad()
        x.grad = None
        out = module.branch(x)
        out.square().sum().backward()
        grads.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in module.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])
    assert all(torch.allclose(a, b) for a, b in zip(grads[0][2], grads[1][2]))


def test_lokr_module_parameter_count():
    module = LoKrModule("m", 128, 128, lokr_layout(128, 128, 4))
    assert module.num_parameters() == 8 * 8 + 16 * 4 + 4 * 16  # full w1 (8x8) + w2 = (16x4)(4x16)


@pytest.mark.slow
def test_train_lokr_then_generate_merged_and_runtime(tiny_bundle, tmp_path):
    """Four scripts' path on the tiny bundle: the trainer writes a LoKr file (ComfyUI keys, trigger word), the
    generator applies it (merge == runtime is checked on the DiT above)."""
    from tests.test_generate_cli import SMALL, _latents, _run
    from tests.test_train_cli import base_args, train
    from tests.test_training import write_toy_cache

    toml = write_toy_cache(tmp_path / "data", n_items=2)
    out = tmp_path / "out"
    args = ["--network_module", "networks.lokr_kandinsky", "--network_dim", "4", "--network_alpha", "4",
            "--network_args", "factor=4", "--learning_rate", "5e-2", "--trigger_word", "k5lokr"]  # fmt: skip
    assert train(base_args(tiny_bundle, toml, out, steps=3) + args) == 0
    adapter = read_adapter(out / "lora.safetensors")
    assert adapter.format == "comfyui" and adapter.trigger == "k5lokr"
    assert adapter.metadata["ss_network_module"] == "networks.lokr_kandinsky"
    assert adapter.metadata["modelspec.architecture"] == "Kandinsky-5/lycoris"
    results = {}
    for name, extra in (("base", []), ("merge", ["--lora_weight", out / "lora.safetensors"])):
        path = tmp_path / f"{name}.safetensors"
        assert _run(tiny_bundle, "--prompt", "a red ball", *SMALL, "--save_latents", path, *extra) == 0
        results[name] = _latents(path)
    assert float((results["merge"] - results["base"]).abs().max()) > 1e-4  # the trained LoKr changes the video


def _mixed_network(model):
    """LoKr on attention, LoHa on the feed-forward, LoRA elsewhere, and ComfyUI-style diff / diff_b patches."""
    from networks.adapters import TensorDiff
    from networks.lora import LoRANetwork, adapter_factory
    from networks.lora_kandinsky import DEFAULT_INCLUDE_PATTERNS

    torch.manual_seed(5)
    kinds = {"attention": adapter_factory("lokr", factor=4), "feed_forward": adapter_factory("loha")}
    modules = []
    for name in LoRANetwork(model, rank=2, default_include=DEFAULT_INCLUDE_PATTERNS).names:
        make = next((f for key, f in kinds.items() if key in name), adapter_factory("lora"))
        modules.append((name, make(name, model.get_submodule(name), 2, 2.0)))
    block = "visual_transformer_blocks.3"  # a streamed block with 1 block swapped
    modules += [
        (f"{block}.self_attention.query_norm", TensorDiff(f"{block}.self_attention.query_norm", "diff", (64,))),
        (f"{block}.self_attention.to_key", TensorDiff(f"{block}.self_attention.to_key", "diff_b", (128,))),
    ]
    net = LoRANetwork(model, modules=modules)
    randomize_(net, 6, std=0.05)
    net.apply_to(model)
    return net


@pytest.mark.parametrize("ckpt", [False, True])
def test_mixed_adapters_train_identically_with_block_swap(ckpt):
    """Block swap (simulated: evicted blocks hold NaN) and checkpointing change nothing for LoHa, LoKr, LoRA and
    the swapped-in norm / bias deltas: same losses, gradients and outputs bit for bit."""
    from kandinsky5.memory import build as memory
    from tests.test_memory import _assert_identical, _train

    base = randomize_(DiT(TINY), seed=1).requires_grad_(False)
    runs = []
    for swap in (0, 1):
        model = copy.deepcopy(base)
        net = _mixed_network(model)
        if swap:
            memory.enable_block_swap(model, swap, "cpu", simulate=True)
        if ckpt:
            memory.enable_gradient_checkpointing(model, False)
        runs.append(_train(model, net, steps=1))
    _assert_identical(*runs)
    assert all(g.abs().sum() > 0 for g in runs[0][1][0])  # every adapter tensor, diff included, gets a gradient


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr_factor4_both"])
def test_max_norm_regularisation_scales_the_delta(dit, kind):
    from kandinsky5.train.regularize import max_norm_

    net = _network(dit, kind)
    before = {name: m.delta_weight(1.0) for name, m in net.items()}
    stats = max_norm_(net, 0.01)
    assert stats.keys_scaled == len(net) and abs(stats.max_norm - 0.01) < 1e-9
    for name, module in net.items():
        after = module.delta_weight(1.0)
        torch.testing.assert_close(after, before[name] * (0.01 / float(before[name].norm())), rtol=1e-4, atol=1e-9)
