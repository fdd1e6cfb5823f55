"""Generic LoRA for ``nn.Linear`` layers, and the adapter network (LoRA, LoHa, LoKr, full deltas) that every
network module builds: injection by module-path regex, merge into weights, state dicts.

Depends on torch only; the Kandinsky-5 defaults (targets, key vocabulary, metadata) live in
``networks.lora_kandinsky``; the shared per-target machinery (forward wrapping, fp8-aware merge) in
``networks.adapters``; LoHa / LoKr in ``networks.lycoris``; file key formats in ``networks.formats``.

Maths (per target Linear ``W: in -> out``, rank r, alpha a, multiplier m)::

    y = base(x) + m * (a / r) * up(down(x))       down: (r, in) Kaiming-uniform, up: (out, r) zeros
    merged:  W <- W + m * (a / r) * up @ down     (computed in fp32)

A LoRA branch is computed as ``addmm(base(x), down(x), up.T, alpha=m * a / r)``: one GEMM accumulates it into
the base output (no full-size temporary, no separate add).  LoRA modules that read one input (q/k/v of an
attention; ``LoRANetwork(shared_input_key=...)``) share one down-projection matmul (:class:`SharedDown`).  Both
only change how the same sum is evaluated; weights, state-dict keys and files are per module as before
(``networks.lora_fast``).  LoHa / LoKr modules keep their own branch.

Apply adapters *after* any pass that replaces Linear objects (fp8 conversion), since such a pass drops the wrapper,
and before ``torch.compile`` (a compiled graph would not see the new forwards).

Canonical state dict: ``<module path>.<suffix>`` (``networks.formats``), e.g.
``visual_transformer_blocks.3.self_attention.to_key.lora_down.weight`` (r, in), ``….lora_up.weight`` (out, r),
``….alpha`` (0-d float32).  A network may hold several entries per path (a weight adapter and a ``diff_b``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from networks.adapters import AdapterKeyError, AdapterModule, TensorDiff, get_linear, unwrap
from networks.formats import FORMATS, SUFFIXES, from_canonical, group_by_module, to_canonical, unmangle_kohya
from networks.lora_fast import SharedDown, add_up_projection, group_shared_inputs
from networks.lycoris import LoHaModule, LoKrModule, lokr_layout
from networks.metadata import folded_alphas_from_metadata, format_metadata, infer_module_ranks

__all__ = [
    "DEFAULT_TOKEN",
    "FORMATS",
    "SUFFIXES",
    "LoRAModule",
    "LoRANetwork",
    "SharedDown",
    "ADAPTER_KINDS",
    "adapter_factory",
    "modules_from_canonical",
    "select_targets",
    "to_canonical",
    "from_canonical",
    "infer_module_ranks",
    "format_metadata",
    "folded_alphas_from_metadata",
    "unmangle_kohya",
]

log = logging.getLogger(__name__)

DEFAULT_TOKEN = "@default"  # in an include list: "the default patterns", so users can add targets to them


# ----------------------------------------------------------------------------------------------------------------
# one LoRA branch
# ----------------------------------------------------------------------------------------------------------------


class LoRAModule(AdapterModule):
    """The low-rank branch for one Linear.  Parameters ``lora_down``/``lora_up`` (fp32 by default), buffer ``alpha``.

    Forward (installed as the base module's ``forward``): ``base(x) + m * scale * up(dropout(down(x)))``.  The branch
    runs in the input's dtype (fp32 parameters are cast; under autocast the matmuls follow autocast) and is added
    in the base output's dtype.  Training-only regularisers (they follow this module's own train()/eval() flag, so
    set it on the network): ``dropout`` on the rank activations, ``rank_dropout`` (a per-sample mask over the rank
    dimension, rescaled by 1/(1-p)), ``module_dropout`` (skip the whole branch).
    """

    kind = "lora"

    def __init__(
        self,
        name: str,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        multiplier: float = 1.0,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(name, in_features, out_features, rank, multiplier, dropout, rank_dropout, module_dropout)
        self.lora_down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.lora_up = nn.Linear(rank, out_features, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.set_alpha(alpha)
        self._shared: SharedDown | None = None  # set by LoRANetwork.apply_to for q/k/v-style input groups
        self._shared_index = 0  # position in self._shared.members

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x)`` plus the branch, accumulated by one addmm (``networks.lora_fast``)."""
        y = self._original(x, *args, **kwargs)
        h = self._shared.take(self._shared_index, x) if self._shared is not None else None  # taken even if skipped
        if self.multiplier == 0.0:
            return y
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return y
        h, scale = self._regularised(self.down(x) if h is None else h)
        return add_up_projection(y, h, self.lora_up.weight, scale)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """The rank activation ``down(x)`` (..., r), in x's dtype."""
        return F.linear(x, self.lora_down.weight.to(x.dtype))

    def _regularised(self, h: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Training-time dropouts on the rank activation; returns it with the branch scale ``m * alpha / r``."""
        scale = self.multiplier * self.scale
        if self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout > 0:
            keep = torch.rand(h.shape[0], *([1] * (h.ndim - 2)), self.rank, device=h.device) > self.rank_dropout
            h = h * keep.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return h, scale

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``m * scale * up(down(x))`` with the training-time dropouts, in x's dtype (the unfused branch)."""
        h, scale = self._regularised(self.down(x))
        return F.linear(h * scale, self.lora_up.weight.to(h.dtype))  # scale the rank-r activation, not the output

    @torch.no_grad()
    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """``m * scale * up @ down`` in fp32, shape (out, in)."""
        m = self.multiplier if multiplier is None else multiplier
        return (self.lora_up.weight.float() @ self.lora_down.weight.float()) * (m * self.scale)


# ----------------------------------------------------------------------------------------------------------------
# target selection
# ----------------------------------------------------------------------------------------------------------------


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"invalid {what} regex {p!r}: {e}") from None
    return compiled


def select_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    default_include: Sequence[str] = (),
) -> list[str]:
    """Dotted paths of the Linear modules to adapt (regexes ``fullmatch`` the whole path).

    * ``include`` None  -> candidates = Linears matching ``default_include``;
    * ``include`` given -> candidates = Linears matching any include pattern (restricts *and* adds); the token
      ``"@default"`` inside ``include`` stands for ``default_include`` (``["@default", ".*modulation.*"]`` adds the
      modulation linears to the defaults);
    * targets = candidates minus those matching any ``exclude`` pattern.
    A user pattern (include or exclude) that matches no Linear is an error (a typo would silently change training).
    """
    user_include = [p for p in include or () if p != DEFAULT_TOKEN]
    defaults = _compile(default_include if include is None or DEFAULT_TOKEN in include else (), "default include")
    user_inc, exc = _compile(user_include, "include"), _compile(exclude or (), "exclude")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for rx in user_inc + exc:
        if not any(rx.fullmatch(n) for n in linears):
            examples = ", ".join(linears[:3])
            raise ValueError(f"LoRA pattern {rx.pattern!r} matches no Linear module (example names: {examples})")
    inc = defaults + user_inc
    targets = [n for n in linears if any(r.fullmatch(n) for r in inc) and not any(r.fullmatch(n) for r in exc)]
    if not targets:
        raise ValueError("no Linear module selected for LoRA; check include/exclude patterns")
    return targets


# ----------------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------------


def _lora(name: str, linear: nn.Linear, rank: int, alpha: float | None, **opts) -> LoRAModule:
    return LoRAModule(name, linear.in_features, linear.out_features, rank, alpha, **opts)


def _loha(name: str, linear: nn.Linear, rank: int, alpha: float | None, **opts) -> LoHaModule:
    return LoHaModule(name, linear.in_features, linear.out_features, rank, alpha, **opts)


def _lokr(name: str, linear: nn.Linear, rank: int, alpha: float | None, factor: int = -1,
          decompose_both: bool = False, full_matrix: bool = False, **opts) -> LoKrModule:  # fmt: skip
    layout = lokr_layout(linear.in_features, linear.out_features, rank, factor, decompose_both, full_matrix)
    return LoKrModule(name, linear.in_features, linear.out_features, layout, alpha, **opts)


ADAPTER_KINDS = {"lora": _lora, "loha": _loha, "lokr": _lokr}
Factory = Callable[..., AdapterModule]


def adapter_factory(kind: str, **kind_args) -> Factory:
    """``factory(name, linear, rank, alpha, **opts) -> AdapterModule`` for ``kind`` (lora, loha, lokr)."""
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; valid: {', '.join(ADAPTER_KINDS)}")
    return partial(ADAPTER_KINDS[kind], **kind_args)


class LoRANetwork(nn.Module):
    """A set of adapters for one model.  Built from the model (for names and shapes), applied explicitly.

    Targets come from ``select_targets(dit, include, exclude, default_include)`` with one ``rank``/``alpha`` and
    ``factory`` (default LoRA; see :func:`adapter_factory`), or -- when ``module_ranks`` ({path: (rank, alpha)})
    is given -- exactly those modules, or ``modules`` (prebuilt (path, adapter) pairs, e.g. from a file, which
    may mix kinds and hold ``TensorDiff`` entries).  ``parameters()`` are the adapter weights only;
    ``lora_state_dict()`` uses the canonical names.  ``network_module`` names the module that built it (metadata).
    ``shared_input_key(path)``: LoRA modules with the same (non-None) key read the same input tensor in the model's
    forward (e.g. q/k/v of one attention); ``apply_to`` fuses their down-projections (:class:`SharedDown`; other
    adapter kinds run alone).  Parameters and files are per module either way.
    """

    def __init__(
        self,
        dit: nn.Module,
        rank: int = 16,
        alpha: float | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        multiplier: float = 1.0,
        default_include: Sequence[str] = (),
        module_ranks: Mapping[str, tuple[int, float]] | None = None,
        dtype: torch.dtype = torch.float32,
        factory: Factory | None = None,
        modules: Sequence[tuple[str, nn.Module]] | None = None,
        network_module: str = "networks.lora_kandinsky",
        shared_input_key: Callable[[str], str | None] | None = None,
    ):
        super().__init__()
        dit = unwrap(dit)
        self.shared_input_key = shared_input_key
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.network_module = network_module
        if modules is None:
            if module_ranks is None:
                names = select_targets(dit, include, exclude, default_include)
                module_ranks = {n: (rank, alpha) for n in names}
            opts = dict(multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout,
                        module_dropout=module_dropout, dtype=dtype)  # fmt: skip
            make = factory or _lora
            modules = [(n, make(n, get_linear(dit, n), r, a, **opts)) for n, (r, a) in module_ranks.items()]
        self.names: list[str] = [name for name, _ in modules]
        self.lora_modules = nn.ModuleList([module for _, module in modules])
        self._index = {}
        for i, (name, module) in enumerate(modules):
            if isinstance(module, AdapterModule):
                self._index.setdefault(name, i)

    def __getitem__(self, name: str) -> AdapterModule:
        return self.lora_modules[self._index[name]]

    def __len__(self) -> int:
        return len(self.names)

    def items(self) -> Iterable[tuple[str, nn.Module]]:
        return zip(self.names, self.lora_modules)

    # -- injection / multiplier ------------------------------------------------------------------------------

    def apply_to(self, dit: nn.Module) -> None:
        """Wrap the forward of each target module of ``dit`` (looked up by path, so any copy of the model works)."""
        dit = unwrap(dit)
        for name, module in self.items():
            module.attach_to_model(dit, name)
        if self.shared_input_key is not None:
            group_shared_inputs([(n, m) for n, m in self.items() if isinstance(m, LoRAModule)], self.shared_input_key)

    def remove(self) -> None:
        """Restore every original forward (reverse order, so nested wrappers unwind cleanly)."""
        for module in reversed(self.lora_modules):
            module.detach()
            if isinstance(module, LoRAModule):
                module._shared = None

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.lora_modules:
            module.multiplier = multiplier

    # -- weights ---------------------------------------------------------------------------------------------

    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Canonical state dict (detached copies; ``dtype`` casts the weights, alpha stays fp32)."""
        sd = {}
        for name, module in self.items():
            for key, t in module.state_dict().items():
                cast = dtype if dtype is not None and key != "alpha" else t.dtype
                sd[f"{name}.{key}"] = t.detach().to(torch.float32 if key == "alpha" else cast).clone()
        return sd

    @torch.no_grad()
    def load_lora_state_dict(self, sd: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy canonical weights in (alpha from the file replaces ours).  strict: key sets must be equal."""
        expected = set(self.lora_state_dict())
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if strict and (missing or unexpected):
            raise ValueError(f"adapter weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, module in self.items():
            own = module.state_dict()
            for key, dst in own.items():
                src = sd.get(f"{name}.{key}")
                if src is None:
                    continue
                if src.shape != dst.shape:
                    raise ValueError(f"{name}.{key}: file shape {tuple(src.shape)} != {tuple(dst.shape)}")
                if key == "alpha":
                    module.set_alpha(float(src))
                else:
                    module.get_parameter(key).copy_(src)

    @torch.no_grad()
    def merge_into(self, dit: nn.Module, multiplier: float | None = None) -> None:
        """``W += ΔW`` for every target of ``dit`` (fp8 layers: dequantise, add, re-quantise)."""
        dit = unwrap(dit)
        for name, module in self.items():
            module.merge_into_model(dit, name, multiplier)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for module in self.lora_modules:
            kinds[module.kind] = kinds.get(module.kind, 0) + 1
        ranks = sorted({m.rank for m in self.lora_modules if m.rank is not None})
        alphas = sorted({float(m.alpha) for m in self.lora_modules if isinstance(m, AdapterModule)})
        params = sum(p.numel() for p in self.parameters())
        what = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return f"adapters: {len(self)} modules ({what}), rank {ranks}, alpha {alphas}, {params / 1e6:.2f} M parameters"


# ----------------------------------------------------------------------------------------------------------------
# networks from canonical tensors (files)
# ----------------------------------------------------------------------------------------------------------------


def _weight_kind(path: str, tensors: Mapping[str, torch.Tensor]) -> str | None:
    kinds = {k for k, suffixes in (("lora", ("lora_down.weight", "lora_up.weight")),
                                     ("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
                                     ("lokr", ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")))
             if any(s in tensors for s in suffixes)}  # fmt: skip
    if len(kinds) > 1:
        raise ValueError(f"{path}: tensors of several adapter kinds {sorted(kinds)} for one module")
    return kinds.pop() if kinds else None


def _need(path: str, tensors: Mapping[str, torch.Tensor], *suffixes: str) -> list[torch.Tensor]:
    for s in suffixes:
        if s not in tensors:
            raise ValueError(f"{path}: {s} is missing (the file has {sorted(tensors)})")
    return [tensors[s] for s in suffixes]


def _kron_factor(path: str, t: Mapping[str, torch.Tensor], name: str) -> tuple[int, int, int | None]:
    """(rows, columns, rank or None when full) of the LoKr factor ``name`` (lokr_w1 / lokr_w2) of a file."""
    if name in t:
        return t[name].shape[0], t[name].shape[1], None
    a, b = _need(path, t, f"{name}_a", f"{name}_b")
    return a.shape[0], b.shape[1], b.shape[0]


def _lokr_from_tensors(path: str, linear: nn.Linear, t: Mapping[str, torch.Tensor], opts) -> LoKrModule:
    (ol, im, r1), (ok, in_, r2) = _kron_factor(path, t, "lokr_w1"), _kron_factor(path, t, "lokr_w2")
    layout = dict(out_l=ol, out_k=ok, in_m=im, in_n=in_, rank_w1=r1, rank_w2=r2)
    return LoKrModule(path, linear.in_features, linear.out_features, layout, **opts)


def _adapter_from_tensors(path: str, linear: nn.Linear, kind: str, t: Mapping[str, torch.Tensor], opts):
    if kind == "lora":
        down, up = _need(path, t, "lora_down.weight", "lora_up.weight")
        if down.shape[1] != linear.in_features or up.shape[0] != linear.out_features or up.shape[1] != down.shape[0]:
            raise ValueError(f"{path}: LoRA shapes {list(down.shape)}/{list(up.shape)} do not fit Linear "
                             f"{linear.in_features}->{linear.out_features}")  # fmt: skip
        return LoRAModule(path, linear.in_features, linear.out_features, down.shape[0], **opts)
    if kind == "loha":
        w1a, w1b, w2a, w2b = _need(path, t, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        want = [(linear.out_features, w1b.shape[0]), (w1b.shape[0], linear.in_features)] * 2
        if [tuple(x.shape) for x in (w1a, w1b, w2a, w2b)] != want:
            raise ValueError(f"{path}: LoHa shapes {[list(x.shape) for x in (w1a, w1b, w2a, w2b)]} do not fit "
                             f"Linear {linear.in_features}->{linear.out_features}")  # fmt: skip
        return LoHaModule(path, linear.in_features, linear.out_features, w1b.shape[0], **opts)
    return _lokr_from_tensors(path, linear, t, opts)


def modules_from_canonical(
    dit: nn.Module,
    sd: Mapping[str, torch.Tensor],
    multiplier: float = 1.0,
    dtype: torch.dtype = torch.float32,
    origins: Mapping[str, str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """(path, adapter) pairs holding the canonical tensors of ``sd``, each checked against ``dit``.  Every key is
    used, or :class:`AdapterKeyError` names the first one that cannot be (as stored in the file: ``origins`` maps
    canonical keys to file keys) -- before anything is attached or merged."""
    dit = unwrap(dit)
    out: list[tuple[str, nn.Module]] = []
    for path, tensors in group_by_module(sd).items():
        try:
            out.extend(_modules_for_path(dit, path, tensors, multiplier, dtype))
        except ValueError as exc:
            key = f"{path}.{next((s for s in tensors if s != 'alpha'), 'alpha')}"  # name a weight, not alpha
            raise AdapterKeyError((origins or {}).get(key, key), str(exc)) from None
    return out


def _modules_for_path(dit: nn.Module, path: str, tensors: Mapping[str, torch.Tensor], multiplier: float, dtype):
    out: list[tuple[str, nn.Module]] = []
    kind = _weight_kind(path, tensors)
    if kind is not None:
        opts = dict(multiplier=multiplier, dtype=dtype)
        module = _adapter_from_tensors(path, get_linear(dit, path), kind, tensors, opts)
        _load_tensors(path, module, tensors, skip=("diff", "diff_b"))
        out.append((path, module))
    elif "alpha" in tensors:
        raise ValueError(f"{path}.alpha has no adapter tensors beside it")
    for suffix in ("diff", "diff_b"):
        if suffix in tensors:
            diff = TensorDiff(path, suffix, tuple(tensors[suffix].shape), multiplier, dtype)
            diff.check_target(dit, path)
            _load_tensors(path, diff, {suffix: tensors[suffix]})
            out.append((path, diff))
    return out


@torch.no_grad()
def _load_tensors(path: str, module: nn.Module, tensors: Mapping[str, torch.Tensor], skip: Sequence[str] = ()) -> None:
    own = module.state_dict()
    extra = sorted(set(tensors) - set(own) - set(skip))
    if extra:
        raise ValueError(f"{path}.{extra[0]} cannot be applied together with the module's other tensors {sorted(own)}")
    for key, dst in own.items():
        src = tensors.get(key)
        if src is None:
            continue
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{path}.{key}: shape {list(src.shape)} does not fit (expected {list(dst.shape)})")
        if key == "alpha":
            module.set_alpha(float(src))
        else:
            module.get_parameter(key).copy_(src)
