"""Speculative decoding against transformers' own decoding of the unsharded target.

Greedy: the output must be the target's greedy output token for token,
whatever the draft proposes (a random unrelated model, the model itself, its
int8/int4 copies), at TP=1 and TP=2/3 with every draft placement.
Sampling: the rejection rule must give the target's distribution; checked
exactly-in-distribution with a chi-square test on a tiny vocabulary.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import tp_engine
from conftest import run_ranks, tiny_model
from tp_engine.speculative import speculative_generate

PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3]])
NEW = 16


def _reference(model, n=NEW):
    return model.generate(PROMPT, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", 8, 4, seed=0, layers=2)


@pytest.fixture(scope="module")
def stranger():
    """A different random model with the same vocabulary: its proposals are mostly wrong."""
    return tiny_model("llama", 8, 4, seed=7, layers=1)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_tp1_unrelated_draft(target, stranger, k):
    out, stats = speculative_generate(copy.deepcopy(target), PROMPT, NEW, copy.deepcopy(stranger), num_draft_tokens=k, eos_token_id=[])
    assert torch.equal(out, _reference(target))
    assert stats.new_tokens == NEW and stats.rounds >= 1


def test_greedy_tp1_self_draft_accepts_everything(target):
    model = copy.deepcopy(target)
    out, stats = speculative_generate(model, PROMPT, NEW, model, num_draft_tokens=4, eos_token_id=[])
    assert torch.equal(out, _reference(target))
    assert stats.acceptance_rate == 1.0
    assert stats.rounds == math.ceil((NEW - 1) / 5)


@pytest.mark.parametrize("draft", ["int8", "int4"])
def test_greedy_tp1_quantized_self_copy(target, draft):
    model = copy.deepcopy(target)
    out, stats = speculative_generate(model, PROMPT, NEW, draft, num_draft_tokens=3, eos_token_id=[], group_size=8)
    assert torch.equal(out, _reference(target))
    assert stats.acceptance_rate > 0.3, stats  # a quantized copy mostly agrees with its original
    # The quantized copy leaves the target's own weights alone.
    assert torch.equal(model.lm_head.weight, target.lm_head.weight)


def test_public_generate_routes_to_speculative(target):
    out = tp_engine.generate(copy.deepcopy(target), PROMPT, max_new_tokens=NEW, draft="int8", num_draft_tokens=2, eos_token_id=[])
    assert torch.equal(out, _reference(target))


def test_eos_stops_inside_an_accepted_block(target):
    reference = _reference(target)
    eos = int(reference[0, PROMPT.shape[1] + 5])  # the 6th new token
    model = copy.deepcopy(target)
    out, _ = speculative_generate(model, PROMPT, NEW, model, num_draft_tokens=4, eos_token_id=eos)
    first = (reference[0, PROMPT.shape[1]:] == eos).nonzero()[0, 0]
    assert torch.equal(out[0], reference[0, : PROMPT.shape[1] + first + 1])


def _placements(world, target, stranger, sample_seed):
    """Every placement on one group; returns per placement the tokens (and stats)."""
    rank = tp_engine.init().rank
    results = {}
    model = tp_engine.parallelize(copy.deepcopy(target))
    out, stats = speculative_generate(model, PROMPT, NEW, "int8", num_draft_tokens=3, eos_token_id=[])
    results["sharded-int8"] = (out, stats.placement)
    out, stats = speculative_generate(model, PROMPT, NEW, "int4", num_draft_tokens=4, eos_token_id=[], group_size=8)
    results["sharded-int4"] = (out, stats.placement)
    out, stats = speculative_generate(model, PROMPT, NEW, copy.deepcopy(stranger), num_draft_tokens=3, eos_token_id=[])
    results["replicated"] = (out, stats.placement)
    holder = world - 1
    draft = copy.deepcopy(stranger) if rank == holder else None
    out, stats = speculative_generate(model, PROMPT, NEW, draft, num_draft_tokens=2, draft_rank=holder, eos_token_id=[])
    results["one-rank"] = (out, stats.placement)
    # Sampling: every rank must draw the same tokens (sharded and one-rank drafts).
    out, _ = speculative_generate(model, PROMPT, NEW, "int8", num_draft_tokens=3, do_sample=True, seed=sample_seed, eos_token_id=[])
    results["sample-sharded"] = (out, None)
    out, _ = speculative_generate(model, PROMPT, NEW, draft, num_draft_tokens=3, draft_rank=holder, do_sample=True,
                                  top_k=20, seed=sample_seed, eos_token_id=[])
    results["sample-one-rank"] = (out, None)
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_greedy_every_placement_sharded(target, stranger, world):
    # 8 Q heads / 4 KV heads: TP=3 is an uneven split (by KV groups).
    reference = _reference(target)
    per_rank = run_ranks(_placements, world, world, target, stranger, 1234)
    expected_placement = {"sharded-int8": "sharded", "sharded-int4": "sharded", "replicated": "replicated", "one-rank": "one-rank"}
    for rank, results in enumerate(per_rank):
        for name, placement in expected_placement.items():
            out, got = results[name]
            assert got == placement
            assert torch.equal(out, reference), f"rank {rank}, {name}: {out.tolist()} != {reference.tolist()}"
        for name in ("sample-sharded", "sample-one-rank"):
            assert torch.equal(results[name][0], per_rank[0][name][0]), f"rank {rank} sampled differently ({name})"
            assert results[name][0].shape == (1, PROMPT.shape[1] + NEW)


def _tiny_vocab_pair(seed: int):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=6, max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def test_sampling_follows_the_target_distribution():
    """(t1, t2) from speculative sampling vs the target's exact joint distribution.

    t2 is decided by the rejection rule (one proposal per round), so a wrong
    rule shows up as a shifted joint distribution. Chi-square over the 36
    outcomes with N draws; the draft is an unrelated model (many rejections).
    """
    target, draft = _tiny_vocab_pair(1), _tiny_vocab_pair(2)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        p1 = target(prompt).logits[0, -1].softmax(-1)
        joint = torch.zeros(6, 6, dtype=torch.float64)
        for a in range(6):
            p2 = target(torch.cat([prompt, torch.tensor([[a]])], 1)).logits[0, -1].softmax(-1)
            joint[a] = p1[a].double() * p2.double()
        q1 = draft(prompt).logits[0, -1].softmax(-1)
    assert (p1 - q1).abs().sum() > 0.2, "draft too close to the target to exercise rejections"
    counts = torch.zeros(6, 6, dtype=torch.float64)
    N = 2400
    rejected = 0
    for i in range(N):
        out, stats = speculative_generate(target, prompt, 3, draft, num_draft_tokens=1, do_sample=True, seed=i, eos_token_id=[])
        counts[int(out[0, 3]), int(out[0, 4])] += 1
        rejected += stats.drafted - stats.accepted
    assert rejected > N // 10
    expected = joint * N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 35 degrees of freedom: P(chi2 > 80) < 1e-5 under a correct rule.
    assert chi2 < 80, f"chi2 {chi2:.1f}; counts {counts.tolist()} expected {expected.tolist()}"


def test_bad_arguments(target, stranger):
    model = copy.deepcopy(target)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative_generate(model, PROMPT, 4, "int8", num_draft_tokens=0)
    with pytest.raises(ValueError, match="'int8', 'int4'"):
        speculative_generate(model, PROMPT, 4, "int3")
    with pytest.raises(ValueError, match="draft_rank"):
        speculative_generate(model, PROMPT, 4, stranger, draft_rank=1)
    with pytest.raises(ValueError, match="needs a draft"):
        speculative_generate(model, PROMPT, 4, None)
    other_vocab = tiny_model("llama", 8, 4, seed=3, layers=1)
    other_vocab.resize_token_embeddings(300)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(model, PROMPT, 4, other_vocab)


def _disagreeing_ranks(target, stranger):
    rank = tp_engine.init().rank
    model = tp_engine.parallelize(copy.deepcopy(target))
    try:
        speculative_generate(model, PROMPT, 4, "int8", num_draft_tokens=2 + rank)
    except ValueError as e:
        first = str(e)
    else:
        first = None
    try:  # one-rank placement, but the draft rank holds no draft
        speculative_generate(model, PROMPT, 4, None, draft_rank=1)
    except ValueError as e:
        second = str(e)
    else:
        second = None
    return first, second


def test_ranks_that_disagree_fail_together(target, stranger):
    for first, second in run_ranks(_disagreeing_ranks, 2, target, stranger):
        assert first is not None and "num_draft_tokens" in first
        assert second is not None and "no draft" in second


def _every_family_run(families):
    from test_runtime_parity import build

    rt = tp_engine.init()
    out = {}
    for family in families:
        model = build(family)
        if rt.world_size > 1:
            model = tp_engine.parallelize(model)
        tokens, stats = speculative_generate(model, PROMPT, NEW, "int8", num_draft_tokens=3, eos_token_id=[])
        out[family] = (tokens, stats.acceptance_rate)
    return out


SPECULATIVE_FAMILIES = ["gpt2", "gpt_neox", "phi3", "falcon", "gptj", "bloom", "opt", "mixtral", "qwen2_moe", "gemma2"]


@pytest.mark.parametrize("world", [1, 2])
def test_int8_self_draft_on_every_family(world):
    """Speculative decoding runs on the runtime for every family: a sharded int8 self-copy drafts,
    and the output is transformers' greedy output of the unsharded model."""
    from test_runtime_parity import build

    results = [_every_family_run(SPECULATIVE_FAMILIES)] if world == 1 else run_ranks(
        _every_family_run, world, SPECULATIVE_FAMILIES)
    for family in SPECULATIVE_FAMILIES:
        reference = build(family).generate(PROMPT, max_new_tokens=NEW, do_sample=False)
        for rank, result in enumerate(results):
            tokens, acceptance = result[family]
            assert torch.equal(tokens, reference), f"{family} rank {rank}"
            assert acceptance > 0.3, f"{family}: an int8 copy should mostly agree with its original ({acceptance})"
