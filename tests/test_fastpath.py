"""The fast decode path computes what single-process transformers computes.

For every family the fast path supports and every kind of split (TP=1, even,
uneven, KV-replicated, weighted shares): each rank's prefill logits (its
vocabulary shard) within 1e-4 of the unsharded model's, and greedy tokens
identical to ``model.generate(do_sample=False)`` for 24 new tokens, on every
rank. Sampling draws the same tokens as transformers' sampler with the same
seed. Unsupported models are refused with a clear error.

All architectures of one split run inside a single launch, so the file takes
a few seconds per split rather than per case.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import tp_engine
from conftest import SPLITS, run_ranks, tiny_model
from tp_engine.fastpath import FastDecoder, FastPathUnsupported, fast_generate, unsupported_reason

NEW_TOKENS = 24
FAST_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
ALL_SPLITS = {"tp1": (1, None, 8, 4), **SPLITS}
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199]])
# temperature, top_k, top_p: full-logits path and top-k candidates path.
SAMPLING = [(0.8, 0, 0.9), (1.3, 20, 0.95)]


@functools.lru_cache(maxsize=None)
def _references(num_q, num_kv, sample):
    cases = {}
    for arch in FAST_ARCHS:
        model = tiny_model(arch, num_q, num_kv)
        with torch.no_grad():
            logits = model(PROMPT).logits[0, -1]
        greedy = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        sampled = []
        for i, (t, k, p) in enumerate(SAMPLING if sample else []):
            torch.manual_seed(100 + i)
            sampled.append(
                model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=t, top_k=k, top_p=p)
            )
        cases[arch] = (model, logits, greedy, sampled)
    return cases


def _rank_run(models, shares, sample):
    rt = tp_engine.init()
    comm = rt.comm
    if rt.world_size > 1 and rt.comm.name.startswith("torch"):
        # Shared-memory collectives where available: several ranks on two
        # cores make every gloo round trip cost milliseconds.
        try:
            from tp_engine.comm.shm import try_shm_communicator

            comm = try_shm_communicator(rt.comm, close_fallback=False) or rt.comm
        except ImportError:
            pass
    out = {}
    for arch, model in models.items():
        if rt.world_size > 1:
            model = tp_engine.parallelize(model, shares=shares, comm=comm)
        decoder = FastDecoder(model)
        with torch.inference_mode():
            decoder._ensure(PROMPT.shape[1])
            logits = decoder.prefill(PROMPT[0])[0]
        start = decoder.head_start
        greedy = fast_generate(model, PROMPT, NEW_TOKENS)
        # The int8 argmax prefilter is off by default for tiny vocabularies: force it.
        prefiltered = FastDecoder(model, int8_argmax=True)
        assert prefiltered._q8 is not None
        greedy_q8 = prefiltered.generate(PROMPT, NEW_TOKENS)
        sampled = []
        if sample:
            for i, (t, k, p) in enumerate(SAMPLING):
                sampled.append(
                    fast_generate(model, PROMPT, NEW_TOKENS, do_sample=True, temperature=t, top_k=k, top_p=p,
                                  seed=100 + i)
                )
        out[arch] = {"logits": logits, "start": start, "greedy": greedy, "greedy_q8": greedy_q8,
                     "q8_fallbacks": prefiltered._q8_fallbacks, "sampled": sampled,
                     "kv_heads": decoder.n_kv, "cache_heads": decoder.layers[0].k_cache.shape[0]}
    return out


@pytest.mark.parametrize("split", list(ALL_SPLITS))
def test_matches_transformers(split):
    world, shares, num_q, num_kv = ALL_SPLITS[split]
    sample = split == "tp3-uneven"  # sharded top-k and full-gather sampling
    refs = _references(num_q, num_kv, sample)
    models = {arch: copy.deepcopy(r[0]) for arch, r in refs.items()}
    if world == 1:
        results = [_rank_run(models, shares, sample)]
    else:
        results = run_ranks(_rank_run, world, models, shares, sample)
    for rank, result in enumerate(results):
        for arch, (_, logits, greedy, sampled) in refs.items():
            got = result[arch]
            assert greedy.shape[1] == PROMPT.shape[1] + NEW_TOKENS, f"{arch}: reference stopped early"
            local = got["logits"]
            expected = logits[got["start"] : got["start"] + local.shape[0]]
            diff = (local - expected).abs().max().item()
            assert diff < 1e-4, f"{arch} rank {rank}: prefill logits differ by {diff}"
            assert torch.equal(got["greedy"], greedy), f"{arch} rank {rank}: greedy tokens differ\n{got['greedy']}\n{greedy}"
            assert torch.equal(got["greedy_q8"], greedy), f"{arch} rank {rank}: int8-prefiltered greedy differs"
            assert got["q8_fallbacks"] == 0, f"{arch} rank {rank}: int8 prefilter fell back"
            assert got["cache_heads"] == got["kv_heads"]
            for i, ref in enumerate(sampled if sample else []):
                assert torch.equal(got["sampled"][i], ref), f"{arch} rank {rank}: sampling {SAMPLING[i]} differs"
    if world > 1:  # the vocab really is split across ranks
        assert sum(r["llama"]["logits"].shape[0] for r in results) == refs["llama"][1].shape[0]


def test_refuses_unsupported():
    gemma2 = tiny_model("gemma2", 8, 4)
    assert "gemma2" in unsupported_reason(gemma2)
    with pytest.raises(FastPathUnsupported, match="model.generate"):
        fast_generate(gemma2, PROMPT, 4)

    dynamic = tiny_model("llama", 8, 4)
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    dynamic.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(FastPathUnsupported, match="rope_type 'dynamic'"):
        FastDecoder(dynamic)

    model = tiny_model("llama", 8, 4)
    with pytest.raises(ValueError, match="batch size 1"):
        fast_generate(model, PROMPT.repeat(2, 1), 4)


def test_eos_streamer_and_model_untouched():
    model = tiny_model("llama", 8, 4)
    reference = copy.deepcopy(model)
    full = fast_generate(model, PROMPT, NEW_TOKENS, eos_token_id=[])
    eos = int(full[0, PROMPT.shape[1] + 5])
    stopped = fast_generate(model, PROMPT, NEW_TOKENS, eos_token_id=eos)
    first = (full[0, PROMPT.shape[1]:] == eos).nonzero()[0].item()
    assert torch.equal(stopped, full[:, : PROMPT.shape[1] + first + 1])

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t.clone())

        def end(self):
            self.ended = True

    rec = Recorder()
    fast_generate(model, PROMPT, 6, eos_token_id=[], streamer=rec)
    assert rec.ended and torch.equal(rec.puts[0], PROMPT)
    assert torch.equal(torch.cat(rec.puts[1:]), full[0, PROMPT.shape[1] : PROMPT.shape[1] + 6])

    # Fusing re-points the model's parameters at the fused storage: same
    # values, and the HF forward still gives the same logits.
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, reference(PROMPT).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tp1(dtype):
    """16-bit models (TP=1): greedy tokens identical to transformers in the same dtype."""
    for arch in FAST_ARCHS:
        model = tiny_model(arch, 8, 4).to(dtype)
        expected = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        got = FastDecoder(model, int8_argmax=True).generate(PROMPT, NEW_TOKENS)
        assert torch.equal(got, expected), f"{arch} {dtype}: greedy tokens differ"
