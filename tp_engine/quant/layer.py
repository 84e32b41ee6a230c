"""A quantized layer: the :class:`QuantizedMethod` strategy, :class:`QuantizedLinear`, and :func:`layer_matmul`.

How a quantized layer looks (vLLM's ``quant_method`` idea, no class
swapping): every tp-engine layer with a weight matrix computes its matmul
through ``layer.quant_method`` (:class:`tp_engine.layers.MatmulMethod`;
float by default). :func:`tp_engine.quant.model.quantize` keeps the layer's
object and class (its communicator, shard ranges, hooks, bias and
collectives) and sets ``layer.quant_method = QuantizedMethod(qw)``; the
float ``weight`` parameter is removed from the layer and released, and
``layer.weight`` becomes a
:class:`WeightPlaceholder`: the old shape, device and ``tp_shard``, with the
codes' integer dtype and no data (code that reads weights sees "quantized
weights"; the runtime computes through ``quant_method``). Plain nn.Linear / Conv1D
are replaced by :class:`QuantizedLinear` (same ``quant_method`` /
``weight`` attributes), which is deliberately *not* an nn.Linear, so
``parallelize`` refuses a quantized model instead of slicing integer codes
(quantize after sharding, on every rank).

:func:`layer_matmul` (a layer's ``x @ W^T``, float or quantized, without
bias) and :func:`is_quantized` are what the runtime asks of any layer.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..layers import (
    FLOAT_CONV1D,
    FLOAT_LINEAR,
    ColumnParallelConv1D,
    ColumnParallelLinear,
    DeferredRowParallelLinear,
    MatmulMethod,
    ParallelLMHead,
    RowParallelConv1D,
    RowParallelLinear,
)
from .backends import QuantizedWeight

__all__ = ["QuantizedLinear", "QuantizedMethod", "WeightPlaceholder", "is_quantized", "layer_matmul"]


def _describe(qw: QuantizedWeight) -> str:
    group = f", group={qw.group_size}" if qw.bits == 4 else ""
    return f"int{qw.bits}{group}, {qw.backend}"


class QuantizedMethod(MatmulMethod):
    """The matmul strategy of a quantized layer: ``apply(layer, x)`` is ``weight(x)``.

    ``weight`` is the :class:`QuantizedWeight` (always (out, in), whatever the
    layer's float layout was). The layer is only passed through; its
    collectives and bias are the layer's business, as for the float methods.
    """

    def __init__(self, weight: QuantizedWeight):
        self.weight = weight

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.weight(x)
        return y if bias is None else y + bias

    def describe(self) -> str:
        return _describe(self.weight)

    def __repr__(self) -> str:
        return f"QuantizedMethod({self.weight!r})"


class WeightPlaceholder:
    """What ``layer.weight`` is after :func:`quantize`: the float weight's description, no data.

    ``shape`` as the float weight was stored (Conv1D layouts: (in, out)),
    ``device``, ``tp_shard`` (when the float parameter had one: which slice of
    the checkpoint tensor the codes quantize), ``bits``, ``group_size``, and
    ``dtype``: the codes' integer dtype (int8, or uint8 for int4), *not* a
    float, so code that checks a weight's dtype (loaders) sees
    a quantized layer. Not a tensor and not a parameter: anything that would
    compute with it fails, and ``state_dict()`` / ``model.to()`` skip it. The
    layer's matmul is ``layer.quant_method`` (:func:`layer_matmul`).
    """

    __slots__ = ("bits", "device", "dtype", "group_size", "shape", "tp_shard")

    def __init__(self, shape, qw: QuantizedWeight, tp_shard=None):
        self.shape = torch.Size(shape)
        self.dtype = qw.dtype
        self.device = qw.device
        self.bits = qw.bits
        self.group_size = qw.group_size
        self.tp_shard = tp_shard

    def __repr__(self) -> str:
        return f"WeightPlaceholder(int{self.bits}, shape={tuple(self.shape)}, device={self.device})"


class QuantizedLinear(nn.Module):
    """An unsharded ``nn.Linear`` (or HF ``Conv1D``) after :func:`quantize`: ``quant_method.apply(x) + bias``.

    Plain nn.Linear / Conv1D compute ``F.linear(x, self.weight, ...)`` in
    their own forward, so giving them a strategy would need class swapping or
    patching ``forward`` on the instance; replacing the module is the honest
    way. It is deliberately *not* an ``nn.Linear`` subclass, so code that
    would read ``.weight`` as a float tensor (e.g. ``parallelize``) refuses
    it instead. Same attributes as tp-engine's quantized layers:
    ``quant_method`` (a :class:`QuantizedMethod`), ``weight`` (a
    :class:`WeightPlaceholder`, (out, in) whatever the original layout),
    ``bias``, ``in_features``, ``out_features``.
    """

    def __init__(self, method: QuantizedMethod, bias: torch.Tensor | None):
        super().__init__()
        self.quant_method = method
        self.out_features, self.in_features = method.weight.shape
        self.weight = WeightPlaceholder(method.weight.shape, method.weight)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.quant_method.describe()}"


# tp-engine's own layers: their forward runs ``self.quant_method`` (exact
# types only: a subclass may have a forward of its own that reads .weight).
_PARALLEL_TYPES = (
    ColumnParallelLinear,
    RowParallelLinear,
    DeferredRowParallelLinear,
    ParallelLMHead,
    ColumnParallelConv1D,
    RowParallelConv1D,
)
_CONV1D_LAYOUT = (ColumnParallelConv1D, RowParallelConv1D)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for this module
        return None
    return Conv1D


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer``'s matmul is a quantized strategy (a quantized parallel layer or a QuantizedLinear)."""
    return isinstance(getattr(layer, "quant_method", None), QuantizedMethod)


def layer_matmul(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x @ W^T`` (no bias, no collective) of a linear-like layer, as its forward computes it.

    For tp-engine's parallel layers and :class:`QuantizedLinear`: their
    ``quant_method`` (float or quantized); for a plain ``nn.Linear`` or HF
    ``Conv1D``: the float matmul of its weight. The function reads the
    layer's current weight at each call. x is this rank's input as the
    layer's matmul sees it (row-parallel: the local slice); the result is
    this rank's part (column-parallel: the local outputs; row-parallel: the
    partial sum before the all-reduce).
    """
    method = getattr(layer, "quant_method", None)
    if method is None:
        conv1d = _conv1d_type()
        if type(layer) is nn.Linear:
            method = FLOAT_LINEAR
        elif conv1d is not None and type(layer) is conv1d:
            method = FLOAT_CONV1D
        else:
            raise TypeError(
                f"layer_matmul: {type(layer).__name__} is not nn.Linear, HF Conv1D, or a tp-engine parallel layer"
            )
    elif not isinstance(method, MatmulMethod):
        raise TypeError(f"layer_matmul: {type(layer).__name__}.quant_method is {type(method).__name__}, not a MatmulMethod")

    def matmul(x: torch.Tensor) -> torch.Tensor:
        return method.apply(layer, x)

    return matmul

