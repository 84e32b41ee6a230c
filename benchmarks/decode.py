"""Decode speed: tp-engine's runtime vs transformers, batch 1, greedy, CPU.

    python benchmarks/decode.py [--passes 2] [--runs 2] [--new-tokens 128] [--prompt-tokens 32] [--only ROW ...]
    python benchmarks/decode.py --quick      # smoke test: tiny models, 1 pass x 1 run, 16 tokens (~3 min)

The full run (17 rows x 2 passes = 34 launches) takes about 15 minutes on a
2-core machine, plus about 2 minutes the first time to create the checkpoints.

Models (random weights, float32, created once with ``save_pretrained`` under
benchmarks/out/<name>, git-ignored; ``--quick`` uses tiny versions under
benchmarks/out/quick/):

- llama-236m: hidden 1024, 12 layers, 16 Q / 4 KV heads, MLP 2816, vocab
  49152, untied embeddings (the main rows);
- gpt_neox-218m: hidden 1024, 12 layers, 16 heads, MLP 4096, rotary 25%,
  parallel residual, vocab 32768, untied;
- phi3-201m: hidden 1024, 12 layers, 16 Q / 4 KV heads (fused qkv), MLP 2816
  (fused gate/up), vocab 32064, untied;
- gemma2-201m: hidden 1024, 12 layers, 8 Q / 4 KV heads of 128, MLP 3072,
  vocab 49152, tied, sandwich norms, attention and final logit soft-capping,
  alternating sliding (window 1024) / global layers;
- falcon-204m: ``new_decoder_architecture`` (Falcon-40B/180B layout: grouped
  [Q..|K|V] query_key_value, ln_attn + ln_mlp, parallel block), hidden 1024,
  14 layers, 16 Q / 4 KV heads, MLP 4096, vocab 49152, tied;
- mixtral-203m: small experts: hidden 1024, 9 layers, 16 Q / 4 KV heads,
  8 experts of intermediate 512, top-2, vocab 32000, untied.

Workload: a 32-token prompt, then 128 new tokens, greedy, no early stop.
Decode tokens/s excludes prefill: (new tokens - 1) / (time of the last new
token - time of the first), timed by a streamer's ``put`` calls on rank 0;
median over ``--passes`` launches x ``--runs`` runs each (after a short
warm-up run per launch; rows are interleaved pass by pass, so a slow minute
on a shared machine does not hit one row only). Every launch is a fresh set
of processes (this script re-invokes itself with ``--worker``), and every
process, single or rank, uses one torch thread (the fair comparison: a
rank gets one core).

Rows (llama-236m):
- transformers, single process, ``model.generate`` (the baseline);
- tp-engine TP=1, ``tp_engine.generate``;
- tp-engine TP=2, ``tp_engine.generate``, under ``torchrun`` (shared-memory
  communicator over gloo when available, else gloo; the row says which);
- tp-engine TP=2, ``tp_engine.generate``, under ``mpirun -n 2`` (MPICommunicator);
- tp-engine TP=2, ``model = tp_engine.from_pretrained(ckpt)`` then
  ``model.generate(ids, attention_mask=..., max_new_tokens=...)``, the
  HF-style call (torchrun);
- tp-engine TP=2, ``tp_engine.generate(..., min_new_tokens=128)``: the
  baseline's exact call; ``min_new_tokens`` makes every step gather the
  full logits for transformers' processors (torchrun);
- transformers' own ``tp_plan="auto"`` at TP=2 under ``torchrun``.

Rows per family (gpt_neox, phi3, gemma2, falcon, mixtral): transformers
single process vs tp-engine TP=2 ``tp_engine.generate`` (torchrun), each
tp-engine row with its ratio to its own family's transformers row.

Every tp-engine row must run on the runtime (a fallback to transformers'
generate fails the row). Greedy tokens of every tp-engine row are checked
against the single-process transformers tokens of the same model. Prints a
markdown table; writes benchmarks/out/decode.png (copied to docs/decode.png)
and benchmarks/out/decode.json (``--quick``: benchmarks/out/quick/, docs
untouched).

The fast path's ablation mode (variants subclassing FastDecoder internals)
is gone with the fast path; the runtime has no such per-optimization switches.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
QUICK_OUT = OUT / "quick"
CKPT = OUT / "llama-236m"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TP_ENGINE_NO_PROGRESS", "1")

import torch  # noqa: E402

NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # never stop early

# Llama: the main model (also batch.py's).
CONFIG = dict(
    hidden_size=1024,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=2816,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    **NO_SPECIAL,
)

# family -> (directory name, config class, model class, full config, quick config overrides)
MODELS: dict[str, tuple[str, str, str, dict, dict]] = {
    "llama": ("llama-236m", "LlamaConfig", "LlamaForCausalLM", CONFIG,
              dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256, vocab_size=1024)),
    "gpt_neox": ("gpt_neox-218m", "GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, intermediate_size=4096,
                      vocab_size=32768, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=2048,
                      tie_word_embeddings=False, **NO_SPECIAL),
                 dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=1024)),
    "phi3": ("phi3-201m", "Phi3Config", "Phi3ForCausalLM",
             dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, vocab_size=32064, max_position_embeddings=2048,
                  original_max_position_embeddings=2048, tie_word_embeddings=False, **NO_SPECIAL),
             dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, vocab_size=1024)),
    "gemma2": ("gemma2-201m", "Gemma2Config", "Gemma2ForCausalLM",
               dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                    intermediate_size=3072, vocab_size=49152, max_position_embeddings=2048, sliding_window=1024,
                    query_pre_attn_scalar=128, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    tie_word_embeddings=True, **NO_SPECIAL),
               dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    query_pre_attn_scalar=32, intermediate_size=256, vocab_size=1024, sliding_window=8)),
    "falcon": ("falcon-204m", "FalconConfig", "FalconForCausalLM",
               dict(hidden_size=1024, num_hidden_layers=14, num_attention_heads=16, num_kv_heads=4,
                    new_decoder_architecture=True, vocab_size=49152, max_position_embeddings=2048,
                    tie_word_embeddings=True, **NO_SPECIAL),
               dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=1024)),
    "mixtral": ("mixtral-203m", "MixtralConfig", "MixtralForCausalLM",
                dict(hidden_size=1024, num_hidden_layers=9, num_attention_heads=16, num_key_value_heads=4,
                     intermediate_size=512, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                     max_position_embeddings=2048, tie_word_embeddings=False, **NO_SPECIAL),
                dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, num_local_experts=4, vocab_size=1024)),
}
FAMILIES = ["gpt_neox", "phi3", "gemma2", "falcon", "mixtral"]


# ------------------------------------------------------------------ setup


def checkpoint_path(family: str = "llama", quick: bool = False) -> Path:
    name = MODELS[family][0]
    return QUICK_OUT / family if quick else OUT / name


def ensure_checkpoint(family: str = "llama", quick: bool = False) -> Path:
    """The random checkpoint of ``family`` (created once; ``quick``: a tiny one)."""
    path = checkpoint_path(family, quick)
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    import transformers

    _, config_cls, model_cls, config, quick_config = MODELS[family]
    kwargs = {**config, **quick_config} if quick else dict(config)
    print(f"creating the {family} benchmark checkpoint in {path} ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**kwargs, dtype="float32")
    model = getattr(transformers, model_cls)(cfg).eval()
    for key in NO_SPECIAL:
        setattr(model.generation_config, key, None)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    return path


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


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(path: Path = CKPT):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def torch_comm():
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


# ------------------------------------------------------------------ workers


def _timed_runs(generate, args, rank: int, vocab: int) -> dict:
    """Warm up, then ``args.runs`` timed runs; the result as rank 0 reports it."""
    ids = prompt_ids(args.prompt_tokens, vocab)
    generate(ids, min(8, args.new_tokens), Clock())
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
    """transformers' call (also the ``min_new_tokens`` row's call, through ``tp_engine.generate``)."""
    def generate(ids, n, clock):
        with torch.inference_mode():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, streamer=clock,
            )
    return generate


def _tp_generate(model):
    import tp_engine

    def generate(ids, n, clock):
        return tp_engine.generate(model, ids, max_new_tokens=n, eos_token_id=[], streamer=clock, fast_path=True)
    return generate


def _tp_generate_min_new(model):
    import tp_engine

    def generate(ids, n, clock):
        return tp_engine.generate(
            model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, streamer=clock, fast_path=True,
        )
    return generate


def _model_generate(model):
    """What a user writes after ``tp_engine.from_pretrained``."""
    def generate(ids, n, clock):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, streamer=clock)
    return generate


def worker(kind: str, args) -> None:
    torch.set_num_threads(1)
    # A tp-engine row that silently ran transformers' generate would measure the wrong thing.
    warnings.filterwarnings("error", message="tp-engine: this call runs transformers' generate")
    ckpt = Path(args.ckpt)
    result: dict = {}
    rank = 0
    if kind == "hf":
        model = load_model(ckpt)
        result = _timed_runs(_hf_generate(model), args, 0, model.config.vocab_size)
        result["comm"] = "-"
    elif kind == "tp1":
        model = load_model(ckpt)
        result = _timed_runs(_tp_generate(model), args, 0, model.config.vocab_size)
        result["comm"] = "-"
    elif kind in ("tp2-torchrun", "tp2-min-new", "tp2-mpi"):
        import tp_engine

        if kind == "tp2-mpi":
            from tp_engine.comm.mpi import MPICommunicator

            comm = MPICommunicator()
        else:
            comm = torch_comm()
        rank = comm.rank
        model = tp_engine.parallelize(load_model(ckpt), comm=comm)
        gen = _tp_generate_min_new(model) if kind == "tp2-min-new" else _tp_generate(model)
        result = _timed_runs(gen, args, rank, model.config.vocab_size)
        result["comm"] = comm.name
        comm.barrier()
    elif kind == "tp2-from-pretrained":
        import tp_engine
        from tp_engine.runtime.decoder import comm_of

        quiet_transformers()
        model = tp_engine.from_pretrained(str(ckpt))
        comm = comm_of(model)
        rank = comm.rank
        result = _timed_runs(_model_generate(model), args, rank, model.config.vocab_size)
        result["comm"] = comm.name
        comm.barrier()
    elif kind == "hf-tp-plan":
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, tp_plan="auto").eval()
        rank = dist.get_rank()
        result = _timed_runs(_hf_generate(model), args, rank, model.config.vocab_size)
        result["comm"] = f"torch-{dist.get_backend()}"
        dist.barrier()
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))
    sys.stdout.flush()
    if "mpi4py.MPI" in sys.modules:  # mpirun counts an exit without MPI_Finalize as a failure
        sys.modules["mpi4py.MPI"].Finalize()
    os._exit(0)  # skip slow interpreter teardown; results are written


# ------------------------------------------------------------------ driver


def venv_bin(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def launch_command(script: Path, launcher: str, worker_args: list[str]) -> list[str]:
    """``script --worker ...`` under ``launcher``: python (one process), torchrun or mpirun (2 ranks)."""
    me = [str(script), *worker_args]
    if launcher == "python":
        return [sys.executable, *me]
    if launcher == "torchrun":
        torchrun = venv_bin("torchrun")
        if torchrun is None:
            raise FileNotFoundError("torchrun not found")
        return [torchrun, "--standalone", "--nproc-per-node", "2", *me]
    if launcher == "mpirun":
        mpirun = venv_bin("mpirun")
        if mpirun is None:
            raise FileNotFoundError("mpirun not found")
        extra = ["--allow-run-as-root", "--oversubscribe"] if os.geteuid() == 0 else []
        return [mpirun, *extra, "-n", "2", "--bind-to", "none", sys.executable, *me]
    raise ValueError(launcher)


def run_launch(cmd: list[str], result: Path, timeout: float) -> dict:
    """Run one launch (fresh processes, one thread each); the JSON its rank 0 wrote."""
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout:.0f} s: {exc}", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"error": f"exit code {proc.returncode}: {tail}", "wall_s": wall}
    data = json.loads(result.read_text())
    result.unlink()
    data["wall_s"] = wall
    data["load"] = (load_before, os.getloadavg()[0])
    return data


# (key, label, launcher, worker kind, ranks, model family, baseline row key)
MAIN_ROWS = [
    ("hf", "transformers `generate`, single process", "python", "hf", 1, "llama", None),
    ("tp1", "tp-engine TP=1, `tp_engine.generate`", "python", "tp1", 1, "llama", "hf"),
    ("tp2-torchrun", "tp-engine TP=2, `tp_engine.generate`, torchrun", "torchrun", "tp2-torchrun", 2, "llama", "hf"),
    ("tp2-mpi", "tp-engine TP=2, `tp_engine.generate`, mpirun", "mpirun", "tp2-mpi", 2, "llama", "hf"),
    ("tp2-from-pretrained", "tp-engine TP=2, `from_pretrained`+`model.generate`, torchrun", "torchrun",
     "tp2-from-pretrained", 2, "llama", "hf"),
    ("tp2-min-new", "tp-engine TP=2, `tp_engine.generate(min_new_tokens=N)`, torchrun", "torchrun",
     "tp2-min-new", 2, "llama", "hf"),
    ("hf-tp-plan", "transformers `tp_plan=\"auto\"` TP=2, torchrun", "torchrun", "hf-tp-plan", 2, "llama", "hf"),
]
FAMILY_ROWS = [
    row
    for fam in FAMILIES
    for row in (
        (f"hf-{fam}", "transformers `generate`, single process", "python", "hf", 1, fam, None),
        (f"tp2-{fam}", "tp-engine TP=2, `tp_engine.generate`, torchrun", "torchrun", "tp2-torchrun", 2, fam, f"hf-{fam}"),
    )
]
ROWS = MAIN_ROWS + FAMILY_ROWS


def model_label(family: str, quick: bool) -> str:
    return f"{family} (tiny)" if quick else MODELS[family][0]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "rate" in r]
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(ok) + 1.6))
    labels = [f"{r['model']}: {r['label'].replace('`', '')}" + (f" [{r['comm']}]" if r["comm"] != "-" else "")
              for r in ok]
    rates = [r["rate"] for r in ok]
    colors = ["#888888" if r["key"].startswith("hf") else "#2b7bba" for r in ok]
    bars = ax.barh(range(len(ok)), rates, color=colors)
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    for bar, r in zip(bars, ok):
        text = f"{r['rate']:.1f}" + (f"  ({r['ratio']:.2f}x)" if r.get("ratio") else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=7)
    ax.set_xlabel("decode tokens/s, batch 1, greedy, 1 thread per process (x: vs transformers, same model)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(rates) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    out = QUICK_OUT if args.quick else OUT
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    selected = [r for r in ROWS if not args.only or r[0] in args.only]
    unknown = set(args.only or ()) - {r[0] for r in ROWS}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {[r[0] for r in ROWS]}")
    ckpts = {fam: ensure_checkpoint(fam, args.quick) for fam in dict.fromkeys(r[5] for r in selected)}
    # Several passes over all rows (fresh processes each time), so a slow
    # minute on a shared machine does not land on one row only.
    rows = [{"key": key, "label": label, "ranks": ranks, "family": fam, "model": model_label(fam, args.quick),
             "baseline": base, "rates": [], "prefill_s": [], "loads": [], "comm": "-"}
            for key, label, _, _, ranks, fam, base in selected]
    for p in range(args.passes):
        for row, (key, _, launcher, kind, _, fam, _) in zip(rows, selected):
            if "error" in row:
                continue
            print(f"pass {p + 1}/{args.passes}: {key} ...", file=sys.stderr, flush=True)
            result = out / f".decode-{key}.json"
            worker_args = ["--worker", kind, "--result", str(result), "--ckpt", str(ckpts[fam]), "--runs", str(args.runs),
                           "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
            try:
                data = run_launch(launch_command(Path(__file__).resolve(), launcher, worker_args), result, args.timeout)
            except FileNotFoundError as exc:
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
    by_key = {r["key"]: r for r in rows}
    for row in rows:
        if row["rates"] and "error" not in row:
            row["rate"] = statistics.median(row["rates"])
    for row in rows:
        base = by_key.get(row["baseline"]) if row["baseline"] else None
        if "rate" in row and base is not None and "rate" in base:
            row["ratio"] = row["rate"] / base["rate"]

    # Reference tokens per model: this run's transformers row, else the last one saved.
    refs: dict[str, list[int] | None] = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        ref_row = next((r for r in rows if r["family"] == fam and r["key"].startswith("hf")
                        and r["baseline"] is None and "rate" in r), None)
        ref_file = out / f"decode-reference-{fam}-{args.prompt_tokens}-{args.new_tokens}.json"
        if ref_row is not None:
            ref_file.write_text(json.dumps(ref_row["tokens"]))
            refs[fam] = ref_row["tokens"]
        else:
            refs[fam] = json.loads(ref_file.read_text()) if ref_file.exists() else None
    date = datetime.date.today().isoformat()
    print()
    print(f"Decode speed ({date}), {args.prompt_tokens}-token prompt + {args.new_tokens} new tokens, greedy, batch 1, "
          f"1 torch thread per process, median of {args.passes} x {args.runs} runs ({os.cpu_count()} cores).")
    print()
    print("| setup | model | ranks | communicator | decode tok/s | vs transformers | prefill ms | tokens = transformers |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
    all_match = True
    for r in rows:
        if "rate" not in r:
            print(f"| {r['label']} | {r['model']} | {r['ranks']} | - | failed | | | |")
            if not r["key"].startswith("hf"):
                all_match = False
            continue
        ref_tokens = refs.get(r["family"])
        if r["baseline"] is None:
            same = "reference"
        elif ref_tokens is None:
            same = "unchecked (no transformers row yet)"
        else:
            same = "yes" if r["tokens"] == ref_tokens else "**NO**"
        if not r["key"].startswith("hf") and same == "**NO**":
            all_match = False
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        prefill = statistics.median(r["prefill_s"]) * 1e3
        print(f"| {r['label']} | {r['model']} | {r['ranks']} | {r['comm']} | {r['rate']:.1f} | {ratio} | {prefill:.0f} "
              f"| {same} |")
    print()
    runs = "; ".join(f"{r['key']}: " + ", ".join(f"{x:.1f}" for x in r["rates"]) for r in rows if r["rates"])
    print(f"All runs (tok/s): {runs}")
    loads = ", ".join(f"{r['key']} " + "/".join(f"{a:.1f}->{b:.1f}" for a, b in r["loads"]) for r in rows)
    print(f"1-min load average around each row (other work on the machine skews timings): {loads}")
    print("Greedy tokens of every tp-engine row " + ("equal" if all_match else "DO NOT all equal (or a row failed)")
          + " the single-process transformers tokens of the same model.")
    (out / "decode.json").write_text(json.dumps({"date": date, "quick": args.quick, "passes": args.passes,
                                                 "runs": args.runs, "prompt_tokens": args.prompt_tokens,
                                                 "new_tokens": args.new_tokens, "rows": rows}, indent=1))
    if any("rate" in r for r in rows):
        png = out / "decode.png"
        title = (f"{args.prompt_tokens}-token prompt + {args.new_tokens} new tokens, {os.cpu_count()}-core CPU, {date}"
                 + (" (--quick: tiny models)" if args.quick else ""))
        plot(rows, png, title)
        if args.quick:
            print(f"Plot: {png} (--quick: docs/ untouched). Total {time.perf_counter() - t0:.0f} s.")
        else:
            docs = ROOT / "docs"
            docs.mkdir(exist_ok=True)
            shutil.copyfile(png, docs / "decode.png")
            print(f"Plot: {png} (copied to docs/decode.png). Total {time.perf_counter() - t0:.0f} s.")
    return 0 if all_match else 1


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2, help="timed runs per process launch")
    p.add_argument("--passes", type=int, default=2, help="launches per row (rows interleaved)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--only", nargs="*", help=f"rows to run: {[r[0] for r in ROWS]}")
    p.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny models under benchmarks/out/quick, 1 pass x 1 run, 8-token prompt, 16 tokens")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args.worker:
        args.passes, args.runs, args.new_tokens, args.prompt_tokens = 1, 1, 16, 8
    return args


if __name__ == "__main__":
    args = parse()
    if args.worker:
        worker(args.worker, args)
    else:
        sys.exit(main(args))
