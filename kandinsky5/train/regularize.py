"""Max-norm regularisation of a LoRA (``--scale_weight_norms``, as kohya / musubi), applied after each optimizer step.

For every LoRA module with ``dW = scale * up @ down`` (``up`` (out, r), ``down`` (r, in)): if ``||dW||_F`` exceeds
``max_norm``, both ``up`` and ``down`` are multiplied by ``sqrt(max_norm / ||dW||_F)``, so ``||dW||_F`` becomes
``max_norm``.  LoHa / LoKr modules (``networks.lycoris``: ``delta_weight`` and ``scale_delta_``) get the same
rule on their full ``dW``: both Hadamard / Kronecker factors are scaled by ``sqrt(max_norm / ||dW||_F)``.  Every
process applies it to identical weights, so they stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NormStats:
    keys_scaled: int  # modules whose delta was scaled down this step
    mean_norm: float  # mean ||dW||_F after scaling
    max_norm: float  # largest ||dW||_F after scaling


def _lora_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in network.modules() if hasattr(m, "lora_down") and hasattr(m, "lora_up") and hasattr(m, "scale")]


@torch.no_grad()
def max_norm_(network: torch.nn.Module, max_norm: float) -> NormStats:
    """Scale every LoRA module whose ``||scale * up @ down||_F`` is above ``max_norm`` (in place)."""
    norms, scaled = [], 0
    for module in _lora_modules(network):
        up, down = module.lora_up.weight, module.lora_down.weight
        norm = float((up.float() @ down.float()).norm()) * module.scale
        if norm > max_norm:
            ratio = (max_norm / norm) ** 0.5
            up.mul_(ratio)
            down.mul_(ratio)
            scaled, norm = scaled + 1, max_norm
        norms.append(norm)
    for module in (m for m in network.modules() if hasattr(m, "scale_delta_")):  # LoHa, LoKr
        norm = float(module.delta_weight(1.0).norm())
        if norm > max_norm:
            module.scale_delta_(max_norm / norm)
            scaled, norm = scaled + 1, max_norm
        norms.append(norm)
    if not norms:
        raise ValueError("--scale_weight_norms needs a LoRA, LoHa or LoKr network")
    return NormStats(scaled, sum(norms) / len(norms), max(norms))
