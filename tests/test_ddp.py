"""Multi-process training on CPU: ``accelerate launch --multi_gpu --num_processes 2`` gives two gloo ranks.

The data is sharded per batch, the LoRA gradients are all-reduced, and only rank 0 writes files; at the end every
rank logs a digest of its LoRA weights (``training.check_ranks_agree``) and the test compares them.
"""

from __future__ import annotations

import json
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
    validation = ["--validation_split", "0.5", "--validation_timesteps", "0.3,0.7"]  # 2 items, one per rank
    args = base_args(tiny_bundle, toml, out, steps=3) + ["--save_state", "--network_dropout", "0.1", *validation]
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
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if k.endswith("lora_B.weight"))  # default format
    assert sorted(p.name for p in out.iterdir()) == ["logs", "lora-state", "lora.safetensors"]  # rank 0, no temps
    (folder,) = (out / "logs").iterdir()  # one run folder, from rank 0
    # the validation loss is sharded over the ranks and gathered: the same number as one process computes
    from tests.test_train_cli import train

    assert train(base_args(tiny_bundle, toml, tmp_path / "one", steps=1) + validation + ["--log_with", "none"]) == 0
    (single,) = (tmp_path / "one" / "logs").iterdir()
    two, one = (json.loads((f / "history.json").read_text())["validation"][0] for f in (folder, single))
    assert two["items"] == one["items"] == 2 and two["mean"] == pytest.approx(one["mean"], rel=1e-6)


def _bucketed_all_reduce_worker(rank: int, port: int, result) -> None:
    import torch
    import torch.distributed as dist

    from kandinsky5.train.distributed import DistContext, _all_reduce_mean_

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tensors = [torch.full((n,), float(rank + 1) * (i + 1)) for i, n in enumerate((3, 5, 1, 7))]
        _all_reduce_mean_(DistContext(rank=rank, world_size=2), tensors, bucket_bytes=16)  # several buckets
        result[rank] = [t.tolist() for t in tensors]
    finally:
        dist.destroy_process_group()


def test_bucketed_gradient_all_reduce_averages_every_tensor():
    import torch.multiprocessing as mp

    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_bucketed_all_reduce_worker, args=(_free_port(), result), nprocs=2, join=True)
    expected = [[1.5 * (i + 1)] * n for i, n in enumerate((3, 5, 1, 7))]
    assert result[0] == result[1] == expected
