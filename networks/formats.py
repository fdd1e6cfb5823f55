"""Adapter file key formats: canonical state dict <-> the key styles of ComfyUI, musubi/kohya, diffusers/PEFT and
LyCORIS, and the PEFT ``LoraConfig`` that diffusers (``lora_adapter_metadata``) and the official repo
(``config_lora.json``) keep beside the weights.  Depends on torch only.

Canonical state dict (the in-memory naming every file format converts to): ``<module path>.<suffix>`` where
``<module path>`` is the dotted path inside the DiT (``visual_transformer_blocks.3.self_attention.to_key``) and
``<suffix>`` one of :data:`SUFFIXES` -- LoRA ``lora_down.weight`` (r, in), ``lora_up.weight`` (out, r); LoHa
``hada_w{1,2}_{a,b}``; LoKr ``lokr_w{1,2}`` or ``lokr_w{1,2}_{a,b}``; full deltas ``diff`` / ``diff_b``; and
``alpha`` (0-d float32, every low-rank module has one after :func:`to_canonical`).

=========  =========================================================  =============================================
name       keys per module                                            alpha
=========  =========================================================  =============================================
comfyui    ``diffusion_model.<path>.<suffix>``                        stored
musubi     ``lora_unet_<path with . -> _>.<suffix>``                  stored
diffusers  ``transformer.<path>.{lora_A,lora_B}.weight`` (PEFT)       folded into lora_B (scale 1); the original
                                                                      alpha kept in the header (``k5_alphas``)
=========  =========================================================  =============================================

Read as well: bare ``<path>.<suffix>`` and ``lycoris_<mangled>`` names; PEFT keys with ``base_model.model.``,
``diffusion_model.`` or no prefix, ``.default`` adapter names, ``lora.up/down``, ``lora_linear_layer.up/down`` and
bare ``lora_A``/``lora_B``.  PEFT alpha comes from ``.alpha`` keys, from our ``k5_alphas`` (unfolded), from a
LoraConfig (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``) or is ``r`` (scale 1).
Keys that cannot be applied (DoRA ``dora_scale``, conv Tucker cores, PEFT ``lora_B.bias``, anything unknown) are
errors naming the key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "FORMATS",
    "SUFFIXES",
    "from_canonical",
    "to_canonical",
    "unmangle_kohya",
    "module_paths",
    "group_by_module",
    "peft_scale",
    "peft_config_from_metadata",
    "peft_target_matches",
]

FORMATS = ("comfyui", "diffusers", "musubi")
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
SUFFIXES = (*LORA_SUFFIXES, *LOHA_SUFFIXES, *LOKR_SUFFIXES, "diff", "diff_b", "alpha")
_PEFT_SUFFIXES = {  # file suffix -> canonical (ComfyUI's LoRA adapter reads the same set)
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_A": "lora_down.weight", "lora_B": "lora_up.weight",
}  # fmt: skip
_UNSUPPORTED = {
    "dora_scale": "DoRA files are not supported (the magnitude vector needs the base weight); merge it elsewhere",
    "lora_mid.weight": "LoCon/Tucker mid weights are for convolutions; the Kandinsky 5 DiT has only Linear layers",
    "hada_t1": "LoHa Tucker cores are for convolutions; the Kandinsky 5 DiT has only Linear layers",
    "hada_t2": "LoHa Tucker cores are for convolutions; the Kandinsky 5 DiT has only Linear layers",
    "lokr_t2": "LoKr Tucker cores are for convolutions; the Kandinsky 5 DiT has only Linear layers",
    "lora_B.bias": "PEFT lora_bias is not supported",
    "reshape_weight": "reshape_weight (padded weights) is not supported",
    "set_weight": "set_weight (weight replacement) is not supported",
    "w_norm": "w_norm/b_norm patches are not supported",
    "b_norm": "w_norm/b_norm patches are not supported",
}
_CANONICAL_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)
_ALL_SUFFIXES = sorted({*SUFFIXES, *_PEFT_SUFFIXES, *_UNSUPPORTED}, key=len, reverse=True)
_PREFIXES = (("base_model.model.", "peft"), ("diffusion_model.", "comfyui"), ("transformer.", "transformer"),
             ("lora_unet_", "musubi"), ("lycoris_", "lycoris"))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# key parsing
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
        raise ValueError(f"cannot map kohya/LyCORIS name {mangled!r} onto the model's module names")
    return ".".join(parts)


def _split_key(key: str) -> tuple[str, str, str]:
    """``key`` -> (prefix kind, module part without prefix, file suffix); ValueError naming the key."""
    suffix = next((s for s in _ALL_SUFFIXES if key.endswith("." + s)), None)
    if suffix is None:
        raise ValueError(f"unrecognised adapter key {key!r} (not a LoRA, LoHa, LoKr, diff or diff_b tensor)")
    if suffix in _UNSUPPORTED:
        raise ValueError(f"adapter key {key!r} cannot be applied: {_UNSUPPORTED[suffix]}")
    module = key[: -len(suffix) - 1]
    for prefix, kind in _PREFIXES:
        if module.startswith(prefix):
            return kind, module[len(prefix) :], suffix
    return "bare", module, suffix


def _format_of(kind: str, suffix: str) -> str:
    if suffix in _PEFT_SUFFIXES:
        return "diffusers"
    return {"comfyui": "comfyui", "musubi": "musubi", "lycoris": "lycoris"}.get(kind, "canonical")


def to_canonical(
    sd: Mapping[str, torch.Tensor],
    segments: Sequence[str] = (),
    folded_alphas: Mapping[str, float] | float | None = None,
    peft_config: Mapping[str, object] | None = None,
    origins: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported file's keys -> (canonical state dict, detected format).

    ``segments``: the model's module-name vocabulary, needed for ``lora_unet_`` / ``lycoris_`` names.
    ``folded_alphas``: for PEFT files written by ``save_lora`` (alpha folded into lora_B), the original alpha (one
    value or per path), used to unfold so a round trip restores the trained parameters.  ``peft_config``: the
    LoraConfig dict of a PEFT file (scale per module).  ``origins`` (filled in): canonical key -> file key.
    A file mixes no key styles.
    """
    parsed, kinds = [], set()
    for key, t in sd.items():
        kind, module, suffix = _split_key(key)
        if suffix != "alpha":
            kinds.add(_format_of(kind, suffix))
        parsed.append((key, kind, module, suffix, t))
    if len(kinds) != 1:
        raise ValueError(f"adapter file mixes key formats {sorted(kinds)} (or is empty); convert it to one format")
    fmt = kinds.pop()
    out: dict[str, torch.Tensor] = {}
    for key, kind, module, suffix, t in parsed:
        path = unmangle_kohya(module, segments) if kind in ("musubi", "lycoris") else module
        canonical = f"{path}.{_PEFT_SUFFIXES.get(suffix, suffix)}"
        if canonical in out:
            raise ValueError(f"adapter key {key!r} duplicates another key of the file (both are {canonical})")
        out[canonical] = t
        if origins is not None:
            origins[canonical] = key
    _fill_alphas(out, fmt, folded_alphas, peft_config)
    return out, fmt


def _fill_alphas(out: dict[str, torch.Tensor], fmt: str, folded_alphas, peft_config) -> None:
    """Every low-rank module gets a 0-d fp32 ``alpha``: stored, unfolded, from the PEFT config, or its divisor."""
    groups = group_by_module(out)
    for path, tensors in groups.items():
        rank = _alpha_divisor(tensors)
        if rank is None:  # full deltas only (or a lone alpha, which building the network reports)
            continue
        if "alpha" in tensors:
            alpha = float(tensors["alpha"])
        elif fmt == "diffusers":
            alpha = _peft_alpha(out, path, rank, folded_alphas, peft_config)
        else:
            alpha = float(rank)
        out[f"{path}.alpha"] = torch.tensor(alpha, dtype=torch.float32)


def _alpha_divisor(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank that alpha is divided by, as ComfyUI reads the file (None: no divisor / not low-rank)."""
    if "lora_down.weight" in tensors:
        return tensors["lora_down.weight"].shape[0]
    if "hada_w1_b" in tensors:
        return tensors["hada_w1_b"].shape[0]
    if "lokr_w2_b" in tensors:
        return tensors["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in tensors:
        return tensors["lokr_w1_b"].shape[0]
    return 1 if any(s in tensors for s in ("lokr_w1", "lokr_w2")) else None


def _peft_alpha(out, path: str, rank: int, folded_alphas, peft_config) -> float:
    original = folded_alphas.get(path) if isinstance(folded_alphas, Mapping) else folded_alphas
    if original is not None:  # undo save_lora's folding of alpha/rank into lora_B
        up = out[f"{path}.lora_up.weight"]
        out[f"{path}.lora_up.weight"] = (up.float() / (float(original) / rank)).to(up.dtype)
        return float(original)
    if peft_config is not None:
        return peft_scale(peft_config, path, rank) * rank
    return float(rank)


def group_by_module(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Canonical state dict -> {module path: {suffix: tensor}} (paths in first-seen order)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        suffix = next((s for s in _CANONICAL_BY_LENGTH if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"not a canonical adapter key: {key!r}")
        groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = t
    return groups


def module_paths(sd: Mapping[str, torch.Tensor]) -> list[str]:
    return list(group_by_module(sd))


def from_canonical(sd: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Canonical -> file keys.  ``diffusers`` folds alpha/rank into lora_B (so every PEFT loader gets scale 1) and
    holds LoRA tensors only; LoHa, LoKr and full deltas need ``comfyui`` or ``musubi``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown adapter format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = {}
    for path, tensors in group_by_module(sd).items():
        if fmt == "diffusers":
            out.update(_to_peft(path, tensors))
            continue
        name = "lora_unet_" + path.replace(".", "_") if fmt == "musubi" else "diffusion_model." + path
        out.update({f"{name}.{suffix}": t for suffix, t in tensors.items()})
    return out


def _to_peft(path: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    other = sorted(set(tensors) - {*LORA_SUFFIXES, "alpha"})
    if other:
        raise ValueError(
            f"{path}: the diffusers (PEFT) format holds LoRA tensors only, not {other}; use --format comfyui or musubi"
        )
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    scale = float(tensors["alpha"]) / down.shape[0]
    return {
        f"transformer.{path}.lora_A.weight": down,
        f"transformer.{path}.lora_B.weight": (up.float() * scale).to(up.dtype),
    }


# ----------------------------------------------------------------------------------------------------------------
# PEFT LoraConfig (diffusers lora_adapter_metadata, official config_lora.json)
# ----------------------------------------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, object], path: str):
    """PEFT's rule (``peft.utils.other.get_pattern_key``): the first key with ``(.*\\.)?(key)$`` matching the path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def peft_scale(config: Mapping[str, object], path: str, rank: int) -> float:
    """The scale PEFT's LoraLayer uses for module ``path`` of rank ``rank``: ``alpha / r`` (rsLoRA: ``/ sqrt(r)``)."""
    if config.get("use_dora"):
        raise ValueError("the LoraConfig has use_dora = true; DoRA files are not supported")
    pattern_r = _pattern_value(config.get("rank_pattern") or {}, path)
    r = int(pattern_r if pattern_r is not None else config.get("r", 8))
    if r != rank:
        raise ValueError(f"{path}: the LoraConfig says rank {r}, the tensors have rank {rank}")
    pattern_a = _pattern_value(config.get("alpha_pattern") or {}, path)
    alpha = float(pattern_a if pattern_a is not None else config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def peft_target_matches(config: Mapping[str, object], path: str) -> bool:
    """PEFT ``target_modules``: a string is a regex that must fullmatch the path, a list holds names that equal the
    path or end it after a dot; ``exclude_modules`` likewise; None or "all-linear" targets every Linear."""
    if _peft_match(config.get("exclude_modules"), path, default=False):
        return False
    targets = config.get("target_modules")
    return targets in (None, "all-linear") or _peft_match(targets, path, default=False)


def _peft_match(targets, path: str, default: bool) -> bool:
    if targets is None:
        return default
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def peft_config_from_metadata(metadata: Mapping[str, str]) -> dict | None:
    """The LoraConfig dict in a safetensors header's ``lora_adapter_metadata`` (diffusers), or None.

    diffusers' pipeline ``save_lora_weights`` prefixes the keys with ``transformer.``; the model-level
    ``save_lora_adapter`` does not.  Both are read.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"lora_adapter_metadata is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError("lora_adapter_metadata is not a JSON object")
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or config
