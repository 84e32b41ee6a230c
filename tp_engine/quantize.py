"""Public import path of weight-only quantization; the code lives in :mod:`tp_engine.quant` (backends, weights, layer, model)."""
from __future__ import annotations

from .quant.backends import BACKENDS, QuantizedWeight
from .quant.layer import QuantizedLinear, QuantizedMethod, WeightPlaceholder, is_quantized, layer_matmul
from .quant.model import QuantizationSummary, quantize
from .quant.weights import DEFAULT_GROUP_SIZE, int4_group_size, quantize_weight

__all__ = [
    "BACKENDS",
    "DEFAULT_GROUP_SIZE",
    "QuantizationSummary",
    "QuantizedLinear",
    "QuantizedMethod",
    "QuantizedWeight",
    "WeightPlaceholder",
    "int4_group_size",
    "is_quantized",
    "layer_matmul",
    "quantize",
    "quantize_weight",
]
