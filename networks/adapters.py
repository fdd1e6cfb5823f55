"""Shared adapter machinery: forward injection, merge into weights, the per-target adapter base class and the
full-tensor deltas (``diff`` / ``diff_b``) that ComfyUI's trainer writes.  Depends on torch only.

An *adapter* adds a weight change ``ΔW`` to one model tensor.  Two families:

* :class:`AdapterModule` (LoRA in ``networks.lora``, LoHa / LoKr in ``networks.lycoris``): a low-parameter
  factorisation of ``ΔW`` (out, in) for one ``nn.Linear``; at runtime it adds ``m · ΔW x`` (computed without
  materialising ``ΔW`` where the factorisation allows) to the Linear's output; merged it adds ``m · ΔW`` to the
  weight.  Canonical tensor names are the module's own ``state_dict`` keys (``lora_down.weight``, ``hada_w1_a``,
  ``lokr_w2``, ``alpha``, ...), which are also the LyCORIS/ComfyUI key suffixes.
* :class:`TensorDiff`: a full delta for one parameter, ``diff`` (a weight, e.g. a norm's 1-D weight) or ``diff_b``
  (a bias).  ``W <- W + m · diff``.  At runtime a Linear's deltas are added to its output (``F.linear(x, m·diff)``,
  ``+ m·diff_b``); any other module's parameter (the DiT reads q/k RMSNorm and embedding LayerNorm weights as
  tensors, not through their ``forward``) is swapped for ``W + m · diff`` during the forward of the module that
  owns it (its parent), so autograd reaches ``diff`` and the stored parameter is never touched.

Injection wraps the *module's forward* (the instance attribute ``forward`` is replaced by the adapter's forward,
which calls the original bound forward first), so whatever the base does -- a plain Linear, an fp8 Linear that
dequantises its weight, a layer with hooks -- still runs.  ``detach`` restores the original forward; wrappers nest
(several adapters on one module), and unwind in reverse order.

fp8 merge protocol (duck-typed): a base module with ``dequantized_weight() -> float Tensor (out, in)`` and
``set_weight(weight: float Tensor)`` (re-quantises with fresh scales) is merged as dequantise -> add -> re-quantise,
so block scales are honoured (musubi defect #7).  Otherwise the tensor is updated in place in its own dtype
(the sum is formed in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdapterKeyError", "AdapterModule", "TensorDiff", "merge_weight", "unwrap", "get_linear", "get_module"]


class AdapterKeyError(ValueError):
    """A key of an adapter file that cannot be applied to the model; ``key`` as stored in the file."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"key {key!r} cannot be applied: {reason}")
        self.key, self.reason = key, reason


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile's wrapper."""
    return getattr(model, "_orig_mod", model)


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"adapter target {name!r} does not exist in the model") from None


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    module = get_module(model, name)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"adapter target {name!r} is a {type(module).__name__}, not a Linear")
    return module


@torch.no_grad()
def merge_weight(base: nn.Module, delta: torch.Tensor, attr: str = "weight") -> None:
    """``base.<attr> += delta`` (fp32 sum); fp8 layers (weight only) are dequantised and re-quantised."""
    if attr == "weight" and hasattr(base, "dequantized_weight") and hasattr(base, "set_weight"):
        weight = base.dequantized_weight().float()
        base.set_weight(weight + delta.to(weight.device))
        return
    w = getattr(base, attr)
    w.copy_((w.float() + delta.to(w.device).float()).to(w.dtype))


class _ForwardPatch:
    """Replace ``target.forward`` by ``self._patched_forward`` and put it back (mixin for nn.Module adapters)."""

    _attached: tuple[nn.Module, object, bool] | None

    def _attach_forward(self, target: nn.Module) -> None:
        if self._attached is not None:
            raise RuntimeError(f"adapter {self.lora_name} is already attached")
        had_instance_forward = "forward" in target.__dict__
        self._attached = (target, target.forward, had_instance_forward)
        target.forward = self.forward

    def detach(self) -> None:
        """Restore the wrapped module's original forward."""
        if self._attached is None:
            return
        target, original, had_instance_forward = self._attached
        if target.__dict__.get("forward") != self.forward:
            raise RuntimeError(f"{self.lora_name}: forward was re-wrapped after the adapter; remove the outer first")
        if had_instance_forward:
            target.forward = original
        else:
            del target.forward
        self._attached = None

    def is_attached_to(self, module: nn.Module) -> bool:
        return self._attached is not None and self._attached[0] is module

    def _original(self, *args, **kwargs):
        if self._attached is None:
            raise RuntimeError(f"adapter {self.lora_name} is not attached to a module")
        return self._attached[1](*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# low-parameter adapters of one Linear
# ----------------------------------------------------------------------------------------------------------------


class AdapterModule(_ForwardPatch, nn.Module):
    """Base of LoRA / LoHa / LoKr: ``y = base(x) + m · scale · branch(x)``, ``scale = alpha / rank``.

    Subclasses create their parameters, then call :meth:`set_alpha`, and implement ``branch`` (the scaled
    ``ΔW x`` with training-time regularisers) and ``delta_weight`` (``m · ΔW`` in fp32, (out, in)).  ``rank`` is
    the divisor of alpha (``None``: no divisor, scale 1 -- a LoKr with two full factors, as ComfyUI reads it).
    Regularisers follow this module's train()/eval() flag: ``dropout``, ``rank_dropout`` (per sample, rescaled
    by 1/(1-p)), ``module_dropout`` (skip the whole branch for this call).
    """

    kind = "adapter"

    def __init__(self, name: str, in_features: int, out_features: int, rank: int | None, multiplier: float = 1.0,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0):  # fmt: skip
        super().__init__()
        if rank is not None and rank < 1:
            raise ValueError(f"{self.kind} rank must be >= 1, got {rank} for {name}")
        self.lora_name = name
        self.in_features, self.out_features = in_features, out_features
        self.rank = rank
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32))
        self._scale = 1.0
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self._attached = None

    @property
    def scale(self) -> float:
        """alpha / rank, cached as a Python float (reading the buffer would sync the GPU on every forward)."""
        return self._scale

    @torch.no_grad()
    def set_alpha(self, alpha: float | None) -> None:
        """Set alpha (None or 0 means alpha = rank, as kohya; without a divisor the scale is 1 whatever alpha)."""
        if self.rank is None:
            self.alpha.fill_(float(alpha) if alpha else 1.0)
            self._scale = 1.0
            return
        alpha = float(self.rank) if alpha is None or alpha == 0 else float(alpha)
        self.alpha.fill_(alpha)
        self._scale = alpha / self.rank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = 1.0 if self.rank is None else float(self.alpha) / self.rank  # keep the cache in step

    def attach(self, base: nn.Module) -> None:
        """Replace ``base.forward`` by this module's forward (which calls the original first)."""
        self._attach_forward(base)

    def attach_to_model(self, model: nn.Module, path: str) -> None:
        base = get_linear(model, path)
        if (base.in_features, base.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"{self.kind} {path} shape does not match the model's Linear {tuple(base.weight.shape)}")
        self.attach(base)

    @torch.no_grad()
    def merge_into_model(self, model: nn.Module, path: str, multiplier: float | None = None) -> None:
        base = get_linear(model, path)
        if self.is_attached_to(base):
            raise RuntimeError(f"{path}: the adapter is applied to this model; call remove() before merging")
        merge_weight(base, self.delta_weight(multiplier))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self._original(x, *args, **kwargs)
        if self.multiplier == 0.0:
            return y
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return y
        return y + self.branch(x).to(y.dtype)

    def memory_profile(self, act_bytes: int) -> tuple[int, int, int, int]:
        """For the memory plan: (per-token width this branch keeps for backward between its products, bytes it
        keeps regardless of the batch, bytes of its largest working set in backward, and in a no-grad forward);
        ``act_bytes`` is the activation itemsize.  LoRA: its rank activations; other kinds override this."""
        return self.rank or 0, 0, 0, 0

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def regularise_output(self, out: torch.Tensor) -> torch.Tensor:
        """Training-time dropouts on a branch output (out_features last): LoHa / LoKr have no rank activations,
        so ``dropout`` and ``rank_dropout`` act on the output features (rank_dropout: one mask per sample)."""
        if self.training and self.dropout > 0:
            out = F.dropout(out, p=self.dropout)
        if self.training and self.rank_dropout > 0:
            shape = (out.shape[0], *([1] * (out.ndim - 2)), out.shape[-1])
            keep = torch.rand(shape, device=out.device) > self.rank_dropout
            out = out * keep.to(out.dtype) / (1.0 - self.rank_dropout)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------------------------
# full deltas of one tensor (ComfyUI's diff / diff_b)
# ----------------------------------------------------------------------------------------------------------------


class TensorDiff(_ForwardPatch, nn.Module):
    """A full delta for one parameter of a model module: ``suffix`` "diff" (the ``weight``) or "diff_b" (``bias``).

    The parameter is named after the suffix, so the canonical key is ``<module path>.diff`` / ``.diff_b``.
    Zero-initialised (no effect until trained).
    """

    kind = "diff"

    def __init__(self, name: str, suffix: str, shape: tuple[int, ...], multiplier: float = 1.0,
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        if suffix not in ("diff", "diff_b"):
            raise ValueError(f"TensorDiff suffix must be diff or diff_b, got {suffix!r}")
        self.lora_name, self.suffix = name, suffix
        self.attr = "weight" if suffix == "diff" else "bias"
        self.register_parameter(suffix, nn.Parameter(torch.zeros(shape, dtype=dtype)))
        self.multiplier = multiplier
        self.rank = None
        self._attached = None
        self._owner_ref: tuple[nn.Module, ...] = ()  # a tuple: the model's module must not become our submodule

    @property
    def delta(self) -> nn.Parameter:
        return getattr(self, self.suffix)

    def check_target(self, model: nn.Module, path: str) -> nn.Module:
        owner = get_module(model, path)
        target = getattr(owner, self.attr, None)
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"{path}.{self.suffix}: the model's {path} has no {self.attr}")
        if tuple(target.shape) != tuple(self.delta.shape):
            raise ValueError(
                f"{path}.{self.suffix}: shape {tuple(self.delta.shape)} != {self.attr} {tuple(target.shape)}"
            )
        return owner

    def attach_to_model(self, model: nn.Module, path: str) -> None:
        owner = self.check_target(model, path)
        self._owner_ref = (owner,)
        if isinstance(owner, nn.Linear):
            self._attach_forward(owner)
            self._mode = "linear"
        else:
            parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
            self._attach_forward(parent)
            self._mode = "swap"

    @torch.no_grad()
    def merge_into_model(self, model: nn.Module, path: str, multiplier: float | None = None) -> None:
        owner = self.check_target(model, path)
        m = self.multiplier if multiplier is None else multiplier
        merge_weight(owner, self.delta.detach().float() * m, self.attr)

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        m = self.multiplier if multiplier is None else multiplier
        return self.delta.detach().float() * m

    def forward(self, *args, **kwargs):
        if self._mode == "linear":
            return self._linear_forward(*args, **kwargs)
        owner, attr = self._owner_ref[0], self.attr
        stored = owner._parameters[attr]
        owner._parameters[attr] = (stored.float() + self.multiplier * self.delta.float()).to(stored.dtype)
        try:
            return self._original(*args, **kwargs)
        finally:
            owner._parameters[attr] = stored

    def _linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self._original(x, *args, **kwargs)
        if self.multiplier == 0.0:
            return y
        if self.attr == "bias":
            return y + (self.multiplier * self.delta).to(y.dtype)
        return y + F.linear(x, (self.multiplier * self.delta).to(x.dtype)).to(y.dtype)

    def num_parameters(self) -> int:
        return self.delta.numel()
