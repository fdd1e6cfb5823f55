"""Parameter counts and fp32 sizes of LoRA / LoHa / LoKr networks for the Pro and Lite DiTs (default targets).

The DiTs are built on the meta device (no memory), the networks are created exactly as the trainer creates them,
and the trainable parameters are counted; the Adam state is 2 more fp32 copies.  Prints a markdown table::

    python bench/adapter_params.py
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.configs import LITE_DIT, PRO_DIT  # noqa: E402
from kandinsky5.model.dit import DiT  # noqa: E402

SETTINGS = [
    ("networks.lora_kandinsky", 16, {}),
    ("networks.lora_kandinsky", 32, {}),
    ("networks.loha_kandinsky", 8, {}),
    ("networks.loha_kandinsky", 16, {}),
    ("networks.lokr_kandinsky", 4, {"factor": -1}),
    ("networks.lokr_kandinsky", 16, {"factor": 8}),
    ("networks.lokr_kandinsky", 16, {"factor": 16}),
    ("networks.lokr_kandinsky", 8, {"factor": 4, "decompose_both": True}),
]


def count(cfg, module: str, dim: int, args: dict) -> int:
    with torch.device("meta"):
        dit = DiT(cfg)
        network = importlib.import_module(module).create_network(1.0, dim, dim, dit, args or None)
    return sum(p.numel() for p in network.parameters())


def main() -> None:
    print(
        "| --network_module | --network_dim | --network_args | Pro params | Pro fp32 + Adam | Lite params | "
        "Lite fp32 + Adam |"
    )
    print("|---|---|---|---|---|---|---|")
    for module, dim, args in SETTINGS:
        pro, lite = count(PRO_DIT, module, dim, args), count(LITE_DIT, module, dim, args)
        text = " ".join(f"{k}={v}" for k, v in args.items()) or "-"
        print(
            f"| {module.split('.')[1]} | {dim} | {text} | {pro / 1e6:.2f} M | {pro * 12 / 2**20:.0f} MiB | "
            f"{lite / 1e6:.2f} M | {lite * 12 / 2**20:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
