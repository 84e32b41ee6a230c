"""GPT-2: learned positions, LayerNorm, one fused [Q | K | V] Conv1D, a plain MLP.

Checked against transformers 5.x ``modeling_gpt2.py``: ``wte + wpe(pos)``,
then per block ``x += c_proj(attn(ln_1(x)))``, ``x += mlp(ln_2(x))``, and
``ln_f``. ``c_attn`` output splits at ``split_size`` into q, k, v (the
``concat`` layout; after ``parallelize`` each rank holds its heads' columns
of each). The attention scale is the module's own ``scaling`` (which folds
``scale_attn_weights`` and ``scale_attn_by_inverse_layer_idx``).
Cross-attention only runs with encoder states, which a causal LM never gets.
"""
from __future__ import annotations

import torch
from torch import nn

from ..blocks import Attention
from ..build import BuildContext, Parts, RuntimeUnsupported, activation
from ..norms import norm_of
from ._shared import biased_layer, equal_qkv_heads, find_base, layer_head_dim, out_rows, plain_mlp


def build(model: nn.Module, ctx: BuildContext) -> Parts:
    config = model.config
    base = find_base(model, "transformer", "h", "GPT-2")
    if getattr(config, "reorder_and_upcast_attn", False) and ctx.dtype != torch.float32:
        # Eager attention then computes q.k in float32; in float32 it is the same math.
        raise RuntimeUnsupported("gpt2 reorder_and_upcast_attn=True with 16-bit weights")
    wpe = base.wpe.weight.detach()

    def embed_extra(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + wpe[positions]

    layers, kv_heads, head_dim = [], [], None
    for block in base.h:
        attn, mlp = block.attn, block.mlp
        hd = head_dim = layer_head_dim(attn, head_dim)
        n_q = equal_qkv_heads(out_rows(attn.c_attn), hd, "c_attn")
        attention = Attention(
            mm_qkv=ctx.matmul(attn.c_attn, bias=True),
            n_q=n_q,
            n_kv=n_q,
            head_dim=hd,
            scaling=float(attn.scaling),
            mm_o=ctx.matmul(attn.c_proj),
            layout="concat",
        )
        block_mlp = plain_mlp(ctx, mlp.c_fc, activation(mlp, config, "act"), mlp.c_proj)
        layers.append(biased_layer(ctx, norm_of(block.ln_1), attention, attn.c_proj, block_mlp, mlp.c_proj,
                                   mlp_norm=norm_of(block.ln_2)))
        kv_heads.append(n_q)
    return Parts(layers=layers, final_norm=norm_of(base.ln_f), kv_heads=kv_heads, head_dim=head_dim, embed_extra=embed_extra,
                 max_positions=wpe.shape[0])


BUILDERS = {"gpt2": build}
