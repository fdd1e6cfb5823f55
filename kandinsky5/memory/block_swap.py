"""Block swap: stream the DiT's last transformer blocks through two GPU slots (hooks only; ``dit.py`` untouched).

Entry points: :func:`enable_block_swap` / :func:`disable_block_swap` (re-exported by ``kandinsky5.memory.build``, which
wires them to ``--blocks_to_swap``), :func:`get_swapper`.  Tensors moved: every parameter and buffer of a streamed
block (fp8 weights and their ``scale_weight`` included), by reassigning ``.data`` so module and parameter identities
-- and hence LoRA wrappers and optimizer references -- survive.

Block swap -- which blocks.  Blocks run in the order text 0..nt-1, visual 0..nv-1.  For N > 0 the *last* N + 2
blocks in that order (visual blocks from the end; text blocks only when N + 2 > nv) are *streamed*: their master
weights live in CPU memory (pinned on CUDA unless ``--no_pinned_memory_for_block_swap``: a ``non_blocking`` copy
from pageable memory is synchronous, so it could not overlap compute) and at most 2 of them are on the GPU at any
time (the one computing and the one being copied), so the GPU holds exactly N blocks fewer (streamed
blocks all have one size unless text blocks are streamed).  Max N = blocks - 2 (Pro 62, Lite 32).  Streaming the
tail puts the first copy behind all resident blocks' compute, and the last two blocks of a forward are the first
two of the backward: a training step copies 2N blocks host-to-device, an inference forward N + 2, and nothing
comes back (frozen masters stay valid on the CPU; a tensor replaced or updated in place on the GPU -- an optimizer
step, a LoRA merge while resident -- is detected by data pointer / version counter and copied back on eviction;
edits through a ``.data`` alias bypass the version counter and are not seen).

Block swap -- stream model (CUDA).

* Copies run on a dedicated copy stream.  A fetch ``copy_``-s the masters into the buffers of the block just
  evicted, after making the copy stream wait on an event recorded when that block's last kernel was queued, so
  two buffer sets are recycled and nothing is reallocated.  The fetch records an event; right before the block
  runs, the compute stream waits on it and ``record_stream`` marks the buffers as used by the compute stream.
* Schedule points: the DiT's forward pre-hook (prefetch the first two streamed blocks), each streamed block's
  forward pre-hook (ensure resident + wait) and forward hook (evict / prefetch), and in training two identity
  autograd functions per streamed block -- on its output (its backward runs just before the block's backward:
  ensure + wait) and on its input x (runs once the block's backward is done: evict / prefetch).  Each point keeps
  the next two streamed blocks of the future access order resident and evicts the others.
* Without checkpointing, autograd saves views of the weights (``F.linear`` saves ``weight.t()``); such a saved
  view would pin a swapped-out block's GPU buffer or, once the buffer is recycled, hand the backward another
  block's weights.  A saved-tensor hook active during each streamed block's forward therefore stores any saved
  tensor that aliases the block's own weights as a reference, re-read from the block's current data in backward
  (fp8 layers save the parameter itself, which ``.data`` swaps update anyway).
* On a CPU device nothing moves but the same schedule runs (``BlockSwapper.trace`` records it).  Tests use
  ``simulate=True``: fetches copy into separate buffers and evicted blocks and buffers hold NaN, so using a block
  that is not resident, or a stale saved tensor, shows up as NaN.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from kandinsky5.common import get_logger
from kandinsky5.memory_plan import STAGING, streamed_block_names

__all__ = ["BlockSwapper", "enable_block_swap", "disable_block_swap", "get_swapper", "pin"]

log = get_logger(__name__)

_SWAPPER = "_k5_block_swapper"


def get_swapper(dit: nn.Module) -> BlockSwapper | None:
    """The swapper attached by :func:`enable_block_swap`, if any."""
    return getattr(dit, _SWAPPER, None)


def _named_tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*block.named_parameters(), *block.named_buffers()]


_PIN_FAILED: list[str] = []  # the first pinning failure of this process (warned about once)


def pin(t: torch.Tensor, pinned: bool) -> torch.Tensor:
    """A pinned copy of a CPU tensor when asked and CUDA exists (pinned memory needs a CUDA runtime).

    If the host cannot lock more memory, the tensor stays pageable and one warning says so (copies then no longer
    overlap compute); later tensors are not retried.
    """
    if not pinned or _PIN_FAILED or not torch.cuda.is_available() or t.is_pinned():
        return t
    try:
        return t.pin_memory()
    except RuntimeError as exc:
        _PIN_FAILED.append(str(exc).splitlines()[0])
        log.warning(
            "block swap: could not pin host memory (%s); the swapped blocks stay in pageable memory, so their "
            "copies no longer overlap compute; free host RAM, or pass --no_pinned_memory_for_block_swap to silence "
            "this", _PIN_FAILED[0],
        )  # fmt: skip
        return t


@dataclass
class _Slot:
    """Swap state of one streamed block."""

    name: str
    block: nn.Module
    masters: dict[str, torch.Tensor] = field(default_factory=dict)  # CPU copies (the truth while evicted)
    resident: bool = False
    fetched: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (data_ptr, version) at fetch
    event: object = None  # CUDA event of the pending copy


@dataclass(frozen=True)
class _WeightRef:
    """A saved tensor that aliases a streamed block's own weight, stored as a reference (see module docstring)."""

    slot: int
    name: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class _BeforeBackward(torch.autograd.Function):
    """Identity on a streamed block's output; its backward runs just before the block's backward."""

    @staticmethod
    def forward(ctx, x, swapper, k):
        ctx.swapper, ctx.k = swapper, k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.swapper._use(ctx.k, "bwd")
        return grad, None, None


class _AfterBackward(torch.autograd.Function):
    """Identity on a streamed block's input x; its backward runs once the block's backward is done."""

    @staticmethod
    def forward(ctx, x, swapper, k):
        ctx.swapper, ctx.k = swapper, k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.swapper._schedule("bwd", ctx.k, inclusive=False)
        return grad, None, None


class BlockSwapper:
    """Streams ``names`` (forward order) through 2 GPU slots; see the module docstring for the stream model."""

    def __init__(
        self, dit: nn.Module, names: list[str], device, pinned: bool = True, simulate: bool = False, reuse=True
    ):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pinned, self.simulate, self.reuse = pinned and self.cuda, simulate, reuse
        self.moves = self.cuda or simulate  # False: CPU run, schedule only
        self.slots = [_Slot(n, dit.get_submodule(n)) for n in names]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool: dict[tuple, list[tuple[torch.Tensor, object]]] = defaultdict(list)
        self.trace: list[tuple[str, int]] | None = None  # tests: set to [] to record (event, slot index)
        self.stats = {"fetch": 0, "evict": 0, "bytes_h2d": 0, "bytes_d2h": 0}
        self._hooks: list = []
        self._saved_ctx: list = []
        for slot in self.slots:
            self._park(slot)
        self._register(dit)

    # -- hooks -----------------------------------------------------------------------------------------------

    def _register(self, dit: nn.Module) -> None:
        self._hooks.append(dit.register_forward_pre_hook(lambda m, a: self._schedule("fwd", 0, inclusive=True)))
        for k, slot in enumerate(self.slots):
            self._hooks.append(slot.block.register_forward_pre_hook(self._pre_hook(k)))
            self._hooks.append(slot.block.register_forward_hook(self._post_hook(k), always_call=True))

    def _pre_hook(self, k: int):
        def hook(module, args):
            training = torch.is_grad_enabled()
            self._use(k, "fwd", backward=training and args[0].requires_grad)
            if not training:
                return None
            ctx = torch.autograd.graph.saved_tensors_hooks(*self._weight_ref_hooks(k))
            ctx.__enter__()
            self._saved_ctx.append(ctx)
            if args[0].requires_grad:
                return (_AfterBackward.apply(args[0], self, k), *args[1:])
            return None

        return hook

    def _post_hook(self, k: int):
        def hook(module, args, output):
            if self._saved_ctx and torch.is_grad_enabled():
                self._saved_ctx.pop().__exit__(None, None, None)
            if output is None:  # forward raised (always_call): nothing to schedule
                return None
            backward = torch.is_grad_enabled() and output.requires_grad
            if backward:
                output = _BeforeBackward.apply(output, self, k)
            self._schedule("fwd", k, inclusive=False, backward=backward)
            return output

        return hook

    def _weight_ref_hooks(self, k: int):
        slot = self.slots[k]
        owners = {t.untyped_storage().data_ptr(): (n, t) for n, t in _named_tensors(slot.block) if t.numel()}

        def pack(t: torch.Tensor):
            hit = owners.get(t.untyped_storage().data_ptr()) if t.numel() else None
            if hit is None or hit[1].dtype != t.dtype:
                return t
            name, owner = hit
            return _WeightRef(k, name, tuple(t.size()), tuple(t.stride()), t.storage_offset() - owner.storage_offset())

        def unpack(obj):
            if not isinstance(obj, _WeightRef):
                return obj
            cur = dict(_named_tensors(self.slots[obj.slot].block))[obj.name].data
            return cur.as_strided(obj.size, obj.stride, cur.storage_offset() + obj.offset)

        return pack, unpack

    # -- schedule --------------------------------------------------------------------------------------------

    def _future(self, phase: str, k: int, inclusive: bool, backward: bool) -> Iterator[int]:
        """Slot indices in the order they will be used, from the current point on."""
        n = len(self.slots)
        if phase == "fwd":
            yield from range(k if inclusive else k + 1, n)
            if backward:
                yield from range(n - 1, -1, -1)
        else:
            yield from range(k if inclusive else k - 1, -1, -1)
        yield from range(n)  # the next forward

    def _schedule(self, phase: str, k: int, inclusive: bool, backward: bool = False) -> None:
        want: list[int] = []
        for j in self._future(phase, k, inclusive, backward):
            if j not in want:
                want.append(j)
            if len(want) == STAGING:
                break
        for j, slot in enumerate(self.slots):
            if slot.resident and j not in want:
                self._evict(j)
        for j in want:
            if not self.slots[j].resident:
                self._fetch(j)
        self.pool.clear()  # leftovers of a different shape: free them

    def _use(self, k: int, phase: str, backward: bool = False) -> None:
        """Make slot k resident and make the current stream wait for its copy."""
        self._schedule(phase, k, inclusive=True, backward=backward)
        slot = self.slots[k]
        if self.cuda and slot.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(slot.event)
            for _, t in _named_tensors(slot.block):
                t.data.record_stream(stream)
            slot.event = None
        self._record(phase, k)

    def _record(self, event: str, k: int) -> None:
        if self.trace is not None:
            self.trace.append((event, k))

    # -- moves -----------------------------------------------------------------------------------------------

    def _park(self, slot: _Slot) -> None:
        """Initial state: masters on the CPU (pinned if asked), block evicted."""
        for name, t in _named_tensors(slot.block):
            master = t.data if t.device.type == "cpu" else t.data.to("cpu")
            slot.masters[name] = pin(master, self.pinned)
            t.data = self._rest_value(slot.masters[name])
        slot.resident = False

    def _rest_value(self, master: torch.Tensor) -> torch.Tensor:
        return torch.full_like(master, float("nan")) if self.simulate else master

    def _fetch(self, k: int) -> None:
        slot = self.slots[k]
        self._record("fetch", k)
        self.stats["fetch"] += 1
        if self.moves:
            stream = torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()
            with stream:
                for name, t in _named_tensors(slot.block):
                    t.data = self._copy_in(slot, name, t)
                    slot.fetched[name] = (t.data_ptr(), t._version)
                if self.cuda:
                    slot.event = torch.cuda.Event()
                    slot.event.record(self.copy_stream)
        slot.resident = True

    def _copy_in(self, slot: _Slot, name: str, t: torch.Tensor) -> torch.Tensor:
        if not self.simulate and t.data_ptr() != slot.masters[name].data_ptr():
            slot.masters[name] = pin(t.data, self.pinned)  # replaced while evicted (e.g. a LoRA merge)
        master = slot.masters[name]
        self.stats["bytes_h2d"] += master.numel() * master.element_size()
        pooled = self.pool.get((name, master.shape, master.dtype))
        if pooled:
            buf, event = pooled.pop()
            if event is not None:
                self.copy_stream.wait_event(event)
            return buf.copy_(master, non_blocking=True)
        return master.to(self.device, non_blocking=True, copy=True)

    def _evict(self, k: int) -> None:
        slot = self.slots[k]
        self._record("evict", k)
        self.stats["evict"] += 1
        if self.moves:
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
            for name, t in _named_tensors(slot.block):
                buf = t.data
                if (t.data_ptr(), t._version) != slot.fetched.get(name):  # replaced or updated in place
                    slot.masters[name] = pin(buf.to("cpu", copy=True), self.pinned)  # changed on the device
                    self.stats["bytes_d2h"] += buf.numel() * buf.element_size()
                t.data = self._rest_value(slot.masters[name])
                if self.simulate:
                    buf.fill_(float("nan"))  # what a stale reference to a reused GPU buffer would read
                if self.reuse:
                    self.pool[(name, buf.shape, buf.dtype)].append((buf, event))
        slot.resident = False

    def evict_all(self) -> None:
        """Every streamed block back to its CPU masters (and the staging buffers freed)."""
        for j, slot in enumerate(self.slots):
            if slot.resident:
                self._evict(j)
        self.pool.clear()

    def remove(self) -> None:
        self.evict_all()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def enable_block_swap(
    dit: nn.Module, n: int, device, pinned: bool = True, simulate: bool = False, reuse: bool = True
) -> BlockSwapper | None:
    """Stream the last ``n + 2`` blocks (N fewer blocks on the GPU); returns the swapper (None for n = 0).

    ``simulate`` (tests, CPU): really copy, and poison evicted blocks and buffers with NaN; ``reuse=False`` gives
    every fetch a fresh buffer (so a stale reference keeps reading NaN instead of another block's weights).
    """
    names = streamed_block_names(dit, n)
    if not names:
        return None
    if getattr(dit, _SWAPPER, None) is not None:
        raise RuntimeError("block swap is already enabled on this DiT")
    swapper = BlockSwapper(dit, names, device, pinned, simulate, reuse)
    object.__setattr__(dit, _SWAPPER, swapper)
    return swapper


def disable_block_swap(dit: nn.Module) -> None:
    """Remove the hooks; streamed blocks keep their CPU masters (``memory.restore_dit`` then moves everything)."""
    swapper = getattr(dit, _SWAPPER, None)
    if swapper is not None:
        swapper.remove()
        for slot in swapper.slots:
            for name, t in _named_tensors(slot.block):
                t.data = slot.masters[name]
        object.__setattr__(dit, _SWAPPER, None)
