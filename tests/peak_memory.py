"""Peak bytes of the CPU tensors an operation allocates, counted at the dispatcher (tests only).

``PeakMemory`` is a ``TorchDispatchMode``: every op's output storage that is new is added to a live total and
removed when the storage is freed (a weakref finalizer on the storage, so tensors kept only by autograd count
until the graph dies).  Views and in-place results share an input's storage and are not counted.  ``peak`` is the
maximum of the total during the ``with`` block.  It sees what the code under test allocates through torch ops (the
allocations a CUDA run makes too); workspace that one CPU kernel allocates internally is not seen.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen or key in inputs:  # empty, or a view / in-place result
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out
