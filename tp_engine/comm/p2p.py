"""Point-to-point sends between ranks: what pipeline stages (and a draft on its own rank) talk over.

A :class:`PointToPoint` channel is made from a Communicator
(``tp_engine.comm.groups.p2p_of``) and numbers ranks as that communicator
does. Messages between one pair of ranks arrive in the order they were sent.
``recv`` fills a preallocated tensor in place, so the receiver states the
shape and dtype it expects and a mismatch is an error, not a silent reshape.

Implementations: thread ranks (in-process mailboxes, for tests),
torch.distributed (gloo across hosts, NCCL on GPUs; other devices staged
through host memory) and MPI through mpi4py.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from .threads import PeerFailed, ThreadCommunicator
from .torch_dist import needs_staging

__all__ = ["Handle", "MPIPointToPoint", "PointToPoint", "ThreadPointToPoint", "TorchDistPointToPoint"]


class Handle(Protocol):
    """A send or receive in flight."""

    def wait(self) -> None:
        """Block until done (a receive's tensor is then filled)."""
        ...

    def is_completed(self) -> bool:
        ...


@runtime_checkable
class PointToPoint(Protocol):
    """Sends and receives between the ranks of one communicator (its rank numbers).

    A sent tensor may be modified by the caller once ``send`` returns (or an
    ``isend`` handle completed); ``recv``'s tensor must have the sent shape and dtype.
    """

    rank: int
    world_size: int

    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor: ...

    def isend(self, tensor: torch.Tensor, dst: int) -> Handle: ...

    def irecv(self, tensor: torch.Tensor, src: int) -> Handle: ...


def _check_peer(peer: int, rank: int, world_size: int, what: str) -> None:
    if not isinstance(peer, int) or not 0 <= peer < world_size:
        raise ValueError(f"{what}: peer {peer!r} is outside a group of {world_size}")
    if peer == rank:
        raise ValueError(f"{what}: rank {rank} cannot send to or receive from itself")


class Done:
    """A handle that finished when it was made."""

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True


class _Deferred:
    """A handle that completes by calling ``finish`` once (a receive done on ``wait``)."""

    def __init__(self, finish: Callable[[], None], ready: Callable[[], bool]):
        self._finish, self._ready, self._done = finish, ready, False

    def wait(self) -> None:
        if not self._done:
            self._finish()
            self._done = True

    def is_completed(self) -> bool:
        return self._done or self._ready()


# ------------------------------------------------------------------ threads


class ThreadPointToPoint:
    """Thread ranks: each (src, dst) pair has a FIFO mailbox; a send posts a copy and returns.

    A receive waits at most the group's timeout, and fails at once (``PeerFailed``)
    when a peer rank has failed.
    """

    _POLL_S = 0.05  # how often a waiting receive looks for a failed peer

    def __init__(self, comm: ThreadCommunicator, tag: int = 0):
        self.group, self.rank, self.world_size, self.tag = comm.group, comm.rank, comm.world_size, tag

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        _check_peer(dst, self.rank, self.world_size, "send")
        self._check_alive("send")
        self.group.mailbox(self.rank, dst, self.tag).put(tensor.detach().clone())

    def isend(self, tensor: torch.Tensor, dst: int) -> Handle:
        self.send(tensor, dst)
        return Done()

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        _check_peer(src, self.rank, self.world_size, "recv")
        box = self.group.mailbox(src, self.rank, self.tag)
        deadline = time.monotonic() + self.group.timeout
        while True:
            self._check_alive("recv")
            try:
                got = box.get(timeout=self._POLL_S)
                break
            except Exception:  # queue.Empty: look for a failed peer, then wait on
                if time.monotonic() > deadline:
                    why = f"rank {src} sent nothing to rank {self.rank} within {self.group.timeout:g} s"
                    self.group.abort(why)
                    raise PeerFailed(f"thread rank {self.rank}: recv aborted: {why}") from None
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            why = (f"rank {src} sent {tuple(got.shape)} {got.dtype}, rank {self.rank} expected "
                   f"{tuple(tensor.shape)} {tensor.dtype}")
            self.group.abort(why)
            raise ValueError(f"recv: {why}")
        tensor.copy_(got)
        return tensor

    def irecv(self, tensor: torch.Tensor, src: int) -> Handle:
        _check_peer(src, self.rank, self.world_size, "irecv")
        box = self.group.mailbox(src, self.rank, self.tag)
        return _Deferred(lambda: self.recv(tensor, src), lambda: not box.empty())

    def _check_alive(self, what: str) -> None:
        if self.group.failure is not None:
            raise PeerFailed(f"thread rank {self.rank}: {what} aborted: {self.group.failure}")


# ------------------------------------------------------------ torch.distributed


class _Staged:
    """A torch.distributed request on a host copy; a receive copies back into the caller's tensor."""

    def __init__(self, work: Any, tensor: torch.Tensor, host: torch.Tensor, copy_back: bool):
        self._work, self._tensor, self._host, self._copy_back, self._done = work, tensor, host, copy_back, False

    def wait(self) -> None:
        if not self._done:
            self._work.wait()
            if self._copy_back and self._host is not self._tensor:
                self._tensor.copy_(self._host)
            self._done = True

    def is_completed(self) -> bool:
        return self._done or bool(self._work.is_completed())


class TorchDistPointToPoint:
    """torch.distributed send/recv within ``group`` (None: the default group), in its rank numbers.

    Tensors on devices the backend does not move (gloo: anything but CPU) go
    through a host copy; non-contiguous tensors through a contiguous one.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.backend = str(dist.get_backend(group)).lower()
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _host(self, tensor: torch.Tensor, copy: bool) -> torch.Tensor:
        if needs_staging(self.backend, tensor.device.type):
            return tensor.detach().to("cpu", copy=True).contiguous() if copy else torch.empty(
                tensor.shape, dtype=tensor.dtype)
        return tensor if tensor.is_contiguous() else tensor.contiguous()

    def isend(self, tensor: torch.Tensor, dst: int) -> Handle:
        _check_peer(dst, self.rank, self.world_size, "isend")
        host = self._host(tensor, copy=True)
        return _Staged(dist.isend(host, self._global(dst), group=self.group), tensor, host, copy_back=False)

    def irecv(self, tensor: torch.Tensor, src: int) -> Handle:
        _check_peer(src, self.rank, self.world_size, "irecv")
        host = self._host(tensor, copy=False)
        return _Staged(dist.irecv(host, self._global(src), group=self.group), tensor, host, copy_back=True)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.isend(tensor, dst).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.irecv(tensor, src).wait()
        return tensor


# ------------------------------------------------------------------ MPI


class _MPIRequest:
    def __init__(self, request: Any, keep: tuple, finish: Callable[[], None] | None = None):
        # ``keep`` holds the buffers' tensors alive while MPI may still touch them.
        self._request, self._keep, self._finish, self._done = request, keep, finish, False

    def wait(self) -> None:
        if not self._done:
            self._request.Wait()
            if self._finish is not None:
                self._finish()
            self._done = True

    def is_completed(self) -> bool:
        if not self._done and self._request.Test():
            self.wait()
        return self._done


class MPIPointToPoint:
    """MPI Send/Recv (mpi4py) of a tensor's raw bytes; contiguous CPU tensors without a copy."""

    TAG = 7301  # apart from any tag a user's own MPI code is likely to pick

    def __init__(self, comm: Any):
        from mpi4py import MPI  # lazy: importing mpi4py initialises MPI (optional dependency)

        self._MPI, self.comm = MPI, comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()

    def _buf(self, t: torch.Tensor) -> list:
        return [self._MPI.buffer.fromaddress(t.data_ptr(), t.nbytes) if t.nbytes else bytearray(0), self._MPI.BYTE]

    def isend(self, tensor: torch.Tensor, dst: int) -> Handle:
        _check_peer(dst, self.rank, self.world_size, "isend")
        src = tensor.detach()
        if not (src.is_cpu and src.is_contiguous()):
            src = src.to("cpu", memory_format=torch.contiguous_format, copy=True)
        return _MPIRequest(self.comm.Isend(self._buf(src), dest=dst, tag=self.TAG), (src,))

    def irecv(self, tensor: torch.Tensor, src: int) -> Handle:
        _check_peer(src, self.rank, self.world_size, "irecv")
        direct = tensor.is_cpu and tensor.is_contiguous()
        host = tensor if direct else torch.empty(tensor.shape, dtype=tensor.dtype)
        finish = None if direct else (lambda: tensor.copy_(host))
        return _MPIRequest(self.comm.Irecv(self._buf(host), source=src, tag=self.TAG), (host, tensor), finish)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.isend(tensor, dst).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.irecv(tensor, src).wait()
        return tensor
