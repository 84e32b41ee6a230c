"""What an architecture spec says: where the tensor-parallel modules live.

A spec is plain data: dotted module paths and a few layout choices. Every
field added after the Llama layout is optional, and its default keeps the
Llama meaning, so a spec built with only the original fields (layers,
attention, q/k/v/o_proj, mlp, mlp_column, mlp_row, embedding, lm_head,
q_head_attrs, kv_head_attrs) describes exactly what it always did.

Paths are relative to the model (``layers``, ``embedding``, ``lm_head``),
to a layer (``attention``, ``mlp``; ``""`` is the layer itself), to the
attention module (projections, ``attention_core``) or to the MLP module
(``mlp_column``, ``mlp_row``, ``moe_*``). Model paths may start with the
model's ``base_model_prefix`` (``"model.layers"``): a bare base model
(``LlamaModel``, ``BertModel``) is found without it, and has no LM head.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

# Fused q/k/v projection layouts (rows of the output, in order):
#   "concat":  [all Q heads | all K heads | all V heads]   (GPT-2, Phi-3, Falcon-7B MQA)
#   "grouped": per KV head j: [its Q heads | K_j | V_j]   (Falcon-40B; GPT-NeoX and BLOOM
#              are the one-Q-head-per-group case, [q_h | k_h | v_h] per head)
QKV_LAYOUTS = ("concat", "grouped")
# How ``mlp_stacked`` blocks sit in a stacked projection's output rows:
#   "blocks":      [gate | up]                (Phi-3, GLM)
#   "interleaved": [g0, u0, g1, u1, ...]      (row pairs, one pair per intermediate column)
STACKED_LAYOUTS = ("blocks", "interleaved")
# Roles a plan may leave whole on every rank (``ArchSpec.replicate``).
REPLICABLE_ROLES = ("attention", "mlp", "embedding", "lm_head")
# Where an MoE block's partial sums are all-reduced (``ArchSpec.moe_reduce``).
MOE_REDUCE = ("block", "experts")


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths, relative to the model (layers) or a layer.

    Defaults describe the Llama layout that most decoder-only families share.
    """

    family: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    mlp_column: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_row: str = "down_proj"
    embedding: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    # Attention-module attributes that hold the Q or KV head count and must
    # become rank-local (num_key_value_groups is always set).
    q_head_attrs: tuple[str, ...] = ("num_heads", "num_attention_heads")
    kv_head_attrs: tuple[str, ...] = ("num_key_value_heads", "num_kv_heads")

    # ---- optional, for layouts beyond Llama's (defaults: Llama meaning)

    # A fused q/k/v projection (path under the attention module), used
    # instead of q_proj/k_proj/v_proj; ``qkv_layout`` is one of QKV_LAYOUTS.
    qkv_proj: str | None = None
    qkv_layout: str = "concat"
    # Attention-module attributes holding the Q width (Q heads x head_dim)
    # that the forward uses to split or reshape (GPT-2's ``split_size``).
    q_width_attrs: tuple[str, ...] = ()
    # Config attributes the attention forward reads as the Q head count
    # (Phi-3 slices its fused qkv at ``config.num_attention_heads``): the
    # module gets a view of the config with the rank-local count.
    attention_config_heads: tuple[str, ...] = ()
    # The submodule (under ``attention``) that runs the attention math and
    # holds the head-count attributes; "" is the attention module itself
    # (BERT: ``attention.self`` does the math, ``attention.output.dense``
    # is the output projection).
    attention_core: str = ""
    # Keyword argument of the attention forward carrying ALiBi biases shaped
    # (batch * heads, 1, keys) for all heads (BLOOM): narrowed to this rank's heads.
    alibi_kwarg: str | None = None

    # Each ``mlp_column`` layer's output stacks this many blocks of the
    # intermediate width (Phi-3's gate_up_proj = [gate | up] is 2); a rank
    # takes its columns from every block.
    mlp_stacked: int = 1

    # Attention and MLP run in parallel from the layer input and the layer
    # adds both to the residual (GPT-J, GPT-NeoX parallel residual, Falcon
    # parallel_attn): their two partial sums are all-reduced once, together.
    parallel_block: bool = False

    # Mixture of experts. When the layer's ``mlp`` module has a submodule at
    # ``moe_experts``, it is an MoE block: the experts' fused 3-D weights
    # (``moe_gate_up``: [gate | up] per expert, ``moe_down``) are sharded along
    # the intermediate dimension, the router stays replicated, and the MoE
    # block's output (the sum over experts, plus ``moe_shared_expert``, an MLP
    # with the ``mlp_column``/``mlp_row`` names) is all-reduced once.
    # ``moe_gates``: replicated modules whose output scales a partial sum
    # (Qwen2-MoE's shared_expert_gate); their gradient is summed over ranks.
    # A layer whose ``mlp`` lacks ``moe_experts`` is a dense MLP (Qwen2-MoE
    # mixes both).
    moe_experts: str | None = None
    moe_gate_up: str = "gate_up_proj"
    moe_down: str = "down_proj"
    moe_shared_expert: str | None = None
    moe_gates: tuple[str, ...] = ()

    # Encoders: task heads vary (BertModel has none, BertForSequenceClassification
    # has a classifier), so a model without a module at ``lm_head`` keeps
    # whatever head it has, replicated.
    lm_head_optional: bool = False

    # Config-dependent choices (Falcon's qkv layout depends on
    # ``new_decoder_architecture``): a function from the model config to the
    # spec to use, or None. It may raise ValueError for unsupported configs.
    specialize: Callable[[Any], "ArchSpec"] | None = dataclasses.field(default=None, compare=False, repr=False)

    # ---- partial and per-layer plans (what the auto-planner needs beyond the above)

    # Roles kept whole on every rank (a subset of REPLICABLE_ROLES): "attention"
    # and "mlp" per layer, "embedding" and "lm_head" per model. A replicated
    # module computes on every rank exactly what it computes unsharded, so a
    # partial plan is correct by construction; it only gains less speed.
    # Modules a spec names nowhere (cross-attention, state-space mixers,
    # routers, norms) are replicated too, as they always were.
    replicate: tuple[str, ...] = ()
    # Per-layer roles a layer kind does not have at all ("attention", "mlp"):
    # Nemotron-H blocks hold only a mixer or only an MLP. Nothing to shard and
    # nothing replicated, so a plan does not describe them as kept whole.
    absent: tuple[str, ...] = ()
    # Layers that differ from each other (hybrids, dense and MoE layers, layer
    # types): (kind key, spec) pairs, sorted by key. Layer i is sharded by the
    # spec whose key is ``parallelize.layer_kind(...)`` of that layer (its
    # parameter names and its ``layer_types`` entry, nothing that depends on
    # the model's size); only the kind spec's per-layer fields (attention,
    # projections, mlp, moe_*, replicate of "attention"/"mlp") are used. A
    # layer whose key has no entry is an error, never a guess.
    layer_kinds: tuple[tuple[str, "ArchSpec"], ...] = ()
    # Parameters of the attention core whose dim 0 runs over Q heads (per-head
    # attention sinks, per-head scales): each rank keeps its heads' rows.
    q_head_params: tuple[str, ...] = ()
    # Extra projections under the attention module whose output rows are
    # per Q head (an output gate of width heads x head_dim, or one value per
    # head): column-split by the rank's Q heads, like q_proj.
    q_head_projs: tuple[str, ...] = ()
    # Output rows of ``q_proj`` per Q head when it is not head_dim: a gated
    # attention's q_proj holds [q_h | gate_h] per head (Qwen3-Next: 2 x head_dim).
    # 0 means head_dim.
    q_rows_per_head: int = 0
    # RMS norms (paths under the attention module) over a whole q or k
    # projection rather than one head (Olmo 2: q_norm over num_heads x
    # head_dim, k_norm over num_kv_heads x head_dim, applied before the head
    # reshape; BitNet's attn_sub_norm over the attention output, also
    # num_heads x head_dim rows). Each is split like the rows it normalizes
    # (its width says which: the Q rows or the KV rows, with the KV
    # replication layout) and all-reduces its per-token sums of squares
    # (``layers.HeadShardedRMSNorm``). Empty: no such norm (a norm of
    # head_dim width needs nothing).
    qk_norm_span: tuple[str, ...] = ()
    # The order of the ``mlp_stacked`` blocks in a stacked projection (STACKED_LAYOUTS).
    mlp_stacked_layout: str = "blocks"
    # Where an MoE layer's partial sums are all-reduced (MOE_REDUCE): "block",
    # the MoE block's output, once (Mixtral, Qwen2-MoE: the block only adds
    # partial sums); or "experts", the experts module's output, with the shared
    # expert an ordinary MLP that reduces itself: right whatever the block does
    # with the two (the auto-planner's choice; one more all-reduce when there
    # is a shared expert).
    moe_reduce: str = "block"
    # Whether the experts' 3-D weights are stored transposed, (experts, in, out);
    # None: the experts module's own ``is_transposed`` flag (transformers'
    # experts decorator sets it), False without one.
    moe_transposed: bool | None = None
    # Modules of a layer (relative to it) holding weights that this plan
    # leaves whole besides the replicated roles: cross-attention, state-space
    # mixers, extra blocks. Descriptive only (so a plan can say what it keeps
    # whole); parallelize never touches modules a spec does not name.
    kept_whole: tuple[str, ...] = ()
    # Why parts of the plan are replicated, for people; not part of the plan's identity.
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"ArchSpec {self.family!r}: qkv_layout must be one of {QKV_LAYOUTS}, got {self.qkv_layout!r}")
        if not isinstance(self.mlp_stacked, int) or self.mlp_stacked < 1:
            raise ValueError(f"ArchSpec {self.family!r}: mlp_stacked must be a positive integer, got {self.mlp_stacked!r}")
        if self.mlp_stacked_layout not in STACKED_LAYOUTS:
            raise ValueError(
                f"ArchSpec {self.family!r}: mlp_stacked_layout must be one of {STACKED_LAYOUTS}, got {self.mlp_stacked_layout!r}"
            )
        unknown = [r for r in self.replicate if r not in REPLICABLE_ROLES]
        if unknown:
            raise ValueError(f"ArchSpec {self.family!r}: replicate has unknown roles {unknown}; known: {REPLICABLE_ROLES}")
        stray = [r for r in self.absent if r not in ("attention", "mlp")]
        if stray:
            raise ValueError(f"ArchSpec {self.family!r}: absent may name only 'attention' and 'mlp', got {stray}")
        if self.moe_reduce not in MOE_REDUCE:
            raise ValueError(f"ArchSpec {self.family!r}: moe_reduce must be one of {MOE_REDUCE}, got {self.moe_reduce!r}")
        keys = [k for k, _ in self.layer_kinds]
        if keys != sorted(set(keys)):
            raise ValueError(f"ArchSpec {self.family!r}: layer_kinds keys must be unique and sorted, got {keys}")

    def for_config(self, config: Any) -> "ArchSpec":
        """The spec to use for a model with this config (``specialize`` applied)."""
        if self.specialize is None:
            return self
        spec = self.specialize(config)
        if not isinstance(spec, ArchSpec):
            raise TypeError(f"ArchSpec {self.family!r}: specialize returned {type(spec).__name__}, not ArchSpec")
        return dataclasses.replace(spec, specialize=None)

    def replace(self, **changes: Any) -> "ArchSpec":
        """A copy with some fields changed (for ``specialize`` functions)."""
        return dataclasses.replace(self, **changes)
