"""Rotary position embeddings: tables from the model's own rotary module, applied in place.

The cos/sin tables come from the model (its rotary module, or GPT-J's
``embed_positions`` buffer), so every static ``rope_type`` transformers
implements gives transformers' exact numbers. Two styles:

* ``half`` (Llama, GPT-NeoX, Phi-3, Falcon): rotate_half, i.e. the first and
  second half of the rotary dims are paired. Implemented as a flip of the two
  halves plus a sign folded into the sin table.
* ``interleaved`` (GPT-J): pairs of adjacent dims (rotate_every_two).

``rotary_dim`` < head_dim rotates only the first ``rotary_dim`` dims of each
head (partial rotary) and leaves the rest.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["RopeTable", "apply_rope"]


class RopeTable:
    """cos/sin rows for positions [0, length), grown on demand.

    ``source(positions) -> (cos, sin)``, each (len, rotary_dim) in the model
    dtype, in the ``half`` convention ([f0..fn, f0..fn]) or, for
    ``interleaved``, the repeat_interleave'd one ([f0, f0, f1, f1, ...]).
    """

    def __init__(self, source: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], style: str, device):
        if style not in ("half", "interleaved"):
            raise ValueError(f"unknown rotary style {style!r}")
        self.source, self.style, self.device = source, style, device
        self.length = 0
        self.cos = self.sin = None

    def ensure(self, length: int) -> None:
        if length <= self.length:
            return
        length = max(length, 2 * self.length)
        pos = torch.arange(length, device=self.device)
        cos, sin = self.source(pos)
        cos, sin = cos.contiguous(), sin.contiguous().clone()
        if self.style == "half":
            half = sin.shape[-1] // 2
            sin[:, :half].neg_()  # rotate_half(x) * sin == flip_halves(x) * [-sin1, sin2]
        else:
            sin[:, 0::2].neg_()  # rotate_every_two(x) * sin == swap_pairs(x) * [-s0, s0, -s1, s1, ...]
        self.cos, self.sin, self.length = cos, sin, length

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``positions`` (T,), shaped (T, 1, rotary_dim) to broadcast over heads."""
        return self.cos[positions, None], self.sin[positions, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x (T, heads, head_dim) with cos/sin (T, 1, rotary_dim); returns a new tensor."""
    rd = cos.shape[-1]
    hd = x.shape[-1]
    rot = x if rd == hd else x[..., :rd]
    shape = rot.shape
    if style == "half":
        swapped = rot.reshape(-1, 2, rd // 2).flip(1).view(shape)
    else:
        swapped = rot.reshape(-1, rd // 2, 2).flip(2).view(shape)
    out = rot * cos
    out.add_(swapped.mul_(sin))  # flip made a copy: safe to scale in place
    if rd == hd:
        return out
    return torch.cat([out, x[..., rd:]], dim=-1)
