"""BLOOM: embedding LayerNorm, ALiBi, fused per-head [q | k | v], a plain MLP with BLOOM's gelu.

Checked against transformers 5.x ``modeling_bloom.py``: ``ln_emb(wte(ids))``,
then per block ``x += dense(attn(ln_in(x)))``, ``x += mlp(ln_post(x))``, and
``ln_f``. Scores are ``alibi + q.k / sqrt(head_dim)`` with the ALiBi bias
``slope_h * key_position`` (softmax is shift-invariant, so the absolute key
position is exact). Slopes come from transformers' own ``build_alibi_tensor``
for the global head count; a sharded rank takes its heads' slopes (the
range ``parallelize`` narrows the model's ALiBi tensor to).
``apply_residual_connection_post_layernorm=True`` (the residual is the
normed input) is refused, as is ``pretraining_tp > 1`` with
``slow_but_exact``.
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
    base = find_base(model, "transformer", "h", "BLOOM")
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        raise RuntimeUnsupported("bloom with apply_residual_connection_post_layernorm=True")
    if getattr(config, "slow_but_exact", False) and getattr(config, "pretraining_tp", 1) > 1:
        raise RuntimeUnsupported("bloom with slow_but_exact=True and pretraining_tp > 1")
    total_heads = int(config.n_head)
    all_slopes = _alibi_slopes(total_heads, ctx.device)
    emb_norm = norm_of(base.word_embeddings_layernorm)

    def embed_extra(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return emb_norm(x)

    layers, kv_heads, head_dim = [], [], None
    for i, block in enumerate(base.h):
        attn, mlp = block.self_attention, block.mlp
        hd = head_dim = layer_head_dim(attn, head_dim)
        n_q = equal_qkv_heads(out_rows(attn.query_key_value), hd, f"layer {i}: query_key_value")
        heads = _head_range(attn, n_q, total_heads)
        attention = Attention(
            mm_qkv=ctx.matmul(attn.query_key_value, bias=True),
            n_q=n_q,
            n_kv=n_q,
            head_dim=hd,
            scaling=float(attn.inv_norm_factor),
            mm_o=ctx.matmul(attn.dense),
            layout="grouped",  # per head [q_h | k_h | v_h]: groups of one Q head
            alibi=all_slopes[heads.start : heads.stop].contiguous(),
        )
        block_mlp = plain_mlp(ctx, mlp.dense_h_to_4h, activation(mlp, config, "gelu_impl"), mlp.dense_4h_to_h)
        layers.append(biased_layer(ctx, norm_of(block.input_layernorm), attention, attn.dense, block_mlp, mlp.dense_4h_to_h,
                                   mlp_norm=norm_of(block.post_attention_layernorm)))
        kv_heads.append(n_q)
    return Parts(layers=layers, final_norm=norm_of(base.ln_f), kv_heads=kv_heads, head_dim=head_dim, embed_extra=embed_extra)


def _alibi_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """(num_heads,) float32 slopes, exactly transformers' (the bias at key position 1)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)  # (heads, 1, 2)
    return alibi[:, 0, 1].contiguous().to(device)


def _head_range(attn: nn.Module, n_q: int, total: int) -> range:
    """This rank's global heads: the range ``parallelize``'s ALiBi pre-hook narrows to."""
    from ...parallelize import _NarrowAlibi

    for hook in attn._forward_pre_hooks.values():
        if isinstance(hook, _NarrowAlibi):
            heads = hook.heads
            if len(heads) != n_q or hook.total != total:
                raise RuntimeUnsupported(f"ALiBi head range {heads} disagrees with {n_q} local of {total} heads")
            return heads
    if n_q != total:
        raise RuntimeUnsupported(f"attention holds {n_q} of {total} heads but no ALiBi head range was found")
    return range(total)


BUILDERS = {"bloom": build}
