"""Batched decode throughput: tp-engine's step API (TP=1, TP=2) vs transformers' batched ``generate``, CPU.

    python benchmarks/batch.py [--batches 1,4,16,64] [--new-tokens 128] [--passes 2] [--only tp1 tp2 hf]
    python benchmarks/batch.py --quick     # smoke test: tiny Llama, batches 1,4,16, 8 tokens (~1 min)

Model: decode.py's random llama-236m (float32; created once under
benchmarks/out/llama-236m by decode.py's helper).

Workload: 64 fixed prompts of random tokens, lengths 16 to 48 (prompt i has
16 + (7 i mod 33) tokens); batch B takes the first B. Each sequence makes
``--new-tokens`` tokens (128 by default), greedy, no early stop (the model
has no EOS; the engine is given none). The full run (2 passes) takes about
12 minutes on a 2-core machine.

Aggregate decode tokens/s = tokens produced after the moment every sequence
of the batch has its first new token, divided by the time from that moment
to the last token (prefill excluded; with no early stop this is
B x (new tokens - 1) / decode time). Times are taken on rank 0.

Rows, one torch thread per process (a rank gets one core):
- tp-engine TP=1: the step API (``Engine(decoder_for(model), max_batch=B)``,
  every request added up front, ``step()`` until done), one process;
- tp-engine TP=2: the same on every rank under ``torchrun`` (shared-memory
  communicator over gloo, as decode.py's torchrun rows);
- transformers: ``model.generate`` on the left-padded batch (attention mask,
  greedy), one process.
The engine's ``prefill_chunk`` is set to the batch's total prompt tokens, so
every prompt is read in the first step (as transformers does) and the timed
window is decode at the full batch. Every launch is a fresh set of
processes that runs all batch sizes (largest last) after a small warm-up;
the setups are interleaved pass by pass (``--passes``, 2 by default) and
each cell is the median over passes.

Tokens: a sample of prompts (0, 3, 9, 15, 40, 63, where inside the batch)
is decoded alone by transformers (single sequence, no padding, greedy);
each row's tokens for those prompts, at every batch size, are compared with
them and mismatches are reported (the transformers batched row too:
left padding can change its numerics).

Prints a markdown table; writes benchmarks/out/batch.json and
benchmarks/out/batch.png (copied to docs/batch.png); ``--quick`` writes under
benchmarks/out/quick/ and leaves docs/ alone.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import decode as bench  # noqa: E402  (benchmarks/decode.py: checkpoint, launchers, communicator)
import torch  # noqa: E402

SAMPLE = (0, 3, 9, 15, 40, 63)
NUM_PROMPTS = 64


def prompts(vocab: int, n: int = NUM_PROMPTS) -> list[list[int]]:
    """The fixed prompts: prompt i has 16 + (7 i mod 33) tokens (16 to 48)."""
    g = torch.Generator().manual_seed(4321)
    return [torch.randint(3, vocab, (16 + (7 * i) % 33,), generator=g).tolist() for i in range(n)]


# ------------------------------------------------------------------ workers


def _hf_batch(model, batch: list[list[int]], n: int) -> tuple[list[list[int]], float, float, int]:
    """Left-padded greedy batch; (new tokens per sequence, decode tok/s, prefill s, tokens in the window)."""
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    clock = bench.Clock()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                             streamer=clock)
    t = clock.times  # prompt, then one put per step (every sequence's token)
    window = len(batch) * (len(t) - 2)
    rate = window / (t[-1] - t[1]) if len(t) > 2 else float("nan")
    return out[:, width:].tolist(), rate, t[1] - t[0], window


def _engine_batch(decoder, batch: list[list[int]], n: int) -> tuple[list[list[int]], float, float, int]:
    """The step API: every request up front, step until done; same outputs as :func:`_hf_batch`."""
    from tp_engine.runtime import Engine, SamplingParams

    start = time.perf_counter()
    engine = Engine(decoder, max_batch=len(batch), prefill_chunk=sum(len(p) for p in batch))
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p in batch]
    started: set = set()
    t_first = t_last = None
    window = 0
    while engine.has_unfinished:
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if t_first is not None:
                window += len(o.new_tokens)
            elif o.new_tokens:
                started.add(o.request_id)
        if t_first is None and len(started) == len(batch):
            t_first = now
        t_last = now
    rate = window / (t_last - t_first) if window else float("nan")
    return [engine.request(r).tokens for r in rids], rate, t_first - start, window


def worker(kind: str, args) -> None:
    torch.set_num_threads(1)
    model = bench.load_model(Path(args.ckpt))
    all_prompts = prompts(model.config.vocab_size)
    batches = [int(b) for b in args.batches.split(",")]
    sample = [i for i in SAMPLE if i < max(batches)]
    rank, comm = 0, None
    result: dict = {}
    if kind == "ref":
        ref = {}
        with torch.inference_mode():
            for i in sample:
                ids = torch.tensor([all_prompts[i]])
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=0)
                ref[str(i)] = out[0, ids.shape[1]:].tolist()
        result = {"ref": ref}
    else:
        if kind == "hf":
            run = lambda b, n=args.new_tokens: _hf_batch(model, b, n)  # noqa: E731
            name = "-"
        elif kind in ("tp1", "tp2"):
            import tp_engine
            from tp_engine.runtime import decoder_for

            if kind == "tp2":
                comm = bench.torch_comm()
                rank = comm.rank
                model = tp_engine.parallelize(model, comm=comm)
                name = comm.name
            else:
                name = "-"
            decoder = decoder_for(model)
            run = lambda b, n=args.new_tokens: _engine_batch(decoder, b, n)  # noqa: E731
        else:
            raise SystemExit(f"unknown worker {kind!r}")
        run(all_prompts[:2], min(8, args.new_tokens))  # warm-up (tp-engine: builds the decoder)
        result = {"comm": name, "batches": {}}
        for b in batches:
            tokens, rate, prefill, window = run(all_prompts[:b])
            result["batches"][str(b)] = {
                "rate": rate, "prefill_s": prefill, "window_tokens": window,
                "sample_tokens": {str(i): tokens[i] for i in sample if i < b},
                "lengths_ok": all(len(t) == args.new_tokens for t in tokens),
            }
            if rank == 0:
                print(f"  {kind} batch {b}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
        if comm is not None:
            comm.barrier()
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown; results are written


# ------------------------------------------------------------------ driver


SETUPS = [  # (key, label, launcher)
    ("tp1", "tp-engine TP=1", "python"),
    ("tp2", "tp-engine TP=2", "torchrun"),
    ("hf", "transformers", "python"),
]


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"tp1": ("#7fb3e0", "s"), "tp2": ("#2b7bba", "o"), "hf": ("#888888", "^")}
    for key, label, _ in SETUPS:
        pts = [(r["batch"], r[key]) for r in table if r.get(key)]
        if pts:
            color, marker = styles[key]
            ax.plot(*zip(*pts), marker=marker, color=color, label=label)
    for r in table:
        if r.get("tp2") and r.get("hf"):
            ax.annotate(f"{r['tp2'] / r['hf']:.2f}x", (r["batch"], r["tp2"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7, color="#2b7bba")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([r["batch"] for r in table], [str(r["batch"]) for r in table])
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("aggregate decode tokens/s (log)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    out = bench.QUICK_OUT if args.quick else bench.OUT
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = bench.ensure_checkpoint("llama", args.quick)
    batches = [int(b) for b in args.batches.split(",")]
    if max(batches) > NUM_PROMPTS:
        raise SystemExit(f"batches go up to {NUM_PROMPTS}")
    common = ["--ckpt", str(ckpt), "--batches", args.batches, "--new-tokens", str(args.new_tokens)]
    script = Path(__file__).resolve()

    def launch(kind: str, launcher: str) -> dict:
        result = out / f".batch-{kind}.json"
        cmd = bench.launch_command(script, launcher, ["--worker", kind, "--result", str(result), *common])
        return bench.run_launch(cmd, result, args.timeout)

    print("transformers single-sequence reference tokens ...", file=sys.stderr, flush=True)
    ref_data = launch("ref", "python")
    ref = ref_data.get("ref")
    if ref is None:
        print(f"  reference failed: {ref_data.get('error')}", file=sys.stderr)
    unknown = set(args.only or ()) - {s[0] for s in SETUPS}
    if unknown:
        raise SystemExit(f"unknown setups {sorted(unknown)}; setups: {[s[0] for s in SETUPS]}")
    setups = [s for s in SETUPS if not args.only or s[0] in args.only]
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in setups}
    errors: dict[str, str] = {}
    loads: dict[str, list] = {key: [] for key, _, _ in setups}
    for p in range(args.passes):
        for key, _, launcher in setups:
            if key in errors:
                continue
            print(f"pass {p + 1}/{args.passes}: {key} ...", file=sys.stderr, flush=True)
            try:
                data = launch(key, launcher)
            except FileNotFoundError as exc:
                data = {"error": str(exc)}
            if "error" in data:
                print(f"  {key} failed: {data['error']}", file=sys.stderr)
                errors[key] = data["error"]
                continue
            runs[key].append(data)
            loads[key].append(data["load"])

    table, mismatches = [], []
    for b in batches:
        row: dict = {"batch": b}
        for key, label, _ in setups:
            per = [r["batches"][str(b)] for r in runs[key]]
            if not per:
                continue
            row[key] = statistics.median(x["rate"] for x in per)
            row[f"{key}_rates"] = [x["rate"] for x in per]
            row[f"{key}_prefill_s"] = statistics.median(x["prefill_s"] for x in per)
            checked = bad = 0
            for x in per:
                if not x["lengths_ok"]:
                    mismatches.append(f"{label} batch {b}: a sequence stopped before {args.new_tokens} tokens")
                for i, toks in x["sample_tokens"].items():
                    if ref is None:
                        continue
                    checked += 1
                    if toks != ref[i]:
                        bad += 1
                        first = next((j for j, (u, v) in enumerate(zip(toks, ref[i])) if u != v), len(toks))
                        mismatches.append(f"{label} batch {b}, prompt {i}: differs from token {first} on")
            row[f"{key}_check"] = "unchecked" if ref is None else ("yes" if bad == 0 else f"**{bad}/{checked} differ**")
        table.append(row)

    date = datetime.date.today().isoformat()
    comms = ", ".join(f"{key}: {runs[key][0]['comm']}" for key in runs if runs[key] and runs[key][0]["comm"] != "-")
    print()
    print(f"Batched decode ({date}): {'tiny Llama (--quick)' if args.quick else 'llama-236m float32'}, prompts of "
          f"16-48 tokens, {args.new_tokens} new tokens each, greedy, no early stop; aggregate decode tok/s (prefill "
          f"excluded), 1 torch thread per process, median of {args.passes} pass(es) ({os.cpu_count()} cores; {comms}).")
    print()

    def cell(r: dict, key: str) -> str:
        return f"{r[key]:.1f}" if r.get(key) else ("failed" if key in errors else "-")

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / r['hf']:.2f}x" if r.get(key) and r.get("hf") else "-"

    def check(r: dict) -> str:
        return ", ".join(f"{k}: {r[k + '_check']}" for k, _, _ in setups if f"{k}_check" in r) or "-"

    print("| batch | TP=1 tok/s | TP=2 tok/s | transformers tok/s | TP=2 / transformers | TP=1 / transformers "
          "| sample tokens = transformers single-sequence |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in table:
        print(f"| {r['batch']} | {cell(r, 'tp1')} | {cell(r, 'tp2')} | {cell(r, 'hf')} | {ratio(r, 'tp2')} "
              f"| {ratio(r, 'tp1')} | {check(r)} |")
    print()
    print("Prefill (s, excluded above): " + "; ".join(
        f"batch {r['batch']}: " + ", ".join(f"{k} {r[k + '_prefill_s']:.2f}" for k, _, _ in setups
                                            if f"{k}_prefill_s" in r) for r in table))
    print("1-min load average around each launch: " + ", ".join(
        f"{k} " + "/".join(f"{a:.1f}->{b:.1f}" for a, b in v) for k, v in loads.items()))
    for key, err in errors.items():
        print(f"{key} failed: {err[-500:]}")
    if mismatches:
        print(f"Token mismatches vs transformers single-sequence greedy ({len(mismatches)}):")
        for m in mismatches:
            print(f"- {m}")
    else:
        print("All sampled sequences equal transformers' single-sequence greedy tokens." if ref else
              "Tokens unchecked (the reference failed).")
    (out / "batch.json").write_text(json.dumps({
        "date": date, "quick": args.quick, "new_tokens": args.new_tokens, "passes": args.passes,
        "batches": batches, "sample": [i for i in SAMPLE if i < max(batches)], "table": table,
        "mismatches": mismatches, "errors": errors, "comms": comms,
    }, indent=1))
    if any(len(r) > 1 for r in table):
        png = out / "batch.png"
        title = (f"{'tiny Llama (--quick)' if args.quick else 'llama-236m fp32'}, prompts 16-48 tokens + "
                 f"{args.new_tokens} new, greedy, 1 thread/process, {os.cpu_count()}-core CPU, {date}\n"
                 "(labels: TP=2 / transformers)")
        plot(table, png, title)
        if args.quick:
            print(f"Plot: {png} (--quick: docs/ untouched). Total {time.perf_counter() - t0:.0f} s.")
        else:
            (bench.ROOT / "docs").mkdir(exist_ok=True)
            shutil.copyfile(png, bench.ROOT / "docs" / "batch.png")
            print(f"Plot: {png} (copied to docs/batch.png). Total {time.perf_counter() - t0:.0f} s.")
    failed = bool(errors) or ref is None
    tp_bad = any(not m.startswith("transformers") for m in mismatches)
    return 1 if failed or tp_bad else 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16,64", help="comma-separated batch sizes (at most 64)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--passes", type=int, default=2, help="launches per setup (setups interleaved; medians)")
    p.add_argument("--only", nargs="*", help=f"setups to run: {[s[0] for s in SETUPS]}")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per launch")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny Llama, batches 1,4,16, 8 new tokens")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args.worker:
        args.batches, args.new_tokens, args.passes = "1,4,16", 8, 1
    return args


if __name__ == "__main__":
    args = parse()
    if args.worker:
        worker(args.worker, args)
    else:
        sys.exit(main(args))
