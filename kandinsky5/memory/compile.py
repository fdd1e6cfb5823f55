"""``torch.compile`` of the DiT, one text / visual block at a time, attached from outside ``dit.py``.

Entry points: :func:`compile_config_from_args` (the ``cli.add_compile_args`` flags, musubi's names and meanings),
:func:`compile_blocks` (called by ``kandinsky5.memory.build.build_dit``, or directly on a DiT built by hand).

What is compiled: each block *instance's* ``forward`` is replaced by ``torch.compile(forward)`` (as torchtitan
compiles per block).  Module hooks run in ``nn.Module.__call__``, around ``forward``, so everything that attaches
through hooks or wrappers stays outside the compiled regions:

* block swap (``kandinsky5.memory.block_swap``): its pre/post hooks and the two identity autograd functions run
  eagerly around each compiled block; parameters are graph inputs, so swapping their ``.data`` needs no recompile;
* gradient checkpointing and activation offload (``build.enable_gradient_checkpointing``, applied after this):
  ``checkpoint(compiled_forward)``, the offload's saved-tensor hooks around it;
* fp8 layers, LoRA (runtime wrappers or merged weights), NABLA: traced into the block graph at its first call, so
  apply them before the first forward (LoRA applied after compiling but before the first call is still seen);
* the text / visual embeddings, RoPE tables, NABLA permutation and the output layer run eagerly (small, and they
  differ per shape).

Shapes: blocks see (B, L, D) text and (B, S, D) visual tokens, so every resolution / length bucket is a new shape.
``--compile_dynamic auto`` (default, ``dynamic=None``) compiles the first shape statically and recompiles *once*
with symbolic sizes when a second shape arrives; later buckets reuse that graph (sizes 0 and 1 are specialised, so
batch 1 vs 2 or one frame vs many are separate graphs).  ``true`` starts symbolic, ``false`` compiles every shape.
All blocks of one kind share the compiled code (its guards do not depend on the block instance).

One log line (after the first DiT call, or after its backward when training) says what was compiled and how long
compiling took (dynamo's own frame + backward compile times, summed over all blocks).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass

import torch
from torch import nn

from kandinsky5.common import UserError, get_logger

__all__ = ["COMPILE_MODES", "CompileConfig", "CompiledBlocks", "compile_config_from_args", "compile_blocks"]

log = get_logger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DYNAMIC_CHOICES = {"true": True, "false": False, "auto": None}
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class CompileConfig:
    """``torch.compile`` settings for the DiT blocks (``enabled=False``: run eagerly)."""

    enabled: bool = False  # --compile
    backend: str = "inductor"  # --compile_backend
    mode: str = "default"  # --compile_mode
    dynamic: bool | None = None  # --compile_dynamic true/false/auto (None)
    fullgraph: bool = False  # --compile_fullgraph
    cache_size_limit: int | None = None  # --compile_cache_size_limit (torch's default otherwise)

    def describe(self) -> str:
        dynamic = {True: "true", False: "false", None: "auto"}[self.dynamic]
        full = ", fullgraph" if self.fullgraph else ""
        return f"backend {self.backend}, mode {self.mode}, dynamic {dynamic}{full}"


def compile_config_from_args(args, device_type: str | None = None, blocks_to_swap: int = 0) -> CompileConfig:
    """Read and check the ``cli.add_compile_args`` flags (before any model loads)."""
    if not args.compile:
        return CompileConfig()
    if getattr(args, "fsdp", False):
        raise UserError("--compile cannot be combined with --fsdp yet; drop one of them (DDP runs compile per rank)")
    dynamic = str(args.compile_dynamic or "auto").lower()
    if dynamic not in DYNAMIC_CHOICES:
        raise UserError(f"--compile_dynamic must be one of true, false, auto; got {args.compile_dynamic!r}")
    if args.compile_cache_size_limit is not None and args.compile_cache_size_limit < 1:
        raise UserError(f"--compile_cache_size_limit must be >= 1, got {args.compile_cache_size_limit}")
    cfg = CompileConfig(
        enabled=True,
        backend=args.compile_backend,
        mode=args.compile_mode,
        dynamic=DYNAMIC_CHOICES[dynamic],
        fullgraph=bool(args.compile_fullgraph),
        cache_size_limit=args.compile_cache_size_limit,
    )
    check_compile(cfg, device_type or ("cuda" if torch.cuda.is_available() else "cpu"), blocks_to_swap)
    return cfg


def check_compile(cfg: CompileConfig, device_type: str, blocks_to_swap: int = 0) -> None:
    """Fail now, with the fix, for settings that would only fail at the first compiled call."""
    backends = torch._dynamo.list_backends(exclude_tags=())
    if cfg.backend not in backends:
        choices = ", ".join(sorted(backends))
        raise UserError(f"--compile_backend {cfg.backend!r} is not a torch.compile backend; choose one of: {choices}")
    if cfg.mode not in COMPILE_MODES:
        raise UserError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}; got {cfg.mode!r}")
    if cfg.backend != "inductor":
        return
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--compile on CUDA needs Triton (inductor generates Triton kernels): pip install triton")
    if device_type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError(
            "--compile on the CPU needs a C++ compiler (inductor generates C++): install g++, "
            "or use --compile_backend aot_eager"
        )
    if blocks_to_swap and cfg.mode in _CUDAGRAPH_MODES:
        raise UserError(
            f"--compile_mode {cfg.mode} records CUDA graphs, which pin weight addresses that --blocks_to_swap "
            "changes every step; use --compile_mode max-autotune-no-cudagraphs"
        )


class CompiledBlocks:
    """What :func:`compile_blocks` did, and the one-line report of the compile time (logged once)."""

    def __init__(self, dit: nn.Module, cfg: CompileConfig, counts: tuple[int, int]):
        self.cfg, self.counts = cfg, counts
        self.compile_seconds: float | None = None
        self._start = _compile_seconds()
        self._wall = time.perf_counter()
        self._pending_backward = False
        self._hooks = [
            dit.register_forward_pre_hook(self._before_call),
            dit.register_forward_hook(self._after_call, always_call=True),
        ]

    def describe(self) -> str:
        text, visual = self.counts
        return f"{text + visual} DiT blocks ({text} text + {visual} visual), {self.cfg.describe()}"

    def _before_call(self, module, args) -> None:
        if self._pending_backward:  # the previous call's backward (and its compile) has run by now
            self._report()

    def _after_call(self, module, args, output) -> None:
        if self.compile_seconds is None and not self._pending_backward:
            self._pending_backward = torch.is_grad_enabled() and getattr(output, "requires_grad", False)
            if not self._pending_backward:
                self._report()

    def _report(self) -> None:
        spent = _compile_seconds()
        self.compile_seconds = (spent - self._start) if spent is not None else time.perf_counter() - self._wall
        what = "forward + backward" if self._pending_backward else "forward"
        log.info("compile: torch.compile of %s (%s) took %.1f s", self.describe(), what, self.compile_seconds)
        self._pending_backward = False
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _compile_seconds() -> float | None:
    """Seconds dynamo has spent compiling frames and backward graphs in this process (None: not exposed)."""
    try:
        spent = torch._dynamo.utils.calculate_time_spent()
    except AttributeError:
        return None
    return float(spent.get("entire_frame_compile", 0.0)) + float(spent.get("entire_backward_compile", 0.0))


def _blocks(dit: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    return list(dit.text_transformer_blocks), list(dit.visual_transformer_blocks)


def compile_blocks(dit: nn.Module, cfg: CompileConfig) -> CompiledBlocks | None:
    """Replace each block's ``forward`` by its compiled version; call before gradient checkpointing is enabled."""
    if not cfg.enabled:
        return None
    text, visual = _blocks(dit)
    for block in [*text, *visual]:
        if "forward" in block.__dict__:
            raise RuntimeError("compile the DiT blocks before enabling gradient checkpointing (it wraps forward)")
    if cfg.cache_size_limit is not None:
        torch._dynamo.config.cache_size_limit = cfg.cache_size_limit
    options = dict(backend=cfg.backend, dynamic=cfg.dynamic, fullgraph=cfg.fullgraph)
    if cfg.backend == "inductor":
        options["mode"] = cfg.mode
    for block in [*text, *visual]:
        block.forward = torch.compile(block.forward, **options)
    report = CompiledBlocks(dit, cfg, (len(text), len(visual)))
    log.info("compile: %s (compiled at the first call)", report.describe())
    return report
