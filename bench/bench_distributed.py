"""Benchmark multi-process LoRA training: DDP against FSDP (--fsdp) on 1 and 2 ranks, step time and per-rank memory.

    python bench/bench_distributed.py --quick    # 2 timed steps per row (about two minutes on 2 CPU cores)
    python bench/bench_distributed.py            # 5 timed steps per row

Every row runs the trainer's own engine (``kandinsky5.train.distributed.build_engine``: the DiT loaded from a
safetensors file -- shard by shard under FSDP -- the LoRA, torch's DDP or FSDP2), its loss and ``finish_step`` with
AdamW, on the CPU benchmark config of ``bench/bench_train_step.py`` (random-weight DiT, D = 512, F = 2048, 2 text +
4 visual blocks, 5 latent frames of 32x32 = 1280 visual + 64 text tokens, LoRA rank 16, fp32), one sample per rank
per step.  Ranks are processes on this machine: gloo on CPU, NCCL on GPUs (one GPU per rank; with one GPU only the
1-rank rows run).  "1 rank" uses every CPU thread; "2 ranks" split them (one process per half).

Columns: the median step time; global samples per second; per rank, the base weights it holds (tensor storage of
the frozen DiT: its shards under FSDP), its LoRA + AdamW state bytes (gradients, one more LoRA-size copy, are freed
by the step), and the peak resident memory (CPU: the process's peak RSS, which includes torch itself; CUDA:
``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import datetime
import resource
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.configs import DiTConfig, get_task  # noqa: E402

ROWS = [(1, False), (1, True), (2, False), (2, True)]  # (ranks, fsdp)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 timed steps per row")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row, after one warm-up (5)")
    p.add_argument("--model_dim", type=int, default=512, help="DiT width D (512)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (16)")
    args = p.parse_args()
    if args.quick:
        args.steps = 2
    return args


def _dit_config(model_dim: int) -> DiTConfig:
    return DiTConfig(model_dim=model_dim, ff_dim=4 * model_dim, time_dim=model_dim // 2, num_text_blocks=2,
                     num_visual_blocks=4, axes_dims=(16, 24, 24), in_text_dim=256, in_text_dim2=128)  # fmt: skip


def write_checkpoint(path: Path, cfg: DiTConfig) -> Path:
    """A random-weight DiT of ``cfg`` with the official key names, as a safetensors file."""
    from safetensors.torch import save_file

    from kandinsky5.model.dit import DiT

    torch.manual_seed(0)
    dit = DiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.02)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(path))
    return path


def train_config(checkpoint: Path, out: Path, model_dim: int, rank: int, fsdp: bool):
    from kandinsky5.memory.build import MemoryConfig
    from kandinsky5.model import flow
    from kandinsky5.model.dit import AttentionSpec
    from kandinsky5.train.config import NetworkConfig, SampleConfig, SaveConfig, TrainConfig
    from kandinsky5.train.distributed import DistributedConfig
    from kandinsky5.train.optim import OptimizerConfig, SchedulerConfig

    task = replace(get_task("k5-tiny-t2v"), dit=_dit_config(model_dim))
    return TrainConfig(
        task=task, dit_path=checkpoint, dataset_config=out / "unused.toml", attention=AttentionSpec(),
        memory=MemoryConfig(), mixed_precision="no", seed=0, max_train_steps=100, max_train_epochs=None,
        gradient_accumulation_steps=1, max_grad_norm=1.0, i2v_mode="first", timesteps=flow.TimestepConfig(),
        optimizer=OptimizerConfig(), scheduler=SchedulerConfig(), network=NetworkConfig(dim=rank, alpha=rank),
        save=SaveConfig(out, "bench"), sample=SampleConfig(), distributed=DistributedConfig(fsdp=fsdp),
    )  # fmt: skip


def _batch(cfg: DiTConfig, device, seed: int):
    from kandinsky5.train.objective import TrainBatch

    g = torch.Generator().manual_seed(seed)
    batch = TrainBatch(
        latents=torch.randn(1, 5, 32, 32, 16, generator=g).to(device),
        text_embeds=torch.randn(1, 64, cfg.in_text_dim, generator=g).to(device),
        text_mask=torch.ones(1, 64, dtype=torch.bool, device=device),
        pooled=torch.randn(1, cfg.in_text_dim2, generator=g).to(device),
    )
    return batch, torch.rand(1, generator=g).to(device), torch.randn(1, 5, 32, 32, 16, generator=g).to(device)


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).untyped_storage().nbytes() for t in tensors)


def _state_bytes(params, optimizer) -> int:
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
    return _local_bytes(params) + _local_bytes(states)


def _make_network(cfg):
    from networks import lora_kandinsky

    def make(dit):
        network = lora_kandinsky.create_network(1.0, cfg.network.dim, cfg.network.alpha, dit)
        network.apply_to(dit)
        network.train()
        return network, lora_kandinsky

    return make


def _worker(rank: int, world: int, fsdp: bool, port: int, args, checkpoint: Path, out: Path, result) -> None:
    import torch.distributed as dist

    from kandinsky5.train import optim
    from kandinsky5.train.distributed import DistContext, build_engine
    from kandinsky5.train.fsdp import BRANCHES, resident_bytes
    from kandinsky5.train.objective import flow_matching_loss
    from kandinsky5.train.step import finish_step

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(args.total_threads if world == 1 else args.threads)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))  # fmt: skip
    try:
        cfg = train_config(checkpoint, out, args.model_dim, args.rank, fsdp)
        ctx = DistContext(rank, world, device)
        engine = build_engine(cfg, ctx, 0, _make_network(cfg))
        params = [p for p in engine.network.parameters() if p.requires_grad]
        opt = optim.build_optimizer(params, cfg.optimizer)
        sched = optim.build_scheduler(opt, cfg.scheduler, 100)
        times = []
        for step in range(args.steps + 1):
            batch, t, noise = _batch(cfg.task.dit, device, seed=step * world + rank)
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss = flow_matching_loss(engine.model, batch, t, noise, cfg.task.rope_scale)
            loss.backward()
            finish_step(ctx, params, opt, sched, loss.detach(), 1, cfg.max_grad_norm)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        peak = torch.cuda.max_memory_allocated(device) if cuda else rss
        result[(world, fsdp, rank)] = {
            "step": statistics.median(times[1:]), "base": resident_bytes(engine.dit, skip=BRANCHES),
            "lora": _state_bytes(params, opt), "peak": peak,
        }  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import torch.multiprocessing as mp

    args = parse()
    threads = torch.get_num_threads()
    args.total_threads, args.threads = threads, max(1, threads // 2)
    gpus = torch.cuda.device_count()
    result = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "dit.safetensors", _dit_config(args.model_dim))
        for world, fsdp in ROWS:
            if gpus and world > gpus:
                continue
            spawn_args = (world, fsdp, _free_port(), args, checkpoint, Path(tmp), result)
            mp.spawn(_worker, args=spawn_args, nprocs=world, join=True)
    device = torch.cuda.get_device_name(0) if gpus else f"cpu, {threads} threads"
    print(f"DiT D={args.model_dim} F={4 * args.model_dim} blocks 2+4, 1280 visual + 64 text tokens, LoRA rank "
          f"{args.rank}, fp32, 1 sample per rank per step, {device}, {datetime.date.today()}\n")  # fmt: skip
    print("| ranks | engine | step (s) | samples/s | base weights / rank (MB) | LoRA + AdamW state / rank (MB) "
          "| peak memory / rank (MB)* |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|")
    for world, fsdp in ROWS:
        rows = [result[(world, fsdp, r)] for r in range(world) if (world, fsdp, r) in result]
        if not rows:
            continue
        step = max(r["step"] for r in rows)
        name = "FSDP2" if fsdp else ("DDP" if world > 1 else "one process")
        print(f"| {world} | {name} | {step:.3f} | {world / step:.2f} | {max(r['base'] for r in rows) / 1e6:.1f} "
              f"| {max(r['lora'] for r in rows) / 1e6:.2f} | {max(r['peak'] for r in rows) / 2**20:.0f} |")  # fmt: skip
    print("\n* CPU: peak RSS of the rank's process (torch itself included); CUDA: torch.cuda.max_memory_allocated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
