"""torch.compile per DiT block (``kandinsky5.memory.compile``): flags, numerics, and composition with the rest.

Composition tests use the ``aot_eager`` backend (dynamo + AOTAutograd, the same graphs and autograd as inductor,
without code generation) so they run in seconds; one inductor test (C++ on the CPU) checks compiled vs eager within
bf16 tolerance.  Block swap runs with ``simulate=True`` (evicted weights are NaN), so a compiled graph that kept a
stale weight would show up as NaN.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging

import pytest
import torch
from torch import nn

from kandinsky5.cli import add_compile_args
from kandinsky5.common import UserError
from kandinsky5.configs import NablaConfig, get_task
from kandinsky5.memory import build as memory
from kandinsky5.memory.compile import CompileConfig, compile_blocks, compile_config_from_args
from kandinsky5.memory.fp8 import convert_to_fp8
from kandinsky5.model.dit import AttentionSpec, DiT
from networks.lora_kandinsky import create_network
from tests.helpers import randomize_, rel_close, rope_without_bf16_rounding

CFG = get_task("k5-tiny-t2v").dit  # 1 text + 4 visual blocks, D = 128
SMALL = dataclasses.replace(CFG, num_visual_blocks=1, model_dim=64, ff_dim=128, time_dim=32)
THREE = dataclasses.replace(SMALL, num_visual_blocks=2)  # the fewest blocks block swap can stream
AOT = CompileConfig(enabled=True, backend="aot_eager")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_compile_args(p)
    return p.parse_args(list(argv))


def _inputs(cfg, seed=0, b=2, t=2, h=8, w=8, length=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1:, length - 2 :] = False
    return (
        torch.randn(b, t, h, w, cfg.in_channels, generator=g),
        torch.randn(b, length, cfg.in_text_dim, generator=g),
        mask,
        torch.randn(b, cfg.in_text_dim2, generator=g),
        torch.tensor([500.0, 900.0, 100.0][:b]),
    )


def _model(cfg=CFG, fp8=False, nabla=False, seed=1, lora=True):
    dit = randomize_(DiT(cfg), seed=seed).requires_grad_(False)
    if nabla:
        dit.set_attention(AttentionSpec(nabla=NablaConfig(P=0.7)), log_choice=False)
    if fp8:
        convert_to_fp8(dit)
    return dit, _lora(dit) if lora else None


def _lora(dit):
    torch.manual_seed(5)
    net = create_network(1.0, 4, 4.0, dit)
    for lora in net.lora_modules:
        nn.init.normal_(lora.lora_up.weight, std=0.05)
    net.apply_to(dit)
    return net


def _step(dit, net, inputs, autocast=False):
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = dit(*inputs)
    out.float().square().mean().backward()
    return out.detach().float(), [p.grad.clone() for p in net.parameters()]


# ---- flags ------------------------------------------------------------------------------------------------------


def test_flags_map_to_the_config_with_musubi_meanings():
    assert compile_config_from_args(_args()) == CompileConfig()
    cfg = compile_config_from_args(
        _args("--compile", "--compile_mode", "max-autotune-no-cudagraphs", "--compile_dynamic", "true",
              "--compile_fullgraph", "--compile_cache_size_limit", "32"), "cpu",
    )  # fmt: skip
    assert cfg == CompileConfig(True, "inductor", "max-autotune-no-cudagraphs", True, True, 32)
    assert compile_config_from_args(_args("--compile", "--compile_dynamic", "auto"), "cpu").dynamic is None
    assert compile_config_from_args(_args("--compile", "--compile_dynamic", "false"), "cpu").dynamic is False


@pytest.mark.parametrize(
    "argv,swap,message",
    [
        (["--compile_backend", "nope"], 0, "not a torch.compile backend"),
        (["--compile_cache_size_limit", "0"], 0, "must be >= 1"),
        (["--compile_mode", "reduce-overhead"], 4, "max-autotune-no-cudagraphs"),
        (["--compile_mode", "max-autotune"], "auto", "max-autotune-no-cudagraphs"),  # auto may swap
    ],
)
def test_bad_settings_fail_before_loading(argv, swap, message):
    with pytest.raises(UserError, match=message):
        compile_config_from_args(_args("--compile", *argv), "cpu", blocks_to_swap=swap)


def test_fsdp_is_refused_until_it_is_tested():
    args = _args("--compile")
    args.fsdp = True
    with pytest.raises(UserError, match="--compile cannot be combined with --fsdp"):
        compile_config_from_args(args, "cpu")


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        compile_config_from_args(_args("--compile"), "cpu")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install triton"):
        compile_config_from_args(_args("--compile"), "cuda")


# ---- composition (aot_eager) ------------------------------------------------------------------------------------


def test_composes_with_swap_checkpointing_offload_fp8_nabla_and_a_later_lora(monkeypatch):
    """Block swap (hooks), checkpointing + offload (wrappers), fp8 layers, NABLA and a LoRA attached after
    compiling (traced at the first call) give the eager model's loss and gradients; state-dict keys unchanged."""
    monkeypatch.setattr("kandinsky5.model.dit.apply_rope", rope_without_bf16_rounding)
    ref_dit, ref_net = _model(THREE, fp8=True, nabla=True)
    memory.enable_gradient_checkpointing(ref_dit, cpu_offload=True)
    dit, _ = _model(THREE, fp8=True, nabla=True, lora=False)
    keys = list(dit.state_dict())
    swapper = memory.enable_block_swap(dit, 1, "cpu", simulate=True)
    swapper.trace = []
    report = compile_blocks(dit, AOT)
    stats = memory.enable_gradient_checkpointing(dit, cpu_offload=True)
    net = _lora(dit)
    inputs = _inputs(THREE, h=16, w=16)  # 8x8 tokens per frame: one NABLA tile
    expected, expected_grads = _step(ref_dit, ref_net, inputs)
    out, grads = _step(dit, net, inputs)
    assert torch.isfinite(out).all() and rel_close(out, expected, 1e-6)[0]
    assert all(rel_close(a, b, 1e-5)[0] for a, b in zip(grads, expected_grads))
    assert stats.packed == stats.unpacked > 0
    assert ("bwd", 0) in swapper.trace  # the swap schedule ran around the compiled blocks
    assert list(dit.state_dict()) == keys  # no _orig_mod wrappers: files and LoRA paths unchanged
    assert report.counts == (1, 2)
    other = randomize_(DiT(SMALL))
    memory.enable_gradient_checkpointing(other)
    with pytest.raises(RuntimeError, match="before enabling gradient checkpointing"):
        compile_blocks(other, AOT)


def test_merged_lora_inference():
    from networks.lora_kandinsky import create_network_from_weights

    base, net = _model(SMALL)
    sd = net.lora_state_dict()
    net.remove()
    eager = copy.deepcopy(base)
    for model in (base, eager):
        create_network_from_weights(0.8, sd, model, for_inference=True).merge_into(model)
    compile_blocks(base, AOT)
    with torch.no_grad():
        assert rel_close(base(*_inputs(SMALL)), eager(*_inputs(SMALL)), 1e-6)[0]


def test_buckets_do_not_recompile_per_shape_and_one_log_line(caplog):
    """Blocks see (B, S, D) visual and (B, L, D) text tokens: after the first shape, one recompile makes S and L
    symbolic (dynamic auto), and every later bucket reuses that graph.  The compile is logged once, at the call
    after the first one (its backward compile included)."""
    from torch._dynamo.utils import counters

    dit, net = _model(SMALL)
    with caplog.at_level(logging.INFO, logger="kandinsky5.memory.compile"):
        report = compile_blocks(dit, CompileConfig(enabled=True, backend="eager"))  # recompiles are dynamo's
        shapes = [dict(), dict(h=16, length=9), dict(w=16, length=5), dict(t=3, h=16, w=16, length=4)]
        frames = []
        for shape in shapes:
            _step(dit, net, _inputs(SMALL, **shape))
            frames.append(counters["frames"]["ok"])
    assert frames[1] > frames[0] and frames[1] == frames[2] == frames[3], frames
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compile: torch.compile")]
    assert len(lines) == 1 and "2 DiT blocks (1 text + 1 visual)" in lines[0] and "forward + backward" in lines[0]
    assert report.compile_seconds is not None and report.compile_seconds > 0


# ---- inductor ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inductor_compiled_matches_eager_in_bf16():
    eager, eager_net = _model(SMALL)
    dit, net = _model(SMALL)
    compile_blocks(dit, CompileConfig(enabled=True, fullgraph=True))
    inputs = _inputs(SMALL)
    expected, expected_grads = _step(eager, eager_net, inputs, autocast=True)
    out, grads = _step(dit, net, inputs, autocast=True)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0)
    assert cos > 0.999 and rel_close(out, expected, 3e-2)[0]
    flat, ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in expected_grads])
    assert torch.nn.functional.cosine_similarity(flat, ref, dim=0) > 0.999
