"""Peak bytes of tensor storage allocated by torch ops, measured exactly on CPU.

Process RSS is too coarse for tiny models (allocator caching, the interpreter, the weights), so
this dispatch mode counts every storage an op creates and subtracts it when the storage is
freed: the peak is the most tensor memory live at once that the measured code allocated.
Tensors that existed before (weights, inputs) are not counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StoragePeak(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[tuple[int, int], int] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: tuple[int, int]) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An op either allocates a new storage or returns a view or alias of one of its inputs
        # (weights seen through `.t()`, `detach()`, ...): only the former is new memory.
        inputs = {
            item.untyped_storage().data_ptr()
            for item in tree_flatten((args, kwargs))[0]
            if isinstance(item, torch.Tensor) and item.device.type != "meta"
        }
        for item in tree_flatten(out)[0]:
            if not isinstance(item, torch.Tensor) or item.device.type == "meta":
                continue
            storage = item.untyped_storage()
            key = (storage.data_ptr(), id(storage))
            if key in self.live or storage.data_ptr() in inputs:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key)
        return out


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor storage that `fn` allocated and held at once."""
    meter = StoragePeak()
    with meter:
        fn()
    return meter.peak
