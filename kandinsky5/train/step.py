"""The optimizer step of LoRA training: gradient all-reduce, finiteness check (a NaN/inf stops every rank before
the weights change), clipping, optimizer and LR schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.train.distributed import DistContext, _all_reduce_mean_

if TYPE_CHECKING:
    pass


log = get_logger(__name__)


class NonFiniteLoss(UserError):
    """The loss or the gradient norm became NaN/inf; nothing is saved at that step."""


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean loss of the step over micro-batches and ranks
    grad_norm: float  # before clipping
    lr: float


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
    """Average grads and loss over ranks, refuse non-finite values, clip, step optimizer and LR schedule.

    ``loss_sum`` is the sum of the (unscaled) micro-batch losses of this step on this rank; ``grad_scale`` fixes the
    gradient of a short accumulation at the end of an epoch (``accumulation / micro_batches``).  Raises
    ``NonFiniteLoss`` *before* the weights change, on every rank at once (the flag travels in the all-reduce).
    """
    grads = [p.grad for p in params if p.grad is not None]
    loss = (loss_sum.detach().float() / micro_batches).reshape(1)
    _all_reduce_mean_(ctx, [*grads, loss])
    if grad_scale != 1.0:
        torch._foreach_mul_(grads, grad_scale)
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if grads else torch.zeros(())
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
