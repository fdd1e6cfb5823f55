"""Multi-process training on CPU: ``accelerate launch --multi_gpu --num_processes 2`` gives two gloo ranks.

The data is sharded per batch, the LoRA gradients are all-reduced, and only rank 0 writes files; at the end every
rank logs a digest of its LoRA weights (``training.check_ranks_agree``) and the test compares them.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_cli import base_args
from tests.test_training import write_toy_cache

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_end_with_identical_lora_weights(tiny_bundle, tmp_path):
    import torch
    from safetensors.torch import load_file

    toml = write_toy_cache(tmp_path / "data", n_items=4, batch_size=1)
    out = tmp_path / "out"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
    args = base_args(tiny_bundle, toml, out, steps=3) + ["--save_state", "--network_dropout", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch + ["kandinsky5_train_network.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = re.search(r"LoRA weights per rank: (\w+) (\w+)", proc.stderr)
    assert digests, proc.stderr[-3000:]
    assert digests.group(1) == digests.group(2)
    assert "2 process(es) on cpu" in proc.stderr
    state = out / "lora-state"
    rng = torch.load(state / "rng.pt", weights_only=False)
    assert len(rng) == 2 and not torch.equal(rng[0]["generator"], rng[1]["generator"])  # per-rank noise streams
    lora = load_file(out / "lora.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))
    assert sorted(p.name for p in out.iterdir()) == ["lora-state", "lora.safetensors"]  # rank 0 only, no temp dirs
