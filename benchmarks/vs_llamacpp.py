"""tp-engine against llama.cpp on the real Qwen2.5-Coder-1.5B-Instruct Q4_K_M file, in one run.

    make bench-llamacpp            # installs llama-cpp-python (a source build), then runs this
    python benchmarks/vs_llamacpp.py [--new-tokens 128] [--prompt-tokens 32] [--prefill-tokens 512] [--repeats 2]
        [--only 1 2 ...] [--plot docs/vs_llamacpp.png] [--out docs/vs_llamacpp.json]

Rows (all in the same invocation, one after another: run it on a quiet machine):

1-2.  llama.cpp (``llama-cpp-python``), 1 and 2 threads;
3-8.  tp-engine on the file kept quantized (``--dtype auto``): 1 rank x 1 thread, 1 rank x 2
      threads, 2 ranks x 1 thread, each with float32 activations (``TP_ENGINE_GGUF_ACTIVATIONS=float32``,
      within float32 rounding of the exact product) and int8 activations (``=int8``, rounded per
      block as llama.cpp's Q8_K; decode only: prefill rows of 48 and more take the float
      dequantize + GEMM path whatever the setting);
9-10. tp-engine on the 236M random float32 Llama of benchmarks/decode.py (``llama-236m``,
      created once under benchmarks/out), 1 rank x 1 and x 2 threads: the float32 reference point
      (its tok/s is of another model: no ratio to llama.cpp);
11.   tp-engine, Qwen 2 ranks x 1 thread dequantized to float32 (``--dtype float32``), the earlier
      README row.

Threads per rank: ``tp-engine bench --threads N`` when the CLI has the flag (the kernel thread
pool), and always ``TP_ENGINE_THREADS=N`` and ``OMP_NUM_THREADS=N`` (torch's pool) in the
environment. Without the flag (an older checkout) the GGUF kernels run on one thread per rank
whatever N is; the table then says so in its header and the JSON has ``"threads_flag": false``.

Decode tok/s: a 32-token prompt (fixed random token ids), then 128 new greedy tokens without
early stop; (tokens - 1) / (time of the last token - time of the first). Prefill tok/s: 512 prompt
tokens / time to the first new token. Median over ``--repeats``. tp-engine rows run ``tp-engine
bench``, so each row is a fresh set of processes. Prints a Markdown table (with the date, the CPU
and the same-run baseline, llama.cpp at 2 threads), writes the rows as JSON and a plot.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
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
BUILD_SCRIPT = ROOT / "benchmarks" / "llamacpp_build.sh"


# ------------------------------------------------------------------ helpers shared with threads.py / serve_load.py


def llamacpp_binary(name: str) -> Path:
    """llama.cpp's ``name`` (llama-server, llama-bench, llama-perplexity), built once by llamacpp_build.sh."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{BUILD_SCRIPT} failed:\n{proc.stderr[-3000:]}")
    path = Path(proc.stdout.strip().splitlines()[-1]) / name
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{path} is missing after {BUILD_SCRIPT}")
    return path


@functools.lru_cache(maxsize=None)
def cli_has_threads(command: str = "bench") -> bool:
    """Whether ``tp-engine <command>`` takes ``--threads`` (the kernel thread pool's flag)."""
    proc = subprocess.run([sys.executable, "-m", "tp_engine", command, "--help"], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return "--threads" in proc.stdout


def tp_engine_env(threads: int, activations: str | None = None) -> dict[str, str]:
    """The environment of a tp-engine row: N threads per rank (kernel pool and torch), the activations."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), TP_ENGINE_THREADS=str(threads))
    if activations:
        env["TP_ENGINE_GGUF_ACTIVATIONS"] = activations
    return env


def threads_args(threads: int, command: str = "bench") -> list[str]:
    return ["--threads", str(threads)] if cli_has_threads(command) else []


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(n)]


# ------------------------------------------------------------------ rows


def llama_cpp_row(path: Path, threads: int, args: argparse.Namespace) -> dict:
    try:
        import llama_cpp
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
    del llm
    gc.collect()
    return {"engine": "llama.cpp", "model": MODEL, "ranks": 1, "threads": threads, "activations": "Q8_K",
            "setup": f"{threads} thread{'s' if threads > 1 else ''}", "version": llama_cpp.__version__,
            "decode": statistics.median(decode), "prefill": statistics.median(prefill)}


_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|")


def _bench(model: Path, nproc: int, threads: int, dtype: str, activations: str | None, prompt: int, new: int,
           repeats: int, extra: list[str] | None = None) -> tuple[float, float, str]:
    """(TTFT s, decode tok/s, path line) from ``tp-engine bench`` (``extra``: more CLI arguments)."""
    cmd = [sys.executable, "-m", "tp_engine", "bench", "--model", str(model), "--dtype", dtype, "--greedy",
           "--prompt-tokens", str(prompt), "--max-new-tokens", str(new), "--repeats", str(repeats)]
    cmd += threads_args(threads)
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    cmd += extra or []
    proc = subprocess.run(cmd, env=tp_engine_env(threads, activations), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        m = _ROW.match(line)
        if m:
            where = "; ".join(x.removeprefix("tp-engine: ") for x in proc.stderr.splitlines()
                              if x.startswith("tp-engine: "))
            return float(m.group(4)) / 1000, float(m.group(5)), where
    raise RuntimeError(f"no result row in:\n{proc.stdout}\n{proc.stderr[-2000:]}")


def tp_engine_row(model: Path, label: str, nproc: int, threads: int, dtype: str, activations: str | None,
                  args: argparse.Namespace) -> dict:
    _, decode, where = _bench(model, nproc, threads, dtype, activations, args.prompt_tokens, args.new_tokens,
                              args.repeats)
    ttft, _, _ = _bench(model, nproc, threads, dtype, activations, args.prefill_tokens, 2, args.repeats)
    if dtype == "auto" and activations:
        kept = f"kept quantized, {activations} activations"
    else:
        kept = "float32" if label != MODEL else "dequantized to float32"
    return {"engine": "tp-engine", "model": label, "ranks": nproc, "threads": threads, "dtype": dtype,
            "activations": activations, "setup": f"{nproc} rank{'s' if nproc > 1 else ''} x {threads} thread"
            f"{'s' if threads > 1 else ''}, {kept}", "decode": decode, "prefill": args.prefill_tokens / ttft,
            "path": where}


def llama_236m() -> Path:
    """benchmarks/decode.py's random float32 Llama (vocab 49152) with SmolLM2's tokenizer (same vocabulary) beside
    it, which ``tp-engine bench`` needs: a folder of links to the checkpoint's files plus the tokenizer."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode import ensure_checkpoint  # the random float32 Llama of benchmarks/decode.py

    ckpt = ensure_checkpoint("llama")
    folder = ckpt.with_name(ckpt.name + "-tokenizer")
    if not (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from tp_engine.loading import default_model_path

        folder.mkdir(parents=True, exist_ok=True)
        for f in ckpt.iterdir():
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f.resolve())
        gguf_dir, gguf_file = os.path.split(default_model_path())
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(folder)
    return folder


def rows_for(path: Path, args: argparse.Namespace) -> list:
    rows = [
        lambda: llama_cpp_row(path, 1, args),
        lambda: llama_cpp_row(path, 2, args),
    ]
    for nproc, threads in ((1, 1), (1, 2), (2, 1)):
        for act in ("float32", "int8"):
            rows.append(lambda n=nproc, t=threads, a=act: tp_engine_row(path, MODEL, n, t, "auto", a, args))
    for threads in (1, 2):
        rows.append(lambda t=threads: tp_engine_row(llama_236m(), "llama-236m", 1, t, "float32", None, args))
    rows.append(lambda: tp_engine_row(path, MODEL, 2, 1, "float32", None, args))
    return rows


# ------------------------------------------------------------------ output


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qwen = [r for r in results if r["model"] == MODEL]
    other = [r for r in results if r["model"] != MODEL]
    shown = qwen + other
    labels = [f"{r['row']}. {r['engine']} {r['setup']}" + ("" if r["model"] == MODEL else f" [{r['model']}]")
              for r in shown]
    colors = ["tab:gray" if r["engine"] == "llama.cpp" else
              ("tab:orange" if r.get("activations") == "int8" else
               ("tab:green" if r["model"] != MODEL else "tab:blue")) for r in shown]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(shown) + 1.6), sharey=True)
    base = next((r for r in results if r["engine"] == "llama.cpp" and r["threads"] == 2), None)
    for ax, key, name in ((axes[0], "decode", "decode tok/s"), (axes[1], "prefill", "prefill tok/s")):
        y = list(range(len(shown)))[::-1]
        ax.barh(y, [r[key] for r in shown], color=colors)
        for yy, r in zip(y, shown):
            ax.text(r[key], yy, f" {r[key]:.1f}", va="center", fontsize=8)
        if base:
            ax.axvline(base[key], color="k", ls="--", lw=0.8, label="llama.cpp 2 threads")
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(range(len(shown)))[::-1], labels, fontsize=8)
    axes[1].tick_params(labelleft=False)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", type=int, default=None, help="row numbers to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "vs_llamacpp.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "vs_llamacpp.png"))
    args = parser.parse_args()
    path = locate(MODEL)
    flag = cli_has_threads()
    results = []
    for i, row in enumerate(rows_for(path, args), 1):
        if args.only and i not in args.only:
            continue
        result = {"row": i, **row()}
        results.append(result)
        print(f"row {i}: {result}", file=sys.stderr, flush=True)
    base = next((r for r in results if r["engine"] == "llama.cpp" and r["threads"] == 2), None)
    date = time.strftime("%Y-%m-%d")
    title = (f"{MODEL} ({path.name}), {date}, {cpu_name()}, {os.cpu_count()} CPUs; decode {args.new_tokens} tokens "
             f"after {args.prompt_tokens}, prefill {args.prefill_tokens}, median of {args.repeats}")
    print(f"\n{title}")
    print(f"same-run baseline: llama.cpp 2 threads, decode {base['decode']:.2f} tok/s, prefill {base['prefill']:.1f} tok/s"
          if base else "same-run baseline: (llama.cpp 2 threads not run)")
    if not flag:
        print("NOTE: this checkout's `tp-engine bench` has no --threads: the GGUF kernels ran on one thread per rank "
              "(only torch's pool got N threads)")
    print()
    print("| row | engine | model | setup | decode tok/s | vs llama.cpp 2 threads | prefill tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r['decode'] / base['decode']:.2f}x" if base and r["model"] == MODEL else "-"
        print(f"| {r['row']} | {r['engine']} | {r['model']} | {r['setup']} | {r['decode']:.2f} | {ratio} | "
              f"{r['prefill']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date, "cpu": cpu_name(), "cpus": os.cpu_count(), "threads_flag": flag,
                               "args": vars(args), "rows": results}, indent=1))
    if args.plot and results:
        plot(results, Path(args.plot), title)


if __name__ == "__main__":
    main()
