"""LoHa and LoKr under DDP and --fsdp (FSDP2) on 2 gloo ranks, against one process with the same global batch.

For each kind (LoHa rank 4; LoKr ``factor=4``: a full w1 and a factored w2), 3 SGD steps of the trainer's engines
(``tests/test_distributed.py``'s loop: global batch 4, two micro-batches of 1 per rank, clipping active): the FSDP
(and, for LoHa, the DDP) weights equal the one-process weights (|dW| <= 2e-6, the tolerance and its reasoning are in
test_distributed.py) and every gradient norm matches (rel 1e-5).  The FSDP run's file, saved on rank 0 the way the
trainer saves (``engine.saveable_network`` + ``save_lora``), reads back as the trained tensors; ``--dim_from_weights``
from that file under --fsdp (the saving copy is built from the file, not from ``--network_args``) trains and saves
too.  ``--base_weights`` with --fsdp is refused before the DiT loads.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from tests.helpers import load_module
from tests.test_distributed import SGD, STEPS, _free_port, _train
from tests.test_train_cli import base_args
from tests.test_training import write_toy_cache

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
KINDS = {
    "loha": ["--network_module", "networks.loha_kandinsky"],
    "lokr": ["--network_module", "networks.lokr_kandinsky", "--network_args", "factor=4"],
}
DDP_KINDS = ("loha",)  # DDP reduces whatever parameters the network has: one kind besides LoRA's own test


def _save(engine, state, path: Path) -> None:
    """Rank 0 writes ``state`` as the trainer does."""
    engine.module.save_lora(path, engine.saveable_network(state), {"k5_task": "k5-tiny-t2v"}, format="comfyui")


def _worker(rank: int, port: int, bundle: Path, toml: Path, out: Path, result) -> None:
    import torch
    import torch.distributed as dist

    from kandinsky5 import cli
    from kandinsky5.train.distributed import DistContext

    torch.set_num_threads(1)
    script = load_module(ROOT / "kandinsky5_train_network.py", "_train_script_adapters_distributed")
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout)
    try:

        def cfg(*extra):
            args = base_args(bundle, toml, out, steps=STEPS) + ["--max_grad_norm", "0.05", *SGD, *extra]
            return script.config_from_args(cli.parse_args(script.build_parser(), args))

        one, two, found = DistContext(0, 1), DistContext(rank, 2), {}
        for kind, flags in KINDS.items():
            _, ref_sd, ref_norms = _train(script, cfg(*flags), one, [[0, 1, 2, 3]])
            fsdp, fsdp_sd, fsdp_norms = _train(script, cfg(*flags, "--fsdp"), two, [[rank], [rank + 2]])
            found[kind] = {"ref": ref_sd, "fsdp": fsdp_sd, "norms": {"ref": ref_norms, "fsdp": fsdp_norms}}
            if kind in DDP_KINDS:
                _, found[kind]["ddp"], found[kind]["norms"]["ddp"] = _train(script, cfg(*flags), two,
                                                                            [[rank], [rank + 2]])  # fmt: skip
            path = out / f"{kind}.safetensors"
            if rank == 0:
                _save(fsdp, fsdp_sd, path)
            dist.barrier()
        lokr = out / "lokr.safetensors"
        again, again_sd, _ = _train(
            script, cfg("--network_module", "networks.lokr_kandinsky", "--network_weights", str(lokr),
                        "--dim_from_weights", "--fsdp"), two, [[rank]],
        )  # fmt: skip
        if rank == 0:
            _save(again, again_sd, out / "again.safetensors")
        dist.barrier()
        result[rank] = {**found, "again": again_sd}
    finally:
        dist.destroy_process_group()


def _network(kind: str):
    """A fresh network of ``kind`` with the test's arguments on the tiny DiT (for its canonical keys)."""
    import importlib

    from kandinsky5.configs import get_task
    from kandinsky5.model.dit import DiT

    args = {"factor": 4} if kind == "lokr" else {}
    module = importlib.import_module(KINDS[kind][1])
    return module.create_network(1.0, 4, 1.0, DiT(get_task("k5-tiny-t2v").dit), args)


def test_loha_and_lokr_train_under_ddp_and_fsdp_as_in_one_process(tiny_bundle, tmp_path):
    import torch
    import torch.multiprocessing as mp

    from networks.lora_kandinsky import read_adapter

    toml = write_toy_cache(tmp_path / "data", n_items=4, batch_size=1)
    (tmp_path / "out").mkdir()
    result = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), tiny_bundle, toml, tmp_path / "out", result), nprocs=2, join=True)
    main = result[0]
    suffixes = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, "lokr": {"lokr_w1", "lokr_w2_a"}}
    for kind in KINDS:
        ref, norms = main[kind]["ref"], main[kind]["norms"]
        assert any(suffix in key for key in ref for suffix in suffixes[kind]), (kind, sorted(ref)[:4])
        engines = ["fsdp", "ddp"] if kind in DDP_KINDS else ["fsdp"]
        assert all(norms[e] == pytest.approx(norms["ref"], rel=1e-5) for e in engines), norms
        assert result[1][kind]["fsdp"] == {}  # gathered on rank 0 only
        for engine in engines:
            assert set(main[kind][engine]) == set(ref)
            for key, value in ref.items():
                assert (main[kind][engine][key] - value).abs().max() <= 2e-6, (kind, engine, key)
        moved = [key for key, value in ref.items() if value.dim() == 2 and value.abs().max() > 0]
        assert moved, kind
        # the FSDP file reads back as the trained network's tensors (canonical keys), of the same kind
        network = _network(kind)
        network.load_state_dict(main[kind]["fsdp"])
        trained, adapter = network.lora_state_dict(), read_adapter(tmp_path / "out" / f"{kind}.safetensors")
        assert set(adapter.sd) == set(trained)
        assert all(torch.equal(adapter.sd[k].float(), v.float()) for k, v in trained.items())
    # --dim_from_weights under --fsdp: the same LoKr layout (shapes) as the file, saved by rank 0
    again = read_adapter(tmp_path / "out" / "again.safetensors").sd
    first = read_adapter(tmp_path / "out" / "lokr.safetensors").sd
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in first.items()}
    assert any(not torch.equal(again[k], first[k]) for k in first if not k.endswith("alpha"))


def test_base_weights_with_fsdp_is_refused_before_loading(tiny_bundle, tmp_path):
    from kandinsky5 import cli
    from kandinsky5.common import UserError
    from kandinsky5.train import prechecks

    script = load_module(ROOT / "kandinsky5_train_network.py", "_train_script_adapters_base")
    toml = write_toy_cache(tmp_path / "data", n_items=1, batch_size=1)
    lora = tmp_path / "base.safetensors"
    lora.write_bytes(b"")
    args = base_args(tiny_bundle, toml, tmp_path / "out") + ["--fsdp", "--base_weights", str(lora)]
    cfg = script.config_from_args(cli.parse_args(script.build_parser(), args))
    with pytest.raises(UserError, match="--base_weights.*--fsdp"):
        prechecks.check_before_load(cfg, 2)
