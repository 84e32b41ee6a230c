"""Quantizing one weight matrix: :func:`quantize_weight`, and the one int4 group-size rule.

Quantization formats (:mod:`tp_engine.kernels.reference` defines the layouts):
int8 is symmetric per output channel (``scale = absmax / 127``); int4 is
asymmetric per group of ``group_size`` inputs (``w = u * scale + min``).
What each backend then does with the codes (and to the activations) is in
:mod:`tp_engine.quant.backends`.

Quality on SmolLM2-135M (full table: benchmarks/quant_quality.py): int8
costs ~0.1 perplexity (28.93 -> 29.04). int4 with group 32 looks free there
(29.01) only because the checkpoint's layers are already llama.cpp Q4_1 with
blocks of 32, which it reproduces; on a function-equivalent permutation of
the model (groups no longer aligned with those blocks, as for a genuinely
float model) int4 costs much more (g16: 34.9, g32: 37.4, g64: 40.7).

int4 group size: one rule, :func:`int4_group_size` (k, requested):
``requested`` (default :data:`DEFAULT_GROUP_SIZE` = 32) when it divides k,
else the largest even divisor of k below it, else None (int8 for that
matrix). :func:`quantize` applies it per layer when no group_size is given;
the runtime uses it for its quantized copies (speculative drafts).
"""
from __future__ import annotations

import torch

from ..kernels import reference as ref
from .backends import (
    QuantizedWeight,
    _auto_backend,
    _Avx2,
    _Canonical,
    _check_backend,
    _Fbgemm,
    _Int4Pack,
    _Int8Pack,
)

__all__ = ["DEFAULT_GROUP_SIZE", "int4_group_size", "quantize_weight"]

# int4 group size when none is given: 32, the most accurate size torch's CPU
# int4 kernel takes, at 4.5 bits per weight (64: 4.25). On SmolLM2-135M
# (benchmarks/quant_quality.py) 64 raised perplexity far more than 32, at
# the same decode speed.
DEFAULT_GROUP_SIZE = 32


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= each (non-negative, finite) float32 of ``x``, as float32."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    bits = (bits + 0xFFFF) & ~0xFFFF  # drop the 16 low bits, rounding up
    return bits.to(torch.int32).view(torch.float32)


def _check_group_size(bits: int, group_size: int | None) -> None:
    """int8: no group; int4: None or an even integer >= 2 (int4 packs pairs of inputs)."""
    if bits == 8:
        if group_size is not None:
            raise ValueError("int8 is quantized per output channel; group_size applies to int4 only")
        return
    if group_size is None:
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size!r}")


def int4_group_size(k: int, requested: int | None = None) -> int | None:
    """THE int4 group size for a weight with ``k`` inputs (the one rule; the runtime uses it too).

    ``requested`` (default :data:`DEFAULT_GROUP_SIZE`) when it divides k;
    else the largest even divisor of k below it (sharding leaves widths such
    as 48 or 60: 24, 30); else None (k odd: no int4 grouping fits; callers
    quantize that matrix to int8). E.g. k=48 -> 24, k=67 -> None, k=2 -> 2.

    ``requested`` must be an even integer >= 2. The fallback can be small
    (k = 2 * prime gives 2); :func:`quantize` with an explicit group_size
    does not fall back at all (see there).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (in_features) must be a positive integer, got {k!r}")
    want = DEFAULT_GROUP_SIZE if requested is None else requested
    _check_group_size(4, want)
    if k % want == 0:
        return want
    for g in range(want - 2, 1, -2):
        if k % g == 0:
            return g
    return None


def _check_bits(bits: int) -> None:
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")


@torch.no_grad()
def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int | None = None, backend: str = "auto"
) -> QuantizedWeight:
    """Quantize an (N, K) float weight (nn.Linear's layout) to int8 or int4.

    ``bits=8``: per output channel, symmetric; ``group_size`` must be None.
    ``bits=4``: groups of ``group_size`` inputs, asymmetric; an explicit
    group_size must divide K; None: :func:`int4_group_size` (K)
    (:data:`DEFAULT_GROUP_SIZE` when it divides K).
    ``backend``: "auto" or one of :data:`~tp_engine.quant.backends.BACKENDS`
    (:mod:`tp_engine.quant.backends` says what each does to activations).
    Every element of W_q is within half a quantization step of W, except
    that the bfloat16 backends may add ``|group mid-point| * 2**-9``
    (int4pack).
    """
    _check_bits(bits)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got {getattr(w, 'shape', type(w))}")
    if w.device.type == "meta":
        raise ValueError("weight is on the meta device (not loaded); load the weights before quantizing")
    if not w.dtype.is_floating_point:
        raise TypeError(f"weight must be floating point, got {w.dtype} (already quantized?)")
    n, k = w.shape
    _check_group_size(bits, group_size)
    if bits == 4 and group_size is None:
        group_size = int4_group_size(k)
        if group_size is None:
            raise ValueError(f"in_features {k} is odd: no int4 group size fits (int4 packs pairs); use bits=8")
    if bits == 4 and k % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {k}")
    if backend == "auto":
        backend = _auto_backend(bits, group_size, (n, k), w.device)
    _check_backend(backend, bits, group_size, (n, k), w.device)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds inf or nan values; they cannot be quantized")

    if backend in ("reference", "triton"):
        codes = ref.quantize_int8(w) if bits == 8 else ref.quantize_int4(w, group_size)
        return _Canonical(bits, group_size, codes, use_triton=backend == "triton")
    if backend == "fbgemm":
        return _Fbgemm(*ref.quantize_int8(w))
    if backend == "avx2":
        codes = ref.quantize_int8(w) if bits == 8 else ref.quantize_int4(w, group_size)
        return _Avx2(bits, group_size, codes)

    w32 = w.detach().float()
    if backend == "int8pack":
        # The scale must be a bfloat16; rounding it *up* keeps |q| <= 127
        # without clipping, so the error stays within half a step.
        scale = _bf16_ceil(w32.abs().amax(dim=1) / 127.0)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w32 / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return _Int8Pack(q, scale.to(torch.bfloat16))

    # int4pack: scale and mid-point are bfloat16, so quantize onto the grid
    # the kernel will actually use: (u - 8) * scale_b + zero_b.
    groups = w32.reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = _bf16_ceil((high - low) / 15.0)
    zero = (low + 8.0 * scale).to(torch.bfloat16)
    offset = zero.float() - 8.0 * scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = torch.round((groups - offset[..., None]) / safe[..., None]).clamp_(0, 15).reshape(n, k)
    return _Int4Pack(u.to(torch.uint8), scale.to(torch.bfloat16), zero, group_size)
