"""GGUF weights kept in the file's quantization blocks: the weight, its matmul strategy, and the embedding.

A GGUF matrix lies in the file row by row, each row ``in // QK`` ggml blocks
of ``QB`` bytes (:func:`tp_engine.kernels.gguf_gemm.block_shape`). A rank
holds its rows of that layout as they are (column-parallel layers and
vocabulary shards: a range of rows; row-parallel layers: a band of whole
blocks of every row), so its weight is a uint8 (rows, row_bytes) tensor,
and ``x @ W^T`` runs :func:`~tp_engine.kernels.gguf_gemm.gguf_matmul` on it.

* :class:`GGUFWeight`: those blocks, the ggml type and the (out, in) shape;
  callable as ``x @ W^T`` like :class:`~tp_engine.quant.backends.QuantizedWeight`.
* :class:`GGUFMethod`: the layer strategy (a :class:`~tp_engine.quant.layer.QuantizedMethod`,
  so everything that asks ``is_quantized`` treats the layer as quantized).
* :class:`GGUFPlaceholder`: what ``layer.weight`` becomes (shape, ``tp_shard``,
  uint8 dtype, no data), as :class:`~tp_engine.quant.layer.WeightPlaceholder` does for int8/int4.
* :class:`GGUFEmbedding`: a (vocabulary-sharded) embedding whose lookup
  dequantizes only the rows it reads, instead of holding a float table.
* :func:`install` puts a :class:`GGUFWeight` into a layer; :func:`gguf_weight_of`
  reads it back (the runtime fuses same-type weights with :func:`fuse_gguf_rows`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..kernels import gguf_gemm
from ..layers import (
    ColumnParallelLinear,
    DeferredRowParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    ShardSpec,
    reduce_from_parallel,
)
from .layer import QuantizedMethod

__all__ = [
    "GGUFEmbedding",
    "GGUFMethod",
    "GGUFPlaceholder",
    "GGUFWeight",
    "LINEAR_TYPES",
    "fuse_gguf_rows",
    "gguf_weight_of",
    "install",
    "qtype_name",
]

# Layers whose forward computes through ``quant_method`` with an (out, in) weight
# (exact types: the Conv1D subclasses store (in, out) and stay float).
LINEAR_TYPES = (ColumnParallelLinear, RowParallelLinear, DeferredRowParallelLinear, ParallelLMHead)

_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


def qtype_name(qtype: int) -> str:
    """``"Q4_K"`` for 12, ... (the ggml name; the number for types without one here)."""
    return _NAMES.get(int(qtype), f"type {int(qtype)}")


class GGUFWeight:
    """A (out, in) matrix held as ggml blocks: ``blocks`` uint8 (out, in // QK * QB).

    ``self(x)`` is ``x @ W^T`` for x (..., in): float32 through the GGUF
    kernels (other float dtypes are computed in float32 and cast back).
    """

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int):
        if blocks.dtype != torch.uint8 or blocks.dim() != 2:
            raise ValueError(f"GGUF blocks must be a 2-D uint8 tensor, got {blocks.dtype} {tuple(blocks.shape)}")
        qk, qb = gguf_gemm.block_shape(int(qtype))
        if in_features % qk or blocks.shape[1] != in_features // qk * qb:
            raise ValueError(
                f"{qtype_name(qtype)} rows of {in_features} inputs take {in_features // qk * qb} bytes "
                f"(blocks of {qk}), got {blocks.shape[1]}"
            )
        self.blocks = blocks if blocks.is_contiguous() else blocks.contiguous()
        self.qtype = int(qtype)
        self.in_features = int(in_features)

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def block_elements(self) -> int:
        return gguf_gemm.block_shape(self.qtype)[0]

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.float().contiguous()
        if flat.shape[0] == 0 or self.out_features == 0:  # the kernels take no empty operands
            y = flat.new_zeros(flat.shape[0], self.out_features)
        else:
            y = gguf_gemm.gguf_matmul(flat, self.blocks, self.qtype, self.in_features)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 (len(index), in): the dequantized rows ``index`` (a 1-D long tensor)."""
        if index.numel() == 0:
            return torch.zeros(0, self.in_features, device=self.device)
        return gguf_gemm.dequantize_rows(self.blocks.index_select(0, index), self.qtype, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The whole matrix as float32 (out, in)."""
        return gguf_gemm.dequantize_rows(self.blocks, self.qtype, self.in_features)

    def to(self, device: torch.device | str) -> GGUFWeight:
        return GGUFWeight(self.blocks.to(device), self.qtype, self.in_features)

    def __repr__(self) -> str:
        return f"GGUFWeight({qtype_name(self.qtype)}, shape={tuple(self.shape)}, {self.nbytes} bytes, device={self.device})"


class GGUFMethod(QuantizedMethod):
    """A layer's ``x @ W^T`` on its GGUF blocks: ``apply(layer, x, bias)`` is ``weight(x) (+ bias)``."""

    def __init__(self, weight: GGUFWeight):
        super().__init__(weight)  # type: ignore[arg-type]  # a GGUFWeight is a callable weight like QuantizedWeight

    def describe(self) -> str:
        return f"gguf {qtype_name(self.weight.qtype)}, {gguf_gemm.kernel_name(self.weight.device, self.weight.qtype)}"

    def __repr__(self) -> str:
        return f"GGUFMethod({self.weight!r})"


class GGUFPlaceholder:
    """``layer.weight`` of a layer computing on GGUF blocks: the float weight's description, no data.

    ``shape`` (out, in) as this rank holds it, ``device``, ``tp_shard`` (which
    slice of the checkpoint tensor the blocks are), ``qtype`` and ``dtype``
    uint8 (the storage), so code that checks a weight's dtype sees a quantized
    layer. Not a tensor and not a parameter: ``state_dict()`` and
    ``model.to()`` skip it, and anything computing with it fails.
    """

    __slots__ = ("device", "dtype", "qtype", "shape", "tp_shard")

    def __init__(self, weight: GGUFWeight, tp_shard: ShardSpec | None = None):
        self.shape = weight.shape
        self.device = weight.device
        self.dtype = torch.uint8
        self.qtype = weight.qtype
        self.tp_shard = tp_shard

    def __repr__(self) -> str:
        return f"GGUFPlaceholder({qtype_name(self.qtype)}, shape={tuple(self.shape)}, device={self.device})"


class GGUFEmbedding(nn.Module):
    """A token embedding held as GGUF blocks: rows [start, stop) of the vocabulary on this rank.

    The lookup dequantizes only the rows it reads. Sharded (``comm`` with
    more than one rank): ids outside the shard give zeros and the ranks'
    lookups are summed, as :class:`~tp_engine.layers.VocabParallelEmbedding` does.
    Output float32, times ``embed_scale`` where the model scales embeddings.
    """

    def __init__(self, like: nn.Module, weight: GGUFWeight, placeholder: GGUFPlaceholder | None = None):
        super().__init__()
        self.comm = getattr(like, "comm", None)
        self.start = int(getattr(like, "start", 0))
        self.stop = self.start + weight.out_features
        self.num_embeddings = weight.out_features
        self.embedding_dim = weight.in_features
        self.padding_idx = getattr(like, "padding_idx", None)
        scale = getattr(like, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            self.register_buffer("embed_scale", scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = None
        self.gguf = weight
        # A tied LM head gets the same placeholder, so ``head.weight is embedding.weight`` still says "tied".
        self.weight = placeholder or GGUFPlaceholder(weight, getattr(getattr(like, "weight", None), "tp_shard", None))

    @property
    def sharded(self) -> bool:
        return self.comm is not None and self.comm.world_size > 1

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 (*ids.shape, dim): this shard's rows for ``ids`` (zeros outside it), not summed."""
        flat = ids.reshape(-1)
        if not self.sharded:
            return self.gguf.rows(flat).view(*ids.shape, self.embedding_dim)
        outside = (flat < self.start) | (flat >= self.stop)
        local = (flat - self.start).masked_fill_(outside, 0)
        rows = self.gguf.rows(local).masked_fill_(outside.unsqueeze(-1), 0.0)
        return rows.view(*ids.shape, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.lookup(input_ids)
        if self.sharded:
            out = reduce_from_parallel(out, self.comm)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"vocab=[{self.start}, {self.stop}), dim={self.embedding_dim}, gguf {qtype_name(self.gguf.qtype)}"


def install(
    module: nn.Module, weight: GGUFWeight, tp_shard: ShardSpec | None = None, placeholder: GGUFPlaceholder | None = None
) -> None:
    """Make ``module`` (one of :data:`LINEAR_TYPES`) compute ``x @ W^T`` on ``weight``'s blocks.

    Its float ``weight`` parameter (meta or real) is dropped; ``layer.weight``
    becomes ``placeholder`` (default: a new :class:`GGUFPlaceholder`; tied
    layers pass one shared placeholder). The module keeps its class, bias,
    communicator and collectives. Embeddings are replaced instead
    (:class:`GGUFEmbedding`), by their owner.
    """
    if type(module) not in LINEAR_TYPES:
        raise TypeError(f"GGUF blocks go into tp-engine's parallel linear layers, not {type(module).__name__}")
    local = tuple(module.weight.shape)
    if local != tuple(weight.shape):
        raise ValueError(f"GGUF weight of shape {tuple(weight.shape)} does not fit a layer weight of {local}")
    module._parameters.pop("weight", None)
    module.weight = placeholder or GGUFPlaceholder(weight, tp_shard)
    module.quant_method = GGUFMethod(weight)


def gguf_weight_of(module: nn.Module) -> GGUFWeight | None:
    """The GGUF weight a layer or embedding computes with, or None."""
    if isinstance(module, GGUFEmbedding):
        return module.gguf
    method = getattr(module, "quant_method", None)
    return method.weight if isinstance(method, GGUFMethod) else None


def fuse_gguf_rows(weights: Sequence[GGUFWeight], in_place: bool = True) -> GGUFWeight:
    """One weight whose rows are ``weights``' rows in order (same ggml type and input width).

    With ``in_place`` the inputs are re-pointed at row views of the fused
    blocks, so no memory is duplicated; weights that already are consecutive
    views of one storage (a second decoder on the same model) are fused
    without a copy.
    """
    first = weights[0]
    if any(w.qtype != first.qtype or w.in_features != first.in_features for w in weights):
        raise ValueError("only GGUF weights of one ggml type and input width can be fused: "
                         + ", ".join(f"{qtype_name(w.qtype)} x {w.in_features}" for w in weights))
    rows = sum(w.out_features for w in weights)
    storage = first.blocks.untyped_storage().data_ptr()
    offset = first.blocks.storage_offset()
    adjacent = True
    for w in weights:
        if w.blocks.untyped_storage().data_ptr() != storage or w.blocks.storage_offset() != offset:
            adjacent = False
            break
        offset += w.blocks.numel()
    if adjacent:
        return GGUFWeight(first.blocks.as_strided((rows, first.blocks.shape[1]), (first.blocks.shape[1], 1)),
                          first.qtype, first.in_features)
    fused = torch.cat([w.blocks for w in weights], dim=0)
    if not in_place:
        return GGUFWeight(fused, first.qtype, first.in_features)
    start = 0
    for w in weights:
        w.blocks = fused[start : start + w.out_features]
        start += w.out_features
    return GGUFWeight(fused, first.qtype, first.in_features)
