"""Fitting the 19B DiT on one GPU: the memory switches, :func:`build_dit`, checkpointing and sampling offload.

Everything attaches from outside ``dit.py`` (hooks on the ``text_transformer_blocks`` / ``visual_transformer_blocks``
ModuleLists, instance-level ``forward`` patches, ``.data`` reassignment); state-dict keys stay the official ones.

Switches (:class:`MemoryConfig`, from ``cli.add_memory_args`` by :func:`memory_config_from_args`):

* ``fp8`` -- block linears stored as fp8 e4m3 + block-64 scales, quantised tensor by tensor while streaming from
  disk (``kandinsky5.memory.fp8``); ``fp8_fast`` adds fp8 tensor-core matmuls.
* ``blocks_to_swap N`` -- N fewer transformer blocks' weights on the GPU (``kandinsky5.memory.block_swap``).
* ``gradient_checkpointing`` -- each block's forward runs under ``torch.utils.checkpoint(use_reentrant=False)``;
  ``activation_cpu_offload`` additionally moves each block's saved input activation x (B, S, D) to (pinned) CPU
  memory in forward and back in backward.  Only x is moved: ``text``, ``time_embed``, RoPE tables and the mask are
  shared by every block, so copying them per block would cost bandwidth and save nothing.
* ``offload_during_sampling`` -- callers use :func:`offload_dit` / :func:`restore_dit` around VAE / text encoders.

Block swap (which blocks, stream model): see ``kandinsky5.memory.block_swap``.  N > 0 streams the last N + 2 blocks
through two GPU slots, so the GPU holds N blocks fewer; max N = blocks - 2 (Pro 62, Lite 32).

Gradient checkpointing patches each block *instance's* ``forward`` (no wrapper modules, so state-dict keys stay
official); it is active whenever autograd records (``torch.is_grad_enabled()``).  With activation offload the
checkpoint's saved input is packed by a saved-tensor hook into a (pinned, on CUDA) host tensor; the original is
released, and unpacking in backward copies it back.  Stream model: both copies are queued on the current (compute)
stream -- D2H into pinned memory right after the block's forward, H2D when backward recomputes the block -- so they
cost their transfer time on the critical path but need no synchronisation.

:func:`build_dit` order: read the checkpoint header -> meta model -> fp8 conversion (policy linears, or the file's
pre-quantised ones) -> memory plan, logged -> streaming load through a per-tensor ``LoadTransform`` (quantise on the
GPU when there is one, streamed blocks' tensors to CPU memory, others to the device) -> block swap -> torch.compile
per block (``kandinsky5.memory.compile``; hooks stay outside the compiled regions) -> checkpointing.
Layouts: see ``kandinsky5.model.dit`` (blocks take x (B, S, D) / (B, L, D) first, which is what is offloaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TaskConfig
from kandinsky5.memory import fp8
from kandinsky5.memory.block_swap import BlockSwapper, disable_block_swap, enable_block_swap, get_swapper, pin
from kandinsky5.memory.compile import CompileConfig, compile_blocks
from kandinsky5.memory.dtype_policy import FP8_DTYPE, load_dtype
from kandinsky5.memory_plan import MemoryPlan, max_blocks_to_swap, memory_plan, stored_dtypes, streamed_block_names
from kandinsky5.model.dit import AttentionSpec, DiT
from kandinsky5.model.loading import LoadTransform, checkpoint_files, load_dit, read_header

__all__ = [
    "MemoryConfig",
    "memory_config_from_args",
    "build_dit",
    "meta_dit",
    "offload_dit",
    "restore_dit",
    "BlockSwapper",
    "enable_block_swap",
    "disable_block_swap",
    "enable_gradient_checkpointing",
    "disable_gradient_checkpointing",
    "OffloadStats",
    "MemoryPlan",
    "memory_plan",
    "max_blocks_to_swap",
    "streamed_block_names",
]

log = get_logger(__name__)

_CHECKPOINT = "_k5_checkpointing"


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryConfig:
    """The memory switches of one run (all off = plain bf16 model fully on the device)."""

    fp8: bool = False  # --fp8_base / --fp8_scaled
    fp8_fast: bool = False  # --fp8_fast (needs fp8; CUDA sm_89+)
    blocks_to_swap: int = 0  # --blocks_to_swap
    pinned: bool = True  # block swap masters in pinned host memory on CUDA; --no_pinned_memory_for_block_swap
    gradient_checkpointing: bool = False  # --gradient_checkpointing (training)
    activation_cpu_offload: bool = False  # --gradient_checkpointing_cpu_offload (training; needs checkpointing)
    offload_during_sampling: bool = False  # --offload_dit_during_sampling
    auto_swap: bool = False  # --blocks_to_swap auto: resolved by kandinsky5.memory.planner before loading
    vram_budget_gb: float | None = None  # --vram_budget_gb (GiB); None: the device's free memory

    def describe(self) -> str:
        fp8_txt = f"fp8 {'on' if self.fp8 else 'off'}" + (" (fast matmul)" if self.fp8_fast else "")
        swap = "block swap auto" if self.auto_swap else f"block swap {self.blocks_to_swap}"
        swap += " (pageable)" if self.blocks_to_swap and not self.pinned else ""
        ckpt = "gradient checkpointing " + ("on" if self.gradient_checkpointing else "off")
        ckpt += " (+ CPU activation offload)" if self.activation_cpu_offload else ""
        off = "offload during sampling " + ("on" if self.offload_during_sampling else "off")
        return f"{fp8_txt} | {swap} | {ckpt} | {off}"


def memory_config_from_args(args) -> MemoryConfig:
    """Read the ``cli.add_memory_args`` flags (training-only flags may be absent) and check their combinations."""
    fp8_on = bool(args.fp8_base or args.fp8_scaled)
    if args.fp8_fast and not fp8_on:
        raise UserError("--fp8_fast needs --fp8_base (it is the matmul of fp8 weights); add --fp8_base")
    auto = args.blocks_to_swap == "auto"
    if not auto and args.blocks_to_swap < 0:
        raise UserError(f"--blocks_to_swap must be >= 0 or auto, got {args.blocks_to_swap}")
    ckpt = bool(getattr(args, "gradient_checkpointing", False))
    offload = bool(getattr(args, "gradient_checkpointing_cpu_offload", False))
    if offload and not ckpt:
        raise UserError(
            "--gradient_checkpointing_cpu_offload offloads the checkpointed activations; add --gradient_checkpointing"
        )
    if args.use_pinned_memory_for_block_swap is not None and not args.blocks_to_swap:
        flag = "use" if args.use_pinned_memory_for_block_swap else "no"
        log.warning("--%s_pinned_memory_for_block_swap has no effect without --blocks_to_swap N", flag)
    return MemoryConfig(
        fp8=fp8_on,
        fp8_fast=bool(args.fp8_fast),
        blocks_to_swap=0 if auto else int(args.blocks_to_swap),
        pinned=args.use_pinned_memory_for_block_swap is not False,
        gradient_checkpointing=ckpt,
        activation_cpu_offload=offload,
        offload_during_sampling=bool(args.offload_dit_during_sampling),
        auto_swap=auto,
        vram_budget_gb=getattr(args, "vram_budget_gb", None),
    )


# ----------------------------------------------------------------------------------------------------------------
# gradient checkpointing (+ activation offload)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OffloadStats:
    """What the activation offload did (tests and logs): saved inputs moved out and brought back."""

    packed: int = 0
    unpacked: int = 0
    bytes: int = 0
    devices: set = field(default_factory=set)  # devices the packed copies live on


def _offload_hooks(x: torch.Tensor, pin: bool, stats: OffloadStats):
    """Saved-tensor hooks that move the block input ``x`` (and only it) to CPU memory."""
    ptr, shape = x.data_ptr(), x.shape  # not x itself: the hooks live as long as the saved tensors

    def pack(t: torch.Tensor):
        if t.data_ptr() != ptr or t.shape != shape:
            return t
        pinned = pin and t.is_cuda
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        host.copy_(t, non_blocking=pinned)
        stats.packed += 1
        stats.bytes += host.numel() * host.element_size()
        stats.devices.add(str(host.device))
        return (t.device, host)

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        stats.unpacked += 1
        return host.to(device, non_blocking=host.is_pinned())

    return pack, unpack


def _checkpointed(inner, offload: bool, pin: bool, stats: OffloadStats):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        if not offload:
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(*_offload_hooks(args[0], pin, stats)):
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    return forward


def enable_gradient_checkpointing(dit: DiT, cpu_offload: bool = False, pin_memory: bool = True) -> OffloadStats:
    """Checkpoint every block by patching the block instance's ``forward`` (keys and hooks unchanged)."""
    if getattr(dit, _CHECKPOINT, None) is not None:
        raise RuntimeError("gradient checkpointing is already enabled on this DiT")
    stats = OffloadStats()
    for block in [*dit.text_transformer_blocks, *dit.visual_transformer_blocks]:
        block.forward = _checkpointed(block.forward, cpu_offload, pin_memory, stats)
    object.__setattr__(dit, _CHECKPOINT, stats)
    return stats


def disable_gradient_checkpointing(dit: DiT) -> None:
    for block in [*dit.text_transformer_blocks, *dit.visual_transformer_blocks]:
        block.__dict__.pop("forward", None)
    object.__setattr__(dit, _CHECKPOINT, None)


# ----------------------------------------------------------------------------------------------------------------
# offload during sampling
# ----------------------------------------------------------------------------------------------------------------


def _move_resident(dit: nn.Module, device) -> None:
    """Move every parameter/buffer outside the streamed blocks to ``device`` (``.data`` moves keep identities)."""
    swapper = get_swapper(dit)
    skip = tuple(f"{s.name}." for s in swapper.slots) if swapper else ()
    for name, module in dit.named_modules():
        if skip and f"{name}.".startswith(skip):
            continue
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None:
                t.data = t.data.to(device)


def offload_dit(dit: DiT) -> None:
    """Move the DiT to CPU memory (streamed blocks: back to their CPU masters, staging buffers freed)."""
    swapper = get_swapper(dit)
    if swapper is not None:
        swapper.evict_all()
    _move_resident(dit, "cpu")


def restore_dit(dit: DiT, device) -> None:
    """Undo :func:`offload_dit`: resident parts to ``device``; streamed blocks stay on the CPU until used."""
    _move_resident(dit, device)


# ----------------------------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------------------------


def _fp8_layout(meta: DiT, memory: MemoryConfig, header: dict) -> tuple[dict[str, tuple], set[str]]:
    """({module: file scale shape} for pre-quantised modules, {modules to quantise while loading})."""
    prequant = fp8.prequantized_scales(header)
    two_level = [k for k in header if k.endswith(".scale_weight_tensor")]
    if two_level:
        raise UserError(
            f"{two_level[0]}: two-level (per-tensor x per-block) fp8 scales of newer musubi files are not supported; "
            "load the bf16 checkpoint with --fp8_base instead"
        )
    quantize = set(fp8.fp8_targets(meta)) - set(prequant) if memory.fp8 else set()
    if prequant and not memory.fp8:
        log.info("checkpoint is pre-quantised fp8 (%d layers with scale_weight): loading it as it is", len(prequant))
    if memory.fp8_fast:
        blockwise = [m for m, shape in prequant.items() if len(shape) == 3 and shape[1] > 1]
        if blockwise:
            raise UserError(
                f"--fp8_fast needs per-row fp8 scales, but this checkpoint is block-quantised ({blockwise[0]}: "
                f"scale {list(prequant[blockwise[0]])}); drop --fp8_fast or load the bf16 checkpoint with --fp8_base"
            )
    return prequant, quantize


def _load_transform(quantize: set[str], streamed: list[str], device: torch.device, dtype, memory: MemoryConfig):
    """Per-tensor loader step: quantise policy linears (on the GPU when there is one), place, pin."""
    calc = device if device.type == "cuda" else torch.device("cpu")
    prefixes = tuple(f"{n}." for n in streamed)
    cpu = torch.device("cpu")

    def place(t: torch.Tensor, key: str) -> torch.Tensor:
        to_cpu = bool(prefixes) and key.startswith(prefixes)
        t = t.to(cpu if to_cpu else device)
        return pin(t, memory.pinned and device.type == "cuda") if to_cpu else t

    def fn(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        module, _, leaf = key.rpartition(".")
        if module in quantize and leaf == "weight":
            q, scale = fp8.quantize_weight(tensor.to(calc), tensor.shape[1] if memory.fp8_fast else fp8.DEFAULT_BLOCK)
            return {key: place(q, key), f"{module}.scale_weight": place(scale, f"{module}.scale_weight")}
        if tensor.dtype.itemsize == 1 and tensor.dtype != FP8_DTYPE:
            raise UserError(f"{key} is {tensor.dtype}; only float8_e4m3fn fp8 checkpoints are supported")
        return {key: place(tensor.to(load_dtype(key, tensor, dtype)), key)}

    return LoadTransform(fn, frozenset(f"{m}.scale_weight" for m in quantize))


def meta_dit(task: TaskConfig, dit_path: str | Path, attention: AttentionSpec | None, memory: MemoryConfig):
    """(meta DiT with the fp8 layers of ``memory`` in place, checkpoint header, modules to quantise while loading,
    the conversion to apply to another meta copy) -- no tensor data is read."""
    header = read_header(checkpoint_files(dit_path))
    with torch.device("meta"):
        meta = DiT(task.dit, attention)
    prequant, quantize = _fp8_layout(meta, memory, header)

    def convert(model: DiT) -> None:
        fp8.convert_to_fp8(model, fast=memory.fp8_fast, targets=[*prequant, *sorted(quantize)], scale_shapes=prequant)

    convert(meta)
    return meta, header, quantize, convert


def build_dit(
    task: TaskConfig,
    dit_path: str | Path,
    device,
    dtype: torch.dtype,
    attention: AttentionSpec | None,
    memory: MemoryConfig,
    training: bool = False,
    compile: CompileConfig | None = None,
) -> DiT:
    """Load the DiT with the memory switches applied; its forward is unchanged (see the module docstring).

    ``compile``: torch.compile each block (``kandinsky5.memory.compile``), before checkpointing wraps it.
    """
    device = torch.device(device)
    if memory.fp8_fast:
        fp8.check_fp8_fast(device)
    meta, header, quantize, convert = meta_dit(task, dit_path, attention, memory)
    streamed = streamed_block_names(meta, memory.blocks_to_swap)
    plan = memory_plan(meta, dtype, memory.blocks_to_swap, stored=stored_dtypes(header))
    log.info("memory: %s", memory.describe())
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cpu":
        log.info("memory plan for %s (weights, %s): %s", task.name, dtype_name, plan.cpu_line())
    else:
        log.info("memory plan for %s (weights, %s):\n%s", task.name, dtype_name, plan.table())
    transform = _load_transform(quantize, streamed, device, dtype, memory)
    dit = load_dit(task, dit_path, device, dtype, attention, convert=convert, transform=transform)
    if streamed:
        if device.type != "cuda":
            log.info("block swap on a %s device: nothing moves (the schedule still runs)", device.type)
        enable_block_swap(dit, memory.blocks_to_swap, device, memory.pinned)
    if compile is not None:
        compile_blocks(dit, compile)
    if training and memory.gradient_checkpointing:
        enable_gradient_checkpointing(dit, memory.activation_cpu_offload, pin_memory=device.type == "cuda")
    return dit
