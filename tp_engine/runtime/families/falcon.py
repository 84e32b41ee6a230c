"""Falcon: fused query_key_value in three layouts, rotary, parallel or sequential blocks.

* ``new_decoder_architecture`` (40B/180B): per KV group [its Q heads | K | V]
  (``grouped``); ``ln_attn`` / ``ln_mlp`` (or one ``input_layernorm`` when
  ``num_ln_in_parallel_attn`` is 1); always a parallel block. HF broadcasts
  K/V to the Q heads before its cache; the runtime caches the KV heads only
  (the attention is the same).
* ``multi_query`` (7B): [all Q | K | V] with one KV head (``concat``),
  replicated on every rank.
* neither: per head [q | k | v] (``grouped``, groups of one).

``parallel_attn``: x + attn(ln(x)) + mlp(ln(x)) with one norm; otherwise
``input_layernorm`` before attention, ``post_attention_layernorm`` before
the MLP. ``alibi=True`` is refused.
"""
from __future__ import annotations

from torch import nn

from ..blocks import Attention
from ..build import BuildContext, Parts, RuntimeUnsupported, activation
from ..norms import norm_of
from ._shared import biased_layer, find_base, fused_qkv_heads, plain_mlp, rope_table, rotary_module


def build(model: nn.Module, ctx: BuildContext) -> Parts:
    config = model.config
    if getattr(config, "alibi", False):
        raise RuntimeUnsupported("falcon with alibi=True (ALiBi folded into the attention mask)")
    base = find_base(model, "transformer", "h", "Falcon")
    rope = rope_table(rotary_module(base, "transformer"), config, ctx)
    new_arch = bool(getattr(config, "new_decoder_architecture", False))
    multi_query = bool(getattr(config, "multi_query", False)) and not new_arch
    parallel = new_arch or bool(getattr(config, "parallel_attn", False))
    hd = config.hidden_size // config.num_attention_heads
    layers, kv_heads = [], []
    for layer in base.h:
        attn, mlp = layer.self_attention, layer.mlp
        qkv, dense = attn.query_key_value, attn.dense
        n_q, n_kv = fused_qkv_heads(qkv, dense, hd)
        attention = Attention(
            mm_qkv=ctx.matmul(qkv, bias=True),
            n_q=n_q,
            n_kv=n_kv,
            head_dim=hd,
            scaling=hd**-0.5,
            mm_o=ctx.matmul(dense),
            layout="concat" if multi_query else "grouped",
            rope=rope,
        )
        if new_arch and getattr(layer, "ln_attn", None) is not None:
            attn_norm, mlp_norm = norm_of(layer.ln_attn), norm_of(layer.ln_mlp)
        elif parallel:
            attn_norm, mlp_norm = norm_of(layer.input_layernorm), None  # the MLP reads the same normed input
        else:
            attn_norm, mlp_norm = norm_of(layer.input_layernorm), norm_of(layer.post_attention_layernorm)
        block = plain_mlp(ctx, mlp.dense_h_to_4h, activation(mlp, config), mlp.dense_4h_to_h)
        layers.append(biased_layer(ctx, attn_norm, attention, dense, block, mlp.dense_4h_to_h, mlp_norm=mlp_norm, parallel=parallel))
        kv_heads.append(n_kv)
    return Parts(layers=layers, final_norm=norm_of(base.ln_f), kv_heads=kv_heads, head_dim=hd, ropes=[rope])


BUILDERS = {"falcon": build}
