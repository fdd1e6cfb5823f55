"""Multi-process training from the command line on CPU (gloo): DDP under ``accelerate launch``, ``--fsdp`` on two
"nodes" of one process each (``torchrun --nnodes 2`` over a localhost c10d rendezvous), exact resume under --fsdp
with another launcher (``accelerate launch --use_fsdp``), and the sharded run's LoRA in the one-process generator.

The engines themselves (DDP / FSDP == one process, resident bytes, fp8) are tested in tests/test_distributed.py.
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
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _accelerate(*extra: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *extra]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_two_gloo_ranks_with_module_dropout_finish_with_identical_lora_weights(tiny_bundle, tmp_path):
    """DDP: each rank skips other LoRA branches (module_dropout 0.5); torch's DDP reduces every branch (zeros from
    a rank that skipped it), so the run ends and every rank holds the same weights."""
    import torch
    from safetensors.torch import load_file

    toml = write_toy_cache(tmp_path / "data", n_items=4, batch_size=1)
    out = tmp_path / "out"
    validation = ["--validation_split", "0.5", "--validation_timesteps", "0.3,0.7"]  # 2 items, one per rank
    args = base_args(tiny_bundle, toml, out, steps=3) + ["--save_state", "--network_dropout", "0.1", *validation]
    args += ["--network_args", "module_dropout=0.5", "--ddp_gradient_as_bucket_view"]
    proc = _run(_accelerate("--multi_gpu") + ["kandinsky5_train_network.py", *args])
    digests = re.search(r"LoRA weights per rank: (\w+) (\w+)", proc.stderr)
    assert digests, proc.stderr[-3000:]
    assert digests.group(1) == digests.group(2)
    assert "2 process(es) on cpu" in proc.stderr
    assert "DDP over the LoRA on 2 ranks (find_unused_parameters)" in proc.stderr
    rng = torch.load(out / "lora-state" / "rng.pt", weights_only=False)
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


@pytest.fixture(scope="module")
def fsdp_run(tiny_bundle, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """4 steps with --fsdp on two "nodes" of one process, saving a state at step 2: (toml, output dir, args)."""
    root = tmp_path_factory.mktemp("fsdp")
    toml = write_toy_cache(root / "data", n_items=4, batch_size=1)
    out = root / "out"
    args = base_args(tiny_bundle, toml, out, steps=4) + ["--fsdp", "--save_state", "--save_every_n_steps", "2"]
    args += ["--validation_split", "0.3", "--validation_timesteps", "0.5"]  # 1 item on 2 ranks: lockstep forwards
    endpoint = f"127.0.0.1:{_free_port()}"
    node = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", endpoint, "--rdzv_id", "k5-test"]  # fmt: skip
    nodes = [subprocess.Popen([*node, "kandinsky5_train_network.py", *args], cwd=ROOT, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]  # fmt: skip
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-3000:] for log in logs)
    assert any("FSDP2: 5 blocks + root sharded over 2 rank(s)" in log for log in logs)
    return toml, out, args


def test_fsdp_two_nodes_save_a_one_gpu_lora_and_a_sharded_state(fsdp_run):
    import torch
    from safetensors.torch import load_file

    from networks.lora_kandinsky import load_lora_state_dict

    _, out, _ = fsdp_run
    assert sorted(p.name for p in out.iterdir() if p.name != "logs") == [
        "lora-state", "lora-step00000002-state", "lora-step00000002.safetensors", "lora.safetensors"]  # fmt: skip
    state = out / "lora-state"
    assert sorted(p.name for p in (state / "optimizer").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert json.loads((state / "progress.json").read_text())["sharded"] is True
    (folder,) = (out / "logs").iterdir()
    assert len(json.loads((folder / "history.json").read_text())["validation"]) >= 2  # step 0 and the end
    canonical, meta = load_lora_state_dict(out / "lora.safetensors")
    assert meta["k5_format"] == "diffusers" and meta["ss_steps"] == "4"
    assert any(float(v.abs().max()) > 0 for k, v in canonical.items() if k.endswith("lora_up.weight"))
    network = load_file(state / "network.safetensors")  # the same weights, whole, in the state
    first = canonical["text_transformer_blocks.0.self_attention.to_query.lora_down.weight"]  # lora_modules.0
    assert len(network) == len(canonical) and torch.equal(network["lora_modules.0.lora_down.weight"], first)


def test_fsdp_resume_with_another_launcher_is_exact(fsdp_run, tmp_path):
    """2 steps + resume + 2 steps == 4 steps, bit for bit (accelerate's --use_fsdp turns --fsdp on)."""
    import torch
    from safetensors.torch import load_file

    toml, out, args = fsdp_run
    resumed = tmp_path / "resumed"
    args = [a if a != str(out) else str(resumed) for a in args if a != "--fsdp"]
    args += ["--resume", str(out / "lora-step00000002-state")]
    proc = _run(_accelerate("--use_fsdp") + ["kandinsky5_train_network.py", *args])
    assert "resumed from" in proc.stderr and "FSDP2:" in proc.stderr
    a, b = load_file(out / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_lora_loads_in_the_one_process_generator(fsdp_run, tiny_bundle, tmp_path):
    from kandinsky5.cli import run_main
    from tests.helpers import load_module

    _, out, _ = fsdp_run
    generate = load_module(ROOT / "kandinsky5_generate_video.py", "_generate_for_fsdp_lora")
    b = tiny_bundle
    models = ["--task", "k5-tiny-t2v", "--dit", str(b / "model" / "k5_tiny_t2v.safetensors"), "--vae", str(b / "vae"),
              "--text_encoder_qwen", str(b / "text_encoder"), "--text_encoder_clip", str(b / "text_encoder2"),
              "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    small = ["--frames", "5", "--steps", "2", "--width", "128", "--height", "128", "--prompt", "a red ball"]
    rc = run_main(generate.main, [*models, *small, "--lora_weight", str(out / "lora.safetensors"),
                                  "--output", str(tmp_path / "v.mp4")])  # fmt: skip
    assert rc == 0 and (tmp_path / "v.mp4").is_file()


def test_resume_refuses_another_world_size_or_engine_before_loading(fsdp_run, tmp_path):
    from kandinsky5 import cli
    from kandinsky5.common import UserError
    from kandinsky5.train.startup import check_resume
    from tests.helpers import load_module

    _, out, args = fsdp_run
    script = load_module(ROOT / "kandinsky5_train_network.py", "_train_script_resume_checks")
    state = ["--resume", str(out / "lora-step00000002-state")]
    fsdp = script.config_from_args(cli.parse_args(script.build_parser(), [*args, *state]))
    plain = script.config_from_args(cli.parse_args(script.build_parser(), [a for a in args if a != "--fsdp"] + state))
    check_resume(fsdp, 2, None)
    with pytest.raises(UserError, match=r"saved with --num_processes 2, this run asks for 1"):
        check_resume(fsdp, 1, None)
    with pytest.raises(UserError, match="was saved with --fsdp; resume with --fsdp"):
        check_resume(plain, 2, None)
