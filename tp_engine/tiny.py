"""Tiny random copies of an architecture: what every parity check runs on.

``tiny_config`` shrinks a config (same class, same head counts, few small
layers, small vocabulary and context; attribute names matched generically,
so most families need no code of their own); ``tiny_model`` builds a float32
model of it with weights that make every sharding mistake visible
(``_randomize``). Used by the parity checks (:mod:`tp_engine.check`), the
runtime's self-check (:mod:`tp_engine.runtime_check`) and the coverage walk
(:mod:`tp_engine.coverage`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

__all__ = ["TINY_EXPERTS", "TINY_POSITIONS", "TINY_VOCAB", "TINY_WINDOW", "causal_lm_class", "tiny_config", "tiny_model"]

# ------------------------------------------------------------ tiny configs

# Attribute names the common config classes use for the same idea. Writing
# every spelling that the config has keeps this generic across families.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
_ENCODER_LAYER_KEYS = ("encoder_layers", "num_encoder_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "emb_dim", "embed_dim", "model_dim", "embedding_dim")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads", "attention_heads")
_HEAD_DIM_KEYS = ("head_dim", "d_head", "dim_head", "attention_head_size", "attention_head_dim", "kv_channels")
_INTERMEDIATE_KEYS = (
    "intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size",
    "d_ff", "dim_ff", "dff", "d_inner", "feed_forward_size", "inner_hidden_size", "intermediate_size_mlp",
    "expert_ffn_hidden_size",
)
_POSITION_KEYS = (
    "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length", "seq_length",
    "context_length", "max_target_positions", "max_source_positions",
)
_WINDOW_KEYS = ("sliding_window", "sliding_window_size", "attention_window_size")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k")

TINY_VOCAB = 320  # not a multiple of 3: TP=3 gets an uneven vocabulary split
TINY_POSITIONS = 128
TINY_WINDOW = 6  # shorter than the check's prompt, so sliding windows really slide
TINY_EXPERTS = 4


def _first(d: dict, keys: Sequence[str]) -> tuple[str | None, Any]:
    for k in keys:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return k, v
    return None, None


def _is_layer_index_list(key: str, value: Any, n_layers: int) -> bool:
    """A sorted list of layer indices (``moe_layers``, ``mlp_only_layers``...), not one value per layer."""
    if not (isinstance(value, (list, tuple)) and value and ("layer" in key or "idx" in key)):
        return False
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return False
    return all(a < b for a, b in zip(value, value[1:])) and 0 <= value[0] and value[-1] < n_layers and (
        len(value) < n_layers or list(value) == list(range(n_layers))
    )


def _per_layer_prefix(d: dict, n_layers: int, minimum: int = 2) -> int:
    """The fewest leading layers that still hold every kind of layer the model has.

    A per-layer list (``layer_types``, ``mlp_layer_types``, ...) is any list or
    pattern string as long as the model is deep.
    """
    sequences = [
        v for k, v in d.items()
        if isinstance(v, (list, tuple, str)) and len(v) == n_layers and n_layers >= 2 and k != "model_type"
        and not _is_layer_index_list(k, v, n_layers)
    ]
    for length in range(min(minimum, n_layers), n_layers + 1):
        if all({repr(x) for x in seq[:length]} == {repr(x) for x in seq} for seq in sequences):
            return length
    return n_layers


def _shrink(d: dict) -> None:
    """Shrink one config dict in place (and the sub-config dicts inside it)."""
    for value in d.values():
        if isinstance(value, dict) and "model_type" in value:
            _shrink(value)

    original = dict(d)
    _, n_layers = _first(d, _LAYER_KEYS)
    _, heads = _first(d, _HEAD_KEYS)
    _, hidden = _first(d, _HIDDEN_KEYS)

    # Depth: 2 layers, or as many as it takes to keep every layer kind.
    if n_layers is not None:
        new_layers = _per_layer_prefix(d, n_layers)
        shared_kv = d.get("num_kv_shared_layers")
        if isinstance(shared_kv, int) and 0 < shared_kv < n_layers:
            # Gemma 3n: the last layers reuse earlier layers' KV: keep one of each kind to reuse.
            d["num_kv_shared_layers"] = min(shared_kv, new_layers)
            new_layers = min(n_layers, new_layers + d["num_kv_shared_layers"])
        for k, v in list(d.items()):
            if _is_layer_index_list(k, v, n_layers):
                # Layers listed by index (Mllama's cross_attention_layers) are a
                # kind of their own: keep the first listed and the first unlisted one.
                unlisted = sorted(set(range(n_layers)) - set(v))
                for first in (v[0], unlisted[0] if unlisted else 0):
                    new_layers = max(new_layers, min(n_layers, first + 1))
        for period, offset in (("attn_layer_period", "attn_layer_offset"), ("expert_layer_period", "expert_layer_offset")):
            if isinstance(d.get(offset), int) and isinstance(d.get(period), int):
                new_layers = max(new_layers, min(n_layers, d[offset] + 1))
        for k, v in list(d.items()):
            if _is_layer_index_list(k, v, n_layers):
                d[k] = [x for x in v if x < new_layers]
            elif isinstance(v, (list, tuple, str)) and len(v) == n_layers and n_layers >= 2 and k != "model_type":
                d[k] = v[:new_layers]
        for k in _LAYER_KEYS:
            if isinstance(d.get(k), int):
                d[k] = new_layers
        for k in ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"):
            if isinstance(d.get(k), int) and d[k] > 0:
                d[k] = min(d[k], new_layers - 1)  # keep one dense and one sparse layer
        plc = d.get("per_layer_config")
        if isinstance(plc, dict):  # {"<layer index>": {overrides}}
            d["per_layer_config"] = {i: v for i, v in plc.items() if str(i).isdigit() and int(i) < new_layers}
        for k in ("global_attn_every_n_layers",):
            if isinstance(d.get(k), int):
                d[k] = min(d[k], new_layers)
    for k in _ENCODER_LAYER_KEYS:
        if isinstance(d.get(k), int):
            d[k] = min(d[k], 2)

    # Width: same head counts, small heads.
    if heads is not None:
        head_dim = 16 if heads <= 32 else 8
        old_head_dim = next((d[k] for k in _HEAD_DIM_KEYS if isinstance(d.get(k), int)), None)
        if old_head_dim is None and hidden:
            old_head_dim = max(1, hidden // heads)
        for k in _HEAD_DIM_KEYS:
            if isinstance(d.get(k), int):
                d[k] = head_dim
        for k, v in list(d.items()):
            if isinstance(v, int) and not isinstance(v, bool) and k.endswith("head_dim") and k not in _HEAD_DIM_KEYS:
                d[k] = head_dim  # MLA: DeepSeek ties head_dim to qk_rope_head_dim
        if isinstance(d.get("qk_head_dim"), int) and isinstance(d.get("qk_rope_head_dim"), int):
            d["qk_head_dim"] = d["qk_rope_head_dim"] + d.get("qk_nope_head_dim", 0)
        for k in ("kv_lora_rank", "q_lora_rank", "o_lora_rank"):
            if isinstance(d.get(k), int):
                d[k] = 16
        if isinstance(d.get("rotary_dim"), int) and old_head_dim:
            # Same rotated fraction of each head, kept even.
            d["rotary_dim"] = max(2, 2 * round(d["rotary_dim"] / old_head_dim * head_dim / 2))
        _shrink_rope(d, old_head_dim, head_dim)
        for overrides in (d.get("per_layer_config") or {}).values():
            for k, v in list(overrides.items()) if isinstance(overrides, dict) else ():
                if isinstance(v, int) and k.endswith("head_dim") and old_head_dim:
                    # Keep "wider than usual" layers wider (Gemma 4's global layers).
                    overrides[k] = 2 * head_dim if v > old_head_dim else head_dim
        new_hidden = heads * head_dim
    elif hidden is not None:
        new_hidden = 64
    else:
        new_hidden = None
    if new_hidden is not None:
        for k in _HIDDEN_KEYS:
            if isinstance(d.get(k), int):
                d[k] = new_hidden
        # Not a multiple of 6, so TP=2 and TP=3 split the MLP unevenly; except
        # in mixture-of-experts models, whose grouped expert matmuls need every
        # shard's rows 16-byte aligned (48 = 2 x 24 = 3 x 16 float32 columns).
        moe = any(isinstance(original.get(k), int) and original[k] > 1 for k in _EXPERT_KEYS)
        intermediate = 48 if moe else 3 * new_hidden // 2 + 2
        for k, v in list(d.items()):
            if (k in _INTERMEDIATE_KEYS or "intermediate_size" in k) and isinstance(v, list) and v and all(
                isinstance(x, int) and not isinstance(x, bool) for x in v
            ):
                d[k] = [intermediate] * len(v)  # one width per layer (Gemma 3n)
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            if k in _INTERMEDIATE_KEYS or "intermediate_size" in k:
                sparse = moe or any(w in k for w in ("moe", "expert", "shared"))
                d[k] = 48 if sparse else intermediate
        for k in ("embedding_size", "word_embed_proj_dim", "attention_hidden_size", "router_hidden_size"):
            if isinstance(d.get(k), int) and d[k] > new_hidden:
                d[k] = new_hidden
        for k, v in list(d.items()):
            if k.startswith("hidden_size_") and isinstance(v, int) and not isinstance(v, bool) and v > new_hidden:
                # Per-layer-input embeddings (Gemma 3n/4) stay small; others match the new width.
                d[k] = 16 if k == "hidden_size_per_layer_input" else new_hidden
        _shrink_ssm(d, original, new_hidden)

    # Mixture of experts: few experts, so a tiny MoE stays tiny.
    for k in _EXPERT_KEYS:
        if isinstance(d.get(k), int) and d[k] > TINY_EXPERTS:
            d[k] = TINY_EXPERTS
    for k in _TOPK_KEYS:
        if isinstance(d.get(k), int) and d[k] > 2:
            d[k] = 2
    for k in ("n_group", "num_expert_group"):
        if isinstance(d.get(k), int):
            d[k] = 1  # expert groups must divide the (now 4) experts
    if isinstance(d.get("topk_group"), int):
        d["topk_group"] = 1

    # Vocabulary, positions, windows.
    for k, v in list(d.items()):
        if isinstance(v, int) and not isinstance(v, bool) and "vocab" in k and v > TINY_VOCAB:
            d[k] = TINY_VOCAB
    vocab = d.get("vocab_size") if isinstance(d.get("vocab_size"), int) else TINY_VOCAB
    for k in _POSITION_KEYS:
        if isinstance(d.get(k), int) and d[k] > TINY_POSITIONS:
            d[k] = TINY_POSITIONS
    for k in _WINDOW_KEYS:
        if isinstance(d.get(k), int) and not isinstance(d[k], bool) and d[k] > TINY_WINDOW:
            d[k] = TINY_WINDOW
    _clamp_token_ids(d, vocab)


def _shrink_ssm(d: dict, original: dict, new_hidden: int) -> None:
    """State-space (Mamba) blocks of hybrids: small state, and heads x head = expand x hidden."""
    for k in ("mamba_d_state", "state_size", "ssm_state_size"):
        if isinstance(d.get(k), int) and d[k] > 16:
            d[k] = 16
    for k in ("mamba_dt_rank", "time_step_rank"):
        if isinstance(d.get(k), int):
            d[k] = max(1, new_hidden // 16)
    triples = [
        ("mamba_expand", "mamba_n_heads", "mamba_d_head"),
        ("mamba_expand", "mamba_num_heads", "mamba_head_dim"),
        ("expand", "num_heads", "head_dim"),
        ("mamba_expand", "n_mamba_heads", "mamba_headdim"),
    ]
    for expand, n_heads, d_head in triples:
        e, n, h = original.get(expand), original.get(n_heads), original.get(d_head)
        old_hidden = _first(original, _HIDDEN_KEYS)[1]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in (e, n, h)) and old_hidden and e * old_hidden == n * h:
            d[d_head] = 16
            d[n_heads] = max(1, e * new_hidden // 16)


def _shrink_rope(d: dict, old_head_dim: int | None, head_dim: int) -> None:
    """Per-frequency rope lists are sized by head_dim: resize them with it."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if not isinstance(rope, dict):
            continue
        sub = [rope] + [v for v in rope.values() if isinstance(v, dict)]  # per-layer-type rope dicts
        for r in sub:
            factor = r.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0
            half = max(1, int(head_dim * factor) // 2)
            for name in ("short_factor", "long_factor"):
                if isinstance(r.get(name), list):
                    r[name] = r[name][:half]
            section = r.get("mrope_section")
            if isinstance(section, list) and section and sum(section):
                total = sum(section)
                scaled = [max(1, s * half // total) for s in section]
                scaled[0] += half - sum(scaled)
                r["mrope_section"] = scaled


def _clamp_token_ids(d: dict, vocab: int) -> None:
    """Special-token ids must stay inside the tiny vocabulary."""
    nxt = vocab - 1
    for k, v in list(d.items()):
        if not (k.endswith("token_id") or k.endswith("token_ids") or k.endswith("token_index")):
            continue
        if isinstance(v, int) and not isinstance(v, bool) and v >= vocab:
            d[k] = nxt
            nxt -= 1
        elif isinstance(v, list) and any(isinstance(x, int) and x >= vocab for x in v):
            d[k] = [x if x < vocab else vocab - 1 for x in v]


def tiny_config(config: Any) -> Any:
    """A tiny copy of ``config``: same class and head counts, small everything else.

    2 layers (or the shortest prefix of the layers that still holds every
    value of every per-layer list such as ``layer_types``), head_dim 16 (8
    above 32 heads), hidden = heads x head_dim, a small MLP, vocabulary (320)
    and context (128), sliding windows of 6, at most 4 experts. Sub-configs
    (``text_config``, ``vision_config`` ...) shrink the same way. Attribute
    names are matched generically (``num_hidden_layers``/``n_layer``,
    ``hidden_size``/``n_embd``/``d_model``, ``intermediate_size``/``n_inner``/
    ``ffn_dim`` ...), so most families need no code of their own.
    """
    d = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "architectures", "name_or_path", "auto_map"):
        d.pop(k, None)
    _shrink(d)
    kwargs = {}
    attn = getattr(config, "_attn_implementation", None)
    if attn in ("eager", "sdpa"):
        # Check the attention path the model really uses; kernels that need a
        # GPU (flash, flex) are checked through sdpa, the same head layout.
        kwargs["attn_implementation"] = attn
    return type(config).from_dict(d, **kwargs)


# ------------------------------------------------------------ tiny models


def causal_lm_class(config: Any) -> type:
    """The class ``AutoModelForCausalLM`` builds for ``config``."""
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if name is None:
        raise ValueError(f"transformers has no causal-LM class for model type {getattr(config, 'model_type', None)!r}")
    return getattr(transformers, name)


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> None:
    """Weights that make every sharding mistake visible.

    transformers' own init (std 0.02, zero biases) gives near-uniform logits
    (greedy ties) and hides a bias added on every rank; weights of std
    1/sqrt(fan_in) (every projection keeps activations at unit scale, logits
    spread by ~1, far from ties yet small enough for a 1e-4 absolute bound)
    and non-zero biases do neither. Only Linear/Conv1D/Embedding are touched: other
    parameters (norms, SSM constants) keep transformers' init.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or id(w) in seen or w.device.type == "meta":
            continue
        if isinstance(module, nn.Linear):
            fan_in = w.shape[1]
        elif isinstance(module, Conv1D):
            fan_in = w.shape[0]
        elif isinstance(module, nn.Embedding):
            fan_in = w.shape[1]  # a tied LM head then gives logits of unit scale too
        else:
            continue
        seen.add(id(w))
        w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float32) / math.sqrt(fan_in))
        b = getattr(module, "bias", None)
        if isinstance(b, torch.Tensor) and id(b) not in seen:
            seen.add(id(b))
            b.copy_(0.2 * torch.randn(b.shape, generator=gen, dtype=torch.float32))


def tiny_model(config: Any, model_class: type | None = None, seed: int = 0) -> nn.Module:
    """A float32 random model of ``tiny_config(config)``, in eval mode; the global RNG is left as it was."""
    tiny = tiny_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_class is not None:
            model = model_class._from_config(tiny, dtype=torch.float32)
        else:  # what AutoModelForCausalLM builds (it picks text_config where the class wants it)
            model = AutoModelForCausalLM.from_config(tiny, dtype=torch.float32)
    model.eval()
    _randomize(model, seed)
    return model
