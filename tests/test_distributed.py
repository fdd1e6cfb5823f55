"""Data parallel (DDP) and sharded (--fsdp, FSDP2) training on 2 gloo ranks against one process.

* engines: the trainer's engines (``kandinsky5.train.distributed.build_engine``), its loss and its optimizer step
  (``finish_step``), 3 steps with a global batch of 4 fixed samples; each rank runs 2 micro-batches of 1 sample (so
  gradient accumulation and the no-sync path are exercised), one process runs 1 micro-batch of 4.  Clipping is active
  (``--max_grad_norm 0.05``) and the global gradient norm of every step must match too (rel 1e-5).  SGD with lr 1, so
  the weights are linear in the averaged gradients.  Tolerance: fp32, only the summation order differs (batch of 4
  against 2 x 2 samples); measured |dW| <= 8e-7 after 3 steps for weights up to 1e-3 that moved by up to 1e-3 per
  step: asserted |dW| <= 2e-6.  A mis-averaged gradient (a sum, or one rank's) is off by the whole update.
* under --fsdp the base weights each rank holds are at most 1/2 of the unsharded model plus one block;
* --fsdp with fp8 base weights (quantised while loading, or a pre-quantised file) gives the same forward as one
  fp8 process;
* --fsdp with ``module_dropout=0.5`` (each rank skips other branches) finishes with a finite, trained LoRA;
* ``--output_dir`` not shared by the ranks (``--fsdp --save_state`` on several nodes) is a one-line error.

The command-line runs (module_dropout, resume, the generator loading an FSDP LoRA, two "nodes") are in
tests/test_ddp.py.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest

from tests.helpers import load_module
from tests.test_train_cli import base_args
from tests.test_training import write_toy_cache

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS, GLOBAL_BATCH = 3, 4
SGD = ["--optimizer_type", "SGD", "--learning_rate", "1.0"]  # linear in the gradient: a mis-average shows 1:1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(step: int):
    """The global batch of ``step``: TrainBatch of 4 samples, t (4,) and noise, the same on every rank."""
    import torch

    from kandinsky5.train.objective import TrainBatch

    g = torch.Generator().manual_seed(100 + step)
    n = GLOBAL_BATCH
    batch = TrainBatch(
        latents=torch.randn(n, 3, 16, 16, 16, generator=g),
        text_embeds=torch.randn(n, 5, 64, generator=g),
        text_mask=torch.ones(n, 5, dtype=torch.bool),
        pooled=torch.randn(n, 32, generator=g),
    )
    return batch, torch.rand(n, generator=g), torch.randn(n, 3, 16, 16, 16, generator=g)


def _rows(batch, t, noise, idx: list[int]):
    from kandinsky5.train.objective import TrainBatch

    part = TrainBatch(batch.latents[idx], batch.text_embeds[idx], batch.text_mask[idx], batch.pooled[idx])
    return part, t[idx], noise[idx]


def _train(script, cfg, ctx, micro: list[list[int]]):
    """3 optimizer steps of the trainer's engine; returns (engine, full LoRA state on rank 0, grad norms)."""
    from kandinsky5.train import optim
    from kandinsky5.train.distributed import build_engine
    from kandinsky5.train.objective import flow_matching_loss
    from kandinsky5.train.step import finish_step

    engine = build_engine(cfg, ctx, 3, lambda dit: script._build_network(cfg, dit))
    params = [p for p in engine.network.parameters() if p.requires_grad]
    opt = optim.build_optimizer(params, cfg.optimizer)
    sched = optim.build_scheduler(opt, cfg.scheduler, STEPS)
    norms = []
    for step in range(STEPS):
        samples, loss_sum = _samples(step), 0.0
        for i, idx in enumerate(micro):
            with engine.sync(i == len(micro) - 1):
                loss = flow_matching_loss(engine.model, *_rows(*samples, idx), cfg.task.rope_scale)
                (loss / len(micro)).backward()
            loss_sum = loss_sum + loss.detach()
        norms.append(finish_step(ctx, params, opt, sched, loss_sum, len(micro), cfg.max_grad_norm).grad_norm)
    return engine, engine.network_state(), norms


def _first_loss(script, cfg, ctx) -> float:
    """The loss of one forward of step 0's first sample (no backward)."""
    import torch

    from kandinsky5.train.distributed import build_engine
    from kandinsky5.train.objective import flow_matching_loss

    engine = build_engine(cfg, ctx, 3, lambda dit: script._build_network(cfg, dit))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return float(flow_matching_loss(engine.model, *_rows(*_samples(0), [0]), cfg.task.rope_scale))


def _engines_worker(rank: int, port: int, bundle: Path, toml: Path, out: Path, result) -> None:
    import torch
    import torch.distributed as dist

    from kandinsky5 import cli
    from kandinsky5.common import UserError, seed_everything
    from kandinsky5.train.distributed import DistContext
    from kandinsky5.train.fsdp import BRANCHES, check_shared_directory, resident_bytes

    torch.set_num_threads(1)
    script = load_module(ROOT / "kandinsky5_train_network.py", "_train_script_distributed")
    timeout = datetime.timedelta(seconds=120)  # a collective mismatch fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout)
    try:

        def cfg(*extra):
            args = base_args(bundle, toml, out, steps=STEPS) + ["--max_grad_norm", "0.05", *SGD, *extra]
            return script.config_from_args(cli.parse_args(script.build_parser(), args))

        one, two = DistContext(0, 1), DistContext(rank, 2)
        ref, ref_sd, ref_norms = _train(script, cfg(), one, [list(range(GLOBAL_BATCH))])
        _, ddp_sd, ddp_norms = _train(script, cfg(), two, [[rank], [rank + 2]])
        fsdp, fsdp_sd, fsdp_norms = _train(script, cfg("--fsdp"), two, [[rank], [rank + 2]])
        blocks = [*ref.dit.text_transformer_blocks, *ref.dit.visual_transformer_blocks]
        fp8 = [_first_loss(script, cfg("--fp8_base", "--mixed_precision", "bf16", *flags), ctx) for flags, ctx in
               (((), one), (("--fsdp",), two))]  # fmt: skip
        prequantized = [_first_loss(script, cfg("--dit", str(out / "fp8.safetensors"), *flags), ctx) for flags, ctx in
                        (((), one), (("--fsdp",), two))]  # fmt: skip
        seed_everything(7 + rank)  # module_dropout skips different branches on each rank
        _, dropout_sd, _ = _train(script, cfg("--fsdp", "--network_args", "module_dropout=0.5"), two, [[rank]])
        check_shared_directory(two, out / "shared")  # the same directory for both ranks: fine
        try:
            check_shared_directory(two, out / f"node{rank}")  # as if each node had its own disk
            unshared = ""
        except UserError as exc:
            unshared = str(exc)
        result[rank] = {
            "ref": ref_sd, "ddp": ddp_sd, "fsdp": fsdp_sd, "norms": (ref_norms, ddp_norms, fsdp_norms),
            "kinds": (type(ref).__name__, fsdp.kind), "full": resident_bytes(ref.dit),
            "block": max(resident_bytes(b) for b in blocks), "sharded": resident_bytes(fsdp.dit, skip=BRANCHES),
            "fp8": fp8, "prequantized": prequantized, "dropout": dropout_sd, "unshared": unshared,
        }  # fmt: skip
    finally:
        dist.destroy_process_group()


def _prequantized_checkpoint(bundle: Path, path: Path) -> None:
    """The tiny DiT as a pre-quantised fp8 file with one scale per tensor (shape (1,): rank 1 holds none of it)."""
    import torch
    from safetensors.torch import save_file

    from kandinsky5.configs import get_task
    from kandinsky5.memory import fp8
    from kandinsky5.model.loading import load_dit

    dit = load_dit(get_task("k5-tiny-t2v"), bundle / "model" / "k5_tiny_t2v.safetensors", dtype=torch.bfloat16)
    fp8.convert_to_fp8(dit, block=None)
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(path))


def test_ddp_and_fsdp_on_two_ranks_equal_one_process_with_the_same_global_batch(tiny_bundle, tmp_path):
    import torch
    import torch.multiprocessing as mp

    toml = write_toy_cache(tmp_path / "data", n_items=4, batch_size=1)
    _prequantized_checkpoint(tiny_bundle, tmp_path / "out" / "fp8.safetensors")
    result = mp.Manager().dict()
    mp.spawn(_engines_worker, args=(_free_port(), tiny_bundle, toml, tmp_path / "out", result), nprocs=2, join=True)
    main = result[0]
    assert main["kinds"] == ("Engine", "fsdp")
    ref_norms, ddp_norms, fsdp_norms = main["norms"]
    assert min(ref_norms) > 0.05  # clipping was active in every step
    assert ddp_norms == pytest.approx(ref_norms, rel=1e-5) and fsdp_norms == pytest.approx(ref_norms, rel=1e-5)
    assert result[1]["norms"][2] == pytest.approx(ref_norms, rel=1e-5)  # the global norm, on every rank
    ref = main["ref"]
    assert set(main["ddp"]) == set(main["fsdp"]) == set(ref) and result[1]["fsdp"] == {}  # gathered on rank 0
    assert any(float(v.abs().max()) > 0 for k, v in ref.items() if "lora_up" in k)  # it trained
    for key, value in ref.items():
        for engine in ("ddp", "fsdp"):
            torch.testing.assert_close(main[engine][key], value, rtol=0, atol=2e-6, msg=f"{engine} {key}")
    # fp8 base weights under --fsdp (row slices quantised while loading, gathered as bytes): the same forward
    assert main["fp8"][1] == pytest.approx(main["fp8"][0], rel=1e-6) and result[1]["fp8"][1] == main["fp8"][1]
    assert main["prequantized"][1] == pytest.approx(main["prequantized"][0], rel=1e-6)  # a musubi-style fp8 file
    # module_dropout under --fsdp: ranks skip different branches; the run ends and its LoRA is finite and trained
    assert set(main["dropout"]) == set(ref) and all(torch.isfinite(v).all() for v in main["dropout"].values())
    assert any(float(v.abs().max()) > 0 for k, v in main["dropout"].items() if "lora_up" in k)
    # --fsdp --save_state on nodes that do not share --output_dir: one line on every rank, before training
    assert all("is not shared by all ranks" in result[r]["unshared"] for r in (0, 1)), result[0]["unshared"]
    # per-rank resident base weights under --fsdp: at most half of the whole model plus one block
    for rank in (0, 1):
        r = result[rank]
        assert r["sharded"] <= r["full"] / 2 + r["block"], (r["sharded"], r["full"], r["block"])
