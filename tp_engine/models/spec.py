"""What an architecture spec says: where the tensor-parallel modules live."""
from __future__ import annotations

from dataclasses import dataclass


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
