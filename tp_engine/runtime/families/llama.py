"""The Llama layout: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text.

Separate q/k/v/o projections (fused here into one q/k/v matmul), a gated
MLP, RMSNorm (Gemma: ``1 + w``, and sandwich norms around attention and MLP
in Gemma 2/3), q/k norms per head (Qwen3, Gemma 3), sliding windows (per
layer where the layer types say so), attention and final logit soft-capping
(Gemma 2), per-layer-type rotary tables (Gemma 3).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..blocks import Layer
from ..build import BuildContext, Parts, RuntimeUnsupported
from ..matmul import module_bias
from ..norms import norm_of
from ._shared import find_base, gated_mlp, layer_head_dim, rope_table, rotary_module, separate_qkv_attention

GEMMA = ("gemma", "gemma2", "gemma3_text")
MlpBlock = Callable[[int, nn.Module, BuildContext], tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor | None]]


def build(model: nn.Module, ctx: BuildContext, mlp_block: MlpBlock | None = None) -> Parts:
    """``mlp_block(layer_index, mlp_module, ctx) -> (block, replicated bias or None)`` replaces
    the gated MLP (the MoE families)."""
    config = model.config
    base = find_base(model, "model", "layers", "Llama")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise RuntimeUnsupported("pretraining_tp > 1")
    gemma = config.model_type in GEMMA
    rotary = rotary_module(base, "model")
    # Gemma 3's rotary module holds one table per layer type (its rope_type is a dict).
    per_type = isinstance(getattr(rotary, "rope_type", None), dict)
    layer_types = list(getattr(config, "layer_types", None) or [None] * len(base.layers))
    tables = {lt: rope_table(rotary, config, ctx, lt) for lt in (sorted(set(layer_types), key=str) if per_type else [None])}

    layers, kv_heads, head_dim = [], [], None
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        hd = head_dim = layer_head_dim(attn, head_dim)
        o = attn.o_proj
        q_norm = k_norm = None
        if getattr(attn, "q_norm", None) is not None:
            q_norm, k_norm = norm_of(attn.q_norm, gemma), norm_of(attn.k_norm, gemma)
        window = getattr(attn, "sliding_window", None)
        if config.model_type in ("mistral", "mixtral"):  # the window is read from the config
            window = getattr(config, "sliding_window", None)
        # Gemma 2's score soft-capping; Gemma 3 has the field too, set to None.
        softcap = getattr(config, "attn_logit_softcapping", None)
        attention = separate_qkv_attention(
            ctx,
            attn,
            o,
            hd,
            float(attn.scaling),
            q_norm=q_norm,
            k_norm=k_norm,
            rope=tables[layer_types[i] if per_type else None],
            softcap=float(softcap) if softcap else None,
            window=int(window) if window else None,
        )
        if mlp_block is not None:
            block, mlp_bias = mlp_block(i, mlp, ctx)
        elif getattr(mlp, "gate_proj", None) is None:
            raise RuntimeUnsupported(f"layer {i}: no gated MLP (mixture of experts?)")
        else:
            block, mlp_bias = gated_mlp(ctx, mlp, config), module_bias(mlp.down_proj)
        sandwich = getattr(layer, "pre_feedforward_layernorm", None) is not None
        layers.append(
            Layer(
                attn_norm=norm_of(layer.input_layernorm, gemma),
                attention=attention,
                mlp=block,
                mlp_norm=norm_of(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm, gemma),
                post_attn_norm=norm_of(layer.post_attention_layernorm, gemma) if sandwich else None,
                post_mlp_norm=norm_of(layer.post_feedforward_layernorm, gemma) if sandwich else None,
                attn_bias=module_bias(o),
                mlp_bias=mlp_bias,
                reduce=ctx.reduce,
                attn_sharded=ctx.sharded(o),
                mlp_sharded=mlp_block is not None or ctx.sharded(mlp.down_proj),
            )
        )
        kv_heads.append(attention.n_kv)
    final_cap = getattr(config, "final_logit_softcapping", None)
    return Parts(
        layers=layers,
        final_norm=norm_of(base.norm, gemma),
        kv_heads=kv_heads,
        head_dim=head_dim,
        ropes=list(tables.values()),
        final_softcap=float(final_cap) if final_cap else None,
    )


BUILDERS = {name: build for name in ("llama", "mistral", "qwen2", "qwen3", *GEMMA)}

# Where a layer of the Llama layout keeps its weights; an architecture whose
# layers hold exactly these may run on these blocks (after a parity proof).
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm"}
_ATTN_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
_MLP_PARTS = {"gate_proj", "up_proj", "down_proj"}


def _weighted_children(module: nn.Module) -> set[str]:
    return {name for name, child in module.named_children() if any(True for _ in child.parameters())}


def matches_layout(model: nn.Module) -> bool:
    """Whether ``model`` is laid out like Llama, module for module (its math may still differ)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or getattr(base, "rotary_emb", None) is None:
        return False
    if getattr(base, "norm", None) is None:
        return False
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not {"input_layernorm", "post_attention_layernorm"} <= _weighted_children(layer):
            return False
        if not _weighted_children(layer) <= _LAYER_PARTS or not {"q_proj", "k_proj", "v_proj", "o_proj"} <= _weighted_children(attn):
            return False
        if not _weighted_children(attn) <= _ATTN_PARTS or _weighted_children(mlp) != _MLP_PARTS:
            return False
        if not hasattr(attn, "head_dim") or not hasattr(attn, "scaling"):
            return False
    return True
