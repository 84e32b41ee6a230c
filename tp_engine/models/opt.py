"""OPT: separate q/k/v/out_proj with biases, fc1/fc2 directly in the layer.

Checked against transformers 5.x ``modeling_opt.py``: attention reshapes
with the module's ``num_heads`` (made rank-local). The learned positional
embedding (with its offset of 2) and the optional ``project_in`` /
``project_out`` (when ``word_embed_proj_dim`` != hidden size) are small and
stay replicated; the token embedding is vocab-parallel at
``word_embed_proj_dim`` and tied to the LM head.
"""
from .family import Family
from .spec import ArchSpec

OPT_LAYOUT = ArchSpec(
    family="opt",
    layers="model.decoder.layers",
    attention="self_attn",
    o_proj="out_proj",
    mlp="",  # fc1/fc2 live in the decoder layer itself
    mlp_column=("fc1",),
    mlp_row="fc2",
    embedding="model.decoder.embed_tokens",
    lm_head="lm_head",
)

FAMILIES = {"opt": Family(OPT_LAYOUT)}
