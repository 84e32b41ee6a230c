"""Swap a Hugging Face model's modules for parallel ones, per the spec and the plan.

The model keeps its class, config and forward code: HF's ``generate``
runs unchanged on every rank, and each rank's KV cache holds only its heads
(HF's caches take their shapes from the key/value tensors).

What the spec (``models/spec.py``) can describe, and what happens here:

* separate or fused q/k/v projections (fused: ``concat`` [Q | K | V] or
  ``grouped`` per KV head [its Qs | K | V]); a rank's fused rows are several
  (start, stop) pieces of the checkpoint tensor, in the order HF's reshape
  expects locally;
* nn.Linear or HF's Conv1D (weight stored (in, out)), sharded in that storage;
* stacked MLP inputs ([gate | up] in one projection);
* parallel attention + MLP blocks, all-reduced once per layer
  (:class:`~tp_engine.layers.PartialSum`);
* MoE blocks with fused 3-D expert weights, all-reduced once per block;
* q/k RMS norms over a whole projection (Olmo 2), split with the heads they
  normalize, all-reducing per-token sums of squares (:class:`~tp_engine.layers.HeadShardedRMSNorm`);
* ALiBi biases narrowed to the rank's heads; config views with rank-local
  head counts for modules that read them from the config;
* partial plans: roles a spec replicates (attention, MLP, embedding, LM
  head) stay whole on every rank, and layers that differ are sharded by the
  spec of their kind (``ArchSpec.layer_kinds``, keyed by ``models.layout.layer_kind``).

``shard_model`` takes the spec as an argument and only shards; choosing the
spec (declared, or inferred and parity-checked) happens before, once, in
``tp_engine.api`` (whose ``parallelize`` is the public entry point).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .comm.base import Communicator
from .layers import (
    ColumnParallelConv1D,
    ColumnParallelLinear,
    CopyInputs,
    CopyOutput,
    DeferredRowParallelLinear,
    HeadShardedRMSNorm,
    ParallelLMHead,
    PartialSum,
    ReduceOutput,
    RowParallelConv1D,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
    copy_shard_,
    map_first_output,
    shard_parameter,
)
from .models.layout import fused_qkv_rows, layer_kind, layer_types, merge_ranges, rms_norm_form
from .models.spec import ArchSpec
from .plan import ModelDims, ModelPlan, RankPlan, normalize_shares, plan_model, split_by_shares

# ------------------------------------------------------------ module paths


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _get(root: nn.Module, path: str, where: str = "") -> nn.Module:
    """``root.get_submodule(path)``, or a ValueError naming the full path."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"{_join(where, path)}: no such module ({type(root).__name__} does not match the architecture spec)"
        ) from None


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _is_bare(model: nn.Module) -> bool:
    """A base model (LlamaModel, BertModel) rather than one with a head around it."""
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and not isinstance(getattr(model, prefix, None), nn.Module)


def _model_path(model: nn.Module, path: str) -> str | None:
    """``path`` as found in ``model``: as given, or without the base-model prefix
    on a bare base model ("model.layers" is "layers" in a LlamaModel); None if absent."""
    if _has(model, path):
        return path
    prefix = getattr(model, "base_model_prefix", "")
    head, _, rest = path.partition(".")
    if rest and head == prefix and _is_bare(model) and _has(model, rest):
        return rest
    return None


# ------------------------------------------------------------ projections


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def _proj(parent: nn.Module, name: str, where: str) -> nn.Module:
    """The projection at ``name``: an nn.Linear (or subclass) or HF Conv1D."""
    module = _get(parent, name, where)
    if not isinstance(module, nn.Linear) and not _is_conv1d(module):
        raise TypeError(f"{_join(where, name)}: expected nn.Linear or Conv1D, found {type(module).__name__}")
    return module


def _in_out(module: nn.Module) -> tuple[int, int]:
    if _is_conv1d(module):  # weight stored (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return module.in_features, module.out_features


def _like(old: nn.Module) -> dict[str, Any]:
    return {"dtype": old.weight.dtype, "device": old.weight.device}


def _fill(new: nn.Module, old: nn.Module) -> nn.Module:
    """Copy this rank's shard of ``old``'s weights into ``new`` (and its train/eval mode)."""
    new.train(old.training)
    if old.weight.device.type != "meta":
        copy_shard_(new.weight, old.weight, "weight")
        if getattr(new, "bias", None) is not None:
            copy_shard_(new.bias, old.bias, "bias")
    return new


def _heads(r: range, head_dim: int) -> tuple[tuple[int, int], ...]:
    return ((r.start * head_dim, r.stop * head_dim),)


def _column(old: nn.Module, rows, comm) -> nn.Module:
    in_features, _ = _in_out(old)
    cls = ColumnParallelConv1D if _is_conv1d(old) else ColumnParallelLinear
    return _fill(cls(in_features, rows, comm, bias=old.bias is not None, **_like(old)), old)


def _row(old: nn.Module, cols, comm, sink: PartialSum | None = None, partial: bool = False, where: str = "") -> nn.Module:
    """Row-parallel replacement of ``old``: reducing itself, or deferring to
    ``sink`` (a parallel block) or, with ``partial``, to the enclosing module."""
    _, out_features = _in_out(old)
    bias = old.bias is not None
    if sink is None and not partial:
        cls = RowParallelConv1D if _is_conv1d(old) else RowParallelLinear
        return _fill(cls(cols, out_features, comm, bias=bias, **_like(old)), old)
    if _is_conv1d(old):
        raise TypeError(f"{where}: deferred reduction supports nn.Linear only, found Conv1D")
    if partial and bias:
        raise ValueError(f"{where}: a partial-sum projection cannot have a bias (it would be added once per rank)")
    return _fill(DeferredRowParallelLinear(cols, out_features, comm, sink=sink, bias=bias, **_like(old)), old)


# ------------------------------------------------------------ context


@dataclass(frozen=True)
class _Context:
    plan: ModelPlan
    rank: int
    comm: Communicator

    @property
    def rp(self) -> RankPlan:
        return self.plan[self.rank]

    @property
    def dims(self) -> ModelDims:
        return self.plan.dims

    def columns(self, width: int, unit: int = 1) -> range:
        """This rank's columns of an intermediate dimension ``width``, split by the plan's shares
        in whole multiples of ``unit`` columns (when ``width`` is a multiple of it)."""
        if width % unit:
            unit = 1
        if width == self.dims.intermediate_size and unit == 1:
            return self.rp.mlp_columns
        # MoE expert and shared-expert widths differ from config.intermediate_size.
        piece = split_by_shares(width // unit, normalize_shares(self.plan.world_size, self.plan.shares))[self.rank]
        return range(piece.start * unit, piece.stop * unit)


# ------------------------------------------------------------ attention


def _sum_replicated_grads(module: nn.Module, shared: Sequence[tuple[int, int, int]], full: int, comm: Communicator) -> None:
    """KV heads held by several ranks get partial gradients; sum the copies.

    ``shared``: (local offset, global start, length) of this rank's K/V rows
    in a tensor of ``full`` rows (along the parameter's shard dim). Each rank
    scatters those rows into a zero tensor of the full size; the all-reduce
    then sums exactly the ranks holding each head. Q rows are left alone.
    """

    def hook_for(dim: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            shape = list(grad.shape)
            shape[dim] = full
            gathered = grad.new_zeros(shape)
            for local, start, n in shared:
                gathered.narrow(dim, start, n).copy_(grad.narrow(dim, local, n))
            comm.all_reduce_(gathered)
            out = grad.clone()
            for local, start, n in shared:
                out.narrow(dim, local, n).copy_(gathered.narrow(dim, start, n))
            return out

        return hook

    for param in (module.weight, getattr(module, "bias", None)):
        if param is not None:
            param.register_hook(hook_for(param.tp_shard.dim if param.dim() > 1 else 0))


class _ConfigView:
    """The shared model config, with a few attributes replaced for one module.

    Everything else is read from (and written to) the shared config, so a
    later change such as the attention implementation still shows.
    """

    def __init__(self, base: Any, overrides: dict[str, Any]):
        self.__dict__["_base"] = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("_base")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self.__dict__["_base"], name, value)


def _shard_span_norm(attn: nn.Module, name: str, ctx: _Context, path: str) -> None:
    """Split an RMS norm over a whole q or k projection (``ArchSpec.qk_norm_span``) with its rows.

    Its width says which rows it normalizes: the rank's Q heads (Q width) or
    KV heads (KV width). A KV head held by several ranks is counted in the sum
    of squares on the lowest rank holding it only, so every head counts once.
    """
    rp, dims, comm = ctx.rp, ctx.dims, ctx.comm
    hd, nq, nkv = dims.head_dim, dims.num_q_heads, dims.num_kv_heads
    where = _join(path, name)
    norm = _get(attn, name, path)
    weight = getattr(norm, "weight", None)
    width = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None
    if width == nq * hd:
        heads, earlier = rp.q_heads, [r.q_heads for r in ctx.plan.ranks[: ctx.rank]]
    elif width == nkv * hd:
        heads, earlier = rp.kv_heads, [r.kv_heads for r in ctx.plan.ranks[: ctx.rank]]
    else:
        raise ValueError(
            f"{where}: expected a norm over {nq} Q or {nkv} KV heads x {hd} features, found "
            f"{'no 1-D weight' if width is None else f'{width} features'}"
        )
    form = rms_norm_form(norm)
    if form is None:
        raise ValueError(f"{where}: {type(norm).__name__} is not a plain RMS norm (w * x * rsqrt(mean(x^2) + eps))")
    held_before = {h for r in earlier for h in r}
    counted = merge_ranges([(i * hd, (i + 1) * hd) for i, h in enumerate(heads) if h not in held_before])
    new = HeadShardedRMSNorm(
        width, _heads(heads, hd), comm, form.eps, counted=counted, cast_first=form.cast_first, **_like(norm)
    )
    _set(attn, name, _fill(new, norm))
    if width != nq * hd and ctx.plan.replicated_kv_heads:  # on every rank: the hook all-reduces
        _sum_replicated_grads(new, [(0, heads.start * hd, len(heads) * hd)], width, comm)


class _NarrowAlibi:
    """Forward pre-hook: keep this rank's heads of an ALiBi tensor (batch * heads, 1, keys).

    The model builds the biases for all heads (exactly as unsharded); the
    rank's attention needs the slopes of its own global heads.
    """

    def __init__(self, kwarg: str, heads: range, total_heads: int, where: str):
        self.kwarg, self.heads, self.total, self.where = kwarg, heads, total_heads, where

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.kwarg not in kwargs:
            raise RuntimeError(f"{self.where}: expected the {self.kwarg!r} keyword argument (ALiBi biases)")
        alibi = kwargs[self.kwarg]
        if alibi is None:
            return None
        if alibi.shape[0] % self.total:
            raise RuntimeError(f"{self.where}: {self.kwarg} has {alibi.shape[0]} rows, not batch x {self.total} heads")
        rest = tuple(alibi.shape[1:])
        local = alibi.view(-1, self.total, *rest)[:, self.heads.start : self.heads.stop].reshape(-1, *rest)
        return args, {**kwargs, self.kwarg: local}


def _shard_attention(attn: nn.Module, spec: ArchSpec, ctx: _Context, path: str, sink: PartialSum | None) -> None:
    rp, dims, comm = ctx.rp, ctx.dims, ctx.comm
    hd, nq, nkv = dims.head_dim, dims.num_q_heads, dims.num_kv_heads
    kv_modules: list[tuple[nn.Module, list[tuple[int, int, int]], int]] = []
    if spec.qkv_proj:
        fused = _proj(attn, spec.qkv_proj, path)
        full = (nq + 2 * nkv) * hd
        if _in_out(fused)[1] != full:
            raise ValueError(
                f"{_join(path, spec.qkv_proj)}: fused q/k/v has {_in_out(fused)[1]} outputs, expected "
                f"({nq} Q + 2 x {nkv} KV heads) x {hd} = {full}"
            )
        pieces, kv_rows = fused_qkv_rows(spec.qkv_layout, rp, dims)
        new = _column(fused, merge_ranges(pieces), comm)
        _set(attn, spec.qkv_proj, new)
        kv_modules.append((new, kv_rows, full))
    else:
        q, k, v = (_proj(attn, n, path) for n in (spec.q_proj, spec.k_proj, spec.v_proj))
        q_rows = spec.q_rows_per_head or hd  # a gated q_proj holds [q_h | gate_h] per head
        if _in_out(q)[1] != nq * q_rows or _in_out(k)[1] != nkv * hd or _in_out(v)[1] != nkv * hd:
            raise ValueError(
                f"{path}: projection shapes {_in_out(q)[1]}/{_in_out(k)[1]}/{_in_out(v)[1]} disagree with "
                f"{nq} Q / {nkv} KV heads of dim {hd}" + (f" ({q_rows} q rows per head)" if spec.q_rows_per_head else "")
            )
        _set(attn, spec.q_proj, _column(q, _heads(rp.q_heads, q_rows), comm))
        kv_len = len(rp.kv_heads) * hd
        for name, old in ((spec.k_proj, k), (spec.v_proj, v)):
            new = _column(old, _heads(rp.kv_heads, hd), comm)
            _set(attn, name, new)
            kv_modules.append((new, [(0, rp.kv_heads.start * hd, kv_len)], nkv * hd))
    for name in spec.q_head_projs:
        # Per-Q-head output rows (an output gate): each head owns out // nq rows.
        extra = _proj(attn, name, path)
        out = _in_out(extra)[1]
        if out % nq:
            raise ValueError(f"{_join(path, name)}: {out} outputs is not a whole number of rows per each of {nq} Q heads")
        _set(attn, name, _column(extra, _heads(rp.q_heads, out // nq), comm))
    for name in spec.qk_norm_span:
        _shard_span_norm(attn, name, ctx, path)
    o = _proj(attn, spec.o_proj, path)
    if _in_out(o)[0] != nq * hd:
        raise ValueError(f"{_join(path, spec.o_proj)}: has {_in_out(o)[0]} inputs, expected {nq} heads x {hd}")
    _set(attn, spec.o_proj, _row(o, _heads(rp.q_heads, hd), comm, sink=sink, where=_join(path, spec.o_proj)))

    # The module that runs the attention math reads head counts from itself.
    core = _get(attn, spec.attention_core, path)
    # HF attention reads the Q-per-KV ratio from the module (repeat_kv).
    core.num_key_value_groups = rp.q_per_kv
    for name in spec.q_head_attrs:
        if isinstance(getattr(core, name, None), int):
            setattr(core, name, len(rp.q_heads))
    for name in spec.kv_head_attrs:
        if isinstance(getattr(core, name, None), int):
            setattr(core, name, len(rp.kv_heads))
    for name in spec.q_width_attrs:
        if isinstance(getattr(core, name, None), int):
            setattr(core, name, len(rp.q_heads) * hd)
    if spec.attention_config_heads:
        config = getattr(core, "config", None)
        if config is None:
            raise ValueError(f"{_join(path, spec.attention_core)}: spec expects a `config` attribute on the attention module")
        core.config = _ConfigView(config, {name: len(rp.q_heads) for name in spec.attention_config_heads})
    for name in spec.q_head_params:
        param = getattr(core, name, None)
        if not isinstance(param, nn.Parameter) or param.dim() < 1 or param.shape[0] % nq:
            raise ValueError(f"{_join(path, spec.attention_core, name)}: expected a parameter whose dim 0 runs over {nq} Q heads")
        per_head = param.shape[0] // nq
        setattr(core, name, shard_parameter(param, ShardSpec(0, _heads(rp.q_heads, per_head))))
    if spec.alibi_kwarg:
        attn.register_forward_pre_hook(_NarrowAlibi(spec.alibi_kwarg, rp.q_heads, nq, path), with_kwargs=True)

    if ctx.plan.replicated_kv_heads:
        for module, shared, full in kv_modules:
            _sum_replicated_grads(module, shared, full, comm)


# ------------------------------------------------------------ MLP and MoE


def _shard_mlp(
    mlp: nn.Module, spec: ArchSpec, ctx: _Context, path: str, sink: PartialSum | None = None, partial: bool = False
) -> None:
    """Column-split the input projections, row-split the output one, by intermediate columns."""
    row = _proj(mlp, spec.mlp_row, path)
    width = _in_out(row)[0]
    cols = ctx.columns(width)
    for name in spec.mlp_column:
        old = _proj(mlp, name, path)
        if _in_out(old)[1] != width * spec.mlp_stacked:
            raise ValueError(
                f"{_join(path, name)}: has {_in_out(old)[1]} outputs, expected {spec.mlp_stacked} x {width} "
                f"(the inputs of {spec.mlp_row})"
            )
        if spec.mlp_stacked_layout == "interleaved":
            # [g0, u0, g1, u1, ...]: column j owns rows j * blocks .. (j + 1) * blocks.
            ranges: tuple[tuple[int, int], ...] = ((cols.start * spec.mlp_stacked, cols.stop * spec.mlp_stacked),)
        else:
            # [gate | up] stacked: the same columns from every block.
            ranges = tuple((k * width + cols.start, k * width + cols.stop) for k in range(spec.mlp_stacked))
        _set(mlp, name, _column(old, ranges, ctx.comm))
    where = _join(path, spec.mlp_row)
    _set(mlp, spec.mlp_row, _row(row, ((cols.start, cols.stop),), ctx.comm, sink=sink, partial=partial, where=where))


def _expert_param(experts: nn.Module, name: str, where: str) -> nn.Parameter:
    param = getattr(experts, name, None)
    if not isinstance(param, nn.Parameter) or param.dim() != 3:
        found = type(param).__name__ if not isinstance(param, torch.Tensor) else f"a {param.dim()}-D tensor"
        raise TypeError(f"{_join(where, name)}: expected a 3-D (experts, out, in) parameter, found {found}")
    return param


def _expert_bias(experts: nn.Module, name: str, dims: int, where: str) -> nn.Parameter:
    param = getattr(experts, name, None)
    if not isinstance(param, nn.Parameter) or param.dim() != dims:
        raise TypeError(f"{_join(where, name)}: expected a {dims}-D (experts, features) bias parameter")
    return param


class _WithoutRoutedBias:
    """Forward hook (ranks other than 0): subtract the routed down-projection bias.

    The experts module returns sum_k w_k (down_k(x) + b_k) per token; with the
    weights split, every rank's partial output carries the whole sum_k w_k b_k,
    so after the all-reduce it would be counted once per rank. The forward's
    routing arguments (token indices and weights, after the hidden states)
    give exactly that term.
    """

    def __init__(self, bias_name: str, where: str):
        self.bias_name, self.where = bias_name, where

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output):
        routing = list(args[1:3]) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        if len(routing) < 2:
            raise RuntimeError(f"{self.where}: expected the routing indices and weights as forward arguments")
        index, weights = routing[0], routing[1]
        if index.is_floating_point():
            index, weights = weights, index
        bias = getattr(module, self.bias_name)
        routed = (weights.unsqueeze(-1).to(bias.dtype) * bias[index]).sum(dim=-2)
        return map_first_output(output, lambda y: y - routed.to(y.dtype).reshape(y.shape))


def _shard_moe(block: nn.Module, spec: ArchSpec, ctx: _Context, path: str) -> None:
    """Shard every expert by intermediate columns; reduce the block's output once.

    The experts' fused weights are 3-D: ``gate_up`` (experts, [gate | up],
    hidden) and ``down`` (experts, hidden, intermediate), or their transposes
    when the module says ``is_transposed``. Each rank computes every routed
    token's expert outputs over its columns: a partial sum; the block adds
    them (and the shared expert's partial output) and one all-reduce on the
    block's output completes all of them.
    """
    where = _join(path, spec.moe_experts)
    experts = _get(block, spec.moe_experts, path)
    if getattr(experts, "has_post_expert_norm", False):
        raise ValueError(f"{where}: experts with a post-expert norm are not supported")
    has_bias = bool(getattr(experts, "has_bias", False))
    transposed = spec.moe_transposed if spec.moe_transposed is not None else bool(getattr(experts, "is_transposed", False))
    gated = bool(getattr(experts, "has_gate", True))
    concatenated = bool(getattr(experts, "is_concatenated", True))
    gate_up = _expert_param(experts, spec.moe_gate_up, where)
    down = _expert_param(experts, spec.moe_down, where)
    up_dim, down_dim = (2, 1) if transposed else (1, 2)
    width = int(down.shape[down_dim])
    blocks = 2 if gated else 1
    if gate_up.shape[up_dim] != blocks * width:
        raise ValueError(
            f"{_join(where, spec.moe_gate_up)}: dim {up_dim} is {gate_up.shape[up_dim]}, expected {blocks} x {width}"
        )
    # Grouped-GEMM expert kernels (torch._grouped_mm) need 16-byte row
    # strides: keep each rank's expert width a multiple of 16 bytes.
    cols = ctx.columns(width, unit=max(1, 16 // down.element_size()))
    if gated and not concatenated:  # [g0, u0, g1, u1, ...]
        up_ranges: tuple[tuple[int, int], ...] = ((2 * cols.start, 2 * cols.stop),)
    else:  # [gate | up]: the same columns from both halves
        up_ranges = tuple((k * width + cols.start, k * width + cols.stop) for k in range(blocks))
    setattr(experts, spec.moe_gate_up, shard_parameter(gate_up, ShardSpec(up_dim, up_ranges)))
    setattr(experts, spec.moe_down, shard_parameter(down, ShardSpec(down_dim, ((cols.start, cols.stop),))))
    if has_bias:
        # GPT-OSS: gate/up biases (experts, [gate | up]) split like their
        # columns; the down bias (experts, hidden) is added by every rank's
        # partial expert output, so all but rank 0 take its routed share back out.
        up_bias = _expert_bias(experts, f"{spec.moe_gate_up}_bias", 2, where)
        down_bias = _expert_bias(experts, f"{spec.moe_down}_bias", 2, where)
        if up_bias.shape[1] != blocks * width or down_bias.shape[1] != int(down.shape[2 if transposed else 1]):
            raise ValueError(f"{where}: expert bias shapes {tuple(up_bias.shape)} / {tuple(down_bias.shape)} do not match the weights")
        setattr(experts, f"{spec.moe_gate_up}_bias", shard_parameter(up_bias, ShardSpec(1, up_ranges)))
        if ctx.rank != 0:
            experts.register_forward_hook(_WithoutRoutedBias(f"{spec.moe_down}_bias", where), with_kwargs=True)
    if isinstance(getattr(experts, "intermediate_dim", None), int):
        experts.intermediate_dim = len(cols)
    # The experts read their input directly (no ColumnParallel layer): sum
    # its gradient, and the routing weights', over ranks in backward.
    experts.register_forward_pre_hook(CopyInputs(ctx.comm), with_kwargs=True)

    if spec.moe_reduce == "experts":
        # The experts' output is complete after one all-reduce; whatever the
        # block then does with it (and with its shared expert, an ordinary
        # self-reducing MLP) sees full tensors, as unsharded.
        experts.register_forward_hook(ReduceOutput(ctx.comm))
        if spec.moe_shared_expert and _has(block, spec.moe_shared_expert):
            shared_path = _join(path, spec.moe_shared_expert)
            _shard_mlp(_get(block, spec.moe_shared_expert, path), spec, ctx, shared_path)
        return
    if spec.moe_shared_expert and _has(block, spec.moe_shared_expert):
        shared_path = _join(path, spec.moe_shared_expert)
        _shard_mlp(_get(block, spec.moe_shared_expert, path), spec, ctx, shared_path, partial=True)
    for name in spec.moe_gates:
        if _has(block, name):
            _get(block, name, path).register_forward_hook(CopyOutput(ctx.comm))
    block.register_forward_hook(ReduceOutput(ctx.comm))


# ------------------------------------------------------------ embedding and head


def _embedding_scale(emb: nn.Embedding) -> float | None:
    scale = getattr(emb, "scalar_embed_scale", None)
    if scale is None and isinstance(getattr(emb, "embed_scale", None), torch.Tensor):
        scale = float(emb.embed_scale)
    elif scale is None and type(emb).forward is not nn.Embedding.forward:
        # Scaled-embedding subclasses keeping a plain float (BioGPT, XGLM, the BART family).
        value = getattr(emb, "embed_scale", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale = float(value)
    return scale


def _retie(model: nn.Module, old: torch.Tensor | None, new: torch.Tensor | None) -> None:
    """Point every remaining alias of parameter ``old`` (a tie) at ``new``."""
    if old is None or new is None:
        return
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is old:
                module._parameters[name] = new


def _shard_vocab(model: nn.Module, spec: ArchSpec, plan: ModelPlan, rank: int, comm) -> None:
    rp = plan[rank]
    shard_emb, shard_head = "embedding" not in spec.replicate, "lm_head" not in spec.replicate
    if not shard_emb and not shard_head:
        return
    if not shard_emb:
        # The embedding stays whole; the LM head (tied or not) still splits by vocabulary.
        head_path = _model_path(model, spec.lm_head)
        if head_path is None:
            raise ValueError(f"{spec.lm_head}: no such module ({type(model).__name__} does not match the {spec.family} spec)")
        _shard_head(model, head_path, None, plan, rank, comm)
        return
    emb_path = _model_path(model, spec.embedding)
    if emb_path is None:
        raise ValueError(f"{spec.embedding}: no such module ({type(model).__name__} does not match the {spec.family} spec)")
    emb = model.get_submodule(emb_path)
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"{emb_path}: expected nn.Embedding, found {type(emb).__name__}")
    new_emb = VocabParallelEmbedding(
        (rp.vocab.start, rp.vocab.stop), emb.embedding_dim, comm,
        scale=_embedding_scale(emb), padding_idx=emb.padding_idx, **_like(emb),
    )
    _fill(new_emb, emb)

    head_path = _model_path(model, spec.lm_head)
    if head_path is None and shard_head and not (spec.lm_head_optional or _is_bare(model)):
        raise ValueError(f"{spec.lm_head}: no such module ({type(model).__name__} does not match the {spec.family} spec)")
    if not shard_head and head_path is not None and getattr(model.get_submodule(head_path), "weight", None) is emb.weight:
        raise ValueError(f"{head_path}: a replicated LM head tied to a split embedding ({emb_path}) cannot keep its tie")
    _set(model, emb_path, new_emb)
    if head_path is not None and shard_head:
        _shard_head(model, head_path, (emb, new_emb), plan, rank, comm)
    _retie(model, emb.weight, new_emb.weight)


def _shard_head(
    model: nn.Module, head_path: str, embeddings: tuple[nn.Embedding, VocabParallelEmbedding] | None,
    plan: ModelPlan, rank: int, comm,
) -> None:
    """Split the LM head by vocabulary; ``embeddings`` (old, new) when the embedding was split too."""
    head = model.get_submodule(head_path)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{head_path}: expected nn.Linear, found {type(head).__name__}")
    tied = embeddings is not None and head.weight is embeddings[0].weight
    vocab_ranges = [(r.vocab.start, r.vocab.stop) for r in plan.ranks]
    new_head = ParallelLMHead(head.in_features, vocab_ranges, rank, comm, bias=head.bias is not None, **_like(head))
    new_head.train(head.training)
    if tied:
        new_head.weight = embeddings[1].weight  # same shard of the same table
        if new_head.bias is not None and head.bias.device.type != "meta":
            copy_shard_(new_head.bias, head.bias, "lm_head.bias")
    else:
        # An untied head, or one tied to an embedding that stays whole: its own
        # shard (the whole table stays with the embedding).
        _fill(new_head, head)
    _set(model, head_path, new_head)
    # BERT ties the decoder bias to cls.predictions.bias: keep the tie.
    _retie(model, head.bias, new_head.bias)


# ------------------------------------------------------------ plan agreement


def _plan_fingerprint(plan: ModelPlan) -> torch.Tensor:
    text = repr((plan.dims, plan.world_size, plan.shares, plan.mlp_unit)).encode()
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


# ------------------------------------------------------------ entry point


def layer_specs(model: nn.Module, spec: ArchSpec) -> tuple[str, list[ArchSpec]]:
    """(layer list path, the spec each layer is sharded by): ``spec`` itself, or its layer kind's."""
    layers_path = _model_path(model, spec.layers)
    if layers_path is None:
        raise ValueError(f"{spec.layers}: no such module ({type(model).__name__} does not match the {spec.family} spec)")
    layers = model.get_submodule(layers_path)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"{layers_path}: expected a ModuleList of layers, found {type(layers).__name__}")
    if not spec.layer_kinds:
        return layers_path, [spec] * len(layers)
    kinds = dict(spec.layer_kinds)
    out = []
    for i, (layer, kind_type) in enumerate(zip(layers, layer_types(model.config, len(layers)))):
        key = layer_kind(layer, kind_type)
        if key not in kinds:
            raise ValueError(
                f"{layers_path}.{i}: a layer of kind {key}, which the {spec.family} spec does not describe "
                f"(it knows {', '.join(kinds)})"
            )
        out.append(kinds[key])
    return layers_path, out


def describe_spec(model: nn.Module, spec: ArchSpec) -> str:
    """What a plan replicates, in words: "" for a plan that shards every role, else
    e.g. "partial: attention replicated in 3/4 layers; embedding replicated"."""
    try:
        _, per_layer = layer_specs(model, spec)
    except (ValueError, TypeError):
        return ""
    parts = []
    total = len(per_layer)
    for role, word in (("attention", "attention"), ("mlp", "MLP")):
        n = sum(1 for s in per_layer if role in s.replicate)
        if n:
            parts.append(f"{word} replicated in {n}/{total} layers")
    whole: dict[str, int] = {}
    for s in per_layer:
        for name in s.kept_whole:
            whole[name] = whole.get(name, 0) + 1
    if whole:
        parts.append("kept whole: " + ", ".join(f"{name} ({n}/{total} layers)" for name, n in whole.items()))
    parts += [f"{role.replace('_', ' ')} replicated" for role in ("embedding", "lm_head") if role in spec.replicate]
    return "partial: " + "; ".join(parts) if parts else ""


def _shard_layers(model: nn.Module, spec: ArchSpec, ctx: _Context) -> None:
    layers_path, per_layer = layer_specs(model, spec)
    layers = model.get_submodule(layers_path)
    for i, (layer, lspec) in enumerate(zip(layers, per_layer)):
        path = f"{layers_path}.{i}"
        shard_attention = "attention" not in lspec.replicate + lspec.absent
        shard_mlp = "mlp" not in lspec.replicate + lspec.absent
        # Parallel attention + MLP: both row-parallel outputs go to one sink,
        # reduced once by the layer's hooks (only when both are sharded).
        sink = PartialSum(ctx.comm, path, members=2) if lspec.parallel_block and shard_attention and shard_mlp else None
        if shard_attention:
            attn_path = _join(path, lspec.attention)
            _shard_attention(_get(layer, lspec.attention, path), lspec, ctx, attn_path, sink)
        if shard_mlp:
            mlp = _get(layer, lspec.mlp, path)
            mlp_path = _join(path, lspec.mlp)
            if lspec.moe_experts and _has(mlp, lspec.moe_experts):
                if sink is not None:
                    raise ValueError(f"{mlp_path}: MoE blocks in parallel attention+MLP layers are not supported")
                _shard_moe(mlp, lspec, ctx, mlp_path)
            else:
                _shard_mlp(mlp, lspec, ctx, mlp_path, sink=sink)
        if sink is not None:
            layer.register_forward_pre_hook(sink.before_block)
            layer.register_forward_hook(sink.after_block)


def check_unsharded(model: nn.Module) -> None:
    """Raise ValueError if ``model`` was sharded already (sharding twice would split the slices)."""
    if getattr(model, "tp_engine_plan", None) is not None:
        raise ValueError("parallelize: this model is already sharded; pass the original model")


def shard_model(
    model: nn.Module,
    spec: ArchSpec,
    comm: Communicator,
    shares: Sequence[float] | None = None,
    rank: int | None = None,
    mlp_unit: int = 1,
) -> nn.Module:
    """Shard ``model`` in place by ``spec`` across ``comm``'s group; return it.

    ``mlp_unit``: MLP columns are cut on multiples of it (``plan_model``'s;
    a GGUF down projection's block size keeps its blocks whole).

    Only shards: the spec is resolved before (``tp_engine.api.resolve_spec``:
    declared, or inferred and parity-checked), and its ``specialize`` applies
    here. Every rank must pass the same model (same config and weights), spec
    and ``shares``; the ranks' plans are compared before any module is swapped.
    """
    check_unsharded(model)
    rank = comm.rank if rank is None else rank
    config = model.config
    spec = spec.for_config(config)
    dims = ModelDims.from_config(config)
    plan = plan_model(dims, comm.world_size, shares, mlp_unit)
    if comm.world_size > 1:
        _check_ranks_agree(plan, comm)
    ctx = _Context(plan, rank, comm)

    _shard_layers(model, spec, ctx)
    _shard_vocab(model, spec, plan, rank, comm)

    model.tp_engine_plan = plan
    model.tp_engine_rank = rank
    synchronize_rng(comm)
    return model
