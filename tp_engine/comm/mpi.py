"""Collectives through MPI (mpi4py), for processes started by ``mpirun``.

On one host Open MPI moves small messages through shared memory in ~2 us,
hundreds of times faster than gloo over loopback TCP. Contiguous CPU tensors
are handed to MPI without a copy: the communicator builds an MPI buffer from
the tensor's address (cached per address and size, so the hot path is one
dict lookup and one ``Allreduce`` call). Anything else (non-contiguous
tensors, other devices) is staged through a contiguous CPU copy.

Bitwise identical results: every rank samples tokens from the all-reduced
logits, so all ranks must receive the same bits. Open MPI's reduction
algorithms (recursive doubling, ring, Rabenseifner, and the hierarchical
ones) either combine operands symmetrically (IEEE addition is commutative) or
compute each element once and distribute it, so every rank gets the same
bits; ``tests/test_comm_mpi.py`` checks this for 2 and 3 ranks over sizes that
cross the algorithm switch points. Should some other MPI library or tuning
break it, set ``reproducible=True``: the reduction is then done as an
``Allgather`` followed by a local sum in rank order, identical by
construction (slower for large tensors).

``mpi4py`` is imported lazily, inside :class:`MPICommunicator`, so that
:func:`mpi_world_from_env` can detect an MPI launch without initialising MPI.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import torch

from .base import gather_byte_counts, resolve_gather, stitch_blocks

__all__ = ["MPICommunicator", "mpi_world_from_env"]

# (rank, size, local-rank candidates) per launcher family, checked in order.
_ENV_LAYOUTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
)


def mpi_world_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) if this process was started by an MPI launcher.

    Reads Open MPI's ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK``, else PMI's
    ``PMI_RANK/PMI_SIZE`` (MPICH, Intel MPI, Slurm) with ``MPI_LOCALRANKID`` or
    ``PMI_LOCAL_RANK`` for the local rank. When no local-rank variable is set
    the launch is assumed to be on one host and local_rank is the rank.
    Returns None when no launcher variables are present. Pure: it neither
    imports mpi4py nor initialises MPI.
    """
    env = os.environ if environ is None else environ
    for rank_key, size_key, local_keys in _ENV_LAYOUTS:
        if rank_key not in env or size_key not in env:
            continue
        rank = _env_int(env, rank_key)
        size = _env_int(env, size_key)
        local = next((_env_int(env, k) for k in local_keys if k in env), rank)
        if not (0 <= rank < size) or not (0 <= local < size):
            raise ValueError(
                f"inconsistent MPI environment: {rank_key}={rank}, {size_key}={size}, local rank {local}"
            )
        return rank, size, local
    return None


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


# all_reduce_: dtypes MPI sums natively, and dtypes summed through a wider one.
# float16/bfloat16 are upcast to float32, summed, and rounded back: MPI has no
# standard 16-bit float type, and summing in float32 is also more accurate
# (one rounding at the end instead of one per partial sum).
_MPI_TYPE_NAMES = {
    torch.float32: "FLOAT",
    torch.float64: "DOUBLE",
    torch.int32: "INT32_T",
    torch.int64: "INT64_T",
    torch.int16: "INT16_T",
    torch.int8: "INT8_T",
    torch.uint8: "UINT8_T",
}
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

_CACHE_LIMIT = 256  # buffer specs kept; cleared wholesale when exceeded


class MPICommunicator:
    """A Communicator over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    ``reproducible=True`` computes all_reduce_ as all-gather + local sum in
    rank order (bitwise identical on every rank by construction, at the cost
    of world_size times the traffic).
    """

    def __init__(self, comm: Any = None, *, reproducible: bool = False):
        from mpi4py import MPI  # lazy: importing mpi4py initialises MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.name = "mpi"
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.reproducible = reproducible
        self._types = {dt: getattr(MPI, n) for dt, n in _MPI_TYPE_NAMES.items()}
        self._in_place, self._sum = MPI.IN_PLACE, MPI.SUM
        self._bufs: dict[tuple[int, int], Any] = {}
        self._closed = False

    # -- buffers ---------------------------------------------------------------

    def _buf(self, t: torch.Tensor) -> Any:
        """An MPI buffer over a contiguous CPU tensor's memory, no copy.

        The buffer does not keep the tensor alive; it is only ever used while
        the caller holds a tensor at that address and size, so a cached entry
        is valid whenever its key matches.
        """
        key = (t.data_ptr(), t.nbytes)
        buf = self._bufs.get(key)
        if buf is None:
            if len(self._bufs) >= _CACHE_LIMIT:
                self._bufs.clear()
            buf = self._bufs[key] = self._MPI.buffer.fromaddress(key[0], key[1])
        return buf

    # -- collectives -----------------------------------------------------------

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        mpi_type = self._types.get(tensor.dtype)
        if mpi_type is not None and tensor.is_cpu and tensor.is_contiguous():
            if tensor.nbytes:
                if self.reproducible:
                    self._reduce_in_rank_order(tensor)
                else:
                    self.comm.Allreduce(self._in_place, [self._buf(tensor), mpi_type], self._sum)
            return tensor
        work_dtype = _UPCAST.get(tensor.dtype, tensor.dtype)
        if work_dtype not in self._types:
            raise TypeError(f"MPICommunicator.all_reduce_: unsupported dtype {tensor.dtype}")
        # Stage: contiguous CPU copy (upcast for 16-bit floats), reduce, copy back.
        work = tensor.detach().to(device="cpu", dtype=work_dtype, memory_format=torch.contiguous_format, copy=True)
        self.all_reduce_(work)
        tensor.copy_(work)
        return tensor

    def _reduce_in_rank_order(self, tensor: torch.Tensor) -> None:
        parts = torch.empty((self.world_size,) + tuple(tensor.shape), dtype=tensor.dtype)
        byte = self._MPI.BYTE
        self.comm.Allgather([self._buf(tensor), byte], [self._buf(parts), byte])
        _sum_rank_order(parts, tensor)

    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        dim, sizes = resolve_gather(tensor, dim, sizes, self.rank, self.world_size)
        device = tensor.device
        src = tensor.detach()
        if not src.is_cpu:
            src = src.cpu()
        src = src.contiguous()
        shape = list(src.shape)
        # Gather every rank's contiguous block as raw bytes (any dtype,
        # bfloat16 included), rank after rank, then stitch the blocks along dim.
        counts = gather_byte_counts(src, dim, sizes)
        displs = [0] * self.world_size
        for r in range(1, self.world_size):
            displs[r] = displs[r - 1] + counts[r - 1]
        flat = torch.empty(displs[-1] + counts[-1], dtype=torch.uint8)
        if flat.numel():
            self.comm.Allgatherv(
                [self._buf(src) if src.nbytes else bytearray(0), self._MPI.BYTE],
                [self._buf(flat), (counts, displs), self._MPI.BYTE],
            )
        out_shape = shape[:dim] + [sum(sizes)] + shape[dim + 1 :]
        if math.prod(shape[:dim]) == 1:  # gathering along the outermost non-trivial dim: blocks already in place
            out = flat.view(src.dtype).view(out_shape)
        else:
            out = stitch_blocks([flat.narrow(0, displs[r], counts[r]) for r in range(len(sizes))], src, dim, sizes)
        return out if device.type == "cpu" else out.to(device)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast_: src {src} outside world of {self.world_size}")
        if tensor.is_cpu and tensor.is_contiguous():
            if tensor.nbytes:
                self.comm.Bcast([self._buf(tensor), self._MPI.BYTE], root=src)
            return tensor
        work = tensor.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
        self.broadcast_(work, src)
        tensor.copy_(work)
        return tensor

    def barrier(self) -> None:
        self.comm.Barrier()

    def close(self) -> None:
        """Drop cached buffers. MPI itself is finalised by mpi4py at exit."""
        self._bufs.clear()
        self._closed = True


def _sum_rank_order(parts: torch.Tensor, out: torch.Tensor) -> None:
    """out = ((parts[0] + parts[1]) + parts[2]) + ..., the same bits everywhere."""
    if parts.shape[0] == 1:
        out.copy_(parts[0])
        return
    torch.add(parts[0], parts[1], out=out)
    for r in range(2, parts.shape[0]):
        out.add_(parts[r])
