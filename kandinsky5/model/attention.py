"""Attention kernels for the DiT, resolved once when the model is built.

Layout everywhere in this module: ``q, k, v`` are ``(B, S, H, D)`` (batch, tokens, heads, head dim) and the result
has the same layout.  SDPA wants ``(B, H, S, D)``; the transposes live here, not in the model.

Which kernel runs where (as in the official code):

* visual self-attention: the selected *dense* backend (``auto`` default, ``sdpa``, ``flash_attn`` = FlashAttention 2,
  ``flash3`` = FlashAttention 3, ``sage_attn`` = SageAttention, ``xformers``) or NABLA (``kandinsky5.model.nabla``);
* text self-attention and cross-attention: always SDPA with a boolean key-padding mask, because the padded text
  batch needs a mask and the fast kernels take none.  These are short sequences, so the cost is small.

Optional packages are imported when a backend is resolved.  Asking for one that is not installed is an error that
names the pip package; there is never a silent fallback to another kernel.

``auto`` (the default when no backend flag is given) is decided once, at resolve time, and logged: for fp16/bf16
CUDA tensors FlashAttention 3 (installed and an sm90 GPU), else FlashAttention 2 (installed, sm80+), else SDPA
limited to its exact fused kernels (cuDNN, then flash) -- if neither can run an input, SDPA raises instead of
quietly using its slow math kernel; every other tensor (CPU, fp32) goes to plain SDPA.

CPU (measured by ``bench/bench_attention.py`` for the DiT's shapes, 2026-12-01): SDPA's CPU flash kernel -- what
SDPA already picks there, masked or not -- is the fastest exact backend (the math kernel is 3-4x slower), and the
transposed (B, H, S, D) views SDPA receives are as fast as contiguous copies, so none are made.  Upcasting bf16
q/k/v to run the fp32 flash kernel was ~15 % slower under autocast, so bf16 stays bf16.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kandinsky5.common import UserError, get_logger

__all__ = [
    "DENSE_BACKENDS",
    "AttentionFn",
    "resolve_backend",
    "sdpa",
    "masked_sdpa",
    "backend_from_flags",
    "auto_cuda_kernel",
    "check_backend_dtype",
]

log = get_logger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Backend:
    module: str  # python module to import
    pip: str  # what to install
    note: str = ""
    half_only: bool = False  # computes in fp16 / bf16 only (no fp32 kernels)


_OPTIONAL = {
    "flash_attn": _Backend("flash_attn", "pip install flash-attn --no-build-isolation", half_only=True),
    "flash3": _Backend(
        "flash_attn_interface",
        "build FlashAttention 3 from the flash-attention repo (hopper/ directory)",
        "H100/H200",
        half_only=True,
    ),
    "sage_attn": _Backend(
        "sageattention", "pip install sageattention", "quantises q/k to int8: not for parity runs", half_only=True
    ),
    "xformers": _Backend("xformers.ops", "pip install xformers"),  # its CUTLASS kernels also run fp32
}
DENSE_BACKENDS = ("auto", "sdpa", *_OPTIONAL)


_HALF = (torch.float16, torch.bfloat16)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch scaled-dot-product attention, scale 1/sqrt(D), no mask."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA where ``key_mask`` (B, S_k) bool marks real keys (True); None means every key is real."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _exact_cuda_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA restricted to its exact fused CUDA kernels, cuDNN first (raises rather than using the math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        return sdpa(q, k, v)


def _flash2(mod) -> AttentionFn:
    return lambda q, k, v: mod.flash_attn_func(q, k, v)


def _flash3(mod) -> AttentionFn:
    def run(q, k, v):
        out = mod.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp

    return run


def _sage(mod) -> AttentionFn:
    return lambda q, k, v: mod.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _xformers(mod) -> AttentionFn:
    return lambda q, k, v: mod.memory_efficient_attention(q, k, v)


_FACTORIES = {"flash_attn": _flash2, "flash3": _flash3, "sage_attn": _sage, "xformers": _xformers}


def _importable(name: str):
    try:
        return _FACTORIES[name](importlib.import_module(_OPTIONAL[name].module))
    except ImportError:
        return None


def auto_cuda_kernel() -> tuple[str, AttentionFn]:
    """(name, function) ``auto`` uses for fp16/bf16 CUDA tensors on this machine (see the module docstring)."""
    if not torch.cuda.is_available():
        return "sdpa (no CUDA device)", sdpa
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) == (9, 0) and (fn := _importable("flash3")) is not None:
        return "flash3 (FlashAttention 3, sm90)", fn
    if major >= 8 and (fn := _importable("flash_attn")) is not None:
        return f"flash_attn (FlashAttention 2, sm{major}{minor})", fn
    return "sdpa limited to cuDNN / flash kernels (FlashAttention not installed)", _exact_cuda_sdpa


def _auto(log_choice: bool) -> AttentionFn:
    name, cuda_fn = auto_cuda_kernel()
    if log_choice:
        log.info("attention: auto -- fp16/bf16 CUDA tensors use %s; other tensors SDPA (CPU: its flash kernel); "
                 "text and cross-attention use masked SDPA", name)  # fmt: skip

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return cuda_fn(q, k, v) if q.is_cuda and q.dtype in _HALF else sdpa(q, k, v)

    return attend


def resolve_backend(name: str, log_choice: bool = True) -> AttentionFn:
    """Return the dense attention function for ``name``; import optional packages now, fail with the remedy."""
    if name == "auto":
        return _auto(log_choice)
    if name == "sdpa":
        fn = sdpa
    elif name in _OPTIONAL:
        spec = _OPTIONAL[name]
        try:
            mod = importlib.import_module(spec.module)
        except ImportError as exc:
            raise UserError(
                f"attention backend --{name} needs the '{spec.module}' package, which is not importable ({exc}); "
                f"install it with: {spec.pip}, or use --sdpa"
            ) from None
        fn = _FACTORIES[name](mod)
    else:
        raise UserError(f"unknown attention backend {name!r}; choose one of: {', '.join(DENSE_BACKENDS)}")
    if log_choice:
        extra = f" ({_OPTIONAL[name].note})" if name in _OPTIONAL and _OPTIONAL[name].note else ""
        log.info("attention: visual self-attention uses %s%s; text and cross-attention use masked SDPA", name, extra)
    return fn


def backend_from_flags(**flags: bool) -> str:
    """Map the mutually exclusive CLI switches (``sdpa=True``, ``flash_attn=False``, ...) to one backend name."""
    chosen = [name for name, on in flags.items() if on]
    if len(chosen) > 1:
        raise UserError(f"choose one attention backend, got {', '.join('--' + c for c in chosen)}")
    name = chosen[0] if chosen else "auto"
    if name not in DENSE_BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; choose one of: {', '.join(DENSE_BACKENDS)}")
    return name


def check_backend_dtype(name: str, dtype: torch.dtype, source: str) -> None:
    """UserError when backend ``name`` has no kernel for ``dtype`` (``source`` names the flag that set it).

    FlashAttention 2/3 and SageAttention take fp16 / bf16 only: in fp32 they would fail at the first step, after the
    models are loaded.  SDPA and xformers run fp32.
    """
    spec = _OPTIONAL.get(name)
    if spec is None or not spec.half_only or dtype in (torch.float16, torch.bfloat16):
        return
    raise UserError(
        f"--{name} computes in bfloat16/float16 only, but {source} runs the DiT in {str(dtype).removeprefix('torch.')}"
        f"; use bf16 precision with --{name}, or --sdpa / --xformers for {str(dtype).removeprefix('torch.')}"
    )
