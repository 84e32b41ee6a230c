"""GPT-2: Conv1D projections and one fused [Q | K | V] projection.

Checked against transformers 5.x ``modeling_gpt2.py``: ``c_attn`` is a
Conv1D (weight stored (in, out)) whose output splits at ``split_size`` into
q, k, v, each reshaped with ``-1`` heads. A rank keeps its Q-head columns,
K-head columns and V-head columns (three pieces of dim 1 of the checkpoint
tensor) and ``split_size`` becomes its local Q width. ``wpe`` (learned
positions) stays replicated; ``wte`` is vocab-parallel and tied to the LM
head. Cross-attention (``add_cross_attention``) modules stay replicated.
"""
from .family import Family
from .spec import ArchSpec

GPT2_LAYOUT = ArchSpec(
    family="gpt2",
    layers="transformer.h",
    attention="attn",
    qkv_proj="c_attn",
    qkv_layout="concat",
    o_proj="c_proj",
    q_width_attrs=("split_size",),
    mlp="mlp",
    mlp_column=("c_fc",),
    mlp_row="c_proj",
    embedding="transformer.wte",
    lm_head="lm_head",
)

FAMILIES = {"gpt2": Family(GPT2_LAYOUT)}
