"""Layer norms with Hugging Face's exact op order, as plain callables.

Llama-style RMSNorm computes in float32 and multiplies the weight after
casting back (``w * normed.to(dtype)``); Gemma multiplies ``(1 + w)`` in
float32 before the cast; Olmo 2 multiplies ``w`` in float32 before the
cast (``RMSNormWeightFirst``). Getting the order right is what keeps 16-bit
models bit-close to transformers. ``SpanQKNorm`` normalizes q and k over all
heads of their projections (Olmo 2) on a rank's rows, with one all-reduce.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Norm = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["Norm", "RMSNorm", "RMSNormWeightFirst", "LayerNorm", "SpanQKNorm", "norm_eps", "norm_of"]


def norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(norm, name, None)
        if eps is not None:
            return float(eps)
    raise ValueError(f"{type(norm).__name__}: no epsilon attribute found")


class RMSNorm:
    """RMS norm over the last dimension; ``offset``: Gemma's ``(1 + w)`` in float32."""

    __slots__ = ("w", "eps", "offset", "shape")

    def __init__(self, weight: torch.Tensor, eps: float, offset: bool = False):
        w = weight.detach()
        self.w = (1.0 + w.float()) if offset else w
        self.eps, self.offset, self.shape = float(eps), offset, (w.shape[-1],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if not self.offset and self.w.dim() == 1:
                return F.rms_norm(x, self.shape, self.w, self.eps)
            r = x.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
            return (x * r).mul_(self.w)
        xf = x.float()
        r = xf.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        if self.offset:
            return (xf * r).mul_(self.w).to(x.dtype)
        return self.w * (xf * r).to(x.dtype)


class RMSNormWeightFirst:
    """RMS norm with the weight multiplied in float32 before the cast: ``(w * normed).to(dtype)`` (Olmo 2)."""

    __slots__ = ("w", "eps", "shape")

    def __init__(self, weight: torch.Tensor, eps: float):
        self.w = weight.detach()
        self.eps, self.shape = float(eps), (self.w.shape[-1],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.w.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.w, self.eps)
        xf = x.float()
        r = xf.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return (xf * r).mul_(self.w).to(x.dtype)


Ranges = tuple[tuple[int, int], ...]


class SpanQKNorm:
    """q and k RMS norms over all heads of their projections (Olmo 2), on this rank's rows.

    Called on flat rows, q (T, local Q width) and k (T, local KV width); returns
    both normed. The per-token sums of squares of q and k go through ONE
    all-reduce of a (T, 2) float32 tensor (``reduce``; None when the rows are
    whole), then each is divided by its full width (``widths``: Q, KV).
    ``counted``: the local row ranges of q and of k that enter the sums (None:
    all); a KV head held by several ranks counts on one of them only.
    ``cast_first``: Llama's cast order (``w * normed.to(dtype)``); default
    Olmo 2's, the weight multiplied in float32.
    """

    __slots__ = ("w", "eps", "widths", "counted", "reduce", "cast_first")

    def __init__(
        self,
        weights: tuple[torch.Tensor, torch.Tensor],
        eps: tuple[float, float],
        widths: tuple[int, int],
        counted: tuple[Ranges | None, Ranges | None] = (None, None),
        reduce: Callable[[torch.Tensor], object] | None = None,
        cast_first: bool = False,
    ):
        self.w = tuple(w.detach() for w in weights)
        self.eps = tuple(float(e) for e in eps)
        self.widths = tuple(int(n) for n in widths)
        self.counted, self.reduce, self.cast_first = counted, reduce, cast_first

    @staticmethod
    def _sum_squares(xf: torch.Tensor, counted: Ranges | None) -> torch.Tensor:
        sq = xf.pow(2)
        if counted is None:
            return sq.sum(-1, keepdim=True)
        total = xf.new_zeros(xf.shape[0], 1)
        for a, b in counted:
            total += sq[:, a:b].sum(-1, keepdim=True)
        return total

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qf, kf = q.float(), k.float()
        sums = torch.cat([self._sum_squares(qf, self.counted[0]), self._sum_squares(kf, self.counted[1])], dim=-1)
        if self.reduce is not None:
            self.reduce(sums)
        out = []
        for i, (xf, x) in enumerate(((qf, q), (kf, k))):
            r = (sums[:, i : i + 1] / self.widths[i]).add_(self.eps[i]).rsqrt_()
            y = xf * r
            out.append(self.w[i] * y.to(x.dtype) if self.cast_first else y.mul_(self.w[i]).to(x.dtype))
        return out[0], out[1]


class LayerNorm:
    """``F.layer_norm`` with the module's weight, bias and eps."""

    __slots__ = ("w", "b", "eps", "shape")

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, width: int):
        self.w = None if weight is None else weight.detach()
        self.b = None if bias is None else bias.detach()
        self.eps, self.shape = float(eps), (int(width),)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.shape, self.w, self.b, self.eps)


def norm_of(module: nn.Module, offset: bool = False) -> Norm:
    """The runtime norm for an HF norm module (nn.LayerNorm, or any RMSNorm with ``weight``)."""
    if isinstance(module, nn.LayerNorm):
        return LayerNorm(module.weight, module.bias, module.eps, module.normalized_shape[-1])
    return RMSNorm(module.weight, norm_eps(module), offset)
