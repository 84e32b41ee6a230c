"""Declared specs beyond the Llama layout compute what transformers computes.

For each family (GPT-2, GPT-NeoX, Phi-3, Falcon, GPT-J, BLOOM, OPT, BERT,
RoBERTa, Mixtral, Qwen2-MoE) and two splits each (TP=2, and an uneven,
weighted or KV-replicated one): logits (encoders: last hidden states and
masked-LM logits) within 1e-4 of the unsharded transformers model, 16 greedy
tokens identical (decoders), every parameter's ``tp_shard`` naming exactly
the slice of the unsharded tensor it holds (what loaders read), and the KV
cache holding only the rank's heads.

All cases of one world size run in one launch, so the file stays fast on
two cores; each case is still its own test.
"""
from __future__ import annotations

import copy
import functools
import traceback
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import tp_engine
from conftest import run_ranks
from tp_engine.comm.base import SingleProcessCommunicator

NEW_TOKENS = 16
TOL = 1e-4
VOCAB = 257
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199]])
COMMON = dict(vocab_size=VOCAB, initializer_range=0.2, num_hidden_layers=2)


@dataclass(frozen=True)
class Case:
    config: str  # transformers config class
    model: str  # transformers model class
    kwargs: dict[str, Any]
    world: int
    shares: tuple[float, ...] | None = None
    encoder: bool = False
    cache_heads: str = "kv"  # what the KV cache's head dim holds: "kv" or "q" heads
    reduces_per_layer: int = 2  # all-reduces per layer in a forward (parallel blocks: 1)
    extra_models: tuple[str, ...] = field(default=())  # encoders: more model classes to check


def _config(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    return {**COMMON, **defaults, **overrides}


def _gpt2(**kw):
    return _config(dict(n_embd=64, n_head=4, n_inner=None, n_positions=64), kw)


def _neox(**kw):
    return _config(dict(hidden_size=64, num_attention_heads=4, intermediate_size=144, max_position_embeddings=64,
                        rotary_pct=0.25), kw)


def _phi3(**kw):
    return _config(dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96,
                        max_position_embeddings=64, pad_token_id=0), kw)


def _falcon(**kw):
    return _config(dict(hidden_size=64, num_attention_heads=4), kw)


def _falcon_grouped_cache_heads() -> str:
    """What the Falcon-40B layout caches: transformers 5.23 broadcasts K/V to the Q heads before the
    cache (its ``FalconAttention._split_heads``); 5.25's attention refactor caches the KV heads (GQA)."""
    from transformers.models.falcon import modeling_falcon

    return "q" if hasattr(modeling_falcon.FalconAttention, "_split_heads") else "kv"


def _gptj(**kw):
    return _config(dict(n_embd=64, n_head=4, rotary_dim=8, n_positions=64), kw)


def _bloom(**kw):
    return _config(dict(hidden_size=80, n_head=5), kw)


def _opt(**kw):
    return _config(dict(hidden_size=64, num_attention_heads=4, ffn_dim=112, max_position_embeddings=64), kw)


def _bert(**kw):
    return _config(dict(hidden_size=64, num_attention_heads=4, intermediate_size=112, max_position_embeddings=64), kw)


def _mixtral(**kw):
    return _config(dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=40,
                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64), kw)


def _qwen2_moe(**kw):
    return _config(dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=72,
                        moe_intermediate_size=40, shared_expert_intermediate_size=56, num_experts=4,
                        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
                        max_position_embeddings=64), kw)


CASES: dict[str, Case] = {
    # GPT-2: Conv1D, fused [Q|K|V]; 4 heads -> 2+2, then 2+1+1 with MLP 256 -> 86/85/85.
    "gpt2-tp2": Case("GPT2Config", "GPT2LMHeadModel", _gpt2(), 2),
    "gpt2-tp3": Case("GPT2Config", "GPT2LMHeadModel", _gpt2(), 3),
    # GPT-NeoX: per-head interleaved qkv, partial rotary; parallel and sequential residual.
    "gpt_neox-tp2-parallel": Case("GPTNeoXConfig", "GPTNeoXForCausalLM", _neox(use_parallel_residual=True), 2, reduces_per_layer=1),
    "gpt_neox-tp3-sequential": Case("GPTNeoXConfig", "GPTNeoXForCausalLM", _neox(use_parallel_residual=False), 3),
    # Phi-3: fused GQA qkv and [gate|up]; 8 Q / 4 KV -> 4+4, and shares 3:1 -> 6+2.
    "phi3-tp2": Case("Phi3Config", "Phi3ForCausalLM", _phi3(), 2),
    "phi3-shares-3-1": Case("Phi3Config", "Phi3ForCausalLM", _phi3(), 2, shares=(3, 1)),
    # Falcon-7B style: multi-query (1 KV head, replicated on every rank), parallel attention.
    "falcon-mqa-tp2": Case("FalconConfig", "FalconForCausalLM", _falcon(multi_query=True, parallel_attn=True), 2, reduces_per_layer=1),
    "falcon-mqa-tp3": Case("FalconConfig", "FalconForCausalLM", _falcon(multi_query=True, parallel_attn=True), 3, reduces_per_layer=1),
    # Falcon-40B style grouped layout: 8 Q / 2 KV; TP=3 cuts inside groups (3+2+3, KV replicated).
    "falcon-new-arch-tp2": Case(
        "FalconConfig", "FalconForCausalLM",
        _falcon(hidden_size=128, num_attention_heads=8, new_decoder_architecture=True, num_kv_heads=2), 2,
        cache_heads=_falcon_grouped_cache_heads(), reduces_per_layer=1,
    ),
    "falcon-new-arch-tp3": Case(
        "FalconConfig", "FalconForCausalLM",
        _falcon(hidden_size=128, num_attention_heads=8, new_decoder_architecture=True, num_kv_heads=2), 3,
        cache_heads=_falcon_grouped_cache_heads(), reduces_per_layer=1,
    ),
    # Falcon without multi-query and without parallel attention: per-head [q|k|v], sequential block.
    "falcon-mha-sequential-tp3": Case(
        "FalconConfig", "FalconForCausalLM", _falcon(multi_query=False, parallel_attn=False, bias=True), 3
    ),
    # GPT-J: parallel attention + MLP, one all-reduce per layer; lm_head with bias.
    "gptj-tp2": Case("GPTJConfig", "GPTJForCausalLM", _gptj(), 2, reduces_per_layer=1),
    "gptj-tp3": Case("GPTJConfig", "GPTJForCausalLM", _gptj(), 3, reduces_per_layer=1),
    # BLOOM: ALiBi, 5 heads (slopes of a non-power-of-two count): 3+2, then 2+2+1.
    "bloom-tp2": Case("BloomConfig", "BloomForCausalLM", _bloom(), 2),
    "bloom-tp3": Case("BloomConfig", "BloomForCausalLM", _bloom(), 3),
    # OPT: plain, then with project_in/project_out (word_embed_proj_dim 32) and shares 3:1.
    "opt-tp2": Case("OPTConfig", "OPTForCausalLM", _opt(), 2),
    "opt-project-shares-3-1": Case("OPTConfig", "OPTForCausalLM", _opt(word_embed_proj_dim=32), 2, shares=(3, 1)),
    # Encoders: BertModel last_hidden_state, and masked-LM logits.
    "bert-tp2": Case("BertConfig", "BertModel", _bert(), 2, encoder=True, extra_models=("BertForMaskedLM",)),
    "bert-tp3": Case("BertConfig", "BertModel", _bert(), 3, encoder=True, extra_models=("BertForMaskedLM",)),
    "roberta-tp2": Case(
        "RobertaConfig", "RobertaModel", _bert(pad_token_id=1), 2, encoder=True, extra_models=("RobertaForMaskedLM",)
    ),
    "roberta-shares-3-1": Case(
        "RobertaConfig", "RobertaModel", _bert(pad_token_id=1), 2, shares=(3, 1), encoder=True,
        extra_models=("RobertaForMaskedLM",),
    ),
    # MoE: fused 3-D experts sharded by intermediate columns, one all-reduce per block.
    "mixtral-tp2": Case("MixtralConfig", "MixtralForCausalLM", _mixtral(), 2),
    "mixtral-tp3": Case("MixtralConfig", "MixtralForCausalLM", _mixtral(), 3),
    "qwen2_moe-tp2": Case("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _qwen2_moe(), 2),
    "qwen2_moe-shares-3-1": Case("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _qwen2_moe(), 2, shares=(3, 1)),
}


def build(config_name: str, model_name: str, kwargs: dict[str, Any], seed: int = 0) -> nn.Module:
    """A tiny random float32 model; weights scaled up (initializer_range) so logits are far from ties."""
    import transformers

    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    if getattr(model, "generation_config", None) is not None:
        # Always generate NEW_TOKENS tokens: no early stop at a random EOS.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return model


def _encoder_inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199], [2, 40, 41, 42, 43, 44, 45, 46, 0, 0, 0]])
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padded second sequence: the mask reaches every rank's heads
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(model: nn.Module, encoder: bool) -> torch.Tensor:
    with torch.no_grad():
        if encoder:
            out = model(**_encoder_inputs())
            return out.logits if hasattr(out, "logits") else out.last_hidden_state
        return model(PROMPT).logits


def _count_reduces(comm, fn) -> int:
    """How many all-reduces ``fn()`` makes on ``comm``."""
    calls = []
    original = comm.all_reduce_

    def counting(tensor):
        calls.append(tuple(tensor.shape))
        return original(tensor)

    comm.all_reduce_ = counting  # instance attribute: the layers call comm.all_reduce_
    try:
        fn()
    finally:
        del comm.all_reduce_
    return len(calls)


def _shard_mismatches(model: nn.Module, full: dict[str, torch.Tensor]) -> list[str]:
    """Parameters whose value is not the slice their tp_shard names (what a loader would read)."""
    bad = []
    for name, param in model.named_parameters():
        spec = getattr(param, "tp_shard", None)
        expected = full[name] if spec is None else spec.take(full[name])
        if expected.shape != param.shape or not torch.equal(expected, param.detach()):
            bad.append(name)
    return bad


def _rank_cases(models: dict[str, nn.Module], cases: dict[str, Case]) -> dict[str, dict]:
    """On every rank: shard each model, run it, report (errors are reported, not raised,
    so one family's failure leaves the others' results)."""
    tp_engine.init()
    results: dict[str, dict] = {}
    for key, model in models.items():
        case = cases[key.split("/")[0]]
        try:
            full = {n: p.detach().clone() for n, p in model.named_parameters()}
            shares = list(case.shares) if case.shares else None
            model = tp_engine.parallelize(model, shares=shares)
            rank_plan = model.tp_engine_plan[model.tp_engine_rank]
            result = {"out": _outputs(model, case.encoder), "bad_shards": _shard_mismatches(model, full)}
            result["reduces"] = _count_reduces(tp_engine.current().comm, lambda: _outputs(model, case.encoder))
            if not case.encoder:
                with torch.no_grad():
                    out = model(PROMPT, use_cache=True)
                result["cache_heads"] = [tuple(layer.keys.shape)[1] for layer in out.past_key_values.layers]
                result["expected_heads"] = len(rank_plan.q_heads if case.cache_heads == "q" else rank_plan.kv_heads)
                result["generated"] = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
            results[key] = result
        except Exception:  # reported per case by the test
            results[key] = {"error": traceback.format_exc()}
    return results


@functools.lru_cache(maxsize=None)
def _launch(world: int) -> tuple[dict, dict]:
    """Reference outputs (unsharded transformers) and rank results for every case of this world size."""
    cases = {name: c for name, c in CASES.items() if c.world == world}
    models: dict[str, nn.Module] = {}
    reference: dict[str, dict] = {}
    for name, case in cases.items():
        for model_name in (case.model,) + case.extra_models:
            key = f"{name}/{model_name}"
            model = build(case.config, model_name, case.kwargs)
            ref = {"out": _outputs(model, case.encoder)}
            if not case.encoder:
                ref["generated"] = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
                assert ref["generated"].shape[1] == PROMPT.shape[1] + NEW_TOKENS
            reference[key] = ref
            models[key] = copy.deepcopy(model)
    return reference, run_ranks(_rank_cases, world, models, cases)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(name):
    case = CASES[name]
    reference, results = _launch(case.world)
    keys = [k for k in reference if k.split("/")[0] == name]
    assert keys
    for key in keys:
        for rank, by_case in enumerate(results):
            result = by_case[key]
            assert "error" not in result, f"{key} rank {rank} failed:\n{result.get('error')}"
            assert not result["bad_shards"], f"{key} rank {rank}: tp_shard does not describe {result['bad_shards']}"
            # One for the vocab-parallel embedding, then per layer.
            expected_reduces = 1 + COMMON["num_hidden_layers"] * case.reduces_per_layer
            assert result["reduces"] == expected_reduces, (
                f"{key} rank {rank}: {result['reduces']} all-reduces per forward, expected {expected_reduces}"
            )
            diff = (result["out"] - reference[key]["out"]).abs().max().item()
            assert diff < TOL, f"{key} rank {rank}: outputs differ by {diff}"
            if not case.encoder:
                assert torch.equal(result["generated"], reference[key]["generated"]), f"{key} rank {rank}: greedy tokens differ"
                assert all(h == result["expected_heads"] for h in result["cache_heads"]), (
                    f"{key} rank {rank}: cache holds {result['cache_heads']} heads, plan says {result['expected_heads']}"
                )


# ------------------------------------------------------------ gradients through the new mechanisms

GRAD_CASES = {
    # deferred single all-reduce (evaluated in eval mode, where it is active)
    "gptj": ("GPTJConfig", "GPTJForCausalLM", _gptj()),
    # training mode: each branch reduces by itself (dropout must see full sums); no dropout here
    "gptj-train": ("GPTJConfig", "GPTJForCausalLM", _gptj(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    # fused qkv with a replicated KV head: only K/V rows are summed across ranks
    "falcon-mqa": ("FalconConfig", "FalconForCausalLM", _falcon(multi_query=True, parallel_attn=True)),
    # MoE: experts' inputs and routing weights, shared-expert gate
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _qwen2_moe()),
    # Conv1D column/row layers
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _gpt2()),
}


def _loss(model: nn.Module) -> torch.Tensor:
    return model(PROMPT, labels=PROMPT).loss


def _rank_grads(models: dict[str, nn.Module]) -> dict[str, Any]:
    tp_engine.init()
    out = {}
    for name, model in models.items():
        model = tp_engine.parallelize(model)  # eval mode (no dropout, deferral active) unless "-train"
        loss = _loss(model)
        loss.backward()
        out[name] = (loss.detach(), {n: (p.grad.clone(), getattr(p, "tp_shard", None)) for n, p in model.named_parameters()})
    return out


def test_gradients_match_unsharded():
    models, expected = {}, {}
    for name, (config, cls, kwargs) in GRAD_CASES.items():
        model = build(config, cls, kwargs).train(name.endswith("-train"))
        models[name] = copy.deepcopy(model)
        loss = _loss(model)
        loss.backward()
        expected[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    results = run_ranks(_rank_grads, 2, models)
    for rank, by_name in enumerate(results):
        for name, (loss, grads) in by_name.items():
            ref_loss, ref_grads = expected[name]
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
            assert grads.keys() == ref_grads.keys(), f"{name}: parameters differ"
            for pname, (grad, spec) in grads.items():
                want = ref_grads[pname] if spec is None else spec.take(ref_grads[pname])
                torch.testing.assert_close(
                    grad, want, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} rank {rank} {pname}: {m}"
                )


# ------------------------------------------------------------ loading from a checkpoint

LOAD_CASES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _gpt2()),  # Conv1D: column slices along dim 1
    "falcon-mqa": ("FalconConfig", "FalconForCausalLM", _falcon(multi_query=True, parallel_attn=True)),  # [Q|K|V]
    "bloom": ("BloomConfig", "BloomForCausalLM", _bloom()),  # per-head [q|k|v]
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _phi3()),  # fused qkv and [gate|up]
}


def _rank_load(paths: dict[str, str]) -> dict[str, torch.Tensor]:
    import os

    os.environ["TP_ENGINE_NO_PROGRESS"] = "1"
    tp_engine.init()
    out = {}
    for name, path in paths.items():
        model = tp_engine.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            out[name] = model(PROMPT).logits
    return out


def test_from_pretrained_reads_the_right_slices(tmp_path):
    """The loader reads each rank's pieces of fused and Conv1D tensors from safetensors by tp_shard alone."""
    paths, expected = {}, {}
    for name, (config, cls, kwargs) in LOAD_CASES.items():
        model = build(config, cls, kwargs)
        expected[name] = _outputs(model, encoder=False)
        paths[name] = str(tmp_path / name)
        model.save_pretrained(paths[name])
    for rank, by_name in enumerate(run_ranks(_rank_load, 2, paths)):
        for name, logits in by_name.items():
            diff = (logits - expected[name]).abs().max().item()
            assert diff < TOL, f"{name} rank {rank}: logits after loading differ by {diff}"


# ------------------------------------------------------------ clear errors


def _parallelize_alone(model: nn.Module) -> nn.Module:
    return tp_engine.parallelize(model, comm=SingleProcessCommunicator())


def test_wrong_module_type_names_the_path():
    model = build("GPT2Config", "GPT2LMHeadModel", _gpt2())
    model.transformer.h[1].attn.c_attn = nn.Identity()
    with pytest.raises(TypeError, match=r"transformer\.h\.1\.attn\.c_attn: expected nn\.Linear or Conv1D, found Identity"):
        _parallelize_alone(model)


def test_missing_module_names_the_path():
    model = build("Phi3Config", "Phi3ForCausalLM", _phi3())
    del model.model.layers[0].mlp.gate_up_proj
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_up_proj: no such module"):
        _parallelize_alone(model)


def test_fused_width_mismatch_is_refused():
    model = build("Phi3Config", "Phi3ForCausalLM", _phi3())
    model.model.layers[0].self_attn.qkv_proj = nn.Linear(128, 100, bias=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.qkv_proj: fused q/k/v has 100 outputs"):
        _parallelize_alone(model)


def test_falcon_alibi_is_refused():
    model = build("FalconConfig", "FalconForCausalLM", _falcon(alibi=True))
    with pytest.raises(ValueError, match="alibi=True is not supported"):
        _parallelize_alone(model)
