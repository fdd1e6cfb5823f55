"""The process group of a training run: joining it (``torchrun`` / ``accelerate launch`` env), broadcasts,
the gradient all-reduce, the RNG gather and the end-of-run check that every rank holds the same LoRA.

NCCL on CUDA, gloo on CPU; every function is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kandinsky5.common import get_logger
from kandinsky5.train.state import (
    capture_rng,
)

if TYPE_CHECKING:
    pass


log = get_logger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(timeout_minutes: int = 60) -> DistContext:
    """Join the process group started by ``accelerate launch`` / ``torchrun`` (env RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)  # rank 0 may sample for a while
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    rank = dist.get_rank() if world > 1 else 0
    return DistContext(rank=rank, world_size=world, device=device)


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_ranks_agree(ctx: DistContext, params: Iterable[torch.Tensor]) -> str:
    """SHA-256 of this rank's LoRA weights; with several ranks, every rank's digest is compared and logged, and a
    difference (a broken all-reduce) is an error."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()[:16]
    if ctx.distributed:
        digests: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(digests, digest)
        if ctx.is_main:
            log.info("LoRA weights per rank: %s", " ".join(digests))
        if len(set(digests)) > 1:
            raise RuntimeError(f"LoRA weights differ between ranks ({digests}); the gradient all-reduce failed")
    return digest


def broadcast_params_(ctx: DistContext, params: Iterable[torch.Tensor]) -> None:
    """Make every rank start from rank 0's LoRA weights."""
    if ctx.distributed:
        for p in params:
            dist.broadcast(p.data, src=0)


def _all_reduce_mean_(ctx: DistContext, tensors: list[torch.Tensor], bucket_bytes: int = 64 << 20) -> None:
    """Average ``tensors`` in place over ranks: flattened (fp32) into buckets of about ``bucket_bytes``, one
    all-reduce each, so a large LoRA needs one bucket of extra memory, not a second copy of its gradients."""
    if not ctx.distributed:
        return
    start, size = 0, 0
    for i, t in enumerate(tensors):
        size += t.numel() * 4
        if size < bucket_bytes and i < len(tensors) - 1:
            continue
        bucket = tensors[start : i + 1]
        flat = torch.cat([b.reshape(-1).float() for b in bucket])
        dist.all_reduce(flat)
        flat /= ctx.world_size
        for b, v in zip(bucket, flat.split([b.numel() for b in bucket])):
            b.copy_(v.view_as(b))
        start, size = i + 1, 0


def gather_rng(ctx: DistContext, generator: torch.Generator) -> list[dict]:
    """Every rank's RNG states, on every rank (rank order)."""
    state = capture_rng(generator)
    if not ctx.distributed:
        return [state]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states
