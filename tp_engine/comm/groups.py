"""Sub-groups and point-to-point channels from the communicator a rank was given.

Whatever started the ranks (``tp_engine.init()`` under torchrun or mpirun,
``tp_engine.launch``, ``run_threads``), each rank holds one Communicator
over the whole world. From it:

* :func:`p2p_of` gives the point-to-point channel between its ranks;
* :func:`partition` splits the world into disjoint groups (the tensor-parallel
  groups of a hybrid TP x PP layout) and returns this rank's group as a new
  Communicator; :func:`subgroup` makes one group.

Both are collective over the parent communicator: every rank calls them in
the same order with the same arguments (torch's ``new_group`` and MPI's
``Comm.Split`` require it; the thread ranks match calls by their order).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch.distributed as dist

from .base import Communicator, SingleProcessCommunicator
from .hierarchical import HierarchicalCommunicator
from .mpi import MPICommunicator
from .p2p import MPIPointToPoint, PointToPoint, ThreadPointToPoint, TorchDistPointToPoint
from .shm import ShmCommunicator, try_shm_communicator
from .threads import ThreadCommunicator
from .torch_dist import TorchDistCommunicator

__all__ = ["check_groups", "p2p_of", "partition", "subgroup"]


def p2p_of(comm: Communicator) -> PointToPoint:
    """The point-to-point channel between ``comm``'s ranks (numbered as ``comm`` numbers them).

    A communicator that wraps another (e.g. one adding emulated latency) may
    provide its own channel through a ``point_to_point()`` method.
    """
    own = getattr(comm, "point_to_point", None)
    if callable(own):
        return own()
    if isinstance(comm, ThreadCommunicator):
        return ThreadPointToPoint(comm)
    if isinstance(comm, HierarchicalCommunicator):  # its world communicator reaches every rank directly
        return p2p_of(comm.world)
    if isinstance(comm, MPICommunicator):
        return MPIPointToPoint(comm.comm)
    if isinstance(comm, ShmCommunicator):  # shared memory does collectives only; its fallback sends
        return p2p_of(comm.fallback)
    if isinstance(comm, TorchDistCommunicator):
        return TorchDistPointToPoint(comm.group)
    raise ValueError(f"no point-to-point channel for a {type(comm).__name__} ({comm.name}, world {comm.world_size})")


def check_groups(groups: Sequence[Sequence[int]], world_size: int) -> list[list[int]]:
    """Validate disjoint, non-empty groups of ranks in ``range(world_size)``; return them as lists."""
    out, seen = [], set()
    for g in groups:
        g = [int(r) for r in g]
        if not g:
            raise ValueError("a group of ranks is empty")
        for r in g:
            if not 0 <= r < world_size:
                raise ValueError(f"rank {r} is outside a world of {world_size}")
            if r in seen:
                raise ValueError(f"rank {r} is in more than one group: {[list(x) for x in groups]}")
            seen.add(r)
        out.append(g)
    return out


def partition(comm: Communicator, groups: Sequence[Sequence[int]]) -> Communicator | None:
    """This rank's group among disjoint ``groups`` of ``comm``'s ranks, as a new Communicator.

    A group's rank r is its r-th listed member. Ranks in no group get None.
    Collective over ``comm``: every rank passes the same ``groups``, in the same order of calls.
    A group of one rank is a :class:`SingleProcessCommunicator` (its collectives cost nothing).
    """
    groups = check_groups(groups, comm.world_size)
    mine = next(((i, g.index(comm.rank)) for i, g in enumerate(groups) if comm.rank in g), None)
    wrapped = getattr(comm, "inner", None)
    if wrapped is not None:  # a wrapper (e.g. emulated latency): its sub-groups are those of what it wraps
        return partition(wrapped, groups)
    if isinstance(comm, ThreadCommunicator):
        children = comm.group.split(comm.next_split_key(), groups)
        if mine is None:
            return None
        return SingleProcessCommunicator() if len(groups[mine[0]]) == 1 else children[mine[0]].comm(mine[1])
    if isinstance(comm, SingleProcessCommunicator):
        return comm if mine is not None else None
    if isinstance(comm, HierarchicalCommunicator):
        sub = partition(comm.world, groups)
        if sub is None or isinstance(sub, SingleProcessCommunicator) or isinstance(sub, ShmCommunicator):
            return sub
        group = groups[mine[0]]
        if isinstance(sub, TorchDistCommunicator) and len({comm.layout.host_of(r) for r in group}) == 1:
            # A group inside one host (TP inside a host, PP across hosts) shares memory again.
            return try_shm_communicator(sub) or sub
        return sub
    if isinstance(comm, MPICommunicator):
        color = comm._MPI.UNDEFINED if mine is None else mine[0]
        sub = comm.comm.Split(color, 0 if mine is None else mine[1])
        if mine is None:
            return None
        return SingleProcessCommunicator() if len(groups[mine[0]]) == 1 else MPICommunicator(sub, reproducible=comm.reproducible)
    if isinstance(comm, (TorchDistCommunicator, ShmCommunicator)):
        base = comm.fallback if isinstance(comm, ShmCommunicator) else comm
        made = None
        for i, g in enumerate(groups):
            if len(g) == 1:
                continue  # no process group needed; every rank skips the same ones
            ranks = [r if base.group is None else dist.get_global_rank(base.group, r) for r in g]
            pg = dist.new_group(ranks)  # every rank creates every group, in the same order
            if mine is not None and mine[0] == i:
                made = TorchDistCommunicator(pg)
        if mine is None:
            return None
        if made is None:
            return SingleProcessCommunicator()
        if isinstance(comm, ShmCommunicator):
            # Same host as the parent's shared memory: the group's members share it again.
            shm = try_shm_communicator(made)
            if shm is None:
                warnings.warn(f"sub-group {groups[mine[0]]}: shared memory unavailable, collectives go through "
                              f"{made.name} (slower for small tensors)", stacklevel=2)
            return shm or made
        return made
    raise ValueError(f"cannot make sub-groups of a {type(comm).__name__} ({comm.name})")


def subgroup(comm: Communicator, ranks: Sequence[int]) -> Communicator | None:
    """A Communicator over ``ranks`` of ``comm`` (None on other ranks); collective over ``comm``."""
    return partition(comm, [ranks])
