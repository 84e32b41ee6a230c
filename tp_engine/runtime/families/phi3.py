"""Phi-3: fused qkv_proj [Q | K | V] (grouped-query), fused gate_up_proj [gate | up], RMSNorm.

A rank's qkv_proj rows are its Q heads then its K and V heads (``concat``);
its gate_up_proj rows are its gate columns then the same up columns, which
is GatedMLP's [gate | up]. Partial rotary (``partial_rotary_factor``) comes
with the model's rotary table; ``longrope`` (its cos/sin depend on the
sequence length) is refused.
"""
from __future__ import annotations

from torch import nn

from ..blocks import Attention, GatedMLP
from ..build import BuildContext, Parts, activation
from ..norms import norm_of
from ._shared import biased_layer, find_base, fused_qkv_heads, layer_head_dim, rope_table, rotary_module


def build(model: nn.Module, ctx: BuildContext) -> Parts:
    config = model.config
    base = find_base(model, "model", "layers", "Phi-3")
    rope = rope_table(rotary_module(base, "model"), config, ctx)
    window = getattr(config, "sliding_window", None)
    layers, kv_heads, head_dim = [], [], None
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        hd = head_dim = layer_head_dim(attn, head_dim)
        qkv, o = attn.qkv_proj, attn.o_proj
        n_q, n_kv = fused_qkv_heads(qkv, o, hd)
        attention = Attention(
            mm_qkv=ctx.matmul(qkv, bias=True),
            n_q=n_q,
            n_kv=n_kv,
            head_dim=hd,
            scaling=float(attn.scaling),
            mm_o=ctx.matmul(o),
            layout="concat",
            rope=rope,
            window=int(window) if window else None,
        )
        block = GatedMLP(ctx.matmul(mlp.gate_up_proj, bias=True), activation(mlp, config), ctx.matmul(mlp.down_proj))
        layers.append(biased_layer(ctx, norm_of(layer.input_layernorm), attention, o, block, mlp.down_proj,
                                   mlp_norm=norm_of(layer.post_attention_layernorm)))
        kv_heads.append(n_kv)
    return Parts(layers=layers, final_norm=norm_of(base.norm), kv_heads=kv_heads, head_dim=head_dim, ropes=[rope])


BUILDERS = {"phi3": build}
