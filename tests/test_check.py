"""Tiny configs, the parity check, the guard, and ``tp-engine check``."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from tp_engine import check as check_mod
from tp_engine.check import ParityReport, check_model, guard_auto_spec, inferred_spec, parity_check
from tp_engine.cli import main
from tp_engine.models import REGISTRY
from tp_engine.models.spec import ArchSpec
from tp_engine.tiny import TINY_VOCAB, tiny_config, tiny_model

# Persimmon fuses q/k/v per head ([q_h | k_h | v_h], the "grouped" layout). A
# hand spec that reads the same weights as [all Q | all K | all V] ("concat")
# shards without any error and computes something else: the kind of plan the
# parity check exists to catch (the auto-planner tries both layouts and keeps
# the one that passes).
PERSIMMON_RIGHT = ArchSpec(
    family="hand:persimmon", attention="self_attn", qkv_proj="query_key_value", qkv_layout="grouped", o_proj="dense",
    q_head_attrs=("num_heads",), kv_head_attrs=(), q_width_attrs=("hidden_size",),
    mlp="mlp", mlp_column=("dense_h_to_4h",), mlp_row="dense_4h_to_h",
)
PERSIMMON_WRONG = PERSIMMON_RIGHT.replace(qkv_layout="concat")


def _llama(heads: int, kv: int, **kwargs) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=64 * heads, num_attention_heads=heads, num_key_value_heads=kv, **kwargs)


# ------------------------------------------------------------ tiny_config


def test_tiny_config_keeps_class_and_heads():
    config = _llama(12, 4, num_hidden_layers=30)
    tiny = tiny_config(config)
    assert type(tiny) is type(config)
    assert (tiny.num_attention_heads, tiny.num_key_value_heads) == (12, 4)
    assert tiny.num_hidden_layers == 2
    assert tiny.head_dim == 16 and tiny.hidden_size == 12 * 16
    assert tiny.intermediate_size < 1000 and tiny.vocab_size == TINY_VOCAB
    assert tiny.max_position_embeddings <= 128
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tiny, name)
        assert value is None or value < tiny.vocab_size
    assert config.num_hidden_layers == 30  # the original is untouched


def test_tiny_config_keeps_every_layer_type():
    config = transformers.Gemma3TextConfig()  # 5 sliding layers, then 1 full, repeated
    tiny = tiny_config(config)
    assert set(tiny.layer_types) == set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert tiny.num_hidden_layers == len(tiny.layer_types) == 6
    assert tiny.sliding_window <= 6
    assert (tiny.num_attention_heads, tiny.num_key_value_heads) == (config.num_attention_heads, config.num_key_value_heads)


def test_tiny_config_other_spellings_and_sub_configs():
    gpt2 = tiny_config(transformers.GPT2Config())  # n_layer / n_embd / n_head / n_positions
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.n_positions) == (2, 12, 12 * 16, 128)
    opt = tiny_config(transformers.OPTConfig())  # ffn_dim / word_embed_proj_dim
    assert opt.ffn_dim < 1000 and opt.word_embed_proj_dim <= opt.hidden_size
    composite = tiny_config(transformers.Gemma3Config())
    assert composite.text_config.num_hidden_layers == 6 and composite.text_config.vocab_size == TINY_VOCAB
    assert composite.vision_config.num_hidden_layers == 2
    assert composite.image_token_id < composite.text_config.vocab_size


def test_tiny_model_is_seeded_and_leaves_the_rng_alone():
    config = _llama(4, 2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = tiny_model(config, seed=5), tiny_model(config, seed=5)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG did not move
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert a.model.layers[0].self_attn.q_proj.weight.std() > 0.05  # not transformers' 0.02 init


# ------------------------------------------------------------ parity_check


@pytest.mark.parametrize("world,shares", [(2, None), (3, [1, 2, 1])])
def test_parity_check_declared_and_auto(world, shares):
    llama = parity_check(_llama(6, 3), world, shares)
    assert isinstance(llama, ParityReport)
    assert llama.ok and llama.greedy_match and llama.max_abs_diff < 1e-4 and llama.reason == ""
    assert llama.plan_source == ("spec" if "llama" in REGISTRY else "auto")
    olmo = parity_check(transformers.OlmoConfig(hidden_size=384, num_attention_heads=6), world, shares)
    assert olmo.ok and olmo.plan_source == "auto", olmo.reason
    assert (olmo.world_size, olmo.shares) == (world, tuple(shares) if shares else None)


def test_parity_check_reports_a_refusal():
    # JetMoE mixes attention heads (its kv_proj is no q/k/v projection) and has
    # its own experts: nothing in a layer can be split, and a vocabulary-only
    # plan is refused rather than passed off as tensor parallel.
    report = parity_check(transformers.JetMoeConfig(), 2)
    assert not report.ok and report.plan_source == "none"
    assert "nothing in the layers can be sharded" in report.reason and math.isnan(report.max_abs_diff)
    assert "kv_proj" in report.reason


def test_parity_check_names_a_partial_plan():
    report = parity_check(transformers.MiniCPM3Config(), 2)  # latent attention: stays whole
    assert report.ok, report.reason
    assert report.plan_source == "auto" and report.partial == "partial: attention replicated in 2/2 layers"
    assert report.plan == "auto (partial: attention replicated in 2/2 layers)"
    full = parity_check(transformers.OlmoConfig(hidden_size=384, num_attention_heads=6), 2)
    assert full.ok and full.partial == "" and full.plan == "auto"


def test_parity_check_catches_a_silently_wrong_spec():
    wrong = parity_check(transformers.PersimmonConfig(), 2, spec=PERSIMMON_WRONG)
    assert not wrong.ok and not wrong.greedy_match
    assert "max |logit diff|" in wrong.reason and wrong.max_abs_diff > 1e-2  # off by orders of magnitude
    # The right layout passes: the check is not just failing everything.
    right = parity_check(transformers.PersimmonConfig(), 2, spec=PERSIMMON_RIGHT)
    assert right.ok, right.reason


def test_parity_check_bad_requests_raise():
    config = _llama(4, 2)
    with pytest.raises(ValueError, match="shares has 3 entries"):
        parity_check(config, 2, [1, 2, 3])
    with pytest.raises(ValueError, match="cannot split 4 attention heads over 5 ranks"):
        parity_check(config, 5)


# ------------------------------------------------------------ the guard


def test_guard_raises_on_a_failed_check_and_caches(monkeypatch):
    calls = []
    real = check_mod._parity

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(check_mod, "_verdicts", {})
    monkeypatch.setattr(check_mod, "_parity", counting)
    model = tiny_model(transformers.PersimmonConfig())
    # The guard checks that the tiny copy infers the very spec given: a hand
    # spec is not an inference, so pretend it is one for this model.
    monkeypatch.setattr(check_mod, "inferred_spec", lambda m: PERSIMMON_WRONG)
    with pytest.raises(ValueError, match=r"auto plan for persimmon failed its parity check: max \|diff\| \d"):
        guard_auto_spec(model, PERSIMMON_WRONG, 2)
    with pytest.raises(ValueError, match="failed its parity check"):
        guard_auto_spec(model, PERSIMMON_WRONG, 2)
    assert calls == [2]  # the second call used the cached verdict


def test_guard_passes_a_good_inferred_spec_once_per_split(monkeypatch):
    calls = []
    real = check_mod._parity
    monkeypatch.setattr(check_mod, "_verdicts", {})
    monkeypatch.setattr(check_mod, "_parity", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    model = tiny_model(transformers.OlmoConfig(hidden_size=384, num_attention_heads=6))
    spec = inferred_spec(model)
    guard_auto_spec(model, spec, 2)
    guard_auto_spec(model, spec, 2)
    guard_auto_spec(model, spec, 3)
    assert calls == [2, 3]


def test_guard_rejects_a_spec_the_tiny_copy_would_not_infer(monkeypatch):
    monkeypatch.setattr(check_mod, "_verdicts", {})
    model = tiny_model(transformers.OlmoConfig(hidden_size=384, num_attention_heads=6))
    spec = inferred_spec(model).replace(family="auto:something-else")
    with pytest.raises(ValueError, match="the tiny copy infers"):
        guard_auto_spec(model, spec, 2)


def test_check_model_bytes_per_rank():
    config = tiny_config(_llama(6, 3))
    result = check_model(config, 3, [2, 1, 1])
    assert result.ok, result.reason
    total = sum(p.numel() * 4 for p in tiny_model(config).parameters())
    assert len(result.rank_bytes) == 3
    assert max(result.rank_bytes) < total <= sum(result.rank_bytes)  # split, plus replicated norms
    assert result.rank_bytes[0] > result.rank_bytes[1]  # share 2 holds more


# ------------------------------------------------------------ the CLI


def _save(tmp_path, config, weights: bool):
    folder = tmp_path / config.model_type
    if weights:
        tiny_model(config).save_pretrained(folder)
    else:
        folder.mkdir()
        config.save_pretrained(folder)  # config.json only: check must not need weights
    return str(folder)


def test_cli_check_llama_checkpoint(tmp_path, capsys):
    folder = _save(tmp_path, tiny_config(_llama(6, 3)), weights=True)
    assert main(["check", folder, "--tp", "3"]) == 0
    out = capsys.readouterr().out
    assert "plan source: declared spec (llama)" in out or "plan source: auto-planner" in out
    ranks = [line for line in out.splitlines() if line.strip().startswith("rank ")]
    assert len(ranks) == 3 and all("Q heads" in r and "KV heads" in r and "MLP cols" in r and "vocab" in r and "params" in r for r in ranks)
    assert "parity at TP=3" in out and ": pass," in out


def test_cli_check_auto_planned_config_only(tmp_path, capsys):
    folder = _save(tmp_path, transformers.OlmoConfig(hidden_size=384, num_attention_heads=6, num_hidden_layers=4), weights=False)
    assert main(["check", folder, "--tp", "2", "--shares", "3,1"]) == 0
    out = capsys.readouterr().out
    assert "plan source: auto-planner" in out and "shares [3, 1]" in out


def test_cli_check_refused_architecture(tmp_path, capsys):
    folder = _save(tmp_path, transformers.JetMoeConfig(), weights=False)
    assert main(["check", folder, "--tp", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "check failed" in err[0] and "nothing in the layers can be sharded" in err[0]


def test_cli_check_says_what_a_partial_plan_keeps_whole(tmp_path, capsys):
    folder = _save(tmp_path, transformers.MiniCPM3Config(num_hidden_layers=3), weights=False)
    assert main(["check", folder, "--tp", "2"]) == 0
    out = capsys.readouterr().out
    plan_line = next(line for line in out.splitlines() if line.startswith("world 2"))
    # Counted on the model's own layers (3), not the tiny copy's.
    assert plan_line.endswith("; auto plan partial: attention replicated in 3/3 layers"), plan_line
    assert "parity at TP=2" in out and ": pass," in out


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--tp", "2", "--shares", "3,x"], 2, "--shares must be comma-separated positive numbers"),
        (["--tp", "3", "--shares", "3,1"], 2, "--shares has 2 entries but --tp is 3"),
        (["--tp", "0"], 2, "--tp must be at least 1"),
        (["--tp", "7"], 1, "cannot split 6 attention heads over 7 ranks"),
    ],
)
def test_cli_check_bad_input_is_one_line(tmp_path, capsys, args, code, message):
    folder = _save(tmp_path, _llama(6, 3), weights=False)
    assert main(["check", folder, *args]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
