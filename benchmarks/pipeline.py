"""Pipeline parallelism on one host: does PP=2 speed up decode? (No for one sequence; with sequences in flight, stages overlap.)

    python benchmarks/pipeline.py [--new-tokens 64] [--prompt-tokens 32] [--runs 2] [--only ROW ...]
    python benchmarks/pipeline.py --quick     # smoke test: a tiny model, 8 tokens, 1 run

Model: the llama-236m random checkpoint of benchmarks/decode.py (created
there once, under benchmarks/out/; ``--quick``: its tiny version).

Rows (every rank one torch thread, ranks started by ``tp_engine.launch``:
shared-memory all-reduce inside a stage, gloo sends between stages):

- ``tp1``: one process, ``tp_engine.generate``, one sequence;
- ``tp1-4seq``: one process, 4 sequences batched by the runtime (the engine's batching);
- ``pp2``: 2 stages of 6 layers, one sequence;
- ``pp2-4seq-1mb``: 2 stages, 4 sequences as one micro-batch (no overlap: a stage idles
  while the other works);
- ``pp2-4seq``: 2 stages, 4 sequences in 2 micro-batches (stage 0 runs one while stage 1 runs the other).

Figures: new tokens per second over all sequences (prompt of ``--prompt-tokens``
then ``--new-tokens`` greedy tokens, no early stop, the whole call timed on
rank 0, best of ``--runs`` after a warm-up) and milliseconds per token per
sequence. Every row's tokens are checked against the ``tp1`` row's.
Absolute speed on shared VMs drifts between days: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TP_ENGINE_NO_PROGRESS", "1")

import torch  # noqa: E402
from decode import OUT, QUICK_OUT, ensure_checkpoint, quiet_transformers  # noqa: E402

import tp_engine  # noqa: E402

# name -> (ranks, pp, sequences, micro-batches)
ROWS: dict[str, tuple[int, int, int, int | None]] = {
    "tp1": (1, 1, 1, None),
    "tp1-4seq": (1, 1, 4, None),
    "pp2": (2, 2, 1, None),
    "pp2-4seq-1mb": (2, 2, 4, 1),
    "pp2-4seq": (2, 2, 4, 2),
}


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    """The first ``n`` of four fixed random prompts (row 0 is the same in every row)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab, (4, length), generator=g).tolist()[:n]


def row_worker(path: str, name: str, new_tokens: int, prompt_tokens: int, runs: int) -> dict:
    """One rank of one row; returns (rank 0's) timings and tokens."""
    ranks, pp, seqs, micro = ROWS[name]
    quiet_transformers()
    torch.set_num_threads(1)
    rt = tp_engine.init()
    model = tp_engine.from_pretrained(path, dtype=torch.float32, pp=pp)
    ids = prompts(seqs, prompt_tokens, model.config.vocab_size)

    def call() -> list[list[int]]:
        if pp == 1:
            out = tp_engine.generate(model, torch.tensor(ids), max_new_tokens=new_tokens, do_sample=False,
                                     min_new_tokens=new_tokens, fast_path=True)
            return out[:, prompt_tokens:].tolist()
        return model.tp_engine_pipeline.generate(ids, new_tokens, micro_batches=micro)

    call()  # warm-up
    times, tokens = [], None
    for _ in range(runs):
        rt.comm.barrier()
        start = time.perf_counter()
        tokens = call()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"row": name, "comm": rt.comm.name, "seconds": best, "tok_s": seqs * new_tokens / best,
            "ms_per_token": 1000 * best / new_tokens, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--only", nargs="*", choices=list(ROWS))
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 tokens, 1 run")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.prompt_tokens, args.runs = 8, 8, 1
    path = str(ensure_checkpoint("llama", quick=args.quick))
    results = []
    for name in args.only or list(ROWS):
        ranks = ROWS[name][0]
        got = tp_engine.launch(row_worker, ranks, path, name, args.new_tokens, args.prompt_tokens, args.runs,
                               threads_per_rank=1, timeout=1800)
        results.append(got[0])
    base = next((r for r in results if r["row"] == "tp1"), None)
    print(f"\npipeline decode, {Path(path).name}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, "
          f"{datetime.date.today()}\n")
    print("| row | comm | sequences | new tok/s (all sequences) | ms/token/sequence | vs tp1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        seqs = ROWS[r["row"]][2]
        if base is not None and r["tokens"][0] != base["tokens"][0]:  # each sequence decodes as if alone
            raise SystemExit(f"{r['row']}: the first sequence's tokens differ from tp1's")
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        print(f"| {r['row']} | {r['comm']} | {seqs} | {r['tok_s']:.1f} | {r['ms_per_token']:.1f} | {ratio} |")
    if base is not None:
        four = [r for r in results if ROWS[r["row"]][2] == 4]
        if len({json.dumps(r["tokens"]) for r in four}) > 1:
            raise SystemExit("rows with 4 sequences produced different tokens")
    out = (QUICK_OUT if args.quick else OUT) / "pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{k: v for k, v in r.items() if k != "tokens"} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
