"""Kandinsky 5 LoRA: default targets, musubi-style entry points, file I/O and a format converter CLI.

Used as ``--network_module networks.lora_kandinsky`` by the trainer (``create_network``) and by the generator
(``load_lora_state_dict`` + ``create_network_from_weights`` + ``LoRANetwork.merge_into``).  The maths and the key
formats are in ``networks.lora``; this module only knows the DiT's module *names* (it never imports the DiT).

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
``module_dropout``     float, probability of skipping a module's LoRA branch per call (training only)
``dropout``            float, dropout on the rank activations (same as ``neuron_dropout`` / --network_dropout)
``loraplus_lr_ratio``  float > 0, LoRA+: the trainer gives the ``lora_up`` weights ``ratio`` x the learning rate
``verbose``            bool, log every targeted module (as musubi)
=====================  ================================================================================

Files: ``save_lora`` writes ``diffusers`` keys (default: loads in ComfyUI, diffusers and the official repo),
``comfyui`` or ``musubi`` keys (see ``docs/lora_formats.md``); ``load_lora_state_dict`` reads any of them.  Converter::

    python -m networks.lora_kandinsky convert IN.safetensors OUT.safetensors --format diffusers
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from kandinsky5.common import UserError, get_logger, parse_dtype, run_cli
from kandinsky5.files import load_safetensors, save_safetensors
from networks.lora import (
    FORMATS,
    LoRANetwork,
    folded_alphas_from_metadata,
    format_metadata,
    from_canonical,
    infer_module_ranks,
    to_canonical,
)

__all__ = [
    "DEFAULT_INCLUDE_PATTERNS",
    "K5_SEGMENTS",
    "NETWORK_MODULE",
    "create_network",
    "create_network_from_weights",
    "shared_input_key",
    "save_lora",
    "load_lora_state_dict",
    "training_metadata",
    "main",
]

log = get_logger(__name__)

NETWORK_MODULE = "networks.lora_kandinsky"
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
    "out_layer",
    "in_layer",
    "time_embeddings",
    "text_embeddings",
    "pooled_text_embeddings",
    "visual_embeddings",
)
# Linears that read the same input tensor in the DiT's forward (their LoRA down-projections run as one matmul):
# q/k/v of a self-attention read the modulated stream, k/v of a cross-attention read the text.
_SHARED_INPUT = re.compile(
    r"(?P<self>.+\.self_attention)\.(?:to_query|to_key|to_value)|(?P<cross>.+\.cross_attention)\.(?:to_key|to_value)"
)
_NETWORK_ARGS = ("include_patterns", "exclude_patterns", "rank_dropout", "module_dropout", "dropout",
                 "loraplus_lr_ratio", "verbose")  # fmt: skip
_MUSUBI_CALL_KWARGS = ("vae", "text_encoders", "text_encoder", "unet")  # accepted and ignored (musubi call shape)


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


def _parse_network_args(network_args: Mapping[str, object] | None) -> dict:
    args = dict(network_args or {})
    unknown = sorted(set(args) - set(_NETWORK_ARGS))
    if unknown:
        raise ValueError(f"unknown network_args {unknown}; valid keys: {', '.join(_NETWORK_ARGS)}")
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
    return parsed


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
    unexpected = sorted(set(kwargs) - set(_MUSUBI_CALL_KWARGS))
    if unexpected:
        raise TypeError(f"create_network got unexpected arguments {unexpected}")
    args = _parse_network_args(network_args)
    if neuron_dropout:
        args["dropout"] = float(neuron_dropout)
    network = LoRANetwork(
        dit,
        rank=network_dim or 4,
        alpha=1.0 if network_alpha is None else network_alpha,
        multiplier=multiplier,
        default_include=DEFAULT_INCLUDE_PATTERNS,
        shared_input_key=shared_input_key,
        **args,
    )
    if (network_args or {}).get("verbose") in (True, "True", "true", 1):
        log.info("LoRA targets (%d): %s", len(network.names), ", ".join(network.names))
    return network


def create_network_from_weights(
    multiplier: float,
    weights_sd: Mapping[str, torch.Tensor],
    dit: nn.Module,
    for_inference: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> LoRANetwork:
    """A network holding the weights of ``weights_sd`` (any supported key format; rank/alpha per module from it).

    ``metadata`` (the file's header) lets a diffusers-format file written by us recover its original alpha.
    ``for_inference``: parameters frozen and eval mode.  The network is not applied; merge or ``apply_to``.
    """
    sd, _ = to_canonical(weights_sd, K5_SEGMENTS, folded_alphas_from_metadata(metadata or {}))
    network = LoRANetwork(
        dit, multiplier=multiplier, module_ranks=infer_module_ranks(sd), shared_input_key=shared_input_key
    )
    network.load_lora_state_dict(sd, strict=True)
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
        "ss_network_module": NETWORK_MODULE,
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


def save_lora(
    path: str | Path,
    weights: LoRANetwork | Mapping[str, torch.Tensor],
    metadata: Mapping[str, object] | None = None,
    format: str = "diffusers",
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Write a network (or a canonical state dict) atomically as safetensors; returns the header written.

    ``dtype`` casts the up/down weights (alpha stays fp32).  ``ss_network_module`` is always recorded.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; valid: {', '.join(FORMATS)}")
    sd = weights.lora_state_dict() if isinstance(weights, LoRANetwork) else dict(weights)
    if dtype is not None:
        sd = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in sd.items()}
    meta = format_metadata(sd, format, {"ss_network_module": NETWORK_MODULE, **(metadata or {})})
    tensors = {k: v.detach().contiguous().cpu() for k, v in from_canonical(sd, format).items()}
    save_safetensors(tensors, path, meta, what="LoRA")  # atomic; a failed write is one line, the old file kept
    return meta


def read_safetensors(path: str | Path, what: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, keys as stored: the one entry point for reading LoRA
    files.  The header is validated first (``kandinsky5.files``): a missing, truncated or foreign file is one
    ``UserError`` line naming ``what`` (the flag) and the file."""
    return load_safetensors(path, what)


def load_lora_state_dict(path: str | Path, what: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA in any supported format -> (canonical state dict, metadata); ``k5_format`` = detected format."""
    raw, metadata = read_safetensors(path, what)
    sd, fmt = to_canonical(raw, K5_SEGMENTS, folded_alphas_from_metadata(metadata))
    metadata["k5_format"] = fmt
    return sd, metadata


# ----------------------------------------------------------------------------------------------------------------
# converter CLI
# ----------------------------------------------------------------------------------------------------------------

_REGENERATED = ("k5_format", "k5_alpha_folded", "k5_alphas", "ss_network_dim", "ss_network_alpha")


def convert(src: str | Path, dst: str | Path, format: str, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Rewrite a LoRA file in another key format, keeping its metadata."""
    sd, metadata = load_lora_state_dict(src, "input")
    kept = {k: v for k, v in metadata.items() if k not in _REGENERATED}
    return save_lora(dst, sd, kept, format=format, dtype=dtype)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m networks.lora_kandinsky", description="Kandinsky 5 LoRA file utilities."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="rewrite a LoRA in another key format (reads comfyui, diffusers, musubi)")
    conv.add_argument("input", help="LoRA .safetensors in any supported format")
    conv.add_argument("output", help="destination .safetensors (written atomically)")
    conv.add_argument("--format", choices=FORMATS, default="diffusers", help="key format to write (default diffusers)")
    conv.add_argument("--dtype", default=None, help="cast up/down weights: bf16, fp16 or fp32 (default: keep)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse)")
    conv.add_argument("--debug", action="store_true", help="on an error also print the full traceback")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if Path(args.output).exists() and not args.overwrite:
        raise UserError(f"output {args.output} already exists; pass --overwrite to replace it")
    meta = convert(args.input, args.output, args.format, dtype)
    print(f"wrote {args.output}: format {args.format}, rank {meta['ss_network_dim']}, alpha {meta['ss_network_alpha']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
