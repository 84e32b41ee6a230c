"""Canonical quantized layouts, and torch reference implementations of every kernel.

These layouts are the interface between the quantizer and every backend
(Triton kernels, torch's packed CPU ops, the reference below). A weight
``W`` of shape (N, K) (N output channels, K input features, nn.Linear's
layout) is stored as:

int8, symmetric, per output channel
    ``q``      int8 (N, K), row-major, values in -127..127 (never -128, so
               the grid is symmetric and ``-q`` is representable);
    ``scale``  float32 (N,), ``absmax(W[n]) / 127`` (0 for an all-zero row);
    ``W_q[n, k] = q[n, k] * scale[n]``.

int4, asymmetric, per group of ``group_size`` consecutive inputs of a row
    ``packed`` uint8 (N, K // 2), row-major: byte ``j`` of row ``n`` holds
               element ``2j`` in its low nibble and ``2j + 1`` in its high
               nibble; nibble values ``u`` in 0..15;
    ``scale``  float32 (N, K // group_size), ``(max - min) / 15`` of the group;
    ``offset`` float32 (N, K // group_size), the group's min;
    ``W_q[n, k] = u[n, k] * scale[n, g] + offset[n, g]`` with
    ``g = k // group_size``. K must be even and a multiple of group_size.
    The min and the max of every group are on the grid (u = 0 and u = 15),
    and a constant group is exact (scale 0).

Fused RMSNorm (Llama's, with the decoder's residual add folded in)
    ``h = x + residual`` (in x's dtype, as HF adds them), the new residual;
    ``out = weight * (h32 * rsqrt(mean(h32 ** 2) + eps)).to(x.dtype)`` with
    ``h32 = h.float()``: HF LlamaRMSNorm's order of operations, statistics in
    float32, the product in ``promote(weight.dtype, x.dtype)``.

The matmul references compute in float32 and return x's dtype, the contract
the Triton kernels meet (they accumulate in float32 too). They are written in
the kernels' own factored form (per-channel scale applied after the sum;
int4 as ``scale * (x . u) + offset * sum(x)`` per group), so they document
the algorithm; the tests check them against a plain dequantize-then-matmul.
"""
from __future__ import annotations

import torch

__all__ = [
    "dequantize_int4",
    "dequantize_int8",
    "int4_matmul",
    "int8_matmul",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "rms_norm",
    "unpack_int4",
]


def _check_matrix(w: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (out_features, in_features) tensor, got {getattr(w, 'shape', type(w))}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point to be quantized, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} holds inf or nan values; they cannot be quantized")


# ------------------------------------------------------------------ int8


@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N,)): symmetric per-output-channel int8."""
    _check_matrix(w)
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=1) / 127.0
    # An all-zero row gets scale 0 and q 0; dividing by 1 there avoids 0/0.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w32 / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale[:, None]`` computed in float32, returned in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def int8_matmul(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (q * scale[:, None]).T + bias`` for x (..., K), in float32, returned in x's dtype.

    Factored like the kernel: the integer weights are summed against x and
    the per-channel scale multiplies the (M, N) result once.
    """
    acc = x.float() @ q.float().T
    acc = acc * scale.float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype)


# ------------------------------------------------------------------ int4


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in 0..15 -> uint8 (N, K // 2); element 2j low nibble, 2j+1 high."""
    if u.dim() != 2 or u.shape[1] % 2:
        raise ValueError(f"pack_int4 needs a 2-D tensor with an even number of columns, got {tuple(u.shape)}")
    u = u.to(torch.int16)  # wide enough for the shift, whatever integer type came in
    if bool(((u < 0) | (u > 15)).any()):
        raise ValueError("pack_int4: values must lie in 0..15")
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K // 2) -> uint8 (N, K) nibble values, the inverse of :func:`pack_int4`."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed int4 weights must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def _check_group(k: int, group_size: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {k}")


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 (N, K//2), scale, offset float32 (N, K//group_size)): asymmetric group-wise int4."""
    _check_matrix(w)
    n, k = w.shape
    _check_group(k, group_size)
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scale = (high - low) / 15.0
    # A constant group: scale 0, every u 0, offset holds the value exactly.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = torch.round((groups - low[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(u.reshape(n, k)), scale.contiguous(), low.contiguous()


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``u * scale + offset`` per group, computed in float32, returned in ``dtype``."""
    n = packed.shape[0]
    k = packed.shape[1] * 2
    _check_group(k, group_size)
    u = unpack_int4(packed).float().reshape(n, k // group_size, group_size)
    w = u * scale.float()[..., None] + offset.float()[..., None]
    return w.reshape(n, k).to(dtype)


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W_q.T + bias`` for x (..., K), in float32, returned in x's dtype.

    Factored like the kernel: per group g,
    ``sum_k x_k (u_k s_g + o_g) = s_g * (x_g . u_g) + o_g * sum(x_g)``, so the
    nibbles are multiplied as small integers and scale/offset touch each
    (token, channel, group) once instead of every weight.
    """
    n = packed.shape[0]
    k = packed.shape[1] * 2
    _check_group(k, group_size)
    g = k // group_size
    lead = x.shape[:-1]
    xg = x.float().reshape(-1, g, group_size)  # (M, G, gs)
    u = unpack_int4(packed).float().reshape(n, g, group_size)  # (N, G, gs)
    dots = torch.einsum("mgk,ngk->mng", xg, u)  # (M, N, G)
    acc = (dots * scale.float()).sum(-1) + xg.sum(-1) @ offset.float().T
    if bias is not None:
        acc = acc + bias.float()
    return acc.reshape(*lead, n).to(x.dtype)


# ------------------------------------------------------------------ RMSNorm


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed * weight, new residual) for x (..., H); HF LlamaRMSNorm's op order.

    With ``residual`` the input is ``x + residual`` (added in x's dtype, the
    way HF's decoder layer adds its branch output to the residual stream),
    and that sum is also returned as the next residual. Without it the
    returned residual is ``x`` itself.
    """
    h = x if residual is None else x + residual
    h32 = h.float()
    variance = h32.pow(2).mean(-1, keepdim=True)
    normed = (h32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed, h
