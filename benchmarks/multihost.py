"""Across machines: when does tensor parallelism stop paying, and where does a pipeline win?

    python benchmarks/multihost.py [--latencies 0 50 200 1000] [--models llama-236m smollm2] [--new-tokens 64]
    python benchmarks/multihost.py --quick      # tiny model, two latencies, 8 tokens (a smoke test)

Two simulated hosts (``tp_engine.launch.simhosts``: network namespaces on a
bridge, each with its own host name and /dev/shm), one rank per host started
by hand (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), one torch thread each.
Link latency is **emulated**: this kernel has no netem, so every collective
and every pipeline send is held for the added one-way latency
(``LatencyCommunicator``; its hold is validated against a TCP ping-pong in
tests/test_multihost.py). The wire itself (a veth pair) adds ~15-30 µs.

Rows, for each model: TP=1 (one process on host 0), TP=2 across the hosts,
PP=2 across the hosts (one sequence), and PP=2 with 4 sequences in flight
(two micro-batches), each at every added latency. Figures:

- decode tok/s: ``--new-tokens`` greedy tokens after a 32-token prompt,
  (tokens - 1) / (last token time - first token time), all sequences;
- prefill tok/s: 512 prompt tokens / time to the first new token (one sequence);
- predicted decode tok/s from the per-token model of
  :mod:`tp_engine.launch.placement` (weights / measured bandwidth + 2 L
  all-reduce + hops + overhead), with the all-reduce, hop and bandwidth
  measured on the live group at that latency and the overhead calibrated on
  the TP=1 row (its measured time minus its weight-streaming time);
- the layout ``--placement auto`` would choose from those measurements.

Greedy tokens of every row are checked against the TP=1 row's. Prints Markdown
tables; writes benchmarks/out/multihost.json and docs/multihost.png.
Needs root (namespaces). Absolute speed drifts between days: compare within one run.
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
from tp_engine.launch.latency import LatencyCommunicator  # noqa: E402
from tp_engine.launch.measure import measure_links  # noqa: E402
from tp_engine.launch.placement import Links, ModelCost, choose  # noqa: E402

PROMPT_TOKENS = 32
SEQUENCES = 4  # in flight for the "4 sequences" rows
PORT = 29611


def _prompts(n: int, length: int, vocab: int, seed: int = 1234) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def _weight_cost(model: torch.nn.Module, comm) -> ModelCost:
    """Bytes a decode step streams over all ranks (every matrix but the input embedding) and the layer count."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    local = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb or tied)
    total = comm.all_reduce_(torch.tensor([float(local)], dtype=torch.float64)).item()
    return ModelCost(total, int(model.config.num_hidden_layers))


def _timed_decode(model, pp: int, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """(decode tok/s over all sequences, tokens) on rank 0 (other ranks: (0, tokens))."""
    times: list[float] = []
    if pp == 1:
        class Clock:
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        out = tp_engine.generate(model, torch.tensor(prompts), max_new_tokens=new, do_sample=False, eos_token_id=[],
                                 streamer=Clock() if len(prompts) == 1 else None)
        tokens = out[:, len(prompts[0]):].tolist()
        if len(prompts) > 1:
            return 0.0, tokens
        times = times[1:]  # the streamer's first put is the prompt
    else:
        stage = model.tp_engine_pipeline
        micro = 2 if len(prompts) > 1 else None
        tokens = stage.generate(prompts, new, micro_batches=micro, on_token=lambda i, t: times.append(time.perf_counter()))
    if len(times) < 2:
        return 0.0, tokens
    return (len(times) - 1) / (times[-1] - times[0]), tokens


def _timed_batch(model, pp: int, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """Several sequences: new tokens of all sequences / wall time of the call."""
    start = time.perf_counter()
    if pp == 1:
        out = tp_engine.generate(model, torch.tensor(prompts), max_new_tokens=new, do_sample=False, eos_token_id=[])
        tokens = out[:, len(prompts[0]):].tolist()
    else:
        tokens = model.tp_engine_pipeline.generate(prompts, new, micro_batches=2)
    return len(prompts) * new / (time.perf_counter() - start), tokens


def _prefill(model, pp: int, prompt: list[int]) -> float:
    start = time.perf_counter()
    if pp == 1:
        tp_engine.generate(model, torch.tensor([prompt]), max_new_tokens=1, do_sample=False, eos_token_id=[])
    else:
        model.tp_engine_pipeline.generate([prompt], 1)
    return len(prompt) / (time.perf_counter() - start)


def worker(path: str, pp: int, latencies_us: list[float], new: int, prefill_tokens: int, out_file: str) -> None:
    """One rank of one row (TP when pp == 1 and the world is 2, PP otherwise): every latency in turn."""
    quiet_transformers()
    torch.set_num_threads(1)
    rt = tp_engine.init()
    slow = LatencyCommunicator(rt.comm, 0.0)
    model = tp_engine.from_pretrained(path, dtype=torch.float32, comm=slow, pp=pp)
    cost = _weight_cost(model, slow)
    vocab = int(model.config.vocab_size)
    hidden = int(model.config.hidden_size)
    one = _prompts(1, PROMPT_TOKENS, vocab)
    many = _prompts(SEQUENCES, PROMPT_TOKENS, vocab)
    long = _prompts(1, prefill_tokens, vocab, seed=99)[0]
    results = []
    _timed_decode(model, pp, one, 4)  # warm-up
    for lat in latencies_us:
        slow.delay_s = lat * 1e-6
        links = measure_links(slow, hidden) if rt.world_size > 1 else None
        decode, tokens = _timed_decode(model, pp, one, new)
        batch, batch_tokens = _timed_batch(model, pp, many, new)
        prefill = _prefill(model, pp, long)
        results.append({"latency_us": lat, "decode": decode, "batch": batch, "prefill": prefill, "tokens": tokens,
                        "batch_tokens": batch_tokens, "links": None if links is None else links.__dict__})
    if rt.rank == 0:
        Path(out_file).write_text(json.dumps({"comm": rt.comm.name, "cost": cost.__dict__, "results": results}))
    tp_engine.shutdown()


def _run_row(hosts, path: str, world: int, pp: int, latencies: list[float], args, tag: str) -> dict:
    out = Path(args.tmp) / f"{tag}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR=hosts.hosts[0].address, MASTER_PORT=str(PORT),
               WORLD_SIZE=str(world), TP_ENGINE_BACKEND="auto", PYTHONPATH=str(ROOT))
    argv = [sys.executable, __file__, "--worker", path, str(pp), ",".join(map(str, latencies)), str(args.new_tokens),
            str(args.prefill_tokens), str(out)]
    procs = [hosts.popen(r, argv, env={**env, "RANK": str(r), "LOCAL_RANK": "0"}) for r in range(world)]
    for p in procs:
        if p.wait(timeout=3600) != 0:
            for q in procs:
                q.kill()
            raise SystemExit(f"row {tag}: a rank exited with {p.returncode}")
    return json.loads(out.read_text())


def _predicted(kind: str, cost: ModelCost, links: dict, overhead: float, in_flight: int) -> tuple[float, str]:
    """(predicted tok/s of ``kind`` over all sequences, the layout auto would choose) from a row's measured links."""
    measured = Links(**{**links, "bandwidth": tuple(links["bandwidth"]), "host_of": tuple(links["host_of"]),
                        "overhead_s": overhead})
    chosen, ranked = choose(cost, measured, in_flight=in_flight)
    return next(p for p in ranked if p.layout.kind == kind).tokens_per_s, chosen.layout.kind


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, path, pp, lats, new, prefill, out = sys.argv
        worker(path, int(pp), [float(x) for x in lats.split(",")], int(new), int(prefill), out)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latencies", nargs="*", type=float, default=[0, 50, 200, 1000], help="added one-way µs")
    ap.add_argument("--models", nargs="*", default=["llama-236m", "smollm2"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    from tp_engine.launch.simhosts import SimHosts, unavailable
    from tp_engine.loading import default_model_path

    why = unavailable()
    if why:
        raise SystemExit(f"simulated hosts unavailable: {why}")
    if args.quick:
        args.latencies, args.models, args.new_tokens, args.prefill_tokens = [0, 1000], ["llama-236m"], 8, 64
    paths = {"llama-236m": str(ensure_checkpoint("llama", quick=args.quick)), "smollm2": default_model_path()}
    import tempfile

    table = []
    with tempfile.TemporaryDirectory() as tmp, SimHosts(2) as hosts:
        args.tmp = tmp
        for name in args.models:
            path = paths[name]
            base = _run_row(hosts, path, 1, 1, [0], args, f"{name}-tp1")
            b = base["results"][0]
            cost = ModelCost(**base["cost"])
            tp = _run_row(hosts, path, 2, 1, args.latencies, args, f"{name}-tp2")
            pp = _run_row(hosts, path, 2, 2, args.latencies, args, f"{name}-pp2")
            for row in (tp, pp):
                for r in row["results"]:
                    if r["tokens"] != b["tokens"] or r["batch_tokens"] != b["batch_tokens"]:
                        raise SystemExit(f"{name}: tokens at {r['latency_us']} µs differ from TP=1's")
            # Overhead: what TP=1 spends beyond streaming its weights (its links give the bandwidth).
            bw = tp["results"][0]["links"]["bandwidth"][0]
            overhead = max(0.0, 1 / b["decode"] - cost.weight_bytes / bw)
            for t, p in zip(tp["results"], pp["results"]):
                pred_tp, auto1 = _predicted("tp", cost, t["links"], overhead, 1)
                pred_pp, _ = _predicted("pp", cost, p["links"], overhead, 1)
                pred_pp4, auto4 = _predicted("pp", cost, p["links"], overhead, SEQUENCES)
                table.append({
                    "model": name, "latency_us": t["latency_us"], "tp1_decode": b["decode"], "tp1_prefill": b["prefill"],
                    "tp1_batch": b["batch"], "tp2_decode": t["decode"], "tp2_prefill": t["prefill"],
                    "tp2_batch": t["batch"], "pp2_decode": p["decode"], "pp2_prefill": p["prefill"],
                    "pp2_batch": p["batch"], "pred_tp2": pred_tp, "pred_pp2": pred_pp, "pred_pp2_batch": pred_pp4,
                    "auto_one": auto1, "auto_batch": auto4, "comm_tp": tp["comm"], "comm_pp": pp["comm"],
                    "allreduce_us": t["links"]["allreduce_s"] * 1e6, "hop_us": p["links"]["hop_s"] * 1e6,
                })
    _report(table, args)
    return 0


def _report(table: list[dict], args) -> None:
    print(f"\nmulti-host decode and prefill, 2 simulated hosts x 1 rank, emulated added one-way latency, "
          f"{datetime.date.today()} (decode: {args.new_tokens} tokens after {PROMPT_TOKENS}; prefill {args.prefill_tokens})\n")
    print("| model | added µs | all-reduce µs | TP=1 decode | TP=2 decode (pred.) | PP=2 decode (pred.) | "
          "TP=2 / TP=1 decode | TP=2 / TP=1 prefill | TP=1 4 seq | TP=2 4 seq | PP=2 4 seq (pred.) | auto: 1 seq / 4 seq |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['model']} | {r['latency_us']:g} | {r['allreduce_us']:.0f} | {r['tp1_decode']:.1f} | "
              f"{r['tp2_decode']:.1f} ({r['pred_tp2']:.1f}) | {r['pp2_decode']:.1f} ({r['pred_pp2']:.1f}) | "
              f"{r['tp2_decode'] / r['tp1_decode']:.2f}x | {r['tp2_prefill'] / r['tp1_prefill']:.2f}x | "
              f"{r['tp1_batch']:.1f} | {r['tp2_batch']:.1f} | {r['pp2_batch']:.1f} ({r['pred_pp2_batch']:.1f}) | "
              f"{r['auto_one']} / {r['auto_batch']} |")
    out = (QUICK_OUT if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multihost.json").write_text(json.dumps({"date": str(datetime.date.today()), "rows": table}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot)")
        return
    models = sorted({r["model"] for r in table})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        rows = [r for r in table if r["model"] == name]
        x = [max(r["latency_us"], 1) for r in rows]
        ax.plot(x, [r["tp1_decode"] for r in rows], "k--", label="TP=1")
        ax.plot(x, [r["tp2_decode"] for r in rows], "o-", label="TP=2 measured")
        ax.plot(x, [r["pred_tp2"] for r in rows], "o:", label="TP=2 predicted")
        ax.plot(x, [r["pp2_decode"] for r in rows], "s-", label="PP=2 measured")
        ax.plot(x, [r["pp2_batch"] for r in rows], "^-", label=f"PP=2, {SEQUENCES} seq in flight")
        ax.set_xscale("log")
        ax.set_xlabel("added one-way latency, µs (emulated; 0 plotted at 1)")
        ax.set_ylabel("decode tok/s")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    target = out / "multihost.png"
    fig.savefig(target, dpi=110)
    if not args.quick:
        (ROOT / "docs").mkdir(exist_ok=True)
        fig.savefig(ROOT / "docs" / "multihost.png", dpi=110)
    print(f"plot: {target}")


if __name__ == "__main__":
    sys.exit(main())
