"""Serving under load: `tp-engine serve` at TP=1 and TP=2 against `transformers serve` or `llama-server`, in one run.

    python benchmarks/serve_load.py [--server tp-engine transformers] [--tp 1 2] [--concurrency 1 4 16 64]
        [--new-tokens 128] [--rounds 2] [--transformers-mode cb plain] [--draft int8] [--plot docs/serve_load.png]
        [--out rows.json]
    python benchmarks/serve_load.py --model qwen2.5-coder-1.5b      # tp-engine serve vs llama-server on the GGUF
        [--server tp-engine llama.cpp] [--tp 1 2] [--concurrency 1 4 16] [--activations int8]
        [--llamacpp-threads 2] [--llamacpp-parallel 16] [--threads-per-rank N]

``--model qwen2.5-coder-1.5b`` (the real Qwen2.5-Coder-1.5B-Instruct Q4_K_M file, ``make models``)
compares ``tp-engine serve`` on that file (kept quantized; ``--nproc`` = each ``--tp``; threads per
rank: ``--threads-per-rank``, default the machine's CPUs / TP, through ``--threads`` where the CLI has
it and ``TP_ENGINE_THREADS``/``OMP_NUM_THREADS``; ``--activations`` sets
``TP_ENGINE_GGUF_ACTIVATIONS`` and may list both, one configuration each) with llama.cpp's own
``llama-server`` on the same file (``-t 2 -tb 2 --parallel 16``, a KV cache of 16 x the run's
length; built once by benchmarks/llamacpp_build.sh), default levels 1, 4 and 16 clients. Both get
the same streamed greedy requests with ``ignore_eos`` and ``stream_options.include_usage`` (llama-server
takes both) and use the chat template of the file. transformers serve is not in this comparison.

The model: the bundled SmolLM2-135M-Instruct (``tp_engine.loading.default_model_path()``, a Q4_1 GGUF).
``transformers serve`` cannot serve that file itself (transformers 5.23: the config it reads from GGUF
metadata has no ``architectures``, so its model manager fails with a TypeError), so the file is
dequantized once, by transformers, into a float32 Hugging Face folder (``benchmarks/out/smollm2-hf``),
and BOTH servers load that folder: the same float32 weights, tokenizer and chat template.

Servers (a fresh one per configuration, stopped before the next starts):

* ``tp-engine serve`` at each ``--tp`` (one thread per rank, or ``--threads-per-rank``, ``--max-batch`` = the highest
  concurrency, so no request waits for a batch place); with ``--draft int8`` each TP size runs a
  second time with speculative steps (the requests are greedy, so they all speculate);
* ``transformers serve`` in one process with 2 torch threads (it gets both cores, as TP=2 does), in
  each ``--transformers-mode``: ``cb`` (``--continuous-batching``, paged attention, with a KV cache
  sized for the run: ``--cb-num-blocks``/``--cb-block-size``/``--cb-max-batch-tokens``; its default
  cache on CPU takes ~12 GiB and was ~3x slower per token than plain mode on the development machine)
  or ``plain`` (no batching: one ``model.generate`` after another on its inference thread).

Requests (the same to every server): streamed chat completions through the official openai client,
greedy (temperature 0), ``max_tokens`` = ``--new-tokens``, fixed prompts; EOS is ignored so every
request runs to full length (tp-engine: ``ignore_eos``, vLLM's extension; transformers serve has no
such field and refuses unknown ones with a 422, so it gets ``generation_config`` with
``eos_token_id: -1``, which its continuous batching reads as "no EOS", and ``min_new_tokens`` for
plain ``generate``). Tokens are counted from each answer's ``usage`` (both servers send it in the
last streamed chunk), never assumed. Before measuring, each server answers one greedy request whose
text is compared with the first server's (the table says whether they agree).

At each concurrency C, C clients each send ``--rounds`` requests one after another. Per row:
aggregate output tok/s (all completion tokens / wall time of the level), time to first token
p50/p99, inter-token latency p50/p99 (gaps between streamed content chunks), TPOT p50 (per request:
(last - first token time) / (tokens - 1), robust to chunks that carry several tokens), tokens per
request, errors. Prints a Markdown table; ``--plot`` draws tok/s and ITL p99 against concurrency.

``--plain-max-concurrency`` (default 16) skips plain mode's higher levels: it answers one request at a
time, so its 64-client level alone would take most of the run and can only repeat its single-stream rate.

``--soak SECONDS`` instead runs one server (``--tp``'s first size, or ``--server transformers``'s first mode)
at ``--soak-concurrency`` (default 8) clients that send requests back to back for that long, sampling the
resident memory of every process of the server (its process group) every 5 s. It reports requests,
errors, tok/s and, per process, RSS after the first minute (the baseline: caches and allocator pools are
warm by then), at the end and at its peak, with the growth from the baseline; ``--out`` writes it as JSON.

Run it on a quiet machine (nothing else running): the full default run takes about an hour.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HF_FOLDER = ROOT / "benchmarks" / "out" / "smollm2-hf"
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
TP_ENGINE_MODEL = "SmolLM2-135M-Instruct"
GGUF_MODELS = ("qwen2.5-coder-1.5b",)  # --model choices besides the default (tp_engine.model_files names)


class Setup:
    """What the servers load and how tp-engine / llama-server are run (set once in main)."""

    model = str(HF_FOLDER)  # tp-engine's --model
    served = TP_ENGINE_MODEL
    gguf: str | None = None  # llama-server's -m
    llamacpp_bin = ""
    llamacpp_threads = 2
    llamacpp_parallel = 16


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def export_hf_folder(folder: Path = HF_FOLDER) -> Path:
    """The bundled GGUF dequantized by transformers into a float32 HF folder (once; reused after)."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tp_engine.loading import default_model_path

    gguf_dir, gguf_file = os.path.split(default_model_path())
    print(f"exporting {gguf_file} to {folder} (float32)", file=sys.stderr, flush=True)
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = src.config
    del config.quantization_config  # the weights are plain float32 now; a GGUF-quantized model refuses to save
    config.architectures = [type(src).__name__]  # missing from GGUF metadata; transformers serve needs it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = src.generation_config
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(folder)
    return folder


class Config:
    """One server configuration: how to start it, and how to phrase a request for it."""

    def __init__(self, kind: str, tp: int = 1, mode: str = "", draft: str | None = None,
                 activations: str | None = None, threads: int | None = None):
        self.kind, self.tp, self.mode, self.draft, self.activations = kind, tp, mode, draft, activations
        self.threads = threads  # tp-engine threads per rank (None: the launcher's default)

    @property
    def name(self) -> str:
        if self.kind == "tp-engine":
            threads = f" x {self.threads} thread{'s' * (self.threads > 1)}" if self.threads else ""
            return (f"tp-engine TP={self.tp}{threads}" + (f" {self.activations}" if self.activations else "")
                    + (f" {self.draft} draft" if self.draft else ""))
        if self.kind == "llama.cpp":
            return f"llama-server -t {Setup.llamacpp_threads} --parallel {Setup.llamacpp_parallel}"
        return f"transformers serve ({self.mode})"

    def command(self, port: int, max_batch: int, max_len: int) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if self.kind == "tp-engine":
            env["OMP_NUM_THREADS"] = "1"
            cmd = [sys.executable, "-m", "tp_engine", "serve", "--model", Setup.model, "--served-model-name",
                   Setup.served, "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_batch)]
            if self.threads:
                from vs_llamacpp import threads_args, tp_engine_env

                env.update(tp_engine_env(self.threads))
                cmd += threads_args(self.threads, "serve")
            if self.activations:
                env["TP_ENGINE_GGUF_ACTIVATIONS"] = self.activations
            if self.tp > 1:
                cmd += ["--nproc", str(self.tp)]
            if self.draft:
                cmd += ["--draft", self.draft]
            return cmd, env
        if self.kind == "llama.cpp":
            t, par = Setup.llamacpp_threads, Setup.llamacpp_parallel
            cmd = [Setup.llamacpp_bin, "-m", str(Setup.gguf), "--host", "127.0.0.1", "--port", str(port),
                   "-t", str(t), "-tb", str(t), "--parallel", str(par), "-c", str(par * max_len),
                   "--alias", Setup.served, "--no-webui"]
            return cmd, env
        env["OMP_NUM_THREADS"] = "2"  # the whole machine (2 cores), as tp-engine's TP=2 gets
        cmd = [str(Path(sys.executable).with_name("transformers")), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--dtype", "float32", str(HF_FOLDER)]
        if self.mode == "cb":
            block = 32
            blocks = -(-max_batch * max_len // block) + max_batch  # every sequence's full length, plus slack
            cmd += ["--continuous-batching", "--cb-block-size", str(block), "--cb-num-blocks", str(blocks),
                    "--cb-max-batch-tokens", str(max(256, max_batch))]
        return cmd, env

    def request(self, prompt: str, new_tokens: int) -> dict:
        body = dict(messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0, stream=True)
        if self.kind in ("tp-engine", "llama.cpp"):  # llama-server takes ignore_eos and include_usage too
            return dict(body, model=Setup.served, stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True})
        gen = {"do_sample": False, "eos_token_id": -1, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens}
        return dict(body, model=str(HF_FOLDER), extra_body={"generation_config": json.dumps(gen)})


def start_server(config: Config, port: int, max_batch: int, max_len: int, log) -> subprocess.Popen:
    cmd, env = config.command(port, max_batch, max_len)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{config.name} exited with {proc.returncode} (log: {log.name})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"{config.name} did not start (log: {log.name})")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def one_request(client, config: Config, prompt: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    times: list[float] = []
    text, tokens = [], None
    stream = await client.chat.completions.create(**config.request(prompt, new_tokens))
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
    if tokens is None:
        raise RuntimeError("the stream ended without usage (cannot count its tokens)")
    return {"ttft": times[0] - start if times else float("nan"), "gaps": [b - a for a, b in zip(times, times[1:])],
            "tpot": (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else float("nan"),
            "tokens": tokens, "text": "".join(text)}


async def run_level(url: str, config: Config, concurrency: int, rounds: int, new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    results, errors = [], 0

    async def worker(w: int) -> None:
        nonlocal errors
        for r in range(rounds):
            try:
                results.append(await one_request(client, config, PROMPTS[(w + r) % len(PROMPTS)], new_tokens))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors += 1
                print(f"  error: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = [r["tokens"] for r in results]
    return {"concurrency": concurrency, "requests": len(results), "errors": errors,
            "tok_s": sum(tokens) / wall, "wall_s": wall, "tokens_per_request": sum(tokens) / max(1, len(tokens)),
            "ttft_p50": _percentile(ttft, 50), "ttft_p99": _percentile(ttft, 99),
            "itl_p50": _percentile(gaps, 50), "itl_p99": _percentile(gaps, 99),
            "tpot_p50": _percentile([r["tpot"] for r in results], 50)}


def process_group_rss(pgid: int) -> dict[int, int]:
    """Resident bytes of every live process whose process group is ``pgid`` (the server and its ranks)."""
    import psutil

    rss = {}
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                rss[proc.pid] = proc.memory_info().rss
        except (ProcessLookupError, psutil.Error):
            continue
    return rss


async def soak(url: str, config: Config, concurrency: int, seconds: float, new_tokens: int, pgid: int) -> dict:
    """Clients send requests back to back for ``seconds``; RSS of the server's processes sampled every 5 s."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    deadline = time.perf_counter() + seconds
    tokens, requests, errors, samples = 0, 0, 0, []

    async def worker(w: int) -> None:
        nonlocal tokens, requests, errors
        r = 0
        while time.perf_counter() < deadline:
            try:
                # not ``tokens += await ...``: that reads ``tokens`` before the await and loses other clients' adds
                done = await one_request(client, config, PROMPTS[(w + r) % len(PROMPTS)], new_tokens)
                tokens += done["tokens"]
                requests += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors += 1
                print(f"  error: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
            r += 1

    async def sampler() -> None:
        while time.perf_counter() < deadline:
            samples.append((seconds - (deadline - time.perf_counter()), process_group_rss(pgid)))
            await asyncio.sleep(5)
        samples.append((seconds, process_group_rss(pgid)))

    start = time.perf_counter()
    await asyncio.gather(sampler(), *(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    base_t, base = next(((t, s) for t, s in samples if t >= min(60.0, seconds / 2)), samples[0])
    processes = []
    for pid, rss0 in base.items():
        later = [s[pid] for t, s in samples if t >= base_t and pid in s]
        processes.append({"pid": pid, "rss_baseline_mib": rss0 / 2**20, "rss_end_mib": later[-1] / 2**20,
                          "rss_peak_mib": max(later) / 2**20, "growth": later[-1] / rss0 - 1})
    return {"server": config.name, "concurrency": concurrency, "seconds": wall, "requests": requests,
            "errors": errors, "tok_s": tokens / wall, "baseline_at_s": base_t, "processes": processes}


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        c = [r["concurrency"] for r in mine]
        a.plot(c, [r["tok_s"] for r in mine], marker="o", label=name)
        b.plot(c, [1000 * r["itl_p99"] for r in mine], marker="o", label=name)
    levels = sorted({r["concurrency"] for r in rows})
    for ax, label in ((a, "aggregate output tok/s"), (b, "inter-token latency p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    b.set_yscale("log")
    a.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("smollm2",) + GGUF_MODELS, default="smollm2",
                        help="smollm2 (default): the bundled model as float32 for tp-engine vs transformers serve; "
                             "qwen2.5-coder-1.5b: its Q4_K_M file for tp-engine vs llama-server")
    parser.add_argument("--server", nargs="+", choices=["tp-engine", "transformers", "llama.cpp"], default=None,
                        help="default: tp-engine transformers (smollm2), tp-engine llama.cpp (a GGUF --model)")
    parser.add_argument("--activations", nargs="+", choices=["float32", "int8"], default=None,
                        help="tp-engine's GGUF activations (one configuration each; default: the engine's default)")
    parser.add_argument("--threads-per-rank", type=int, default=None,
                        help="tp-engine threads per rank (default: 1 for smollm2, CPUs / TP for a GGUF --model)")
    parser.add_argument("--llamacpp-threads", type=int, default=2)
    parser.add_argument("--llamacpp-parallel", type=int, default=16)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tp-engine ranks (one configuration each)")
    parser.add_argument("--transformers-mode", nargs="+", choices=["cb", "plain"], default=["cb", "plain"],
                        help="transformers serve with --continuous-batching (cb) and/or without (plain); default both")
    parser.add_argument("--draft", choices=["int8", "int4"], default=None,
                        help="also run each tp-engine TP size with --draft (speculative steps for the greedy requests)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="default: 1 4 16 64 (smollm2), 1 4 16 (a GGUF --model)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--plain-max-concurrency", type=int, default=16,
                        help="transformers serve (plain) answers one request at a time: skip levels above this")
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="instead of the table: one server at --soak-concurrency for this long, with its RSS")
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--plot", default=None, help="write the plot here (the full run: docs/serve_load.png)")
    args = parser.parse_args()
    gguf = args.model in GGUF_MODELS
    if args.server is None:
        args.server = ["tp-engine", "llama.cpp"] if gguf else ["tp-engine", "transformers"]
    if args.concurrency is None:
        args.concurrency = [1, 4, 16] if gguf else [1, 4, 16, 64]
    if gguf and "transformers" in args.server:
        parser.error("--server transformers serves the float32 SmolLM2 folder only (not with a GGUF --model)")
    if not gguf and "llama.cpp" in args.server:
        parser.error("--server llama.cpp needs a GGUF --model (e.g. --model qwen2.5-coder-1.5b)")
    if min(args.concurrency) < 1 or args.new_tokens < 2 or args.rounds < 1:
        parser.error("--concurrency, --rounds must be >= 1 and --new-tokens >= 2")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    if gguf:
        sys.path.insert(0, str(ROOT))
        from tp_engine.model_files import locate

        Setup.model = Setup.gguf = str(locate(args.model))
        Setup.served = args.model
        if "llama.cpp" in args.server:
            from vs_llamacpp import llamacpp_binary

            Setup.llamacpp_bin = str(llamacpp_binary("llama-server"))
            Setup.llamacpp_threads, Setup.llamacpp_parallel = args.llamacpp_threads, args.llamacpp_parallel
    else:
        export_hf_folder()
    configs = []
    for tp in args.tp if "tp-engine" in args.server else []:
        # explicit, as the launcher's default is now one thread per core of the rank's CPUs
        threads = args.threads_per_rank or (max(1, (os.cpu_count() or 1) // tp) if gguf else 1)
        for act in args.activations or [None]:
            for d in [None] + [args.draft] * bool(args.draft):
                configs.append(Config("tp-engine", tp, draft=d, activations=act, threads=threads))
    configs += [Config("transformers", mode=m) for m in args.transformers_mode if "transformers" in args.server]
    configs += [Config("llama.cpp")] if "llama.cpp" in args.server else []
    max_batch, max_len = max(args.concurrency), 128 + args.new_tokens  # the prompts are < 64 tokens with the template
    rows, first_text, agree = [], None, {}
    log_dir = ROOT / "benchmarks" / "out"
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.soak is not None:
        run_soak(configs[0], args, log_dir)
        return
    for config in configs:
        log = open(log_dir / f"serve_load_{config.name.replace(' ', '_').replace('=', '').strip('()')}.log", "w")
        proc = start_server(config, args.port, max_batch, max_len, log)
        try:
            url = f"http://127.0.0.1:{args.port}"
            warm = asyncio.run(run_level(url, config, 1, 1, args.new_tokens))  # warm-up, and the same-answer check
            text = asyncio.run(_greedy_text(url, config, args.new_tokens))
            first_text = text if first_text is None else first_text
            agree[config.name] = text == first_text
            print(f"{config.name}: warm-up {warm['tok_s']:.1f} tok/s; greedy answer "
                  f"{'agrees' if agree[config.name] else 'DIFFERS'}", file=sys.stderr, flush=True)
            for c in args.concurrency:
                if config.mode == "plain" and c > args.plain_max_concurrency:
                    continue
                row = dict(server=config.name, **asyncio.run(run_level(url, config, c, args.rounds, args.new_tokens)))
                print(f"{config.name} C={c}: {row['tok_s']:.1f} tok/s, errors {row['errors']}", file=sys.stderr, flush=True)
                rows.append(row)
        finally:
            stop_server(proc)
            log.close()
    what = f"{Path(Setup.gguf).name} (GGUF)" if gguf else "SmolLM2-135M-Instruct (float32)"
    title = (f"{what}, {args.new_tokens} tokens per request, {args.rounds} request(s) per client, "
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores")
    print(f"\n{title}\n")
    print("| server | concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
          "TPOT p50 ms | tokens/request | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['tok_s']:.1f} | {1000 * r['ttft_p50']:.0f} | "
              f"{1000 * r['ttft_p99']:.0f} | {1000 * r['itl_p50']:.0f} | {1000 * r['itl_p99']:.0f} | "
              f"{1000 * r['tpot_p50']:.0f} | {r['tokens_per_request']:.1f} | {r['errors']} |")
    print("\nSame greedy answer as the first server: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in agree.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"title": title, "rows": rows, "same_answer": agree}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, title)


def run_soak(config: Config, args: argparse.Namespace, log_dir: Path) -> None:
    c = args.soak_concurrency
    with open(log_dir / "serve_soak.log", "w") as log:
        proc = start_server(config, args.port, max(c, 1), 128 + args.new_tokens, log)
        try:
            url = f"http://127.0.0.1:{args.port}"
            asyncio.run(run_level(url, config, 1, 1, args.new_tokens))  # warm-up
            result = asyncio.run(soak(url, config, c, args.soak, args.new_tokens, os.getpgid(proc.pid)))
        finally:
            stop_server(proc)
    result["date"] = time.strftime("%Y-%m-%d")
    print(f"\nsoak: {result['server']}, {c} clients, {result['seconds']:.0f} s, {args.new_tokens} tokens per request, "
          f"{result['date']}: {result['requests']} requests, {result['errors']} errors, {result['tok_s']:.1f} tok/s\n")
    print(f"| process | RSS at {result['baseline_at_s']:.0f} s (MiB) | RSS at end (MiB) | peak (MiB) | growth |")
    print("| --- | --- | --- | --- | --- |")
    for p in result["processes"]:
        print(f"| {p['pid']} | {p['rss_baseline_mib']:.0f} | {p['rss_end_mib']:.0f} | {p['rss_peak_mib']:.0f} | "
              f"{100 * p['growth']:+.1f} % |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


async def _greedy_text(url: str, config: Config, new_tokens: int) -> str:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    try:
        return (await one_request(client, config, PROMPTS[0], new_tokens))["text"]
    finally:
        await client.close()


if __name__ == "__main__":
    main()
