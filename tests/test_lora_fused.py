"""The fused LoRA branch (shared q/k/v down-projection, up-projection accumulated by addmm) equals the plain one.

Reference: the pre-fusion forward, ``y + m * scale * up(down(x))`` per module with no grouping.  fp32 outputs and
LoRA gradients agree within 1e-6 relative; saved files are byte-identical; a wrong grouping switches itself off.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kandinsky5.configs import get_task
from kandinsky5.model.dit import DiT
from networks.lora import LoRAModule, LoRANetwork, SharedDown
from networks.lora_kandinsky import create_network, save_lora, shared_input_key
from tests.helpers import randomize_, rel_close, rope_without_bf16_rounding

TINY = dataclasses.replace(get_task("k5-tiny-t2v").dit, num_visual_blocks=2, model_dim=64, ff_dim=128, time_dim=32)


def _unfused_forward(self: LoRAModule, x, *args, **kwargs):
    y = self._attached[1](x, *args, **kwargs)
    if self.multiplier == 0.0:
        return y
    return y + self.branch(x).to(y.dtype)


def _setup(seed: int = 0):
    dit = randomize_(DiT(TINY), seed=seed).eval().requires_grad_(False)
    net = create_network(0.7, 8, 4.0, dit)
    randomize_(net, seed + 1, std=0.1)  # non-zero up weights: every branch contributes
    net.apply_to(dit)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(2, 2, 8, 8, TINY.in_channels, generator=g)
    text = torch.randn(2, 7, TINY.in_text_dim, generator=g)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    inputs = (x, text, mask, torch.randn(2, TINY.in_text_dim2, generator=g), torch.tensor([500.0, 900.0]))
    return dit, net, inputs


def _run(dit, net, inputs, autocast: bool = False):
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = dit(*inputs)
    out.float().square().mean().backward()
    return out.detach().float(), [p.grad.clone() for p in net.parameters()]


def test_groups_are_formed_at_injection():
    _, net, _ = _setup()
    groups = {id(lora._shared): lora._shared for _, lora in net.items() if lora._shared is not None}
    sizes = sorted(len(g.members) for g in groups.values())
    # 1 text + 2 visual self-attentions (q, k, v) and 2 cross-attentions (k, v)
    assert sizes == [2] * 2 + [3] * 3
    assert shared_input_key("visual_transformer_blocks.1.cross_attention.to_query") is None
    assert shared_input_key("visual_transformer_blocks.1.cross_attention.to_key") == shared_input_key(
        "visual_transformer_blocks.1.cross_attention.to_value"
    )


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_equals_unfused(autocast, monkeypatch):
    if not autocast:
        monkeypatch.setattr("kandinsky5.model.dit.apply_rope", rope_without_bf16_rounding)
    dit, net, inputs = _setup()
    calls = []
    monkeypatch.setattr(SharedDown, "take", _counting(SharedDown.take, calls))
    fused_out, fused_grads = _run(dit, net, inputs, autocast)
    assert calls and all(g.enabled for g in {lora._shared for _, lora in net.items()} - {None})
    monkeypatch.setattr(LoRAModule, "forward", _unfused_forward)
    dit2, net2, _ = _setup()  # fresh wrappers bound to the unfused forward
    plain_out, plain_grads = _run(dit2, net2, inputs, autocast)
    rel = 1e-6 if not autocast else 2e-2
    ok, err = rel_close(fused_out, plain_out, rel)
    assert ok, err
    for a, b in zip(fused_grads, plain_grads):
        ok, err = rel_close(a, b, 1e-6 if not autocast else 5e-2)
        assert ok, err


def _counting(fn, calls):
    def wrapped(self, *args):
        calls.append(1)
        return fn(self, *args)

    return wrapped


def test_wrong_grouping_switches_itself_off():
    dit = randomize_(DiT(TINY), seed=4).eval()
    wrong = lambda path: "all" if path.endswith(("to_query", "out_layer")) else None  # noqa: E731 -- different inputs
    net = LoRANetwork(dit, rank=4, include=[r".*self_attention\.(to_query|out_layer)"], shared_input_key=wrong)
    randomize_(net, 5, std=0.1)
    plain = LoRANetwork(dit, rank=4, include=[r".*self_attention\.(to_query|out_layer)"])
    plain.load_lora_state_dict(net.lora_state_dict())
    _, _, inputs = _setup()
    with torch.no_grad():
        plain.apply_to(dit)
        expected = dit(*inputs)
        plain.remove()
        net.apply_to(dit)
        out = dit(*inputs)
    group = net.lora_modules[0]._shared
    assert group is not None and not group.enabled
    assert rel_close(out, expected, 1e-6)[0]


def test_saved_file_is_byte_identical_with_and_without_grouping(tmp_path):
    dit = randomize_(DiT(TINY), seed=6).eval()
    grouped = create_network(1.0, 4, 2.0, dit)
    randomize_(grouped, 7, std=0.1)
    plain = LoRANetwork(dit, module_ranks={n: (4, 2.0) for n in grouped.names})
    plain.load_lora_state_dict(grouped.lora_state_dict())
    grouped.apply_to(dit)
    _run(dit, grouped, _setup()[2])
    for fmt in ("diffusers", "comfyui", "musubi"):
        save_lora(tmp_path / f"a-{fmt}.safetensors", grouped, format=fmt)
        save_lora(tmp_path / f"b-{fmt}.safetensors", plain, format=fmt)
        a, b = (_header_and_data(tmp_path / f"{n}-{fmt}.safetensors") for n in "ab")
        assert a == b  # the header's metadata map has no fixed order in safetensors; compare it parsed


def _header_and_data(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_network_from_a_file_is_fused_and_equals_the_trained_one(tmp_path, monkeypatch):
    """create_network_from_weights (the adapters' loader): LoRA modules grouped again, same output as the network
    that wrote the file (fp32, within 1e-6)."""
    monkeypatch.setattr("kandinsky5.model.dit.apply_rope", rope_without_bf16_rounding)
    from networks.lora_kandinsky import create_network_from_weights, read_adapter

    dit, net, inputs = _setup()
    with torch.no_grad():
        ref = dit(*inputs)
    path = tmp_path / "lora.safetensors"
    save_lora(path, net)
    net.remove()
    adapter = read_adapter(path)
    loaded = create_network_from_weights(1.0, adapter.sd, dit, for_inference=True, metadata=adapter.metadata)
    loaded.set_multiplier(0.7)
    loaded.apply_to(dit)
    assert sum(m._shared is not None for _, m in loaded.items()) == 2 * 2 + 3 * 3
    with torch.no_grad():
        ok, err = rel_close(dit(*inputs), ref, 1e-6)
    assert ok, err


@pytest.mark.parametrize("module", ["networks.loha_kandinsky", "networks.lokr_kandinsky"])
def test_loha_and_lokr_keep_their_own_branch(module, monkeypatch):
    import importlib

    dit = randomize_(DiT(TINY), seed=3).eval().requires_grad_(False)
    net = importlib.import_module(module).create_network(1.0, 4, 4.0, dit)
    randomize_(net, 4, std=0.1)
    net.apply_to(dit)
    assert net.shared_input_key is shared_input_key  # the same network class; only LoRA modules are grouped
    assert not any(isinstance(m, LoRAModule) for _, m in net.items())
    _, _, inputs = _setup()
    out, grads = _run(dit, net, inputs)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
