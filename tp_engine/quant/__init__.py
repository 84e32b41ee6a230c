"""Weight-only int8 / int4 quantization of a (possibly already sharded) model, one idea per module.

* :mod:`.backends`: :class:`QuantizedWeight`, a callable computing
  ``x @ W_q.T``, with one subclass per matmul backend, and which backend
  runs where (what each does to the activations, measured speeds);
* :mod:`.weights`: :func:`quantize_weight` turns one (N, K) float weight
  into a :class:`QuantizedWeight` with the fastest correct backend for the
  weight's device; :func:`int4_group_size` is the one rule for an int4
  group size; the quantization formats;
* :mod:`.layer`: a quantized layer (:class:`QuantizedMethod`,
  :class:`WeightPlaceholder`, :class:`QuantizedLinear`),
  :func:`layer_matmul` (a layer's ``x @ W^T``, float or quantized, without
  bias) and :func:`is_quantized`;
* :mod:`.model`: :func:`quantize` does that, in place, for every linear
  layer of a model (:class:`QuantizationSummary` says what it did).

The public import path is :mod:`tp_engine.quantize`, which re-exports these
names (the runtime relies on them; keep them stable). This package imports
only :mod:`tp_engine.layers` and :mod:`tp_engine.kernels`, never the runtime.
"""
