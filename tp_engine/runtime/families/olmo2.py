"""Olmo 2: norms after the blocks, and q/k norms over whole projections.

A layer has no pre-norms: ``x = x + post_attention_layernorm(attn(x))``,
then ``x = x + post_feedforward_layernorm(mlp(x))``, both norms applied to
the all-reduced block output. Every norm multiplies its weight in float32
before casting back (``RMSNormWeightFirst``). ``q_norm`` / ``k_norm``
normalize ``q_proj(x)`` / ``k_proj(x)`` over all heads before the head
reshape; sharded, each rank holds its heads' rows of them
(``layers.HeadShardedRMSNorm``) and the runtime all-reduces the per-token
sums of squares of q and k together, once per layer (``norms.SpanQKNorm``).
"""
from __future__ import annotations

import torch
from torch import nn

from ...layers import HeadShardedRMSNorm
from ..blocks import Layer
from ..build import BuildContext, Parts, RuntimeUnsupported
from ..matmul import module_bias
from ..norms import RMSNormWeightFirst, SpanQKNorm, norm_eps
from ._shared import find_base, gated_mlp, layer_head_dim, rope_table, rotary_module, separate_qkv_attention


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _norm(module: nn.Module) -> RMSNormWeightFirst:
    return RMSNormWeightFirst(module.weight, norm_eps(module))


def _qk_norm(attn: nn.Module, ctx: BuildContext, i: int) -> SpanQKNorm:
    """q_norm and k_norm as one callable: whole (unsharded, or attention kept whole) or head-sharded."""
    q_norm, k_norm = attn.q_norm, attn.k_norm
    sharded = [isinstance(m, HeadShardedRMSNorm) for m in (q_norm, k_norm)]
    if sharded[0] != sharded[1]:
        raise RuntimeUnsupported(f"layer {i}: only one of q_norm / k_norm is split with the heads")
    weights, eps = (q_norm.weight, k_norm.weight), (norm_eps(q_norm), norm_eps(k_norm))
    if not sharded[0]:
        return SpanQKNorm(weights, eps, (q_norm.weight.shape[0], k_norm.weight.shape[0]))
    if q_norm.cast_first or k_norm.cast_first:
        raise RuntimeUnsupported(f"layer {i}: q/k norms with Llama's cast order in an Olmo 2 model")
    return SpanQKNorm(weights, eps, (q_norm.width, k_norm.width), (q_norm.counted, k_norm.counted), ctx.reduce)


def build(model: nn.Module, ctx: BuildContext) -> Parts:
    config = model.config
    base = find_base(model, "model", "layers", "Olmo 2")
    table = rope_table(rotary_module(base, "model"), config, ctx)
    layers, kv_heads, head_dim = [], [], None
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        hd = head_dim = layer_head_dim(attn, head_dim)
        attention = separate_qkv_attention(ctx, attn, attn.o_proj, hd, float(attn.scaling), rope=table,
                                           qk_norm=_qk_norm(attn, ctx, i))
        layers.append(
            Layer(
                attn_norm=_identity,
                attention=attention,
                mlp=gated_mlp(ctx, mlp, config),
                mlp_norm=_identity,
                post_attn_norm=_norm(layer.post_attention_layernorm),
                post_mlp_norm=_norm(layer.post_feedforward_layernorm),
                attn_bias=module_bias(attn.o_proj),
                mlp_bias=module_bias(mlp.down_proj),
                reduce=ctx.reduce,
                attn_sharded=ctx.sharded(attn.o_proj),
                mlp_sharded=ctx.sharded(mlp.down_proj),
            )
        )
        kv_heads.append(attention.n_kv)
    return Parts(
        layers=layers,
        final_norm=_norm(base.norm),
        kv_heads=kv_heads,
        head_dim=head_dim,
        ropes=[table],
    )


BUILDERS = {"olmo2": build}
