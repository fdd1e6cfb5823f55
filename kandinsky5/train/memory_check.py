"""Start-up memory plan of a training run (issue 19): every bucket and every sampling call, checked before the DiT
loads; ``--blocks_to_swap auto`` resolved here.

Inputs: the cached items' latent shapes and dataset batch sizes (``dataset.latent_dataset.CachedItem``: shape
``(T, h, w)``), the sampling requests at their own resolution (CFG batch), the adapter tensors the network module
creates (built on a meta DiT: any ``--network_module`` / ``--network_args`` is counted exactly; LoHa and LoKr with
their own activations, :func:`network_workload`), the optimizer, the attention and the precision.  Text is planned
at the task's maximum length.  The budget, the rule of ``auto`` and the error when nothing fits:
``kandinsky5.memory.planner``.
"""

from __future__ import annotations

import dataclasses
import importlib

from kandinsky5.common import UserError, get_logger
from kandinsky5.memory.activations import StepShape, Workload, network_workload, optimizer_kind
from kandinsky5.memory.planner import Planner, RunPlan, check_memory, distinct, sampling_shape
from kandinsky5.train.config import TrainConfig

__all__ = ["lora_shapes_of", "training_shapes", "check_training_memory"]

log = get_logger(__name__)


def lora_shapes_of(network) -> tuple[tuple[int, int], ...] | None:
    """2-D shapes of the trainable tensors of ``network`` (None: not buildable; the default targets are used)."""
    if network is None:
        return None
    shapes = [tuple(p.shape) for p in network.parameters() if p.requires_grad]
    return tuple((s[0], s[1] if len(s) > 1 else 1) for s in shapes)


def _meta_network(cfg: TrainConfig):
    """The network the trainer builds (any adapter kind; ``--dim_from_weights``: the file's), on a meta DiT."""
    from kandinsky5.train.adapters import meta_network

    try:
        return meta_network(cfg, importlib.import_module(cfg.network.module))
    except (ImportError, ValueError, TypeError, RuntimeError, NotImplementedError, UserError) as exc:
        log.debug("memory plan: LoRA shapes from the default targets (%s)", exc)
        return None


def adapter_workload(cfg: TrainConfig, act_bytes: int) -> dict[str, object]:
    """The activation model's adapter inputs (``Workload`` fields) for the network the trainer builds."""
    network = _meta_network(cfg)
    if network is None:
        return {"lora": None, "lora_rank": cfg.network.dim}
    return {"lora": lora_shapes_of(network), "lora_rank": cfg.network.dim, **network_workload(network, act_bytes)}


def training_shapes(task, items) -> tuple[StepShape, ...]:
    """One StepShape per (dataset batch size, latent bucket) of the cached items."""
    shapes = {(i.batch_size, i.shape) for i in items}
    return distinct([StepShape(b, 4 * (t - 1) + 1, h * 8, w * 8, task.text_max_length) for b, (t, h, w) in shapes])


def check_training_memory(cfg: TrainConfig, ctx, items, requests) -> TrainConfig:
    """Plan and check one rank (``ctx``: the DistContext; see ``planner.check_memory``); the returned config has
    ``auto`` resolved.  Under ``--fsdp`` the weights, the LoRA and its optimizer state are one rank's shards."""
    from kandinsky5.model.loading import checkpoint_files, read_header

    shards = ctx.world_size if cfg.distributed.fsdp else 1
    act = 2 if cfg.autocast else 4
    work = Workload(optimizer=optimizer_kind(cfg.optimizer.type),
                    attention="nabla" if cfg.attention.nabla else cfg.attention.backend, nabla=cfg.attention.nabla,
                    act_bytes=act, accumulation=cfg.gradient_accumulation_steps, shards=shards,
                    step_cache=cfg.sample.magcache is not None, **adapter_workload(cfg, act))  # fmt: skip
    samples = distinct([sampling_shape(cfg.task, r) for r in requests])
    header = read_header(checkpoint_files(cfg.dit_path))
    run = RunPlan(cfg.task, cfg.weight_dtype, work, training_shapes(cfg.task, items), samples, header=header,
                  fsdp_world=shards if shards > 1 else 0)  # fmt: skip
    what = f"training ({len(run.train_shapes)} bucket(s), {len(samples)} sampling shape(s))"
    memory = check_memory(Planner(run), cfg.memory, ctx.device, what)
    return dataclasses.replace(cfg, memory=memory)
