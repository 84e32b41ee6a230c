"""Serving under load: `tp-engine serve` at TP=1 and TP=2, several concurrency levels.

    python benchmarks/serve_load.py [--tp 1 2] [--concurrency 1 4 16 64] [--new-tokens 128] [--rounds 2]

For each TP size a fresh server (bundled SmolLM2-135M-Instruct, one torch
thread per rank, --max-batch = the highest concurrency) is started; at each
concurrency level C, C clients each send ``--rounds`` streamed chat requests
one after another (fixed prompts, greedy, exactly ``--new-tokens`` tokens:
``ignore_eos``), through the official openai client. Reported per row:
aggregate output tok/s (all completion tokens / wall time of the level),
time to first token p50/p99, inter-token latency p50/p99 (gaps between
streamed chunks, one chunk per token) and errors. Prints a Markdown table;
``--out FILE`` also writes the rows as JSON.

Not compared here yet: ``transformers serve`` (the issue's baseline).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

PROMPTS = [
    "Explain how a refrigerator works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for pancakes.",
    "Why do cats purr?",
    "Summarize the plot of Hamlet.",
    "How do vaccines train the immune system?",
]
MODEL = "SmolLM2-135M-Instruct"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def start_server(tp: int, port: int, max_batch: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "tp_engine", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", str(max_batch)]
    if tp > 1:
        cmd += ["--nproc", str(tp)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the TP={tp} server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the TP={tp} server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def one_request(client, prompt: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
    return {"ttft": times[0] - start if times else float("nan"),
            "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": tokens}


async def run_level(url: str, concurrency: int, rounds: int, new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    results, errors = [], 0

    async def worker(w: int) -> None:
        nonlocal errors
        for r in range(rounds):
            try:
                results.append(await one_request(client, PROMPTS[(w + r) % len(PROMPTS)], new_tokens))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors += 1
                print(f"  error: {type(exc).__name__}: {exc}", file=sys.stderr)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"concurrency": concurrency, "requests": len(results), "errors": errors,
            "tok_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "ttft_p50": _percentile(ttft, 50), "ttft_p99": _percentile(ttft, 99),
            "itl_p50": _percentile(gaps, 50), "itl_p99": _percentile(gaps, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    rows = []
    for tp in args.tp:
        proc = start_server(tp, args.port, max(args.concurrency))
        try:
            url = f"http://127.0.0.1:{args.port}"
            asyncio.run(run_level(url, 1, 1, 8))  # warm-up
            for c in args.concurrency:
                row = dict(tp=tp, **asyncio.run(run_level(url, c, args.rounds, args.new_tokens)))
                print(f"TP={tp} C={c}: {row['tok_s']:.1f} tok/s, errors {row['errors']}", file=sys.stderr, flush=True)
                rows.append(row)
        finally:
            stop_server(proc)
    print(f"\nSmolLM2-135M-Instruct, {args.new_tokens} tokens per request, {args.rounds} request(s) per client, "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores\n")
    print("| TP | concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['tp']} | {r['concurrency']} | {r['requests']} | {r['tok_s']:.1f} | {1000 * r['ttft_p50']:.0f} | "
              f"{1000 * r['ttft_p99']:.0f} | {1000 * r['itl_p50']:.0f} | {1000 * r['itl_p99']:.0f} | {r['errors']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
