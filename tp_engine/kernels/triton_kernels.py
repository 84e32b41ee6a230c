"""Triton kernels for weight-only int8 / int4 matmuls and a fused residual + RMSNorm.

Layouts and exact semantics: :mod:`tp_engine.kernels.reference` (each
kernel here has a torch twin there, and the tests hold them equal).

Importing this module imports triton. On a machine without a GPU the kernels
still run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set
*before* this module is imported (``triton.jit`` reads it at decoration
time); that is how the tests check them on CPU.

Design, briefly:

* Weight-only matmuls are memory-bound at decode sizes: the win is reading
  1 (int8) or 0.5 (int4) bytes per weight instead of 2. The integer weights
  are converted to x's dtype in registers and fed to ``tl.dot`` with float32
  accumulation. int8 and the int4 nibbles (0..15) are exact in fp16/bf16, so
  the products are exact and only the accumulation rounds.
* Scales never multiply individual weights: int8's per-channel scale
  multiplies the (M, N) accumulator once at the end; int4's group scale and
  offset multiply per-group partial sums
  (``s * (x_g . u_g) + o * sum(x_g)``), so no dequantized weight is ever
  rounded to fp16/bf16 (more accurate than dequantize-then-matmul in half
  precision).
* int4: the nibbles of a byte are elements 2j and 2j+1, so instead of
  interleaving nibbles in registers, x is loaded as its even and odd columns
  and the low and high nibble tiles each get their own dot.
* float32 x uses ``input_precision="ieee"``: TF32 would silently drop 13 bits
  of x, which is not what a float32 caller asked for (so float32 runs on the
  FMA units; pass fp16/bf16 x for tensor cores).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["int4_matmul", "int8_matmul", "rms_norm"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Triton 3.9's CPU interpreter mishandles bfloat16 in two ways: tl.dot
# multiplies the raw uint16 bit patterns, and float32 -> bfloat16 casts
# truncate instead of rounding to nearest even (the GPU rounds). Under the
# interpreter, and only there (FIX_BF16), the kernels dot in float32 (exact:
# bf16 * int products fit float32's mantissa, and the GPU accumulates in
# float32 too) and round to bf16 by hand, so the tests see the GPU's numbers.


@triton.jit
def _round(v, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """float32 ``v`` -> ``dtype``, round to nearest even (NaN payloads are not preserved)."""
    if FIX_BF16 and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        v = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _dot(a, b, acc, FIX_BF16: tl.constexpr):
    if FIX_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        # "ieee": float32 stays float32 (TF32 would drop 13 bits of x).
        return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc)  # fp16/bf16: straight to the tensor cores


# ------------------------------------------------------------------ kernels


@triton.jit
def _int8_matmul_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_ym,
    HAS_BIAS: tl.constexpr,
    FIX_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # The weight tile is read as (BLOCK_K, BLOCK_N), i.e. already transposed.
        q = tl.load(q_ptr + rn[None, :] * stride_qn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
        acc = _dot(x, q, acc, FIX_BF16)
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, _round(acc, y_ptr.dtype.element_ty, FIX_BF16), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_matmul_kernel(
    x_ptr, p_ptr, s_ptr, o_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_pn, stride_sn, stride_ym,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FIX_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,  # bytes (= pairs of elements) per inner step
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_B)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for b0 in range(0, GROUP // 2, BLOCK_B):
            b_in = b0 + rb
            b_ok = b_in < GROUP // 2  # a group smaller than the block: mask the rest
            byte = g * (GROUP // 2) + b_in
            xmask = m_ok[:, None] & b_ok[None, :]
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * byte[None, :], mask=xmask, other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * byte[None, :] + 1, mask=xmask, other=0.0)
            packed = tl.load(p_ptr + rn[None, :] * stride_pn + byte[:, None], mask=n_ok[None, :] & b_ok[:, None], other=0)
            part = _dot(x_even, packed & 0x0F, part, FIX_BF16)
            part = _dot(x_odd, packed >> 4, part, FIX_BF16)
            xsum += tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)
        scale = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0)
        offset = tl.load(o_ptr + rn * stride_sn + g, mask=n_ok, other=0.0)
        acc += part * scale[None, :] + xsum[:, None] * offset[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, _round(acc, y_ptr.dtype.element_ty, FIX_BF16), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr,
    H, stride_x, stride_r, stride_y, stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    FIX_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
        # HF adds branch and residual in the model dtype: round the sum to it.
        x = _round(x.to(tl.float32) + r.to(tl.float32), x.dtype, FIX_BF16)
        tl.store(h_ptr + row * stride_h + cols, x, mask=ok)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / H
    normed = _round(h * tl.math.rsqrt(variance + eps), x.dtype, FIX_BF16)  # HF rounds to the input dtype first
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, _round(y, y_ptr.dtype.element_ty, FIX_BF16), mask=ok)


# ------------------------------------------------------------------ launchers


def _check_x(x: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be (..., {k}), got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weights are on {device}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_bias(bias: torch.Tensor | None, n: int, device: torch.device) -> None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.device != device):
        raise ValueError(f"bias must be ({n},) on {device}, got {tuple(bias.shape)} on {bias.device}")


def _fix_bf16(*tensors: torch.Tensor) -> bool:
    return _interpreting() and any(t.dtype == torch.bfloat16 for t in tensors)


def _blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for M rows of x. Untuned guesses (no GPU here):

    tl.dot needs every tile side >= 16, so decode (M = 1) pays a 16-row tile;
    that is free, the weights are the traffic. Small M is a memory-bound
    GEMV: narrow N tiles make more programs to fill the SMs (N=4096: 128),
    long K tiles keep more bytes in flight. Large M is a GEMM: square tiles.
    """
    if m <= 16:
        return 16, 32, 128
    return (32 if m <= 32 else 64), 64, 64


def int8_matmul(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (q * scale[:, None]).T + bias`` for x (..., K); result in x's dtype (float32 accumulation)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    if scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 ({n},), got {scale.dtype} {tuple(scale.shape)}")
    x2 = _check_x(x, k, q.device)
    _check_bias(bias, n, q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_matmul_kernel[grid](
        x2, q, scale.contiguous(), bias if bias is not None else scale, y,
        m, n, k,
        x2.stride(0), q.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        FIX_BF16=_fix_bf16(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.reshape(*x.shape[:-1], n)


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W_q.T + bias`` for group-wise int4 ``W_q``; result in x's dtype (float32 accumulation)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(f"group_size must be even and divide in_features {k}, got {group_size!r}")
    groups = (n, k // group_size)
    for name, t in (("scale", scale), ("offset", offset)):
        if tuple(t.shape) != groups or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 {groups}, got {t.dtype} {tuple(t.shape)}")
    x2 = _check_x(x, k, packed.device)
    _check_bias(bias, n, packed.device)
    packed = packed if packed.stride(-1) == 1 else packed.contiguous()
    scale, offset = scale.contiguous(), offset.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, _ = _blocks(m)
    block_b = max(16, min(64, triton.next_power_of_2(group_size // 2)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](
        x2, packed, scale, offset, bias if bias is not None else scale, y,
        m, n, k,
        x2.stride(0), packed.stride(0), scale.stride(0), y.stride(0),
        GROUP=group_size,
        HAS_BIAS=bias is not None,
        FIX_BF16=_fix_bf16(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_B=block_b,
    )
    return y.reshape(*x.shape[:-1], n)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed * weight, new residual) for x (..., H), fused in one pass; see the reference."""
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x and weight must be float16/bfloat16/float32, got {x.dtype} and {weight.dtype}")
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"weight must be ({h},), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(
            f"residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}, {residual.dtype}"
        )
    x2 = x.reshape(-1, h).contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, h), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, h).contiguous()
        new_res = torch.empty_like(x2)
    else:
        r2 = new_res = x2  # unused by the kernel
    _rms_norm_kernel[(rows,)](
        x2, r2, weight.contiguous(), y, new_res,
        h, x2.stride(0), r2.stride(0), y.stride(0), new_res.stride(0),
        float(eps),
        HAS_RESIDUAL=residual is not None,
        FIX_BF16=_fix_bf16(x, weight),
        BLOCK=triton.next_power_of_2(h),
    )
    out_res = new_res.reshape(x.shape) if residual is not None else x
    return y.reshape(*x.shape[:-1], h), out_res
