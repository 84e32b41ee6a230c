"""The Communicator protocol: the only collectives the engine uses.

Every path (torch.distributed, MPI through mpi4py, intra-host shared memory)
implements these few methods, so layers never know which one carries them.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Communicator(Protocol):
    """Collectives over one group of ranks.

    All methods are collective: every rank must call them in the same order
    with tensors of the same shape and dtype (all_gather: same shape except
    along ``dim``, as described by ``sizes``).
    """

    name: str
    rank: int
    world_size: int

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; return it.

        Every rank receives a bitwise identical result (sampling relies on it).
        """
        ...

    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim``, in rank order.

        ``sizes[r]`` is rank r's extent along ``dim`` (uneven shards allowed);
        None means all ranks have this rank's extent.
        """
        ...

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with ``src``'s; return it."""
        ...

    def barrier(self) -> None:
        ...

    def close(self) -> None:
        """Release resources; the communicator is unusable afterwards."""
        ...


class SingleProcessCommunicator:
    """World of one: every collective is the identity. No copies, no cost."""

    name = "single"
    rank = 0
    world_size = 1

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None

    def close(self) -> None:
        return None


def gather_sizes(local: int, world_size: int, sizes: Sequence[int] | None) -> list[int]:
    """Resolve the ``sizes`` argument of all_gather, checking it."""
    if sizes is None:
        return [local] * world_size
    sizes = [int(s) for s in sizes]
    if len(sizes) != world_size:
        raise ValueError(f"all_gather: sizes has {len(sizes)} entries for {world_size} ranks")
    return sizes


def resolve_gather(
    tensor: torch.Tensor, dim: int, sizes: Sequence[int] | None, rank: int, world_size: int
) -> tuple[int, list[int]]:
    """Normalize all_gather's ``dim`` and ``sizes`` and check this rank's extent."""
    if tensor.dim() == 0:
        raise ValueError("all_gather: cannot gather a 0-dimensional tensor along a dim")
    dim = dim % tensor.dim()
    sizes = gather_sizes(tensor.shape[dim], world_size, sizes)
    if sizes[rank] != tensor.shape[dim]:
        raise ValueError(
            f"all_gather: rank {rank} holds {tensor.shape[dim]} along dim {dim}, "
            f"but sizes says {sizes[rank]}"
        )
    return dim, sizes


def gather_layout(shape: Sequence[int], element_size: int, dim: int) -> tuple[int, int]:
    """(outer, inner) of a gather along ``dim``: the rows before ``dim`` and the bytes of one step along it."""
    return math.prod(shape[:dim]), element_size * math.prod(shape[dim + 1 :])


def gather_byte_counts(src: torch.Tensor, dim: int, sizes: Sequence[int]) -> list[int]:
    """Bytes of each rank's contiguous block when ``src``'s shape is gathered along ``dim`` with ``sizes``."""
    outer, inner = gather_layout(src.shape, src.element_size(), dim)
    return [outer * s * inner for s in sizes]


def stitch_blocks(blocks: Sequence[torch.Tensor], like: torch.Tensor, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """Each rank's contiguous block (raw bytes or ``like``'s dtype), shaped as ``like`` with ``sizes[r]``
    along ``dim``, concatenated along ``dim`` in rank order."""
    shape = list(like.shape)
    parts = [b.view(like.dtype).view(shape[:dim] + [s] + shape[dim + 1 :]) for b, s in zip(blocks, sizes)]
    return torch.cat(parts, dim=dim)
