"""The per-rank KV cache: one fixed-length slot per running sequence.

Each layer holds keys and values of shape (slots, kv_heads, capacity,
head_dim) for this rank's KV heads only. A sequence owns one slot from the
moment it joins until it leaves; positions are written in place, so rolling
back (speculative decoding) is free: attention reads positions [0, length)
and the next write overwrites the rest. Slots are the simple end of paged
attention: no fragmentation within a slot, at the cost of reserving
``capacity`` positions per sequence; the scheduler sizes ``capacity`` from the
longest request it admits.
"""
from __future__ import annotations

import torch

__all__ = ["SlotCache"]


class SlotCache:
    """Keys and values for ``n_layers`` layers; grows (copying) when asked for more slots or positions."""

    def __init__(self, n_layers: int, kv_heads: list[int], head_dim: int, dtype: torch.dtype, device):
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.slots = self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._free: list[int] = []

    def reserve(self, slots: int, capacity: int) -> None:
        """At least ``slots`` slots of ``capacity`` positions; existing contents are kept."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        new_slots, new_cap = max(slots, self.slots), max(capacity, self.capacity)
        for i in range(self.n_layers):
            shape = (new_slots, self.kv_heads[i], new_cap, self.head_dim)
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.slots:
                k[: self.slots, :, : self.capacity] = self.k[i]
                v[: self.slots, :, : self.capacity] = self.v[i]
                self.k[i], self.v[i] = k, v
            else:
                self.k.append(k)
                self.v.append(v)
        self._free += list(range(self.slots, new_slots))
        self.slots, self.capacity = new_slots, new_cap

    def acquire(self) -> int:
        """A free slot (the lowest), reserving one more when all are taken."""
        if not self._free:
            self.reserve(self.slots + 1, max(self.capacity, 1))
        self._free.sort()
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.slots or slot in self._free:
            raise ValueError(f"slot {slot} is not in use")
        self._free.append(slot)

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
