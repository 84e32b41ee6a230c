"""Time tp_engine.kernels.gguf_gemm on Qwen2.5-1.5B-shaped GGUF weights against float32 torch.

For each format (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K), weight shape
(N x K = 1536 x 1536: q/o projections; 8960 x 1536: gate / up) and M rows of
x: µs per :func:`gguf_matmul` call, the weight bytes it streams and the rate
(GB/s = weight bytes / time), next to torch float32 ``F.linear`` on the same
shape (4 bytes a weight) and a plain read of the same bytes (``torch.sum``
over a uint8 view would not vectorise well, so: float32 ``sum`` of the same
number of bytes).

Weights stream from memory as in decode: every call uses the next of enough
distinct copies to fill ``--ring-mib`` (default 1024 MiB: this VM reports a
480 MiB L3; use less with --quick, which then measures cache, not DRAM).
One thread. Each number is the median of the calls of the best of
``--rounds`` rounds that interleave the methods (the machine is shared).

``--cpu-time`` times with the thread's CPU clock instead of the wall clock:
on a machine busy with other work it leaves out the time the thread waited
for a core (not the slowdown from shared caches and memory); say which
clock with any number.

Each quantized row is timed with float32 activations and with int8 ones
(``activations="int8"``: x rounded per block, integer dot products), in
two cells "f32 / int8". The Qwen2.5 output head (151936 x 1536) is timed in
Q6_K, the format the 1.5B Q4_K_M file keeps it in. ``--rows`` also times
M = 1 int8 with 1, 2 and 4 rows of W in flight (INT8_ROWS: separate
memory streams).

``--kernels avx2,avx512`` instead times the named CPU kernels side by side
(interleaved in every round, same process) on the shapes of the
Qwen2.5-1.5B Q4_K_M file's matmuls at M = 1, float32 and int8 activations:
(1536 x 1536) Q4_K, (8960 x 1536) Q4_K, (1536 x 8960) Q6_K; ``--gguf PATH``
takes those weights from the file (every tensor of that format and shape,
copied to fill the ring), else random blocks. ``--threads`` sets the pool.

``--prefill-int8`` times int8 activations at M = 64, 128, 512 on the real
shapes: the direct int8 kernels of each x86 build (16 rows of x per pass
over W) against dequantize + torch matmul (INT8_PREFILL_KERNELS in
gguf_gemm.py); ``--threads`` sets both pools.

``--prefill`` also times M = 16..512 with the direct kernels against
dequantize-then-torch-matmul (the switch DEQUANT_MIN_ROWS in gguf_gemm.py).

    python benchmarks/gguf_gemm.py [--quick] [--rounds 3] [--ring-mib 1024] [--cpu-time] [--prefill] [--rows]
    python benchmarks/gguf_gemm.py --kernels avx2,avx512 [--gguf FILE] [--threads 1] [--cpu-time]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tp_engine.kernels import gguf_gemm as G  # noqa: E402

FORMATS = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
SHAPES = [(1536, 1536), (8960, 1536), (151936, 1536)]
HEAD_FORMATS = {"Q6_K"}  # the output head: only the format the file uses (191 MB a copy)
MS = [1, 2, 4, 16]
ACTS = ("float32", "int8")


def random_blocks(qtype: int, n: int, k: int, gen: np.random.Generator) -> torch.Tensor:
    """Valid blocks: random bytes with small, finite float16 scales where the format keeps them."""
    qk, qb = G.block_shape(qtype)
    raw = gen.integers(0, 256, (n, k // qk, qb), dtype=np.uint8)

    def f16(at: int) -> None:
        raw[..., at:at + 2] = gen.uniform(1e-3, 1e-2, raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(
            raw.shape[:2] + (2,))

    for at in {2: [0], 3: [0, 2], 6: [0], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}[qtype]:
        f16(at)
    return torch.from_numpy(raw.reshape(n, -1))


def ring(make, nbytes: int, ring_bytes: int) -> list:
    return [make() for _ in range(max(2, -(-ring_bytes // max(nbytes, 1))))]


CLOCK = time.perf_counter  # --cpu-time: time.thread_time


def median_us(fn, items: list, reps: int) -> float:
    times = []
    for i in range(reps):
        it = items[i % len(items)]
        t0 = CLOCK()
        fn(it)
        times.append(CLOCK() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small ring (cache-resident), few reps: a smoke test")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ring-mib", type=int, default=None)
    ap.add_argument("--prefill", action="store_true", help="also time M up to 512 (direct vs dequant + matmul)")
    ap.add_argument("--formats", default=",".join(FORMATS.values()))
    ap.add_argument("--cpu-time", action="store_true", help="thread CPU time instead of wall time (busy machines)")
    ap.add_argument("--rows", action="store_true", help="also time int8 M = 1 with 1, 2, 4 rows of W in flight")
    ap.add_argument("--kernels", default=None, help="compare these CPU kernels (e.g. avx2,avx512) on the real shapes")
    ap.add_argument("--gguf", default=None, help="with --kernels: take the weights from this GGUF file")
    ap.add_argument("--threads", type=int, default=1, help="with --kernels / --prefill-int8: the threads")
    ap.add_argument("--prefill-int8", action="store_true", help="int8 direct kernels vs dequant + GEMM, M = 64..512")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.thread_time
    torch.set_num_threads(1)
    if args.kernels:
        compare_kernels(args)
        return
    if args.prefill_int8:
        prefill_int8(args)
        return
    ring_bytes = (args.ring_mib or (32 if args.quick else 1024)) << 20
    reps = 10 if args.quick else 40
    rounds = 1 if args.quick else args.rounds
    gen = np.random.default_rng(0)
    wanted = {v for v in args.formats.split(",")}
    print(f"gguf_gemm kernel: {G.kernel_name()}; ring {ring_bytes >> 20} MiB; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"one thread; {'thread CPU time' if args.cpu_time else 'wall time'}"
          f"{' (QUICK: cache-resident, not DRAM numbers)' if args.quick else ''}\n")
    rows = []
    for n, k in SHAPES:
        head = n > 100_000
        xs = {m: torch.randn(m, k) for m in MS}
        if not head:  # float32 torch on the head would need GBs of copies; the quantized rows are the point
            f32s = ring(lambda n=n, k=k: torch.randn(n, k), 4 * n * k, ring_bytes)
            base = [min(median_us(lambda w, m=m: F.linear(xs[m], w), f32s, reps) for _ in range(rounds)) for m in MS]
            read = min(median_us(lambda w: w.sum(), f32s, reps) for _ in range(rounds))
            rows.append((f"{n}x{k}", "f32 torch", 4 * n * k, [(t,) for t in base], read))
            del f32s
        for qt, name in FORMATS.items():
            if name not in wanted or (head and name not in HEAD_FORMATS):
                continue
            one = random_blocks(qt, n, k, gen)
            ws = ring(one.clone, one.numel(), ring_bytes)
            res = []
            for m in MS:
                y = torch.empty(m, n)
                cell = []
                for act in ACTS:
                    cell.append(min(median_us(lambda w, m=m, y=y, act=act: G.gguf_matmul(xs[m], w, qt, k, out=y,
                                                                                          activations=act),
                                              ws, reps) for _ in range(rounds)))
                res.append(tuple(cell))
            if args.rows:
                saved = G.INT8_ROWS
                try:
                    for rr in (1, 2, 4):
                        G.INT8_ROWS = rr
                        t = min(median_us(lambda w: G.gguf_matmul(xs[1], w, qt, k, activations="int8"), ws, reps)
                                for _ in range(rounds))
                        print(f"rows in flight {rr}: {n}x{k} {name} M=1 int8 {t:.0f} µs ({one.numel() / t / 1e3:.1f} GB/s)")
                finally:
                    G.INT8_ROWS = saved
            rows.append((f"{n}x{k}", name, one.numel(), res, None))
            del ws
    hdr = " | ".join(f"M={m} µs f32 / int8 (GB/s)" for m in MS)
    print(f"\n| shape | format | weight MB | {hdr} | plain read µs (GB/s) |")
    print("|---|---|---|" + "---|" * len(MS) + "---|")
    for shape, name, nbytes, res, read in rows:
        cells = " | ".join(" / ".join(f"{t:.0f}" for t in c) + " (" + " / ".join(f"{nbytes / t / 1e3:.1f}" for t in c) + ")"
                           for c in res)
        rd = f"{read:.0f} ({nbytes / read / 1e3:.1f})" if read else ""
        print(f"| {shape} | {name} | {nbytes / 1e6:.2f} | {cells} | {rd} |")
    print("\n(GB/s: weight bytes streamed per call / time; float32 torch reads 4 bytes a weight, Q4_K 0.5625. "
          f"Default activations here: {G.activations_mode()}.)")
    if args.prefill:
        prefill(gen, rounds, 3 if args.quick else 7)


REAL_SHAPES = [(12, 1536, 1536), (12, 8960, 1536), (14, 1536, 8960)]  # (qtype, N, K) of the Q4_K_M file


def _file_weights(path: str, qt: int, n: int, k: int) -> list[torch.Tensor]:
    """Every tensor of ``path`` of type ``qt`` and shape (n, k), as (n, bytes per row) uint8 tensors."""
    import gguf

    out = []
    for t in gguf.GGUFReader(path).tensors:
        if int(t.tensor_type) == qt and [int(v) for v in t.shape] == [k, n]:
            out.append(torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(n, -1)))
    return out


def compare_kernels(args) -> None:
    """M = 1 µs per call of each kernel x activations on the real shapes (interleaved; best round's median)."""
    from tp_engine.kernels import threads

    kernels = args.kernels.split(",")
    threads.set_threads(args.threads)
    ring_bytes = (args.ring_mib or (32 if args.quick else 1024)) << 20
    reps = 10 if args.quick else 40
    rounds = 1 if args.quick else args.rounds
    gen = np.random.default_rng(0)
    print(f"kernels {kernels}; {'weights of ' + args.gguf if args.gguf else 'random blocks'}; ring {ring_bytes >> 20} MiB; "
          f"{args.threads} thread(s); {'thread CPU time' if args.cpu_time else 'wall time'}; M = 1; "
          f"median of {reps} calls, best of {rounds} rounds; {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| format | N x K | tensors | " + " | ".join(f"{kn} {a} µs" for kn in kernels for a in ACTS) + " |")
    print("|---|---|---|" + "---|" * (len(kernels) * len(ACTS)))
    for qt, n, k in REAL_SHAPES:
        src = _file_weights(args.gguf, qt, n, k) if args.gguf else [random_blocks(qt, n, k, gen)]
        if not src:
            print(f"| {FORMATS[qt]} | {n}x{k} | 0 | (none in the file) |")
            continue
        nbytes = src[0].numel()
        ws = [src[i % len(src)].clone() for i in range(max(len(src), 2, -(-ring_bytes // nbytes)))]
        x = torch.randn(1, k)
        y = torch.empty(1, n)
        best = {(kn, a): float("inf") for kn in kernels for a in ACTS}
        for _ in range(rounds):
            for kn in kernels:
                for a in ACTS:
                    t = median_us(lambda w, kn=kn, a=a: G.gguf_matmul(x, w, qt, k, out=y, kernel=kn, activations=a),
                                  ws, reps)
                    best[kn, a] = min(best[kn, a], t)
        print(f"| {FORMATS[qt]} | {n}x{k} | {len(src)} | " + " | ".join(f"{best[kn, a]:.0f}" for kn in kernels for a in ACTS)
              + " |")
        del ws


def prefill_int8(args) -> None:
    """Wall ms per call at M = 64, 128, 512: dequantize + torch matmul vs the int8 kernels of each x86 build."""
    from tp_engine.kernels import threads

    threads.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    gen = np.random.default_rng(0)
    rounds = 1 if args.quick else args.rounds
    kinds = [kn for kn in ("avx512", "avx2") if G._lib(kn) is not None]
    print(f"int8 prefill; {args.threads} thread(s); wall ms, median of 5 (3 at M = 512), best of {rounds} rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| format | N x K | M | dequant + GEMM ms | " + " | ".join(f"int8 {kn} ms" for kn in kinds) + " |")
    print("|---|---|---|---|" + "---|" * len(kinds))
    for qt, n, k in REAL_SHAPES:
        w = random_blocks(qt, n, k, gen)
        for m in (64, 128, 512):
            x = torch.randn(m, k)
            y = torch.empty(m, n)
            best: dict[str, float] = {}
            for _ in range(rounds):
                for name in ["dequant", *kinds]:
                    ts = []
                    for _ in range(5 if m < 512 else 3):
                        t0 = time.perf_counter()
                        if name == "dequant":  # the float prefill path (what int8 mode ran before)
                            G.gguf_matmul(x, w, qt, k, out=y, activations="float32")
                        else:
                            G._lib(name).tp_gguf_gemm_i8(qt, x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr(),
                                                         G.INT8_ROWS)
                        ts.append(time.perf_counter() - t0)
                    best[name] = min(best.get(name, float("inf")), statistics.median(ts) * 1e3)
            print(f"| {FORMATS[qt]} | {n}x{k} | {m} | " + " | ".join(f"{best[nm]:.1f}" for nm in ["dequant", *kinds]) + " |")


def prefill(gen: np.random.Generator, rounds: int, reps: int) -> None:
    """Direct kernels vs dequantize + torch matmul for larger M (where DEQUANT_MIN_ROWS should sit)."""
    n, k = 1536, 1536
    print(f"\nPrefill, {n}x{k}: µs per call, direct kernels vs dequantize + torch matmul "
          f"(the switch is at M = {G.DEQUANT_MIN_ROWS})\n")
    print("| format | M | direct µs | dequant+matmul µs |")
    print("|---|---|---|---|")
    saved = G.DEQUANT_MIN_ROWS
    try:
        for qt in (12, 14, 3, 8):
            w = [random_blocks(qt, n, k, gen)]
            for m in (16, 32, 48, 64, 128, 512):
                x = torch.randn(m, k)
                G.DEQUANT_MIN_ROWS = 1 << 30
                direct = min(median_us(lambda b: G.gguf_matmul(x, b, qt, k), w, reps) for _ in range(rounds))
                G.DEQUANT_MIN_ROWS = 1
                deq = min(median_us(lambda b: G.gguf_matmul(x, b, qt, k), w, reps) for _ in range(rounds))
                print(f"| {FORMATS[qt]} | {m} | {direct:.0f} | {deq:.0f} |")
    finally:
        G.DEQUANT_MIN_ROWS = saved


if __name__ == "__main__":
    main()
