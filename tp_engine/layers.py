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

Beyond the Linear layers: Conv1D-layout versions (GPT-2 stores weights as
(in, out); the shards keep that storage), and deferred reduction, where
several partial sums share one all-reduce: ``PartialSum`` with
``DeferredRowParallelLinear`` for blocks that add attention and MLP to the
same residual (GPT-J), ``ReduceOutput`` for a module whose whole output is a
partial sum (an MoE block); ``CopyInputs`` / ``CopyOutput`` put Megatron's f
where sharded weights are used without a ColumnParallel layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


# ------------------------------------------------------------ layers


class ColumnParallelLinear(nn.Module):
    """``y_local = x @ W[rows].T + b[rows]``: each rank computes some outputs."""

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
        spec = ShardSpec(0, tuple((int(a), int(b)) for a, b in out_ranges))
        self.in_features = in_features
        self.out_features = spec.length()
        self.weight = _new_param((self.out_features, in_features), None, dtype, device, spec)
        self.bias = _new_param((self.out_features,), None, dtype, device, spec) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_parallel(x, self.comm), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out_local={self.out_features}, rows={self.weight.tp_shard.ranges}"


class RowParallelLinear(nn.Module):
    """``y = sum_ranks x_local @ W[:, cols].T``, then the (replicated) bias."""

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
        spec = ShardSpec(1, tuple((int(a), int(b)) for a, b in in_ranges))
        self.in_features = spec.length()
        self.out_features = out_features
        self.weight = _new_param((out_features, self.in_features), None, dtype, device, spec)
        self.bias = _new_param((out_features,), None, dtype, device, ShardSpec()) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(F.linear(x, self.weight), self.comm)
        # Bias after the sum, so it is added once, not world_size times.
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_local={self.in_features}, out={self.out_features}, cols={self.weight.tp_shard.ranges}"


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
        local = F.linear(copy_to_parallel(x, self.comm), self.weight, self.bias)
        if not self.gather:
            return local
        return gather_from_parallel(local, self.comm, self.vocab_sizes)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, vocab=[{self.start}, {self.stop}) of {sum(self.vocab_sizes)}"


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


class ColumnParallelConv1D(nn.Module):
    """``y_local = x @ W[:, cols] + b[cols]`` for a (in, out)-stored weight."""

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
        self.out_features = ShardSpec(1, ranges).length()
        self.weight = _new_param((in_features, self.out_features), None, dtype, device, ShardSpec(1, ranges))
        self.bias = _new_param((self.out_features,), None, dtype, device, ShardSpec(0, ranges)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_parallel(x, self.comm)
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ self.weight if self.bias is None else torch.addmm(self.bias, flat, self.weight)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out_local={self.out_features}, cols={self.weight.tp_shard.ranges}"


class RowParallelConv1D(nn.Module):
    """``y = sum_ranks x_local @ W[rows, :]``, then the (replicated) bias."""

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
        spec = ShardSpec(0, tuple((int(a), int(b)) for a, b in in_ranges))
        self.in_features = spec.length()
        self.out_features = out_features
        self.weight = _new_param((self.in_features, out_features), None, dtype, device, spec)
        self.bias = _new_param((out_features,), None, dtype, device, ShardSpec()) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.reshape(-1, x.shape[-1]) @ self.weight).view(*x.shape[:-1], self.out_features)
        y = reduce_from_parallel(y, self.comm)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_local={self.in_features}, out={self.out_features}, rows={self.weight.tp_shard.ranges}"


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
            return F.linear(x, self.weight)
        if self.training:
            return super().forward(x)
        return self.sink.add(F.linear(x, self.weight), self.bias)

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
