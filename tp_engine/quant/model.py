"""Quantizing a whole model in place: :func:`quantize` (and its :class:`QuantizationSummary`).

:func:`quantize` quantizes every linear layer of a model: ``nn.Linear``,
HF's ``Conv1D`` and tp-engine's parallel layers (:mod:`tp_engine.layers`).
On a sharded model each rank quantizes its own shard; the collectives and
bias handling stay those of the float layer. Each weight goes through
:func:`tp_engine.quant.weights.quantize_weight`; each layer becomes a
quantized one as :mod:`tp_engine.quant.layer` describes.

Quantized layers are for inference: no gradient reaches the (integer)
weights. Quantize after moving the model to its device and dtype: the
quantized weights are not parameters or buffers, so ``model.to()`` does not
move them, and ``state_dict()`` does not hold them.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import ParallelLMHead
from .backends import BACKENDS, _check_backend
from .layer import (
    _CONV1D_LAYOUT,
    _PARALLEL_TYPES,
    QuantizedLinear,
    QuantizedMethod,
    WeightPlaceholder,
    _conv1d_type,
    is_quantized,
)
from .weights import DEFAULT_GROUP_SIZE, _check_bits, _check_group_size, int4_group_size, quantize_weight

__all__ = ["QuantizationSummary", "quantize"]


@dataclass
class QuantizationSummary:
    """What :func:`quantize` did (``model.tp_engine_quantization``)."""

    bits: int
    group_size: int | None
    quantized: dict[str, str] = field(default_factory=dict)  # module path -> "int8, fbgemm"
    skipped: dict[str, str] = field(default_factory=dict)  # module path -> why it stays float
    float_bytes: int = 0  # bytes of the float weights that were replaced
    released_bytes: int = 0  # of those, bytes no longer referenced (tied tables stay)
    quantized_bytes: int = 0  # bytes the quantized weights hold

    @property
    def saved_bytes(self) -> int:
        return self.released_bytes - self.quantized_bytes


def _matches(path: str, patterns: Sequence[str]) -> bool:
    """``path`` equals a pattern or ends with ``.pattern`` ("lm_head" matches "model.lm_head")."""
    return any(path == p or path.endswith("." + p) for p in patterns)


def _kind(module: nn.Module, conv1d: type | None) -> str | None:
    """How ``module`` is quantized: "linear", "conv1d" (replaced by a QuantizedLinear), "parallel" (gets a
    quantized ``quant_method``), or None (not a matmul layer we handle)."""
    t = type(module)
    if t is nn.Linear:
        return "linear"
    if conv1d is not None and t is conv1d:
        return "conv1d"
    if t in _PARALLEL_TYPES:
        return "parallel"
    return None


def _unhandled_reason(module: nn.Module, conv1d: type | None) -> str | None:
    """Why a linear-like module that is not handled stays float (None: it is not linear-like)."""
    if isinstance(module, (nn.Linear,) + _PARALLEL_TYPES):
        return f"{type(module).__name__} has its own forward; only the exact float classes are quantized"
    if conv1d is not None and isinstance(module, conv1d):
        return f"{type(module).__name__} has its own forward"
    return None


def _transposed(module: nn.Module, kind: str) -> bool:
    """Whether the module stores its weight (in, out) (HF Conv1D and the parallel Conv1D layers)."""
    return kind == "conv1d" or isinstance(module, _CONV1D_LAYOUT)


def _weight_of(module: nn.Module, kind: str) -> torch.Tensor:
    w = module.weight.detach()
    return w.T if _transposed(module, kind) else w  # quantize_weight takes (out, in)


_BACKEND_BITS = {"fbgemm": 8, "int8pack": 8, "int4pack": 4}


def _output_head(model: nn.Module) -> nn.Module | None:
    """The LM head: a ParallelLMHead, else HF's output embeddings (None if neither)."""
    for module in model.modules():
        if isinstance(module, ParallelLMHead):
            return module
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (AttributeError, NotImplementedError):  # base models without a head
            return None
    return None


def _held_elsewhere(model: nn.Module, replaced: set[int]) -> set[int]:
    """ids of parameters still referenced by modules that stay float (tied embeddings)."""
    keep = set()
    for module in model.modules():
        if id(module) in replaced:
            continue
        for p in module.parameters(recurse=False):
            keep.add(id(p))
    return keep


@torch.no_grad()
def quantize(
    model: nn.Module,
    bits: int = 8,
    group_size: int | None = None,
    skip: Sequence[str] = (),
    backend: str = "auto",
    head_bits: int | None = 8,
) -> nn.Module:
    """Quantize every linear layer of ``model`` in place (weight-only); return it.

    Handles ``nn.Linear``, HF ``Conv1D`` and tp-engine's ``ColumnParallelLinear``,
    ``RowParallelLinear`` (and ``DeferredRowParallelLinear``), ``ParallelLMHead``,
    ``ColumnParallelConv1D`` and ``RowParallelConv1D`` (on a sharded model each
    rank quantizes its shard: call it on every rank, after ``parallelize``).
    tp-engine's layers keep their object and class: ``layer.quant_method``
    becomes a :class:`QuantizedMethod` and ``layer.weight`` a
    :class:`WeightPlaceholder` (the float parameter is removed from the
    layer). ``nn.Linear`` / ``Conv1D`` are replaced by :class:`QuantizedLinear`. Other
    modules with weights (embeddings, norms) stay float; modules whose class
    only looks like a linear layer are listed in the summary's ``skipped``
    with a warning.

    ``skip``: module paths (or their last components, e.g. ``"lm_head"``) to
    keep float.

    The LM head (``ParallelLMHead``, or HF's ``get_output_embeddings()``) is
    quantized with ``head_bits`` (default 8, whatever ``bits`` is; None: same
    as ``bits``). Measured on SmolLM2-135M (benchmarks/quant_quality.py), where
    the head is a fifth of all weights: int8 there costs nothing measurable
    (perplexity 29.04 with and without), int4 there costs most of int4's
    loss (perplexity 29.01 -> 30.98, top-1 agreement 97% -> 81%). A head
    tied to the input embedding keeps the float table alive for the lookup,
    so its quantized copy adds memory (int8: +25% of the table) in exchange
    for decode speed; ``skip=("lm_head",)`` trades back.

    int4 ``group_size`` None: per layer, :func:`int4_group_size` (in_features)
    (:data:`DEFAULT_GROUP_SIZE` when it divides, else the largest even divisor
    below it), and int8 for a layer with odd in_features (an uneven shard).
    An explicit ``group_size`` is a format choice (e.g. one a kernel needs):
    it must divide every int4 layer's in_features, or quantize refuses.
    ``backend``: as for :func:`quantize_weight`; a backend made for the other
    width (e.g. "int4pack" for an int8 head) falls back to "auto" there.

    Refuses (before changing anything): bits not 8 or 4, a group_size that
    does not divide some layer, a backend that cannot run some layer, an
    already quantized model, weights on the meta device. The summary is
    ``model.tp_engine_quantization``; the float weights are released and
    freed heap memory handed back to the OS (SmolLM2-135M: RSS drops by
    273 MiB for int8, 310 MiB for int4, from 513 MiB of float32 weights, of
    which the tied 108 MiB embedding table stays).
    """
    _check_bits(bits)
    if head_bits is None:
        head_bits = bits
    _check_bits(head_bits)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    if getattr(model, "tp_engine_quantization", None) is not None or any(is_quantized(m) for m in model.modules()):
        raise ValueError("quantize: this model is already quantized; quantize the float model once")
    if isinstance(skip, str):
        skip = (skip,)
    explicit_group = group_size
    if group_size is not None:
        _check_group_size(bits, group_size)  # int8: refuses any group; int4: must be even

    conv1d = _conv1d_type()
    summary = QuantizationSummary(bits=bits, group_size=group_size if bits == 4 else None)
    if bits == 4 and group_size is None:
        summary.group_size = DEFAULT_GROUP_SIZE

    head = _output_head(model)

    # 1. Plan and validate everything before touching the model.
    plan: list[tuple[str, nn.Module, str, int, int | None, str]] = []
    for path, module in model.named_modules():
        kind = _kind(module, conv1d)
        if kind is None:
            reason = _unhandled_reason(module, conv1d)
            if reason is not None:
                summary.skipped[path] = reason
            continue
        if _matches(path, skip):
            summary.skipped[path] = "in skip"
            continue
        if not path and kind != "parallel":
            raise ValueError("quantize: the model is itself a linear layer; use quantize_weight for a single weight")
        w = module.weight
        if w.device.type == "meta":
            raise ValueError(f"{path}: weights are on the meta device (not loaded); load them before quantizing")
        if not w.dtype.is_floating_point:
            raise TypeError(f"{path}: weight is {w.dtype}, not floating point")
        n, k = (w.shape[1], w.shape[0]) if _transposed(module, kind) else (w.shape[0], w.shape[1])
        layer_bits = head_bits if module is head else bits
        g = None
        if layer_bits == 4:
            if explicit_group is not None:
                if k % explicit_group:
                    raise ValueError(
                        f"{path}: group_size {explicit_group} does not divide in_features {k} "
                        "(group_size=None picks one per layer)"
                    )
                g = explicit_group
            else:
                g = int4_group_size(k)
                if g is None:  # odd width (an uneven shard): no int4 grouping fits
                    layer_bits = 8
        layer_backend = backend if _BACKEND_BITS.get(backend, layer_bits) == layer_bits else "auto"
        shape = (n, k)
        if layer_backend != "auto":
            try:
                _check_backend(layer_backend, layer_bits, g, shape, w.device)
            except (ValueError, RuntimeError) as e:
                raise type(e)(f"{path}: {e}") from None
        plan.append((path, module, kind, layer_bits, g, layer_backend))
    if not plan:
        raise ValueError("quantize: the model has no linear layers to quantize")

    # 2. Quantize, layer by layer (peak memory: one layer's float copy).
    replaced = {id(entry[1]) for entry in plan}
    keep = _held_elsewhere(model, replaced)
    for path, module, kind, layer_bits, g, layer_backend in plan:
        w = module.weight
        qw = quantize_weight(_weight_of(module, kind), layer_bits, g, layer_backend)
        nbytes = w.numel() * w.element_size()
        summary.float_bytes += nbytes
        if id(w) not in keep:
            summary.released_bytes += nbytes
        summary.quantized_bytes += qw.nbytes
        method = QuantizedMethod(qw)
        summary.quantized[path] = method.describe()
        if kind == "parallel":
            # Same object and class: keeps comm, ranges, hooks and identity;
            # only the matmul strategy changes. The float parameter leaves the
            # layer; its description (and tp_shard) stays as the placeholder.
            placeholder = WeightPlaceholder(w.shape, qw, getattr(w, "tp_shard", None))
            del module._parameters["weight"]
            module.weight = placeholder
            module.quant_method = method
        else:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            new = QuantizedLinear(method, module.bias)
            new.train(module.training)
            setattr(parent, name, new)
        del w
    if summary.skipped:
        listed = {p: r for p, r in summary.skipped.items() if r != "in skip"}
        if listed:
            names = ", ".join(f"{p} ({r})" for p, r in list(listed.items())[:5])
            more = f" and {len(listed) - 5} more" if len(listed) > 5 else ""
            warnings.warn(f"quantize: kept float: {names}{more}", stacklevel=2)
    model.tp_engine_quantization = summary
    # The plan still holds the replaced nn.Linear modules and their float
    # weights: drop them before handing the memory back.
    del plan, module
    _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; elsewhere a no-op).

    Quantizing frees the float weights and many temporaries of a few MiB;
    glibc keeps such freed blocks in its heap, so without a trim the process
    RSS hardly drops (SmolLM2-135M, int4: RSS rose 71 MiB instead of
    falling 310 MiB). malloc_trim(0) releases them.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    trim(0)
