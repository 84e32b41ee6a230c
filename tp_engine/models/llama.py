"""The Llama layout: separate q/k/v/o projections, gated MLP, one embedding.

Checked against transformers 5.x: attention reshapes with ``-1`` heads and
reads ``num_key_value_groups`` from the module (eager and SDPA paths), so
swapping the projections and fixing that attribute is all a rank needs.
Qwen3 and Gemma3 q/k norms act per head on ``head_dim`` (replicated);
Gemma's scaled embedding keeps its scale; Gemma2/3 soft-capping acts on
full (gathered) logits and per-head scores, both unaffected by the split.
"""
from .spec import ArchSpec

LLAMA_LAYOUT = ArchSpec(family="llama")

# config.model_type -> spec. Only families proven by the parity tests.
SPECS = {
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "qwen3": LLAMA_LAYOUT,
    "gemma": LLAMA_LAYOUT,
    "gemma2": LLAMA_LAYOUT,
    "gemma3_text": LLAMA_LAYOUT,
}
