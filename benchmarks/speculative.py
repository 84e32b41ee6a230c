"""Speculative decoding on the bundled SmolLM2-135M-Instruct at TP=2, CPU.

    python benchmarks/speculative.py [--new-tokens 128] [--ks 2,3,4,6] [--quick]

Target: the float32 model (the GGUF dequantized by transformers; converted
once to safetensors under benchmarks/out/smollm2-f32, git-ignored), sharded
over 2 local ranks (one thread each, shared-memory all-reduce), on the lean
runtime (``tp_engine.generate(..., fast_path=True)`` for the plain rows).
Drafts: int8 and int4 (group 32) copies of the target's own shards (placement
"sharded"), for several k = num_draft_tokens; plus, for comparison, an
unsharded int8 copy (a ``tp_engine.runtime.Decoder(..., weight_bits=8)`` of
the unsharded model) replicated on both ranks and one on rank 1 only.

Workload: 8 fixed chat prompts, greedy, ``--new-tokens`` each (EOS ignored so
every row makes the same number of tokens). tokens/s = all new tokens /
wall time of the 8 generations (prefill included, same for every row),
measured on rank 0 after a warm-up generation per row. Every row's tokens are
compared with the plain (non-speculative) TP=2 greedy tokens.

Prints a markdown table; writes benchmarks/out/speculative.json and
benchmarks/out/speculative.png (copied to docs/speculative.png); ``--quick``
(32 new tokens, k=3) writes them under benchmarks/out/quick/ and leaves
docs/ alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
CKPT = OUT / "smollm2-f32"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TP_ENGINE_NO_PROGRESS", "1")

import torch  # noqa: E402

PROMPTS = [
    "What is tensor parallelism? Answer in two sentences.",
    "Write a short poem about the sea.",
    "Explain why the sky is blue to a ten year old.",
    "List three uses of a paperclip.",
    "What is the capital of France, and what is it famous for?",
    "Give me a recipe for a simple tomato soup.",
    "Summarize the plot of Romeo and Juliet.",
    "How do I reverse a list in Python?",
]


def ensure_checkpoint() -> Path:
    """The bundled GGUF, dequantized once to a float32 safetensors folder (fast to load)."""
    if (CKPT / "config.json").exists() and any(CKPT.glob("*.safetensors")):
        return CKPT
    from transformers import AutoConfig, AutoModelForCausalLM

    from tp_engine.loading import default_model_path, load_tokenizer

    path = default_model_path()
    folder, name = os.path.split(path)
    print(f"converting {path} to {CKPT} ...", file=sys.stderr, flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = CKPT.with_name(CKPT.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(path).save_pretrained(tmp)
    os.replace(tmp, CKPT)
    return CKPT


def rows(ks: list[int]) -> list[tuple[str, str | None, int, str]]:
    """(name, draft kind, k, placement)."""
    out = [("TP=2, no draft", None, 0, "-")]
    out += [(f"int8 draft, k={k}", "int8", k, "sharded") for k in ks]
    out += [(f"int4 draft, k={k}", "int4", k, "sharded") for k in ks]
    best = 3 if 3 in ks else ks[0]
    out += [(f"int8 draft replicated, k={best}", "int8-full", best, "replicated")]
    out += [(f"int8 draft on rank 1, k={best}", "int8-full", best, "one-rank")]
    return out


def worker(new_tokens: int, ks: list[int]) -> dict:
    import tp_engine
    from tp_engine.comm.base import SingleProcessCommunicator
    from tp_engine.loading import load_tokenizer
    from tp_engine.runtime import Decoder
    from tp_engine.speculative import speculative_generate

    torch.set_num_threads(1)
    rt = tp_engine.init()
    rank = rt.rank
    model = tp_engine.from_pretrained(str(CKPT))
    tok = load_tokenizer(str(CKPT))
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
        for p in PROMPTS
    ]
    prompts = [p["input_ids"] if not isinstance(p, torch.Tensor) else p for p in prompts]
    full_int8 = None
    results = []
    for name, kind, k, placement in rows(ks):
        if kind == "int8-full" and full_int8 is None:
            from transformers import AutoModelForCausalLM

            full = AutoModelForCausalLM.from_pretrained(str(CKPT), dtype=torch.float32).eval()
            full_int8 = Decoder(full, comm=SingleProcessCommunicator(), weight_bits=8)

        def run(ids):
            if kind is None:
                return tp_engine.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], fast_path=True), None
            draft, draft_rank = kind, None
            if kind == "int8-full":
                draft = full_int8 if (placement == "replicated" or rank == 1) else None
                draft_rank = 1 if placement == "one-rank" else None
            return speculative_generate(
                model, ids, new_tokens, draft, num_draft_tokens=k, draft_rank=draft_rank,
                eos_token_id=[], group_size=32,
            )

        run(prompts[0][:, :8])  # warm-up: builds the draft, allocates caches
        rt.comm.barrier()
        t0 = time.perf_counter()
        texts, drafted, accepted, rounds = [], 0, 0, 0
        for ids in prompts:
            out, stats = run(ids)
            texts.append(out[0, ids.shape[1]:].tolist())
            if stats is not None:
                drafted, accepted, rounds = drafted + stats.drafted, accepted + stats.accepted, rounds + stats.rounds
        elapsed = time.perf_counter() - t0
        n = sum(len(t) for t in texts)
        results.append({
            "name": name, "draft": kind, "k": k, "placement": placement, "tokens_per_s": n / elapsed,
            "acceptance": accepted / drafted if drafted else None,
            "tokens_per_round": (n - len(prompts)) / rounds if rounds else None,
            "tokens": texts, "comm": rt.comm.name,
        })
        if rank == 0:
            r = results[-1]
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
            print(f"  {name}: {r['tokens_per_s']:.1f} tok/s, acceptance {acc}", file=sys.stderr, flush=True)
    return {"rank": rank, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ks", default="2,3,4,6")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 new tokens, k=3; writes under benchmarks/out/quick, not docs/")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if args.quick:
        args.new_tokens, ks = 32, [3]
    ensure_checkpoint()
    import tp_engine

    out = OUT / "quick" if args.quick else OUT
    out.mkdir(parents=True, exist_ok=True)
    per_rank = tp_engine.launch(worker, 2, args.new_tokens, ks, threads_per_rank=1)
    results = per_rank[0]["results"]
    baseline = results[0]
    print(f"\nSmolLM2-135M-Instruct float32, TP=2 ({baseline['comm']}), 8 prompts x {args.new_tokens} new tokens, greedy\n")
    print("| setup | placement | tok/s | vs TP=2 | acceptance | tokens/round | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        same = all(a == b for a, b in zip(r["tokens"], baseline["tokens"]))
        r["same_tokens"] = same
        r["speedup"] = r["tokens_per_s"] / baseline["tokens_per_s"]
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        tpr = "-" if r["tokens_per_round"] is None else f"{r['tokens_per_round']:.2f}"
        print(f"| {r['name']} | {r['placement']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {acc} | {tpr} | {'yes' if same else 'NO'} |")
    for r in results:
        r.pop("tokens")
    (out / "speculative.json").write_text(json.dumps({"new_tokens": args.new_tokens, "results": results}, indent=1))
    plot(results, args.new_tokens, out, copy_to_docs=not args.quick)


def plot(results: list[dict], new_tokens: int, out: Path, copy_to_docs: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    base = results[0]["tokens_per_s"]
    for kind, marker in (("int8", "o"), ("int4", "s")):
        pts = [(r["k"], r["tokens_per_s"]) for r in results if r["draft"] == kind and r["placement"] == "sharded"]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=f"{kind} self-copy draft (sharded)")
    ax.axhline(base, color="gray", linestyle="--", label="TP=2, no draft")
    ax.axhline(1.5 * base, color="gray", linestyle=":", label="1.5x target")
    ax.set_xlabel("k (draft tokens per round)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"SmolLM2-135M TP=2 speculative decoding ({new_tokens} tokens x 8 prompts)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speculative.png", dpi=120)
    plt.close(fig)
    if copy_to_docs:
        shutil.copy(out / "speculative.png", ROOT / "docs" / "speculative.png")


if __name__ == "__main__":
    main()
