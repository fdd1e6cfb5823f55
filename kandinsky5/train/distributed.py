"""Multi-process training on torch's own engines: the process group, the distributed flags, data parallel (DDP).

Launch with ``accelerate launch`` or ``torchrun``, on one node or several (env ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).  NCCL on CUDA, gloo on CPU.  The collectives below are no-ops for a
single process.

Engines (:class:`Engine`, built once by :func:`build_engine`; ``engine.model`` is what the loss calls):

* ``single`` -- one process: the loss calls the DiT (with its LoRA attached) directly.
* ``ddp`` -- ``torch.nn.parallel.DistributedDataParallel`` over the LoRA network only.  The frozen DiT (it may be
  fp8 or block-swapped) is held outside DDP's module tree, so DDP neither broadcasts nor tracks it; DDP's forward
  runs the DiT with the LoRA attached.  Torch buckets the LoRA gradients and overlaps their all-reduce with
  backward.  A network that skips branches (``module_dropout``) runs with ``find_unused_parameters``: DDP then
  reduces a branch that one rank skipped with zeros from that rank, so nothing is averaged by list position and
  nothing hangs.  Non-final micro-batches of a gradient accumulation run under ``no_sync()``.
* ``fsdp`` -- ``--fsdp``: FSDP2 ``fully_shard`` per block (:mod:`kandinsky5.train.fsdp`).

The loss of each step is averaged over ranks with one scalar all-reduce, so a NaN or inf on any rank stops every
rank at the same step (the gradients are averaged by the engine, so a NaN gradient reaches every rank too).

``--ddp_timeout`` (minutes) bounds every collective.  By default it is 60 minutes plus twice the estimated time of one
sampling event (:func:`default_timeout_minutes`), because the other ranks wait in a barrier while rank 0 samples.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from kandinsky5.common import UserError, get_logger, seed_everything
from kandinsky5.train.state import capture_rng

if TYPE_CHECKING:
    import argparse
    from types import ModuleType

    from kandinsky5.configs import TaskConfig
    from kandinsky5.sampling.pipeline import GenerationRequest
    from kandinsky5.train.config import TrainConfig


log = get_logger(__name__)

# minutes one sampled prompt of 47,616 latent tokens (5 s SD), 50 steps with CFG takes, per model family
_SAMPLE_MINUTES = {"pro": 20.0, "lite": 4.0}
_REFERENCE_TOKENS = 47_616
_BASE_TIMEOUT = 60.0
# torch.optim classes that step DTensor shards (checked on FSDP2); Adafactor, Rprop and the bitsandbytes / transformers
# optimizers do not
FSDP_OPTIMIZERS = ("AdamW", "Adam", "SGD", "RAdam", "NAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop")


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


@dataclass(frozen=True)
class DistributedConfig:
    """How several processes train together (``--fsdp``, ``--ddp_*``); ignored by a single process without --fsdp."""

    fsdp: bool = False  # --fsdp / accelerate --use_fsdp: shard weights, LoRA and optimizer state (FSDP2)
    timeout_minutes: float | None = None  # --ddp_timeout; None = default_timeout_minutes(...)
    gradient_as_bucket_view: bool = False  # --ddp_gradient_as_bucket_view (DDP's argument of that name)
    static_graph: bool = False  # --ddp_static_graph (DDP's argument of that name)
    reshard_after_forward: bool = True  # FSDP2: free each block's gathered weights after its forward

    def describe(self, world_size: int) -> str:
        if self.fsdp:
            return f"FSDP2 over {world_size} rank(s) (weights, LoRA and optimizer state sharded per block)"
        return "DDP over the LoRA" if world_size > 1 else "single process"


# ----------------------------------------------------------------------------------------------------------------
# flags
# ----------------------------------------------------------------------------------------------------------------


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several GPUs and nodes (see docs/training.md, 'Several GPUs and nodes')")
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the frozen DiT weights, the LoRA and its optimizer state over the processes (FSDP2, one shard "
        "group per block); also on under accelerate launch --use_fsdp (ACCELERATE_USE_FSDP=true). Default off: "
        "each process holds the whole model and the LoRA gradients are averaged (DDP)",
    )
    g.add_argument(
        "--ddp_timeout",
        type=float,
        default=None,
        help="minutes any rank waits in a collective before the run fails (default: 60 plus twice the estimated "
        "time of one sampling event, since the others wait while rank 0 samples)",
    )
    g.add_argument(
        "--ddp_gradient_as_bucket_view",
        action="store_true",
        help="DDP gradient_as_bucket_view=True: LoRA gradients are views into DDP's all-reduce buckets, saving one "
        "gradient copy (default off; not with --fsdp)",
    )
    g.add_argument(
        "--ddp_static_graph",
        action="store_true",
        help="DDP static_graph=True: the same LoRA branches run every step (default off; not with --fsdp, not with "
        "network_args module_dropout)",
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def distributed_config_from_args(args: argparse.Namespace, network_args: dict[str, Any]) -> DistributedConfig:
    """Read the flags (and accelerate's FSDP environment) and refuse combinations that cannot work, before any
    model is loaded."""
    fsdp = bool(args.fsdp) or _env_true("ACCELERATE_USE_FSDP")
    if args.ddp_timeout is not None and args.ddp_timeout <= 0:
        raise UserError(f"--ddp_timeout must be > 0 minutes, got {args.ddp_timeout:g}")
    if fsdp:
        _check_fsdp_args(args)
    if args.ddp_static_graph and float(network_args.get("module_dropout", 0) or 0) > 0:
        raise UserError(
            "--ddp_static_graph needs the same LoRA branches every step, but network_args module_dropout skips "
            "branches at random; drop one of them"
        )
    return DistributedConfig(
        fsdp=fsdp,
        timeout_minutes=args.ddp_timeout,
        gradient_as_bucket_view=bool(args.ddp_gradient_as_bucket_view),
        static_graph=bool(args.ddp_static_graph),
        reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() != "false",
    )


def _check_fsdp_args(args: argparse.Namespace) -> None:
    from kandinsky5.train.optim import optimizer_class

    cls, _ = optimizer_class(args.optimizer_type)
    if not (cls.__module__.startswith("torch.optim") and cls.__name__ in FSDP_OPTIMIZERS):
        raise UserError(
            f"--optimizer_type {args.optimizer_type} ({cls.__module__}.{cls.__name__}) cannot step the sharded "
            f"parameters of --fsdp; use one of {', '.join(FSDP_OPTIMIZERS)} (torch.optim), or drop --fsdp"
        )
    for flag in ("ddp_gradient_as_bucket_view", "ddp_static_graph"):
        if vars(args)[flag]:
            raise UserError(f"--{flag} is a DDP setting; --fsdp shards the gradients itself, so drop --{flag}")
    if args.blocks_to_swap:
        raise UserError(
            f"--blocks_to_swap {args.blocks_to_swap} cannot be combined with --fsdp: sharding already keeps only "
            "1/N of every block on each GPU; drop --blocks_to_swap (or --fsdp to swap on every GPU)"
        )
    if args.offload_dit_during_sampling:
        raise UserError("--offload_dit_during_sampling cannot move a sharded DiT; drop it (--fsdp keeps 1/N per GPU)")
    if _env_true("FSDP_OFFLOAD_PARAMS"):
        raise UserError(
            "accelerate's fsdp_offload_params is not supported by --fsdp; set it to false in `accelerate config` "
            "(use --blocks_to_swap without --fsdp to keep weights in CPU memory)"
        )


def default_timeout_minutes(task: TaskConfig, requests: Sequence[GenerationRequest]) -> float:
    """60 min + 2 x the estimated minutes of one sampling event: per prompt ``ref x steps/50 x tokens/47,616``
    (x 1/2 without CFG), with ref = 20 min for Pro and 4 min for Lite (a 5 s SD Pro video takes 15-20 min)."""
    per_prompt = _SAMPLE_MINUTES.get(task.family, 0.0)
    total = 0.0
    for r in requests:
        t, h, w, _ = r.spec.latent_shape
        work = r.spec.steps / 50 * (t * (h // 2) * (w // 2)) / _REFERENCE_TOKENS
        total += per_prompt * work * (1.0 if abs(r.spec.guidance - 1.0) > 1e-6 else 0.5)
    return _BASE_TIMEOUT + 2 * math.ceil(total)


# ----------------------------------------------------------------------------------------------------------------
# the process group
# ----------------------------------------------------------------------------------------------------------------


def init_distributed(timeout_minutes: float = _BASE_TIMEOUT, fsdp: bool = False) -> DistContext:
    """Join the process group started by ``accelerate launch`` / ``torchrun`` (env RANK, WORLD_SIZE, LOCAL_RANK).

    A single process with ``fsdp`` gets a one-rank group (FSDP2 needs one; nothing is communicated).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, device_id=device if cuda else None)
    elif fsdp and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank = dist.get_rank() if world > 1 else 0
    if world > 1 and rank == 0:
        log.info("process group: %d ranks (%s), collective timeout %g min", world, backend, timeout_minutes)
    return DistContext(rank=rank, world_size=world, device=device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(ctx: DistContext, value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ranks (a new tensor; NaN on one rank gives NaN on all)."""
    value = value.detach().float().clone()
    if ctx.distributed:
        dist.all_reduce(value)
        value /= ctx.world_size
    return value


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_ranks_agree(ctx: DistContext, params: Iterable[torch.Tensor]) -> str:
    """SHA-256 of this rank's LoRA weights; with several ranks, every rank's digest is compared and logged, and a
    difference (a broken gradient reduction) is an error.  Sharded (FSDP) weights differ by design: not compared."""
    params = list(params)
    if any(_is_sharded(p) for p in params):
        return ""
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
            raise RuntimeError(f"LoRA weights differ between ranks ({digests}); the gradient reduction failed")
    return digest


def gather_rng(ctx: DistContext, generator: torch.Generator) -> list[dict]:
    """Every rank's RNG states, on every rank (rank order)."""
    state = capture_rng(generator)
    if not ctx.distributed:
        return [state]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


# ----------------------------------------------------------------------------------------------------------------
# engines
# ----------------------------------------------------------------------------------------------------------------


class Engine:
    """One process (and the interface of the others): how the loss reaches the DiT, gradient sync, state I/O."""

    kind = "single"
    sharded = False  # True: parameters are DTensor shards (FSDP); False: every rank holds whole tensors

    def __init__(self, ctx: DistContext, dit: nn.Module, network: nn.Module, module: ModuleType):
        self.ctx, self.dit, self.network, self.module = ctx, dit, network, module

    @property
    def model(self) -> Callable[..., torch.Tensor]:
        """What the loss calls with the DiT's signature."""
        return self.dit

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward + backward; gradients are reduced only when ``last``."""
        return contextlib.nullcontext()

    def network_state(self) -> dict[str, torch.Tensor]:
        """The full LoRA state dict (``network.state_dict()`` keys, CPU) on rank 0 ({} elsewhere); collective under
        FSDP."""
        if not self.ctx.is_main:
            return {}
        return {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}

    def saveable_network(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A network holding ``state`` that the network module's ``save_lora`` accepts (rank 0)."""
        return self.network

    def optimizer_files(self, optimizer: torch.optim.Optimizer, stem: str) -> dict[str, Callable]:
        """``{file name: writer(path)}`` of the optimizer state inside a state directory (rank 0 writes them);
        collective under FSDP."""
        from kandinsky5.files import save_torch

        return {"optimizer.pt": lambda p: save_torch(optimizer.state_dict(), p)}

    def load_state(self, optimizer: torch.optim.Optimizer, network_sd: dict, optimizer_src) -> None:
        """Restore what :meth:`network_state` and :meth:`optimizer_files` saved."""
        if not isinstance(optimizer_src, dict):
            raise UserError(f"--resume: {optimizer_src} is a sharded (--fsdp) optimizer state; resume with --fsdp")
        self.network.load_state_dict(network_sd)
        optimizer.load_state_dict(optimizer_src)


class _LoRAForward(nn.Module):
    """``dit(...)`` with the LoRA network as the only registered submodule, i.e. the only thing DDP reduces."""

    def __init__(self, dit: nn.Module, network: nn.Module):
        super().__init__()
        self.network = network
        object.__setattr__(self, "dit", dit)  # not a submodule: DDP must neither broadcast nor track the base

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.dit(*args, **kwargs)


def skips_branches(network: nn.Module) -> bool:
    """True when some branch of ``network`` may be skipped in a forward (LoRA ``module_dropout``)."""
    return any(float(getattr(m, "module_dropout", 0.0) or 0.0) > 0 for m in network.modules())


class DDPEngine(Engine):
    """``DistributedDataParallel`` over the LoRA (see the module docstring)."""

    kind = "ddp"

    def __init__(self, ctx: DistContext, dit, network, module, cfg: DistributedConfig):
        super().__init__(ctx, dit, network, module)
        from torch.nn.parallel import DistributedDataParallel

        unused = skips_branches(network)
        self.ddp = DistributedDataParallel(
            _LoRAForward(dit, network),
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            forward_sync_buffers=False,  # alpha buffers are constant: synced from rank 0 at init only
            find_unused_parameters=unused,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
            static_graph=cfg.static_graph,
        )
        log.info("DDP over the LoRA on %d ranks%s", ctx.world_size, " (find_unused_parameters)" if unused else "")

    @property
    def model(self) -> Callable[..., torch.Tensor]:
        return self.ddp

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


def build_engine(cfg: TrainConfig, ctx: DistContext, seed: int, make_network) -> Engine:
    """Load the DiT, build the LoRA (``make_network(dit) -> (network, network module)``) with the same init on every
    rank, and wrap them for ``ctx``: one process, DDP, or FSDP (``--fsdp``)."""
    if cfg.distributed.fsdp:
        from kandinsky5.train.fsdp import build_fsdp_engine

        return build_fsdp_engine(cfg, ctx, seed, make_network)
    from kandinsky5.memory.build import build_dit

    dit = build_dit(cfg.task, cfg.dit_path, ctx.device, cfg.weight_dtype, cfg.attention, cfg.memory, training=True,
                    compile=cfg.compile)  # fmt: skip
    dit.requires_grad_(False)
    seed_everything(seed)  # the same LoRA init on every rank (DDP also broadcasts rank 0's)
    network, module = make_network(dit)
    network.to(ctx.device)
    if not ctx.distributed:
        return Engine(ctx, dit, network, module)
    return DDPEngine(ctx, dit, network, module, cfg.distributed)
