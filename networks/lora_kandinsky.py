"""Kandinsky 5 adapters: default targets, musubi-style entry points, file I/O and a format converter CLI.

Used as ``--network_module networks.lora_kandinsky`` (LoRA), ``networks.loha_kandinsky`` (LoHa) or
``networks.lokr_kandinsky`` (LoKr) by the trainer (``create_network``) and by the generator
(``read_adapter`` + ``create_network_from_weights`` + ``LoRANetwork.merge_into``).  The maths and the key formats
are in ``networks.lora`` / ``networks.lycoris`` / ``networks.formats``; this module only knows the DiT's module
*names* (it never imports the DiT).

Default targets (as musubi): in every text block ``self_attention.{to_query,to_key,to_value,out_layer}`` and
``feed_forward.{in_layer,out_layer}`` (6 per block); in every visual block the same plus
``cross_attention.{to_query,to_key,to_value,out_layer}`` (10 per block) -> Lite 332, Pro 624 modules.  Not
targeted unless included: the modulation linears, the embeddings and ``out_layer``.

``network_args`` (the trainer parses ``--network_args key=value`` with ``ast.literal_eval``):

=====================  ================================================================================
``include_patterns``   list of regexes (fullmatch on the dotted module path); replaces the defaults, the
                       token ``"@default"`` keeps them: ``["@default", r".*_modulation\\.out_layer"]``
``exclude_patterns``   list of regexes removed from the selection
``rank_dropout``       float, per-sample dropout over the rank dimension (training only)
``module_dropout``     float, probability of skipping a module's branch per call (training only)
``dropout``            float, dropout on the rank activations (same as ``neuron_dropout`` / --network_dropout)
``factor``             LoKr only: int, the Kronecker factor (-1 = as square as possible)
``decompose_both``     LoKr only: bool, also factor the small matrix w1 with rank network_dim
``full_matrix``        LoKr only: bool, keep w2 a full matrix (no rank)
``loraplus_lr_ratio``  LoRA only: float > 0, LoRA+: the trainer gives ``lora_up`` ``ratio`` x the learning rate
``verbose``            bool, log every targeted module (as musubi)
=====================  ================================================================================

Files: ``save_lora`` writes ``diffusers`` keys (LoRA default: loads in ComfyUI, diffusers and the official repo),
``comfyui`` (LoHa/LoKr default) or ``musubi`` keys (see ``docs/lora_formats.md``); ``read_adapter`` reads those,
ComfyUI-trained files (``diff`` / ``diff_b``), LyCORIS LoHa/LoKr, diffusers files with ``lora_adapter_metadata``
and official-repo LoRAs (a directory, or a file with ``config_lora.json`` beside it).  Converter::

    python -m networks.lora_kandinsky convert IN.safetensors OUT.safetensors --format diffusers
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kandinsky5.common import UserError, get_logger, parse_dtype, run_cli
from kandinsky5.files import load_safetensors, read_json, save_safetensors
from networks.formats import (
    FORMATS,
    from_canonical,
    group_by_module,
    peft_config_from_metadata,
    peft_target_matches,
    to_canonical,
)
from networks.lora import LoRANetwork, adapter_factory, modules_from_canonical
from networks.metadata import folded_alphas_from_metadata, format_metadata, kohya_hashes, modelspec_metadata

__all__ = [
    "DEFAULT_INCLUDE_PATTERNS",
    "K5_SEGMENTS",
    "NETWORK_MODULE",
    "AdapterFile",
    "create_network",
    "build_network",
    "network_creator",
    "create_network_from_weights",
    "shared_input_key",
    "save_lora",
    "read_adapter",
    "load_lora_state_dict",
    "training_metadata",
    "modelspec_metadata",
    "main",
]

log = get_logger(__name__)

NETWORK_MODULE = "networks.lora_kandinsky"
OFFICIAL_CONFIG = "config_lora.json"  # the official repo's PEFT LoraConfig beside the weights
_BLOCKS = r"(?:text|visual)_transformer_blocks\.\d+"
DEFAULT_INCLUDE_PATTERNS: tuple[str, ...] = (
    _BLOCKS + r"\.(?:self_attention|cross_attention)\.(?:to_query|to_key|to_value|out_layer)",
    _BLOCKS + r"\.feed_forward\.(?:in_layer|out_layer)",
)
# Every name segment of a DiT module path (plus integers): turns kohya "lora_unet_a_b_c" names back into paths.
K5_SEGMENTS: tuple[str, ...] = (
    "text_transformer_blocks",
    "visual_transformer_blocks",
    "self_attention",
    "cross_attention",
    "feed_forward",
    "text_modulation",
    "visual_modulation",
    "modulation",
    "to_query",
    "to_key",
    "to_value",
    "query_norm",
    "key_norm",
    "out_layer",
    "in_layer",
    "norm",
    "time_embeddings",
    "text_embeddings",
    "pooled_text_embeddings",
    "visual_embeddings",
)
_COMMON_ARGS = ("include_patterns", "exclude_patterns", "rank_dropout", "module_dropout", "dropout", "verbose")
_KIND_ARGS = {"lora": ("loraplus_lr_ratio",), "loha": (), "lokr": ("factor", "decompose_both", "full_matrix")}
_NETWORK_ARGS = _COMMON_ARGS  # the LoRA module's keys (kept for callers that list them)
_MUSUBI_CALL_KWARGS = ("vae", "text_encoders", "text_encoder", "unet")  # accepted and ignored (musubi call shape)
# Linears that read the same input tensor in the DiT's forward (their LoRA down-projections run as one matmul):
# q/k/v of a self-attention read the modulated stream, k/v of a cross-attention read the text.
_SHARED_INPUT = re.compile(
    r"(?P<self>.+\.self_attention)\.(?:to_query|to_key|to_value)|(?P<cross>.+\.cross_attention)\.(?:to_key|to_value)"
)


def shared_input_key(path: str) -> str | None:
    """Group key of a DiT Linear whose input is shared with other Linears (``LoRANetwork(shared_input_key=...)``)."""
    m = _SHARED_INPUT.fullmatch(path)
    if m is None:
        return None
    return m.group("self") or f"{m.group('cross')}.context"


# ----------------------------------------------------------------------------------------------------------------
# musubi-style entry points
# ----------------------------------------------------------------------------------------------------------------


def _patterns(value: object, key: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"network_args {key} must be a list of regex strings, got {value!r}")


def _kind_args(kind: str, args: Mapping[str, object]) -> dict:
    out = {}
    if "factor" in args:
        factor = args["factor"]
        if not isinstance(factor, int) or isinstance(factor, bool) or factor == 0 or factor < -1:
            raise ValueError(f"network_args factor must be -1 or a positive int, got {factor!r}")
        out["factor"] = factor
    for key in ("decompose_both", "full_matrix"):
        if key in args:
            if not isinstance(args[key], bool):
                raise ValueError(f"network_args {key} must be True or False, got {args[key]!r}")
            out[key] = args[key]
    return out


def _parse_network_args(network_args: Mapping[str, object] | None, kind: str = "lora") -> dict:
    args = dict(network_args or {})
    valid = (*_COMMON_ARGS, *_KIND_ARGS[kind])
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"unknown network_args {unknown} for {kind}; valid keys: {', '.join(valid)}")
    parsed = {
        "include": _patterns(args.get("include_patterns"), "include_patterns"),
        "exclude": _patterns(args.get("exclude_patterns"), "exclude_patterns"),
    }
    for key in ("rank_dropout", "module_dropout", "dropout"):
        value = float(args.get(key, 0.0))
        if not 0.0 <= value < 1.0:
            raise ValueError(f"network_args {key} must be in [0, 1), got {value}")
        parsed[key] = value
    ratio = args.get("loraplus_lr_ratio")
    if ratio is not None and not (isinstance(ratio, (int, float)) and ratio > 0):
        raise ValueError(f"network_args loraplus_lr_ratio must be a positive number (e.g. 16), got {ratio!r}")
    parsed["factory"] = adapter_factory(kind, **_kind_args(kind, args))
    return parsed


def build_network(kind: str, network_module: str, multiplier: float, network_dim: int | None,
                  network_alpha: float | None, dit: nn.Module, network_args: Mapping[str, object] | None = None,
                  neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:  # fmt: skip
    """A new (zero-effect) adapter network of ``kind`` (lora, loha, lokr) for ``dit``: rank ``network_dim``
    (default 4), ``network_alpha`` (default 1).  ``neuron_dropout`` (musubi's --network_dropout) is ``dropout``."""
    unexpected = sorted(set(kwargs) - set(_MUSUBI_CALL_KWARGS))
    if unexpected:
        raise TypeError(f"create_network got unexpected arguments {unexpected}")
    args = _parse_network_args(network_args, kind)
    if neuron_dropout:
        args["dropout"] = float(neuron_dropout)
    network = LoRANetwork(
        dit,
        rank=network_dim or 4,
        alpha=1.0 if network_alpha is None else network_alpha,
        multiplier=multiplier,
        default_include=DEFAULT_INCLUDE_PATTERNS,
        network_module=network_module,
        shared_input_key=shared_input_key,  # fused q/k/v down-projections (LoRA modules only)
        **args,
    )
    if (network_args or {}).get("verbose") in (True, "True", "true", 1):
        log.info("%s targets (%d): %s", kind, len(network.names), ", ".join(network.names))
    return network


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    dit: nn.Module,
    network_args: Mapping[str, object] | None = None,
    neuron_dropout: float | None = None,
    **kwargs,
) -> LoRANetwork:
    """A new (zero-effect) LoRA for ``dit`` with rank ``network_dim`` (default 4) and ``network_alpha`` (default 1).

    ``neuron_dropout`` (musubi's --network_dropout) is the rank-activation dropout.  Not applied yet: call
    ``network.apply_to(dit)``.
    """
    return build_network("lora", NETWORK_MODULE, multiplier, network_dim, network_alpha, dit, network_args,
                         neuron_dropout, **kwargs)  # fmt: skip


def network_creator(kind: str, network_module: str):
    """The musubi-style ``create_network`` of a network module for adapter ``kind`` (LoHa / LoKr modules)."""

    def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, dit: nn.Module,
                       network_args: Mapping[str, object] | None = None, neuron_dropout: float | None = None,
                       **kwargs) -> LoRANetwork:  # fmt: skip
        return build_network(kind, network_module, multiplier, network_dim, network_alpha, dit, network_args,
                             neuron_dropout, **kwargs)  # fmt: skip

    create_network.__doc__ = (f"A new {kind} network (ΔW = 0) for ``dit``: rank ``network_dim`` (default 4), "
                              "``network_alpha`` (default 1); not applied yet (call ``apply_to``).")  # fmt: skip
    return create_network


def create_network_from_weights(
    multiplier: float,
    weights_sd: Mapping[str, torch.Tensor],
    dit: nn.Module,
    for_inference: bool = False,
    metadata: Mapping[str, str] | None = None,
    origins: Mapping[str, str] | None = None,
) -> LoRANetwork:
    """A network holding the weights of ``weights_sd`` (a canonical state dict, e.g. from :func:`read_adapter`, or
    a file's raw keys in any supported format): every module, kind, rank and alpha from it; every key is checked
    against ``dit`` first (``AdapterKeyError`` names the first that cannot be applied).

    ``metadata`` (the file's header) lets a raw diffusers-format file written by us recover its original alpha.
    ``for_inference``: parameters frozen and eval mode.  The network is not applied; merge or ``apply_to``.
    """
    meta, given, local = dict(metadata or {}), dict(origins or {}), {}
    sd, _ = to_canonical(weights_sd, K5_SEGMENTS, folded_alphas_from_metadata(meta), None, local)
    modules = modules_from_canonical(dit, sd, multiplier, origins={k: given.get(v, v) for k, v in local.items()})
    network = LoRANetwork(dit, modules=modules, network_module=meta.get("ss_network_module", NETWORK_MODULE),
                          shared_input_key=shared_input_key)  # fmt: skip
    if for_inference:
        network.requires_grad_(False).eval()
    return network


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------


def training_metadata(
    network: LoRANetwork,
    task: str | None = None,
    base_checkpoint_hash: str | None = None,
    i2v_mode: str | None = None,
    timestep: Mapping[str, object] | None = None,
    network_args: Mapping[str, object] | None = None,
    **extra: object,
) -> dict[str, object]:
    """The K5 metadata the trainer should pass to ``save_lora`` (rank/alpha/format are added when saving)."""
    meta: dict[str, object] = {
        "ss_network_module": getattr(network, "network_module", NETWORK_MODULE),
        "k5_target_patterns": {"include": network.include, "exclude": network.exclude},
        "k5_num_modules": str(len(network)),
    }
    optional = {
        "k5_task": task,
        "k5_base_checkpoint_hash": base_checkpoint_hash,
        "k5_i2v_mode": i2v_mode,
        "k5_timestep": dict(timestep) if timestep is not None else None,
        "ss_network_args": dict(network_args) if network_args is not None else None,
    }
    meta.update({k: v for k, v in optional.items() if v is not None})
    meta.update(extra)
    return meta


def _default_format(sd: Mapping[str, torch.Tensor]) -> str:
    lora_only = all(set(t) <= {"lora_down.weight", "lora_up.weight", "alpha"} for t in group_by_module(sd).values())
    return "diffusers" if lora_only else "comfyui"


def save_lora(
    path: str | Path,
    weights: LoRANetwork | Mapping[str, torch.Tensor],
    metadata: Mapping[str, object] | None = None,
    format: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Write a network (or a canonical state dict) atomically as safetensors; returns the header written.

    ``format`` None: ``diffusers`` for LoRA-only weights, else ``comfyui``.  ``dtype`` casts the weights (alpha
    stays fp32).  ``ss_network_module`` is always recorded, and kohya's ``sshs_model_hash`` / ``sshs_legacy_hash``.
    """
    sd = weights.lora_state_dict() if isinstance(weights, LoRANetwork) else dict(weights)
    format = format or _default_format(sd)
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; valid: {', '.join(FORMATS)}")
    if dtype is not None:
        sd = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in sd.items()}
    module = getattr(weights, "network_module", NETWORK_MODULE)
    meta = format_metadata(sd, format, {"ss_network_module": module, **(metadata or {})})
    tensors = {k: v.detach().contiguous().cpu() for k, v in from_canonical(sd, format).items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    save_safetensors(tensors, path, meta, what="LoRA")  # atomic; a failed write is one line, the old file kept
    return meta


def read_safetensors(path: str | Path, what: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, keys as stored: the one entry point for reading adapter
    files.  The header is validated first (``kandinsky5.files``): a missing, truncated or foreign file is one
    ``UserError`` line naming ``what`` (the flag) and the file."""
    return load_safetensors(path, what)


@dataclass
class AdapterFile:
    """One adapter file read into canonical form: tensors, header, detected key format, where each canonical key
    came from, the trigger word (official ``trigger`` metadata) and the weights file actually read."""

    sd: dict[str, torch.Tensor]
    metadata: dict[str, str]
    format: str
    weights_path: Path
    origins: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None

    @property
    def trigger(self) -> str:
        return self.metadata.get("trigger", "")


def _official_layout(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config_lora.json or None) for a file or an official-repo directory."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise ValueError(f"{path} is a directory; it must hold one .safetensors file (found {found})")
        config = path / OFFICIAL_CONFIG
        if not config.is_file():
            raise ValueError(f"{path} is a directory without {OFFICIAL_CONFIG}; pass the .safetensors file")
        return files[0], config
    config = path.with_name(OFFICIAL_CONFIG)
    return path, config if config.is_file() else None


def _read_official_config(config: Path) -> dict:
    data = read_json(config, OFFICIAL_CONFIG)
    if not isinstance(data, dict) or "r" not in data:
        raise ValueError(f"{config} is not a PEFT LoraConfig (no 'r')")
    return data


def _peft_config(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str], config_path: Path | None):
    """(LoraConfig dict, config file actually used) for a PEFT-keyed file without our own folded alphas."""
    peft_keys = any(".lora_A" in k or ".lora_B" in k for k in raw)
    if not peft_keys or folded_alphas_from_metadata(metadata) is not None or any(k.endswith(".alpha") for k in raw):
        return None, None
    if config_path is not None:
        return _read_official_config(config_path), config_path
    return peft_config_from_metadata(metadata), None


def _check_peft_targets(config: Mapping, sd: Mapping[str, torch.Tensor], origins: Mapping[str, str], src) -> None:
    for path in group_by_module(sd):
        if not peft_target_matches(config, path):
            key = next(origins[k] for k in origins if k.startswith(path + "."))
            raise ValueError(f"key {key!r} is not a target_modules entry of {src}; the official loader would skip it")


def read_adapter(path: str | Path, what: str = "LoRA") -> AdapterFile:
    """Read an adapter in any supported format into canonical form (nothing is applied; see module docstring).
    ``what`` names the flag in errors about the file itself."""
    weights, config_path = _official_layout(Path(path))
    raw, metadata = read_safetensors(weights, what)
    config, used = _peft_config(raw, metadata, config_path)
    origins: dict[str, str] = {}
    sd, fmt = to_canonical(raw, K5_SEGMENTS, folded_alphas_from_metadata(metadata), config, origins)
    if config is not None:
        _check_peft_targets(config, sd, origins, used or "lora_adapter_metadata")
    if used is not None:
        log.info("%s: rank/alpha and target modules from %s", weights, used)
    metadata["k5_format"] = fmt
    return AdapterFile(sd, metadata, fmt, weights, origins, used)


def load_lora_state_dict(path: str | Path, what: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter in any supported format -> (canonical state dict, metadata); ``k5_format`` = detected format."""
    adapter = read_adapter(path, what)
    return adapter.sd, adapter.metadata


# ----------------------------------------------------------------------------------------------------------------
# converter CLI
# ----------------------------------------------------------------------------------------------------------------

_REGENERATED = ("k5_format", "k5_alpha_folded", "k5_alphas", "ss_network_dim", "ss_network_alpha",
                "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash")  # fmt: skip


def convert(src: str | Path, dst: str | Path, format: str | None, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Rewrite an adapter file in another key format, keeping its metadata (``format`` None: the default)."""
    adapter = read_adapter(src, "input")
    kept = {k: v for k, v in adapter.metadata.items() if k not in _REGENERATED}
    return save_lora(dst, adapter.sd, kept, format=format, dtype=dtype)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m networks.lora_kandinsky", description="Kandinsky 5 LoRA / LoHa / LoKr file utilities."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="rewrite an adapter file in another key format (reads every format)")
    conv.add_argument("input", help="adapter .safetensors in any supported format, or an official LoRA directory")
    conv.add_argument("output", help="destination .safetensors (written atomically)")
    conv.add_argument("--format", choices=FORMATS, default=None,
                      help="key format to write (default: diffusers for LoRA, comfyui for LoHa/LoKr/diff)")  # fmt: skip
    conv.add_argument("--dtype", default=None, help="cast the weights: bf16, fp16 or fp32 (default: keep)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse)")
    conv.add_argument("--debug", action="store_true", help="on an error also print the full traceback")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if Path(args.output).exists() and not args.overwrite:
        raise UserError(f"output {args.output} already exists; pass --overwrite to replace it")
    try:
        meta = convert(args.input, args.output, args.format, dtype)
    except ValueError as exc:  # keys that cannot be applied, a format that cannot hold them: one line
        raise UserError(f"input {args.input}: {exc}") from None
    rank, alpha = meta.get("ss_network_dim", "-"), meta.get("ss_network_alpha", "-")
    print(f"wrote {args.output}: format {meta['k5_format']}, rank {rank}, alpha {alpha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
