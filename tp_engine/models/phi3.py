"""Phi-3: fused [Q | K | V] (grouped-query) and fused [gate | up] projections.

Checked against transformers 5.x ``modeling_phi3.py``: the attention slices
its fused output at ``config.num_attention_heads * head_dim`` (read from the
config, not the module), so the attention module gets a config view with
the rank-local head count; K/V widths come from the module's
``num_key_value_heads``. ``gate_up_proj`` is chunked in two halves: a rank
takes its columns of the gate half and the same columns of the up half.
"""
from .family import Family
from .spec import ArchSpec

PHI3_LAYOUT = ArchSpec(
    family="phi3",
    qkv_proj="qkv_proj",
    qkv_layout="concat",
    attention_config_heads=("num_attention_heads",),
    mlp_column=("gate_up_proj",),
    mlp_stacked=2,
    mlp_row="down_proj",
)

FAMILIES = {"phi3": Family(PHI3_LAYOUT)}
