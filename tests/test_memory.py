"""Block swap, gradient checkpointing (+ activation offload), offload during sampling, the memory plan and the flags.

Everything runs on the CPU.  Block swap uses ``simulate=True``: fetches really copy into separate buffers, evicted
blocks *and* their evicted buffers are filled with NaN, so any use of a block that is not resident -- in forward, in
backward, or through a stale saved tensor -- turns the loss or the gradients into NaN and breaks the exact equality
with the model without swap.  The recorded schedule is checked as well (fetched before each use, at most 2 resident).
"""

from __future__ import annotations

import argparse
import copy
import gc
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kandinsky5.cli import add_memory_args
from kandinsky5.common import UserError
from kandinsky5.configs import get_task
from kandinsky5.memory import build as memory
from kandinsky5.memory.build import MemoryConfig, build_dit, memory_config_from_args
from kandinsky5.memory.fp8 import convert_to_fp8
from kandinsky5.memory_plan import STAGING, block_names, memory_plan, streamed_block_names
from kandinsky5.model.dit import DiT
from networks.lora import LoRANetwork
from networks.lora_kandinsky import DEFAULT_INCLUDE_PATTERNS
from tests.helpers import randomize_

TASK = get_task("k5-tiny-t2v")
CFG = TASK.dit
NB = CFG.num_text_blocks + CFG.num_visual_blocks  # 5


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 8, 8, CFG.in_channels, generator=g)
    text = torch.randn(2, 7, CFG.in_text_dim, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    return x, text, mask, torch.randn(2, CFG.in_text_dim2, generator=g), torch.tensor([500.0, 992.0])


@pytest.fixture(scope="module")
def base() -> DiT:
    return randomize_(DiT(CFG), seed=1).requires_grad_(False)


def _prepare(base: DiT, swap: int = 0, ckpt: bool = False, offload: bool = False, fp8: bool = False, reuse=True):
    model = copy.deepcopy(base)
    if fp8:
        convert_to_fp8(model)
    torch.manual_seed(5)
    net = LoRANetwork(model, rank=4, default_include=DEFAULT_INCLUDE_PATTERNS)
    for lora in net.lora_modules:
        nn.init.normal_(lora.lora_up.weight, std=0.02)
    net.apply_to(model)
    swapper = memory.enable_block_swap(model, swap, "cpu", simulate=True, reuse=reuse) if swap else None
    if swapper is not None:
        swapper.trace = []
    stats = memory.enable_gradient_checkpointing(model, offload) if ckpt else None
    return model, net, swapper, stats


def _train(model, net, steps: int = 3, accumulate: int = 1):
    """A few AdamW steps on the LoRA parameters; returns per-step losses, gradients and a final no-grad output."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses, grads = [], []
    for step in range(steps):
        loss = sum(model(*_inputs(step * accumulate + i)).square().mean() for i in range(accumulate))
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in net.parameters()])
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        out = model(*_inputs(99))
    return losses, grads, out


def _assert_identical(a, b):
    assert a[0] == b[0], (a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert torch.equal(a[2], b[2])


@pytest.fixture(scope="module")
def reference(base):
    model, net, _, _ = _prepare(base)
    return _train(model, net)


def _check_schedule(trace: list[tuple[str, int]], n_streamed: int) -> None:
    """Every use is preceded by a fetch of that block with no eviction in between; never > STAGING resident."""
    resident: set[int] = set()
    for event, k in trace:
        if event == "fetch":
            assert k not in resident
            resident.add(k)
            assert len(resident) <= STAGING
        elif event == "evict":
            resident.remove(k)
        else:
            assert k in resident, f"{event} of streamed block {k} while it is not resident"
    uses = [k for e, k in trace if e == "fwd"]
    assert uses == list(range(n_streamed)) * (len(uses) // n_streamed)  # forward order, every block once


# ---- block swap -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swap,ckpt", [(1, False), (3, False), (2, True), (3, True)])
def test_block_swap_identical_training_and_schedule(base, reference, swap, ckpt):
    model, net, swapper, _ = _prepare(base, swap=swap, ckpt=ckpt)
    _assert_identical(_train(model, net), reference)
    n = swap + STAGING
    assert [s.name for s in swapper.slots] == block_names(model)[-n:]
    _check_schedule(swapper.trace, n)
    bwd = [k for e, k in swapper.trace if e == "bwd"]
    assert bwd == list(range(n - 1, -1, -1)) * 3  # every streamed block was fetched for its backward, 3 steps
    step = swapper.trace[swapper.trace.index(("bwd", 0)) + 1 :]  # steady state: step 2 (and the no-grad forward)
    step = step[: step.index(("bwd", 0)) + 1]
    assert sum(e == "fetch" for e, _ in step) == 2 * swap  # 2N host-to-device copies per training step


def test_block_swap_with_fp8_checkpointing_offload_and_accumulation(base):
    ref_model, ref_net, _, _ = _prepare(base, fp8=True)
    expected = _train(ref_model, ref_net, steps=2, accumulate=2)
    model, net, swapper, stats = _prepare(base, swap=3, ckpt=True, offload=True, fp8=True)
    _assert_identical(_train(model, net, steps=2, accumulate=2), expected)
    _check_schedule(swapper.trace, 5)
    assert stats.packed == stats.unpacked == NB * 4


def test_stale_weight_references_are_detected(base, reference, monkeypatch):
    """Without checkpointing, autograd saves views of the weights; the swapper stores them as references."""
    model, net, swapper, _ = _prepare(base, swap=3, reuse=False)
    _assert_identical(_train(model, net), reference)
    monkeypatch.setattr(memory.BlockSwapper, "_weight_ref_hooks", lambda self, k: (lambda t: t, lambda t: t))
    model, net, swapper, _ = _prepare(base, swap=3, reuse=False)
    losses, grads, _ = _train(model, net, steps=1)
    assert any(bool(g.isnan().any()) for g in grads[0])  # the harness sees stale (evicted, NaN) weights


def test_block_swap_inference_schedule(base):
    model, _, swapper, _ = _prepare(base, swap=2)
    ref_model, _, _, _ = _prepare(base)
    with torch.no_grad():
        for seed in range(3):
            assert torch.equal(model(*_inputs(seed)), ref_model(*_inputs(seed)))
        fetches = swapper.stats["fetch"]
        model(*_inputs(0))
    assert swapper.stats["fetch"] - fetches == 4  # N + 2 per forward; the next forward's first two are prefetched
    _check_schedule(swapper.trace, 4)
    assert swapper.trace[-2:] == [("evict", 3), ("fetch", 1)]  # the tail of a forward prefetches the next one
    assert not any(e == "bwd" for e, _ in swapper.trace)


def test_weights_changed_while_resident_are_copied_back(base):
    """An in-place update or a replaced tensor on a resident block (e.g. a LoRA merge) survives eviction."""
    model, _, swapper, _ = _prepare(base, swap=2)
    ref, _, _, _ = _prepare(base)
    with torch.no_grad():
        model(*_inputs())
        assert [s.resident for s in swapper.slots] == [True, True, False, False]  # prefetched for the next forward
        ffn = f"{swapper.slots[0].name}.feed_forward.out_layer"
        query = f"{swapper.slots[1].name}.self_attention.to_query"
        for m in (model, ref):
            m.get_submodule(ffn).weight.mul_(0.5)  # in place
            layer = m.get_submodule(query)
            layer.weight.data = layer.weight.data * 2.0  # replaced
        for _ in range(2):  # both blocks are evicted and fetched again in between
            assert torch.equal(model(*_inputs(1)), ref(*_inputs(1)))
    assert swapper.stats["bytes_d2h"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_swap_on_cuda_saves_memory_and_is_exact(base):
    """Real copies on the side stream: identical training to no swap, and N blocks fewer allocated."""

    def run(swap: int):
        model, net, swapper, _ = _prepare(base)  # CPU model, no swap yet
        if swap:
            memory.enable_block_swap(model, swap, "cuda", pinned=True)
            memory.restore_dit(model, "cuda")
        else:
            model.cuda()
        net.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            loss = model(*[t.cuda() for t in _inputs(step)]).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, base_mem

    (ref_losses, ref_mem), (losses, mem) = run(0), run(3)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)  # same kernels; SDPA backward may not be bitwise
    block = sum(t.numel() * t.element_size() for t in base.visual_transformer_blocks[0].state_dict().values())
    assert ref_mem - mem >= 3 * block - 1024


def test_swap_too_many_blocks_is_a_user_error(base):
    with pytest.raises(UserError, match=f"maximum is {NB - STAGING}"):
        memory.enable_block_swap(copy.deepcopy(base), NB - 1, "cpu")
    assert streamed_block_names(base, NB - STAGING) == block_names(base)
    assert memory.enable_block_swap(copy.deepcopy(base), 0, "cpu") is None


def test_offload_and_restore_respect_block_swap(base):
    model, _, swapper, _ = _prepare(base, swap=1)
    with torch.no_grad():
        expected = model(*_inputs())
        assert sum(s.resident for s in swapper.slots) == STAGING
        memory.offload_dit(model)
        assert not any(s.resident for s in swapper.slots)
        assert all(p.device.type == "cpu" for p in model.parameters())
        assert all(bool(p.isnan().all()) for s in swapper.slots for p in s.block.parameters())  # at rest
        memory.restore_dit(model, "cpu")
        assert not any(s.resident for s in swapper.slots)  # streamed blocks stay on the CPU
        assert torch.equal(model(*_inputs()), expected)


# ---- gradient checkpointing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_identical_gradients(base, reference, offload):
    model, net, _, stats = _prepare(base, ckpt=True, offload=offload)
    _assert_identical(_train(model, net), reference)
    assert all("forward" in b.__dict__ for b in [*model.text_transformer_blocks, *model.visual_transformer_blocks])
    assert set(model.state_dict()) == set(base.state_dict())  # no wrapper modules: official keys
    expected = NB * 3 if offload else 0
    assert stats.packed == stats.unpacked == expected
    if offload:
        assert stats.devices == {"cpu"} and stats.bytes > 0


@pytest.mark.parametrize("offload", [False, True])
def test_activation_offload_releases_block_inputs(base, offload):
    """After forward the original block inputs are only alive if the checkpoint frames hold them (no offload)."""
    model, _, _, stats = _prepare(base, ckpt=True, offload=offload)
    seen: list[weakref.ref] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(weakref.ref(a[0]))) for b in model.modules()
             if b in set(model.text_transformer_blocks) | set(model.visual_transformer_blocks)]  # fmt: skip
    loss = model(*_inputs()).square().mean()
    gc.collect()
    alive = sum(r() is not None for r in seen)
    assert len(seen) == NB and alive == (0 if offload else NB)
    loss.backward()
    for h in hooks:
        h.remove()


def test_checkpointing_off_under_no_grad(base):
    model, _, _, stats = _prepare(base, ckpt=True, offload=True)
    with torch.no_grad():
        model(*_inputs())
    assert stats.packed == 0


# ---- plan -------------------------------------------------------------------------------------------------------


def _meta(task: str, fp8: bool) -> DiT:
    with torch.device("meta"):
        model = DiT(get_task(task).dit)
    if fp8:
        convert_to_fp8(model)
    return model


def _expected_bytes(cfg, fp8: bool) -> tuple[int, int, int]:
    """(total bytes, bytes per visual block, block-linear weight count) by hand from D, F, Tm."""
    d, f, tm = cfg.model_dim, cfg.ff_dim, cfg.time_dim
    lin_v, lin_t = 8 * d * d + 2 * d * f, 4 * d * d + 2 * d * f  # visual / text block linear weights
    lin = cfg.num_visual_blocks * lin_v + cfg.num_text_blocks * lin_t
    fp32 = (d * tm + tm + tm * tm + tm) + cfg.num_visual_blocks * (9 * d * tm + 9 * d)
    fp32 += cfg.num_text_blocks * (6 * d * tm + 6 * d) + (2 * d * tm + 2 * d)
    params = sum(p.numel() for p in _meta_params(cfg))
    lin_bytes = lin + lin // 16 if fp8 else 2 * lin
    total = 2 * (params - fp32 - lin) + 4 * fp32 + lin_bytes
    hp_v = 4 * (9 * d * tm + 9 * d) + 2 * (8 * d + 4 * cfg.head_dim)  # modulation fp32, biases + q/k norms bf16
    block_v = hp_v + (lin_v + lin_v // 16 if fp8 else 2 * lin_v)
    return total, block_v, lin


def _meta_params(cfg):
    with torch.device("meta"):
        return list(DiT(cfg).parameters())


@pytest.mark.parametrize("task", ["k5-pro-t2v-5s-sd", "k5-lite-t2v-5s-sd"])
def test_memory_plan_exact_arithmetic(task):
    cfg = get_task(task).dit
    bf16 = memory_plan(_meta(task, False), torch.bfloat16)
    total, block_bf16, lin = _expected_bytes(cfg, fp8=False)
    assert bf16.gpu == bf16.total == bf16.baseline == total and bf16.cpu_swapped == 0
    fp8_model = _meta(task, True)
    total8, block_fp8, _ = _expected_bytes(cfg, fp8=True)
    assert memory_plan(fp8_model, torch.bfloat16).gpu == total8
    assert total - total8 == 2 * lin - (lin + lin // 16)  # fp8 saves 1 - 1/16 byte per block-linear weight
    for n in (1, 10, 20):
        assert memory_plan(_meta(task, False), torch.bfloat16, n).gpu == total - n * block_bf16
        plan = memory_plan(fp8_model, torch.bfloat16, n)
        assert plan.gpu == total8 - n * block_fp8 and plan.cpu_swapped == (n + STAGING) * block_fp8
    if task.startswith("k5-pro"):
        assert bf16.params == 19_311_325_248 and round(2 * bf16.params / 1e9, 1) == 38.6  # all-bf16 bytes
        assert (total, total8, block_bf16, block_fp8) == (43_385_729_152, 27_531_260_032, 688_079_872, 436_421_632)
    else:
        assert bf16.params == 2_007_702_848


def test_build_dit_logs_the_plan_and_the_switches(tmp_path, base, caplog):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in base.state_dict().items()}, str(path))
    mem = MemoryConfig(fp8=True, blocks_to_swap=2, gradient_checkpointing=True, activation_cpu_offload=True)
    with caplog.at_level("INFO", logger="kandinsky5.memory.build"):
        model = build_dit(TASK, path, "cpu", torch.float32, None, mem, training=True)
    text = caplog.text
    assert "fp8 on | block swap 2 | gradient checkpointing on (+ CPU activation offload)" in text
    assert "CPU run:" in text and "fp8 saves" in text and "GPU " not in text  # no GPU: one line, no GPU column
    plan = memory_plan(_meta(TASK.name, True), torch.float32, 2)
    assert "swapped blocks (4 streamed, 2 on GPU)" in plan.table() and "\n" not in plan.cpu_line()
    swapper = model._k5_block_swapper
    assert [s.name for s in swapper.slots] == block_names(model)[-4:]
    out = model(*_inputs())
    out.square().mean().backward()  # frozen base, no LoRA: nothing to train, but the hooks must run cleanly
    with pytest.raises(UserError, match="maximum is 3"):
        build_dit(TASK, path, "cpu", torch.float32, None, MemoryConfig(blocks_to_swap=4))


# ---- flags ------------------------------------------------------------------------------------------------------


def _args(argv: list[str], training: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_memory_args(parser, training=training)
    return parser.parse_args(argv)


def test_memory_config_from_args():
    assert memory_config_from_args(_args([])) == MemoryConfig()
    every = ["--fp8_scaled", "--fp8_fast", "--blocks_to_swap", "20", "--use_pinned_memory_for_block_swap"]
    every += ["--gradient_checkpointing", "--gradient_checkpointing_cpu_offload", "--offload_dit_during_sampling"]
    cfg = memory_config_from_args(_args(every))
    assert cfg == MemoryConfig(True, True, 20, True, True, True, True)
    assert memory_config_from_args(_args(["--fp8_base"], training=False)) == MemoryConfig(fp8=True)
    with pytest.raises(UserError, match="--fp8_fast needs --fp8_base"):
        memory_config_from_args(_args(["--fp8_fast"]))
    with pytest.raises(UserError, match="add --gradient_checkpointing"):
        memory_config_from_args(_args(["--gradient_checkpointing_cpu_offload"]))
    with pytest.raises(UserError, match=">= 0"):
        memory_config_from_args(_args(["--blocks_to_swap", "-1"]))


def test_memory_plan_with_a_bf16_checkpoint_keeps_conditioning_in_bf16():
    """With the checkpoint's dtypes known, conditioning weights count at 2 bytes: Pro's fp8 run drops to ~22.8 GB."""
    from kandinsky5.memory.dtype_policy import FP32_PARAMS

    model = _meta("k5-pro-t2v-5s-sd", True)
    keys = [k for k in model.state_dict() if not k.endswith(".scale_weight")]
    stored = dict.fromkeys(keys, torch.bfloat16)
    conditioning = sum(t.numel() for k, t in model.state_dict().items() if FP32_PARAMS.search(k))
    plan = memory_plan(model, torch.bfloat16, stored=stored)
    assert plan.gpu == 27_531_260_032 - 2 * conditioning
    assert round(plan.gpu / 1e9, 1) == 22.8


# ---- issue 11: pinned host memory for block swap by default on CUDA ----------------------------------------------


def test_block_swap_pins_by_default_and_the_flag_turns_it_off(caplog):
    assert MemoryConfig().pinned and memory_config_from_args(_args(["--blocks_to_swap", "4"])).pinned
    off = memory_config_from_args(_args(["--blocks_to_swap", "4", "--no_pinned_memory_for_block_swap"]))
    assert not off.pinned and "pageable" in off.describe()
    with pytest.raises(SystemExit):  # the two switches exclude each other
        _args(["--use_pinned_memory_for_block_swap", "--no_pinned_memory_for_block_swap"])
    with caplog.at_level("WARNING"):
        memory_config_from_args(_args(["--no_pinned_memory_for_block_swap"]))
    assert "no effect without --blocks_to_swap" in caplog.text


class _FakePinning:
    """Pretend a CUDA runtime exists and record which CPU tensors get pinned (``fail``: the host refuses)."""

    def __init__(self, monkeypatch, fail: bool = False):
        from kandinsky5.memory import block_swap

        self.pinned: set[int] = set()
        monkeypatch.setattr(block_swap, "_PIN_FAILED", [])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t, *a: t.data_ptr() in self.pinned)

        def pin_memory(t, *a):
            if fail:
                raise RuntimeError("CUDA error: out of memory\nmore")
            copy = t.clone()
            self.pinned.add(copy.data_ptr())
            return copy

        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)


def test_streamed_weights_are_loaded_into_pinned_memory_for_a_cuda_device(monkeypatch):
    """The loader's placement step for a CUDA run: weights of streamed blocks go to pinned CPU memory by default."""
    from kandinsky5.memory.build import _load_transform

    fake = _FakePinning(monkeypatch)
    key, streamed = "visual_transformer_blocks.3.feed_forward.in_layer.weight", ["visual_transformer_blocks.3"]
    for memory_cfg, expect in ((MemoryConfig(blocks_to_swap=2), True), (MemoryConfig(2, pinned=False), False)):
        step = _load_transform(set(), streamed, torch.device("cuda"), torch.float32, memory_cfg)
        placed = step.fn(key, torch.randn(8, 4))[key]
        assert placed.device.type == "cpu" and placed.is_pinned() == expect
    cpu_run = _load_transform(set(), streamed, torch.device("cpu"), torch.float32, MemoryConfig())
    assert not cpu_run.fn(key, torch.randn(8, 4))[key].is_pinned()  # a CPU run pins nothing
    assert len(fake.pinned) == 1


def test_a_host_that_cannot_pin_warns_once_and_keeps_pageable_memory(monkeypatch, caplog):
    from kandinsky5.memory.block_swap import pin

    _FakePinning(monkeypatch, fail=True)
    t = torch.randn(4)
    with caplog.at_level("WARNING"):
        assert pin(t, True) is t and pin(torch.randn(4), True) is not None
    assert caplog.text.count("could not pin host memory (CUDA error: out of memory)") == 1
    assert "--no_pinned_memory_for_block_swap" in caplog.text
