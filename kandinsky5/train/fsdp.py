"""``--fsdp``: the DiT's frozen weights, the LoRA and its optimizer state sharded over the ranks with FSDP2.

Layout.  ``torch.distributed.fsdp.fully_shard`` on every text and visual block and on the root DiT (embeddings, time
MLP, out layer), over a 1-D mesh of all ranks.  Each tensor is split along dim 0 (``torch.chunk``: rank r holds rows
``[r*ceil(n/N), (r+1)*ceil(n/N))``, FSDP pads the last).  The LoRA branches are registered under the block whose
Linear they wrap (``<block>.lora_branches``; a branch outside every block goes under the root), so one all-gather
per block brings its base weights and its LoRA together (mixed dtypes travel as bytes) and one reduce-scatter
returns 1/N of its LoRA gradients.  The forward of every block is unchanged: the LoRA keeps wrapping the Linear's
``forward`` (``networks.lora``), checkpointing keeps patching the block's ``forward``; FSDP's hooks run around both.

Loading, shard by shard.  The DiT is built on the meta device with its storage dtypes (``memory_plan.storage_dtype``),
sharded, allocated with ``to_empty`` (only this rank's shards) and filled from the memory-mapped safetensors file
with ``loading.iter_row_slices``: each rank reads only its own rows of each tensor.  No rank ever holds the whole
model; the peak host memory of loading is one tensor slice (plus, on a CPU device, the rank's own shards).

fp8 (``--fp8_base``): supported.  The fp8 weights and their fp32 ``scale_weight`` (made frozen parameters here, so
FSDP shards them: scales are per output row, so a rank's rows of the weight and of the scale are the same rows) are
quantised row slice by row slice while loading; the block all-gather moves them as bytes and ``FP8Linear``
dequantises after the gather, as without FSDP.

Saving.  The LoRA file: ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` gathers the full LoRA state
on rank 0, which loads it into an unsharded copy of the network (``shadow``) and writes it with the network module's
``save_lora``: the same file as a one-GPU run.  The state directory stores the same full ``network.safetensors`` and
the sharded optimizer state as a ``torch.distributed.checkpoint`` directory ``optimizer/`` (every rank writes its
shard, so with several nodes ``--output_dir`` must be on a shared filesystem: checked at start-up).  Resume with the
same number of ranks is exact; another number is refused (the data order and the RNG streams are per rank).

Branches skipped at random (LoRA ``module_dropout``) differ between ranks: FSDP then reduce-scatters zeros for a
branch this rank skipped (``set_reduce_scatter_unused_params``, the counterpart of DDP's unused parameters) and the
DiT's inputs require grad, so every block runs its backward, and its reduce-scatter, in the same order on every rank.

Sampling during training runs on every rank in lockstep (each forward all-gathers the blocks), rank 0 writes.
Refused at start-up (``distributed.distributed_config_from_args``): ``--blocks_to_swap`` (sharding replaces it),
``--offload_dit_during_sampling``, the ``--ddp_*`` flags.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kandinsky5.common import UserError, get_logger, seed_everything
from kandinsky5.memory import fp8
from kandinsky5.memory_plan import block_names, sharded_plan, storage_dtype, stored_dtypes
from kandinsky5.model.loading import check_checkpoint_fits, checkpoint_files, iter_row_slices, load_dtype
from kandinsky5.train.distributed import DistContext, Engine, broadcast_object, skips_branches

if TYPE_CHECKING:
    from kandinsky5.train.config import TrainConfig

log = get_logger(__name__)

BRANCHES = "lora_branches"  # attribute of a block holding the LoRA modules that FSDP shards with it


# ----------------------------------------------------------------------------------------------------------------
# helpers on (possibly sharded) tensors
# ----------------------------------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_rows(t: torch.Tensor) -> tuple[int, int]:
    """Rows [start, stop) along dim 0 of the full tensor that this rank holds (everything for a plain tensor)."""
    if not hasattr(t, "device_mesh"):
        return 0, t.shape[0] if t.ndim else 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    start = offset[0] if shape[0] else 0
    return start, start + shape[0]


def _fill_(t: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's rows of ``full`` into ``t`` (a DTensor shard or a whole tensor)."""
    start, stop = local_rows(t)
    src = full if not t.ndim else full[start:stop]
    _local(t).copy_(src.reshape(_local(t).shape))


def resident_bytes(module: nn.Module, skip: str | None = None) -> int:
    """Bytes of the weight storage this rank holds right now (its shards; whole tensors for unsharded ones),
    leaving out entries under a submodule named ``skip`` (e.g. :data:`BRANCHES`, the LoRA)."""
    seen, total = set(), 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        storage = _local(t).untyped_storage()
        if (skip and f".{skip}." in f".{name}") or storage.data_ptr() in seen or not storage.nbytes():
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


# ----------------------------------------------------------------------------------------------------------------
# building the sharded model
# ----------------------------------------------------------------------------------------------------------------


def _storage_dtypes_(dit: nn.Module, dtype: torch.dtype, stored: dict) -> None:
    """On the meta model: every parameter in its storage dtype, frozen; fp8 scale buffers become frozen parameters
    (FSDP shards parameters, not buffers); keys stay the same."""
    for prefix, module in dit.named_modules():
        for leaf, p in list(module._parameters.items()):
            if p is not None:
                key = f"{prefix}.{leaf}" if prefix else leaf
                target = storage_dtype(key, p, dtype, stored)
                module._parameters[leaf] = nn.Parameter(torch.empty_like(p, dtype=target), requires_grad=False)
        for leaf, b in list(module._buffers.items()):
            if b is not None:
                del module._buffers[leaf]
                module.register_parameter(leaf, nn.Parameter(torch.empty_like(b), requires_grad=False))


def _attach_branches(dit: nn.Module, network: nn.Module) -> None:
    """Register each LoRA module (``lora_name`` = the wrapped module's path) under its block (or the root)."""
    blocks = block_names(dit)
    groups: dict[str, list[nn.Module]] = {}
    for sub in network.modules():
        target = getattr(sub, "lora_name", None)
        if isinstance(target, str):
            owner = next((b for b in blocks if target.startswith(b + ".")), "")
            groups.setdefault(owner, []).append(sub)
    placed = {id(p) for mods in groups.values() for m in mods for p in m.parameters()}
    missing = [n for n, p in network.named_parameters() if id(p) not in placed]
    if missing:
        raise UserError(f"--fsdp: network parameter {missing[0]} belongs to no module with a lora_name (DiT path)")
    for owner, mods in groups.items():
        (dit.get_submodule(owner) if owner else dit).add_module(BRANCHES, nn.ModuleList(mods))


def _shard(dit: nn.Module, ctx: DistContext, reshard_after_forward: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in [*dit.text_transformer_blocks, *dit.visual_transformer_blocks]:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(dit, mesh=mesh)


def _load_shards(dit: nn.Module, files: list[Path], quantize: set[str], dtype: torch.dtype, fast: bool, device):
    """Fill the base weights (every entry of ``dit`` outside the LoRA branches) from this rank's row slices; the
    layers in ``quantize`` are quantised slice by slice (their scales are made with the weight)."""
    tensors = {k: t for k, t in [*dit.named_parameters(), *dit.named_buffers()] if f".{BRANCHES}." not in f".{k}"}
    made = {f"{m}.scale_weight" for m in quantize}
    filled, wanted = set(), {}
    for key, t in tensors.items():
        start, stop = local_rows(t)
        if start == stop:
            filled.add(key)  # no rows of it on this rank
        elif key not in made:
            wanted[key] = (start, stop)
    calc = device if device.type == "cuda" else torch.device("cpu")
    with torch.no_grad():
        for key, part in iter_row_slices(files, wanted):
            module, _, leaf = key.rpartition(".")
            if module in quantize and leaf == "weight":
                q, scale = fp8.quantize_weight(part.to(calc), part.shape[1] if fast else fp8.DEFAULT_BLOCK)
                _local(tensors[key]).copy_(q)
                _local(tensors[f"{module}.scale_weight"]).copy_(
                    scale.view_as(_local(tensors[f"{module}.scale_weight"]))
                )
                filled.add(f"{module}.scale_weight")
            else:
                _local(tensors[key]).copy_(part.to(load_dtype(key, part, dtype)))
            filled.add(key)
    if set(tensors) - filled:
        raise RuntimeError(f"sharded load left {sorted(set(tensors) - filled)[:3]} unfilled")


def check_shared_directory(ctx: DistContext, directory: Path) -> None:
    """With several ranks, every rank must see the files the others write in ``directory`` (the sharded optimizer
    state is written by every rank): each writes a probe named with a token of this run, rank 0 checks them all."""
    if not ctx.distributed:
        return
    import secrets

    import torch.distributed as dist

    token = broadcast_object(ctx, secrets.token_hex(8))
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".k5-shared-probe-{token}-{ctx.rank}"
    probe.write_text("")
    dist.barrier()
    seen = all((directory / f".k5-shared-probe-{token}-{r}").exists() for r in range(ctx.world_size))
    shared = broadcast_object(ctx, seen)  # rank 0's view decides
    probe.unlink(missing_ok=True)
    if not shared:
        raise UserError(
            f"--save_state with --fsdp: --output_dir {directory} is not shared by all ranks (every rank writes its "
            "optimizer shard there); put it on a filesystem every node mounts"
        )


def _shadow_network(cfg: TrainConfig, module, dit: nn.Module) -> nn.Module:
    """An unsharded CPU copy of the network for saving on rank 0 (global RNG untouched); the same modules and
    shapes as the trained one (any adapter kind; ``--dim_from_weights``: those of the file)."""
    from kandinsky5.train.adapters import new_network

    with torch.random.fork_rng(devices=[]):
        return new_network(cfg, module, dit)


def build_fsdp_engine(cfg: TrainConfig, ctx: DistContext, seed: int, make_network) -> FSDPEngine:
    """The sharded DiT with its sharded LoRA (see the module docstring)."""
    from kandinsky5.memory.build import enable_gradient_checkpointing, meta_dit

    if cfg.memory.fp8_fast:
        fp8.check_fp8_fast(ctx.device)
    files = checkpoint_files(cfg.dit_path)
    dit, header, quantize, _ = meta_dit(cfg.task, cfg.dit_path, cfg.attention, cfg.memory)
    check_checkpoint_fits(cfg.task, dit, files, frozenset(f"{m}.scale_weight" for m in quantize), str(cfg.dit_path))
    if cfg.save.save_state:
        check_shared_directory(ctx, cfg.save.output_dir)
    stored = stored_dtypes(header)
    log.info("memory: %s | --fsdp over %d rank(s)", cfg.memory.describe(), ctx.world_size)
    plan = sharded_plan(dit, cfg.weight_dtype, ctx.world_size, stored)
    log.info("memory plan for %s (weights, %s):\n%s", cfg.task.name, str(cfg.weight_dtype).removeprefix("torch."),
             plan.table())  # fmt: skip
    _storage_dtypes_(dit, cfg.weight_dtype, stored)
    if cfg.memory.gradient_checkpointing:
        enable_gradient_checkpointing(dit, cfg.memory.activation_cpu_offload, pin_memory=ctx.device.type == "cuda")
    seed_everything(seed)  # the same LoRA init on every rank
    network, module = make_network(dit)
    shadow = _shadow_network(cfg, module, dit) if ctx.is_main else None
    full = {k: v.detach().clone() for k, v in network.state_dict().items()}
    _attach_branches(dit, network)
    _shard(dit, ctx, cfg.distributed.reshard_after_forward)
    dit.to_empty(device=ctx.device)
    _load_shards(dit, files, set(quantize), cfg.weight_dtype, cfg.memory.fp8_fast, ctx.device)
    with torch.no_grad():
        for key, t in [*network.named_parameters(), *network.named_buffers()]:
            _fill_(t, full[key])
    log.info("FSDP2: %d blocks + root sharded over %d rank(s); this rank holds %.2f MB of weights",
             len(block_names(dit)), ctx.world_size, resident_bytes(dit) / 1e6)  # fmt: skip
    return FSDPEngine(ctx, dit, network, module, shadow)


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------


class FSDPEngine(Engine):
    """The loss calls the sharded DiT; gradients are reduce-scattered; state goes through DCP (module docstring)."""

    kind = "fsdp"
    sharded = True

    def __init__(self, ctx: DistContext, dit, network, module, shadow: nn.Module | None):
        super().__init__(ctx, dit, network, module)
        self.shadow = shadow
        self.skips = skips_branches(network)
        if self.skips:  # a branch one rank skipped is reduce-scattered as zeros from that rank (DDP's unused params)
            dit.set_reduce_scatter_unused_params(True)

    @property
    def model(self) -> Callable[..., torch.Tensor]:
        return self._forward if self.skips else self.dit

    def _forward(self, x: torch.Tensor, text_embed: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The DiT with inputs that require grad, so every block runs its backward (and its reduce-scatter) in the
        same order on every rank, even a block all of whose LoRA branches this rank skipped."""
        if torch.is_grad_enabled():
            x, text_embed = x.detach().requires_grad_(), text_embed.detach().requires_grad_()
        return self.dit(x, text_embed, *args, **kwargs)

    @contextlib.contextmanager
    def sync(self, last: bool):
        self.dit.set_requires_gradient_sync(last)  # accumulate unsharded until the last micro-batch
        yield

    def network_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.network, options=options)

    def saveable_network(self, state: dict[str, torch.Tensor]) -> nn.Module:
        self.shadow.load_state_dict(state)
        return self.shadow

    def optimizer_files(self, optimizer: torch.optim.Optimizer, staging: Path) -> dict[str, Callable]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from kandinsky5.files import WriteError, write_reason

        state = get_optimizer_state_dict(self.network, optimizer)
        if self.ctx.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        self.ctx.barrier()
        try:  # a failure on any rank is raised on every rank by DCP
            dcp.save({"optimizer": state}, checkpoint_id=staging)
        except (OSError, CheckpointException) as exc:
            if self.ctx.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            reason = write_reason(exc, staging.parent) if isinstance(exc, OSError) else str(exc).splitlines()[0]
            raise WriteError(f"cannot write the sharded optimizer state {staging}: {reason}", reason) from None
        self.ctx.barrier()
        return {"optimizer": lambda p: os.replace(staging, p)}

    def load_state(self, optimizer: torch.optim.Optimizer, network_sd: dict, optimizer_src) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if isinstance(optimizer_src, dict):
            raise UserError("--resume: this state was saved without --fsdp (optimizer.pt); resume without --fsdp")
        set_model_state_dict(self.network, network_sd, options=StateDictOptions(full_state_dict=True))
        state = get_optimizer_state_dict(self.network, optimizer)
        dcp.load({"optimizer": state}, checkpoint_id=optimizer_src)
        set_optimizer_state_dict(self.network, optimizer, state)
