"""``tp_engine.generate`` and ``model.generate`` run the lean runtime and give transformers' tokens.

For the Llama-layout families at every kind of split: greedy tokens from
the runtime (with and without the int8 LM-head prefilter) equal
transformers' ``generate``; seeded sampling (the sharded top-k path and the
full-logits path) draws the same tokens as transformers' sampler after
``torch.manual_seed``; HF keyword arguments the runtime implements
(``min_new_tokens``, ``max_length``, ``repetition_penalty``,
``no_repeat_ngram_size``, logits processors, left-padded batches) give
transformers' output; a call the runtime cannot serve warns once and falls
back to transformers, and ``fast_path=True`` raises instead.
"""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import tp_engine
from conftest import SPLITS, run_ranks, tiny_model
from tp_engine.runtime import Decoder, Engine, RuntimeUnsupported, SamplingParams, unsupported_reason

NEW_TOKENS = 24
HIDDEN = 240  # divisible by every split's head count, and by 16 for the int8 prefilter's kernel
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]
ALL_SPLITS = {"tp1": (1, None, 8, 4), **SPLITS}
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199]])
# temperature, top_k, top_p: full-logits path and top-k candidates path.
SAMPLING = [(0.8, 0, 0.9), (1.3, 20, 0.95)]


@functools.lru_cache(maxsize=None)
def _references(num_q, num_kv, sample):
    cases = {}
    for arch in ARCHS:
        model = tiny_model(arch, num_q, num_kv, hidden=HIDDEN)
        greedy = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        sampled = []
        for i, (t, k, p) in enumerate(SAMPLING if sample else []):
            torch.manual_seed(100 + i)
            sampled.append(
                model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=t, top_k=k, top_p=p)
            )
        cases[arch] = (model, greedy, sampled)
    return cases


def _rank_run(models, shares, sample):
    rt = tp_engine.init()
    out = {}
    for arch, model in models.items():
        if rt.world_size > 1:
            model = tp_engine.parallelize(model, shares=shares)
        greedy = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)  # the HF call, on the runtime
        ran_runtime = "_tp_engine_decoder" in model.__dict__
        # The int8 argmax prefilter is off by default for tiny vocabularies: force it (Gemma 2/3's final
        # soft-capping turns it off: their greedy argmax is over capped logits).
        prefiltered = Decoder(model, int8_argmax=True)
        assert (prefiltered.vocab._q8 is not None) == (prefiltered.vocab.final_softcap is None)
        engine = Engine(prefiltered)
        rid = engine.add_request(PROMPT[0], SamplingParams(max_new_tokens=NEW_TOKENS))
        while engine.has_unfinished:
            engine.step()
        sampled = []
        for i, (t, k, p) in enumerate(SAMPLING if sample else []):
            sampled.append(tp_engine.generate(model, PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=t,
                                              top_k=k, top_p=p, seed=100 + i, fast_path=True))
        out[arch] = {"greedy": greedy, "ran_runtime": ran_runtime, "greedy_q8": engine.request(rid).tokens,
                     "q8_fallbacks": prefiltered.vocab._q8_fallbacks, "sampled": sampled}
    return out


@pytest.mark.parametrize("split", list(ALL_SPLITS))
def test_matches_transformers(split):
    world, shares, num_q, num_kv = ALL_SPLITS[split]
    sample = split in ("tp1", "tp3-uneven")  # sharded top-k and full-gather sampling
    refs = _references(num_q, num_kv, sample)
    models = {arch: copy.deepcopy(r[0]) for arch, r in refs.items()}
    if world == 1:
        for m in models.values():
            tp_engine.generation.install_generate(m)
        results = [_rank_run(models, shares, sample)]
    else:
        results = run_ranks(_rank_run, world, models, shares, sample)
    for rank, result in enumerate(results):
        for arch, (_, greedy, sampled) in refs.items():
            got = result[arch]
            assert greedy.shape[1] == PROMPT.shape[1] + NEW_TOKENS, f"{arch}: reference stopped early"
            assert got["ran_runtime"], f"{arch}: model.generate did not run the runtime"
            assert torch.equal(got["greedy"], greedy), f"{arch} rank {rank}: greedy tokens differ"
            assert got["greedy_q8"] == greedy[0, PROMPT.shape[1]:].tolist(), f"{arch} rank {rank}: int8 prefilter"
            assert got["q8_fallbacks"] == 0, f"{arch} rank {rank}: int8 prefilter fell back"
            for i, ref in enumerate(sampled):
                assert torch.equal(got["sampled"][i], ref), f"{arch} rank {rank}: sampling {SAMPLING[i]} differs"


class _BanEvenAfterFive(LogitsProcessor):
    """A user's processor: no even token ids once the sequence is 16 long."""

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] >= 16:
            scores = scores.clone()
            scores[:, ::2] = float("-inf")
        return scores


@pytest.mark.parametrize("kwargs", [
    dict(min_new_tokens=12),
    dict(max_length=PROMPT.shape[1] + 9),
    dict(repetition_penalty=1.7),
    dict(no_repeat_ngram_size=2),
    dict(logits_processor=LogitsProcessorList([_BanEvenAfterFive()])),
    dict(do_sample=True, top_k=0, top_p=0.8, repetition_penalty=1.3),
], ids=["min_new_tokens", "max_length", "repetition_penalty", "no_repeat_ngram", "logits_processor", "sampled-penalty"])
def test_hf_arguments_on_the_runtime(kwargs):
    model = tiny_model("llama", 8, 4)
    call = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    call.update(kwargs)
    if "max_length" in kwargs:
        del call["max_new_tokens"]
    eos = int(model.generate(PROMPT, max_new_tokens=8, do_sample=False)[0, PROMPT.shape[1] + 3])
    model.generation_config.eos_token_id = eos  # an EOS the plain decode would hit early
    torch.manual_seed(7)
    expected = model.generate(PROMPT, **call)
    torch.manual_seed(7)
    got = tp_engine.generate(model, PROMPT, fast_path=True, **call)
    assert torch.equal(got, expected)


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_model("qwen2", 8, 4)
    prompts = [[5, 17, 42, 99, 3, 250, 8, 61], [7, 7, 100], [200, 1, 2, 3, 4, 5]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = None
    out = tp_engine.generate(model, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                             fast_path=True)
    assert out.shape == (3, width + 10)
    for row, p in zip(out, prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert row[width:].tolist() == alone[0, len(p):].tolist()


def test_fallback_warns_once_and_fast_path_true_raises():
    model = tiny_model("llama", 8, 4)
    tp_engine.generation.install_generate(model)
    with pytest.raises(RuntimeUnsupported, match="num_beams"):
        tp_engine.generate(model, PROMPT, max_new_tokens=4, num_beams=2, fast_path=True)
    expected = model.__dict__["_tp_engine_hf_generate"](PROMPT, max_new_tokens=4, num_beams=2, do_sample=False)
    with pytest.warns(UserWarning, match="num_beams"):
        got = model.generate(PROMPT, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason is not repeated
        model.generate(PROMPT, max_new_tokens=4, num_beams=2, do_sample=False)

    dynamic = tiny_model("llama", 8, 4)
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    dynamic.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(RuntimeUnsupported, match="rope_type 'dynamic'"):
        Decoder(dynamic)
    mamba_reason = unsupported_reason(torch.nn.Linear(2, 2))
    assert mamba_reason is not None


def test_eos_streamer_and_model_untouched():
    model = tiny_model("llama", 8, 4)
    reference = copy.deepcopy(model)
    full = tp_engine.generate(model, PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=[], fast_path=True)
    eos = int(full[0, PROMPT.shape[1] + 5])
    stopped = tp_engine.generate(model, PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=eos, fast_path=True)
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
    tp_engine.generate(model, PROMPT, max_new_tokens=6, eos_token_id=[], streamer=rec, fast_path=True)
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
    for arch in ["llama", "mistral", "qwen2", "qwen3", "gemma"]:
        model = tiny_model(arch, 8, 4).to(dtype)
        expected = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        got = tp_engine.generate(model, PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, fast_path=True)
        assert torch.equal(got, expected), f"{arch} {dtype}: greedy tokens differ"


def _auto_family_run(config, expect_runtime: bool):
    rt = tp_engine.init()
    torch.manual_seed(0)
    model = tp_engine.tiny.tiny_model(config)
    ids = torch.randint(1, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None
    if rt.world_size > 1:
        model = tp_engine.parallelize(model)
    else:
        tp_engine.generation.install_generate(model)
    tp_engine.generation._warned.clear()  # once per process and reason: a forked rank inherits the parent's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ran_runtime = "_tp_engine_decoder" in model.__dict__
    return torch.equal(got, expected), ran_runtime, [str(w.message) for w in caught]


@pytest.mark.parametrize("world", [1, 2])
def test_auto_planned_llama_layout_runs_on_the_runtime_after_a_proof(world):
    """StableLM has no runtime family but is laid out like Llama and computes the same: proven, it runs on
    the runtime. Granite with a residual multiplier is laid out the same but computes something else:
    the proof fails, and generate falls back to transformers with that reason."""
    import transformers

    stablelm = transformers.StableLmConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                          num_hidden_layers=2, intermediate_size=96, vocab_size=300)
    granite = transformers.GraniteConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=96, vocab_size=300,
                                         residual_multiplier=0.5, embedding_multiplier=2.0)
    for config, expect_runtime in ((stablelm, True), (granite, False)):
        if world == 1:
            results = [_auto_family_run(config, expect_runtime)]
        else:
            results = run_ranks(_auto_family_run, world, config, expect_runtime)
        for same, ran_runtime, warned in results:
            assert same, f"{config.model_type}: tokens differ from transformers"
            assert ran_runtime == expect_runtime, (config.model_type, warned)
            if not expect_runtime:
                assert any("do not reproduce granite" in w for w in warned), warned


def _quantized_run(bits: int):
    rt = tp_engine.init()
    model = tiny_model("qwen3", 8, 4, hidden=128)
    if rt.world_size > 1:
        model = tp_engine.parallelize(model)
    from tp_engine.quantize import quantize

    quantize(model, bits=bits)
    expected = model.__dict__["_tp_engine_hf_generate"](PROMPT, max_new_tokens=12, do_sample=False) \
        if "_tp_engine_hf_generate" in model.__dict__ else model.generate(PROMPT, max_new_tokens=12, do_sample=False)
    got = tp_engine.generate(model, PROMPT, max_new_tokens=12, do_sample=False, fast_path=True)
    return torch.equal(got, expected)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_run_on_the_runtime(world, bits):
    """A model quantized in place (each rank its shard) decodes on the runtime through each layer's
    quant_method: the same tokens as transformers' own generate over the same quantized layers."""
    results = [_quantized_run(bits)] if world == 1 else run_ranks(_quantized_run, world, bits)
    assert all(results)


def test_stop_strings_stop_where_transformers_stops():
    """``stop_strings`` (with ``tokenizer=``): the runtime stops at the token where transformers'
    StopStringCriteria stops, for a stop string that ends inside a token and one spanning tokens."""
    from tp_engine.loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(None)  # the bundled SmolLM2 tokenizer
    except (FileNotFoundError, ValueError, ImportError) as e:
        pytest.skip(f"the bundled tokenizer is not available: {e}")
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tokenizer), initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([tokenizer("The quick brown fox")["input_ids"]])
    free = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    texts = [tokenizer.decode([t]) for t in free]
    stops = [texts[6][-2:] if len(texts[6]) >= 2 else texts[6], texts[9] + texts[10]]
    assert all(stop.strip() for stop in stops), f"pick other stop strings from {texts}"
    for stop in stops:
        call = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, stop_strings=[stop], tokenizer=tokenizer)
        expected = model.generate(ids, **call)
        got = tp_engine.generate(model, ids, fast_path=True, **call)
        assert expected.shape[1] < ids.shape[1] + 24, f"transformers did not stop at {stop!r}"
        assert torch.equal(got, expected), (stop, got[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist())
