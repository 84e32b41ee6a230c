"""Emulated link latency for collectives, where the kernel cannot add it.

This kernel has no ``netem``, ``fq`` or ``etf`` qdisc, so packets cannot be
held on the wire (``tc tbf`` still limits bandwidth). Instead a
``LatencyCommunicator`` holds every collective for ``hops`` one-way link
latencies before running it on the real communicator: a two-host
all-reduce, all-gather or broadcast moves each rank's data across the link
once, so ``hops=1`` for one rank per host; a ring over more hosts needs
more. The hold is the one :mod:`.pingpong` adds per message, and its
measured round trip validates it. Figures made with it are *emulated*
latency and must be labelled so.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..comm.base import Communicator
from .pingpong import hold

__all__ = ["LatencyCommunicator"]


class LatencyCommunicator:
    """``inner`` with ``one_way_s`` × ``hops`` of emulated link latency before each collective."""

    def __init__(self, inner: Communicator, one_way_s: float, hops: int = 1):
        if one_way_s < 0 or hops < 0:
            raise ValueError(f"LatencyCommunicator: one_way_s and hops must be >= 0, got {one_way_s}, {hops}")
        self.inner = inner
        self.delay_s = one_way_s * hops
        self.name = f"{inner.name}+{one_way_s * 1e6:g}us-emulated"
        self.rank = inner.rank
        self.world_size = inner.world_size

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        hold(self.delay_s)
        return self.inner.all_reduce_(tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None) -> torch.Tensor:
        hold(self.delay_s)
        return self.inner.all_gather(tensor, dim=dim, sizes=sizes)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        hold(self.delay_s)
        return self.inner.broadcast_(tensor, src=src)

    def barrier(self) -> None:
        hold(self.delay_s)
        self.inner.barrier()

    def close(self) -> None:
        self.inner.close()
