"""The Llama layout: separate q/k/v/o projections, gated MLP, one embedding.

Checked against transformers 5.x: attention reshapes with ``-1`` heads and
reads ``num_key_value_groups`` from the module (eager and SDPA paths), so
swapping the projections and fixing that attribute is all a rank needs.
Qwen3 and Gemma3 q/k norms act per head on ``head_dim`` (replicated);
Gemma's scaled embedding keeps its scale; Gemma2/3 soft-capping acts on
full (gathered) logits and per-head scores, both unaffected by the split.
"""
from .family import Family
from .spec import ArchSpec

LLAMA_LAYOUT = ArchSpec(family="llama")

# config.model_type -> entry. Only families proven by the parity tests.
FAMILIES = {
    model_type: Family(LLAMA_LAYOUT)
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
}
