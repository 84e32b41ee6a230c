"""Falcon: fused query_key_value in three layouts, multi-query attention, parallel blocks.

Checked against transformers 5.x ``modeling_falcon.py``:

* ``multi_query`` (Falcon-7B): [all Q | K | V] with one KV head, the
  ``concat`` layout; the KV head is replicated on every rank (the planner's
  KV replication), so each rank's cache holds that one head.
* ``new_decoder_architecture`` (Falcon-40B/180B): per KV group
  [its Q heads | K | V], the ``grouped`` layout; the module views the local
  output as (-1, num_heads // num_kv_heads + 2, head_dim), which holds
  because the planner gives every local KV head the same number of local Q
  heads. In transformers 5.23 keys and values are broadcast to the Q
  heads before the cache (one entry per local Q head); from 5.25 the module
  views the output as (num_kv_heads, -1, head_dim) and caches the local KV
  heads, repeated by ``num_key_value_groups`` (which sharding sets per rank).
* neither: per head [q | k | v], the ``grouped`` layout with groups of one.

``parallel_attn`` and the new architecture compute attention and MLP from
the layer input and add both to it: one all-reduce per layer
(``layers.PartialSum``). ``alibi=True`` is refused: Falcon folds the ALiBi
biases of all heads into the attention mask itself.
"""
from typing import Any

from .family import Family
from .spec import ArchSpec

FALCON_LAYOUT = ArchSpec(
    family="falcon",
    layers="transformer.h",
    attention="self_attention",
    qkv_proj="query_key_value",
    o_proj="dense",
    mlp="mlp",
    mlp_column=("dense_h_to_4h",),
    mlp_row="dense_4h_to_h",
    embedding="transformer.word_embeddings",
    lm_head="lm_head",
)


def _for_config(config: Any) -> ArchSpec:
    if getattr(config, "alibi", False):
        raise ValueError(
            "falcon with alibi=True is not supported: it folds the ALiBi biases of all heads into the "
            "attention mask, which tp-engine does not split by heads"
        )
    new_arch = bool(getattr(config, "new_decoder_architecture", False))
    multi_query = bool(getattr(config, "multi_query", False))
    return FALCON_LAYOUT.replace(
        qkv_layout="concat" if multi_query and not new_arch else "grouped",
        parallel_block=new_arch or bool(getattr(config, "parallel_attn", False)),
    )


FAMILIES = {"falcon": Family(FALCON_LAYOUT.replace(specialize=_for_config))}
