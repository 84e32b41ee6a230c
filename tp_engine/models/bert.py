"""BERT and RoBERTa encoders.

Checked against transformers 5.x ``modeling_bert.py`` / ``modeling_roberta.py``:
``attention.self`` holds query/key/value and does the attention math
(reshaping with ``-1`` heads; ``num_attention_heads`` and ``all_head_size``
made rank-local), ``attention.output.dense`` is the output projection (its
all-reduce comes before the LayerNorm over hidden + residual), and the
feed-forward is ``intermediate.dense`` / ``output.dense`` in the layer itself.

The word embedding is vocab-parallel, like the decoders': it is the largest
single table in BERT-base (23M of 110M parameters), the masked-LM decoder is
tied to it, and the split costs one all-reduce per forward (not per layer).
Position and token-type embeddings are small and stay replicated, as do the
pooler and task heads other than the masked-LM decoder (which gathers full
logits). ``BertModel`` / ``RobertaModel`` (no head) work too.
"""
from .family import Family
from .spec import ArchSpec


def _encoder(family: str, prefix: str, lm_head: str) -> ArchSpec:
    return ArchSpec(
        family=family,
        layers=f"{prefix}.encoder.layer",
        attention="attention",
        q_proj="self.query",
        k_proj="self.key",
        v_proj="self.value",
        o_proj="output.dense",
        attention_core="self",
        q_width_attrs=("all_head_size",),
        mlp="",  # intermediate.dense / output.dense live in the layer itself
        mlp_column=("intermediate.dense",),
        mlp_row="output.dense",
        embedding=f"{prefix}.embeddings.word_embeddings",
        lm_head=lm_head,
        lm_head_optional=True,
    )


BERT_LAYOUT = _encoder("bert", "bert", "cls.predictions.decoder")
ROBERTA_LAYOUT = _encoder("roberta", "roberta", "lm_head.decoder")

FAMILIES = {"bert": Family(BERT_LAYOUT), "roberta": Family(ROBERTA_LAYOUT)}
