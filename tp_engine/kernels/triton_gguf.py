"""Triton matmuls on GGUF blocks kept quantized: y float32 (M, N) = x (M, K) @ W.T, W as raw ggml blocks.

The weight is the uint8 tensor of :mod:`.gguf_gemm` (N rows, each K // QK
consecutive ggml blocks of QB bytes, as they lie in the file). Implemented
(:data:`FORMATS`): Q8_0, Q4_K, Q6_K; other formats raise ValueError (the
caller, :func:`.gguf_gemm.gguf_matmul`, then dequantizes with torch and warns).

Importing this module imports triton. On CUDA the kernels compile; on CPU
they run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), which is how the tests check them.

Design, briefly:

* Each program owns a tile of BLOCK_N weight rows and BLOCK_M rows of x and
  walks K block by block: it reads each weight byte once per tile, decodes
  it in registers and never writes a dequantized matrix. Decode (M = 1..16)
  fits one M tile, so the weights are read once per call.
* Scales never multiply single weights. The integer codes (Q8_0 -128..127,
  Q4_K 0..15, Q6_K -32..31) are exact in fp16 / bf16 / fp32, so ``tl.dot``
  of x with the codes of a (sub-)block is exact per product and sums in
  float32; the block's scale then multiplies that partial sum, and Q4_K's
  minimum enters as ``dmin * m * sum(x)``. No weight is ever rounded to
  x's dtype (fp16 x is as accurate as float32 weights would be).
* ``tl.dot`` needs every side >= 16: a sub-block of Q8_0 / Q4_K is 32
  weights, Q6_K's scales cover 16, so its dots are 16 long.
* float32 x goes to the tensor cores as three exact bfloat16 pieces (see
  :func:`_dot`): float32 precision without TF32's lost bits or the FMA
  units' 16x padding cost at decode; fp16 / bf16 x go as they are.
* fp16 scales are assembled from their two bytes and bitcast, and the
  K-quant 6-bit scales are unpacked with shifts and masks, all inside the
  kernel (the same code compiles and interprets).

Tile sizes are untuned guesses (no GPU on the development machine);
``benchmarks/cuda_gguf.py`` measures them.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import gguf_gemm as G

__all__ = ["FORMATS", "gguf_matmul_triton"]

FORMATS: frozenset[int] = frozenset({8, 12, 14})  # ggml type ids: Q8_0, Q4_K, Q6_K
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------ helpers inside kernels


@triton.jit
def _f16(ptr, ok):
    """The little-endian float16 at ``ptr`` (a vector of byte pointers), as float32; 0 where not ``ok``."""
    lo = tl.load(ptr, mask=ok, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=ok, other=0).to(tl.uint16)
    return ((hi << 8) | lo).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _mma(a, q, acc, INTERPRET: tl.constexpr):
    if INTERPRET:
        # Triton 3.9's interpreter multiplies bf16 bit patterns in tl.dot;
        # fp16 / bf16 -> float32 is exact, and the GPU sums in float32 too.
        return tl.dot(a.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, q.to(a.dtype), acc)


@triton.jit
def _dot(x, q, INTERPRET: tl.constexpr):
    """float32 (BLOCK_M, BLOCK_N) = x @ q for integer codes q (|q| <= 128): exact products, float32 sums.

    float32 x is split into three bfloat16 pieces, x = hi + mid + lo exactly
    (8 significant bits each cover float32's 24), and each piece goes to the
    tensor cores with the codes (exact in bf16): float32's precision at bf16
    MMA speed. tl.dot's float32 "ieee" mode runs on the FMA units instead, 16
    times the work at decode (M padded to 16), and compiled to spilling
    255-register kernels for sm_90 here.
    """
    if x.dtype == tl.float32:
        hi = x.to(tl.bfloat16)
        r = x - hi.to(tl.float32)  # exact (Sterbenz), as is the next residual
        mid = r.to(tl.bfloat16)
        lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
        acc = _mma(hi, q, tl.zeros((x.shape[0], q.shape[1]), dtype=tl.float32), INTERPRET)
        acc = _mma(mid, q, acc, INTERPRET)
        return _mma(lo, q, acc, INTERPRET)
    return _mma(x, q, tl.zeros((x.shape[0], q.shape[1]), dtype=tl.float32), INTERPRET)


@triton.jit
def _x_tile(x_ptr, rm, m_ok, stride_xm, k0, WIDTH: tl.constexpr):
    """x[rm, k0 : k0 + WIDTH] as a (BLOCK_M, WIDTH) tile in x's dtype (0 in masked rows)."""
    rk = k0 + tl.arange(0, WIDTH)
    return tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None], other=0.0)


@triton.jit
def _kscale(sb, ok, J: tl.constexpr):
    """Q4_K sub-block J's 6-bit (scale, min) as float32 vectors; ``sb`` points at the 12 scale bytes.

    Bytes s[0:4] hold scales 0..3 (low 6 bits), s[4:8] mins 0..3; for
    J >= 4, s[J + 4] holds the low 4 bits of scale J and of min J, and the
    top 2 bits of s[J - 4] / s[J] their high bits.
    """
    if J < 4:
        sc = tl.load(sb + J, mask=ok, other=0) & 63
        mn = tl.load(sb + J + 4, mask=ok, other=0) & 63
    else:
        lo = tl.load(sb + J + 4, mask=ok, other=0)
        sc = (lo & 0x0F) | ((tl.load(sb + J - 4, mask=ok, other=0) >> 6) << 4)
        mn = (lo >> 4) | ((tl.load(sb + J, mask=ok, other=0) >> 6) << 4)
    return sc.to(tl.float32), mn.to(tl.float32)


# ------------------------------------------------------------------ kernels


@triton.jit
def _q8_0_block(x_ptr, row, rm, m_ok, n_ok, stride_xm, b, INTERPRET: tl.constexpr):
    """Block b of every row (34 bytes: fp16 d, then 32 int8 codes; w = d * q) times x: (BLOCK_M, BLOCK_N)."""
    r32 = tl.arange(0, 32)
    blk = row + b * 34
    d = _f16(blk, n_ok)
    q = tl.load(blk[None, :] + 2 + r32[:, None], mask=n_ok[None, :], other=0).to(tl.int8, bitcast=True)
    x = _x_tile(x_ptr, rm, m_ok, stride_xm, b * 32, 32)
    return _dot(x, q, INTERPRET) * d[None, :]


@triton.jit
def _q8_0_kernel(
    x_ptr, w_ptr, y_ptr,
    M, N, NB, BPS,
    stride_xm, stride_wn, stride_ym, stride_ys,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STEP: tl.constexpr,  # ggml blocks per loop step: more loads in flight per iteration
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b_lo = tl.program_id(2) * BPS  # split K: this program's blocks are b_lo .. b_hi - 1
    b_hi = tl.minimum(NB, b_lo + BPS)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    row = w_ptr + rn.to(tl.int64) * stride_wn  # (BLOCK_N,) byte pointers; int64: big matrices pass 2 GiB
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    full = b_hi - (b_hi - b_lo) % STEP
    for b0 in range(b_lo, full, STEP):
        for j in tl.static_range(STEP):
            acc += _q8_0_block(x_ptr, row, rm, m_ok, n_ok, stride_xm, b0 + j, INTERPRET)
    for b in range(full, b_hi):  # the blocks left over
        acc += _q8_0_block(x_ptr, row, rm, m_ok, n_ok, stride_xm, b, INTERPRET)
    y_at = y_ptr + tl.program_id(2) * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_at, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _q4_k_kernel(
    x_ptr, w_ptr, y_ptr,
    M, N, NB, BPS,
    stride_xm, stride_wn, stride_ym, stride_ys,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Super-block (144 bytes, 256 weights): fp16 d, fp16 dmin, 12 bytes of
    # 6-bit scales / mins, 128 bytes of nibbles. Byte chunk c (32 bytes)
    # holds sub-block 2c in its low nibbles and 2c + 1 in its high ones;
    # w = d * sc[j] * q - dmin * mn[j] in sub-block j.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b_lo = tl.program_id(2) * BPS  # split K: this program's blocks are b_lo .. b_hi - 1
    b_hi = tl.minimum(NB, b_lo + BPS)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    r32 = tl.arange(0, 32)
    row = w_ptr + rn.to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        blk = row + b * 144
        d = _f16(blk, n_ok)
        dmin = _f16(blk + 2, n_ok)
        for c in tl.static_range(4):
            qs = tl.load(blk[None, :] + 16 + 32 * c + r32[:, None], mask=n_ok[None, :], other=0)  # (32, BLOCK_N)
            for h in tl.static_range(2):
                if h == 0:
                    q = qs & 0x0F
                else:
                    q = qs >> 4
                sc, mn = _kscale(blk + 4, n_ok, 2 * c + h)
                x = _x_tile(x_ptr, rm, m_ok, stride_xm, b * 256 + (2 * c + h) * 32, 32)
                xsum = tl.sum(x.to(tl.float32), axis=1)
                acc += _dot(x, q, INTERPRET) * (d * sc)[None, :] - xsum[:, None] * (dmin * mn)[None, :]
    y_at = y_ptr + tl.program_id(2) * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_at, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _q6_k_kernel(
    x_ptr, w_ptr, y_ptr,
    M, N, NB, BPS,
    stride_xm, stride_wn, stride_ym, stride_ys,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Super-block (210 bytes, 256 weights): ql[0:128] low nibbles, qh[128:192]
    # high 2 bits, 16 int8 scales [192:208], fp16 d [208:210]. Half h
    # (128 weights) uses ql[64h : 64h + 64] and qh[32h : 32h + 32]; its group
    # g (32 weights, l = 0..31) is the low (g = 0, 1) or high (g = 2, 3)
    # nibbles of ql[64h + 32 (g % 2) + l], with bits 2g, 2g + 1 of qh[32h + l]
    # on top, minus 32. Each 16 weights have their own scale: weight
    # 128h + 32g + l uses scale 8h + 2g + l // 16.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b_lo = tl.program_id(2) * BPS  # split K: this program's blocks are b_lo .. b_hi - 1
    b_hi = tl.minimum(NB, b_lo + BPS)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    r16 = tl.arange(0, 16)
    row = w_ptr + rn.to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        blk = row + b * 210
        d = _f16(blk + 208, n_ok)
        for h in tl.static_range(2):
            for lh in tl.static_range(2):  # l = 16 lh .. 16 lh + 15
                at = blk[None, :] + 16 * lh + r16[:, None]  # (16, BLOCK_N)
                qla = tl.load(at + 64 * h, mask=n_ok[None, :], other=0)
                qlb = tl.load(at + 64 * h + 32, mask=n_ok[None, :], other=0)
                qh = tl.load(at + 128 + 32 * h, mask=n_ok[None, :], other=0)
                for g in tl.static_range(4):
                    if g == 0:
                        lo = qla & 0x0F
                    elif g == 1:
                        lo = qlb & 0x0F
                    elif g == 2:
                        lo = qla >> 4
                    else:
                        lo = qlb >> 4
                    q = (lo | (((qh >> (2 * g)) & 3) << 4)).to(tl.int16) - 32
                    s = tl.load(blk + 192 + 8 * h + 2 * g + lh, mask=n_ok, other=0).to(tl.int8, bitcast=True)
                    x = _x_tile(x_ptr, rm, m_ok, stride_xm, b * 256 + 128 * h + 32 * g + 16 * lh, 16)
                    acc += _dot(x, q, INTERPRET) * (d * s.to(tl.float32))[None, :]
    y_at = y_ptr + tl.program_id(2) * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_at, acc, mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------ launcher


def _tiles(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for M rows of x. Not timed (no GPU here); chosen so that no kernel spills.

    Decode (M <= 16) is a memory-bound GEMV: one 16-row tile (tl.dot's
    minimum; the padding costs no memory traffic) and narrow N tiles, so a
    1536-row matrix still makes 96 tiles for the SMs (split K adds more).
    Larger M keeps 16-row tiles: with the sub-blocks unrolled, 32- and 64-row
    tiles compiled (sm_90, Triton 3.9) to 255 registers and spilled 0.4-4 KB
    of stack per thread, while 16 x 64 tiles on 8 warps use <= 194 registers
    and no stack. The tiles of one N range re-read their weights, from L2
    (Qwen-1.5B's largest matrix is 7.7 MB as Q4_K; an H100/H200 L2 is 50 MB).
    """
    if m <= 16:
        return 16, 16, 4
    return 16, 64, 8


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(programs: int, nb: int, device: torch.device) -> int:
    """How many K slices (each summed by its own programs, then added) a call gets: 1 unless the tiles
    alone leave SMs idle. Decode of a tall-K matrix (Qwen-1.5B down_proj: N = 1536, K = 8960 ->
    96 tiles of 16 rows for 132 SMs) would otherwise read its weights with a fraction of the
    GPU. Aim at ~4 programs per SM, each at least 2 blocks long. Untuned (no GPU here)."""
    if device.type != "cuda":
        return 1
    want = -(-4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) // programs)
    return max(1, min(want, nb // 2))


def gguf_matmul_triton(
    x: torch.Tensor, blocks: torch.Tensor, qtype: int, k: int, out: torch.Tensor | None = None, *,
    split_k: int | None = None,
) -> torch.Tensor:
    """float32 (M, N) = ``x @ W.T``, W the (N, k) weights of ``blocks`` (Q8_0, Q4_K or Q6_K), decoded in the kernel.

    x: contiguous (M, k) float32, float16 or bfloat16 (float32 sums either
    way); ``out``: a preallocated contiguous float32 (M, N) not overlapping
    the inputs. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    ``split_k``: slices of K summed separately, then added in a fixed order
    (deterministic; default: by :func:`_split_k`, 1 on CPU).
    """
    qt, n, qk = G._check_weight(blocks, qtype, k)
    if qt not in FORMATS:
        have = ", ".join(G._NAMES[f] for f in sorted(FORMATS))
        raise ValueError(f"no Triton kernel for GGUF {G._NAMES[qt]}; implemented: {have}")
    m = G._check_x(x, k, blocks.device, _X_DTYPES)
    y = G._check_out(out, m, n, blocks.device, (x, blocks))
    if blocks.device.type == "cpu" and not _interpreting():
        raise ValueError("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)")
    nb = k // qk
    block_m, block_n, num_warps = _tiles(m)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if split_k is None:
        split_k = _split_k(tiles, nb, blocks.device)
    elif isinstance(split_k, bool) or not isinstance(split_k, int) or not 1 <= split_k <= nb:
        raise ValueError(f"split_k must be an int in 1..{nb} (the blocks per row), got {split_k!r}")
    bps = triton.cdiv(nb, split_k)
    split_k = triton.cdiv(nb, bps)  # no empty slices
    # Slices write float32 partial products side by side; torch adds them (a fixed order: deterministic).
    part = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=y.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    args = (x, blocks, part, m, n, nb, bps, x.stride(0), blocks.stride(0), n, m * n)
    meta = dict(INTERPRET=_interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    if qt == 8:
        _q8_0_kernel[grid](*args, STEP=4, **meta)
    elif qt == 12:
        _q4_k_kernel[grid](*args, **meta)
    else:
        _q6_k_kernel[grid](*args, **meta)
    if split_k > 1:
        torch.sum(part, dim=0, out=y)
    return y
