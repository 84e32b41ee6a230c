"""With two machines (here two cores, one rank each), what is the best use of the second one?

    python benchmarks/speculative.py                 # the full table (issue 13): real pair, float32 and int8
    python benchmarks/speculative.py --quick         # smoke: 2 prompts x 8 tokens, float32 only, out/quick/

Target Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, dequantized), draft Qwen2.5-Coder-0.5B-Instruct (same
tokenizer), both from ``tp_engine.model_files.locate`` (``make models``). ``--target`` / ``--draft``
take other files (e.g. the bundled SmolLM2 as both, for a fast check of the code paths).

| row | target | draft |
| --- | --- | --- |
| a | TP=1 | none |
| b | TP=2 | none |
| c | TP=1 | 0.5B on the second rank, synchronous (waits for each verdict; ``overlap=False``) |
| d | TP=1 | 0.5B on the second rank, asynchronous (drafts ahead, adaptive blocks) |
| e | TP=2 | sharded int8 self-copy |
| f | TP=2 | 0.5B sharded with it |

Workload: 8 fixed code and chat prompts (chat template), greedy, ``--new-tokens`` each (EOS ignored, so
every row makes the same number of tokens), one run, every row in the same invocation, each row in
fresh processes (one thread each). tok/s = all new tokens / wall time of the 8 generations (prefill
included), measured on rank 0 after one warm-up generation. "same as a": every prompt's tokens equal
row a's. ``--weights int8`` quantizes target and draft (weight-only int8, ``tp_engine.quantize``) after
loading. Writes benchmarks/out/speculative.json and .png (copied to docs/speculative.png; not with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TP_ENGINE_NO_PROGRESS", "1")

import torch  # noqa: E402

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Implement binary search in C and explain its complexity.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Explain the difference between a process and a thread.",
    "Write a bash one-liner that counts the lines of every .py file in a directory tree.",
    "What is tensor parallelism? Answer in two sentences.",
    "Refactor this loop into a list comprehension: result = []\nfor x in xs:\n    if x > 0:\n        result.append(x * 2)",
    "Give three tips for writing readable code.",
]
ROWS = {
    "a": ("TP=1", "none", 1),
    "b": ("TP=2", "none", 2),
    "c": ("TP=1", "0.5B on rank 1, synchronous", 2),
    "d": ("TP=1", "0.5B on rank 1, asynchronous", 2),
    "e": ("TP=2", "int8 self-copy, sharded", 2),
    "f": ("TP=2", "0.5B sharded with it", 2),
}


def worker(row: str, target_path: str, draft_path: str, weights: str, prompts: list, new_tokens: int, k: int) -> dict:
    import tp_engine
    from tp_engine.async_speculative import async_speculative_generate, target_group
    from tp_engine.comm.base import SingleProcessCommunicator
    from tp_engine.quantize import quantize
    from tp_engine.speculative import speculative_generate

    torch.set_num_threads(1)
    rt = tp_engine.init()

    def load(path, comm):
        model = tp_engine.from_pretrained(path, dtype=torch.float32, comm=comm)
        if weights == "int8":
            quantize(model, bits=8)
        return model

    if row in ("c", "d"):
        group = target_group(rt.comm, 1)
        model = load(target_path, group) if group is not None else None
        draft = load(draft_path, SingleProcessCommunicator()) if group is None else None
    else:
        model = load(target_path, rt.comm)
        draft = load(draft_path, rt.comm) if row == "f" else None  # sharded over the same ranks

    def run(ids, n):
        if row in ("a", "b"):
            return tp_engine.generate(model, ids, max_new_tokens=n, eos_token_id=[], do_sample=False, fast_path=True), None
        if row in ("c", "d"):
            return async_speculative_generate(model, ids, n, draft, 1, num_draft_tokens=k, eos_token_id=[],
                                              overlap=row == "d")
        return speculative_generate(model, ids, n, "int8" if row == "e" else draft, num_draft_tokens=k, eos_token_id=[])

    ids_list = [torch.tensor([p]) for p in prompts]
    run(ids_list[0], 4)  # warm-up: builds decoders and drafts, allocates caches
    rt.comm.barrier()
    t0 = time.perf_counter()
    texts, drafted, accepted, rounds, stale = [], 0, 0, 0, 0
    for ids in ids_list:
        out, stats = run(ids, new_tokens)
        texts.append(out[0, ids.shape[1]:].tolist())
        if stats is not None:
            drafted, accepted, rounds = drafted + stats.drafted, accepted + stats.accepted, rounds + stats.rounds
            stale += getattr(stats, "stale", 0)
    elapsed = time.perf_counter() - t0
    n = sum(len(t) for t in texts)
    return {"row": row, "tokens_per_s": n / elapsed, "acceptance": accepted / drafted if drafted else None,
            "tokens_per_round": n / rounds if rounds else None, "stale": stale, "tokens": texts, "comm": rt.comm.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_draft_tokens (the cap of an adaptive block)")
    parser.add_argument("--weights", default="float32,int8", help="float32, int8 or both")
    parser.add_argument("--rows", default="abcdef")
    parser.add_argument("--target", default=None, help="target GGUF/checkpoint (default: Qwen2.5-Coder-1.5B)")
    parser.add_argument("--draft", default=None, help="draft GGUF/checkpoint (default: Qwen2.5-Coder-0.5B)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts x 8 tokens, float32; out/quick/")
    args = parser.parse_args()
    import tp_engine
    from tp_engine.loading import load_tokenizer
    from tp_engine.model_files import locate

    target = args.target or str(locate("qwen2.5-coder-1.5b"))
    draft = args.draft or str(locate("qwen2.5-coder-0.5b"))
    prompts_text = PROMPTS[:2] if args.quick else PROMPTS
    if args.quick:
        args.new_tokens, args.weights = 8, "float32"
    tok = load_tokenizer(target)
    prompts = []
    for p in prompts_text:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        prompts.append(ids[0].tolist())
    out = OUT / "quick" if args.quick else OUT
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    tables = {}
    for weights in args.weights.split(","):
        results = []
        for row in args.rows:
            world = ROWS[row][2]
            if row == "e" and weights == "int8":  # the int8 self-copy of an int8 target is the target itself
                results.append({"row": row, "skipped": "n/a: the target is already int8 (its int8 copy is itself)"})
                continue
            print(f"row {row} ({weights}) ...", file=sys.stderr, flush=True)
            try:
                r = tp_engine.launch(worker, world, row, target, draft, weights, prompts, args.new_tokens, args.k,
                                     threads_per_rank=1)[0]
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                r = {"row": row, "skipped": f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]}
            results.append(r)
        measured = [r for r in results if "skipped" not in r]
        base = next((r for r in measured if r["row"] == "a"), measured[0])
        b = next((r for r in measured if r["row"] == "b"), None)
        print(f"\n{Path(target).name} (target) / {Path(draft).name} (draft), weights {weights}, {len(prompts)} prompts x "
              f"{args.new_tokens} new tokens, greedy, k={args.k}, {date}\n")
        print("| row | target | draft | tok/s | vs a | vs b | acceptance | tokens/round | same as a |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            if "skipped" in r:
                t, d, _ = ROWS[r["row"]]
                print(f"| {r['row']} | {t} | {d} | {r['skipped']} | | | | | |")
                continue
            r["same_as_a"] = r["tokens"] == base["tokens"]
            r["vs_a"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["vs_b"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
            tpr = "-" if r["tokens_per_round"] is None else f"{r['tokens_per_round']:.2f}"
            vs_b = "-" if r["vs_b"] is None else f"{r['vs_b']:.2f}x"
            t, d, _ = ROWS[r["row"]]
            print(f"| {r['row']} | {t} | {d} | {r['tokens_per_s']:.2f} | {r['vs_a']:.2f}x | {vs_b} | {acc} | {tpr} | "
                  f"{'yes' if r['same_as_a'] else 'NO'} |")
        for r in results:
            r.pop("tokens", None)
        tables[weights] = results
    # A run of some weights keeps the other weights' table of an earlier run with the same settings
    # (each table is one run of its own; the JSON says each one's date).
    path = out / "speculative.json"
    settings = {"target": target, "draft": draft, "new_tokens": args.new_tokens, "k": args.k}
    merged, dates = {}, {}
    if path.exists():
        old = json.loads(path.read_text())
        if all(old.get(key) == value for key, value in settings.items()):
            merged = {w: t for w, t in old.get("tables", {}).items() if w not in tables}
            old_dates = old.get("dates") or {w: old.get("date") for w in old.get("tables", {})}
            dates = {w: old_dates.get(w) for w in merged}
    merged.update(tables)
    dates.update({w: date for w in tables})
    path.write_text(json.dumps({**settings, "dates": dates, "tables": merged}, indent=1))
    plot(merged, out, copy_to_docs=not args.quick)


def plot(tables: dict, out: Path, copy_to_docs: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(tables))
    rows = sorted({r["row"] for results in tables.values() for r in results})
    for i, (weights, results) in enumerate(tables.items()):
        done = [r for r in results if "skipped" not in r]
        ax.bar([rows.index(r["row"]) + i * width for r in done], [r["tokens_per_s"] for r in done], width, label=weights)
    ax.set_xticks([j + width * (len(tables) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r}: {ROWS[r][0]}\n" + textwrap.fill(ROWS[r][1], 16) for r in rows], fontsize=6)
    ax.set_ylabel("tokens/s")
    ax.set_title("Qwen2.5-Coder-1.5B, two ranks: what should the second one do?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speculative.png", dpi=120)
    plt.close(fig)
    if copy_to_docs:
        shutil.copy(out / "speculative.png", ROOT / "docs" / "speculative.png")


if __name__ == "__main__":
    main()
