"""Swap a Hugging Face model's modules for parallel ones, per the plan.

The model keeps its class, config and forward code: HF's ``generate``
runs unchanged on every rank, and each rank's KV cache holds only its heads
(HF's caches take their shapes from the key/value tensors).
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from torch import nn

from .comm.base import Communicator
from .layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_shard_,
)
from .models import resolve_spec
from .models.spec import ArchSpec
from .plan import ModelDims, ModelPlan, RankPlan, plan_model


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _like(old: nn.Module) -> dict[str, Any]:
    return {"dtype": old.weight.dtype, "device": old.weight.device}


def _fill(new: nn.Module, old: nn.Module) -> nn.Module:
    """Copy this rank's shard of ``old``'s weights into ``new``."""
    if old.weight.device.type != "meta":
        copy_shard_(new.weight, old.weight, "weight")
        if getattr(new, "bias", None) is not None:
            copy_shard_(new.bias, old.bias, "bias")
    return new


def _linear_check(module: nn.Module, path: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{path}: expected nn.Linear, found {type(module).__name__}")
    return module


def _heads(r: range, head_dim: int) -> tuple[tuple[int, int], ...]:
    return ((r.start * head_dim, r.stop * head_dim),)


def _column(old: nn.Linear, rows, comm) -> ColumnParallelLinear:
    return _fill(ColumnParallelLinear(old.in_features, rows, comm, bias=old.bias is not None, **_like(old)), old)


def _row(old: nn.Linear, cols, comm) -> RowParallelLinear:
    return _fill(RowParallelLinear(cols, old.out_features, comm, bias=old.bias is not None, **_like(old)), old)


def _shard_attention(attn: nn.Module, spec: ArchSpec, rp: RankPlan, dims: ModelDims, comm, path: str) -> None:
    hd = dims.head_dim
    q, k, v, o = (_linear_check(_get(attn, n), f"{path}.{n}") for n in (spec.q_proj, spec.k_proj, spec.v_proj, spec.o_proj))
    if q.out_features != dims.num_q_heads * hd or k.out_features != dims.num_kv_heads * hd:
        raise ValueError(
            f"{path}: projection shapes {q.out_features}/{k.out_features} disagree with "
            f"{dims.num_q_heads} Q / {dims.num_kv_heads} KV heads of dim {hd}"
        )
    _set(attn, spec.q_proj, _column(q, _heads(rp.q_heads, hd), comm))
    _set(attn, spec.k_proj, _column(k, _heads(rp.kv_heads, hd), comm))
    _set(attn, spec.v_proj, _column(v, _heads(rp.kv_heads, hd), comm))
    _set(attn, spec.o_proj, _row(o, _heads(rp.q_heads, hd), comm))
    # HF attention reads the Q-per-KV ratio from the module (repeat_kv).
    attn.num_key_value_groups = rp.q_per_kv
    for name in spec.q_head_attrs:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, len(rp.q_heads))
    for name in spec.kv_head_attrs:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, len(rp.kv_heads))


def _shard_mlp(mlp: nn.Module, spec: ArchSpec, rp: RankPlan, comm, path: str) -> None:
    cols = ((rp.mlp_columns.start, rp.mlp_columns.stop),)
    for name in spec.mlp_column:
        _set(mlp, name, _column(_linear_check(_get(mlp, name), f"{path}.{name}"), cols, comm))
    _set(mlp, spec.mlp_row, _row(_linear_check(_get(mlp, spec.mlp_row), f"{path}.{spec.mlp_row}"), cols, comm))


def _embedding_scale(emb: nn.Embedding) -> float | None:
    scale = getattr(emb, "scalar_embed_scale", None)
    if scale is None and isinstance(getattr(emb, "embed_scale", None), torch.Tensor):
        scale = float(emb.embed_scale)
    return scale


def _shard_vocab(model: nn.Module, spec: ArchSpec, plan: ModelPlan, rank: int, comm) -> None:
    rp = plan[rank]
    emb = _get(model, spec.embedding)
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"{spec.embedding}: expected nn.Embedding, found {type(emb).__name__}")
    new_emb = VocabParallelEmbedding(
        (rp.vocab.start, rp.vocab.stop), emb.embedding_dim, comm,
        scale=_embedding_scale(emb), padding_idx=emb.padding_idx, **_like(emb),
    )
    _fill(new_emb, emb)
    head = _linear_check(_get(model, spec.lm_head), spec.lm_head)
    tied = head.weight is emb.weight
    vocab_ranges = [(r.vocab.start, r.vocab.stop) for r in plan.ranks]
    new_head = ParallelLMHead(head.in_features, vocab_ranges, rank, comm, bias=head.bias is not None, **_like(head))
    if tied:
        new_head.weight = new_emb.weight  # same shard of the same table
        if new_head.bias is not None:
            copy_shard_(new_head.bias, head.bias, "lm_head.bias")
    else:
        _fill(new_head, head)
    _set(model, spec.embedding, new_emb)
    _set(model, spec.lm_head, new_head)


def _sum_replicated_grads(module: ColumnParallelLinear, full_rows: int, comm: Communicator) -> None:
    """KV heads held by several ranks get partial gradients; sum the copies.

    Each rank scatters its rows into a zero tensor of the full shape; the
    all-reduce then sums exactly the ranks holding each head.
    """
    (start, stop), = module.weight.tp_shard.ranges

    def hook(grad: torch.Tensor) -> torch.Tensor:
        full = grad.new_zeros((full_rows,) + tuple(grad.shape[1:]))
        full[start:stop] = grad
        return comm.all_reduce_(full)[start:stop].clone()

    for param in (module.weight, module.bias):
        if param is not None:
            param.register_hook(hook)


def _plan_fingerprint(plan: ModelPlan) -> torch.Tensor:
    text = repr((plan.dims, plan.world_size, plan.shares)).encode()
    return torch.tensor(list(hashlib.sha256(text).digest()[:8]), dtype=torch.int64)


def _check_ranks_agree(plan: ModelPlan, comm: Communicator) -> None:
    """Every rank must plan the same split, or collectives would mismatch."""
    mine = _plan_fingerprint(plan)
    everyone = comm.all_gather(mine.unsqueeze(0), dim=0)
    bad = [r for r in range(comm.world_size) if not torch.equal(everyone[r], everyone[0])]
    if bad:
        raise ValueError(
            f"ranks {bad} planned a different split than rank 0 (different model config or shares?); "
            f"this rank planned: {plan.describe()}"
        )


def synchronize_rng(comm: Communicator) -> None:
    """Give every rank rank 0's RNG state, so sampling draws the same numbers."""
    if comm.world_size == 1:
        return
    state = torch.get_rng_state()
    comm.broadcast_(state, src=0)
    torch.set_rng_state(state)


def parallelize(
    model: nn.Module,
    shares: Sequence[float] | None = None,
    comm: Communicator | None = None,
    rank: int | None = None,
) -> nn.Module:
    """Shard ``model`` in place across the tensor-parallel group; return it.

    Every rank must pass the same model (same config and weights) and the
    same ``shares``. ``comm`` defaults to the one from ``tp_engine.init()``.
    """
    if comm is None:
        from .distributed import init

        comm = init().comm
    if getattr(model, "tp_engine_plan", None) is not None:
        raise ValueError("parallelize: this model is already sharded; pass the original model")
    rank = comm.rank if rank is None else rank
    config = model.config
    spec = resolve_spec(model, comm.world_size, shares)
    dims = ModelDims.from_config(config)
    plan = plan_model(dims, comm.world_size, shares)
    if comm.world_size > 1:
        _check_ranks_agree(plan, comm)
    rp = plan[rank]

    layers = _get(model, spec.layers)
    for i, layer in enumerate(layers):
        path = f"{spec.layers}.{i}"
        _shard_attention(_get(layer, spec.attention), spec, rp, dims, comm, f"{path}.{spec.attention}")
        _shard_mlp(_get(layer, spec.mlp), spec, rp, comm, f"{path}.{spec.mlp}")
        if plan.replicated_kv_heads:
            attn = _get(layer, spec.attention)
            for name in (spec.k_proj, spec.v_proj):
                _sum_replicated_grads(_get(attn, name), dims.num_kv_heads * dims.head_dim, comm)
    _shard_vocab(model, spec, plan, rank, comm)

    model.tp_engine_plan = plan
    model.tp_engine_rank = rank
    synchronize_rng(comm)
    return model
