"""Collectives through torch.distributed (gloo, NCCL, or torch's own MPI).

Gloo only moves CPU tensors (and CUDA ones in some builds); for any other
device (Apple's MPS above all) tensors are staged through host memory.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .base import resolve_gather

# Device types each backend moves natively; others are staged through the CPU.
NATIVE_DEVICES: dict[str, frozenset[str]] = {
    "gloo": frozenset({"cpu"}),
    "nccl": frozenset({"cuda"}),
    "mpi": frozenset({"cpu"}),
}


def needs_staging(backend: str, device_type: str) -> bool:
    """True when ``backend`` cannot move tensors on ``device_type`` itself."""
    native = NATIVE_DEVICES.get(backend, frozenset({"cpu"}))
    return device_type not in native


class Staged:
    """A host copy of a device tensor for a collective, copied back on exit.

    With ``enabled`` False it is a no-op that hands back the tensor itself.
    """

    def __init__(self, tensor: torch.Tensor, enabled: bool, copy_back: bool = True):
        self.tensor = tensor
        self.enabled = enabled
        self.copy_back = copy_back
        self.host = tensor.detach().to("cpu", copy=True).contiguous() if enabled else tensor

    def __enter__(self) -> torch.Tensor:
        return self.host

    def __exit__(self, *exc) -> None:
        if self.enabled and self.copy_back and exc[0] is None:
            self.tensor.copy_(self.host)


class TorchDistCommunicator:
    """A Communicator over a torch.distributed process group."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.backend = str(dist.get_backend(group)).lower()
        self.name = f"torch-{self.backend}"
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _staged(self, tensor: torch.Tensor, copy_back: bool = True) -> Staged:
        return Staged(tensor, needs_staging(self.backend, tensor.device.type), copy_back)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        with self._staged(tensor) as t:
            dist.all_reduce(t, group=self.group)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        with self._staged(tensor) as t:
            # ``src`` is a rank of this group; torch's ``src`` means a global rank (they differ in sub-groups).
            dist.broadcast(t, group_src=src, group=self.group)
        return tensor

    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        dim, sizes = resolve_gather(tensor, dim, sizes, self.rank, self.world_size)
        width = max(sizes)
        with self._staged(tensor, copy_back=False) as t:
            # Collectives need equal shapes: pad every shard to the widest one.
            if t.shape[dim] < width:
                pad_shape = list(t.shape)
                pad_shape[dim] = width - t.shape[dim]
                t = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
            t = t.contiguous()
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            dist.all_gather(parts, t, group=self.group)
            out = torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)
        return out.to(tensor.device) if out.device != tensor.device else out

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def close(self) -> None:
        if dist.is_initialized() and self.group is None:
            dist.destroy_process_group()
