"""GPT-NeoX / Pythia: fused query_key_value interleaved per head.

Checked against transformers 5.x ``modeling_gpt_neox.py``: the fused output
is viewed as (..., -1 heads, 3 x head_size) and chunked into q, k, v, so the
checkpoint rows are [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]: the ``grouped``
layout with one Q head per group, and a rank's heads are one contiguous
piece. Partial rotary acts on the first ``rotary_ndims`` of each head, so a
head split is unaffected. With ``use_parallel_residual`` attention and MLP
both read the layer input and are added together: one all-reduce per layer.
"""
from typing import Any

from .family import CheckpointLayout, Family
from .spec import ArchSpec

GPT_NEOX_LAYOUT = ArchSpec(
    family="gpt_neox",
    layers="gpt_neox.layers",
    attention="attention",
    qkv_proj="query_key_value",
    qkv_layout="grouped",
    o_proj="dense",
    mlp="mlp",
    mlp_column=("dense_h_to_4h",),
    mlp_row="dense_4h_to_h",
    embedding="gpt_neox.embed_in",
    lm_head="lm_head",
)


def _for_config(config: Any) -> ArchSpec:
    return GPT_NEOX_LAYOUT.replace(parallel_block=bool(getattr(config, "use_parallel_residual", True)))


# transformers 5.x names the output head ``lm_head``, but Pythia's Hub files and transformers' own
# save_pretrained (which reverses its load-time rename) store it as ``embed_out``:
# conversion_mapping.py's ``WeightRenaming("^embed_out\\.", "lm_head.")`` for GPTNeoXForCausalLM.
GPT_NEOX_CHECKPOINT = CheckpointLayout(renames=(("^embed_out.", "lm_head."),))

FAMILIES = {"gpt_neox": Family(GPT_NEOX_LAYOUT.replace(specialize=_for_config), GPT_NEOX_CHECKPOINT)}
