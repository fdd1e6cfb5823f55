"""fp8 (``float8_e4m3fn``) storage for the DiT's large block linears, with fine-grained scales.

Role: :class:`FP8Linear` replaces an ``nn.Linear`` whose weight is stored as fp8 plus fp32 scales and is
dequantised on the fly; :func:`convert_to_fp8` swaps the policy's linears (``dtype_policy.FP8_LINEAR``: attention
q/k/v/out and FFN in/out of every text and visual block) on a meta model (loading) or a materialised one.

Layouts.  ``weight`` (out, in) ``float8_e4m3fn``; ``scale_weight`` (out, in/B, 1) fp32 -- one scale per *row block*
of B = 64 consecutive input features, so ``w[o, j*B:(j+1)*B] ~= weight[o, j*B:(j+1)*B].float() * scale[o, j]``.
This is musubi-tuner's ``--fp8_scaled`` block layout (ComfyUI reads it too), so files we save load there and theirs
(block, per-row ``(out, 1)`` or per-tensor ``(1,)`` scales) load here unchanged.

Why blocks of 64 along the input dim.  e4m3 is a floating format: its relative rounding error (3 mantissa bits,
at most 2^-4) is the same over the whole normal range 2^-6 .. 448 (about 15 binades), so the scale mainly decides
which weights drop below that range into the subnormals (absolute step 2^-9 s) or to zero.  One scale per tensor
or per row is set by the largest |w| of the tensor / row, so a single outlier drags all its neighbours toward that
floor; one scale per 64 weights confines the damage to 64 weights.  For well-behaved weights the gain is small
(Gaussian matrix with outliers: 2.48 % relative error with blocks of 64, 2.62 % per row, 2.63 % per tensor); we keep
blocks for robustness to outliers and because it is musubi's layout (file compatibility).  Blocks run along the
*input* dim, the dot-product axis: a block's error stays inside one output feature, and a block-scaled matmul can
apply the scale per K-slice.  64 (not 16) keeps the scale overhead at 4 bytes / 64 weights = 0.0625 B/param (6.25 %
of the fp8 bytes); every K5 width (D, F) is a multiple of 64.  Quantisation is round-to-nearest-even of ``w / s``
with ``s = max|w_block| / 448``; per element ``|dq(q(w)) - w| <= 2^-4 |w| + 2^-10 s`` (half an ulp for normals,
half the subnormal step otherwise) -- asserted in ``tests/test_fp8.py``.

Numerics of the forward.  The weight is dequantised to the compute dtype (autocast's dtype when autocast is on,
else the input's dtype) and ``F.linear`` runs in that dtype, so an fp8 layer equals an ``nn.Linear`` holding the
dequantised weight bit for bit.  In autograd the custom function saves the fp8 *parameter* (not a dequantised copy,
which would cost a bf16 weight per layer until backward) and dequantises again in backward to form ``dL/dx``.  The
base weight is frozen (fp8 weights never get gradients; LoRA adds trainable branches around ``forward``).

``--fp8_fast``: ``torch._scaled_mm`` (fp8 tensor cores, sm_89+) with per-row weight scales (``(out, 1, 1)``: the
layers are quantised per output row instead of per block) and per-token activation scales computed on the fly;
bf16 output, bias added afterwards (in place); backward still uses the dequantised weight.  The activation is
quantised without a float copy: its row maxima are a reduction on the bf16 tensor and the fp32 division is stored
straight into the fp8 buffer, in chunks; rows are padded to a multiple of 16 inside that buffer only.  So the
transient cost is one fp8 copy of x (half of the bf16 input), not four fp32 copies (Pro FFN out-layer at 47,616
tokens: 0.78 GB instead of ~12 GB).  Asked for on a device without fp8 matmul it is an error, never a silent
fallback.

Casting a model that holds fp8 layers (``.to(torch.bfloat16)``, ``.float()``) keeps their fp8 weights and fp32
scales (only biases follow); ``.to(device)`` moves them.

Stream model: none here -- everything runs on the caller's current stream; block swap (``kandinsky5.memory.block_swap``)
moves ``weight`` and ``scale_weight`` by reassigning ``.data`` and relies on the autograd function saving the
parameter itself, so a swapped-out block leaves no GPU copy behind in saved tensors.

LoRA: ``networks.lora`` wraps ``FP8Linear.forward``; merging uses :meth:`FP8Linear.dequantized_weight` and
:meth:`FP8Linear.set_weight` (re-quantised with fresh scales, same layout), honouring the scales (musubi defect #7).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky5.common import UserError, get_logger
from kandinsky5.memory.dtype_policy import FP8_DTYPE, SCALE_DTYPE, is_fp8_linear

__all__ = [
    "FP8_MAX",
    "DEFAULT_BLOCK",
    "FP8Linear",
    "quantize_weight",
    "dequantize",
    "convert_to_fp8",
    "fp8_targets",
    "prequantized_scales",
    "fp8_matmul_unavailable",
    "check_fp8_fast",
]

log = get_logger(__name__)

FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
DEFAULT_BLOCK = 64
_MIN_SCALE = 1e-12  # all-zero blocks: any positive scale gives q = 0
_QUANT_CHUNK = 1 << 24  # --fp8_fast: activation elements quantised per step (CPU: two fp32 temporaries each)


# ----------------------------------------------------------------------------------------------------------------
# quantise / dequantise
# ----------------------------------------------------------------------------------------------------------------


def quantize_weight(w: torch.Tensor, block: int | None = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (fp8 (out, in), fp32 scale (out, in/block, 1)); ``block=None``: one scale, shape (1,).

    ``block`` equal to ``in`` gives per-row scales (out, 1, 1).  ``in`` must be a multiple of ``block``.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_weight expects a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    wf = w.float()
    if block is None:
        scale = (wf.abs().amax() / FP8_MAX).clamp(min=_MIN_SCALE).reshape(1)
        return (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    if in_f % block:
        raise ValueError(f"in_features {in_f} is not a multiple of the fp8 block {block}")
    blocks = wf.view(out_f, in_f // block, block)
    scale = (blocks.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(out_f, in_f), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 (out, in) and a scale of shape (1,)/() [tensor], (out, 1) [row] or (out, nb, 1) [row block] -> ``dtype``."""
    out_f, in_f = q.shape
    if scale.numel() == 1:
        return (q.float() * scale.float().reshape(())).to(dtype)
    s = scale.float().reshape(out_f, -1, 1)
    nb = s.shape[1]
    return (q.float().view(out_f, nb, in_f // nb) * s).view(out_f, in_f).to(dtype)


def _block_of(scale_shape: tuple[int, ...], in_features: int) -> int | None:
    """The quantisation block implied by a scale shape (None = per tensor)."""
    if math.prod(scale_shape) == 1 and len(scale_shape) <= 1:
        return None
    nb = scale_shape[1] if len(scale_shape) == 3 else 1
    return in_features // nb


# ----------------------------------------------------------------------------------------------------------------
# fast path: fp8 tensor-core matmul
# ----------------------------------------------------------------------------------------------------------------


def fp8_matmul_unavailable(device: torch.device | str) -> str | None:
    """None when ``device`` has fp8 matmul (CUDA sm_89+ and ``torch._scaled_mm``), else the reason."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} is sm_{cap[0]}{cap[1]}; fp8 tensor cores need Ada (sm_89) or Hopper (sm_90) or newer"
    return None


def check_fp8_fast(device: torch.device | str) -> None:
    """UserError naming the remedy when ``--fp8_fast`` cannot run on ``device``."""
    reason = fp8_matmul_unavailable(device)
    if reason is not None:
        raise UserError(f"--fp8_fast needs fp8 matmul, but {reason}; drop --fp8_fast (--fp8_base alone still works)")


def _quantize_rows(x2d: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 quantisation of a (rows, K) activation without a full-size float copy.

    Returns ``(xq, scale)``: ``xq`` (rows + pad, K) fp8 with rows padded to a multiple of 16 (the fp8 GEMM's
    shape rule; pad rows are zero, scale 1) and ``scale`` (rows + pad, 1) fp32 with ``x ~= xq * scale``.  The row
    maximum is a reduction on x itself; the division runs in fp32 but is stored straight into fp8, ``chunk``
    elements at a time (default :data:`_QUANT_CHUNK`), so the only full-size buffer is ``xq`` (half of a bf16 x).
    No clamp is needed: ``|x| / fl(amax / 448) <= 448 (1 + 2^-23)``, which rounds to 448.
    """
    rows, k = x2d.shape
    padded = rows + (-rows % 16)
    scale = torch.ones(padded, 1, dtype=torch.float32, device=x2d.device)
    amax = torch.linalg.vector_norm(x2d, ord=float("inf"), dim=1, keepdim=True)  # max |x| per row, exact in bf16
    scale[:rows] = (amax.float() / FP8_MAX).clamp_(min=_MIN_SCALE)
    xq = torch.empty(padded, k, dtype=FP8_DTYPE, device=x2d.device)
    xq[rows:].zero_()
    step = max(1, (chunk or _QUANT_CHUNK) // max(1, k))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        torch.div(x2d[start:end], scale[start:end], out=xq[start:end])
    return xq, scale


def _scaled_mm_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """``x @ dq(q).T + bias`` with fp8 tensor cores: per-token x scales, per-row weight scales; bf16 result.

    Memory: besides the (rows, out) result, one fp8 copy of x (see :func:`_quantize_rows`); the bias is added in
    place.
    """
    x2d = x.reshape(-1, x.shape[-1])
    rows = x2d.shape[0]
    xq, x_scale = _quantize_rows(x2d)
    w_scale = scale.float().reshape(1, -1).expand(1, q.shape[0]).contiguous()  # per-tensor -> per-row
    out = torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
    del xq
    out = out[:rows]
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out.view(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FP8LinearFn(torch.autograd.Function):
    """``y = x @ dq(w).T + b`` saving the fp8 parameter (a reference, no copy) instead of the dequantised weight."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype, fast):
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.x_dtype, ctx.has_bias = dtype, x.dtype, bias is not None
        if fast:
            return _scaled_mm_linear(x, weight, scale, bias).to(dtype)
        b = bias.to(dtype) if bias is not None else None
        return F.linear(x.to(dtype), dequantize(weight, scale, dtype), b)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.to(ctx.dtype).matmul(dequantize(weight, scale, ctx.dtype)).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_b, None, None


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose weight is ``float8_e4m3fn`` (frozen) with an fp32 ``scale_weight`` buffer.

    State-dict keys: ``weight`` (fp8), ``bias`` (run dtype, if any), ``scale_weight`` (see the module docstring).
    Build with :meth:`from_linear` (quantises a real weight) or the constructor (empty, e.g. on the meta device).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block: int | None = DEFAULT_BLOCK,
        scale_shape: tuple[int, ...] | None = None,
        fast: bool = False,
        device=None,
        bias_dtype: torch.dtype | None = None,
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full-precision weight
        self.in_features, self.out_features = in_features, out_features
        if scale_shape is None:
            scale_shape = (1,) if block is None else (out_features, in_features // block, 1)
        self.block = _block_of(tuple(scale_shape), in_features)
        self.fast = fast
        w = torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        b = torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None
        self.register_buffer("scale_weight", torch.empty(scale_shape, dtype=SCALE_DTYPE, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int | None = DEFAULT_BLOCK, fast: bool = False) -> FP8Linear:
        """Quantise a materialised Linear (meta Linears give an empty FP8Linear on meta)."""
        has_bias = linear.bias is not None
        bias_dtype = linear.bias.dtype if has_bias else None
        dev = linear.weight.device
        new = cls(linear.in_features, linear.out_features, has_bias, block, None, fast, dev, bias_dtype)
        if not linear.weight.is_meta:
            with torch.no_grad():
                new.set_weight(linear.weight)
                if has_bias:
                    new.bias.data = linear.bias.detach().clone()
        return new

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with, fp32 (out, in)."""
        return dequantize(self.weight, self.scale_weight, torch.float32)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantise a float (out, in) weight with fresh scales in this layer's scale layout, on its device."""
        q, scale = quantize_weight(weight.to(self.weight.device), self.block)
        self.weight.data = q
        self.scale_weight.data = scale.reshape(self.scale_weight.shape).to(self.scale_weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = self.bias
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _FP8LinearFn.apply(x, self.weight, self.scale_weight, bias, dtype, self.fast)
        if self.fast:
            return _scaled_mm_linear(x, self.weight, self.scale_weight, bias).to(dtype)
        b = bias.to(dtype) if bias is not None else None
        return F.linear(x.to(dtype), dequantize(self.weight, self.scale_weight, dtype), b)

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves everything; a dtype cast (``.to(bf16)``, ``.float()``) leaves the fp8 weight and its
        fp32 scales as they are (the storage policy) and casts only the bias, instead of silently de-quantising."""
        probe = fn(torch.empty(0, dtype=FP8_DTYPE, device=self.weight.device))
        if probe.dtype == FP8_DTYPE:
            return super()._apply(fn, recurse)
        weight, scale = self._parameters["weight"], self._buffers["scale_weight"]
        self._parameters["weight"], self._buffers["scale_weight"] = None, None  # skipped by Module._apply
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"], self._buffers["scale_weight"] = weight, scale
        weight.data, scale.data = weight.data.to(probe.device), scale.data.to(probe.device)
        return self

    def extra_repr(self) -> str:
        block = "tensor" if self.block is None else f"block {self.block}"
        return f"{super().extra_repr()}, fp8 e4m3 ({block}){', fast' if self.fast else ''}"


# ----------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------


def fp8_targets(model: nn.Module) -> list[str]:
    """Module paths of the Linears the dtype policy stores in fp8."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_fp8_linear(n)]


def prequantized_scales(header: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
    """{module path: scale shape} for every ``<module>.scale_weight`` in a checkpoint header (read_header format)."""
    suffix = ".scale_weight"
    return {k[: -len(suffix)]: tuple(v[0]) for k, v in header.items() if k.endswith(suffix)}


def convert_to_fp8(
    model: nn.Module,
    block: int | None = DEFAULT_BLOCK,
    fast: bool = False,
    targets: Iterable[str] | None = None,
    scale_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> list[str]:
    """Replace Linears by :class:`FP8Linear` in place; returns the converted module paths.

    ``targets`` default to :func:`fp8_targets` (the policy).  ``scale_shapes`` (pre-quantised checkpoints) fixes a
    module's scale layout.  Materialised weights are quantised now; meta ones stay empty for a streaming load.
    ``fast`` quantises per output row (the layout ``torch._scaled_mm`` takes).
    """
    names = list(fp8_targets(model) if targets is None else targets)
    scale_shapes = scale_shapes or {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, FP8Linear):
            continue
        if not isinstance(old, nn.Linear):
            raise TypeError(f"fp8 target {name} is a {type(old).__name__}, not a Linear")
        if name in scale_shapes:
            new = _empty_like(old, scale_shapes[name], fast)
        else:
            new = FP8Linear.from_linear(old, old.in_features if fast else block, fast)
        setattr(parent, attr, new)
    return names


def _empty_like(old: nn.Linear, scale_shape: tuple[int, ...], fast: bool) -> FP8Linear:
    bias_dtype = old.bias.dtype if old.bias is not None else None
    dev = old.weight.device
    return FP8Linear(old.in_features, old.out_features, old.bias is not None, None, scale_shape, fast, dev, bias_dtype)
