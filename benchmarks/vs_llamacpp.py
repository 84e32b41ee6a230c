"""tp-engine against llama.cpp on the real Qwen2.5-Coder-1.5B-Instruct Q4_K_M file, 2 cores, one run.

    make bench-llamacpp            # installs llama-cpp-python (a source build), then runs this
    python benchmarks/vs_llamacpp.py [--new-tokens 128] [--prompt-tokens 32] [--prefill-tokens 512] [--repeats 2]

Rows (every row in the same invocation, interleaved by nothing else: run it on a quiet machine):

1. llama.cpp, 1 thread (``llama-cpp-python``);
2. llama.cpp, 2 threads;
3. tp-engine TP=1, the GGUF kept quantized (``--dtype auto``);
4. tp-engine TP=2, kept quantized;
5. tp-engine TP=2, dequantized to float32.

Decode tok/s: a 32-token prompt (fixed random token ids), then 128 new
greedy tokens without early stop; (tokens - 1) / (time of the last token -
time of the first). Prefill tok/s: 512 prompt tokens / time to the first
new token. Median over ``--repeats``. tp-engine rows run ``tp-engine bench``
(one torch thread per rank), so each row is a fresh set of processes.
Prints a Markdown table and writes benchmarks/out/vs_llamacpp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tp_engine.model_files import locate  # noqa: E402 - after the path set-up above

MODEL = "qwen2.5-coder-1.5b"


def _prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(n)]


def llama_cpp_row(path: Path, threads: int, args: argparse.Namespace) -> dict:
    try:
        from llama_cpp import Llama  # installed by `make bench-llamacpp`, not by the test set-up
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: run `make bench-llamacpp` "
                         "(pip install llama-cpp-python, a source build with cmake)") from None
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                n_batch=args.prefill_tokens, verbose=False, seed=0)
    vocab = llm.n_vocab()
    decode, prefill = [], []
    for r in range(args.repeats + 1):  # the first pass warms up
        llm.reset()
        times = []
        for _ in llm.generate(_prompt_ids(args.prompt_tokens, vocab), top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == args.new_tokens:
                break
        llm.reset()
        ids = _prompt_ids(args.prefill_tokens, vocab, seed=1)
        start = time.perf_counter()
        llm.eval(ids)
        elapsed = time.perf_counter() - start
        if r:
            decode.append((len(times) - 1) / (times[-1] - times[0]))
            prefill.append(args.prefill_tokens / elapsed)
    return {"engine": "llama.cpp", "setup": f"{threads} thread{'s' if threads > 1 else ''}",
            "decode": statistics.median(decode), "prefill": statistics.median(prefill)}


_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|")


def _bench(path: Path, nproc: int, dtype: str, prompt: int, new: int, repeats: int) -> tuple[float, float, str]:
    """(TTFT s, decode tok/s, path line) from ``tp-engine bench``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "tp_engine", "bench", "--model", str(path), "--dtype", dtype, "--greedy",
           "--prompt-tokens", str(prompt), "--max-new-tokens", str(new), "--repeats", str(repeats)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        m = _ROW.match(line)
        if m:
            where = next((x for x in proc.stderr.splitlines() if x.startswith("tp-engine: ")), "")
            return float(m.group(4)) / 1000, float(m.group(5)), where
    raise RuntimeError(f"no result row in:\n{proc.stdout}\n{proc.stderr[-2000:]}")


def tp_engine_row(path: Path, nproc: int, dtype: str, args: argparse.Namespace) -> dict:
    _, decode, where = _bench(path, nproc, dtype, args.prompt_tokens, args.new_tokens, args.repeats)
    ttft, _, _ = _bench(path, nproc, dtype, args.prefill_tokens, 2, args.repeats)
    kept = "GGUF kept quantized" if dtype == "auto" else dtype
    return {"engine": "tp-engine", "setup": f"TP={nproc}, {kept}", "decode": decode,
            "prefill": args.prefill_tokens / ttft, "path": where}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", type=int, default=None, help="row numbers to run (default: all)")
    args = parser.parse_args()
    path = locate(MODEL)
    rows = [
        lambda: llama_cpp_row(path, 1, args),
        lambda: llama_cpp_row(path, 2, args),
        lambda: tp_engine_row(path, 1, "auto", args),
        lambda: tp_engine_row(path, 2, "auto", args),
        lambda: tp_engine_row(path, 2, "float32", args),
    ]
    results = []
    for i, row in enumerate(rows, 1):
        if args.only and i not in args.only:
            continue
        result = {"row": i, **row()}
        results.append(result)
        print(f"row {i}: {result}", file=sys.stderr, flush=True)
    base = next((r["decode"] for r in results if r["row"] == 2), None)
    print(f"\n{MODEL} ({path.name}), {time.strftime('%Y-%m-%d')}, decode {args.new_tokens} tokens after "
          f"{args.prompt_tokens}, prefill {args.prefill_tokens}\n")
    print("| row | engine | setup | decode tok/s | vs llama.cpp 2 threads | prefill tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r['decode'] / base:.2f}x" if base else "-"
        print(f"| {r['row']} | {r['engine']} | {r['setup']} | {r['decode']:.2f} | {ratio} | {r['prefill']:.1f} |")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs_llamacpp.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
