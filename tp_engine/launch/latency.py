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
from ..comm.groups import p2p_of
from ..comm.p2p import Handle, PointToPoint
from .pingpong import hold

__all__ = ["LatencyCommunicator", "LatencyPointToPoint"]


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

    def point_to_point(self) -> "LatencyPointToPoint":
        """The inner communicator's channel, each send held for one one-way latency (pipeline hand-offs)."""
        return LatencyPointToPoint(p2p_of(self.inner), self)


class LatencyPointToPoint:
    """``inner`` with every send held for ``owner.delay_s`` (read at each send, so it can be changed)."""

    def __init__(self, inner: PointToPoint, owner: LatencyCommunicator):
        self.inner, self.owner = inner, owner
        self.rank, self.world_size = inner.rank, inner.world_size

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        hold(self.owner.delay_s)
        self.inner.send(tensor, dst)

    def isend(self, tensor: torch.Tensor, dst: int) -> Handle:
        hold(self.owner.delay_s)
        return self.inner.isend(tensor, dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return self.inner.recv(tensor, src)

    def irecv(self, tensor: torch.Tensor, src: int) -> Handle:
        return self.inner.irecv(tensor, src)
