"""Decode speed: tp-engine's fast path vs transformers, batch 1, greedy, CPU.

    python benchmarks/decode.py [--passes 2] [--runs 2] [--new-tokens 128] [--prompt-tokens 32] [--only ROW ...]
    python benchmarks/decode.py --ablations     # per-optimization gains (~5 min)

Model: a random Llama (hidden 1024, 12 layers, 16 Q / 4 KV heads, MLP 2816,
vocab 49152, untied embeddings, float32, ~236M parameters), created once with
``save_pretrained`` under benchmarks/out/llama-236m (git-ignored).

Workload: a 32-token prompt, then 128 new tokens, greedy. Decode tokens/s
excludes prefill: (new tokens - 1) / (time of the last new token - time of
the first), timed by a streamer's ``put`` calls on rank 0; median over
``--passes`` launches x ``--runs`` runs each (after a short warm-up run per
launch; rows are interleaved pass by pass, so a slow minute on a shared
machine does not hit one row only). Every launch is a fresh set of
processes (this script re-invokes itself with ``--worker``), and every
process, single or rank, uses one torch thread (the fair comparison: a
rank gets one core).

Rows:
- transformers, single process, ``model.generate``;
- tp-engine TP=1 fast path (``tp_engine.fastpath.fast_generate``);
- tp-engine TP=2 fast path under ``torchrun`` (shared-memory communicator
  over gloo when available, else gloo; the row says which);
- tp-engine TP=2 fast path under ``mpirun -n 2`` (MPICommunicator);
- tp-engine TP=2 through HF ``generate`` (parallelized modules, no fast
  path; torchrun, same communicator as above);
- transformers' own ``tp_plan="auto"`` at TP=2 under ``torchrun``.

Greedy tokens of every tp-engine row are checked against the single-process
transformers tokens. Prints a markdown table; writes benchmarks/out/decode.png
(copied to docs/decode.png) and benchmarks/out/decode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
CKPT = OUT / "llama-236m"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CONFIG = dict(
    hidden_size=1024,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=2816,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,  # never stop early: every run makes exactly --new-tokens tokens
    pad_token_id=None,
)


# ------------------------------------------------------------------ setup


def ensure_checkpoint() -> Path:
    if (CKPT / "config.json").exists() and any(CKPT.glob("*.safetensors")):
        return CKPT
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"creating the benchmark checkpoint in {CKPT} ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG, dtype="float32")
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = None
    tmp = CKPT.with_name(CKPT.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, CKPT)
    return CKPT


def prompt_ids(n: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab, (1, n), generator=g)


class Clock:
    """A streamer that timestamps every put (the prompt first, then each token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def decode_rate(self) -> tuple[float, float]:
        """(decode tokens/s excluding the first token, prefill seconds)."""
        tok = self.times[1:]
        return (len(tok) - 1) / (tok[-1] - tok[0]), tok[0] - self.times[0]


def load_model():
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.float32).eval()


# ------------------------------------------------------------------ workers


def _timed_runs(generate, args, rank: int) -> dict:
    """Warm up, then ``args.runs`` timed runs; the result as rank 0 reports it."""
    ids = prompt_ids(args.prompt_tokens, CONFIG["vocab_size"])
    generate(ids, 8, Clock())
    rates, prefills, tokens = [], [], None
    for _ in range(args.runs):
        clock = Clock()
        out = generate(ids, args.new_tokens, clock)
        rate, prefill = clock.decode_rate()
        rates.append(rate)
        prefills.append(prefill)
        new = out[0, ids.shape[1]:].tolist()
        if tokens is not None and new != tokens:
            raise RuntimeError("greedy tokens changed between runs")
        tokens = new
    return {"rates": rates, "prefill_s": prefills, "tokens": tokens, "rank": rank}


def _hf_generate(model):
    def generate(ids, n, clock):
        with torch.inference_mode():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, streamer=clock,
            )
    return generate


def _fast_generate(model):
    from tp_engine.fastpath import fast_generate

    def generate(ids, n, clock):
        return fast_generate(model, ids, n, eos_token_id=[], streamer=clock)
    return generate


def _torch_comm():
    """Join the torchrun group; shared memory over gloo where ranks can map it."""
    import tp_engine

    rt = tp_engine.init()
    comm = rt.comm
    if rt.comm.name.startswith("torch"):
        try:
            from tp_engine.comm.shm import try_shm_communicator
        except ImportError:
            return comm
        comm = try_shm_communicator(rt.comm, close_fallback=False) or comm
    return comm


def worker(kind: str, args) -> None:
    torch.set_num_threads(1)
    result: dict = {}
    rank = 0
    if kind == "hf":
        result = _timed_runs(_hf_generate(load_model()), args, 0)
        result["comm"] = "-"
    elif kind == "fast-tp1":
        result = _timed_runs(_fast_generate(load_model()), args, 0)
        result["comm"] = "-"
    elif kind in ("fast-torchrun", "hfgen-torchrun", "fast-mpi"):
        import tp_engine

        if kind == "fast-mpi":
            from tp_engine.comm.mpi import MPICommunicator

            comm = MPICommunicator()
        else:
            comm = _torch_comm()
        rank = comm.rank
        model = tp_engine.parallelize(load_model(), comm=comm)
        gen = _fast_generate(model) if kind.startswith("fast") else _hf_generate(model)
        result = _timed_runs(gen, args, rank)
        result["comm"] = comm.name
        comm.barrier()
    elif kind == "hf-tp-plan":
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.float32, tp_plan="auto").eval()
        rank = dist.get_rank()
        result = _timed_runs(_hf_generate(model), args, rank)
        result["comm"] = f"torch-{dist.get_backend()}"
        dist.barrier()
    elif kind.startswith("ablation"):
        result = ablation_worker(kind, args)
        rank = result["rank"]
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))
    sys.stdout.flush()
    if "mpi4py.MPI" in sys.modules:  # mpirun counts an exit without MPI_Finalize as a failure
        sys.modules["mpi4py.MPI"].Finalize()
    os._exit(0)  # skip slow interpreter teardown; results are written  # skip slow interpreter/MPI teardown; results are written


# ------------------------------------------------------------------ ablations


def ablation_worker(kind: str, args) -> dict:
    """Fast-path variants, each with one optimization taken out (TP=1, or TP=2 under mpirun)."""
    import torch.nn.functional as F

    import tp_engine
    from tp_engine.fastpath import FastDecoder

    model = load_model()
    rank = 0
    if kind == "ablation-mpi":
        from tp_engine.comm.mpi import MPICommunicator

        comm = MPICommunicator()
        rank = comm.rank
        model = tp_engine.parallelize(model, comm=comm)
    layers = list(model.model.layers)

    class Unfused(FastDecoder):
        """q, k, v and gate, up as separate matmuls on the model's own modules."""

        def _qkv(self, h, L):
            a = layers[self.layers.index(L)].self_attn
            return torch.cat([F.linear(h, m.weight, m.bias) for m in (a.q_proj, a.k_proj, a.v_proj)], dim=-1)

        def _gate_up(self, h, L):
            m = layers[self.layers.index(L)].mlp
            return torch.cat([F.linear(h, p.weight, p.bias) for p in (m.gate_proj, m.up_proj)], dim=-1)

    class GatherLogits(FastDecoder):
        """Greedy by gathering the full logits, argmax, then an embedding all-reduce."""

        def __init__(self, model):
            super().__init__(model, int8_argmax=False)

        def _greedy(self, h):
            return int(self._full_logits(self._logits(h)).argmax()), None

    class NoInt8(FastDecoder):
        """Greedy argmax reads the whole float32 LM head shard (no int8 prefilter)."""

        def __init__(self, model):
            super().__init__(model, int8_argmax=False)

    class NoGrad(FastDecoder):
        """torch.no_grad instead of torch.inference_mode."""

        def generate(self, *a, **kw):
            with torch.no_grad():
                return FastDecoder.generate.__wrapped__(self, *a, **kw)

    class ManualNorm(FastDecoder):
        """RMSNorm as HF writes it (pow, mean, add, rsqrt, mul, mul) instead of F.rms_norm."""

        def _norm(self, x, w, eps):
            r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
            return (x * r).mul_(w)

    variants = {
        "full fast path": FastDecoder,
        "q/k/v and gate/up not fused": Unfused,
        "no int8 argmax prefilter (full fp32 LM head)": NoInt8,
        "greedy via gathered logits + embedding all-reduce (and no int8 prefilter)": GatherLogits,
        "no_grad instead of inference_mode": NoGrad,
        "manual RMSNorm instead of F.rms_norm": ManualNorm,
    }
    # Round-robin over variants (one run each per round), so slow drifts of the
    # machine's speed hit every variant alike.
    ids = prompt_ids(args.prompt_tokens, CONFIG["vocab_size"])
    decoders = {name: cls(model) for name, cls in variants.items()}
    results = {name: {"rates": [], "prefill_s": [], "tokens": None} for name in variants}
    for decoder in decoders.values():
        decoder.generate(ids, 8, eos_token_id=[])
    for _ in range(args.runs):
        for name, decoder in decoders.items():
            clock = Clock()
            out = decoder.generate(ids, args.new_tokens, eos_token_id=[], streamer=clock)
            rate, prefill = clock.decode_rate()
            results[name]["rates"].append(rate)
            results[name]["prefill_s"].append(prefill)
            results[name]["tokens"] = out[0, ids.shape[1]:].tolist()
    return {"variants": results, "rank": rank}


# ------------------------------------------------------------------ driver


def _venv_bin(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def _launch(kind: str, launcher: str, args, result: Path) -> list[str]:
    me = [str(Path(__file__).resolve()), "--worker", kind, "--result", str(result),
          "--runs", str(args.runs), "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
    if launcher == "python":
        return [sys.executable, *me]
    if launcher == "torchrun":
        torchrun = _venv_bin("torchrun")
        if torchrun is None:
            raise FileNotFoundError("torchrun not found")
        return [torchrun, "--standalone", "--nproc-per-node", "2", *me]
    if launcher == "mpirun":
        mpirun = _venv_bin("mpirun")
        if mpirun is None:
            raise FileNotFoundError("mpirun not found")
        extra = ["--allow-run-as-root", "--oversubscribe"] if os.geteuid() == 0 else []
        return [mpirun, *extra, "-n", "2", "--bind-to", "none", sys.executable, *me]
    raise ValueError(launcher)


ROWS = [
    # (key, label, launcher, worker kind, ranks)
    ("hf", "transformers `generate`, single process", "python", "hf", 1),
    ("fast-tp1", "tp-engine TP=1, fast path", "python", "fast-tp1", 1),
    ("fast-torchrun", "tp-engine TP=2, fast path, torchrun", "torchrun", "fast-torchrun", 2),
    ("fast-mpi", "tp-engine TP=2, fast path, mpirun", "mpirun", "fast-mpi", 2),
    ("hfgen-torchrun", "tp-engine TP=2 via HF generate (no fast path), torchrun", "torchrun", "hfgen-torchrun", 2),
    ("hf-tp-plan", "transformers `tp_plan=\"auto\"` TP=2, torchrun", "torchrun", "hf-tp-plan", 2),
]


def run_row(launcher: str, kind: str, args, timeout: float = 600) -> dict:
    result = OUT / f".decode-{kind}.json"
    result.unlink(missing_ok=True)
    cmd = _launch(kind, launcher, args, result)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"error": f"exit code {proc.returncode}: {tail}", "wall_s": wall}
    data = json.loads(result.read_text())
    result.unlink()
    data["wall_s"] = wall
    data["load"] = (load_before, os.getloadavg()[0])
    return data


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "rate" in r]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(ok) + 1.5))
    labels = [r["label"] + (f" [{r['comm']}]" if r["comm"] != "-" else "") for r in ok]
    rates = [r["rate"] for r in ok]
    colors = ["#888888" if r["key"].startswith("hf") else "#2b7bba" for r in ok]
    bars = ax.barh(range(len(ok)), rates, color=colors)
    ax.set_yticks(range(len(ok)), labels, fontsize=8)
    ax.invert_yaxis()
    base = next((r["rate"] for r in ok if r["key"] == "hf"), None)
    for bar, r in zip(bars, ok):
        text = f"{r['rate']:.1f}" + (f"  ({r['rate'] / base:.2f}x)" if base else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=8)
    ax.set_xlabel("decode tokens/s (batch 1, greedy, 1 thread per process)")
    ax.set_title("236M Llama, 32-token prompt + 128 new tokens, 2-core CPU")
    ax.set_xlim(0, max(rates) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ensure_checkpoint()
    if args.ablations:
        return run_ablations(args)
    # Several passes over all rows (fresh processes each time), so a slow
    # minute on a shared machine does not land on one row only.
    selected = [r for r in ROWS if not args.only or r[0] in args.only]
    rows = [{"key": key, "label": label, "ranks": ranks, "rates": [], "prefill_s": [], "loads": []}
            for key, label, _, _, ranks in selected]
    for p in range(args.passes):
        for row, (key, label, launcher, kind, ranks) in zip(rows, selected):
            if "error" in row:
                continue
            print(f"pass {p + 1}/{args.passes}: {key} ...", file=sys.stderr, flush=True)
            try:
                data = run_row(launcher, kind, args)
            except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
                data = {"error": str(exc)}
            if "error" in data:
                print(f"  {key} failed: {data['error']}", file=sys.stderr)
                row["error"] = data["error"]
                continue
            if row.get("tokens") not in (None, data["tokens"]):
                raise RuntimeError(f"{key}: greedy tokens changed between passes")
            row["tokens"], row["comm"] = data["tokens"], data["comm"]
            row["rates"] += data["rates"]
            row["prefill_s"] += data["prefill_s"]
            row["loads"].append(data["load"])
    for row in rows:
        if row["rates"] and "error" not in row:
            row["rate"] = statistics.median(row["rates"])

    ref = next((r for r in rows if r["key"] == "hf" and "rate" in r), None)
    base = ref["rate"] if ref else None
    # Reference tokens: this run's transformers row, else the last one saved.
    ref_file = OUT / f"decode-reference-{args.prompt_tokens}-{args.new_tokens}.json"
    if ref is not None:
        ref_file.write_text(json.dumps(ref["tokens"]))
        ref_tokens = ref["tokens"]
    else:
        ref_tokens = json.loads(ref_file.read_text()) if ref_file.exists() else None
    print()
    print(f"Decode speed, {args.prompt_tokens}-token prompt + {args.new_tokens} new tokens, greedy, batch 1, "
          f"1 torch thread per process, median of {args.passes} x {args.runs} runs ({os.cpu_count()} cores).")
    print()
    print("| setup | ranks | communicator | decode tok/s | vs transformers | prefill ms | tokens = transformers |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- |")
    all_match = True
    for r in rows:
        if "rate" not in r:
            print(f"| {r['label']} | {r['ranks']} | - | failed | | | |")
            continue
        if r is ref:
            same = "reference"
        elif ref_tokens is None:
            same = "unchecked (no transformers row yet)"
        else:
            same = "yes" if r["tokens"] == ref_tokens else "**NO**"
        if r["key"] not in ("hf", "hf-tp-plan") and same == "**NO**":
            all_match = False
        ratio = f"{r['rate'] / base:.2f}x" if base else "-"
        prefill = statistics.median(r["prefill_s"]) * 1e3
        print(f"| {r['label']} | {r['ranks']} | {r['comm']} | {r['rate']:.1f} | {ratio} | {prefill:.0f} | {same} |")
    print()
    runs = "; ".join(f"{r['key']}: " + ", ".join(f"{x:.1f}" for x in r["rates"]) for r in rows if r["rates"])
    print(f"All runs (tok/s): {runs}")
    loads = ", ".join(f"{r['key']} " + "/".join(f"{a:.1f}->{b:.1f}" for a, b in r["loads"]) for r in rows)
    print(f"1-min load average around each row (other work on the machine skews timings): {loads}")
    print("Greedy tokens of every tp-engine row " + ("equal" if all_match else "DO NOT all equal")
          + " the single-process transformers tokens.")
    (OUT / "decode.json").write_text(json.dumps(rows, indent=1))
    if any("rate" in r for r in rows):
        png = OUT / "decode.png"
        plot(rows, png)
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copyfile(png, docs / "decode.png")
        print(f"Plot: {png} (copied to docs/decode.png). Total {time.perf_counter() - t0:.0f} s.")
    return 0 if all_match else 1


def run_ablations(args) -> int:
    print("Ablations: each variant removes one optimization from the fast path. Variants run")
    print("round-robin in one process set; tok/s as median (best) of the runs.")
    print()
    print("| variant | TP=1 tok/s | TP=2 (mpirun) tok/s |")
    print("| --- | ---: | ---: |")
    args.runs = max(args.runs, 5)
    tp1 = run_row("python", "ablation-tp1", args)
    tp2 = run_row("mpirun", "ablation-mpi", args)
    for d in (tp1, tp2):
        if "error" in d:
            print(d["error"])
            return 1
    ref_tokens = tp1["variants"]["full fast path"]["tokens"]
    for name in tp1["variants"]:
        a, b = tp1["variants"][name], tp2["variants"][name]
        same = a["tokens"] == ref_tokens and b["tokens"] == ref_tokens
        cell = lambda d: f"{statistics.median(d['rates']):.1f} ({max(d['rates']):.1f})"  # noqa: E731
        print(f"| {name} | {cell(a)} | {cell(b)} |"
              + ("" if same else " (tokens differ!)"))
    print()
    for label, d in (("TP=1", tp1), ("TP=2", tp2)):
        print(f"{label} all runs: " + "; ".join(
            f"{n}: " + ", ".join(f"{x:.1f}" for x in v["rates"]) for n, v in d["variants"].items()))
    return 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2, help="timed runs per process launch")
    p.add_argument("--passes", type=int, default=2, help="launches per row (rows interleaved)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--only", nargs="*", help=f"rows to run: {[r[0] for r in ROWS]}")
    p.add_argument("--ablations", action="store_true", help="measure what each fast-path optimization gains")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    if args.worker:
        worker(args.worker, args)
    else:
        sys.exit(main(args))
