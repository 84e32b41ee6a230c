"""BLOOM: fused query_key_value interleaved per head, ALiBi positions.

Checked against transformers 5.x ``modeling_bloom.py``: the fused output
is viewed as (..., num_heads, 3, head_dim), so rows are [q_h | k_h | v_h]
per head (the ``grouped`` layout with groups of one) and ``num_heads``
becomes rank-local. ``BloomModel`` builds the ALiBi biases for all heads,
shaped (batch * heads, 1, keys), and passes them to every attention as the
``alibi`` keyword; a pre-hook on each attention keeps the rows of this
rank's global heads, so every head sees its own slope (exact: the same
numbers the unsharded model uses). ``pretraining_tp`` with
``slow_but_exact`` (a slicing of the unsharded dense weights) is refused.
"""
from typing import Any

from .family import Family
from .spec import ArchSpec

BLOOM_LAYOUT = ArchSpec(
    family="bloom",
    layers="transformer.h",
    attention="self_attention",
    qkv_proj="query_key_value",
    qkv_layout="grouped",
    o_proj="dense",
    alibi_kwarg="alibi",
    mlp="mlp",
    mlp_column=("dense_h_to_4h",),
    mlp_row="dense_4h_to_h",
    embedding="transformer.word_embeddings",
    lm_head="lm_head",
)


def _for_config(config: Any) -> ArchSpec:
    if getattr(config, "slow_but_exact", False) and getattr(config, "pretraining_tp", 1) > 1:
        raise ValueError(
            "bloom with slow_but_exact=True and pretraining_tp > 1 is not supported: it slices the full "
            "dense weights by pretraining_tp; set slow_but_exact=False"
        )
    return BLOOM_LAYOUT


FAMILIES = {"bloom": Family(BLOOM_LAYOUT.replace(specialize=_for_config))}
