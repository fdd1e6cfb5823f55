"""How a LoRA branch is evaluated fast, without changing what it computes (used by ``networks.lora.LoRAModule``).

* :func:`add_up_projection`: ``y + scale * h @ up.T`` as one ``addmm`` that accumulates into the base output ``y``
  (no full-size temporary for the branch, no separate add); y (..., out), h (..., r), up (out, r).
* :class:`SharedDown`: modules whose base Linears read the same input tensor (q, k, v of one attention) compute
  their rank activations ``down(x)`` (..., r_i) as one matmul of the concatenated down weights, split.
* :func:`group_shared_inputs`: attaches a ``SharedDown`` to every set of modules with the same group key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from networks.lora import LoRAModule

__all__ = ["SharedDown", "add_up_projection", "group_shared_inputs"]

log = logging.getLogger(__name__)


def add_up_projection(y: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``y + scale * h @ up.T`` as one GEMM that accumulates into a copy of y (no full-size temporary or add).

    Falls back to the plain add when the base output's dtype differs from the branch's (y keeps its dtype).
    """
    up = up.to(h.dtype)
    if y.dtype != h.dtype:
        return y + F.linear(h * scale, up).to(y.dtype)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.t(), alpha=scale)
    return out.view(y.shape)


class SharedDown:
    """LoRA modules whose base Linears read the same input tensor (q, k, v of one attention).

    The first member called with an input ``x`` computes every member's rank activation in one matmul (the down
    weights concatenated, the result split, so autograd also runs one matmul per gradient) and leaves the others'
    rows for them; a member called with that same tensor object takes its rows.  The result equals each member's
    own ``down(x)`` up to matmul round-off.  If a member is called with a different input while rows are still
    pending, the grouping was wrong for this model: the group switches itself off and every member computes alone.
    Members are addressed by position, never by object identity, so torch.compile traces every group alike.
    """

    def __init__(self, members: Sequence[LoRAModule]):
        self.members = list(members)
        self.enabled = True
        self._input: torch.Tensor | None = None
        self._pending: list[torch.Tensor | None] = [None] * len(self.members)

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s rank activation of x (computed now for the whole group, or left by an earlier member)."""
        if not self.enabled:
            return None
        rows = self._pending[index]
        if rows is not None and self._input is x:
            self._pending[index] = None
            if all(p is None for p in self._pending):
                self._input = None
            return rows
        if any(p is not None for p in self._pending):  # rows left unused: members do not share their input here
            self.enabled, self._input, self._pending = False, None, [None] * len(self.members)
            log.debug("LoRA %s: inputs are not shared; fused down-projection off", self.members[index].lora_name)
            return None
        weight = torch.cat([m.lora_down.weight for m in self.members]).to(x.dtype)
        pending: list[torch.Tensor | None] = list(F.linear(x, weight).split([m.rank for m in self.members], dim=-1))
        own, pending[index] = pending[index], None
        self._pending, self._input = pending, x
        return own


def group_shared_inputs(items: Sequence[tuple[str, LoRAModule]], key: Callable[[str], str | None]) -> None:
    """Attach a :class:`SharedDown` to every set of >= 2 modules whose paths have the same non-None ``key``."""
    groups: dict[str, list[LoRAModule]] = {}
    for name, lora in items:
        k = key(name)
        if k is not None:
            groups.setdefault(k, []).append(lora)
    for members in groups.values():
        shared = SharedDown(members) if len(members) > 1 else None
        for i, lora in enumerate(members):
            lora._shared, lora._shared_index = shared, i
