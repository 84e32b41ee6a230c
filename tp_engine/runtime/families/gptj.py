"""GPT-J: parallel attention and MLP from one LayerNorm, interleaved partial rotary, one all-reduce.

Checked against transformers 5.x ``modeling_gptj.py``: per block
``x + out_proj(attn(ln_1(x))) + fc_out(act(fc_in(ln_1(x))))``, then ``ln_f``
and an LM head with a bias. q/k/v/out_proj have no bias. Rotary embedding
rotates the first ``rotary_dim`` dims of each head in pairs of adjacent dims
(rotate_every_two) with the ``embed_positions`` buffer ([sin | cos] per
position), repeat-interleaved as HF does. The buffer is each attention
module's in transformers 5.23 and the model's ``rotary_emb`` module's
from 5.25 (same formula, same values): both are read. The attention scale is
``1 / sqrt(head_dim)`` (``scale_attn`` divides in 5.23, ``scaling``
multiplies from 5.25); as in HF's eager attention, 16-bit models compute the
scores from float32 q and k.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..build import BuildContext, Parts, RuntimeUnsupported, activation
from ..norms import norm_of
from ._shared import biased_layer, find_base, plain_mlp, separate_qkv_attention


def build(model: nn.Module, ctx: BuildContext) -> Parts:
    config = model.config
    base = find_base(model, "transformer", "h", "GPT-J")
    first = base.h[0].attn
    hd = int(first.head_dim)
    rd = getattr(first, "rotary_dim", None)
    if rd is None:
        # HF then builds embed_dim-wide tables that only broadcast for a single head.
        raise RuntimeUnsupported("gptj with rotary_dim=None")
    rd = int(rd)
    if rd % 2 or not 0 < rd <= hd:
        raise RuntimeUnsupported(f"gptj rotary_dim {rd} with head_dim {hd}")
    table = _position_table(base, first)

    def source(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(pos.max()) + 1 if pos.numel() else 0
        t = table
        if n > t.shape[0]:  # beyond max_positions: the same formula HF builds the buffer with
            t = _sinusoids(n, t.shape[-1]).to(device=t.device, dtype=t.dtype)
        sincos = t.to(pos.device)[pos].to(ctx.dtype)
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)

    rope = ctx.rope_from(source, "interleaved")

    layers, kv_heads = [], []
    for i, block in enumerate(base.h):
        attn, mlp = block.attn, block.mlp
        if int(attn.head_dim) != hd or int(attn.rotary_dim) != rd:
            raise RuntimeUnsupported(f"layer {i}: head_dim or rotary_dim differs from layer 0")
        scaling = _scaling(attn, hd)
        attention = separate_qkv_attention(
            ctx,
            attn,
            attn.out_proj,
            hd,
            scaling,
            rope=rope,
            upcast=ctx.dtype != torch.float32,  # HF's eager attention: q.k in float32
        )
        block_mlp = plain_mlp(ctx, mlp.fc_in, activation(mlp, config, "act"), mlp.fc_out)
        # One LayerNorm feeds both the attention and the MLP (no mlp_norm).
        layers.append(biased_layer(ctx, norm_of(block.ln_1), attention, attn.out_proj, block_mlp, mlp.fc_out, parallel=True))
        kv_heads.append(attention.n_kv)
    return Parts(layers=layers, final_norm=norm_of(base.ln_f), kv_heads=kv_heads, head_dim=hd, ropes=[rope])


def _position_table(base: nn.Module, attn: nn.Module) -> torch.Tensor:
    """The [sin | cos] per position buffer: on the attention module (transformers 5.23) or on the
    model's shared ``rotary_emb`` (5.25 moved it there with the attention refactor)."""
    for owner in (attn, getattr(base, "rotary_emb", None)):
        table = getattr(owner, "embed_positions", None) if owner is not None else None
        if isinstance(table, torch.Tensor):
            return table
    raise RuntimeUnsupported("gptj: no embed_positions buffer on the attention or on transformer.rotary_emb "
                             "(a transformers version whose GPT-J layout tp-engine does not know)")


def _scaling(attn: nn.Module, head_dim: int) -> float:
    """The factor q.k is multiplied by: 1 / ``scale_attn`` (5.23), ``scaling`` (5.25), else 1/sqrt(head_dim)."""
    if hasattr(attn, "scale_attn"):
        return 1.0 / float(attn.scale_attn)
    if hasattr(attn, "scaling"):
        return float(attn.scaling)
    return 1.0 / math.sqrt(head_dim)


def _sinusoids(num_pos: int, dim: int) -> torch.Tensor:
    """transformers' ``create_sinusoidal_positions``: [sin | cos] per position, float32."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))
    angles = torch.arange(num_pos, dtype=torch.int64).float()[:, None] * inv_freq
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)


BUILDERS = {"gptj": build}
