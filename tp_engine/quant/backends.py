"""The quantized matmul backends: :class:`QuantizedWeight`, one subclass per backend, and the choice of backend.

:func:`tp_engine.quant.weights.quantize_weight` builds these objects (it
chooses the codes; :mod:`tp_engine.quant.weights` describes the formats);
this module holds what each backend keeps and how it multiplies.

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
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..kernels import reference as ref
from ..kernels import triton_available

__all__ = ["BACKENDS", "QuantizedWeight"]

BACKENDS = ("auto", "reference", "triton", "avx2", "fbgemm", "int8pack", "int4pack")

_INT4PACK_GROUPS = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts


# ------------------------------------------------------------------ helpers


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
            from ..kernels import load_triton

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
    from ..kernels import cpu_gemm

    return cpu_gemm.available()


class _Avx2(QuantizedWeight):
    """The canonical codes in tp-engine's own AVX2 kernels (kernels/cpu_gemm.c): float32 x, exact.

    The kernels take up to 16 rows of x per call (each weight row is read
    once for all of them); longer inputs (prefill) go 16 rows at a time.
    """

    backend = "avx2"
    _ROWS = 16

    def __init__(self, bits: int, group_size: int | None, codes: tuple[torch.Tensor, ...]):
        from ..kernels import cpu_gemm

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



# ------------------------------------------------------------------ backend choice


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
