"""A hierarchical all-reduce: shared memory inside each host, the network between hosts.

When ranks span several hosts, a flat collective pays the network on every
step even between ranks that share memory. Here each collective runs in
three stages:

1. inside each host, over shared memory (``comm/shm.py``, a few us): the
   host's ranks sum their tensors in rank order;
2. the host leaders (each host's lowest rank) exchange the host sums over
   the network and add them in host order (``comm/tcp.py``: one persistent
   TCP connection per pair of leaders; or MPI under mpirun);
3. each leader broadcasts the total to its host through shared memory.

The order of additions is fixed by the host layout, so every rank gets the
same bits. With one rank per host stages 1 and 3 vanish and this is the
network path alone (named ``tcp``). Large tensors go through in chunks of
the shared-memory segment's size. ``all_gather`` and ``broadcast_`` take
the same three stages; 16-bit floats are summed in float32 and rounded once.

Which ranks share a host comes from ``comm/host_identity.py`` (boot id plus
a shared-memory probe), never from the hostname alone.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .base import Communicator, gather_byte_counts, resolve_gather, stitch_blocks
from .host_identity import HostLayout
from .mpi import MPICommunicator
from .shm import DEFAULT_MAX_BYTES, ShmCommunicator
from .tcp import tcp_mesh
from .torch_dist import TorchDistCommunicator

__all__ = ["HierarchicalCommunicator", "mpi_hierarchical", "torch_hierarchical"]

log = logging.getLogger(__name__)

_NATIVE = (torch.float32, torch.float64, torch.int32, torch.int64)
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


class HierarchicalCommunicator:
    """Collectives in three stages: host-local, between host leaders, host-local.

    ``world``: a communicator over all ranks (closed last; used for nothing
    else). ``local``: one over this rank's host group, in rank order (None
    when the host has one rank). ``leaders``: one over the host leaders in
    host order, on leaders only (None elsewhere). ``chunk_bytes``: the
    largest piece a stage moves at once (the shared-memory segment's size).
    """

    def __init__(
        self,
        world: Any,
        layout: HostLayout,
        local: Any | None,
        leaders: Any | None,
        *,
        name: str,
        chunk_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.world = world
        self.layout = layout
        self.rank = int(world.rank)
        self.world_size = int(world.world_size)
        if layout.world_size != self.world_size:
            raise ValueError(f"host layout has {layout.world_size} ranks, the group {self.world_size}")
        self.host = layout.host_of(self.rank)
        self.group = layout.groups[self.host]
        self.is_leader = self.rank == self.group[0]
        if (local is None) != (len(self.group) == 1):
            raise ValueError("a local communicator is needed exactly when the host has more than one rank")
        if (leaders is None) == self.is_leader and layout.n_hosts > 1:
            raise ValueError("a leaders' communicator is needed exactly on the host leaders")
        self.local = local
        self.leaders = leaders
        self.name = name
        self.chunk_bytes = int(chunk_bytes)

    # -- all-reduce --------------------------------------------------------------------

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype not in _NATIVE or not tensor.is_cpu or not tensor.is_contiguous():
            work_dtype = _UPCAST.get(tensor.dtype, tensor.dtype)
            if work_dtype not in _NATIVE:
                raise TypeError(f"HierarchicalCommunicator.all_reduce_: unsupported dtype {tensor.dtype}")
            work = tensor.detach().to(device="cpu", dtype=work_dtype, memory_format=torch.contiguous_format, copy=True)
            self.all_reduce_(work)
            tensor.copy_(work)
            return tensor
        if tensor.nbytes <= self.chunk_bytes:
            self._reduce_piece(tensor)
            return tensor
        flat = tensor.view(-1)
        step = max(1, self.chunk_bytes // tensor.element_size())
        for start in range(0, flat.numel(), step):
            self._reduce_piece(flat[start : start + step])
        return tensor

    def _reduce_piece(self, piece: torch.Tensor) -> None:
        if self.local is not None:
            self.local.all_reduce_(piece)  # host sum, in rank order
        if self.leaders is not None:
            self.leaders.all_reduce_(piece)  # sum of host sums, in host order
        if self.local is not None:
            self.local.broadcast_(piece, src=0)  # the leader's total, bit for bit

    # -- all-gather --------------------------------------------------------------------

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None) -> torch.Tensor:
        dim, sizes = resolve_gather(tensor, dim, sizes, self.rank, self.world_size)
        src = tensor.detach().to("cpu").contiguous()
        counts = gather_byte_counts(src, dim, sizes)  # bytes per rank
        mine = src.view(-1).view(torch.uint8) if src.nbytes else torch.empty(0, dtype=torch.uint8)
        # 1. the host's blocks, in rank order; 2. all hosts' blobs, in host order; 3. to the whole host.
        blob = mine
        if self.local is not None:
            blob = self.local.all_gather(mine, dim=0, sizes=[counts[r] for r in self.group])
        if self.leaders is not None:
            host_bytes = [sum(counts[r] for r in g) for g in self.layout.groups]
            blob = self.leaders.all_gather(blob, dim=0, sizes=host_bytes)
        if self.local is not None:
            if not self.is_leader:
                blob = torch.empty(sum(counts), dtype=torch.uint8)
            self.local.broadcast_(blob, src=0)
        offsets, at = {}, 0
        for g in self.layout.groups:
            for r in g:
                offsets[r] = at
                at += counts[r]
        out = stitch_blocks([blob[offsets[r] : offsets[r] + counts[r]] for r in range(len(sizes))], src, dim, sizes)
        return out if tensor.is_cpu else out.to(tensor.device)

    # -- broadcast, barrier ------------------------------------------------------------

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast_: src {src} outside world of {self.world_size}")
        if not tensor.is_cpu or not tensor.is_contiguous():
            work = tensor.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
            self.broadcast_(work, src)
            tensor.copy_(work)
            return tensor
        src_host = self.layout.host_of(src)
        if self.host == src_host and self.local is not None:
            self.local.broadcast_(tensor, src=self.group.index(src))  # now src's leader has it
        if self.leaders is not None:
            self.leaders.broadcast_(tensor, src=src_host)
        if self.host != src_host and self.local is not None:
            self.local.broadcast_(tensor, src=0)
        return tensor

    def barrier(self) -> None:
        if self.local is not None:
            self.local.barrier()
        if self.leaders is not None:
            self.leaders.barrier()
        if self.local is not None:
            self.local.barrier()

    def close(self) -> None:
        for part in (self.local, self.leaders, self.world):
            if part is not None:
                part.close()
        self.local = self.leaders = None


def _name(layout: HostLayout, local_kind: str, leaders_kind: str) -> str:
    return leaders_kind if layout.max_local == 1 else f"hier({local_kind}+{leaders_kind})"


# -- over torch.distributed -----------------------------------------------------------


class _GroupTorchDist(TorchDistCommunicator):
    """A TorchDistCommunicator on a subgroup, where ``broadcast_``'s src is a group rank."""

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        with self._staged(tensor) as t:
            dist.broadcast(t, group=self.group, group_src=src)  # plain ``src`` means a global rank
        return tensor


def _fail_together(world: Any, error: str | None, what: str) -> None:
    failed = torch.tensor([1 if error else 0], dtype=torch.int64)
    world.all_reduce_(failed)
    if int(failed.item()):
        raise RuntimeError(f"hierarchical communicator: {what} failed on {int(failed.item())} rank(s)"
                           + (f"; here: {error}" if error else ""))


def torch_hierarchical(
    world: TorchDistCommunicator,
    layout: HostLayout,
    *,
    address: str,
    timeout: float,
    shm_max_bytes: int = DEFAULT_MAX_BYTES,
) -> HierarchicalCommunicator:
    """Build the hierarchical communicator over an initialised torch.distributed world.

    Collective over ``world`` (the default group). Each multi-rank host gets
    a gloo subgroup (the shared-memory rendezvous and large-tensor fallback)
    and a ShmCommunicator over it; the leaders connect through
    :func:`tcp_mesh`, advertising ``address``. ``timeout``: seconds a leader
    waits for a silent peer.
    """
    rank = int(world.rank)
    host = layout.host_of(rank)
    local = None
    error = None
    for g in layout.groups:
        if len(g) == 1:
            continue
        pg = dist.new_group(list(g), backend="gloo")  # collective over the world, even for non-members
        if host == layout.host_of(g[0]):
            try:
                local = ShmCommunicator(_GroupTorchDist(pg), shm_max_bytes, timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - reported on every rank just below
                error = f"rank {rank}: no shared memory with its host's ranks {list(g)} ({exc})"
    _fail_together(world, error, "the shared-memory stage")
    try:
        leaders = tcp_mesh(world, layout.leaders, address=address, timeout=timeout)
    except BaseException:
        if local is not None:
            local.close()
        raise
    return HierarchicalCommunicator(world, layout, local, leaders, name=_name(layout, "shm", "tcp"), chunk_bytes=shm_max_bytes)


# -- over MPI ---------------------------------------------------------------------------


def mpi_hierarchical(world: Any, layout: HostLayout) -> HierarchicalCommunicator:
    """Build it over an MPICommunicator: MPI sub-communicators from ``Split``.

    Open MPI already moves host-local messages through shared memory, so the
    local stage is MPI too. Collective over ``world``.
    """
    MPI = world._MPI
    rank = int(world.rank)
    host = layout.host_of(rank)
    group = layout.groups[host]
    local_comm = world.comm.Split(color=host, key=rank)
    is_leader = rank == group[0]
    leader_comm = world.comm.Split(color=0 if is_leader else MPI.UNDEFINED, key=host)
    local = MPICommunicator(local_comm) if len(group) > 1 else None
    leaders = MPICommunicator(leader_comm) if is_leader else None
    return HierarchicalCommunicator(world, layout, local, leaders, name=_name(layout, "mpi", "mpi"), chunk_bytes=1 << 62)


def describe(comm: Communicator) -> str:
    """A line naming the path and, for this one, the hosts."""
    layout = getattr(comm, "layout", None)
    return f"{comm.name}" + (f" over {layout.describe()}" if layout is not None else "")
