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
