"""The auto-planner: inferred specs shard undeclared families exactly; unsafe ones are refused.

References are transformers' own unsharded models; the sharded runs go
through ``parallelize`` -> ``resolve_spec`` -> ``infer_spec`` + the parity
guard, on thread ranks.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from tp_engine.check import tiny_model
from tp_engine.comm.threads import run_threads
from tp_engine.models import SPECS, resolve_spec
from tp_engine.models.auto import infer_spec
from tp_engine.parallelize import parallelize

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
    if name in SPECS:
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
    spec = infer_spec(model)
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
    assert spec == infer_spec(model) and spec.family == "auto:olmo"


def test_bert_style_attention_core():
    model = tiny_model(transformers.BertGenerationConfig(num_attention_heads=6), seed=0)
    spec = infer_spec(model)
    assert (spec.attention, spec.q_proj, spec.o_proj) == ("attention", "self.query", "output.dense")
    assert spec.mlp == "" and spec.mlp_column == ("intermediate.dense",) and spec.mlp_row == "output.dense"
    assert spec.attention_core == "self"


# ------------------------------------------------------------ refusals

REFUSALS = {
    "olmoe": ("OlmoeConfig", {}, "mixture of experts"),
    "bart": ("BartConfig", {}, "cross-attention"),
    "codegen": ("CodeGenConfig", {}, "fused q/k/v projection"),
    "mpt": ("MptConfig", {}, "fused q/k/v projection attn.Wqkv"),
    "olmo2": ("Olmo2Config", {}, "q_norm"),  # normalizes q over all heads at once
    "minicpm3": ("MiniCPM3Config", {}, "latent"),
    "glm": ("GlmConfig", {}, "fused gate/up projection"),
    "biogpt": ("BioGptConfig", {}, "own forward"),  # scaled embedding
    "bitnet": ("BitNetConfig", {}, "attn_sub_norm"),
    "granite_swa": ("GraniteSWAConfig", {}, "sinks"),
    "lfm2": ("Lfm2Config", {}, "the planner reads intermediate size"),  # auto-adjusted MLP width
    "ctrl": ("CTRLConfig", {}, "no recognisable MLP"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refuses_with_the_reason(name):
    config_cls, extra, reason = REFUSALS[name]
    model = tiny_model(getattr(transformers, config_cls)(**extra))
    with pytest.raises(ValueError, match=reason) as info:
        infer_spec(model)
    assert str(info.value).startswith(f"{model.config.model_type}: ")


def test_refuses_heads_that_do_not_match_projection_shapes():
    model = _family_model("olmo")
    model.config.num_key_value_heads = 3  # the k/v projections hold 6 heads
    with pytest.raises(ValueError, match="disagree with 6 Q / 3 KV heads"):
        infer_spec(model)


def test_refuses_a_linear_with_its_own_forward():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = _family_model("olmo")
    for layer in model.model.layers:
        old = layer.self_attn.q_proj
        layer.self_attn.q_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match="ScaledLinear with its own forward"):
        infer_spec(model)


def test_refuses_an_extra_projection_inside_attention():
    model = _family_model("olmo")
    for layer in model.model.layers:
        layer.self_attn.gate = nn.Linear(model.config.hidden_size, model.config.hidden_size)
    with pytest.raises(ValueError, match="extra projection"):
        infer_spec(model)


def test_refuses_when_transformers_tp_plan_disagrees(monkeypatch):
    model = _family_model("olmo")
    plan = dict(type(model.config).base_model_tp_plan)
    plan["layers.*.self_attn.o_proj"] = "colwise"
    monkeypatch.setattr(type(model.config), "base_model_tp_plan", plan)
    with pytest.raises(ValueError, match="base_model_tp_plan marks layers.\\*.self_attn.o_proj as 'colwise'"):
        infer_spec(model)


def test_refuses_layers_that_differ():
    model = _family_model("olmo")
    mlp = model.model.layers[1].mlp
    mlp.w2 = mlp.down_proj  # same role, another name: the layers no longer share one spec
    del mlp.down_proj
    with pytest.raises(ValueError, match="layers differ in structure"):
        infer_spec(model)


def test_parallelize_refuses_an_unsafe_model_with_the_reason():
    model = tiny_model(transformers.OlmoeConfig())

    def fn(comm):
        return parallelize(model, comm=comm)

    with pytest.raises(ValueError, match="mixture of experts"):
        run_threads(fn, 1, timeout=60)
