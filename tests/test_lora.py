"""networks.lora / networks.lora_kandinsky on the tiny DiT: targeting, injection, merge, file formats, interop."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kandinsky5.configs import LITE_DIT, PRO_DIT, get_task
from kandinsky5.model.dit import DiT
from networks.lora import FORMATS, LoRANetwork, from_canonical, to_canonical, unmangle_kohya
from networks.lora_kandinsky import (
    DEFAULT_INCLUDE_PATTERNS,
    K5_SEGMENTS,
    create_network,
    create_network_from_weights,
    load_lora_state_dict,
    main,
    save_lora,
    training_metadata,
)
from tests.helpers import diffusers_dit, diffusers_forward, randomize_, rel_close, tiny_dit_inputs, tiny_random_dit

TINY = get_task("k5-tiny-t2v").dit  # 1 text block, 4 visual blocks, D = 128


@pytest.fixture(scope="module")
def dit() -> DiT:
    return tiny_random_dit()


@pytest.fixture(scope="module")
def inputs() -> tuple:
    return (*tiny_dit_inputs(), torch.tensor([500.0]))


def _trained_network(dit: DiT, rank: int = 8, alpha: float = 4.0, seed: int = 2, **network_args) -> LoRANetwork:
    net = create_network(1.0, rank, alpha, dit, network_args=network_args or None)
    randomize_(net, seed, std=0.1)
    return net


def _forward(dit: DiT, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return dit(*inputs)


def _expected_default_names(cfg) -> set[str]:
    names = set()
    kinds = (("text", cfg.num_text_blocks, ("self",)), ("visual", cfg.num_visual_blocks, ("self", "cross")))
    for kind, n, attns in kinds:
        for i in range(n):
            block = f"{kind}_transformer_blocks.{i}"
            for a in attns:
                names |= {f"{block}.{a}_attention.{p}" for p in ("to_query", "to_key", "to_value", "out_layer")}
            names |= {f"{block}.feed_forward.{p}" for p in ("in_layer", "out_layer")}
    return names


# ---- targeting ------------------------------------------------------------------------------------------------


def test_default_injection_count_tiny(dit):
    net = create_network(1.0, 4, 1.0, dit)
    assert len(net) == 1 * 6 + 4 * 10
    assert set(net.names) == _expected_default_names(TINY)
    assert not any("modulation" in n or "embeddings" in n or n.startswith("out_layer") for n in net.names)


@pytest.mark.parametrize("cfg,count", [(LITE_DIT, 332), (PRO_DIT, 624)])
def test_default_injection_count_real_models(cfg, count):
    with torch.device("meta"):
        model = DiT(cfg)
        net = create_network(1.0, 4, 1.0, model)
    assert len(net) == count


def test_include_restricts_adds_and_exclude_removes(dit):
    only_mod = create_network(1.0, 4, 1.0, dit, {"include_patterns": [r".*visual_modulation\.out_layer"]})
    assert only_mod.names == [f"visual_transformer_blocks.{j}.visual_modulation.out_layer" for j in range(4)]
    added = create_network(1.0, 4, 1.0, dit, {"include_patterns": ["@default", r".*_modulation\.out_layer"]})
    assert len(added) == 46 + 1 + 4
    no_cross = create_network(1.0, 4, 1.0, dit, {"exclude_patterns": [r".*cross_attention\..*"]})
    assert len(no_cross) == 46 - 4 * 4
    everything = create_network(1.0, 4, 1.0, dit, {"include_patterns": [".*"]})  # non-Linears never selected
    assert len(everything) == sum(isinstance(m, nn.Linear) for m in dit.modules())


@pytest.mark.parametrize(
    "args,match",
    [
        ({"include_patterns": [r".*to_qwery"]}, "matches no Linear"),
        ({"exclude_patterns": [r"nothing\.here"]}, "matches no Linear"),
        ({"include_patterns": ["(unclosed"]}, "invalid include regex"),
        ({"include_patterns": ["@default"], "exclude_patterns": [".*"]}, "no Linear module selected"),
        ({"conv_dim": 4}, "unknown network_args"),
        ({"rank_dropout": 1.5}, r"\[0, 1\)"),
    ],
)
def test_bad_network_args_are_errors(dit, args, match):
    with pytest.raises(ValueError, match=match):
        create_network(1.0, 4, 1.0, dit, args)


# ---- forward semantics ----------------------------------------------------------------------------------------


def test_zero_init_leaves_output_unchanged_and_remove_restores(dit, inputs):
    base = _forward(dit, inputs)
    net = create_network(1.0, 8, 8.0, dit)
    net.apply_to(dit)
    try:
        assert torch.equal(_forward(dit, inputs), base)
    finally:
        net.remove()
    assert not any("forward" in m.__dict__ for m in dit.modules())
    assert torch.equal(_forward(dit, inputs), base)


def test_multiplier_zero_is_no_lora(dit, inputs):
    base = _forward(dit, inputs)
    net = _trained_network(dit)
    net.apply_to(dit)
    try:
        assert not torch.allclose(_forward(dit, inputs), base, atol=1e-4)
        net.set_multiplier(0.0)
        assert torch.equal(_forward(dit, inputs), base)
    finally:
        net.remove()


def test_merged_equals_runtime(dit, inputs):
    net = _trained_network(dit, include_patterns=["@default", r".*_modulation\.out_layer"])
    xs = {n: torch.randn(3, 5, dit.get_submodule(n).in_features) for n in net.names}
    net.apply_to(dit)
    try:
        runtime = _forward(dit, inputs)
        runtime_layers = {name: dit.get_submodule(name)(xs[name]) for name in net.names}
        with pytest.raises(RuntimeError, match="remove"):
            net.merge_into(dit)
    finally:
        net.remove()
    merged = copy.deepcopy(dit)
    net.merge_into(merged)
    for name, lora in net.items():  # per layer, fp32 1e-5: W' = W + (alpha / rank) up @ down, same forward
        w0, w1 = dit.get_submodule(name).weight, merged.get_submodule(name).weight
        torch.testing.assert_close(w1 - w0, 0.5 * lora.lora_up.weight @ lora.lora_down.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged.get_submodule(name)(xs[name]), runtime_layers[name], rtol=1e-5, atol=1e-5)
    # Whole model: q/k are rounded to bf16 after RoPE (as official), so ~1e-7 differences between (W + dW) x and
    # W x + dW x occasionally flip a bf16 rounding; architecture.md section 9 bounds the whole tiny model by this.
    ok, rel = rel_close(_forward(merged, inputs), runtime, rel=1e-4)
    assert ok, rel


def test_lora_trains_and_runs_in_input_dtype(dit, inputs):
    torch.manual_seed(3)  # the dropouts draw from the global RNG
    model = copy.deepcopy(dit).requires_grad_(False)
    net = create_network(1.0, 4, 1.0, model, {"rank_dropout": 0.1, "module_dropout": 0.1, "dropout": 0.1})
    net.apply_to(model)
    net.train()
    out = model(*inputs)
    out.square().mean().backward()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    grads = [lora.lora_up.weight.grad for lora in net.lora_modules]  # None where module_dropout skipped a branch
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())
    layer = model.get_submodule("visual_transformer_blocks.0.feed_forward.in_layer").to(torch.bfloat16)
    assert layer(torch.randn(3, TINY.model_dim, dtype=torch.bfloat16)).dtype == torch.bfloat16


class FakeFP8Linear(nn.Linear):
    """Duck-typed fp8 layer: float8 weight + per-row scale, forward dequantises (the protocol lora.py documents)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.set_weight(linear.weight.detach())
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0
        self.weight = nn.Parameter((weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("scale_weight", scale.float())

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scale_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


def test_fp8_base_merge_dequantizes_and_requantizes(dit):
    name = "visual_transformer_blocks.1.self_attention.to_value"
    model = copy.deepcopy(dit)
    parent, child = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), child, FakeFP8Linear(model.get_submodule(name)))
    layer = model.get_submodule(name)
    net = _trained_network(model, include_patterns=[name.replace(".", r"\.")])
    x = torch.randn(5, TINY.model_dim)
    before = layer.dequantized_weight()
    net.apply_to(model)
    runtime = layer(x)
    net.remove()
    net.merge_into(model)
    expected = before + net[name].delta_weight()
    err = (layer.dequantized_weight() - expected).abs().max() / expected.abs().max()
    assert float(err) < 0.07  # e4m3 round-off, not a scale-ignoring merge (that would be off by ~100x)
    torch.testing.assert_close(layer(x), runtime, rtol=0.1, atol=0.05)


# ---- files ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rank,alpha", [(8, 4.0), (8, 8.0), (4, 1.0)])
def test_save_load_round_trip_identical(tmp_path, dit, fmt, rank, alpha):
    net = _trained_network(dit, rank=rank, alpha=alpha)
    path = tmp_path / f"lora_{fmt}.safetensors"
    meta = save_lora(path, net, training_metadata(net, task="k5-tiny-t2v", base_checkpoint_hash="abc"), format=fmt)
    assert all(isinstance(v, str) for v in meta.values())
    sd, loaded_meta = load_lora_state_dict(path)
    ref = net.lora_state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:  # alpha/rank is a power of two here, so folding it into diffusers' lora_B is exactly undone
        assert torch.equal(sd[k], ref[k]), k
    assert loaded_meta["k5_format"] == fmt and loaded_meta["k5_task"] == "k5-tiny-t2v"
    assert loaded_meta["ss_network_module"] == "networks.lora_kandinsky"
    assert loaded_meta["ss_network_dim"] == str(rank) and float(loaded_meta["ss_network_alpha"]) == alpha


def test_diffusers_round_trip_non_power_of_two_alpha(tmp_path, dit):
    net = _trained_network(dit, rank=8, alpha=3.0)
    save_lora(tmp_path / "d.safetensors", net, format="diffusers")
    sd, _ = load_lora_state_dict(tmp_path / "d.safetensors")
    for name, lora in net.items():
        assert float(sd[f"{name}.alpha"]) == 3.0
        torch.testing.assert_close(sd[f"{name}.lora_up.weight"], lora.lora_up.weight, rtol=2e-7, atol=0)


def test_create_network_from_weights_reproduces_forward(tmp_path, dit, inputs):
    text_mod = r"text_transformer_blocks\.0\.text_modulation\.out_layer"
    net = _trained_network(dit, include_patterns=["@default", text_mod])
    net.apply_to(dit)
    try:
        expected = _forward(dit, inputs)
    finally:
        net.remove()
    for fmt in FORMATS:
        save_lora(tmp_path / "x.safetensors", net, format=fmt)
        sd, meta = load_lora_state_dict(tmp_path / "x.safetensors")
        loaded = create_network_from_weights(1.0, sd, dit, for_inference=True, metadata=meta)
        assert sorted(loaded.names) == sorted(net.names)
        assert not any(p.requires_grad for p in loaded.parameters())
        loaded.apply_to(dit)
        try:
            torch.testing.assert_close(_forward(dit, inputs), expected, rtol=1e-6, atol=1e-6)
        finally:
            loaded.remove()


def test_musubi_written_file_loads(tmp_path, dit):
    """A file shaped like musubi's output (kohya names, bf16 weights, alpha per module, ss_* metadata)."""
    g = torch.Generator().manual_seed(5)
    names = sorted(_expected_default_names(TINY))
    tensors = {}
    for name in names:
        layer = dit.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(16, layer.in_features, generator=g).bfloat16()
        tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 16, generator=g).bfloat16()
        tensors[f"{key}.alpha"] = torch.tensor(8.0).bfloat16()
    save_file(tensors, str(tmp_path / "m.safetensors"), {"ss_network_module": "networks.lora_kandinsky"})
    sd, meta = load_lora_state_dict(tmp_path / "m.safetensors")
    assert meta["k5_format"] == "musubi"
    net = create_network_from_weights(0.5, sd, dit)
    assert sorted(net.names) == names and {lora.rank for lora in net.lora_modules} == {16}
    lora = net[names[0]]
    key = "lora_unet_" + names[0].replace(".", "_")
    expected = 0.5 * 0.5 * tensors[f"{key}.lora_up.weight"].float() @ tensors[f"{key}.lora_down.weight"].float()
    torch.testing.assert_close(lora.delta_weight(), expected)


def test_kohya_names_unmangle_for_every_linear():
    with torch.device("meta"):
        model = DiT(PRO_DIT)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert unmangle_kohya(name.replace(".", "_"), K5_SEGMENTS) == name
    with pytest.raises(ValueError, match="cannot map"):
        unmangle_kohya("visual_transformer_blocks_0_attn_qkv", K5_SEGMENTS)


def test_peft_variants_and_mixed_formats():
    down, up = torch.randn(2, 4), torch.randn(3, 2)
    for prefix, adapter in (("base_model.model.", ".default"), ("", ""), ("transformer.", ".default")):
        raw = {f"{prefix}a.b.lora_A{adapter}.weight": down, f"{prefix}a.b.lora_B{adapter}.weight": up}
        sd, fmt = to_canonical(raw)
        assert fmt == "diffusers" and torch.equal(sd["a.b.lora_down.weight"], down) and float(sd["a.b.alpha"]) == 2
    mixed = {"lora_unet_a.lora_down.weight": down, "diffusion_model.b.lora_down.weight": down}
    with pytest.raises(ValueError, match="mixes key formats"):
        to_canonical(mixed, K5_SEGMENTS)


def _comfyui_key_map(dit: nn.Module) -> dict[str, str]:
    """comfy/lora.py::model_lora_keys_unet for a Kandinsky5 model (users-and-peers.md section 5)."""
    key_map = {}
    for k in ("diffusion_model." + k for k in dit.state_dict()):
        if k.endswith(".weight"):
            path = k[len("diffusion_model.") : -len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = k  # generic kohya rule
            key_map[k[: -len(".weight")]] = k  # generic "diffusion_model.<path>" rule
            key_map[path] = k  # Kandinsky5-specific bare rule
            key_map["transformer." + path] = k  # Kandinsky5-specific diffusers rule
    return key_map


def _comfyui_deltas(file_sd: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """What ComfyUI adds to each model weight: (up @ down) * (alpha / rank if alpha present else 1)."""
    pairs = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"))
    deltas = {}
    for lora_key, model_key in key_map.items():
        for up_s, down_s in pairs:
            if f"{lora_key}.{up_s}" in file_sd:
                up, down = file_sd[f"{lora_key}.{up_s}"].float(), file_sd[f"{lora_key}.{down_s}"].float()
                alpha = file_sd.get(f"{lora_key}.alpha")
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                deltas[model_key] = up @ down * scale
    return deltas


@pytest.mark.parametrize("fmt", FORMATS)
def test_comfyui_maps_every_key_onto_the_dit(dit, fmt):
    net = _trained_network(dit, rank=8, alpha=3.0)
    file_sd = from_canonical(net.lora_state_dict(), fmt)
    key_map = _comfyui_key_map(dit)
    suffixes = ("lora_up.weight", "lora_down.weight", "lora_A.weight", "lora_B.weight", "alpha")
    for key in file_sd:
        prefix = next(key[: -len(s) - 1] for s in suffixes if key.endswith("." + s))
        assert prefix in key_map, f"ComfyUI would log 'lora key not loaded: {key}'"
    deltas = _comfyui_deltas(file_sd, key_map)
    assert len(deltas) == len(net)
    for name, lora in net.items():
        torch.testing.assert_close(deltas[f"diffusion_model.{name}.weight"], lora.delta_weight(), rtol=1e-5, atol=1e-7)


def test_converter_cli(tmp_path, dit, capsys):
    net = _trained_network(dit)
    save_lora(tmp_path / "a.safetensors", net, {"trigger": "k5style"}, format="musubi")
    argv = ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--format", "diffusers"]
    assert main(argv) == 0
    assert "format diffusers" in capsys.readouterr().out
    sd, meta = load_lora_state_dict(tmp_path / "b.safetensors")
    assert meta["k5_format"] == "diffusers" and meta["trigger"] == "k5style"
    for k, v in net.lora_state_dict().items():
        assert torch.equal(sd[k], v)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


# ---- diffusers interop --------------------------------------------------------------------------------------------


def _diffusers_model(dit: DiT):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    model = diffusers_dit(TINY)
    model.load_state_dict(dit.state_dict(), strict=True)
    return model.eval()


def _diffusers_forward(model, inputs) -> torch.Tensor:
    x, text, _, pooled, time = inputs
    with torch.no_grad():
        return diffusers_forward(model, x, text, pooled, time)


def test_diffusers_loads_our_file_with_same_output(tmp_path, dit, inputs):
    model = _diffusers_model(dit)
    base = _diffusers_forward(model, inputs)
    torch.testing.assert_close(base, _forward(dit, inputs), rtol=0, atol=1e-4 * float(base.abs().max()))
    net = _trained_network(dit, rank=8, alpha=3.0)
    save_lora(tmp_path / "peft.safetensors", net, format="diffusers")
    model.load_lora_adapter(load_file(str(tmp_path / "peft.safetensors")), prefix="transformer")
    adapted = _diffusers_forward(model, inputs)
    assert not torch.allclose(adapted, base, atol=1e-3)
    net.apply_to(dit)
    try:
        ours = _forward(dit, inputs)
    finally:
        net.remove()
    torch.testing.assert_close(adapted, ours, rtol=0, atol=1e-4 * float(ours.abs().max()))


def test_default_patterns_are_fullmatch_regexes():
    import re

    assert re.fullmatch(DEFAULT_INCLUDE_PATTERNS[0], "visual_transformer_blocks.12.cross_attention.to_key")
    assert not re.fullmatch(DEFAULT_INCLUDE_PATTERNS[0], "visual_transformer_blocks.12.cross_attention.key_norm")
    assert not re.fullmatch(DEFAULT_INCLUDE_PATTERNS[1], "out_layer.out_layer")


def test_alpha_cache_follows_every_load_path(dit):
    a, b = create_network(1.0, 8, 4.0, dit), create_network(1.0, 8, 2.0, dit)
    b.load_state_dict(a.state_dict())  # nn.Module path (e.g. accelerate resume)
    assert {lora.scale for lora in b.lora_modules} == {0.5}
    assert {lora.scale for lora in create_network(1.0, 8, None, dit).lora_modules} == {1 / 8}  # musubi: alpha 1
    c = LoRANetwork(dit, rank=8, alpha=None, default_include=DEFAULT_INCLUDE_PATTERNS)  # kohya: None -> rank
    assert {lora.scale for lora in c.lora_modules} == {1.0}
    c.load_lora_state_dict(a.lora_state_dict())
    assert {lora.scale for lora in c.lora_modules} == {0.5}
