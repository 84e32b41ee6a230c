"""Continuous batching on the step API gives every sequence exactly what it gets alone.

Eight prompts of different lengths share one engine: five join at the
start, three join after a few steps; prompts are read in chunks of 8 tokens
while the others keep decoding; the batch holds at most six sequences, so
some wait for a slot; one stops at an EOS, several at different lengths,
one is cancelled. Each finished sequence's greedy tokens equal
transformers' greedy ``generate`` of that prompt alone (the cancelled one:
a prefix of it), at TP=1, TP=2 and an uneven, KV-replicated TP=3, for families whose attention differs
(GQA with RoPE, ALiBi, sliding windows with soft-capping, fused grouped
q/k/v, MoE). Sampled requests with a seed draw what transformers draws
after ``torch.manual_seed(seed)`` for that prompt alone, identically on
every rank.
"""
from __future__ import annotations

import functools

import pytest
import torch
from test_runtime_parity import build

import tp_engine
from conftest import run_ranks
from tp_engine.runtime import Engine, SamplingParams, decoder_for

FAMILIES = ["llama", "gemma2", "bloom", "falcon", "mixtral", "gpt2"]
PROMPTS = [
    [5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199],
    [7, 7, 100],
    [200, 1, 2, 3, 4, 5, 6, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67],
    [33],
    [90, 80, 70, 60, 50, 40],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30],
    [123, 45, 6],
    [250, 251, 252, 253, 254, 255, 256, 100, 1],  # no 0: HF reads the pad id as padding
]
MAX_NEW = [12, 5, 12, 9, 12, 7, 12, 12]
EOS_REQUEST, CANCEL_REQUEST = 4, 2  # request 4 stops at an EOS taken from its own reference; 2 is cancelled
LATE = 5  # requests 5.. join after 3 steps
SAMPLED = [(0, 0.9, 0, 11), (4, 1.2, 20, 12), (6, 0.7, 0, 13)]  # (prompt, temperature, top_k, seed)


@functools.cache
def references(family: str) -> dict:
    model = build(family)
    greedy = [model.generate(torch.tensor([p]), max_new_tokens=max(MAX_NEW), do_sample=False)[0, len(p):].tolist()
              for p in PROMPTS]
    sampled = []
    for i, t, k, seed in SAMPLED:
        torch.manual_seed(seed)
        out = model.generate(torch.tensor([PROMPTS[i]]), max_new_tokens=8, do_sample=True, temperature=t, top_k=k,
                             top_p=1.0)
        sampled.append(out[0, len(PROMPTS[i]):].tolist())
    return {"greedy": greedy, "sampled": sampled}


def _drive(family: str, eos: int, world: int) -> dict:
    model = build(family)
    if world > 1:
        model = tp_engine.parallelize(model)
    engine = Engine(decoder_for(model), max_batch=6, prefill_chunk=8)
    ids, steps, cancelled_at = {}, 0, None
    for i in range(LATE):
        params = SamplingParams(max_new_tokens=MAX_NEW[i], eos_token_ids=(eos,) if i == EOS_REQUEST else ())
        ids[i] = engine.add_request(PROMPTS[i], params)
    while engine.has_unfinished:
        engine.step()
        steps += 1
        if steps == 3:
            for i in range(LATE, len(PROMPTS)):
                ids[i] = engine.add_request(PROMPTS[i], SamplingParams(max_new_tokens=MAX_NEW[i]))
        if steps == 6:
            cancelled_at = len(engine.request(ids[CANCEL_REQUEST]).tokens)
            assert engine.cancel(ids[CANCEL_REQUEST])
    greedy = {i: (engine.request(r).tokens, engine.request(r).finish_reason) for i, r in ids.items()}
    free_slots = engine.decoder.cache.in_use == 0
    # Seeded sampling, all at once in one batch.
    sampler = Engine(decoder_for(model), max_batch=8)
    sids = [sampler.add_request(PROMPTS[i], SamplingParams(max_new_tokens=8, do_sample=True, temperature=t, top_k=k,
                                                           seed=seed)) for i, t, k, seed in SAMPLED]
    while sampler.has_unfinished:
        sampler.step()
    return {"greedy": greedy, "cancelled_at": cancelled_at, "free_slots": free_slots,
            "sampled": [sampler.request(r).tokens for r in sids]}


def _drive_all(eos_by_family: dict, world: int) -> dict:
    torch.set_num_threads(1)
    return {f: _drive(f, eos, world) for f, eos in eos_by_family.items()}


@functools.cache
def results(world: int) -> list[dict]:
    eos = {f: references(f)["greedy"][EOS_REQUEST][3] for f in FAMILIES}
    if world == 1:
        return [_drive_all(eos, 1)]
    return run_ranks(_drive_all, world, eos, world)


@pytest.mark.parametrize("world", [1, 2, 3])  # 3: uneven heads, and KV heads replicated (8 Q / 2 KV)
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_sequences_match_transformers_alone(family, world):
    ref = references(family)
    for rank, got in enumerate(results(world)):
        g = got[family]
        assert g["free_slots"], "finished and cancelled sequences must free their cache slots"
        for i, (tokens, reason) in g["greedy"].items():
            expected = ref["greedy"][i][: MAX_NEW[i]]
            if i == EOS_REQUEST:
                eos = expected[3]
                expected = expected[: expected.index(eos) + 1]
                assert reason == "stop"
            if i == CANCEL_REQUEST:
                assert reason == "cancelled" and len(tokens) == g["cancelled_at"] < MAX_NEW[i]
                expected = expected[: len(tokens)]
            elif i != EOS_REQUEST:
                assert reason == "length"
            assert tokens == expected, f"rank {rank}, request {i}: {tokens} != {expected}"
        assert g["sampled"] == ref["sampled"], f"rank {rank}: seeded sampling differs from transformers"


def test_bad_requests_are_refused_before_anything_runs():
    model = build("llama")
    engine = Engine(decoder_for(model), max_model_len=32)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([5, 9999], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request([5] * 30, SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([5], SamplingParams(do_sample=True, temperature=0.0))
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request([5], SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        engine.add_request([5], SamplingParams(stop_strings=("\n",)))
    rid = engine.add_request([5, 6], SamplingParams(max_new_tokens=2), request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([5], SamplingParams(), request_id="a")
    assert not engine.cancel("nope")
    assert engine.request(rid).prompt == [5, 6] and not engine.running  # nothing ran yet


def test_learned_positions_bound_requests():
    """GPT-2 has 64 learned positions here: a request that would run past them is refused up front."""
    engine = Engine(decoder_for(build("gpt2")))
    with pytest.raises(ValueError, match="64 learned positions"):
        engine.add_request([5] * 60, SamplingParams(max_new_tokens=8))
    engine.add_request([5] * 56, SamplingParams(max_new_tokens=8))  # exactly 64: fine
    while engine.has_unfinished:
        engine.step()
