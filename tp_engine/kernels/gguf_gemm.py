"""Matmuls on GGUF quantized blocks, kept quantized: x float32 @ W.T with W in ggml blocks.

A weight is a uint8 tensor ``blocks`` of shape (N, K // QK * QB): N output
rows, each row K // QK consecutive ggml blocks of QB bytes holding QK
weights (how a GGUF matrix lies in the file, so rows a..b are the
contiguous slice ``blocks[a:b]``). Formats (:data:`SUPPORTED`): Q4_0, Q4_1,
Q5_0, Q8_0 (32 weights a block) and Q4_K, Q5_K, Q6_K (256).

API:

* :func:`gguf_matmul` ``(x, blocks, qtype, k, out=None)``: x float32 (M, k)
  -> float32 (M, N) = ``x @ dequantize_rows(blocks, qtype, k).T``.
* :func:`dequantize_rows`: float32 (N, k), bitwise what
  ``gguf.quants.dequantize`` gives (the C code repeats its float32 steps).
* :func:`block_shape`, :func:`kernel_name` (what runs here: ``"avx512"``, ``"avx2"``,
  ``"neon"`` / ``"neon-dotprod"`` (AArch64), ``"portable"``, ``"torch"``
  where nothing compiles; for CUDA tensors
  ``"triton"``: :mod:`.triton_gguf` decodes the blocks inside the matmul, for
  its formats (Q8_0, Q4_K, Q6_K); ``"torch-dequant"`` otherwise: dequantize
  the whole weight on the GPU at every call, then torch's matmul, with a
  warning once).

CPU kernels (``gguf_gemm.c``, compiled at first use by
:func:`tp_engine.native.compile_shared`, cached): with AVX2 + FMA + F16C each
block is decoded once into registers and applied to up to 16 rows of x, the
weight rows read as a few sequential streams; where the CPU also has AVX-512
F/BW/VL/DQ/VNNI (asked at run time: a second library, ``kernel_name()`` says
``"avx512"``) Q4_K / Q5_K / Q6_K get 512-bit kernels (``gguf_avx512.h``:
int8 activations with VNNI, bitwise the AVX2 results; ``gguf_avx512_f32.h``:
float32 at M = 1, within float32 rounding), the other formats the AVX2
code; on AArch64 the NEON kernels
(``gguf_neon.h``, ``-DTP_GGUF_NEON``) do the same with 4-lane vectors, and
int8 activations' dot products with sdot where the CPU has the dot-product
extension (asked at run time; ``kernel_name()`` says ``"neon-dotprod"``);
otherwise a portable C build
(decode a block into an L1 buffer, dot it with the rows of x). All release
the GIL (ctypes) and split the N output rows over :mod:`.threads`' pool
(dequantize_rows too), bitwise the same for any thread count. For large M
(prefill) the call dequantizes a band of rows and hands it to torch's
matmul instead; see
:data:`DEQUANT_MIN_ROWS` for the measured switch.

``TP_ENGINE_GGUF_KERNEL=avx2`` (or ``portable``, ``torch``) forces a slower path, for
tests and comparisons; the ``kernel=`` argument does the same per call.
A forced or fallback path is logged as a warning once: never a silent slow path.

Activations (``activations=`` per call, or ``TP_ENGINE_GGUF_ACTIVATIONS``;
default :data:`DEFAULT_ACTIVATIONS`): ``"float32"`` keeps x as it is (the
result is within float32 rounding of the exact product); ``"int8"`` rounds
each row of x per block of 32 inputs (256 for the K-quants) to int8 with a
float scale dx = max|x| / 127, as llama.cpp does, and the AVX2 / NEON kernels then
take integer dot products per block (much less work per weight at M = 1).
Its result is the exact product with the rounded x, up to float32 rounding;
against the exact x @ W.T the error per block is at most dx / 2 * sum |w|.
int8 applies to the direct CPU kernels: at every M with the x86 kernels
(:data:`INT8_PREFILL_KERNELS`: there the int8 kernels beat dequantize + GEMM
even at M = 512), below :data:`DEQUANT_MIN_ROWS` elsewhere (NEON, not
measured; above it the float prefill path runs); CUDA keeps float32
activations. The portable and torch kernels compute the same rounded product
in float.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from ..native import compile_shared
from . import threads, triton_available

__all__ = [
    "DEQUANT_MIN_ROWS",
    "KERNEL_ENV",
    "SUPPORTED",
    "block_shape",
    "dequantize_rows",
    "dequantize_torch",
    "gguf_matmul",
    "kernel_name",
]

log = logging.getLogger(__name__)

# ggml type id -> (weights per block, bytes per block); the ids are gguf.GGMLQuantizationType's.
_BLOCKS: dict[int, tuple[int, int]] = {
    2: (32, 18),  # Q4_0: f16 d, 16 bytes of nibbles
    3: (32, 20),  # Q4_1: f16 d, f16 m, 16 bytes of nibbles
    6: (32, 22),  # Q5_0: f16 d, 4 bytes of fifth bits, 16 bytes of nibbles
    8: (32, 34),  # Q8_0: f16 d, 32 int8
    12: (256, 144),  # Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
    13: (256, 176),  # Q5_K: as Q4_K plus 32 bytes of fifth bits
    14: (256, 210),  # Q6_K: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, f16 d
}
_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
SUPPORTED: frozenset[int] = frozenset(_BLOCKS)

KERNEL_ENV = "TP_ENGINE_GGUF_KERNEL"  # "portable" or "torch": force that path (tests, comparisons)
_KERNELS = ("avx512", "avx2", "neon", "portable", "torch")
ACTIVATIONS_ENV = "TP_ENGINE_GGUF_ACTIVATIONS"  # "int8" or "float32": the default for every call
_ACTIVATIONS = ("float32", "int8")
# The default activations (see the module docstring). float32 until greedy
# parity with transformers under int8 is shown end to end: int8 is the fast
# decode path (benchmarks/gguf_gemm.py, 2026-12-02, busy VM, thread CPU time,
# M = 1, µs f32 / int8: Q4_K 1536x1536 231 / 138, 8960x1536 1893 / 864;
# Q6_K 151936x1536 29313 / 17562; faster at every M <= 16 for Q4_K / Q6_K),
# but its error is the rounding of x (dx / 2 * sum |w| per block), not float32's.
DEFAULT_ACTIVATIONS = "float32"
# Rows of W in flight (separate memory streams) for the int8 kernels, M = 1,
# 1 / 2 / 4 rows: Q4_K 1536x1536 5.5 / 7.3 / 8.9 GB/s; Q6_K 151936x1536
# 6.5 / 8.5 / 11.1 GB/s (same conditions).
INT8_ROWS = 4

# M from which dequantize-then-torch-matmul beats the direct kernels (which
# decode every block once per 16 rows of x). Measured 2026-12-02 on the
# development VM (Intel Xeon with AVX-512, AVX2 path, 1 thread, N = K = 1536,
# CPU time of a busy machine), direct / dequant + matmul in µs:
#   Q4_K  M=32 2842/3499  M=48 4448/4250  M=64 6101/4969  M=512 48771/24734
#   Q6_K  M=32 3864/5649  M=48 5810/6677  M=64 7427/6842  M=512 61730/27721
#   Q8_0  M=32 2925/3398  M=48 4622/4070  M=64 6087/4655
# (benchmarks/gguf_gemm.py --prefill repeats it.)
DEQUANT_MIN_ROWS = 48
# Kernels whose int8-activation mode keeps the direct int8 kernels for any M
# (groups of 16 rows of x per pass over W) instead of the float prefill path:
# measured 2026-12-08 (benchmarks/gguf_gemm.py --prefill-int8; this 2-core Zen4 VM,
# busy: load 7-8), 1 thread, wall ms, dequant + GEMM / int8 AVX-512 / int8 AVX2:
#   Q4_K 1536x1536  M=64 9.4/2.8/6.4    M=128 13.1/5.3/11.4   M=512 54.6/29.9/43.1
#   Q4_K 8960x1536  M=64 29.2/14.5/24.3 M=128 69.6/41.7/56.2  M=512 358/190/235
#   Q6_K 1536x8960  M=64 98/29/41       M=128 196/57/70       M=512 661/229/331
# (2 threads: the same order, by more.) Float activations keep dequant + GEMM
# for M >= DEQUANT_MIN_ROWS (its float32 sums are the exact mode's).
INT8_PREFILL_KERNELS = frozenset({"avx512", "avx2"})
_BAND_BYTES = 1 << 20  # float32 rows dequantized per band for that path (~L2 size)

# Register plans (rows of W, rows of x per kernel) per M (<= 16, per group of
# 16), chosen on the development VM (N = K = 1536, in cache, CPU time): M = 1
# (4, 1) 10.5 G weights/s for Q4_K vs 9.3 for (1, 1); M = 2 (4, 2); M = 3, 4
# (2, 4); from 5 (1, 8): 8 rows of x per decoded weight (M = 8 Q4_K: 29.5 vs
# 23.5 G weights/s for (2, 4)).
_PLANS = {1: (4, 1), 2: (4, 2), 3: (2, 4), 4: (2, 4)}
_PLAN_DEFAULT = (1, 8)


def block_shape(qtype: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of a supported ggml type."""
    return _BLOCKS[_check_qtype(qtype)]


def _check_qtype(qtype: Any) -> int:
    if isinstance(qtype, bool) or not isinstance(qtype, int) or int(qtype) not in _BLOCKS:
        names = ", ".join(f"{v} ({n})" for v, n in sorted(_NAMES.items()))
        raise ValueError(f"unsupported GGUF quantization type {qtype!r}; supported: {names}")
    return int(qtype)


# ------------------------------------------------------------------ the native libraries

_C_SOURCE = Path(__file__).with_name("gguf_gemm.c")
_ABI = 4
# -std=c11 keeps FMA contraction off in the scalar code (dequantize_rows must
# repeat gguf-py's float32 steps); the vector code states its FMAs.
_FLAGS = {
    "avx2": ["-O3", "-std=c11", "-mavx2", "-mfma", "-mf16c", "-DTP_GGUF_AVX2", "-fPIC", "-shared"],
    # the AVX2 code plus 512-bit kernels for Q4_K, Q5_K, Q6_K (gguf_avx512.h: int8,
    # VNNI vpdpwssd; gguf_avx512_f32.h: float32 dot mode); a separate library,
    # loaded only where the CPU has these. Measured 2026-12-08 (2-core Zen4 VM,
    # busy; the Q4_K_M file's tensors streamed from a 1 GiB ring, M = 1, 1 thread,
    # thread CPU µs, avx2 / avx512, float32 then int8): Q4_K 1536x1536 180 / 154,
    # 84 / 75; Q4_K 8960x1536 1062 / 894, 447 / 405; Q6_K 1536x8960 1537 / 1189,
    # 830 / 663 (benchmarks/gguf_gemm.py --kernels avx2,avx512 --gguf FILE)
    "avx512": ["-O3", "-std=c11", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mavx512vnni", "-DTP_GGUF_AVX2", "-DTP_GGUF_AVX512", "-fPIC", "-shared"],
    # AArch64: baseline ARMv8-A (any 64-bit Arm); the sdot kernels carry their
    # own target attribute and run where the CPU has the dot product
    "neon": ["-O3", "-std=c11", "-DTP_GGUF_NEON", "-fPIC", "-shared"],
    "portable": ["-O3", "-std=c11", "-fPIC", "-shared"],
}

_lock = threading.Lock()
_libs: dict[str, Any] = {}  # kernel -> CDLL or None once tried
_why_not: dict[str, str] = {}
_warned: set[str] = set()


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _build(kind: str) -> Any:
    if kind in ("avx2", "avx512"):
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise RuntimeError(f"needs x86-64, this is {platform.machine()}")
        flags = _cpu_flags()
        if flags is not None and not {"avx2", "fma", "f16c"} <= flags:
            raise RuntimeError("this CPU lacks AVX2, FMA or F16C")
        need = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
        if kind == "avx512" and flags is not None and not need <= flags:
            raise RuntimeError(f"this CPU lacks {', '.join(sorted(need - flags))}")
    if kind == "neon" and platform.machine().lower() not in ("aarch64", "arm64"):
        raise RuntimeError(f"needs AArch64, this is {platform.machine()}")
    lib = ctypes.CDLL(str(compile_shared(_C_SOURCE, _FLAGS[kind])))
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("tp_gguf_abi", "tp_gguf_is_avx2", "tp_gguf_cpu_ok"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [], i
    lib.tp_gguf_dequant.argtypes, lib.tp_gguf_dequant.restype = [i, p, i64, i64, p], i
    lib.tp_gguf_gemm.argtypes, lib.tp_gguf_gemm.restype = [i, p, i64, i64, p, i64, p, i, i], i
    lib.tp_gguf_gemm_i8.argtypes, lib.tp_gguf_gemm_i8.restype = [i, p, i64, i64, p, i64, p, i], i
    lib.tp_gguf_quantize_x.argtypes, lib.tp_gguf_quantize_x.restype = [i, p, i64, i64, p, p, p], i
    lib.tp_gguf_is_neon.argtypes, lib.tp_gguf_is_neon.restype = [], i
    lib.tp_gguf_set_pool.argtypes, lib.tp_gguf_set_pool.restype = [p], None
    if lib.tp_gguf_abi() != _ABI:
        raise RuntimeError(f"ABI {lib.tp_gguf_abi()} != {_ABI}")
    if lib.tp_gguf_is_avx2() != {"avx2": 1, "avx512": 2}.get(kind, 0) or not lib.tp_gguf_cpu_ok():
        raise RuntimeError("this CPU lacks AVX2 or FMA" + (" or AVX-512 F/BW/VL/DQ/VNNI" if kind == "avx512" else ""))
    if (lib.tp_gguf_is_neon() > 0) != (kind == "neon"):
        raise RuntimeError("not the NEON build")
    lib.tp_gguf_set_pool(threads.run_pointer())  # None: every call on the calling thread
    return lib


def _lib(kind: str) -> Any | None:
    """The compiled library of ``kind`` ("avx512" / "avx2" / "neon" / "portable"), or None where it cannot run here."""
    lib = _libs.get(kind, False)
    if lib is not False:
        return lib
    with _lock:
        if kind not in _libs:
            try:
                _libs[kind] = _build(kind)
            except Exception as exc:  # any failure (no cc, no AVX2, ...) means: the next path
                log.info("gguf_gemm: %s kernels unavailable (%s)", kind, exc)
                _why_not[kind] = str(exc)
                _libs[kind] = None
        return _libs[kind]


def _default_kernel() -> str:
    forced = os.environ.get(KERNEL_ENV, "").strip().lower()
    if forced:
        if forced not in _KERNELS:
            raise ValueError(f"{KERNEL_ENV}={forced!r}: expected one of {', '.join(_KERNELS)}")
        return forced
    for kind in ("avx512", "avx2", "neon", "portable"):
        if _lib(kind) is not None:
            return kind
    return "torch"


def kernel_name(device: str | torch.device = "cpu", qtype: int | None = None) -> str:
    """What :func:`gguf_matmul` runs for tensors on ``device``.

    CPU: ``"avx512"`` (the AVX2 kernels plus AVX-512 VNNI int8 kernels for
    Q4_K / Q5_K / Q6_K, where the CPU has AVX-512 F/BW/VL/DQ/VNNI), ``"avx2"`` (the fast kernels), ``"neon"`` / ``"neon-dotprod"``
    (AArch64; with the dot-product instructions for int8 activations;
    ``kernel="neon"`` forces either), ``"portable"`` (C without vector
    intrinsics: neither here, or forced), ``"torch"`` (no C compiler:
    dequantize with torch ops, then matmul). CUDA: ``"triton"`` where
    triton runs (for ``qtype`` if given: one of :mod:`.triton_gguf`'s
    formats), else ``"torch-dequant"``.
    """
    dev = torch.device(device)
    if dev.type != "cpu":
        return _device_kernel(qtype, dev.type, None, _triton_runs(dev.type))[0]
    kind = _default_kernel()
    if kind == "neon" and (lib := _lib("neon")) is not None and lib.tp_gguf_is_neon() == 2:
        return "neon-dotprod"
    return kind


@functools.lru_cache(maxsize=None)
def _triton_runs(device_type: str) -> bool:
    """Whether :mod:`.triton_gguf` runs on ``device_type`` here (cached: it is asked at every call)."""
    return device_type in ("cuda", "cpu") and triton_available(device_type)


def _triton_gguf() -> Any:
    """:mod:`.triton_gguf`, imported on first use: it imports triton, an optional dependency."""
    return importlib.import_module(f"{__package__}.triton_gguf")


def _device_kernel(qtype: int | None, device_type: str, kernel: str | None, triton_ok: bool) -> tuple[str, str]:
    """("triton" | "torch-dequant", why) for a weight of ``qtype`` (None: any) off the CPU, or ``kernel="triton"``.

    ``triton_ok``: whether Triton runs on ``device_type`` here. A forced
    ``kernel="triton"`` that cannot run raises; the torch-dequant fallback
    says why (the caller warns once).
    """
    if kernel not in (None, "triton", "torch"):
        raise ValueError(f"kernel={kernel!r} is a CPU kernel; tensors on {device_type} take None, 'triton' or 'torch'")
    if kernel == "torch":
        return "torch-dequant", "forced by kernel='torch'"
    if not triton_ok:
        if kernel == "triton":
            raise RuntimeError(f"kernel='triton' cannot run on {device_type} here: it needs triton and a CUDA device "
                               "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)")
        return "torch-dequant", f"no Triton kernels on {device_type} here"
    if kernel is None and qtype is not None and qtype not in _triton_gguf().FORMATS:
        return "torch-dequant", f"no Triton kernel for {_NAMES.get(qtype, qtype)}"
    return "triton", ""


def _warn_once(kind: str, why: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"gguf_gemm: running the {kind} path ({why}), slower than the AVX2 / NEON kernels",
                      RuntimeWarning, stacklevel=3)


def _resolve(kernel: str | None) -> tuple[str, Any]:
    kind = _default_kernel() if kernel is None else kernel
    if kind not in _KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(_KERNELS)}, got {kernel!r}")
    if kind == "torch":
        if kernel is None:
            _warn_once("torch", f"forced by {KERNEL_ENV}" if os.environ.get(KERNEL_ENV)
                       else f"no compiled kernels: {_why_not.get('portable', 'unknown')}")
        return kind, None
    lib = _lib(kind)
    if lib is None:
        raise RuntimeError(f"gguf_gemm: the {kind} kernels cannot run here ({_why_not.get(kind, 'unknown')})")
    if kind == "portable" and kernel is None:
        _warn_once("portable", f"forced by {KERNEL_ENV}" if os.environ.get(KERNEL_ENV)
                   else f"no AVX2 or NEON kernels: {_why_not.get('avx2', 'unknown')}; {_why_not.get('neon', 'unknown')}")
    return kind, lib


# ------------------------------------------------------------------ validation


def _desc(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}"


def _check_weight(blocks: Any, qtype: Any, k: Any) -> tuple[int, int, int]:
    """(qtype, N, QK) of a valid weight; ValueError naming the problem otherwise."""
    qt = _check_qtype(qtype)
    qk, qb = _BLOCKS[qt]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k % qk:
        raise ValueError(f"k = {k} is not a multiple of the {_NAMES[qt]} block size {qk}")
    if not (isinstance(blocks, torch.Tensor) and blocks.dtype == torch.uint8 and blocks.dim() == 2
            and blocks.is_contiguous() and blocks.shape[0] >= 1):
        raise ValueError(f"blocks must be a contiguous non-empty 2-D uint8 tensor (N, bytes per row), got {_desc(blocks)}")
    if blocks.shape[1] != k // qk * qb:
        raise ValueError(f"blocks have {blocks.shape[1]} bytes per row; {_NAMES[qt]} with k = {k} needs "
                         f"{k // qk} blocks of {qb} bytes = {k // qk * qb}")
    return qt, blocks.shape[0], qk


def _check_x(x: Any, k: int, device: torch.device, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> int:
    if not (isinstance(x, torch.Tensor) and x.dtype in dtypes and x.dim() == 2 and x.is_contiguous()
            and x.shape[0] >= 1):
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"x must be a contiguous non-empty 2-D {names} tensor (M, k), got {_desc(x)}")
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns, the weight has k = {k}")
    if x.device != device:
        raise ValueError(f"x is on {x.device}, the blocks on {device}")
    return x.shape[0]


def _check_out(out: Any, m: int, n: int, device: torch.device, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=torch.float32, device=device)
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (m, n)
            and out.is_contiguous() and out.device == device):
        raise ValueError(f"out must be a contiguous float32 tensor of shape ({m}, {n}) on {device}, got {_desc(out)}")
    lo, hi = out.data_ptr(), out.data_ptr() + 4 * m * n
    for t in inputs:  # the kernels write y while they still read the inputs
        a = t.data_ptr()
        if a < hi and lo < a + t.numel() * t.element_size():
            raise ValueError("out must not overlap x or the blocks")
    return out


# ------------------------------------------------------------------ the public functions


def dequantize_rows(blocks: torch.Tensor, qtype: int, k: int, *, kernel: str | None = None) -> torch.Tensor:
    """float32 (N, k): the weights of ``blocks`` (N rows of ggml blocks), as gguf.quants.dequantize gives them.

    CPU tensors go through the C decoder (bitwise gguf-py's float32 steps);
    CUDA tensors (or ``kernel="torch"``) through :func:`dequantize_torch`.
    """
    qt, n, _ = _check_weight(blocks, qtype, k)
    if blocks.device.type != "cpu":
        return dequantize_torch(blocks, qt, k)
    kind, lib = _resolve(kernel)
    if lib is None:
        return dequantize_torch(blocks, qt, k)
    y = torch.empty(n, k, dtype=torch.float32)
    _rc(lib.tp_gguf_dequant(qt, blocks.data_ptr(), n, k, y.data_ptr()), "dequantize_rows")
    return y


def _rc(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"gguf_gemm.{what}: internal error {rc}")


def activations_mode(activations: str | None = None) -> str:
    """``activations`` if given, else ``$TP_ENGINE_GGUF_ACTIVATIONS``, else :data:`DEFAULT_ACTIVATIONS`."""
    if activations is None:
        env = os.environ.get(ACTIVATIONS_ENV, "").strip().lower()
        if env and env not in _ACTIVATIONS:
            raise ValueError(f"{ACTIVATIONS_ENV}={env!r}: expected one of {', '.join(_ACTIVATIONS)}")
        return env or DEFAULT_ACTIVATIONS
    if activations not in _ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(_ACTIVATIONS)}, got {activations!r}")
    return activations


def quantize_activations(x: torch.Tensor, qtype: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 (M, K) rounded as the int8 kernels of ``qtype`` round it: (q int8 (M, K), dx float32 (M, K // QK)).

    Per block of QK inputs (QK of the format: 32, or 256 for K-quants):
    dx = max|x| / 127 and q = round-half-even(x * (127 / max|x|)), so x is
    taken as dx * q (|x - dx q| <= dx / 2 up to float32 rounding). A block
    with inf or NaN gets dx = NaN; an all-zero block dx = 0. torch ops, the
    same float32 steps as the C code (bitwise equal).
    """
    qt = _check_qtype(qtype)
    qk = _BLOCKS[qt][0]
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] % qk == 0):
        raise ValueError(f"x must be a 2-D float32 tensor with a multiple of {qk} columns, got {_desc(x)}")
    xb = x.reshape(x.shape[0], -1, qk)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(xb).all(dim=-1, keepdim=True)
    ok = (amax > 0) & ~bad
    iscale = torch.where(ok, 127.0 / torch.where(ok, amax, 1.0), 0.0)
    q = torch.round(torch.where(ok, xb, 0.0) * iscale).to(torch.int8)
    dx = torch.where(bad, float("nan"), amax / 127.0)
    return q.reshape(x.shape), dx.reshape(x.shape[0], -1)


def _dequantize_activations(q: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    m, nbx = dx.shape
    return (q.reshape(m, nbx, -1).to(torch.float32) * dx[:, :, None]).reshape(q.shape)


def gguf_matmul(
    x: torch.Tensor, blocks: torch.Tensor, qtype: int, k: int, out: torch.Tensor | None = None, *,
    kernel: str | None = None, activations: str | None = None,
) -> torch.Tensor:
    """float32 (M, N) = ``x @ dequantize_rows(blocks, qtype, k).T`` for x float32 (M, k) contiguous.

    ``out``: a preallocated contiguous float32 (M, N) result (not overlapping
    the inputs). ``kernel``: force "avx512" / "avx2" / "portable" / "torch" (tests and
    comparisons; default :func:`kernel_name`'s choice; "triton" runs
    :mod:`.triton_gguf`, on CPU tensors only under TRITON_INTERPRET=1, for tests). ``activations``:
    "float32" or "int8" (x rounded to int8 per block first; see the module
    docstring for what it changes; default :func:`activations_mode`). No autograd.
    """
    qt, n, _ = _check_weight(blocks, qtype, k)
    m = _check_x(x, k, blocks.device)
    y = _check_out(out, m, n, blocks.device, (x, blocks))
    int8_mode = activations_mode(activations) == "int8"
    int8 = int8_mode and m < DEQUANT_MIN_ROWS
    dev = blocks.device.type
    if dev != "cpu" or kernel == "triton":  # off the CPU (or forced): Triton, else dequantize + torch's matmul
        kind, why = _device_kernel(qt, dev, kernel, _triton_runs(dev))
        if kind == "triton":
            return _triton_gguf().gguf_matmul_triton(x, blocks, qt, k, out=y)
        if kernel is None and why not in _warned:
            _warned.add(why)
            warnings.warn(f"gguf_gemm: dequantizing the whole {_NAMES[qt]} weight at every call on {dev} ({why})",
                          RuntimeWarning, stacklevel=2)
        torch.matmul(x, dequantize_torch(blocks, qt, k).T, out=y)
        return y
    kind, lib = _resolve(kernel)
    int8 = int8 or (int8_mode and kind in INT8_PREFILL_KERNELS)
    if lib is None:
        xe = _dequantize_activations(*quantize_activations(x, qt)) if int8 else x
        torch.matmul(xe, dequantize_torch(blocks, qt, k).T, out=y)
        return y
    if int8:
        _rc(lib.tp_gguf_gemm_i8(qt, x.data_ptr(), m, k, blocks.data_ptr(), n, y.data_ptr(), INT8_ROWS),
            "gguf_matmul")
        return y
    if kind in ("avx512", "avx2", "neon") and m >= DEQUANT_MIN_ROWS:
        # prefill: decode each band of rows once and let torch's GEMM (which
        # blocks for caches) do the O(M N K) part
        band = max(1, _BAND_BYTES // (4 * k))
        w = torch.empty(min(band, n), k, dtype=torch.float32)
        for a in range(0, n, band):
            b = min(n, a + band)
            wb = w[: b - a]
            _rc(lib.tp_gguf_dequant(qt, blocks[a].data_ptr(), b - a, k, wb.data_ptr()), "gguf_matmul")
            if a == 0 and b == n:
                torch.matmul(x, wb.T, out=y)
            else:
                y[:, a:b] = x @ wb.T
        return y
    rr, mc = _PLANS.get(min(m, 16), _PLAN_DEFAULT)
    _rc(lib.tp_gguf_gemm(qt, x.data_ptr(), m, k, blocks.data_ptr(), n, y.data_ptr(), rr, mc), "gguf_matmul")
    return y


# ------------------------------------------------------------------ torch dequantizer (any device)


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of every block, as float32 (nb, 1)."""
    return b[:, at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., L) bytes -> (..., 2, L): low nibbles, then high."""
    return torch.stack([q & 0x0F, q >> 4], dim=-2)


def _kscales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K 12-byte scales -> 6-bit (scales, mins), each (nb, 8) float32."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 0x0F) | ((d >> 6) << 4)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=1)
    return sc.to(torch.float32), mn.to(torch.float32)


@torch.no_grad()
def dequantize_torch(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """float32 (N, k) with torch ops on the blocks' own device (the CUDA path and the no-compiler fallback).

    The same float32 steps as gguf-py (so bitwise equal on the CPU).
    """
    qt, n, qk = _check_weight(blocks, qtype, k)
    b = blocks.reshape(-1, _BLOCKS[qt][1])  # (nb, QB)
    nb = b.shape[0]
    if qt == 2:  # Q4_0
        q = _nibbles(b[:, 2:18]).reshape(nb, 32).to(torch.int16) - 8
        w = _f16(b, 0) * q.to(torch.float32)
    elif qt == 3:  # Q4_1
        w = _f16(b, 0) * _nibbles(b[:, 4:20]).reshape(nb, 32).to(torch.float32) + _f16(b, 2)
    elif qt == 6:  # Q5_0
        qh = b[:, 2:6].to(torch.int32)
        qh = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
        hb = (qh[:, None] >> torch.arange(32, device=b.device, dtype=torch.int32)) & 1
        q = _nibbles(b[:, 6:22]).reshape(nb, 32).to(torch.int32) | (hb << 4)
        w = _f16(b, 0) * (q - 16).to(torch.float32)
    elif qt == 8:  # Q8_0
        w = b[:, 2:34].contiguous().view(torch.int8).to(torch.float32) * _f16(b, 0)
    elif qt in (12, 13):  # Q4_K, Q5_K
        sc, mn = _kscales(b[:, 4:16])
        ds = (_f16(b, 0) * sc)[:, :, None]  # (nb, 8, 1)
        dm = (_f16(b, 2) * mn)[:, :, None]
        qs = b[:, 16:144] if qt == 12 else b[:, 48:176]
        q = _nibbles(qs.reshape(nb, 4, 32)).reshape(nb, 8, 32)  # sub-block 2c low, 2c + 1 high nibbles
        if qt == 13:
            bits = torch.arange(8, device=b.device, dtype=torch.uint8)[None, :, None]
            q = q | (((b[:, None, 16:48] >> bits) & 1) << 4)
        w = ds * q.to(torch.float32) - dm
    else:  # Q6_K
        ql = _nibbles(b[:, 0:128].reshape(nb, 2, 64)).reshape(nb, 2, 4, 32)  # [half][ql lo 0:32, 32:64, hi 0:32, 32:64]
        shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)[None, None, :, None]
        qh = (b[:, 128:192].reshape(nb, 2, 1, 32) >> shifts) & 3  # (nb, 2, 4, 32)
        q = (ql | (qh << 4)).to(torch.int16) - 32
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        ds = (_f16(b, 208) * sc).reshape(nb, 16, 1)
        w = ds * q.reshape(nb, 16, 16).to(torch.float32)
    return w.reshape(n, k)
