"""Reference feature cache: keys/values per (model weights, timestep, noise), computed once."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

DEFAULT_BUDGET_BYTES = 2 * 1024**3


@dataclass
class ReferenceKV:
    """Reference keys/values of one layer, references concatenated along tokens: (1, H, R·N, d)."""

    k: torch.Tensor
    v: torch.Tensor
    hw: tuple[int, int]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class FeatureCache:
    """LRU cache bounded in bytes; counts hits and misses so reuse can be asserted."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[Hashable, list] = OrderedDict()
        self.sizes: dict[Hashable, int] = {}
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: Hashable, compute: Callable[[], list]) -> list:
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = compute()
        size = sum(item.nbytes() for item in value if hasattr(item, "nbytes"))
        if size <= self.budget_bytes:
            self.entries[key] = value
            self.sizes[key] = size
            while sum(self.sizes.values()) > self.budget_bytes:
                old, _ = self.entries.popitem(last=False)
                self.sizes.pop(old)
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.sizes.clear()

    def __len__(self) -> int:
        return len(self.entries)
