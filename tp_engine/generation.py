"""Decoding in lockstep.

Ranks stay in step because they see identical inputs and identical full
logits (all-gather is a concatenation, and every communicator returns
bitwise-identical all-reduce results on all ranks). Sampling additionally
needs identical random numbers: ``generate`` hands every rank rank 0's RNG
state first, whatever each rank seeded.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .comm.base import Communicator
from .parallelize import synchronize_rng


def _comm_of(model: nn.Module) -> Communicator | None:
    for module in model.modules():
        comm = getattr(module, "comm", None)
        if comm is not None:
            return comm
    return None


def generate(model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``model.generate`` with every rank's sampler drawing rank 0's numbers.

    Inputs are checked to be identical on all ranks (a cheap checksum), since
    ranks fed different prompts would silently compute garbage.
    """
    comm = _comm_of(model)
    if comm is not None and comm.world_size > 1:
        _check_same_input(input_ids, comm)
        synchronize_rng(comm)
    return model.generate(input_ids, **kwargs)


def _check_same_input(input_ids: torch.Tensor, comm: Communicator) -> None:
    ids = input_ids.detach().to("cpu", torch.int64)
    weights = torch.arange(1, ids.numel() + 1, dtype=torch.int64)
    digest = torch.tensor([[ids.numel(), int((ids.flatten() * weights).sum())]], dtype=torch.int64)
    everyone = comm.all_gather(digest.to(input_ids.device) if input_ids.device.type != "cpu" else digest, dim=0)
    everyone = everyone.cpu()
    bad = [r for r in range(comm.world_size) if not torch.equal(everyone[r], everyone[0])]
    if bad:
        raise ValueError(f"tp_engine.generate: ranks {bad} were given different input_ids than rank 0")
