"""OPT: learned positions (offset 2), LayerNorm, separate q/k/v/out_proj, fc1/fc2 in the layer.

Checked against transformers 5.x ``modeling_opt.py``: the token embedding
(``word_embed_proj_dim`` wide) goes through ``project_in`` when present,
then the learned position embedding of ``position + 2`` is added. Pre-LN
layers (``do_layer_norm_before=True``): ``x += out_proj(attn(ln(x)))``,
``x += fc2(act(fc1(final_ln(x))))``, then the decoder's
``final_layer_norm`` (absent with ``_remove_final_layer_norm``) and
``project_out``. Post-LN layers (OPT-350m) norm the residual sum itself,
which the runtime's layer does not implement: refused. HF scales q (bias
included) before q.k; here the scale multiplies q.k (the same up to
rounding).
"""
from __future__ import annotations

import torch
from torch import nn

from ..build import BuildContext, Parts, RuntimeUnsupported, activation
from ..norms import norm_of
from ._shared import biased_layer, find_base, layer_head_dim, plain_mlp, separate_qkv_attention


def build(model: nn.Module, ctx: BuildContext) -> Parts:
    config = model.config
    decoder = find_base(model, "model.decoder", "layers", "OPT")
    if not getattr(config, "do_layer_norm_before", True):
        raise RuntimeUnsupported("opt with do_layer_norm_before=False (post-LayerNorm layers)")
    pos = decoder.embed_positions
    pos_w, offset = pos.weight.detach(), int(getattr(pos, "offset", 2))
    project_in = None if decoder.project_in is None else ctx.matmul(decoder.project_in)
    project_out = None if decoder.project_out is None else ctx.matmul(decoder.project_out)

    def embed_extra(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if project_in is not None:
            x = project_in(x)
        return x + pos_w[positions + offset]

    layers, kv_heads, head_dim = [], [], None
    for layer in decoder.layers:
        attn = layer.self_attn
        hd = head_dim = layer_head_dim(attn, head_dim)
        attention = separate_qkv_attention(ctx, attn, attn.out_proj, hd, float(attn.scaling))
        block = plain_mlp(ctx, layer.fc1, activation(layer, config, "activation_fn"), layer.fc2)
        layers.append(biased_layer(ctx, norm_of(layer.self_attn_layer_norm), attention, attn.out_proj, block, layer.fc2,
                                   mlp_norm=norm_of(layer.final_layer_norm)))
        kv_heads.append(attention.n_kv)
    final = decoder.final_layer_norm
    return Parts(
        layers=layers,
        final_norm=norm_of(final) if final is not None else _identity,
        kv_heads=kv_heads,
        head_dim=head_dim,
        embed_extra=embed_extra,
        final_extra=project_out,
        max_positions=pos_w.shape[0] - offset,
    )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


BUILDERS = {"opt": build}
