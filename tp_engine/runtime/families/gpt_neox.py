"""GPT-NeoX / Pythia: fused query_key_value per head [q | k | v], partial rotary, LayerNorms.

The fused output is per head [q_h | k_h | v_h] (the ``grouped`` layout with
one Q head per group; a rank holds whole heads). Rotary acts on the first
``rotary_ndims`` dims of each head (the model's rotary module gives cos/sin
of that width). ``use_parallel_residual``: x + attn(ln1(x)) + mlp(ln2(x)),
one all-reduce per layer; otherwise the sequential Llama wiring.
"""
from __future__ import annotations

from torch import nn

from ..blocks import Attention
from ..build import BuildContext, Parts, activation
from ..norms import norm_of
from ._shared import biased_layer, find_base, out_rows, plain_mlp, rope_table, rotary_module


def build(model: nn.Module, ctx: BuildContext) -> Parts:
    config = model.config
    base = find_base(model, "gpt_neox", "layers", "GPT-NeoX")
    rope = rope_table(rotary_module(base, "gpt_neox"), config, ctx)
    hd = config.hidden_size // config.num_attention_heads
    parallel = bool(getattr(config, "use_parallel_residual", True))
    layers, kv_heads = [], []
    for layer in base.layers:
        attn, mlp = layer.attention, layer.mlp
        qkv, dense = attn.query_key_value, attn.dense
        n = out_rows(qkv) // (3 * hd)
        attention = Attention(
            mm_qkv=ctx.matmul(qkv, bias=True),
            n_q=n,
            n_kv=n,
            head_dim=hd,
            scaling=float(attn.scaling),
            mm_o=ctx.matmul(dense),
            layout="grouped",
            rope=rope,
        )
        block = plain_mlp(ctx, mlp.dense_h_to_4h, activation(mlp, config), mlp.dense_4h_to_h)
        layers.append(biased_layer(ctx, norm_of(layer.input_layernorm), attention, dense, block, mlp.dense_4h_to_h,
                                   mlp_norm=norm_of(layer.post_attention_layernorm), parallel=parallel))
        kv_heads.append(n)
    return Parts(layers=layers, final_norm=norm_of(base.final_layer_norm), kv_heads=kv_heads, head_dim=hd, ropes=[rope])


BUILDERS = {"gpt_neox": build}
