"""Reference feature cache: keys/values (and content queries) per (model weights, timestep,
noise), computed once and reused across iterations, batch items and re-runs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

DEFAULT_BUDGET_BYTES = 4 * 1024**3


@dataclass
class ReferenceKV:
    """Reference keys/values of one layer, references concatenated along tokens: (1, H, R·N, d); each
    reference's N tokens are `text_tokens` text tokens (a DiT's joint text; none on the SD UNet), then its
    `hw` image grid, then `trailing_tokens` (Z-Image's image pad tokens)."""

    k: torch.Tensor
    v: torch.Tensor
    hw: tuple[int, int]
    text_tokens: int = 0
    trailing_tokens: int = 0

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def to(self, device: torch.device) -> ReferenceKV:
        return ReferenceKV(self.k.to(device, non_blocking=True), self.v.to(device, non_blocking=True), self.hw,
                           self.text_tokens, self.trailing_tokens)


def tensor_digest(t: torch.Tensor) -> str:
    """Content hash of a tensor (values, shape, dtype): a cache key for features computed from it."""
    data = t.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _nbytes(item: ReferenceKV | torch.Tensor) -> int:
    return item.nbytes() if isinstance(item, ReferenceKV) else item.numel() * item.element_size()


def _to(item: ReferenceKV | torch.Tensor, device: torch.device) -> ReferenceKV | torch.Tensor:
    return item.to(device) if isinstance(item, ReferenceKV) else item.to(device, non_blocking=True)


class FeatureCache:
    """Bounded in bytes; entries live in CPU memory when computed on an accelerator.

    A run visits timesteps in one order, so least-recently-used eviction would evict every
    entry of a run before its re-use. Instead entries are grouped by run (`begin_run`): when
    the budget is full, entries the current run has not used are evicted, oldest first; entries
    of the current run are never evicted, and what does not fit is not stored. Hits and misses are counted so reuse can be asserted.
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.entries: dict[Hashable, list] = {}
        self.sizes: dict[Hashable, int] = {}
        self.last_run: dict[Hashable, int] = {}
        self.run = 0
        self.hits = 0
        self.misses = 0
        self.not_stored = 0

    @property
    def stored_bytes(self) -> int:
        return sum(self.sizes.values())

    def begin_run(self) -> None:
        """Mark the start of a run: entries not used from now on may make room for new ones."""
        self.run += 1

    def _make_room(self, size: int) -> bool:
        free = self.budget_bytes - self.stored_bytes
        stale = [key for key in self.entries if self.last_run[key] < self.run]
        while free < size and stale:
            key = stale.pop(0)
            free += self.sizes.pop(key)
            del self.entries[key], self.last_run[key]
        return free >= size

    def get_or_compute(self, key: Hashable, compute: Callable[[], list], device: torch.device | None = None) -> list:
        if key in self.entries:
            self.hits += 1
            self.last_run[key] = self.run
            stored = self.entries[key]
            return stored if device is None else [_to(item, device) for item in stored]
        self.misses += 1
        value = compute()
        size = sum(_nbytes(item) for item in value)
        if size <= self.budget_bytes and self._make_room(size):
            offload = device is not None and device.type != "cpu"
            self.entries[key] = [_to(item, torch.device("cpu")) for item in value] if offload else value
            self.sizes[key] = size
            self.last_run[key] = self.run
        else:
            self.not_stored += 1
        return value

    def __len__(self) -> int:
        return len(self.entries)
