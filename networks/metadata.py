"""Safetensors header metadata of adapter files: our ``k5_*`` keys, kohya's ``ss_*`` / ``sshs_*`` keys, SAI
``modelspec.*`` keys and diffusers' ``lora_adapter_metadata`` (a PEFT LoraConfig as JSON).  Depends on torch only.

All values are strings (non-strings are JSON-encoded).  kohya's hashes are computed exactly as sd-scripts /
musubi-tuner (``precalculate_safetensors_hashes``): the tensors are serialised with only the ``ss_*`` metadata;
``sshs_model_hash`` is the sha256 of everything after the header, ``sshs_legacy_hash`` the first 8 hex digits of
the sha256 of the 64 KiB at offset 1 MiB of that serialisation.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Mapping

import torch

from networks.formats import LORA_SUFFIXES, group_by_module

__all__ = [
    "format_metadata",
    "folded_alphas_from_metadata",
    "infer_module_ranks",
    "kohya_hashes",
    "modelspec_metadata",
    "lora_adapter_metadata",
]

MODELSPEC_ARCH = "Kandinsky-5"
MODELSPEC_IMPL = "https://github.com/kandinskylab/kandinsky-5"


def infer_module_ranks(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """{path: (rank, alpha)} of the low-rank modules of a canonical state dict (full deltas are skipped)."""
    out = {}
    for path, t in group_by_module(sd).items():
        if "alpha" not in t:
            continue
        if "lora_down.weight" in t:
            rank = t["lora_down.weight"].shape[0]
        elif "hada_w1_b" in t:
            rank = t["hada_w1_b"].shape[0]
        else:
            rank = next((t[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in t), 0)
        out[path] = (rank, float(t["alpha"]))
    return out


def _uniform_or_map(values: Mapping[str, float]) -> str:
    distinct = set(values.values())
    return json.dumps(distinct.pop() if len(distinct) == 1 else dict(values))


def _single_or_dynamic(values) -> str:
    distinct = set(values)
    return str(distinct.pop()) if len(distinct) == 1 else "Dynamic"


def lora_adapter_metadata(sd: Mapping[str, torch.Tensor], folded: bool) -> str | None:
    """diffusers' header entry for a LoRA-only canonical ``sd``: the LoraConfig as diffusers' pipeline
    ``save_lora_weights`` writes it (keys prefixed ``transformer.``).  ``folded``: alpha is folded into lora_B
    (lora_alpha = r).  None when the file holds other adapter kinds (PEFT has no LoraConfig for them)."""
    groups = group_by_module(sd)
    if not groups or any(set(t) - {*LORA_SUFFIXES, "alpha"} for t in groups.values()):
        return None
    ranks = {p: t["lora_down.weight"].shape[0] for p, t in groups.items()}
    alphas = {p: float(ranks[p]) if folded else float(t["alpha"]) for p, t in groups.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(groups), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
    }  # fmt: skip
    return json.dumps({f"transformer.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)


def format_metadata(sd: Mapping[str, torch.Tensor], fmt: str, metadata: Mapping[str, object] | None = None) -> dict:
    """The safetensors header for a canonical ``sd`` written as ``fmt``: all values strings (non-strings JSON).

    Adds ``k5_format``, kohya's ``ss_network_dim`` / ``ss_network_alpha`` ("Dynamic" when modules differ),
    ``lora_adapter_metadata`` (LoRA files) and, for ``diffusers``, ``k5_alpha_folded`` / ``k5_alphas`` (the alpha
    folded into lora_B, to unfold on load).
    """
    ranks = infer_module_ranks(sd)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    alphas = {p: a for p, (_, a) in ranks.items()}
    meta["k5_format"] = fmt
    if ranks:
        meta["ss_network_dim"] = _single_or_dynamic(r for r, _ in ranks.values())
        meta["ss_network_alpha"] = _single_or_dynamic(alphas.values())
    peft = lora_adapter_metadata(sd, folded=fmt == "diffusers")
    if peft is not None:
        meta["lora_adapter_metadata"] = peft
    if fmt == "diffusers":
        meta["k5_alpha_folded"] = "true"
        meta["k5_alphas"] = _uniform_or_map(alphas)
    return meta


def folded_alphas_from_metadata(metadata: Mapping[str, str]) -> dict[str, float] | float | None:
    """The ``folded_alphas`` argument of ``to_canonical`` for a file written with ``format_metadata``."""
    if metadata.get("k5_alpha_folded") != "true" or "k5_alphas" not in metadata:
        return None
    return json.loads(metadata["k5_alphas"])


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of the tensors as sd-scripts / musubi-tuner compute them."""
    from safetensors.torch import save

    data = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def modelspec_metadata(
    title: str,
    timestamp: float,
    resolution: tuple[int, int],
    adapter_kind: str = "lora",
    timestep_range: tuple[float, float] | None = None,
    **optional: str | None,
) -> dict[str, str]:
    """SAI ModelSpec 1.0 keys: architecture ``Kandinsky-5/lora`` (``/lycoris`` for LoHa/LoKr, as musubi names K5),
    implementation (the official repo), title, ISO date, resolution ``WxH``, prediction type ``flow`` (velocity of
    rectified flow) and, when given, the timestep range and ``author`` / ``description`` / ``license`` / ``tags``
    / ``architecture`` (overrides the default)."""
    arch = optional.pop("architecture", None) or f"{MODELSPEC_ARCH}/{'lora' if adapter_kind == 'lora' else 'lycoris'}"
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": MODELSPEC_IMPL,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "flow",
    }
    if timestep_range is not None:
        meta["modelspec.timestep_range"] = f"{timestep_range[0]:g},{timestep_range[1]:g}"
    meta.update({f"modelspec.{k}": v for k, v in optional.items() if v is not None})
    return meta
