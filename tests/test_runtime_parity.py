"""Every declared decoder family runs on the lean runtime and computes what transformers computes.

For each family and each split — TP=1, TP=2, an uneven TP=3, a KV-replicated
TP=4 and shares [3, 1] — the runtime's logits for every prompt position are
within 1e-4 of the unsharded transformers model's, and 16 greedy tokens from
``tp_engine.generate(..., fast_path=True)`` (the runtime, never HF's
generate) are identical to transformers' own greedy ``generate``.

Families whose attention has as many KV heads as Q heads (GPT-2, GPT-NeoX,
GPT-J, BLOOM, OPT) have no KV-replicated split: every rank's Q heads come
with their own KV heads whatever the world size, so the TP=4 case there is
a plain 4-way split. All cases of one world size run in one launch.
"""
from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import tp_engine
from conftest import run_ranks

NEW_TOKENS = 16
TOL = 1e-4
VOCAB = 257
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199]])
COMMON = dict(vocab_size=VOCAB, initializer_range=0.2, num_hidden_layers=2)


def _llama_like(**kw):
    return {**COMMON, **dict(hidden_size=128, intermediate_size=200, num_attention_heads=8, num_key_value_heads=2,
                             head_dim=16, max_position_embeddings=256), **kw}


# family -> (config class, model class, config kwargs). GQA families use 8 Q / 2 KV heads, so TP=3
# cuts inside KV groups and TP=4 replicates every KV head on two ranks.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _llama_like(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", _llama_like(tie_word_embeddings=False, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _llama_like(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _llama_like(tie_word_embeddings=True, attention_bias=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _llama_like(tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _llama_like(
        tie_word_embeddings=True, sliding_window=5, query_pre_attn_scalar=16, attn_logit_softcapping=20.0,
        final_logit_softcapping=15.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", _llama_like(
        tie_word_embeddings=True, sliding_window=5, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=15.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {**COMMON, **dict(n_embd=64, n_head=4, n_inner=None, n_positions=64)}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**COMMON, **dict(
        hidden_size=64, num_attention_heads=4, intermediate_size=144, max_position_embeddings=64, rotary_pct=0.25,
        use_parallel_residual=True)}),
    "gpt_neox-sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**COMMON, **dict(
        hidden_size=64, num_attention_heads=4, intermediate_size=144, max_position_embeddings=64, rotary_pct=0.25,
        use_parallel_residual=False)}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**COMMON, **dict(
        hidden_size=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
        max_position_embeddings=64, pad_token_id=0)}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {**COMMON, **dict(
        hidden_size=128, num_attention_heads=8, new_decoder_architecture=True, num_kv_heads=2)}),
    "falcon-mqa": ("FalconConfig", "FalconForCausalLM", {**COMMON, **dict(
        hidden_size=64, num_attention_heads=4, multi_query=True, parallel_attn=True)}),
    "falcon-mha-sequential": ("FalconConfig", "FalconForCausalLM", {**COMMON, **dict(
        hidden_size=64, num_attention_heads=4, multi_query=False, parallel_attn=False, bias=True)}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {**COMMON, **dict(n_embd=64, n_head=4, rotary_dim=8, n_positions=64)}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {**COMMON, **dict(hidden_size=80, n_head=5)}),
    "opt": ("OPTConfig", "OPTForCausalLM", {**COMMON, **dict(
        hidden_size=64, num_attention_heads=4, ffn_dim=112, max_position_embeddings=64)}),
    "opt-project": ("OPTConfig", "OPTForCausalLM", {**COMMON, **dict(
        hidden_size=64, num_attention_heads=4, ffn_dim=112, max_position_embeddings=64, word_embed_proj_dim=32)}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**COMMON, **dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=40,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**COMMON, **dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=72, moe_intermediate_size=40,
        shared_expert_intermediate_size=56, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[1], max_position_embeddings=64)}),
}

SPLITS: dict[str, tuple[int, tuple[float, ...] | None]] = {
    "tp1": (1, None),
    "tp2": (2, None),
    "tp3-uneven": (3, None),
    "tp4-replicated": (4, None),
    "shares-3-1": (2, (3.0, 1.0)),
}


@dataclass(frozen=True)
class Case:
    family: str
    split: str

    @property
    def world(self) -> int:
        return SPLITS[self.split][0]

    @property
    def shares(self):
        return SPLITS[self.split][1]


CASES = [Case(f, s) for f in FAMILIES for s in SPLITS]


def build(family: str) -> nn.Module:
    import transformers

    config_name, model_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
    model.generation_config.pad_token_id = 0
    return model


@functools.cache
def reference(family: str) -> tuple[torch.Tensor, list[int]]:
    """Unsharded transformers: prompt logits and greedy tokens."""
    model = build(family)
    with torch.no_grad():
        logits = model(PROMPT).logits[0]
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT.shape[1]:].tolist()
    return logits, tokens


def _run_case(case: Case) -> dict[str, Any]:
    try:
        model = build(case.family)
        if case.world > 1:
            model = tp_engine.parallelize(model, shares=list(case.shares) if case.shares else None)
        from tp_engine.runtime import decoder_for

        dec = decoder_for(model)
        dec.reserve(1, PROMPT.shape[1] + NEW_TOKENS + 1)
        h = dec.forward(dec.embed(PROMPT[0]), [0], [0], [PROMPT.shape[1]], last_only=False)
        logits = dec.rows_logits(h)
        out = tp_engine.generate(model, PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, fast_path=True)
        return {"logits": logits, "tokens": out[0, PROMPT.shape[1]:].tolist()}
    except Exception:  # reported per case by the parent
        return {"error": traceback.format_exc()}


def _run_world(cases: list[Case]) -> list[dict[str, Any]]:
    return [_run_case(c) for c in cases]


@functools.cache
def results_for_world(world: int) -> dict[Case, dict[str, Any]]:
    cases = [c for c in CASES if c.world == world]
    if world == 1:
        torch.set_num_threads(1)
        got = _run_world(cases)
    else:
        got = run_ranks(_run_world, world, cases)[0]
    return dict(zip(cases, got))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.family}-{c.split}")
def test_runtime_matches_transformers(case: Case):
    got = results_for_world(case.world)[case]
    assert "error" not in got, got.get("error")
    ref_logits, ref_tokens = reference(case.family)
    err = float((got["logits"] - ref_logits).abs().max())
    assert err < TOL, f"logits differ from transformers by {err:.2e}"
    assert got["tokens"] == ref_tokens
