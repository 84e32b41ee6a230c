"""Tensor-parallel layers and the conjugate collectives under them.

The math (Megatron's f and g): a column-parallel layer needs its input on
every rank and produces a slice of the output; a row-parallel layer takes a
slice of the input and sums partial outputs across ranks. In autograd terms

* ``copy_to_parallel``: forward identity, backward all-reduce (f);
* ``reduce_from_parallel``: forward all-reduce, backward identity (g);
* ``gather_from_parallel``: forward all-gather, backward keep own slice.

Without autograd (inference) the ops call the communicator directly, so a
decode step pays for the collective and nothing else.

Every parallel parameter records which slices of the full checkpoint tensor
it holds (``ShardSpec``), so loaders need no per-model code.

Every layer here with a weight matrix computes its ``x @ W^T`` through a
strategy, ``layer.quant_method`` (vLLM's idea): :data:`FLOAT_LINEAR` /
:data:`FLOAT_CONV1D` by default, a quantized one after
:func:`tp_engine.quantize.quantize`. The strategy does only the matmul; the
collectives and the bias stay the layer's, so a quantized layer keeps its
class, its communicator and its shard metadata.

Beyond the Linear layers: Conv1D-layout versions (GPT-2 stores weights as
(in, out); the shards keep that storage), and deferred reduction, where
several partial sums share one all-reduce: ``PartialSum`` with
``DeferredRowParallelLinear`` for blocks that add attention and MLP to the
same residual (GPT-J), ``ReduceOutput`` for a module whose whole output is a
partial sum (an MoE block); ``CopyInputs`` / ``CopyOutput`` put Megatron's f
where sharded weights are used without a ColumnParallel layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .comm.base import Communicator

# ------------------------------------------------------------ autograd ops


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_reduce_(grad.contiguous().clone()), None


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        return comm.all_reduce_(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.offset = sum(sizes[: comm.rank])
        ctx.size = sizes[comm.rank]
        return comm.all_gather(x.contiguous(), dim=-1, sizes=sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(-1, ctx.offset, ctx.size).contiguous(), None, None


def _tracking(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def copy_to_parallel(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    if comm.world_size == 1 or not torch.is_grad_enabled():
        return x
    return _CopyToParallel.apply(x, comm)


def reduce_from_parallel(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    if comm.world_size == 1:
        return x
    if _tracking(x):
        return _ReduceFromParallel.apply(x, comm)
    # x is a fresh activation nobody else holds: reduce in place.
    return comm.all_reduce_(x if x.is_contiguous() else x.contiguous())


def gather_from_parallel(x: torch.Tensor, comm: Communicator, sizes: Sequence[int]) -> torch.Tensor:
    if comm.world_size == 1:
        return x
    if _tracking(x):
        return _GatherFromParallel.apply(x, comm, tuple(sizes))
    return comm.all_gather(x.contiguous(), dim=-1, sizes=sizes)


# ------------------------------------------------------------ shard specs


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a full tensor a parameter holds.

    ``ranges`` are (start, stop) pieces along ``dim``, concatenated in order;
    an empty ``ranges`` means the whole tensor (replicated).
    """

    dim: int = 0
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def replicated(self) -> bool:
        return not self.ranges

    def length(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of ``full`` (a view when there is one piece)."""
        if self.replicated:
            return full
        pieces = [full.narrow(self.dim, a, b - a) for a, b in self.ranges]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)


def _attach(param: nn.Parameter | torch.Tensor, spec: ShardSpec):
    param.tp_shard = spec  # read by loaders and by gradient checks
    return param


def _new_param(shape, like: torch.Tensor | None, dtype, device, spec: ShardSpec) -> nn.Parameter:
    dtype = dtype if dtype is not None else (like.dtype if like is not None else torch.get_default_dtype())
    device = device if device is not None else (like.device if like is not None else None)
    return _attach(nn.Parameter(torch.empty(shape, dtype=dtype, device=device)), spec)


# ------------------------------------------------------------ matmul strategies


class MatmulMethod:
    """How a layer computes ``x @ W^T``: ``apply(layer, x, bias=None)``.

    ``apply(layer, x)`` is ``x @ W^T`` for x (..., in_features), without bias.
    A layer may pass its ``bias`` to have it added in the same call (the
    float strategies then use one fused addmm, as F.linear does); which bias,
    and whether before or after a collective, is the layer's decision. The
    strategy holds whatever the matmul needs beyond the layer (a quantized
    weight); the float ones read ``layer.weight``.
    """

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """A short note for the layer's repr ("" for float)."""
        return ""


class FloatLinearMethod(MatmulMethod):
    """``F.linear(x, layer.weight, bias)``: the float (out, in) weight, nn.Linear's layout."""

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)

    def __repr__(self) -> str:
        return "FLOAT_LINEAR"


class FloatConv1DMethod(MatmulMethod):
    """``x @ layer.weight (+ bias)`` for a float (in, out) weight, GPT-2 Conv1D's layout."""

    def apply(self, layer, x, bias=None):
        w = layer.weight
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ w if bias is None else torch.addmm(bias, flat, w)
        return y.view(*x.shape[:-1], w.shape[1])

    def __repr__(self) -> str:
        return "FLOAT_CONV1D"


FLOAT_LINEAR = FloatLinearMethod()
FLOAT_CONV1D = FloatConv1DMethod()


def _with_method(text: str, layer: nn.Module) -> str:
    note = layer.quant_method.describe()
    return f"{text}, {note}" if note else text


# ------------------------------------------------------------ layers


class ColumnParallelLinear(nn.Module):
    """``y_local = x @ W[rows].T + b[rows]``: each rank computes some outputs."""

    quant_method: MatmulMethod = FLOAT_LINEAR  # quantize() sets a quantized one per instance
    # Whether the weight is stored (in, out), as HF's Conv1D does (the Conv1D subclasses below).
    stores_in_out = False

    def __init__(
        self,
        in_features: int,
        out_ranges: Sequence[tuple[int, int]],
        comm: Communicator,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.comm = comm
        ranges = tuple((int(a), int(b)) for a, b in out_ranges)
        self.in_features = in_features
        self.out_features = ShardSpec(0, ranges).length()
        out_dim = 1 if self.stores_in_out else 0
        shape = (in_features, self.out_features) if self.stores_in_out else (self.out_features, in_features)
        self.weight = _new_param(shape, None, dtype, device, ShardSpec(out_dim, ranges))
        self.bias = _new_param((self.out_features,), None, dtype, device, ShardSpec(0, ranges)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, copy_to_parallel(x, self.comm), self.bias)

    def extra_repr(self) -> str:
        what = "cols" if self.stores_in_out else "rows"
        return _with_method(
            f"in={self.in_features}, out_local={self.out_features}, {what}={self.weight.tp_shard.ranges}", self
        )


class RowParallelLinear(nn.Module):
    """``y = sum_ranks x_local @ W[:, cols].T``, then the (replicated) bias."""

    quant_method: MatmulMethod = FLOAT_LINEAR
    stores_in_out = False  # as ColumnParallelLinear

    def __init__(
        self,
        in_ranges: Sequence[tuple[int, int]],
        out_features: int,
        comm: Communicator,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.comm = comm
        spec = ShardSpec(0 if self.stores_in_out else 1, tuple((int(a), int(b)) for a, b in in_ranges))
        self.in_features = spec.length()
        self.out_features = out_features
        shape = (self.in_features, out_features) if self.stores_in_out else (out_features, self.in_features)
        self.weight = _new_param(shape, None, dtype, device, spec)
        self.bias = _new_param((out_features,), None, dtype, device, ShardSpec()) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(self.quant_method.apply(self, x), self.comm)
        # Bias after the sum, so it is added once, not world_size times.
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        what = "rows" if self.stores_in_out else "cols"
        return _with_method(
            f"in_local={self.in_features}, out={self.out_features}, {what}={self.weight.tp_shard.ranges}", self
        )


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [start, stop) of the table; lookups are summed.

    ``scale`` reproduces scaled embeddings (Gemma multiplies by sqrt(hidden)).
    """

    def __init__(
        self,
        vocab_range: tuple[int, int],
        embedding_dim: int,
        comm: Communicator,
        scale: float | None = None,
        padding_idx: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.comm = comm
        self.start, self.stop = int(vocab_range[0]), int(vocab_range[1])
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.num_embeddings = self.stop - self.start
        self.weight = _new_param(
            (self.num_embeddings, embedding_dim), None, dtype, device, ShardSpec(0, ((self.start, self.stop),))
        )
        if scale is not None:
            self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)
        else:
            self.embed_scale = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.comm.world_size == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            outside = (input_ids < self.start) | (input_ids >= self.stop)
            local = (input_ids - self.start).masked_fill_(outside, 0)
            out = F.embedding(local, self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
            out = reduce_from_parallel(out, self.comm)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.weight.dtype)
        return out

    def extra_repr(self) -> str:
        return f"vocab=[{self.start}, {self.stop}), dim={self.embedding_dim}"


class ParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice, gathered into full logits.

    ``gather=False`` returns only the local slice (for samplers that work on
    vocab shards).
    """

    quant_method: MatmulMethod = FLOAT_LINEAR

    def __init__(
        self,
        in_features: int,
        vocab_ranges: Sequence[tuple[int, int]],
        rank: int,
        comm: Communicator,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.comm = comm
        self.vocab_sizes = tuple(int(b) - int(a) for a, b in vocab_ranges)
        self.start, self.stop = (int(x) for x in vocab_ranges[rank])
        self.in_features = in_features
        self.out_features = self.stop - self.start
        self.gather = True
        spec = ShardSpec(0, ((self.start, self.stop),))
        self.weight = _new_param((self.out_features, in_features), None, dtype, device, spec)
        self.bias = _new_param((self.out_features,), None, dtype, device, spec) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.quant_method.apply(self, copy_to_parallel(x, self.comm), self.bias)
        if not self.gather:
            return local
        return gather_from_parallel(local, self.comm, self.vocab_sizes)

    def extra_repr(self) -> str:
        return _with_method(f"in={self.in_features}, vocab=[{self.start}, {self.stop}) of {sum(self.vocab_sizes)}", self)


@torch.no_grad()
def copy_shard_(param: torch.Tensor, full: torch.Tensor, name: str = "parameter") -> None:
    """Fill ``param`` with its shard of the full tensor ``full``."""
    spec: ShardSpec = getattr(param, "tp_shard", ShardSpec())
    shard = spec.take(full)
    if shard.shape != param.shape:
        raise ValueError(f"{name}: shard of shape {tuple(shard.shape)} does not fit {tuple(param.shape)}")
    param.copy_(shard)


# ------------------------------------------------------------ Conv1D layouts
#
# GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear.
# The parallel versions keep that storage, so a parameter's ``tp_shard`` is
# the slice of the checkpoint tensor as stored: output columns (dim 1) for
# the column-parallel layer, input rows (dim 0) for the row-parallel one.


class ColumnParallelConv1D(ColumnParallelLinear):
    """``y_local = x @ W[:, cols] + b[cols]`` for a (in, out)-stored weight."""

    quant_method: MatmulMethod = FLOAT_CONV1D
    stores_in_out = True


class RowParallelConv1D(RowParallelLinear):
    """``y = sum_ranks x_local @ W[rows, :]``, then the (replicated) bias."""

    quant_method: MatmulMethod = FLOAT_CONV1D
    stores_in_out = True


# ------------------------------------------------------------ deferred reduction


class PartialSum:
    """Row-parallel partial outputs that one block adds together, all-reduced once.

    A block whose attention and MLP both read the layer input and are both
    added to the residual (GPT-J) would pay two all-reduces, one per
    row-parallel output. Their members instead hand their partial sums (and
    biases) here and return zeros; the block then computes ``0 + 0 +
    residual`` exactly, and a hook on the block adds ``all_reduce(partial_attn
    + partial_mlp) + biases`` to that: one collective per layer, same sum.
    ``parallelize`` installs the hooks (``start`` before the block, ``finish``
    after it).
    """

    def __init__(self, comm: Communicator, owner: str, members: int):
        self.comm = comm
        self.owner = owner
        self.members = members
        self._reset()

    def _reset(self) -> None:
        self._total: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._count = 0

    def add(self, partial: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Keep ``partial`` (and ``bias``, added once after the reduce); return zeros of its shape."""
        self._total = partial if self._total is None else self._total + partial
        if bias is not None:
            self._bias = bias if self._bias is None else self._bias + bias
        self._count += 1
        return torch.zeros_like(partial)

    def start(self) -> None:
        if self._count:
            self._reset()
            raise RuntimeError(f"{self.owner}: deferred partial sums left over from an unfinished forward")

    # Forward hooks for the block (``register_forward_pre_hook(sink.before_block)``,
    # ``register_forward_hook(sink.after_block)``).
    def before_block(self, module: nn.Module, args: tuple) -> None:
        self.start()

    def after_block(self, module: nn.Module, args: tuple, output):
        total = self.finish()
        return None if total is None else map_first_output(output, lambda h: h + total)

    def finish(self) -> torch.Tensor | None:
        """The reduced sum of every member's output (None if no member deferred)."""
        if self._count == 0:
            return None
        count, total, bias = self._count, self._total, self._bias
        self._reset()
        if count != self.members:
            raise RuntimeError(
                f"{self.owner}: expected {self.members} deferred row-parallel outputs in one forward, got {count}"
            )
        total = reduce_from_parallel(total, self.comm)
        return total if bias is None else total + bias


class DeferredRowParallelLinear(RowParallelLinear):
    """A row-parallel linear whose all-reduce is done once for several outputs.

    ``sink=None``: returns the bare partial sum ``x_local @ W_local.T``; the
    enclosing module (an MoE block) all-reduces its own output, which is a
    sum of such partials. A bias is refused there: it would be counted once
    per rank.

    ``sink`` a :class:`PartialSum`: in eval mode the partial and the bias go
    to the sink and the layer returns zeros. In training mode it reduces at
    once like :class:`RowParallelLinear`, so dropout on the branch output
    sees the full sum, as in the unsharded model.
    """

    def __init__(
        self,
        in_ranges: Sequence[tuple[int, int]],
        out_features: int,
        comm: Communicator,
        sink: PartialSum | None = None,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        if sink is None and bias:
            raise ValueError("DeferredRowParallelLinear without a sink cannot have a bias (it would be added per rank)")
        super().__init__(in_ranges, out_features, comm, bias=bias, dtype=dtype, device=device)
        self.sink = sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sink is None:
            return self.quant_method.apply(self, x)
        if self.training:
            return super().forward(x)
        return self.sink.add(self.quant_method.apply(self, x), self.bias)

    def extra_repr(self) -> str:
        target = "enclosing module" if self.sink is None else self.sink.owner
        return f"{super().extra_repr()}, reduced by {target}"


def shard_parameter(param: nn.Parameter, spec: ShardSpec) -> nn.Parameter:
    """A new parameter holding ``spec``'s slice of ``param`` (stays on meta if ``param`` is)."""
    if spec.replicated:
        raise ValueError("shard_parameter: spec is replicated; keep the parameter as it is")
    shape = list(param.shape)
    shape[spec.dim] = spec.length()
    if param.device.type == "meta":
        data = torch.empty(shape, dtype=param.dtype, device="meta")
    else:
        data = spec.take(param.detach()).clone()
    return _attach(nn.Parameter(data, requires_grad=param.requires_grad), spec)


def map_first_output(output, fn):
    """Apply ``fn`` to a module's output tensor, or to the first item of a tuple output."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]),) + output[1:]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(output).__name__}")


class ReduceOutput:
    """Forward hook: all-reduce a module's output, which is a sum of partial sums.

    An MoE block adds every expert's (and the shared expert's) row-parallel
    partial output locally; this reduces the total once per block instead
    of once per expert.
    """

    def __init__(self, comm: Communicator):
        self.comm = comm

    def __call__(self, module: nn.Module, args: tuple, output):
        return map_first_output(output, lambda y: reduce_from_parallel(y, self.comm))


class CopyInputs:
    """Forward pre-hook: Megatron's f on a module's floating-point inputs.

    Identity forward; in backward the input gradients, partial on each rank
    (each computed from this rank's slice of the weights), are summed. For
    modules that consume sharded weights directly (fused MoE experts) rather
    than through a ColumnParallel layer, which does this itself.
    """

    def __init__(self, comm: Communicator):
        self.comm = comm

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        def f(x):
            return copy_to_parallel(x, self.comm) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        return tuple(f(a) for a in args), {k: f(v) for k, v in kwargs.items()}


class CopyOutput:
    """Forward hook: Megatron's f on a replicated module's output.

    For a replicated module whose output multiplies a partial sum (Qwen2-MoE's
    shared-expert gate): each rank's gradient of that output is partial, so
    it is summed across ranks before flowing back into replicated weights.
    """

    def __init__(self, comm: Communicator):
        self.comm = comm

    def __call__(self, module: nn.Module, args: tuple, output):
        return map_first_output(output, lambda y: copy_to_parallel(y, self.comm))


# ------------------------------------------------------------ norms over sharded heads


class _SumAcrossRanks(torch.autograd.Function):
    """Forward all-reduce, backward all-reduce.

    Unlike Megatron's g, every rank uses the sum differently (each scales
    its own heads by it), so the gradient reaching the sum is partial on
    each rank and must be summed too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        ctx.comm = comm
        return comm.all_reduce_(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_reduce_(grad.contiguous().clone()), None


def sum_across_ranks(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """The sum of ``x`` over ranks, for a value each rank then uses in its own way."""
    if comm.world_size == 1:
        return x
    if _tracking(x):
        return _SumAcrossRanks.apply(x, comm)
    return comm.all_reduce_(x if x.is_contiguous() else x.contiguous())


class HeadShardedRMSNorm(nn.Module):
    """An RMS norm over a whole q or k projection (all heads), held as the rows of this rank's heads.

    Olmo 2 normalizes ``q_proj(x)`` over all ``num_heads x head_dim`` features
    before splitting heads (and ``k_proj(x)`` over all KV heads). A rank with
    some heads' rows sums their squares per token, all-reduces those sums (one
    float32 value per token) and normalizes by the global mean, times its own
    slice of the weight: attention stays split by heads.

    ``rows``: this rank's (start, stop) pieces of the full ``width`` features
    (the weight's ``tp_shard``). ``counted``: the local row ranges that enter
    the sum (default: all). A KV head held by several ranks (KV replication)
    must count once: the planner counts it on the lowest rank holding it.
    ``cast_first``: Llama's cast order, ``w * normed.to(dtype)``; the default
    is Olmo 2's, ``(w * normed).to(dtype)`` with the product in float32.
    """

    def __init__(
        self,
        width: int,
        rows: Sequence[tuple[int, int]],
        comm: Communicator,
        eps: float,
        counted: Sequence[tuple[int, int]] | None = None,
        cast_first: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.comm = comm
        spec = ShardSpec(0, tuple((int(a), int(b)) for a, b in rows))
        self.width = int(width)
        self.local = spec.length()
        self.counted = ((0, self.local),) if counted is None else tuple((int(a), int(b)) for a, b in counted if b > a)
        if any(a < 0 or b > self.local for a, b in self.counted):
            raise ValueError(f"HeadShardedRMSNorm: counted rows {self.counted} outside the {self.local} local rows")
        self.variance_epsilon = float(eps)
        self.cast_first = cast_first
        self.weight = _new_param((self.local,), None, dtype, device, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.to(torch.float32)
        sq = xf.pow(2)
        if self.counted == ((0, self.local),):
            total = sq.sum(-1, keepdim=True)
        else:
            # A mask, not slices: the sum stays in the autograd graph even on a rank
            # counting nothing, so every rank's backward joins the all-reduce.
            keep = torch.zeros(self.local, dtype=sq.dtype, device=sq.device)
            for a, b in self.counted:
                keep[a:b] = 1.0
            total = (sq * keep).sum(-1, keepdim=True)
        variance = sum_across_ranks(total, self.comm) / self.width
        xf = xf * torch.rsqrt(variance + self.variance_epsilon)
        if self.cast_first:
            return self.weight * xf.to(dtype)
        return (self.weight * xf).to(dtype)

    def extra_repr(self) -> str:
        counted = "" if self.counted == ((0, self.local),) else f", counted={self.counted}"
        return f"width={self.width}, rows={self.weight.tp_shard.ranges}{counted}, eps={self.variance_epsilon}"
