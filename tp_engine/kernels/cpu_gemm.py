"""AVX2/FMA skinny GEMMs for CPU decode: float32, int8 and int4 weights, M <= 16 rows.

Decode on a CPU is memory bound, and torch's kernels do not stream the
weights at the memory's speed for a handful of rows: MKL's sgemm repacks W for
small M (M = 5 costs twice M = 1), and torch's int8/int4 packed ops move 4x /
8x fewer bytes than float32 but are barely faster. The kernels here
(``cpu_gemm.c``) load each weight row once per call and apply it to all M
rows of x, reading W as four parallel sequential streams (what one core
needs to reach the DRAM bandwidth): verifying k + 1 speculative tokens costs
little more than one token, and an int8 draft ~1/3 of a float32 step.

API (x float32 (M, K) contiguous, 1 <= M <= 16; y float32 (M, N)):

* :func:`linear_f32` ``(x, w, bias=None)``: ``x @ w.T + bias`` with w the
  float32 (N, K) ``nn.Linear`` weight itself (no copy, no repacking).
* :class:`Int8Weight` ``.from_canonical(q, scale)`` and :func:`linear_int8`:
  ``x @ (q * scale[:, None]).T + bias`` (the sum of x * q in float32, times
  the row's scale).
* :class:`Int4Weight` ``.from_canonical(packed, scale, offset, group_size)``
  and :func:`linear_int4`: ``x @ (u * scale + offset).T + bias`` per group,
  computed as ``scale_g * (x_g . u_g) + offset_g * sum(x_g)`` (the group sums
  of x once per call).
* every function takes ``out=`` (a preallocated (M, N) result) and, for
  tuning only, ``plan=(rows of W, rows of x)`` register blocking.
* :func:`available`: whether the compiled kernels run here. Where they do
  not (no C compiler, not x86-64, no AVX2/FMA, ``TP_ENGINE_GEMM_NO_C=1``) the
  functions raise RuntimeError; callers check ``available()`` and use torch.

Numerics: float32 accumulation in a fixed order, errors well inside the
classic gamma_n bound (see tests/test_cpu_gemm.py), differing from MKL's in
the last bits. float32 and int8 results are bitwise independent of M and of
the other rows of x; int4 ones are deterministic for a given M (and plan).
All are bitwise independent of the thread count.

The canonical layouts are :mod:`tp_engine.kernels.reference`'s. Prepared
int8 weights are the canonical ones with K padded to a multiple of 8 (the
same tensor when it already is one); int4 weights are re-laid out into one
record per row (scales, offsets, then nibbles rearranged for unpacking, each
group padded to 16 inputs), about the canonical bytes.

The C file is compiled at first use with ``cc -O3 -mavx2 -mfma`` (``$CC``
overrides) and cached by a hash of source, compiler and flags under
``$TP_ENGINE_CACHE_DIR``, ``$XDG_CACHE_HOME/tp_engine`` or
``~/.cache/tp_engine``, like :mod:`tp_engine.comm.shm`'s helper. Calls
release the GIL (ctypes does for CDLL functions) and split the N output
rows over :mod:`.threads`' pool (contiguous ranges, each walked with its own
row streams; one thread for a tiny weight), and cost ~4 µs of Python and
ctypes on top of the kernel. No autograd: outputs carry no gradient history.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any

import torch

from ..native import compile_shared
from . import threads

__all__ = [
    "Int4Weight",
    "Int8Weight",
    "MAX_ROWS",
    "available",
    "linear_f32",
    "linear_int4",
    "linear_int8",
]

log = logging.getLogger(__name__)

MAX_ROWS = 16  # rows of x per call (the C side's MAXM)
NO_NATIVE_ENV = "TP_ENGINE_GEMM_NO_C"  # set to 1: available() is False

_ABI = 3
_C_SOURCE = Path(__file__).with_name("cpu_gemm.c")
# -std=c11 keeps -ffp-contract off for the scalar epilogues (the vector code
# states its FMAs explicitly); never -ffast-math: sums must not be reordered.
_FLAGS = ["-O3", "-std=c11", "-mavx2", "-mfma", "-fPIC", "-shared"]

# Register blocking per number of rows M: (rr weight rows, mc rows of x per
# chunk); M is split into balanced chunks of at most mc rows, and rr is also
# the number of parallel read streams (4 reads DRAM fastest). Chosen on the
# development machine (AMD EPYC Zen 3 VM, AVX2) on a 3072 x 576 weight, M in
# 1..16; the neighbours of each choice were within ~5%.
_PLAN_F32 = {1: (4, 1), 2: (4, 2)}  # then (4, 3): 12 accumulators, 2 or more chunks
_PLAN_I8 = {1: (4, 1), 2: (4, 2), 3: (2, 3), 4: (2, 4), 5: (2, 5), 6: (2, 6), 7: (2, 7)}
_PLAN_I4 = {1: (4, 1), 2: (2, 2), 3: (2, 3), 4: (2, 4), 5: (2, 5), 6: (1, 6), 7: (1, 7), 8: (1, 8)}
_PLAN_DEFAULT = {"f32": (4, 3), "i8": (2, 7), "i4": (2, 5)}


def _plan(kind: str, table: dict[int, tuple[int, int]], m: int, plan: tuple[int, int] | None) -> tuple[int, int]:
    if plan is None:
        return table.get(m) or _PLAN_DEFAULT[kind]
    if (not isinstance(plan, tuple) or len(plan) != 2 or plan[0] not in (1, 2, 4)
            or not isinstance(plan[1], int) or not 1 <= plan[1] <= 8):
        raise ValueError(f"plan must be (rows of w in 1, 2, 4; rows of x in 1..8), got {plan!r}")
    return plan


# ------------------------------------------------------------------ the native library


def _cpuinfo_has_avx2_fma() -> bool | None:
    """From /proc/cpuinfo where there is one (also what the OS enabled); None elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx2" in flags and "fma" in flags
    except OSError:
        return None
    return None


def _declare(lib: Any) -> None:
    c = ctypes
    p, i64, i = c.c_void_p, c.c_int64, c.c_int
    lib.tp_gemm_abi.argtypes, lib.tp_gemm_abi.restype = [], i
    lib.tp_gemm_cpu_ok.argtypes, lib.tp_gemm_cpu_ok.restype = [], i
    lib.tp_gemm_f32.argtypes = [p, i64, i64, p, i64, p, p, i, i]
    lib.tp_gemm_f32.restype = i
    lib.tp_gemm_i8.argtypes = [p, i64, i64, p, p, i64, i64, p, p, i, i]
    lib.tp_gemm_i8.restype = i
    lib.tp_gemm_i4.argtypes = [p, i64, i64, p, i64, i64, i64, i64, p, p, i, i]
    lib.tp_gemm_i4.restype = i
    lib.tp_gemm_read_sum.argtypes, lib.tp_gemm_read_sum.restype = [p, i64, i], c.c_float
    lib.tp_gemm_set_pool.argtypes, lib.tp_gemm_set_pool.restype = [p], None


_lib_lock = threading.Lock()
_lib: list = []  # [CDLL or None] once tried
_why_not: list[str] = []
_LIB: Any = None  # the loaded library, read without the lock on every call


def _load() -> Any | None:
    global _LIB
    if _LIB is not None:
        return _LIB
    with _lib_lock:
        if _lib:
            return _lib[0]
        lib = None
        try:
            if os.environ.get(NO_NATIVE_ENV, "") not in ("", "0"):
                raise RuntimeError(f"disabled by {NO_NATIVE_ENV}")
            if platform.machine().lower() not in ("x86_64", "amd64"):
                raise RuntimeError(f"needs x86-64 with AVX2/FMA, this is {platform.machine()}")
            if _cpuinfo_has_avx2_fma() is False:
                raise RuntimeError("this CPU lacks AVX2 or FMA")
            so = compile_shared(_C_SOURCE, _FLAGS)
            lib = ctypes.CDLL(str(so))
            _declare(lib)
            if lib.tp_gemm_abi() != _ABI:
                raise RuntimeError(f"ABI {lib.tp_gemm_abi()} != {_ABI}")
            if not lib.tp_gemm_cpu_ok():
                raise RuntimeError("this CPU lacks AVX2 or FMA")
            lib.tp_gemm_set_pool(threads.run_pointer())  # None: every call on the calling thread
        except Exception as exc:  # any failure means: use torch
            log.info("cpu_gemm: native kernels unavailable (%s)", exc)
            _why_not.append(str(exc))
            lib = None
        _lib.append(lib)
        _LIB = lib
        return lib


def available() -> bool:
    """Whether the compiled kernels run on this machine (compiles them at the first call)."""
    return _load() is not None


def _need_lib() -> Any:
    lib = _LIB if _LIB is not None else _load()
    if lib is None:
        raise RuntimeError(f"cpu_gemm kernels unavailable here ({_why_not[0] if _why_not else 'unknown'}); "
                           "check available() and use torch")
    return lib


# ------------------------------------------------------------------ validation
#
# Every call checks its tensors (a bad pointer or shape in C is a segfault,
# not an exception). The checks are a fast path of cheap attribute reads
# (a call costs ~3 us over the kernel; small TP shards take ~10 us), and a
# slow path that only runs to say what is wrong.

_F32 = torch.float32


def _desc(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}"


def _dense(t: Any, dtype: torch.dtype, ndim: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype is dtype and t.is_cpu and t.ndim == ndim and t.is_contiguous()


def _rows(x: Any, k: int) -> int:
    """M, the rows of x float32 (M, k) contiguous with 1 <= M <= MAX_ROWS; ValueError otherwise."""
    if _dense(x, _F32, 2):
        m, kx = x.shape
        if kx == k and 0 < m <= MAX_ROWS:
            return m
        if kx != k:
            raise ValueError(f"x has {kx} columns, the weight has K = {k}")
        raise ValueError(f"x must have 1..{MAX_ROWS} rows, got {m} (use torch for larger M)")
    raise ValueError(f"x must be a contiguous 2-D float32 CPU tensor (M, K), got {_desc(x)}")


def _check_bias(bias: Any, n: int) -> None:
    if not (_dense(bias, _F32, 1) and bias.shape[0] == n):
        raise ValueError(f"bias must be a contiguous 1-D float32 CPU tensor of {n} elements, got {_desc(bias)}")


def _out(out: Any, m: int, n: int, spans: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, int]:
    """(y, its address): a new (m, n) float32 tensor, or ``out`` checked; spans:
    (address, bytes) of the inputs, which ``out`` must not overlap (the
    kernels write y while they still read them)."""
    if out is None:
        y = torch.empty(m, n, dtype=_F32)
        return y, y.data_ptr()
    if not (_dense(out, _F32, 2) and out.shape[0] == m and out.shape[1] == n):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape ({m}, {n}), got {_desc(out)}")
    lo = out.data_ptr()
    hi = lo + 4 * m * n
    for a, size in spans:
        if a < hi and lo < a + size:
            raise ValueError("out must not overlap x, the weight or the bias")
    return out, lo


def _rc(rc: int, what: str) -> None:
    if rc == -1:
        raise MemoryError(f"{what}: out of memory for the padded copy of x")
    if rc:
        raise RuntimeError(f"{what}: internal error {rc}")


# ------------------------------------------------------------------ float32


def linear_f32(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
    plan: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``x @ w.T + bias``: x float32 (M, K), 1 <= M <= 16; w float32 (N, K) used in place.

    Returns float32 (M, N), or fills ``out`` (contiguous float32 (M, N), not
    overlapping the inputs). ``plan``: (rows of w, rows of x) register
    blocking, for tuning only (rows of w in 1, 2, 4; rows of x in 1..8).
    """
    lib = _LIB if _LIB is not None else _need_lib()
    if not _dense(w, _F32, 2) or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"w must be a contiguous non-empty 2-D float32 CPU tensor (N, K), got {_desc(w)}")
    n, k = w.shape
    m = _rows(x, k)
    px, pw, pb = x.data_ptr(), w.data_ptr(), None
    if bias is not None:
        _check_bias(bias, n)
        pb = bias.data_ptr()
    y, py = _out(out, m, n, ((px, 4 * m * k), (pw, 4 * n * k), (pb or 0, 4 * n if pb else 0)))
    rr, mc = _plan("f32", _PLAN_F32, m, plan)
    _rc(lib.tp_gemm_f32(px, m, k, pw, n, pb, py, rr, mc), "linear_f32")
    return y


# ------------------------------------------------------------------ int8


def _round_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


class Int8Weight:
    """int8 weights (per-output-channel scale) prepared for :func:`linear_int8`.

    ``data``: int8 (N, Kp), the canonical q with K padded by zeros to Kp, a
    multiple of 8 (the same tensor, no copy, when K already is one);
    ``scale``: float32 (N,).
    """

    __slots__ = ("_n", "_k", "_kp", "_data", "_scale")

    def __init__(self, n: int, k: int, kp: int, data: torch.Tensor, scale: torch.Tensor):
        """From an already prepared layout (checked: the kernel trusts these sizes); see from_canonical."""
        if not (isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 1 and kp == _round_up(k, 8)):
            raise ValueError(f"Int8Weight: bad sizes n={n!r} k={k!r} kp={kp!r}")
        if not (_dense(data, torch.int8, 2) and tuple(data.shape) == (n, kp)):
            raise ValueError(f"Int8Weight: data must be contiguous int8 ({n}, {kp}) on the CPU, got {_desc(data)}")
        if not (_dense(scale, _F32, 1) and scale.shape[0] == n):
            raise ValueError(f"Int8Weight: scale must be contiguous float32 ({n},) on the CPU, got {_desc(scale)}")
        self._n, self._k, self._kp, self._data, self._scale = n, k, kp, data, scale

    n = property(lambda self: self._n, doc="output features N")
    k = property(lambda self: self._k, doc="input features K")
    kp = property(lambda self: self._kp, doc="K padded to a multiple of 8")
    data = property(lambda self: self._data, doc="int8 (N, Kp)")
    scale = property(lambda self: self._scale, doc="float32 (N,)")

    def clone(self) -> "Int8Weight":
        """A copy in new memory (benchmarks stream distinct copies)."""
        return Int8Weight(self._n, self._k, self._kp, self._data.clone(), self._scale.clone())

    @classmethod
    @torch.no_grad()
    def from_canonical(cls, q: torch.Tensor, scale: torch.Tensor) -> "Int8Weight":
        """From :func:`tp_engine.kernels.reference.quantize_int8`'s (q int8 (N, K), scale float32 (N,))."""
        if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2 or q.device.type != "cpu":
            raise ValueError(f"q must be a 2-D int8 CPU tensor (N, K), got "
                             f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}")
        n, k = q.shape
        if n < 1 or k < 1:
            raise ValueError(f"q must be non-empty, got {tuple(q.shape)}")
        if (not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (n,)
                or scale.device.type != "cpu"):
            raise ValueError(f"scale must be a float32 CPU tensor of shape ({n},), got "
                             f"{getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}")
        kp = _round_up(k, 8)
        data = q.contiguous() if kp == k else torch.nn.functional.pad(q, (0, kp - k))
        return cls(n, k, kp, data, scale.contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.data.numel() + 4 * self.scale.numel()

    def __repr__(self) -> str:
        return f"Int8Weight(shape=({self.n}, {self.k}))"


def linear_int8(
    x: torch.Tensor, prepared: Int8Weight, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
    plan: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``x @ (q * scale[:, None]).T + bias`` for x float32 (M, K), 1 <= M <= 16; float32 (M, N)."""
    lib = _LIB if _LIB is not None else _need_lib()
    if not isinstance(prepared, Int8Weight):
        raise ValueError(f"prepared must be an Int8Weight (Int8Weight.from_canonical), got {type(prepared).__name__}")
    n, k = prepared.n, prepared.k
    m = _rows(x, k)
    px, pb = x.data_ptr(), None
    if bias is not None:
        _check_bias(bias, n)
        pb = bias.data_ptr()
    y, py = _out(out, m, n, ((px, 4 * m * k), (pb or 0, 4 * n if pb else 0)))
    rr, mc = _plan("i8", _PLAN_I8, m, plan)
    _rc(lib.tp_gemm_i8(px, m, k, prepared.data.data_ptr(), prepared.scale.data_ptr(), n, prepared.kp, pb, py,
                       rr, mc), "linear_int8")
    return y


# ------------------------------------------------------------------ int4


class Int4Weight:
    """Group-wise asymmetric int4 weights prepared for :func:`linear_int4`.

    ``data``: uint8 (N, 8 * G + G * gp // 2), one record per output row:
    the row's G scales and G offsets as float32, then its nibbles. Each group
    of ``group_size`` inputs is padded to ``gp`` (a multiple of 16) with zero
    nibbles; per 16 inputs 8 bytes, byte i holding input i in its low nibble
    and input i + 8 in its high nibble (the canonical layout pairs inputs 2j
    and 2j + 1). One record per row keeps each row one sequential read.
    """

    __slots__ = ("_n", "_k", "_group_size", "_gp", "_data")

    def __init__(self, n: int, k: int, group_size: int, gp: int, data: torch.Tensor):
        """From an already prepared layout (checked: the kernel trusts these sizes); see from_canonical."""
        ok = (isinstance(n, int) and isinstance(k, int) and isinstance(group_size, int) and n >= 1 and k >= 1
              and group_size >= 2 and group_size % 2 == 0 and k % group_size == 0 and gp == _round_up(group_size, 16))
        if not ok:
            raise ValueError(f"Int4Weight: bad sizes n={n!r} k={k!r} group_size={group_size!r} gp={gp!r}")
        g = k // group_size
        if not (_dense(data, torch.uint8, 2) and tuple(data.shape) == (n, 8 * g + g * gp // 2)):
            raise ValueError(f"Int4Weight: data must be contiguous uint8 ({n}, {8 * g + g * gp // 2}) on the CPU, "
                             f"got {_desc(data)}")
        self._n, self._k, self._group_size, self._gp, self._data = n, k, group_size, gp, data

    n = property(lambda self: self._n, doc="output features N")
    k = property(lambda self: self._k, doc="input features K")
    group_size = property(lambda self: self._group_size, doc="inputs per (scale, offset) group")
    gp = property(lambda self: self._gp, doc="group_size rounded up to 16")
    data = property(lambda self: self._data, doc="uint8 row records (N, 8 * G + G * gp // 2)")

    def clone(self) -> "Int4Weight":
        """A copy in new memory (benchmarks stream distinct copies)."""
        return Int4Weight(self._n, self._k, self._group_size, self._gp, self._data.clone())

    @classmethod
    @torch.no_grad()
    def from_canonical(
        cls, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int
    ) -> "Int4Weight":
        """From :func:`tp_engine.kernels.reference.quantize_int4`'s layout.

        packed uint8 (N, K // 2), element 2j in the low nibble of byte j;
        scale, offset float32 (N, K // group_size); ``w = u * scale + offset``.
        """
        if (not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2
                or packed.device.type != "cpu"):
            raise ValueError(f"packed must be a 2-D uint8 CPU tensor (N, K // 2), got "
                             f"{getattr(packed, 'dtype', type(packed).__name__)} {tuple(getattr(packed, 'shape', ()))}")
        n, half = packed.shape
        k = 2 * half
        if n < 1 or k < 1:
            raise ValueError(f"packed must be non-empty, got {tuple(packed.shape)}")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
            raise ValueError(f"group_size must be an even integer >= 2, got {group_size!r}")
        if k % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {k}")
        g = k // group_size
        for t, what in ((scale, "scale"), (offset, "offset")):
            if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (n, g)
                    or t.device.type != "cpu"):
                raise ValueError(f"{what} must be a float32 CPU tensor of shape ({n}, {g}), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        gp = _round_up(group_size, 16)
        u = torch.zeros(n, g, gp, dtype=torch.uint8)
        u[:, :, :group_size] = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, g, group_size)
        u = u.reshape(n, g * gp // 16, 2, 8)  # (row, step, half, i)
        nibbles = (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(n, g * gp // 2)
        head = torch.cat([scale, offset], dim=1).contiguous().view(torch.uint8)  # (n, 8 g)
        data = torch.cat([head, nibbles], dim=1).contiguous()
        return cls(n, k, group_size, gp, data)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __repr__(self) -> str:
        return f"Int4Weight(shape=({self.n}, {self.k}), group_size={self.group_size})"


def linear_int4(
    x: torch.Tensor, prepared: Int4Weight, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
    plan: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``x @ (u * scale + offset).T + bias`` (per group) for x float32 (M, K), 1 <= M <= 16; float32 (M, N)."""
    lib = _LIB if _LIB is not None else _need_lib()
    if not isinstance(prepared, Int4Weight):
        raise ValueError(f"prepared must be an Int4Weight (Int4Weight.from_canonical), got {type(prepared).__name__}")
    n, k = prepared.n, prepared.k
    m = _rows(x, k)
    px, pb = x.data_ptr(), None
    if bias is not None:
        _check_bias(bias, n)
        pb = bias.data_ptr()
    y, py = _out(out, m, n, ((px, 4 * m * k), (pb or 0, 4 * n if pb else 0)))
    rr, mc = _plan("i4", _PLAN_I4, m, plan)
    _rc(lib.tp_gemm_i4(px, m, k, prepared.data.data_ptr(), n, k // prepared.group_size, prepared.group_size,
                       prepared.gp, pb, py, rr, mc), "linear_int4")
    return y
