"""Checks that every rank was given the same thing, before any rank computes on it.

Ranks fed different prompts would silently compute garbage (each would
shard a different sequence), so entry points compare a cheap digest first
and raise on every rank, naming the ranks that differ.
"""
from __future__ import annotations

import torch

from .base import Communicator

__all__ = ["token_digest", "check_same_tokens"]


def token_digest(ids: torch.Tensor) -> int:
    """A position-weighted checksum of token ids and their count (fits in 62 bits)."""
    flat = ids.detach().to("cpu", torch.int64).flatten()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64)
    return (int((flat * weights).sum()) * 1_000_003 + flat.numel()) % (1 << 62)


def check_same_tokens(ids: torch.Tensor, comm: Communicator, who: str) -> None:
    """Raise ValueError on every rank when any rank's ``ids`` differ from rank 0's."""
    if comm.world_size == 1:
        return
    row = torch.tensor([[token_digest(ids), ids.numel()]], dtype=torch.int64)
    everyone = comm.all_gather(row.to(ids.device), dim=0).cpu()  # NCCL carries device tensors only
    bad = [r for r in range(comm.world_size) if not torch.equal(everyone[r], everyone[0])]
    if bad:
        raise ValueError(f"{who}: ranks {bad} were given different input_ids than rank 0")
