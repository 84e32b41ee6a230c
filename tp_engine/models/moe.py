"""Mixture-of-experts families with the Llama attention: Mixtral, Qwen2-MoE.

Checked against transformers 5.x ``modeling_mixtral.py`` /
``modeling_qwen2_moe.py``: the experts are one module with fused 3-D
weights, ``gate_up_proj`` (experts, 2 x intermediate, hidden) = [gate | up]
and ``down_proj`` (experts, hidden, intermediate), run by whichever experts
implementation the config selects (all read sizes from the tensors). Each
rank keeps its intermediate columns of every expert (dim 1 of gate_up in
two pieces, dim 2 of down), so every expert runs on every rank over a slice,
and routing needs no communication. The router stays replicated. The
MoE block's output, a sum of partial sums over experts (plus Qwen2-MoE's
shared expert, sharded the same way, times its replicated sigmoid gate), is
all-reduced once per block. Qwen2-MoE's dense layers (``mlp_only_layers``,
``decoder_sparse_step``) are ordinary gated MLPs.

Checkpoints: ``save_pretrained`` and the Hub store the experts per expert
(2-D tensors), and Mixtral's block is ``block_sparse_moe`` on disk. The
``CheckpointLayout``s below restate transformers 5.x ``conversion_mapping.py``
("mixtral", "qwen2_moe"), checked against tiny models saved by
``save_pretrained`` (which writes these forms).
"""
from .family import CheckpointLayout, ExpertStack, Family
from .llama import LLAMA_LAYOUT

MIXTRAL_LAYOUT = LLAMA_LAYOUT.replace(family="mixtral", moe_experts="experts")
QWEN2_MOE_LAYOUT = LLAMA_LAYOUT.replace(
    family="qwen2_moe",
    moe_experts="experts",
    moe_shared_expert="shared_expert",
    moe_gates=("shared_expert_gate",),
)

MIXTRAL_CHECKPOINT = CheckpointLayout(
    renames=((".block_sparse_moe.", ".mlp."),),
    stacks=(
        ExpertStack("experts.gate_up_proj", ("experts.{e}.w1.weight", "experts.{e}.w3.weight")),  # [gate | up]
        ExpertStack("experts.down_proj", ("experts.{e}.w2.weight",)),
    ),
)
QWEN2_MOE_CHECKPOINT = CheckpointLayout(
    stacks=(
        ExpertStack("experts.gate_up_proj", ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight")),
        ExpertStack("experts.down_proj", ("experts.{e}.down_proj.weight",)),
    ),
)

FAMILIES = {
    "mixtral": Family(MIXTRAL_LAYOUT, MIXTRAL_CHECKPOINT),
    "qwen2_moe": Family(QWEN2_MOE_LAYOUT, QWEN2_MOE_CHECKPOINT),
}
