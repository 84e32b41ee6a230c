"""Weight-only int8 / int4 quantization of a (possibly already sharded) model.

Entry points (the runtime relies on these; keep them stable):

* :func:`quantize_weight` turns one (N, K) float weight into a
  :class:`QuantizedWeight`, a callable computing ``x @ W_q.T`` with the
  fastest correct backend for the weight's device;
* :func:`quantize` does that, in place, for every linear layer of a model:
  ``nn.Linear``, HF's ``Conv1D`` and tp-engine's parallel layers
  (:mod:`tp_engine.layers`). On a sharded model each rank quantizes its own
  shard; the collectives and bias handling stay those of the float layer;
* :func:`int4_group_size` is the one rule for an int4 group size;
* :func:`layer_matmul` (a layer's ``x @ W^T``, float or quantized, without
  bias) and :func:`is_quantized`.

Quantization formats (:mod:`tp_engine.kernels.reference` defines the layouts):
int8 is symmetric per output channel (``scale = absmax / 127``); int4 is
asymmetric per group of ``group_size`` inputs (``w = u * scale + min``).

Backends, and what each does to the *activations* (the weights are always
exactly the quantized ones, ``qw.dequantize()``):

========== ====== ====== ===================================================
backend    device bits   activations
========== ====== ====== ===================================================
avx2       CPU    8, 4   exact float32 (tp-engine's own kernels,
                         :mod:`tp_engine.kernels.cpu_gemm`, compiled at first
                         use; each weight row is read once for up to 16
                         rows of x). Needs AVX2+FMA and a C compiler.
int8pack   CPU    8      up to 15 rows: rounded to bfloat16, and so is the
                         result (torch's ``_weight_int8pack_mm``; its scales
                         are bfloat16, chosen so at quantization: no extra
                         error). From 16 rows on: exact float32 (the weight
                         is dequantized a chunk at a time for the float
                         GEMM, which is faster there).
int4pack   CPU    4      rounded to bfloat16, and so is the result
                         (torch's ``_weight_int4pack_mm_for_cpu``); scale
                         and the group's mid-point are bfloat16 (the codes
                         are chosen on that grid).
fbgemm     CPU    8      quantized dynamically to 7-bit integers, one scale
                         per token (torch.ops.quantized.linear_dynamic on
                         rows pre-divided by their absmax). 7 bits
                         (``reduce_range``) because AVX2's int8 dot
                         instruction saturates with 8. Fastest, but costs
                         quality: opt-in only.
triton     CUDA   8, 4   kept in x's dtype; float32 accumulation
                         (:mod:`tp_engine.kernels.triton_kernels`).
reference  any    8, 4   exact: x @ W_q.T in float32, result in x's dtype.
                         Slow (dequantizes per call): the exact-weight-only
                         option and the correctness oracle.
========== ====== ====== ===================================================

``backend="auto"`` picks, for the weight's device: CUDA -> triton (reference
without triton); CPU int8 -> avx2 when available (int4 under avx2 is
faster than int4pack but keeps the canonical codes beside the kernel's
record, more bytes than int8: opt-in), else int8pack (reference when in_features is not a
multiple of 16, which torch's kernel needs: it crashes on other widths); CPU int4 -> int4pack when
group_size is 32/64/128/256, else reference. Measured on the development
machine (AMD EPYC, AVX2 without VNNI, one thread, weights streamed from
memory, N=3072 K=576, µs per call):

============  ======  ======  ======
              M=1     M=5     M=64
============  ======  ======  ======
fp32 linear    538    1069    3409
int8pack       332     668    ~3800 (dequantize + fp32 GEMM)
int4pack       275     691    6803
fbgemm int8    178     224    1549
avx2 int8       97     244    (16 rows per call)
avx2 int4      111     287
============  ======  ======  ======

(avx2 rows from benchmarks/cpu_gemm.py, a separate run; its float32 kernel
takes 240 µs at M=1 and 328 at M=5 for the same matrix.)

(float32 x costs the packed ops 10x more than bfloat16 x, which is why those
backends round x to bfloat16.) int4pack is 2x slower than float32 for
prefill-sized inputs; int4's point on CPU is memory and decode.

Why fbgemm is not the default although it is the fastest: on SmolLM2-135M
(benchmarks/quant_quality.py) its 7-bit activations cost far more than the
int8 weights do -- perplexity 28.93 (float32) -> 33.3 with fbgemm, 29.04
with int8pack or the exact reference; top-1 agreement with float32 77%
(86% decoding one token at a time) against 96%.

Quality on SmolLM2-135M (full table: benchmarks/quant_quality.py): int8
costs ~0.1 perplexity (28.93 -> 29.04). int4 with group 32 looks free there
(29.01) only because the checkpoint's layers are already llama.cpp Q4_1 with
blocks of 32, which it reproduces; on a function-equivalent permutation of
the model (groups no longer aligned with those blocks, as for a genuinely
float model) int4 costs much more (g16: 34.9, g32: 37.4, g64: 40.7).

How a quantized layer looks (vLLM's ``quant_method`` idea, no class
swapping): every tp-engine layer with a weight matrix computes its matmul
through ``layer.quant_method`` (:class:`tp_engine.layers.MatmulMethod`;
float by default). :func:`quantize` keeps the layer's object and class (its
communicator, shard ranges, hooks, bias and collectives) and sets
``layer.quant_method = QuantizedMethod(qw)``; the float ``weight`` parameter
is removed from the layer and released, and ``layer.weight`` becomes a
:class:`WeightPlaceholder`: the old shape, device and ``tp_shard``, with the
codes' integer dtype and no data (code that reads weights sees "quantized
weights"; the runtime computes through ``quant_method``). Plain nn.Linear / Conv1D
are replaced by :class:`QuantizedLinear` (same ``quant_method`` /
``weight`` attributes), which is deliberately *not* an nn.Linear, so
``parallelize`` refuses a quantized model instead of slicing integer codes
(quantize after sharding, on every rank).

int4 group size: one rule, :func:`int4_group_size` (k, requested):
``requested`` (default :data:`DEFAULT_GROUP_SIZE` = 32) when it divides k,
else the largest even divisor of k below it, else None (int8 for that
matrix). :func:`quantize` applies it per layer when no group_size is given;
the runtime uses it for its quantized copies (speculative drafts).

Quantized layers are for inference: no gradient reaches the (integer)
weights. Quantize after moving the model to its device and dtype: the
quantized weights are not parameters or buffers, so ``model.to()`` does not
move them, and ``state_dict()`` does not hold them.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import reference as ref
from .kernels import triton_available
from .layers import (
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

BACKENDS = ("auto", "reference", "triton", "avx2", "fbgemm", "int8pack", "int4pack")

# int4 group size when none is given: 32, the most accurate size torch's CPU
# int4 kernel takes, at 4.5 bits per weight (64: 4.25). On SmolLM2-135M
# (benchmarks/quant_quality.py) 64 raised perplexity far more than 32, at
# the same decode speed.
DEFAULT_GROUP_SIZE = 32

_INT4PACK_GROUPS = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts


# ------------------------------------------------------------------ helpers


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= each (non-negative, finite) float32 of ``x``, as float32."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    bits = (bits + 0xFFFF) & ~0xFFFF  # drop the 16 low bits, rounding up
    return bits.to(torch.int32).view(torch.float32)


def _flatten(x: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"input of shape {tuple(x.shape)} does not end in in_features={k}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"input must be floating point, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"input is on {x.device}, the quantized weight on {device}")
    return x.reshape(-1, k)


# From this many rows of x on, int8pack's kernel (bf16 math without AVX512
# bf16 units) is slower than dequantizing the weight to float32 in chunks
# and calling the float GEMM (measured crossover: 16 rows for 3072 x 576).
_DEQUANT_MIN_ROWS = 16
_DEQUANT_CHUNK = 1 << 20  # weights dequantized at a time (4 MiB of float32)


def _dequant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale).T`` in float32, dequantizing a few rows of q at a time; x's dtype out."""
    n, k = q.shape
    x32 = x.float()
    y = x32.new_empty((x.shape[0], n))
    rows = max(1, _DEQUANT_CHUNK // k)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        w = q[start:stop].float().mul_(scale[start:stop, None].float())
        y[:, start:stop] = x32 @ w.T
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _fbgemm_available() -> bool:
    return hasattr(torch.ops.quantized, "linear_dynamic") and "fbgemm" in torch.backends.quantized.supported_engines


def _int8pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _int4pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


# ------------------------------------------------------------------ QuantizedWeight


class QuantizedWeight:
    """A quantized (N, K) weight; ``qw(x)`` is ``x @ W_q.T`` for x (..., K), in x's dtype.

    Attributes: ``bits`` (8 or 4), ``group_size`` (int4; None for int8),
    ``backend`` (see the module doc for what each does to activations),
    ``shape`` (N, K), ``device``, ``dtype`` (the integer dtype of the codes:
    int8, or uint8 for packed int4; not a float, so code that expects a float
    weight can tell), ``nbytes`` (bytes this object holds).
    ``dequantize()`` is W_q, exactly the weight the backend multiplies by;
    ``codes()`` the canonical layout (int8: q, scale; int4: packed, scale, offset).
    """

    bits: int
    group_size: int | None
    backend: str

    def __init__(self, bits: int, group_size: int | None, shape: tuple[int, int], device: torch.device):
        self.bits = bits
        self.group_size = group_size
        self.shape = torch.Size(shape)
        self.device = torch.device(device)
        self.dtype = torch.int8 if bits == 8 else torch.uint8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        x2 = _flatten(x, k, self.device)
        y = self._matmul(x2) if x2.shape[0] else x2.new_empty((0, n))
        return y.reshape(*x.shape[:-1], n)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # (M, K) -> (M, N), x's dtype
        raise NotImplementedError

    def codes(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_q (N, K): computed in float32 from :meth:`codes`, returned in ``dtype``."""
        if self.bits == 8:
            q, scale = self.codes()
            return ref.dequantize_int8(q, scale, dtype)
        packed, scale, offset = self.codes()
        return ref.dequantize_int4(packed, scale, offset, self.group_size, dtype)

    def __repr__(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (
            f"QuantizedWeight(int{self.bits}{group}, shape={tuple(self.shape)}, backend={self.backend}, "
            f"device={self.device}, {self.nbytes / 2**20:.2f} MiB)"
        )


class _Canonical(QuantizedWeight):
    """Holds the canonical layout; the reference matmul, or the Triton kernels."""

    def __init__(self, bits, group_size, codes, use_triton: bool):
        first = codes[0]
        k = first.shape[1] * (2 if bits == 4 else 1)
        super().__init__(bits, group_size, (first.shape[0], k), first.device)
        self._codes = tuple(c.contiguous() for c in codes)
        self.backend = "triton" if use_triton else "reference"
        self._kernels = None
        if use_triton:
            from .kernels import load_triton

            self._kernels = load_triton()

    def _matmul(self, x):
        impl = self._kernels if self._kernels is not None else ref
        if self.bits == 8:
            return impl.int8_matmul(x, *self._codes)
        return impl.int4_matmul(x, *self._codes, self.group_size)

    def codes(self):
        return self._codes

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._codes)


class _Fbgemm(QuantizedWeight):
    """int8 weights in fbgemm's packed layout; activations quantized dynamically (see module doc)."""

    backend = "fbgemm"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__(8, None, tuple(q.shape), q.device)
        n = q.shape[0]
        with warnings.catch_warnings():
            # torch marks quantized-tensor creation deprecated; this packing
            # call is the only use, and _fbgemm_available() gates the ops.
            warnings.simplefilter("ignore")
            qt = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(n, dtype=torch.long), 0)
        engine = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = "fbgemm"  # the packed weight is engine-specific
            self._packed = torch.ops.quantized.linear_prepack(qt, None)
        finally:
            torch.backends.quantized.engine = engine

    def _matmul(self, x):
        x32 = x.float()
        if x32.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(x32, self._packed, True)
        else:
            # fbgemm takes one activation scale for the whole input; across
            # many tokens one outlier token would coarsen everyone's grid
            # (SmolLM2 prefill: perplexity x3). Dividing each row by its
            # absmax first makes that one scale a per-token one.
            amax = x32.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
            y = torch.ops.quantized.linear_dynamic(x32 / amax, self._packed, True).mul_(amax)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def codes(self):
        w, _ = torch.ops.quantized.linear_unpack(self._packed)
        return w.int_repr().contiguous(), w.q_per_channel_scales().float().contiguous()

    @property
    def nbytes(self) -> int:
        # fbgemm's packed int8 matrix plus per-channel scale, zero point and
        # column offsets (its block padding is not visible from Python).
        n, k = self.shape
        return n * k + 12 * n


def _avx2_available() -> bool:
    from .kernels import cpu_gemm

    return cpu_gemm.available()


class _Avx2(QuantizedWeight):
    """The canonical codes in tp-engine's own AVX2 kernels (kernels/cpu_gemm.c): float32 x, exact.

    The kernels take up to 16 rows of x per call (each weight row is read
    once for all of them); longer inputs (prefill) go 16 rows at a time.
    """

    backend = "avx2"
    _ROWS = 16

    def __init__(self, bits: int, group_size: int | None, codes: tuple[torch.Tensor, ...]):
        from .kernels import cpu_gemm

        first = codes[0]
        k = first.shape[1] * (2 if bits == 4 else 1)
        super().__init__(bits, group_size, (first.shape[0], k), first.device)
        self._codes = tuple(c.contiguous() for c in codes)
        self._gemm = cpu_gemm
        if bits == 8:
            self._prepared = cpu_gemm.Int8Weight.from_canonical(*self._codes)
            self._fn = cpu_gemm.linear_int8
            # One copy of the codes: the canonical view is the prepared rows without their K padding.
            self._codes = (self._prepared._data[:, :k], self._codes[1])
        else:
            self._prepared = cpu_gemm.Int4Weight.from_canonical(*self._codes, group_size)
            self._fn = cpu_gemm.linear_int4

    def _matmul(self, x):
        x32 = x.float().contiguous()
        if x32.shape[0] <= self._ROWS:
            y = self._fn(x32, self._prepared)
        else:
            y = torch.cat([self._fn(x32[i : i + self._ROWS], self._prepared) for i in range(0, x32.shape[0], self._ROWS)])
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def codes(self):
        return self._codes

    @property
    def nbytes(self) -> int:
        if self.bits == 8:  # codes() are views of the prepared record
            return self._prepared.nbytes
        # int4: the kernel's record plus the canonical codes kept for codes()/dequantize()
        return self._prepared.nbytes + sum(c.numel() * c.element_size() for c in self._codes)


class _Int8Pack(QuantizedWeight):
    """int8 codes as they are, bfloat16 scales, torch's _weight_int8pack_mm on bfloat16 x."""

    backend = "int8pack"

    def __init__(self, q: torch.Tensor, scale_bf16: torch.Tensor):
        super().__init__(8, None, tuple(q.shape), q.device)
        self._q = q.contiguous()
        self._scale = scale_bf16.contiguous()

    def _matmul(self, x):
        if x.shape[0] >= _DEQUANT_MIN_ROWS:
            return _dequant_matmul(x, self._q, self._scale)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self._q, self._scale)
        return y.to(x.dtype)

    def codes(self):
        return self._q, self._scale.float()

    @property
    def nbytes(self) -> int:
        return self._q.numel() + 2 * self._scale.numel()


class _Int4Pack(QuantizedWeight):
    """int4 in torch's CPU tinygemm layout (rows padded to 16) with bfloat16 (scale, mid-point) pairs.

    The op computes ``(u - 8) * scale + zero``; ``zero = offset + 8 * scale``.
    """

    backend = "int4pack"

    def __init__(self, u: torch.Tensor, scale_bf16: torch.Tensor, zero_bf16: torch.Tensor, group_size: int):
        n, k = u.shape
        super().__init__(4, group_size, (n, k), u.device)
        pad = (-n) % 16  # the op needs a multiple of 16 rows; padded rows are zero and cut off
        if pad:
            u = F.pad(u, (0, 0, 0, pad))
            scale_bf16 = F.pad(scale_bf16, (0, 0, 0, pad))
            zero_bf16 = F.pad(zero_bf16, (0, 0, 0, pad))
        self._rows = n + pad
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 1)
        # (K // group, N_pad, 2): the op's layout for scales and zeros.
        self._scale_zeros = torch.stack([scale_bf16, zero_bf16], dim=-1).transpose(0, 1).contiguous()

    def _matmul(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), self._packed, self.group_size, self._scale_zeros
        )
        n = self.shape[0]
        y = y if self._rows == n else y[:, :n]
        return y.to(x.dtype)

    def codes(self):
        # The packed layout is the kernel's private business (it differs
        # between CPU builds), so read the nibbles back through the op itself:
        # identity rows with scale 1 and zero 8 return u exactly (0..15 are
        # exact in bfloat16).
        n, k = self.shape
        unit = torch.zeros_like(self._scale_zeros)
        unit[..., 0] = 1.0
        unit[..., 1] = 8.0
        rows = []
        for start in range(0, k, 256):
            eye = torch.eye(k, dtype=torch.bfloat16)[start : start + 256]
            rows.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self._packed, self.group_size, unit))
        u = torch.cat(rows).T[:n].round().to(torch.uint8)  # (N, K)
        scale = self._scale_zeros[:, :n, 0].float().T.contiguous()
        offset = (self._scale_zeros[:, :n, 1].float().T - 8.0 * scale).contiguous()
        return ref.pack_int4(u), scale, offset

    @property
    def nbytes(self) -> int:
        return self._packed.numel() * self._packed.element_size() + self._scale_zeros.numel() * 2


# ------------------------------------------------------------------ quantize_weight


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


def _auto_backend(bits: int, group_size: int | None, shape: tuple[int, int], device: torch.device) -> str:
    if device.type == "cuda":
        return "triton" if triton_available("cuda") else "reference"
    if device.type != "cpu":
        return "reference"
    if bits == 8 and _avx2_available():  # exact float32 activations and the fastest here (see the module doc)
        return "avx2"
    if bits == 8:
        # Not fbgemm, though it is fast: its 7-bit dynamic activations
        # cost SmolLM2 far more than the int8 weights do (see the module doc).
        return "int8pack" if _int8pack_available() and shape[1] % 16 == 0 else "reference"
    return "int4pack" if _int4pack_available() and group_size in _INT4PACK_GROUPS else "reference"


def _check_backend(backend: str, bits: int, group_size: int | None, shape: tuple[int, int], device: torch.device) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "avx2":
        if device.type != "cpu":
            raise ValueError(f"backend 'avx2' runs on CPU tensors; this weight is on {device}")
        if not _avx2_available():
            raise RuntimeError("backend 'avx2': no AVX2/FMA CPU or no C compiler here (kernels/cpu_gemm.c)")
    cpu_only = {"fbgemm": 8, "int8pack": 8, "int4pack": 4}
    if backend in cpu_only:
        if device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on CPU tensors; this weight is on {device}")
        if bits != cpu_only[backend]:
            raise ValueError(f"backend {backend!r} is for int{cpu_only[backend]}, not int{bits}")
        available = {"fbgemm": _fbgemm_available, "int8pack": _int8pack_available, "int4pack": _int4pack_available}
        if not available[backend]():
            raise RuntimeError(f"backend {backend!r}: this torch build lacks the op")
    if backend == "int8pack" and shape[1] % 16:
        # torch's kernel reads K in steps of 8: other K crash or return garbage.
        raise ValueError(f"backend 'int8pack' needs in_features divisible by 8, got {shape[1]}")
    if backend == "int4pack" and group_size not in _INT4PACK_GROUPS:
        raise ValueError(f"backend 'int4pack' needs group_size in {_INT4PACK_GROUPS}, got {group_size}")
    if backend == "triton" and not triton_available(device.type):
        hint = "set TRITON_INTERPRET=1 to run them (slowly) on CPU" if device.type == "cpu" else "install triton"
        raise RuntimeError(f"backend 'triton' is not available for {device} tensors here ({hint})")


@torch.no_grad()
def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int | None = None, backend: str = "auto"
) -> QuantizedWeight:
    """Quantize an (N, K) float weight (nn.Linear's layout) to int8 or int4.

    ``bits=8``: per output channel, symmetric; ``group_size`` must be None.
    ``bits=4``: groups of ``group_size`` inputs, asymmetric; an explicit
    group_size must divide K; None: :func:`int4_group_size` (K)
    (:data:`DEFAULT_GROUP_SIZE` when it divides K).
    ``backend``: "auto" or one of :data:`BACKENDS` (see the module doc for
    what each does to activations). Every element of W_q is within half a
    quantization step of W, except that the bfloat16 backends may add
    ``|group mid-point| * 2**-9`` (int4pack).
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


# ------------------------------------------------------------------ quantized layers


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


# ------------------------------------------------------------------ quantize(model)


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


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for this module
        return None
    return Conv1D


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
        summary.quantized[path] = _describe(qw)
        method = QuantizedMethod(qw)
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
