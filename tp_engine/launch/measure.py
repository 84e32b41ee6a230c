"""Measure a live group for placement: each rank's weight-streaming speed, its all-reduces and its hops.

Collective: every rank of ``comm`` calls :func:`measure_links` at start-up,
in the same order; it takes well under a second. The result feeds
:func:`tp_engine.launch.placement.choose`.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..comm.base import Communicator
from ..comm.groups import p2p_of, partition
from ..comm.host_identity import HostLayout, detect_hosts
from .placement import Links

__all__ = ["allreduce_seconds", "hop_seconds", "measure_links", "weight_bandwidth"]

STREAM_BYTES = 64 << 20  # larger than any last-level cache here: the matmul streams from memory


def weight_bandwidth(nbytes: int = STREAM_BYTES, repeats: int = 5) -> float:
    """Bytes per second this process's float32 matmul streams at one row (decode's shape)."""
    k = 4096
    w = torch.randn(max(1, nbytes // (4 * k)), k)
    x = torch.randn(1, k)
    torch.mm(x, w.t())  # warm-up: pages touched, kernel chosen
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(x, w.t())
        times.append(time.perf_counter() - start)
    return w.numel() * 4 / statistics.median(times)


def allreduce_seconds(comm: Communicator, numel: int, repeats: int = 30) -> float:
    """Median seconds of one all-reduce of ``numel`` float32 values (the slowest rank's view)."""
    t = torch.zeros(numel)
    for _ in range(3):
        comm.all_reduce_(t)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        comm.all_reduce_(t)
        times.append(time.perf_counter() - start)
    mine = torch.tensor([statistics.median(times)], dtype=torch.float64)
    return float(comm.all_gather(mine, dim=0).max())


def hop_seconds(comm: Communicator, a: int, b: int, numel: int, repeats: int = 30) -> float:
    """One-way seconds of a ``numel``-value hand-off from rank ``a`` to ``b`` (half a ping-pong).

    Collective over ``comm`` (ranks other than ``a`` and ``b`` only wait at the
    final exchange of the result).
    """
    p2p, t = p2p_of(comm), torch.zeros(numel)
    rounds = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        if comm.rank == a:
            p2p.send(t, b)
            p2p.recv(t, b)
        elif comm.rank == b:
            p2p.recv(t, a)
            p2p.send(t, a)
        if i >= 2:
            rounds.append(time.perf_counter() - start)
    mine = torch.tensor([statistics.median(rounds) / 2 if comm.rank == a else 0.0], dtype=torch.float64)
    return float(comm.all_gather(mine, dim=0).max())


def measure_links(comm: Communicator, hidden: int, hosts: HostLayout | None = None) -> Links:
    """Measure the group (collective): what :func:`~tp_engine.launch.placement.choose` needs."""
    hosts = hosts or detect_hosts(comm)
    mine = torch.tensor([weight_bandwidth()], dtype=torch.float64)
    bandwidth = tuple(float(v) for v in comm.all_gather(mine, dim=0))
    host_of = tuple(hosts.host_of(r) for r in range(comm.world_size))
    everyone = allreduce_seconds(comm, hidden) if comm.world_size > 1 else 0.0
    local = None
    if 1 < hosts.max_local < comm.world_size:
        group = partition(comm, hosts.groups)
        t = allreduce_seconds(group, hidden) if group is not None and group.world_size > 1 else 0.0
        local = float(comm.all_gather(torch.tensor([t], dtype=torch.float64), dim=0).max())
    if comm.world_size > 1:
        a, b = (hosts.leaders[0], hosts.leaders[1]) if hosts.n_hosts > 1 else (0, 1)
        hop = hop_seconds(comm, a, b, hidden)
    else:
        hop = 0.0
    return Links(bandwidth, host_of, everyone, hop, local_allreduce_s=local)
