"""The auto-planner: inferred specs shard undeclared families exactly; unsafe ones are refused.

References are transformers' own unsharded models; the sharded runs go
through ``api.parallelize`` -> ``resolve_spec`` -> ``inferred_spec`` + the parity
guard, on thread ranks.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from tp_engine import check as check_mod
from tp_engine.api import parallelize, resolve_spec
from tp_engine.check import hypothesis_verdict, inferred_spec, parity_check
from tp_engine.comm.threads import run_threads
from tp_engine.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from tp_engine.models import REGISTRY
from tp_engine.parallelize import describe_spec
from tp_engine.tiny import tiny_model

# Llama-like (and not so llama-like) families without a declared spec, and
# what the planner must find in each. Config kwargs make the heads uneven.
FAMILIES = {
    "olmo": ("OlmoConfig", dict(num_attention_heads=6, num_key_value_heads=6), ("gate_proj", "up_proj"), "down_proj"),
    "starcoder2": ("Starcoder2Config", dict(num_attention_heads=6, num_key_value_heads=2, sliding_window=5), ("c_fc",), "c_proj"),
    "cohere": ("CohereConfig", dict(num_attention_heads=9, num_key_value_heads=3), ("gate_proj", "up_proj"), "down_proj"),
    "stablelm": ("StableLmConfig", dict(num_attention_heads=6, num_key_value_heads=6), ("gate_proj", "up_proj"), "down_proj"),
    "granite": ("GraniteConfig", dict(num_attention_heads=8, num_key_value_heads=4), ("gate_proj", "up_proj"), "down_proj"),
    "phi": ("PhiConfig", dict(num_attention_heads=6, num_key_value_heads=6), ("fc1",), "fc2"),
    "helium": ("HeliumConfig", dict(num_attention_heads=6, num_key_value_heads=3), ("gate_proj", "up_proj"), "down_proj"),
    "gpt_neo": ("GPTNeoConfig", dict(num_heads=6, num_layers=2, attention_types=[[["global", "local"], 1]], window_size=4), ("c_fc",), "c_proj"),
}
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199]])
NEW_TOKENS = 6


def _family_model(name: str) -> nn.Module:
    config_cls, extra, _, _ = FAMILIES[name]
    if name in REGISTRY:
        pytest.skip(f"{name} has a declared spec now; this test is about the auto-planner")
    config = getattr(transformers, config_cls)(**extra)
    return tiny_model(config, seed=1)


def _sharded(comm, model, shares):
    model = parallelize(model, shares, comm=comm)
    with torch.no_grad():
        logits = model(PROMPT).logits
    tokens = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return model.tp_engine_plan, logits, tokens


@pytest.mark.parametrize("world,shares", [(2, None), (3, [3, 2, 1])], ids=["tp2", "tp3-shares-3-2-1"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_inferred_spec_matches_transformers(name, world, shares):
    reference = _family_model(name)
    with torch.no_grad():
        want_logits = reference(PROMPT).logits
    want_tokens = reference.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    copies = [copy.deepcopy(reference) for _ in range(world)]

    results = run_threads(lambda comm: _sharded(comm, copies[comm.rank], shares), world, timeout=300)

    for rank, (plan, logits, tokens) in enumerate(results):
        diff = (logits - want_logits).abs().max().item()
        assert diff < 1e-4, f"{name} rank {rank}: logits differ by {diff}"
        assert torch.equal(tokens, want_tokens), f"{name} rank {rank}: greedy tokens differ"
    # It really was split: the ranks' Q heads partition the model's, none holds all.
    plan = results[0][0]
    assert [h for r in plan.ranks for h in r.q_heads] == list(range(plan.dims.num_q_heads))
    assert all(len(r.q_heads) < plan.dims.num_q_heads for r in plan.ranks)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_inferred_roles(name):
    model = _family_model(name)
    spec = inferred_spec(model)
    _, _, columns, row = FAMILIES[name]
    assert spec.family == f"auto:{model.config.model_type}"
    assert spec.mlp_column == columns and spec.mlp_row == row
    attn = model.get_submodule(spec.layers)[0].get_submodule(spec.attention)
    # Every role points at a Linear of the shape its role implies.
    q, k, v, o = (attn.get_submodule(p) for p in (spec.q_proj, spec.k_proj, spec.v_proj, spec.o_proj))
    assert q.out_features == o.in_features and k.out_features == v.out_features
    assert model.get_submodule(spec.embedding) is model.get_input_embeddings()
    assert model.get_submodule(spec.lm_head) is model.get_output_embeddings()


def test_resolve_spec_uses_the_guarded_inference():
    model = _family_model("olmo")
    spec = resolve_spec(model, 3, None)
    assert spec == inferred_spec(model) and spec.family == "auto:olmo"


def test_bert_style_attention_core():
    model = tiny_model(transformers.BertGenerationConfig(num_attention_heads=6), seed=0)
    spec = inferred_spec(model)
    assert (spec.attention, spec.q_proj, spec.o_proj) == ("attention", "self.query", "output.dense")
    assert spec.mlp == "" and spec.mlp_column == ("intermediate.dense",) and spec.mlp_row == "output.dense"
    assert spec.attention_core == "self"


# ------------------------------------------------------------ partial plans and hypotheses
#
# Every test below shards through parallelize -> resolve_spec -> inferred_spec
# and the parity guard, then compares with transformers' own unsharded model.


def _tiny(config_cls: str, seed: int = 1, **kwargs) -> nn.Module:
    return tiny_model(getattr(transformers, config_cls)(**kwargs), seed=seed)


def _shard_and_run(reference: nn.Module, world: int, shares=None, **forward_kwargs):
    """Shard copies of ``reference`` over ``world`` thread ranks; check logits (and greedy
    tokens) against the unsharded model; return the sharded rank-0 model."""
    with torch.no_grad():
        want = reference(PROMPT, **forward_kwargs).logits
    want_tokens = reference.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    copies = [copy.deepcopy(reference) for _ in range(world)]

    def rank(comm):
        model = parallelize(copies[comm.rank], shares, comm=comm)
        with torch.no_grad():
            logits = model(PROMPT, **forward_kwargs).logits
        tokens = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return model, logits, tokens

    results = run_threads(rank, world, timeout=300)
    for r, (_, logits, tokens) in enumerate(results):
        diff = (logits - want).abs().max().item()
        assert diff < 1e-4, f"rank {r}: logits differ by {diff}"
        assert torch.equal(tokens, want_tokens), f"rank {r}: greedy tokens differ"
    return results[0][0]


def test_cross_attention_is_replicated_and_the_rest_sharded():
    reference = _tiny("BartConfig")
    spec = inferred_spec(reference)
    assert "attention" not in spec.replicate and "mlp" not in spec.replicate
    assert spec.kept_whole == ("encoder_attn",)
    assert describe_spec(reference, spec) == "partial: kept whole: encoder_attn (2/2 layers)"
    # BartForCausalLM only runs its cross-attention when given encoder states:
    # pass some, so the replicated module really computes.
    encoder = torch.randn(1, 5, reference.config.d_model, generator=torch.Generator().manual_seed(3))
    sharded = _shard_and_run(reference, 3, [3, 2, 1], encoder_hidden_states=encoder)
    for layer, ref_layer in zip(sharded.model.decoder.layers, reference.model.decoder.layers):
        assert isinstance(layer.self_attn.q_proj, ColumnParallelLinear)
        assert isinstance(layer.self_attn.out_proj, RowParallelLinear)
        assert isinstance(layer.fc1, ColumnParallelLinear) and isinstance(layer.fc2, RowParallelLinear)
        assert layer.self_attn.q_proj.weight.shape[0] < ref_layer.self_attn.q_proj.weight.shape[0]
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):  # whole, and the very same weights
            mine, theirs = getattr(layer.encoder_attn, name), getattr(ref_layer.encoder_attn, name)
            assert type(mine) is nn.Linear and torch.equal(mine.weight, theirs.weight)


def test_fused_qkv_layout_chosen_by_hypothesis():
    reference = _tiny("PersimmonConfig", num_attention_heads=6, hidden_size=96)
    spec = inferred_spec(reference)
    # Persimmon's query_key_value is per head [q_h | k_h | v_h]: only "grouped" reproduces it.
    assert (spec.qkv_proj, spec.qkv_layout, spec.replicate) == ("query_key_value", "grouped", ())
    assert any("only fused q/k/v layout grouped passes" in n for n in spec.notes), spec.notes
    sharded = _shard_and_run(reference, 3, [3, 2, 1])
    assert all(isinstance(layer.self_attn.query_key_value, ColumnParallelLinear) for layer in sharded.model.layers)


def test_a_wrong_layout_hypothesis_is_rejected():
    reference = _tiny("PersimmonConfig", num_attention_heads=6, hidden_size=96)
    right = inferred_spec(reference)
    wrong = hypothesis_verdict(reference, right.replace(qkv_layout="concat"), 2)
    assert not wrong.ok and wrong.max_abs_diff > 1e-2  # wrong by orders of magnitude, not by rounding
    assert hypothesis_verdict(reference, right, 2).ok


def test_fused_gate_up_layout_chosen_by_hypothesis():
    reference = _tiny("GlmConfig", num_attention_heads=6, num_key_value_heads=2, head_dim=16, hidden_size=96)
    spec = inferred_spec(reference)
    assert (spec.mlp_column, spec.mlp_stacked, spec.mlp_stacked_layout) == (("gate_up_proj",), 2, "blocks")
    interleaved = hypothesis_verdict(reference, spec.replace(mlp_stacked_layout="interleaved"), 2)
    assert not interleaved.ok and interleaved.max_abs_diff > 1e-2
    _shard_and_run(reference, 2)


def test_no_passing_layout_replicates_that_attention():
    # MPT's fused Wqkv is [Q | K | V], but its ALiBi position bias spans all heads
    # inside the attention: no head split reproduces it, so the attention stays
    # whole on every rank and only the MLP is split.
    reference = _tiny("MptConfig")
    spec = inferred_spec(reference)
    assert spec.replicate == ("attention",)
    assert any("none of fused q/k/v layout concat" in n for n in spec.notes), spec.notes
    sharded = _shard_and_run(reference, 2)
    block = sharded.transformer.blocks[0]
    assert type(block.attn.Wqkv) is nn.Linear and isinstance(block.ffn.up_proj, ColumnParallelLinear)


def test_mixture_of_experts_inferred_and_sharded():
    reference = _tiny("Qwen3MoeConfig", num_attention_heads=6, num_key_value_heads=2, head_dim=16, hidden_size=96)
    spec = inferred_spec(reference)
    assert (spec.mlp, spec.moe_experts, spec.moe_gate_up, spec.moe_down) == ("mlp", "experts", "gate_up_proj", "down_proj")
    assert spec.replicate == ()
    sharded = _shard_and_run(reference, 3, [3, 2, 1])
    experts, full = sharded.model.layers[0].mlp.experts, reference.model.layers[0].mlp.experts
    assert experts.down_proj.shape[2] < full.down_proj.shape[2]  # each rank holds some columns of every expert
    assert experts.gate_up_proj.shape[1] == 2 * experts.down_proj.shape[2]


def test_mixture_of_experts_with_shared_experts_and_dense_layers():
    # GLM-4-MoE: a dense first layer, then MoE layers with a shared expert.
    reference = _tiny("Glm4MoeConfig", num_attention_heads=6, num_key_value_heads=2, head_dim=16, hidden_size=96)
    spec = inferred_spec(reference)
    kinds = [s for _, s in spec.layer_kinds]
    assert len(kinds) == 2 and all(s.replicate == () for s in kinds)
    moe = next(s for s in kinds if s.moe_experts)
    assert (moe.moe_experts, moe.moe_shared_expert) == ("experts", "shared_experts")
    sharded = _shard_and_run(reference, 2)
    assert isinstance(sharded.model.layers[0].mlp.gate_proj, ColumnParallelLinear)
    assert isinstance(sharded.model.layers[1].mlp.shared_experts.gate_proj, ColumnParallelLinear)


def test_experts_with_biases_add_the_down_bias_once():
    # GPT-OSS: transposed, interleaved [g0, u0, ...] experts with biases. Every
    # rank's partial expert output carries the routed down bias; the plan must
    # count it once after the all-reduce (at TP=3 a double count would show).
    reference = _tiny("GptOssConfig", num_attention_heads=6, num_key_value_heads=2, head_dim=16, hidden_size=96)
    spec = inferred_spec(reference)
    assert spec.moe_experts == "experts" and spec.replicate == ()
    sharded = _shard_and_run(reference, 3)
    experts = sharded.model.layers[0].mlp.experts
    assert experts.gate_up_proj_bias.shape[1] == experts.gate_up_proj.shape[2] < reference.model.layers[0].mlp.experts.gate_up_proj.shape[2]


def test_hybrid_layers_planned_one_by_one():
    # Jamba: Mamba layers (dense or MoE MLPs) and attention layers.
    reference = _tiny("JambaConfig")
    spec = inferred_spec(reference)
    assert len(spec.layer_kinds) == 3
    assert describe_spec(reference, spec) == "partial: attention replicated in 4/5 layers; kept whole: mamba (4/5 layers)"
    sharded = _shard_and_run(reference, 2)
    for layer, ref_layer in zip(sharded.model.layers, reference.model.layers):
        if hasattr(ref_layer, "mamba"):
            assert torch.equal(layer.mamba.in_proj.weight, ref_layer.mamba.in_proj.weight)  # whole
        else:
            assert isinstance(layer.self_attn.q_proj, ColumnParallelLinear)
        if hasattr(ref_layer.feed_forward, "experts"):  # MoE MLPs: every expert's columns split
            assert layer.feed_forward.experts.down_proj.shape[2] < ref_layer.feed_forward.experts.down_proj.shape[2]
        else:
            assert isinstance(layer.feed_forward.gate_proj, ColumnParallelLinear)


def test_scaled_embedding_is_split_with_its_scale():
    reference = _tiny("BioGptConfig", num_attention_heads=6, hidden_size=96)
    assert reference.get_input_embeddings().embed_scale != 1.0
    spec = inferred_spec(reference)
    assert spec.replicate == ()
    sharded = _shard_and_run(reference, 2)
    emb = sharded.get_input_embeddings()
    assert isinstance(emb, VocabParallelEmbedding)
    assert float(emb.embed_scale) == pytest.approx(reference.get_input_embeddings().embed_scale, rel=1e-6)


def test_per_head_parameters_follow_their_heads():
    # GPT-OSS-style attention sinks, one per Q head (Granite-SWA): split with the heads.
    reference = _tiny("GraniteSWAConfig", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    spec = inferred_spec(reference)
    assert spec.q_head_params == ("sinks",) and spec.replicate == ()
    sharded = _shard_and_run(reference, 3, [3, 2, 1])
    assert sharded.model.layers[0].self_attn.sinks.shape[0] == 3  # rank 0's share of 6 heads


# ------------------------------------------------------------ what stays whole, and why

REPLICATED = {
    # model type: (config, kwargs, the role kept whole, why)
    # q/k LayerNorms with per-head weights (heads, head_dim): not head_dim-wide, not a plain RMS norm
    # over the whole projection (Olmo 2's, which is split with the heads: test_olmo2.py).
    "cohere": ("CohereConfig", {"use_qk_norm": True}, "attention", "q_norm"),
    # ffn_sub_norm spans the MLP's columns; attn_sub_norm spans the Q heads' rows and is split with them.
    "bitnet": ("BitNetConfig", {}, "mlp", "ffn_sub_norm"),
    "minicpm3": ("MiniCPM3Config", {}, "attention", "latent"),
    "codegen": ("CodeGenConfig", {}, "attention", "none of fused q/k/v layout"),  # mp_num-interleaved qkv
    "mllama": ("MllamaConfig", {}, "embedding", "328 rows"),  # 8 extra image-token rows
}


@pytest.mark.parametrize("name", list(REPLICATED))
def test_replicates_what_it_cannot_split_and_says_why(name):
    config_cls, extra, role, why = REPLICATED[name]
    model = tiny_model(getattr(transformers, config_cls)(**extra))
    spec = inferred_spec(model)
    assert role in spec.replicate or any(role in s.replicate for _, s in spec.layer_kinds)
    assert any(why in n for n in spec.notes), spec.notes
    assert describe_spec(model, spec).startswith("partial: ")
    for world in (2, 3):
        report = parity_check(model, world)  # the model: its class and config
        assert report.ok and report.partial, report.reason


def test_a_linear_with_its_own_forward_is_kept_whole():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = _family_model("olmo")
    for layer in model.model.layers:
        old = layer.self_attn.q_proj
        layer.self_attn.q_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    spec = inferred_spec(model)
    assert spec.replicate == ("attention",)
    assert any("ScaledLinear with its own forward" in n for n in spec.notes), spec.notes


def test_an_unknown_projection_inside_attention_keeps_it_whole():
    model = _family_model("olmo")
    for layer in model.model.layers:
        layer.self_attn.gate = nn.Linear(model.config.hidden_size, 7)  # neither per head nor per Q row
    spec = inferred_spec(model)
    assert spec.replicate == ("attention",)
    assert any("extra projection" in n for n in spec.notes), spec.notes


def test_heads_that_do_not_match_projection_shapes_keep_attention_whole():
    model = _family_model("olmo")
    model.config.num_key_value_heads = 3  # the k/v projections hold 6 heads
    spec = inferred_spec(model)
    assert spec.replicate == ("attention",)
    assert any("disagree with 6 Q / 3 KV heads" in n for n in spec.notes), spec.notes


def test_a_disagreement_with_transformers_tp_plan_must_be_proven(monkeypatch):
    model = _family_model("olmo")
    plan = dict(type(model.config).base_model_tp_plan)
    plan["layers.*.self_attn.o_proj"] = "colwise"
    monkeypatch.setattr(type(model.config), "base_model_tp_plan", plan)
    calls = []
    real = check_mod._parity
    monkeypatch.setattr(check_mod, "_hypotheses", {})
    monkeypatch.setattr(check_mod, "_parity", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    spec = inferred_spec(model)
    assert calls == [2]  # not taken on trust: checked on a tiny copy first
    assert any("base_model_tp_plan marks layers.*.self_attn.o_proj as 'colwise'" in n for n in spec.notes), spec.notes
    assert spec.replicate == ()  # o_proj really is row-parallel: the check proved the planner right


def test_a_layer_structure_the_tiny_copy_lacks_is_refused_by_the_guard():
    # Layers that differ are planned kind by kind, but the plan is only used if
    # a tiny copy of the architecture has the same kinds (here it does not: the
    # rename exists only in this instance), so the guard refuses it.
    model = _family_model("olmo")
    mlp = model.model.layers[1].mlp
    mlp.w2 = mlp.down_proj  # same role, another name: a second layer kind
    del mlp.down_proj
    spec = inferred_spec(model)
    assert len(spec.layer_kinds) == 2

    def fn(comm):
        return parallelize(model, comm=comm)

    with pytest.raises(ValueError, match="the tiny copy infers"):
        run_threads(fn, 2, timeout=120)


REFUSALS = {
    "mamba": ("MambaConfig", {}, "cannot read head counts"),  # no attention at all
    "jetmoe": ("JetMoeConfig", {}, "nothing in the layers can be sharded"),  # mixture of attention heads, own experts
    "whisper": ("WhisperConfig", {}, "no plan can be proven on a tiny copy"),  # transformers' own generate fails
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refuses_with_the_reason(name):
    config_cls, extra, reason = REFUSALS[name]
    model = tiny_model(getattr(transformers, config_cls)(**extra))
    with pytest.raises(ValueError, match=reason) as info:
        inferred_spec(model)
    assert str(info.value).startswith(f"{model.config.model_type}: ")


def test_parallelize_refuses_an_unsafe_model_with_the_reason():
    model = tiny_model(transformers.JetMoeConfig())

    def fn(comm):
        return parallelize(model, comm=comm)

    with pytest.raises(ValueError, match="nothing in the layers can be sharded"):
        run_threads(fn, 1, timeout=60)
