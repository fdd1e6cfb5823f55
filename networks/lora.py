"""Generic LoRA for ``nn.Linear`` layers: injection by module-path regex, merge into weights, LoRA key formats.

Depends on torch only; the Kandinsky-5 defaults (targets, key vocabulary, metadata) live in
``networks.lora_kandinsky``.

Maths (per target Linear ``W: in -> out``, rank r, alpha a, multiplier m)::

    y = base(x) + m * (a / r) * up(down(x))       down: (r, in) Kaiming-uniform, up: (out, r) zeros
    merged:  W <- W + m * (a / r) * up @ down     (computed in fp32)

Computed as ``addmm(base(x), down(x), up.T, alpha=m * a / r)``: one GEMM accumulates the branch into the base
output (no full-size temporary, no separate add).  Modules that read one input (q/k/v of an attention) share one
down-projection matmul (:class:`SharedDown`).  Both only change how the same sum is evaluated; weights, state-dict
keys and files are per module as before (``networks.lora_fast``).

Injection wraps the *module's forward* (``base.forward`` is replaced by ``LoRAModule.forward``, which calls the
original bound forward first), so whatever the base layer does -- a plain Linear, an fp8 Linear that dequantises
its weight, a layer with hooks -- still runs unchanged.  ``remove()`` restores the original forwards.  Apply LoRA
*after* any pass that replaces Linear objects (fp8 conversion), since such a pass drops the wrapper, and before
``torch.compile`` (a compiled graph would not see the new forwards).

fp8 merge protocol (duck-typed): a base module with ``dequantized_weight() -> float Tensor (out, in)`` and
``set_weight(weight: float Tensor)`` (re-quantises with fresh scales) is merged as dequantise -> add -> re-quantise,
so block scales are honoured (musubi defect #7).  Otherwise ``weight`` is updated in place in its own dtype.

Canonical state dict (the in-memory naming every file format converts to)::

    <module path>.lora_down.weight   (r, in)
    <module path>.lora_up.weight     (out, r)
    <module path>.alpha              0-d float32

where ``<module path>`` is the dotted path inside the model, e.g. ``visual_transformer_blocks.3.self_attention.to_key``.

File formats (``from_canonical`` / ``to_canonical``; the file I/O is in ``networks.lora_kandinsky``):

=========  ==============================================================  ====================================
name       keys per module                                                 alpha
=========  ==============================================================  ====================================
comfyui    ``diffusion_model.<path>.{lora_down.weight,lora_up.weight,alpha}``  stored
musubi     ``lora_unet_<path with . -> _>.{lora_down.weight,lora_up.weight,alpha}``  stored
diffusers  ``transformer.<path>.{lora_A.weight,lora_B.weight}`` (PEFT)      folded into lora_B (scale 1), the
                                                                           original alpha kept in metadata
=========  ==============================================================  ====================================

Loading also accepts PEFT keys with ``base_model.model.`` or no prefix, ``.default`` adapter names, and the
bare canonical keys and ``diffusion_model.``-prefixed PEFT keys.  ``format_metadata`` builds the safetensors header
(``__metadata__``, all values strings).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from networks.lora_fast import SharedDown, add_up_projection, group_shared_inputs

__all__ = [
    "DEFAULT_TOKEN",
    "FORMATS",
    "LoRAModule",
    "LoRANetwork",
    "SharedDown",
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
FORMATS = ("comfyui", "diffusers", "musubi")
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
_PREFIX = {"comfyui": "diffusion_model.", "diffusers": "transformer.", "musubi": "lora_unet_"}


# ----------------------------------------------------------------------------------------------------------------
# one LoRA branch
# ----------------------------------------------------------------------------------------------------------------


class LoRAModule(nn.Module):
    """The low-rank branch for one Linear.  Parameters ``lora_down``/``lora_up`` (fp32 by default), buffer ``alpha``.

    Forward (installed as the base module's ``forward``): ``base(x) + m * scale * up(dropout(down(x)))``.  The branch
    runs in the input's dtype (fp32 parameters are cast; under autocast the matmuls follow autocast) and is added
    in the base output's dtype.  Training-only regularisers (they follow this module's own train()/eval() flag, so
    set it on the network): ``dropout`` on the rank activations, ``rank_dropout`` (a per-sample mask over the rank
    dimension, rescaled by 1/(1-p)), ``module_dropout`` (skip the whole branch).
    """

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
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank} for {name}")
        self.lora_name = name
        self.rank = rank
        self.lora_down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.lora_up = nn.Linear(rank, out_features, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32))
        self.set_alpha(alpha)
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self._attached: tuple[nn.Module, object, bool] | None = None  # (base, original forward, was instance attr)
        self._shared: SharedDown | None = None  # set by LoRANetwork.apply_to for q/k/v-style input groups
        self._shared_index = 0  # position in self._shared.members

    @property
    def scale(self) -> float:
        """alpha / rank, cached as a Python float (reading the buffer would sync the GPU on every forward)."""
        return self._scale

    @torch.no_grad()
    def set_alpha(self, alpha: float | None) -> None:
        """Set alpha (None or 0 means alpha = rank, as kohya)."""
        alpha = float(self.rank) if alpha is None or alpha == 0 else float(alpha)
        self.alpha.fill_(alpha)
        self._scale = alpha / self.rank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = float(self.alpha) / self.rank  # keep the cache in step with nn.Module.load_state_dict

    # -- injection -------------------------------------------------------------------------------------------

    def attach(self, base: nn.Module) -> None:
        """Replace ``base.forward`` by this module's forward (which calls the original first)."""
        if self._attached is not None:
            raise RuntimeError(f"LoRA {self.lora_name} is already attached")
        had_instance_forward = "forward" in base.__dict__
        self._attached = (base, base.forward, had_instance_forward)
        base.forward = self.forward

    def detach(self) -> None:
        """Restore the base module's original forward."""
        if self._attached is None:
            return
        base, original, had_instance_forward = self._attached
        if base.__dict__.get("forward") != self.forward:
            raise RuntimeError(f"{self.lora_name}: forward was re-wrapped after LoRA; remove the outer wrapper first")
        if had_instance_forward:
            base.forward = original
        else:
            del base.forward
        self._attached = None

    def is_attached_to(self, module: nn.Module) -> bool:
        return self._attached is not None and self._attached[0] is module

    # -- maths -----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._attached is None:
            raise RuntimeError(f"LoRA {self.lora_name} is not attached to a module")
        y = self._attached[1](x, *args, **kwargs)
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


class LoRANetwork(nn.Module):
    """A set of ``LoRAModule`` for one model.  Built from the model (for names and shapes), applied explicitly.

    Targets come from ``select_targets(dit, include, exclude, default_include)`` with one ``rank``/``alpha``, or
    -- when ``module_ranks`` ({path: (rank, alpha)}) is given, e.g. from a file -- exactly those modules.
    ``parameters()`` are the LoRA weights only; ``lora_state_dict()`` uses the canonical names.
    ``shared_input_key(path)``: modules with the same (non-None) key read the same input tensor in the model's
    forward (e.g. q/k/v of one attention); ``apply_to`` fuses their down-projections (:class:`SharedDown`).
    Parameters and files are per module either way.
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
        shared_input_key: Callable[[str], str | None] | None = None,
    ):
        super().__init__()
        dit = _unwrap(dit)
        self.shared_input_key = shared_input_key
        if module_ranks is None:
            names = select_targets(dit, include, exclude, default_include)
            module_ranks = {n: (rank, alpha) for n in names}
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.names: list[str] = []
        self.lora_modules = nn.ModuleList()
        opts = dict(multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
        for name, (r, a) in module_ranks.items():
            base = _linear(dit, name)
            lora = LoRAModule(name, base.in_features, base.out_features, r, a, dtype=dtype, **opts)
            self.names.append(name)
            self.lora_modules.append(lora)
        self._index = {n: i for i, n in enumerate(self.names)}

    def __getitem__(self, name: str) -> LoRAModule:
        return self.lora_modules[self._index[name]]

    def __len__(self) -> int:
        return len(self.names)

    def items(self) -> Iterable[tuple[str, LoRAModule]]:
        return zip(self.names, self.lora_modules)

    # -- injection / multiplier ------------------------------------------------------------------------------

    def apply_to(self, dit: nn.Module) -> None:
        """Wrap the forward of each target module of ``dit`` (looked up by path, so any copy of the model works)."""
        dit = _unwrap(dit)
        for name, lora in self.items():
            base = _linear(dit, name)
            if (base.in_features, base.out_features) != (lora.lora_down.in_features, lora.lora_up.out_features):
                raise ValueError(f"LoRA {name} shape does not match the model's Linear {tuple(base.weight.shape)}")
            lora.attach(base)
        if self.shared_input_key is not None:
            group_shared_inputs(list(self.items()), self.shared_input_key)

    def remove(self) -> None:
        """Restore every original forward (reverse order, so nested wrappers unwind cleanly)."""
        for lora in reversed(self.lora_modules):
            lora.detach()
            lora._shared = None

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.lora_modules:
            lora.multiplier = multiplier

    # -- weights ---------------------------------------------------------------------------------------------

    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Canonical state dict (detached copies; ``dtype`` casts up/down weights, alpha stays fp32)."""
        sd = {}
        for name, lora in self.items():
            for suffix, t in (("lora_down.weight", lora.lora_down.weight), ("lora_up.weight", lora.lora_up.weight)):
                sd[f"{name}.{suffix}"] = t.detach().to(dtype or t.dtype).clone()
            sd[f"{name}.alpha"] = lora.alpha.detach().float().clone()
        return sd

    @torch.no_grad()
    def load_lora_state_dict(self, sd: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy canonical weights in (alpha from the file replaces ours).  strict: key sets must be equal."""
        expected = {f"{n}.{s}" for n in self.names for s in SUFFIXES}
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if strict and (missing or unexpected):
            raise ValueError(f"LoRA weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, lora in self.items():
            for suffix, dst in (("lora_down.weight", lora.lora_down.weight), ("lora_up.weight", lora.lora_up.weight)):
                src = sd.get(f"{name}.{suffix}")
                if src is not None:
                    if src.shape != dst.shape:
                        raise ValueError(f"{name}.{suffix}: file shape {tuple(src.shape)} != {tuple(dst.shape)}")
                    dst.copy_(src)
            if f"{name}.alpha" in sd:
                lora.set_alpha(float(sd[f"{name}.alpha"]))

    @torch.no_grad()
    def merge_into(self, dit: nn.Module, multiplier: float | None = None) -> None:
        """``W += m * scale * up @ down`` for every target of ``dit`` (fp8 layers: dequantise, add, re-quantise)."""
        dit = _unwrap(dit)
        for name, lora in self.items():
            base = _linear(dit, name)
            if lora.is_attached_to(base):
                raise RuntimeError(f"{name}: LoRA is applied to this model; call remove() before merging")
            _merge_weight(base, lora.delta_weight(multiplier))

    def summary(self) -> str:
        ranks = sorted({lora.rank for lora in self.lora_modules})
        alphas = sorted({float(lora.alpha) for lora in self.lora_modules})
        params = sum(p.numel() for p in self.parameters())
        return f"LoRA: {len(self)} modules, rank {ranks}, alpha {alphas}, {params / 1e6:.2f} M parameters"


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile's wrapper."""
    return getattr(model, "_orig_mod", model)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"LoRA target {name!r} does not exist in the model") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not a Linear")
    return module


def _merge_weight(base: nn.Module, delta: torch.Tensor) -> None:
    if hasattr(base, "dequantized_weight") and hasattr(base, "set_weight"):
        weight = base.dequantized_weight().float()
        base.set_weight(weight + delta.to(weight.device))
        return
    w = base.weight
    w.copy_((w.float() + delta.to(w.device)).to(w.dtype))


# ----------------------------------------------------------------------------------------------------------------
# key formats
# ----------------------------------------------------------------------------------------------------------------


def unmangle_kohya(mangled: str, segments: Sequence[str]) -> str:
    """``visual_transformer_blocks_3_self_attention_to_key`` -> dotted path, using the model's name segments.

    Underscores are ambiguous, so the string is split into known segments (or integers) by backtracking search.
    """
    ordered = sorted(set(segments), key=len, reverse=True)

    def split(pos: int) -> list[str] | None:
        if pos == len(mangled):
            return []
        digits = re.match(r"\d+", mangled[pos:])
        options = ([digits.group()] if digits else []) + [s for s in ordered if mangled.startswith(s, pos)]
        for tok in options:
            end = pos + len(tok)
            if end == len(mangled):
                return [tok]
            if mangled[end] == "_":
                rest = split(end + 1)
                if rest is not None:
                    return [tok, *rest]
        return None

    parts = split(0)
    if parts is None:
        raise ValueError(f"cannot map kohya LoRA name {mangled!r} onto the model's module names")
    return ".".join(parts)


_PEFT_PREFIX = r"^(?:base_model\.model\.|transformer\.|diffusion_model\.)?"
_PEFT_KEY = re.compile(_PEFT_PREFIX + r"(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_PEFT_ALPHA = re.compile(_PEFT_PREFIX + r"(?P<path>.+)\.alpha$")
_DOWN_UP_KEY = re.compile(r"^(?P<module>.+?)\.(?P<suffix>lora_down\.weight|lora_up\.weight|alpha)$")


def from_canonical(sd: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Canonical -> file keys.  ``diffusers`` folds alpha/rank into lora_B (so every PEFT loader gets scale 1)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = {}
    for path in _module_paths(sd):
        down, up, alpha = (sd[f"{path}.{s}"] for s in SUFFIXES)
        if fmt == "diffusers":
            scale = float(alpha) / down.shape[0]
            out[f"transformer.{path}.lora_A.weight"] = down
            out[f"transformer.{path}.lora_B.weight"] = (up.float() * scale).to(up.dtype)
            continue
        name = _PREFIX["musubi"] + path.replace(".", "_") if fmt == "musubi" else _PREFIX["comfyui"] + path
        out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha})
    return out


def _module_paths(sd: Mapping[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")]


def _key_format(key: str) -> str:
    if ".lora_A." in key or ".lora_B." in key:
        return "diffusers"
    if key.startswith("lora_unet_"):
        return "musubi"
    return "comfyui" if key.startswith("diffusion_model.") else "canonical"


def _detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """One format per file; PEFT files may carry ``.alpha`` keys next to lora_A/lora_B."""
    kinds = {_key_format(k) for k in sd if not k.endswith(".alpha")}
    if len(kinds) != 1:
        raise ValueError(f"LoRA file mixes key formats {sorted(kinds)} (or is empty); convert it to one format")
    return kinds.pop()


def to_canonical(
    sd: Mapping[str, torch.Tensor],
    segments: Sequence[str] = (),
    folded_alphas: Mapping[str, float] | float | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported file's keys -> (canonical state dict, detected format).

    ``segments``: the model's module-name vocabulary, needed for kohya ``lora_unet_`` names.  ``folded_alphas``:
    for PEFT files written by ``save_lora`` (alpha folded into lora_B), the original alpha (one value or per
    path), used to unfold so a round trip restores the trained parameters; PEFT files without it get alpha = rank.
    """
    fmt = _detect_format(sd)
    if fmt == "diffusers":
        return _canonical_from_peft(sd, folded_alphas), fmt
    out = {}
    for key, t in sd.items():
        m = _DOWN_UP_KEY.match(key)
        if m is None:
            raise ValueError(f"unrecognised LoRA key {key!r} (expected lora_down/lora_up/alpha or PEFT lora_A/lora_B)")
        module = m.group("module")
        if fmt == "musubi":
            module = unmangle_kohya(module.removeprefix("lora_unet_"), segments)
        elif fmt == "comfyui":
            module = module.removeprefix("diffusion_model.")
        out[f"{module}.{m.group('suffix')}"] = t
    for path in _module_paths(out):
        out.setdefault(f"{path}.alpha", torch.tensor(float(out[f"{path}.lora_down.weight"].shape[0])))
        out[f"{path}.alpha"] = out[f"{path}.alpha"].float().reshape(())
    return out, fmt


def _canonical_from_peft(sd: Mapping[str, torch.Tensor], folded_alphas) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, t in sd.items():
        m, a = _PEFT_KEY.match(key), _PEFT_ALPHA.match(key)
        if m is not None:
            out[f"{m.group('path')}.{'lora_down' if m.group('ab') == 'A' else 'lora_up'}.weight"] = t
        elif a is not None:
            alphas[a.group("path")] = float(t)
        else:
            raise ValueError(f"unrecognised PEFT LoRA key {key!r}")
    for path in _module_paths(out):
        rank = out[f"{path}.lora_down.weight"].shape[0]
        alpha = alphas.get(path, float(rank))
        original = folded_alphas.get(path) if isinstance(folded_alphas, Mapping) else folded_alphas
        if original is not None and path not in alphas:  # undo save_lora's folding of alpha/rank into lora_B
            up = out[f"{path}.lora_up.weight"]
            out[f"{path}.lora_up.weight"] = (up.float() / (float(original) / rank)).to(up.dtype)
            alpha = float(original)
        out[f"{path}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def infer_module_ranks(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """{path: (rank, alpha)} from a canonical state dict."""
    return {p: (sd[f"{p}.lora_down.weight"].shape[0], float(sd[f"{p}.alpha"])) for p in _module_paths(sd)}


# ----------------------------------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------------------------------


def _uniform_or_map(values: Mapping[str, float]) -> str:
    distinct = set(values.values())
    return json.dumps(distinct.pop() if len(distinct) == 1 else dict(values))


def format_metadata(sd: Mapping[str, torch.Tensor], fmt: str, metadata: Mapping[str, object] | None = None) -> dict:
    """The safetensors header for a canonical ``sd`` written as ``fmt``: all values strings (non-strings JSON).

    Adds ``k5_format``, kohya's ``ss_network_dim`` / ``ss_network_alpha`` ("Dynamic" when modules differ) and, for
    ``diffusers``, ``k5_alpha_folded`` / ``k5_alphas`` (the alpha folded into lora_B, to unfold on load).
    """
    ranks = infer_module_ranks(sd)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    dims, alphas = {p: r for p, (r, _) in ranks.items()}, {p: a for p, (_, a) in ranks.items()}
    meta["k5_format"] = fmt
    meta["ss_network_dim"] = str(next(iter(dims.values()))) if len(set(dims.values())) == 1 else "Dynamic"
    meta["ss_network_alpha"] = str(next(iter(alphas.values()))) if len(set(alphas.values())) == 1 else "Dynamic"
    if fmt == "diffusers":
        meta["k5_alpha_folded"] = "true"
        meta["k5_alphas"] = _uniform_or_map(alphas)
    return meta


def folded_alphas_from_metadata(metadata: Mapping[str, str]) -> dict[str, float] | float | None:
    """The ``folded_alphas`` argument of ``to_canonical`` for a file written with ``format_metadata``."""
    if metadata.get("k5_alpha_folded") != "true" or "k5_alphas" not in metadata:
        return None
    return json.loads(metadata["k5_alphas"])
