"""GPT-J: attention and MLP in parallel from one LayerNorm, one all-reduce per layer.

Checked against transformers 5.x ``modeling_gptj.py``: the block computes
``attn(ln(x)) + mlp(ln(x)) + x``. Both ``out_proj`` and ``fc_out`` are
row-parallel, so each rank holds a partial sum of each; instead of reducing
them separately (two all-reduces), they are added locally and reduced once,
then ``fc_out``'s bias is added once and the residual after it (see
``layers.PartialSum``). That saves one all-reduce of hidden_size values per
layer per token: half of the layer's collectives, which dominate decode
latency across machines. In training mode the two outputs reduce separately
so residual dropout sees full sums, as in the unsharded model.

``_split_heads`` reshapes with ``num_attention_heads`` (made rank-local).
"""
from .family import Family
from .spec import ArchSpec

GPTJ_LAYOUT = ArchSpec(
    family="gptj",
    layers="transformer.h",
    attention="attn",
    o_proj="out_proj",
    mlp="mlp",
    mlp_column=("fc_in",),
    mlp_row="fc_out",
    embedding="transformer.wte",
    lm_head="lm_head",
    parallel_block=True,
)

FAMILIES = {"gptj": Family(GPTJ_LAYOUT)}
