"""How a linear layer's ``x @ W^T`` runs in the runtime: one strategy per weight.

* float32 weights on an AVX2 CPU: tp-engine's skinny kernel
  (``kernels/cpu_gemm.c``) for up to 16 rows: it reads each weight row once
  for all rows, and its results are bit-identical whatever the number of
  rows (so batched and speculative steps give exactly the numbers of
  stepping one sequence alone). More rows, other dtypes or devices: F.linear.
* quantized layers (``tp_engine.quant.layer``), GGUF blocks included
  (``tp_engine.quant.gguf``): the layer's own strategy.
* ``weight_bits`` (a draft's quantized copy): ``quantize_weight`` on the
  float weight, with the one int4 group-size rule of ``tp_engine.quant.weights``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_gemm
from ..quant.gguf import gguf_weight_of
from ..quant.layer import is_quantized, layer_matmul
from ..quant.weights import int4_group_size, quantize_weight

Matmul = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["Matmul", "float_matmul", "weight_matmul", "fuse_rows", "linear_weight", "module_bias", "module_matmul"]


def _gemm():
    return cpu_gemm if cpu_gemm.available() else None


def float_matmul(w: torch.Tensor, b: torch.Tensor | None = None) -> Matmul:
    """``x -> x @ w.T + b`` for a float weight (AVX2 kernel where it applies, else F.linear)."""
    gemm = _gemm() if (w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()) else None
    if gemm is None:
        return lambda x: F.linear(x, w, b)
    bias = None if b is None else b.float().contiguous()

    def matmul(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= 16 and x.dtype == torch.float32 and x.is_contiguous():
            return gemm.linear_f32(x, w, bias)
        return F.linear(x, w, b)

    return matmul


def weight_matmul(
    w: torch.Tensor, b: torch.Tensor | None = None, bits: int | None = None, group_size: int | None = None,
    backend: str = "auto",
) -> Matmul:
    """A float matmul, or (``bits`` 8 or 4) a quantized copy of ``w``.

    int4 uses :func:`tp_engine.quant.weights.int4_group_size`; a width with no
    valid group (an uneven shard's odd width) falls back to int8 for that
    matrix. A draft wants speed: on an AVX2 CPU the AVX2 kernels are used.
    """
    if bits is None:
        return float_matmul(w, b)
    group = None
    if bits == 4:
        group = int4_group_size(w.shape[1], group_size)
        if group is None:
            bits = 8
    if backend == "auto" and w.device.type == "cpu" and _gemm() is not None:
        backend = "avx2"
    qw = quantize_weight(w, bits, group, backend=backend)
    return qw if b is None else (lambda x: qw(x).add_(b))


def fuse_rows(params: Sequence[torch.Tensor], in_place: bool = True) -> torch.Tensor:
    """One tensor holding ``params`` stacked along dim 0.

    With ``in_place`` the parameters are re-pointed at row views of the fused
    tensor, so the HF model keeps working, sees the same numbers, and no
    memory is duplicated. Params that already are consecutive views of one
    storage (a second decoder on the same model) are fused without a copy.
    """
    first = params[0]
    rows = sum(p.shape[0] for p in params)
    shape = (rows,) + tuple(first.shape[1:])
    adjacent, offset = True, first.storage_offset()
    for p in params:
        if (
            not p.is_contiguous()
            or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or p.storage_offset() != offset
        ):
            adjacent = False
            break
        offset += p.numel()
    if adjacent:
        return first.detach().as_strided(shape, torch.empty(shape, device="meta").stride())
    fused = torch.cat([p.detach() for p in params], dim=0)
    if in_place:
        start = 0
        for p in params:
            p.data = fused[start : start + p.shape[0]]
            start += p.shape[0]
    return fused


def _is_conv1d(module: nn.Module) -> bool:
    """HF's Conv1D and tp-engine's parallel Conv1D store the weight (in, out)."""
    return bool(getattr(module, "stores_in_out", False)) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module, in_place: bool = True) -> torch.Tensor:
    """The float weight of a linear-like module as (out, in), contiguous.

    Conv1D stores (in, out): with ``in_place`` its parameter is re-pointed at
    the transpose of a contiguous (out, in) copy, so no memory is duplicated
    and the module still computes the same thing.
    """
    w = module.weight
    if not _is_conv1d(module):
        return w.detach() if w.is_contiguous() else w.detach().contiguous()
    t = w.detach().t()
    if t.is_contiguous():
        return t
    t = t.contiguous()
    if in_place:
        w.data = t.t()
    return t


def module_bias(module: nn.Module) -> torch.Tensor | None:
    """The module's bias, detached; None where it has none."""
    b = getattr(module, "bias", None)
    return None if b is None else b.detach()


def module_matmul(module: nn.Module, bits: int | None = None, group_size: int | None = None, backend: str = "auto") -> Matmul:
    """``x @ W^T`` (no bias) of a linear-like module: its quantized strategy, or the float weight's.

    ``bits`` (a draft's quantized copy) of a GGUF layer: its blocks dequantized,
    then quantized like a float weight (the GGUF layer itself is untouched).
    """
    gguf = gguf_weight_of(module)
    if gguf is not None and bits is not None:
        return weight_matmul(gguf.dequantize(), None, bits, group_size, backend)
    if is_quantized(module):
        if bits is not None:
            raise ValueError("a quantized copy of an already quantized layer is not supported")
        return layer_matmul(module)
    return weight_matmul(linear_weight(module, in_place=bits is None), None, bits, group_size, backend)
