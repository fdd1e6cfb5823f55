"""The optimizer step of LoRA training: loss averaged over ranks, finiteness check (a NaN/inf stops every rank before
the weights change), global-norm clipping, optimizer and LR schedule.

The gradients arrive already averaged over ranks: DDP all-reduces them during backward, FSDP reduce-scatters them to
1/N shards (``kandinsky5.train.distributed``).  Under FSDP the gradients are DTensor shards; the clip norm is then
the global norm over every shard (``clip_grad_norm_`` reduces DTensors), the same number as in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.train.distributed import DistContext, all_reduce_mean

log = get_logger(__name__)


class NonFiniteLoss(UserError):
    """The loss or the gradient norm became NaN/inf; nothing is saved at that step."""


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean loss of the step over micro-batches and ranks
    grad_norm: float  # before clipping
    lr: float


def clip_gradients(params: Sequence[torch.nn.Parameter], max_grad_norm: float) -> torch.Tensor:
    """Clip to ``max_grad_norm`` (0 = measure only); returns the global norm before clipping, a plain tensor."""
    if not any(p.grad is not None for p in params):
        return torch.zeros(())
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def finish_step(
    ctx: DistContext,
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_sum: torch.Tensor,
    micro_batches: int,
    max_grad_norm: float,
    grad_scale: float = 1.0,
) -> StepStats:
    """Average the loss over ranks, refuse non-finite values, clip, step optimizer and LR schedule.

    ``loss_sum`` is the sum of the (unscaled) micro-batch losses of this step on this rank; ``grad_scale`` fixes the
    gradient of a short accumulation at the end of an epoch (``accumulation / micro_batches``).  Raises
    ``NonFiniteLoss`` *before* the weights change, on every rank at once (the loss is all-reduced and the gradient
    norm is a function of the rank-averaged gradients).
    """
    loss = all_reduce_mean(ctx, loss_sum / micro_batches)
    grads = [p.grad for p in params if p.grad is not None]
    if grad_scale != 1.0 and grads:
        torch._foreach_mul_(grads, grad_scale)
    grad_norm = clip_gradients(params, max_grad_norm)
    loss_value, norm_value = float(loss), float(grad_norm)
    if not (np.isfinite(loss_value) and np.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        what = "loss" if not np.isfinite(loss_value) else "gradient norm"
        raise NonFiniteLoss(f"{what} became {loss_value if what == 'loss' else norm_value}")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_value, norm_value, float(lr) if lr is not None else float("nan"))
