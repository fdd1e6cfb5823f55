"""The activation model (``kandinsky5.memory.activations``) against torch's fake-tensor memory tracker, on the CPU.

    python bench/bench_activations.py            # tiny + Pro-block-size configurations, markdown table (~2 min)
    python bench/bench_activations.py --quick    # a few configurations (bench/run_all)

Every configuration runs one real LoRA training step (forward, backward, clip, AdamW step) or one no-grad
sampling call of the project's own DiT, fp8 layers, block swap, checkpointing and LoRA code under
``FakeTensorMode`` (shapes and dtypes only, no data) inside ``torch.distributed._tools.mem_tracker.MemTracker``,
and compares the tracked peak with the model's prediction (tensor bytes, allocator margin excluded).

Workarounds for the tracker on a CPU (:class:`StepTracker`, :func:`fake_storage_pointers`):

* the frozen DiT parameters get no gradient hooks (MemTracker hooks every parameter, which torch refuses for
  tensors that do not require grad), and only the global peak is kept (the per-module bookkeeping costs
  O(ops x modules));
* the "GPU" is the CPU, so what a CUDA run keeps in host memory -- block-swap masters, checkpointed inputs moved
  by ``--gradient_checkpointing_cpu_offload`` -- is excluded from the count (:meth:`StepTracker.exclude`); block
  swap really copies (``moves`` on, as on CUDA), so its two staging slots are counted;
* ModTracker (inside MemTracker) detects a module's backward with a gradient hook on all its inputs, which buffers
  every gradient until the last one arrives; a visual block's inputs include the text stream, whose gradient is
  complete only after the last block, so every block's input gradient (b s d) would be held to the end -- memory a
  real run never holds.  The hooks fire on the first gradient instead (:func:`first_grad_hooks`);
* fake storages all report data pointer 0, which would make block swap's saved-weight detection match every
  tensor: storages report their unique ``_cdata`` instead while the step runs;
* the text mask is None (``bool(mask.all())`` is data-dependent); NABLA runs its CUDA path (the block mask, the
  per-sample kv blocks and torch's ``BlockMask``, all real code) with a stand-in for the compiled flex kernel that
  keeps flex's saved set (q, k, v, out, lse, the BlockMask tensors): flex has no CPU backward.

``gpu_memory_row`` runs the same step on CUDA with random weights and compares the prediction with
``torch.cuda.max_memory_allocated`` (for ``bench/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributed._tools import mem_tracker as mt
from torch.distributed._tools import mod_tracker
from torch.nn.attention.flex_attention import BlockMask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.configs import PRO_DIT, TINY_DIT, DiTConfig, NablaConfig  # noqa: E402
from kandinsky5.memory import build as memory  # noqa: E402
from kandinsky5.memory.activations import (  # noqa: E402
    StepShape,
    Workload,
    network_workload,
    sampling_estimate,
    training_estimate,
)
from kandinsky5.memory.build import MemoryConfig  # noqa: E402
from kandinsky5.memory.fp8 import convert_to_fp8  # noqa: E402
from kandinsky5.memory_plan import memory_plan, storage_dtype  # noqa: E402
from kandinsky5.model import nabla  # noqa: E402
from kandinsky5.model.dit import AttentionSpec, DiT  # noqa: E402
from kandinsky5.sampling import pipeline  # noqa: E402
from kandinsky5.train import objective  # noqa: E402
from networks.lora import LoRANetwork, adapter_factory  # noqa: E402
from networks.lora_kandinsky import DEFAULT_INCLUDE_PATTERNS  # noqa: E402

PRO_BLOCKS = dataclasses.replace(PRO_DIT, num_text_blocks=1, num_visual_blocks=3)  # Pro block size, 4 blocks


class StepTracker(mt.MemTracker):
    """MemTracker with the CPU workarounds of the module docstring."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(self._grad),
                        p.register_post_accumulate_grad_hook(lambda q: self._grad(q.grad)),
                    )
        return out

    def _grad(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, mt._MemRefType.GRAD)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[mt._TOTAL_KEY]:
                self._peak_mem[dev] = snap[mt._TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)

    def exclude(self, t: torch.Tensor) -> None:
        """Stop counting ``t``'s storage (it lives in host memory on a CUDA run)."""
        for winfo in self._update_and_maybe_create_winfos(t, mt._MemRefType.OTH):
            if winfo.mem_consumed:
                self._update_snap(mt._UpdateType.DEL, winfo)
                winfo.mem_consumed = 0

    def peak(self) -> int:
        return max(self._peak_mem.values(), default=0)


@contextlib.contextmanager
def fake_storage_pointers():
    """Fake (meta) storages report their unique ``_cdata`` as data pointer while the step runs."""
    original = torch.UntypedStorage.data_ptr
    torch.UntypedStorage.data_ptr = lambda self: self._cdata if self.device.type == "meta" else original(self)
    try:
        yield
    finally:
        torch.UntypedStorage.data_ptr = original


@contextlib.contextmanager
def first_grad_hooks():
    """ModTracker's backward hooks fire on the first input gradient, not all of them (see the module docstring)."""
    original = mod_tracker.register_multi_grad_hook
    mod_tracker.register_multi_grad_hook = lambda tensors, fn, mode="all": original(tensors, fn, mode="any")
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = original


@contextlib.contextmanager
def host_offload_excluded(tracker: StepTracker):
    """Activation offload's pinned host copies are host memory: exclude each one as it is made."""
    original = memory._offload_hooks

    def hooks(x, pin, stats):
        pack, unpack = original(x, pin, stats)

        def counted_pack(t):
            out = pack(t)
            if isinstance(out, tuple):
                tracker.exclude(out[1])
            return out

        return counted_pack, unpack

    memory._offload_hooks = hooks
    try:
        yield
    finally:
        memory._offload_hooks = original


class _FlexStandIn(torch.autograd.Function):
    """Flex attention's memory signature: out + lse, saving q, k, v, out, lse and the BlockMask's tensors."""

    @staticmethod
    def forward(ctx, q, k, v, *mask_tensors):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *mask_tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *rest = ctx.saved_tensors
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *([None] * (len(rest) - 2)))


def _nabla_stand_in(q, k, v, cfg, sta):
    """``nabla.nabla_attention`` on CUDA, sample by sample, with the real block mask, the real kv blocks and the
    real ``BlockMask``; only the flex kernel itself is :class:`_FlexStandIn`."""
    mask = nabla.block_mask(q, k, cfg, sta)
    outs = []
    for i in range(q.shape[0]):
        with torch.no_grad():
            counts, indices = nabla._kv_blocks(mask[i : i + 1])
            bm = BlockMask.from_kv_blocks(torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=nabla.BLOCK,
                                          mask_mod=None, compute_q_blocks=torch.is_grad_enabled())  # fmt: skip
        kept = {id(t): t for t in vars(bm).values() if isinstance(t, torch.Tensor)}
        sample = (t[i : i + 1].transpose(1, 2) for t in (q, k, v))
        outs.append(_FlexStandIn.apply(*sample, *kept.values()).transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# ----------------------------------------------------------------------------------------------------------------
# the step (fake CPU or real CUDA)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One configuration to compare."""

    name: str
    cfg: DiTConfig
    shape: StepShape
    memory: MemoryConfig
    training: bool = True
    rank: int = 4
    nabla: bool = False
    kind: str = "lora"  # adapter kind (networks.lora.adapter_factory): lora, loha, lokr
    kind_args: tuple = ()  # e.g. (("factor", 8),) for LoKr


def _fill(dit: DiT, specs: dict, device) -> None:
    state = {k: torch.empty(s, dtype=d, device=device) for k, (s, d) in specs.items()}
    if device.type == "cuda":
        for t in state.values():
            t.copy_(torch.randn(t.shape, device=device) * 0.02) if t.dtype != torch.float8_e4m3fn else t.zero_()
    dit.load_state_dict(state, assign=True)


def build(case: Case, device: torch.device):
    """DiT with the policy dtypes (fp8 layers if asked), LoRA, block swap and checkpointing, on ``device``."""
    spec = AttentionSpec(nabla=NablaConfig(P=0.7)) if case.nabla else None
    with torch.device("meta"):
        dit = DiT(case.cfg, spec)
    if case.memory.fp8:
        convert_to_fp8(dit)
    plan = memory_plan(dit, torch.bfloat16, case.memory.blocks_to_swap)
    specs = {k: (t.shape, storage_dtype(k, t, torch.bfloat16)) for k, t in dit.state_dict().items()}
    _fill(dit, specs, device)
    dit.requires_grad_(False)
    net = _network(case, dit)
    if device.type == "cuda":
        net.to(device)  # (a fake CPU network is already where it belongs; .to would try to swap fake tensors)
    net.apply_to(dit)
    swapper = memory.enable_block_swap(dit, case.memory.blocks_to_swap, device)
    if swapper is not None and device.type != "cuda":
        swapper.moves = True  # copy as on CUDA, so the staging slots exist
    if case.training and case.memory.gradient_checkpointing:
        memory.enable_gradient_checkpointing(dit, case.memory.activation_cpu_offload, pin_memory=False)
    return dit, net, plan, swapper


def _network(case: Case, dit: DiT) -> LoRANetwork:
    factory = adapter_factory(case.kind, **dict(case.kind_args))
    return LoRANetwork(dit, rank=case.rank, default_include=DEFAULT_INCLUDE_PATTERNS, factory=factory)


def _optimizer(net: LoRANetwork):
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # the moments exist from the first step on
    opt.zero_grad(set_to_none=True)
    return params, opt


def _run_step(case: Case, dit, params, opt, device) -> None:
    """The trainer's objective (``flow_matching_loss``) or the sampler's CFG call (``pipeline._velocity``)."""
    s, c = case.shape, case.cfg
    t, gh, gw = s.grid
    rows = s.batch if case.training else max(1, s.batch // 2)  # sampling: cond + uncond rows of one CFG call
    latents = torch.randn(rows, t, gh * 2, gw * 2, c.out_visual_dim, device=device)
    if not case.training:
        text = SimpleNamespace(embeds=torch.randn(s.batch, s.text_tokens, c.in_text_dim, device=device,
                               dtype=torch.bfloat16), mask=None, pooled=torch.randn(s.batch, c.in_text_dim2,
                               device=device, dtype=torch.bfloat16))  # fmt: skip
        spec = SimpleNamespace(guidance=5.0, rope_scale=(1.0, 2.0, 2.0))
        with torch.no_grad():
            model_in = pipeline.dit_input(latents, False, False)
            pipeline._velocity(dit, model_in, text, torch.tensor(0.5, device=device), spec, torch.bfloat16)
        return
    batch = objective.TrainBatch(latents, torch.randn(s.batch, s.text_tokens, c.in_text_dim, device=device), None,
                                 torch.randn(s.batch, c.in_text_dim2, device=device))  # fmt: skip
    time, noise = torch.full((s.batch,), 0.5, device=device), torch.randn_like(latents)  # alive, as in micro_step
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = objective.flow_matching_loss(dit, batch, time, noise, (1.0, 2.0, 2.0))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def tracked_peak(case: Case) -> tuple[int, float]:
    """(peak "GPU" bytes under the fake-tensor tracker, seconds)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    start, cpu = time.perf_counter(), torch.device("cpu")
    with FakeTensorMode(), fake_storage_pointers(), _patched_nabla(case.nabla), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # block swap's checks
        dit, net, _, swapper = build(case, cpu)
        params, opt = _optimizer(net)
        tracker = StepTracker()
        tracker.track_external(dit, net, opt)
        for slot in swapper.slots if swapper else []:
            for master in slot.masters.values():
                tracker.exclude(master)
        with first_grad_hooks(), tracker, host_offload_excluded(tracker):
            _run_step(case, dit, params, opt, cpu)
        return tracker.peak(), time.perf_counter() - start


@contextlib.contextmanager
def _patched_nabla(on: bool):
    if not on:
        yield
        return
    original = nabla.nabla_attention
    import kandinsky5.model.dit as dit_module

    dit_module.nabla_attention = _nabla_stand_in
    try:
        yield
    finally:
        dit_module.nabla_attention = original


def predicted(case: Case) -> tuple[int, int]:
    """The model's (tensor bytes with the margin excluded, GPU weight bytes) for ``case``."""
    with torch.device("meta"):
        meta = DiT(case.cfg)
    if case.memory.fp8:
        convert_to_fp8(meta)
    plan = memory_plan(meta, torch.bfloat16, case.memory.blocks_to_swap)
    with torch.device("meta"):
        net = _network(case, meta)
    shapes = tuple((p.shape[0], p.shape[1] if p.dim() > 1 else 1) for p in net.parameters())
    work = Workload(lora_rank=case.rank, lora=shapes, attention="nabla" if case.nabla else "sdpa", runtime_lora=True,
                    **network_workload(net, 2))  # fmt: skip
    if case.training:
        return training_estimate(case.cfg, case.shape, case.memory, plan, work).tensors, plan.gpu
    return sampling_estimate(case.cfg, case.shape, case.memory, plan, work, lora_state=True).tensors, plan.gpu


# ----------------------------------------------------------------------------------------------------------------
# GPU row (bench/gpu_check.py)
# ----------------------------------------------------------------------------------------------------------------


def gpu_memory_row(case: Case | None = None) -> dict:
    """Predicted tensor bytes vs ``torch.cuda.max_memory_allocated`` for one step on CUDA (random weights); what
    ``bench/gpu_check.py`` (check ``activation_model``) runs.

    Default case: Pro-size blocks (1 text + 3 visual), 256x256x17, batch 1, fp8, checkpointing, block swap 1,
    rank 32.  Returns {"case", "predicted", "measured", "error"} (error = predicted / measured - 1).
    """
    case = case or _cuda_case_default()
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    dit, net, _, _ = build(case, device)
    params, opt = _optimizer(net)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _run_step(case, dit, params, opt, device)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    pred, _ = predicted(case)
    del dit, net, params, opt
    torch.cuda.empty_cache()
    return {"case": case.name, "predicted": pred, "measured": measured, "error": pred / measured - 1}


def _cuda_case_default() -> Case:
    return Case("pro blocks fp8 ckpt swap 1", PRO_BLOCKS, StepShape(1, 17, 256, 256, 256),
                MemoryConfig(fp8=True, blocks_to_swap=1, gradient_checkpointing=True), rank=32)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------------


def full_pro_case() -> Case:
    """The issue's example on the whole 19B Pro model (64 blocks): 256x256x17, batch 1, fp8, checkpointing, rank 32."""
    return Case("Pro (64 blocks) fp8 ckpt rank 32", PRO_DIT, StepShape(1, 17, 256, 256, 256),
                MemoryConfig(fp8=True, gradient_checkpointing=True), rank=32)  # fmt: skip


def cases(quick: bool = False) -> list[Case]:
    tiny = StepShape(1, 17, 256, 256, 64)  # 5 x 16 x 16 = 1280 tokens
    pro = StepShape(1, 17, 256, 256, 256)  # 1280 tokens, as the Pro example
    off = MemoryConfig()
    ckpt = MemoryConfig(gradient_checkpointing=True)
    out = [
        Case("tiny plain", TINY_DIT, tiny, off),
        Case("tiny ckpt", TINY_DIT, tiny, ckpt),
        Case(
            "tiny fp8 ckpt swap 2 batch 2",
            TINY_DIT,
            dataclasses.replace(tiny, batch=2),
            MemoryConfig(fp8=True, blocks_to_swap=2, gradient_checkpointing=True),
        ),  # fmt: skip
        Case("pro-blocks fp8 ckpt", PRO_BLOCKS, pro, MemoryConfig(fp8=True, gradient_checkpointing=True), rank=32),
    ]
    if quick:
        return out
    return out + [
        Case("tiny fp8", TINY_DIT, tiny, MemoryConfig(fp8=True)),
        Case("tiny swap 2", TINY_DIT, tiny, MemoryConfig(blocks_to_swap=2)),
        Case(
            "tiny ckpt offload", TINY_DIT, tiny, MemoryConfig(gradient_checkpointing=True, activation_cpu_offload=True)
        ),
        Case("tiny batch 2", TINY_DIT, dataclasses.replace(tiny, batch=2), off),
        Case("tiny nabla ckpt", TINY_DIT, tiny, ckpt, nabla=True),
        Case("tiny sampling (CFG batch 2)", TINY_DIT, dataclasses.replace(tiny, batch=2), off, training=False),
        Case(
            "tiny sampling fp8 swap 2",
            TINY_DIT,
            dataclasses.replace(tiny, batch=2),
            MemoryConfig(fp8=True, blocks_to_swap=2),
            training=False,
        ),  # fmt: skip
        Case("pro-blocks plain", PRO_BLOCKS, pro, off, rank=32),
        Case(
            "pro-blocks ckpt swap 1",
            PRO_BLOCKS,
            pro,
            MemoryConfig(blocks_to_swap=1, gradient_checkpointing=True),
            rank=32,
        ),  # fmt: skip
        Case("pro-blocks fp8 batch 2", PRO_BLOCKS, dataclasses.replace(pro, batch=2), MemoryConfig(fp8=True), rank=32),
        Case("pro-blocks LoHa rank 16", PRO_BLOCKS, pro, off, rank=16, kind="loha"),
        Case("pro-blocks LoHa rank 16 ckpt", PRO_BLOCKS, pro, ckpt, rank=16, kind="loha"),
        Case(
            "pro-blocks LoHa sampling (CFG batch 2)",
            PRO_BLOCKS,
            dataclasses.replace(pro, batch=2),
            off,
            training=False,
            rank=16,
            kind="loha",
        ),  # fmt: skip
        Case("pro-blocks LoKr rank 16", PRO_BLOCKS, pro, off, rank=16, kind="lokr"),
        Case("pro-blocks LoKr factor 8 ckpt", PRO_BLOCKS, pro, ckpt, rank=16, kind="lokr", kind_args=(("factor", 8),)),
        Case(
            "pro-blocks sampling fp8 (CFG batch 2)",
            PRO_BLOCKS,
            dataclasses.replace(pro, batch=2),
            MemoryConfig(fp8=True),
            training=False,
            rank=32,
        ),  # fmt: skip
        Case(
            "pro-blocks ckpt 512x512x33, 128 text tokens", PRO_BLOCKS, StepShape(1, 33, 512, 512, 128), ckpt, rank=16
        ),  # fmt: skip
        Case(
            "pro-blocks NABLA sampling 10 s HD (CFG batch 2)",
            PRO_BLOCKS,
            StepShape(2, 241, 1024, 1024, 256),
            MemoryConfig(fp8=True),
            training=False,
            rank=32,
            nabla=True,
        ),  # fmt: skip
        Case(
            "pro-blocks NABLA fp8 ckpt 1024x1024x121",
            PRO_BLOCKS,
            StepShape(1, 121, 1024, 1024, 256),
            MemoryConfig(fp8=True, gradient_checkpointing=True),
            rank=32,
            nabla=True,
        ),  # fmt: skip
    ]


def compare(case: Case) -> dict:
    tracked, seconds = tracked_peak(case)
    pred, weights = predicted(case)
    rest = (pred - weights) / (tracked - weights) - 1
    return {"case": case.name, "tracked": tracked, "predicted": pred, "error": pred / tracked - 1,
            "weights": weights, "error_rest": rest, "s": seconds}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="four configurations only (default: all)")
    p.add_argument("--full_pro", action="store_true", help="also the whole Pro model (64 blocks; minutes)")
    args = p.parse_args(argv)
    print(f"fake-tensor MemTracker on CPU, torch {torch.__version__}; bytes are MiB; error = predicted/tracked - 1")
    print("\n| configuration | weights | tracked peak | predicted | error | error without weights | tracker s |")
    print("|---|---|---|---|---|---|---|")
    for case in cases(args.quick) + ([full_pro_case()] if args.full_pro else []):
        r = compare(case)
        mib = {k: f"{r[k] / 2**20:.2f}" for k in ("weights", "tracked", "predicted")}
        print(f"| {r['case']} | {mib['weights']} | {mib['tracked']} | {mib['predicted']} | {r['error']:+.1%} "
              f"| {r['error_rest']:+.1%} | {r['s']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
