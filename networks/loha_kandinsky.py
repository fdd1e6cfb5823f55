"""Kandinsky 5 LoHa (LyCORIS): ``--network_module networks.loha_kandinsky``.

Same targets, include/exclude patterns, dropouts, files, metadata and loading as ``networks.lora_kandinsky``
(everything but ``create_network`` is re-exported from there); the maths is in ``networks.lycoris``.
LoHa has no extra network_args: rank (--network_dim) and alpha (--network_alpha) as LoRA.
Files are written with ComfyUI's Kandinsky 5 key names (``diffusion_model.<path>.hada_w1_a...``,
format ``comfyui``) unless ``--save_format musubi``; the diffusers (PEFT) format cannot hold LoHa.
"""

from __future__ import annotations

from networks.lora_kandinsky import (
    DEFAULT_INCLUDE_PATTERNS,
    K5_SEGMENTS,
    create_network_from_weights,
    load_lora_state_dict,
    modelspec_metadata,
    network_creator,
    read_adapter,
    save_lora,
    training_metadata,
)

__all__ = [
    "DEFAULT_INCLUDE_PATTERNS",
    "K5_SEGMENTS",
    "NETWORK_MODULE",
    "create_network",
    "create_network_from_weights",
    "load_lora_state_dict",
    "modelspec_metadata",
    "read_adapter",
    "save_lora",
    "training_metadata",
]

NETWORK_MODULE = "networks.loha_kandinsky"


create_network = network_creator("loha", NETWORK_MODULE)
