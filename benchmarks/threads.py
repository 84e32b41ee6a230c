"""Decode tok/s against threads: tp-engine (1, 2, 4 ranks per host) vs llama.cpp (llama-bench), Qwen2.5-Coder-1.5B Q4_K_M.

    python benchmarks/threads.py [--threads 1 2 4 8 16] [--ranks 1 2 4] [--activations int8 float32]
        [--new-tokens 128] [--prompt-tokens 32] [--repeats 2] [--tp-engine-args "..."] [--out FILE]

For a many-core machine (the device machine's 16 cores); it runs whatever fits the one it is on:
thread counts above the CPUs this process may use are dropped (on a 2-core VM: 1 and 2 threads).
At each total thread count T:

* llama.cpp: ``llama-bench -t T -p 0 -n 128 -d 32 -r REPEATS`` (tg128 at a depth of 32 tokens: the
  same decode after a 32-token prompt as tp-engine's rows; llama-bench built by
  benchmarks/llamacpp_build.sh with the Makefile's flags);
* tp-engine, for every R in ``--ranks`` that divides T: ``tp-engine bench --nproc R --threads T/R``
  (R ranks on this host, T/R kernel threads each; ``TP_ENGINE_THREADS`` and ``OMP_NUM_THREADS``
  too), the file kept quantized, once per ``--activations``. ``--tp-engine-args`` appends CLI
  arguments to every tp-engine row (e.g. ``--ranks-per-host auto`` for the topology launcher).

A configuration that fails (e.g. a TP size the model's 2 KV heads cannot take) is a row with its
error, not the end of the run. Prints a Markdown table (date, CPU, the same-run baseline: llama.cpp at
the highest T) and writes the rows as JSON (default benchmarks/out/threads.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from vs_llamacpp import MODEL, _bench, cli_has_threads, cpu_name, llamacpp_binary  # noqa: E402

from tp_engine.model_files import locate  # noqa: E402


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def llama_bench(binary: Path, path: Path, threads: list[int], args: argparse.Namespace) -> dict[int, dict]:
    """{T: row} from one llama-bench invocation over every thread count."""
    cmd = [str(binary), "-m", str(path), "-t", ",".join(map(str, threads)), "-p", "0", "-n", str(args.new_tokens),
           "-d", str(args.prompt_tokens), "-r", str(args.repeats), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = {}
    for r in json.loads(proc.stdout):
        if r.get("n_gen"):
            out[int(r["n_threads"])] = {"engine": "llama.cpp", "ranks": 1, "threads": int(r["n_threads"]),
                                        "activations": "Q8_K", "decode": float(r["avg_ts"]),
                                        "stddev": float(r.get("stddev_ts", 0.0)),
                                        "build": r.get("build_commit"), "cpu_info": r.get("cpu_info")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="tp-engine ranks on this host")
    parser.add_argument("--activations", nargs="+", choices=["int8", "float32"], default=["int8", "float32"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-llamacpp", action="store_true", help="tp-engine rows only")
    parser.add_argument("--tp-engine-args", default="", help="extra arguments for every `tp-engine bench` row")
    parser.add_argument("--out", default=str(HERE / "out" / "threads.json"))
    args = parser.parse_args()
    cpus = usable_cpus()
    threads = sorted({t for t in args.threads if 1 <= t <= cpus})
    dropped = sorted(set(args.threads) - set(threads))
    if dropped:
        print(f"threads {dropped} dropped: this process may use {cpus} CPUs", file=sys.stderr)
    path = locate(MODEL)
    flag = cli_has_threads()
    extra = shlex.split(args.tp_engine_args)

    ref = {} if args.no_llamacpp else llama_bench(llamacpp_binary("llama-bench"), path, threads, args)
    rows = []
    for t in threads:
        if t in ref:
            rows.append(ref[t])
            print(f"llama.cpp {t} threads: {ref[t]['decode']:.2f} tok/s", file=sys.stderr, flush=True)
        for r in args.ranks:
            if r > t or t % r:
                continue
            for act in args.activations:
                row = {"engine": "tp-engine", "ranks": r, "threads": t, "threads_per_rank": t // r, "activations": act}
                try:
                    _, decode, where = _bench(path, r, t // r, "auto", act, args.prompt_tokens, args.new_tokens,
                                              args.repeats, extra=extra)
                    row.update(decode=decode, path=where)
                except Exception as exc:  # noqa: BLE001 - a row with its reason, the run goes on
                    row.update(decode=None, error=str(exc).strip().splitlines()[-1][:200])
                rows.append(row)
                print(f"tp-engine {r} x {t // r} {act}: {row.get('decode') or row.get('error')}", file=sys.stderr,
                      flush=True)

    date = time.strftime("%Y-%m-%d")
    top = max((t for t in ref), default=None)
    print(f"\n{MODEL} ({path.name}) decode {args.new_tokens} tokens after {args.prompt_tokens}, {date}, {cpu_name()}, "
          f"{cpus} usable CPUs, median of {args.repeats}")
    if top:
        print(f"same-run baseline: llama.cpp {top} threads, {ref[top]['decode']:.2f} tok/s")
    if not flag:
        print("NOTE: `tp-engine bench` has no --threads here: tp-engine's kernels ran on one thread per rank")
    print("\n| threads | engine | ranks x threads | activations | decode tok/s | vs llama.cpp same threads |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        same = ref.get(row["threads"])
        setup = "-" if row["engine"] == "llama.cpp" else f"{row['ranks']} x {row['threads_per_rank']}"
        if row.get("decode") is None:
            print(f"| {row['threads']} | {row['engine']} | {setup} | {row['activations']} | failed: {row['error']} | - |")
            continue
        ratio = f"{row['decode'] / same['decode']:.2f}x" if same and row["engine"] != "llama.cpp" else "-"
        print(f"| {row['threads']} | {row['engine']} | {setup} | {row['activations']} | {row['decode']:.2f} | {ratio} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date, "cpu": cpu_name(), "cpus": cpus, "threads_flag": flag,
                               "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
