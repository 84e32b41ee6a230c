"""Time tp_engine.kernels.cpu_gemm against torch on SmolLM2-135M-shaped weights.

For each weight (N x K: the fused qkv, o, gate_up, down and LM head
projections, and their halves at TP = 2) and M = 1, 2, 4, 5, 8 rows of x:

* torch ``F.linear`` float32 (MKL) vs :func:`cpu_gemm.linear_f32`;
* torch ``_weight_int8pack_mm`` (bfloat16 x, as tp_engine.quantize's int8pack
  backend calls it) vs :func:`cpu_gemm.linear_int8` (float32 x);
* torch ``_weight_int4pack_mm_for_cpu`` (bfloat16 x) vs
  :func:`cpu_gemm.linear_int4` (float32 x), group size 32 (the engine's
  default).

Weights are streamed from memory as in decode: every call uses the next of
enough distinct copies of the weight to fill 80 MiB (2.5x the 32 MiB L3), so
no call finds its weight in cache. One thread (torch.set_num_threads(1)),
µs per call through the public Python API (validation, output allocation
and the ctypes call included: ~4 µs); the torch packed ops are timed alone,
on x already in bfloat16. Each number is the median of many calls, the best
of several rounds that interleave the methods (the machine is shared; the
rounds keep a burst of someone else's load from landing on one method).

The bandwidth reference: a plain read (sum) of the same bytes, from the same
kind of rotating copies, with one sequential stream and with four side by
side (one core reads DRAM fastest with a few streams in flight, which is
also how the kernels read W), and torch's copy_ (memcpy: read + write).

Prints markdown tables; writes benchmarks/out/cpu_gemm.json.

    python benchmarks/cpu_gemm.py [--quick] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tp_engine.kernels import cpu_gemm
from tp_engine.kernels import reference as ref

SHAPES = [  # (label, N, K)
    ("qkv 960x576", 960, 576),
    ("o 576x576", 576, 576),
    ("gate_up 3072x576", 3072, 576),
    ("down 576x1536", 576, 1536),
    ("lm_head 49152x576", 49152, 576),
    ("TP2 qkv 480x576", 480, 576),
    ("TP2 o 576x288", 576, 288),
    ("TP2 gate_up 1536x576", 1536, 576),
    ("TP2 down 576x768", 576, 768),
    ("TP2 lm_head 24576x576", 24576, 576),
]
ROWS = (1, 2, 4, 5, 8)
GROUP = 32
STREAM_BYTES = 80 << 20
TARGET_S = 0.12  # time per measurement


def copies(nbytes: int) -> int:
    return max(2, math.ceil(STREAM_BYTES / max(nbytes, 1)))


def median_us(fn, ring: list, reps: int) -> float:
    """Median µs of fn(ring[i % len(ring)]) over reps calls (after one pass of warm-up calls)."""
    for i in range(min(len(ring), 4)):
        fn(ring[i])
    times = []
    n = len(ring)
    for i in range(reps):
        arg = ring[i % n]
        t0 = time.perf_counter_ns()
        fn(arg)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, M = 1 and 5, 2 rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per (shape, M); best median kept")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "cpu_gemm.json"))
    args = parser.parse_args()
    if not cpu_gemm.available():
        print("cpu_gemm kernels unavailable here (no C compiler, not x86-64 with AVX2/FMA); nothing to time.")
        return 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lib = cpu_gemm._load()
    shapes = [SHAPES[2], SHAPES[6]] if args.quick else SHAPES
    rows = (1, 5) if args.quick else ROWS
    rounds = 2 if args.quick else args.rounds

    results, bandwidth = [], []
    print(f"{cpu_name()}, torch {torch.__version__}, 1 thread, weights streamed from "
          f"{STREAM_BYTES >> 20} MiB of rotating copies; µs per call (speed-up over torch)\n")
    table = ["| matrix | M | F.linear f32 | linear_f32 | int8pack (bf16 x) | linear_int8 | int4pack (bf16 x) "
             "| linear_int4 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, n, k in shapes:
        w = torch.randn(n, k) * 0.05
        q, scale = ref.quantize_int8(w)
        packed, s4, o4 = ref.quantize_int4(w, GROUP)
        p8 = cpu_gemm.Int8Weight.from_canonical(q, scale)
        p4 = cpu_gemm.Int4Weight.from_canonical(packed, s4, o4, GROUP)
        # torch's packed ops, on the same codes (int4pack: (u - 8) * scale + zero, bf16 scale/zero)
        q_t, scale_t = q.contiguous(), scale.to(torch.bfloat16)
        u32 = ref.unpack_int4(packed).to(torch.int32).contiguous()
        int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u32, 1)
        zero = (o4 + 8 * s4)
        scale_zeros = torch.stack([s4, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        f32_bytes, i8_bytes, i4_bytes = 4 * n * k, p8.nbytes, p4.nbytes
        print(f"{label}: preparing copies ({copies(f32_bytes)} x {f32_bytes / 2**20:.1f} MiB float32, "
              f"{copies(i8_bytes)} x int8, {copies(i4_bytes)} x int4)", file=sys.stderr, flush=True)
        rings = {
            "f32": [w] + [w.clone() for _ in range(copies(f32_bytes) - 1)],
            "i8": [p8] + [p8.clone() for _ in range(copies(i8_bytes) - 1)],
            "i4": [p4] + [p4.clone() for _ in range(copies(i4_bytes) - 1)],
            "t8": [(q_t, scale_t)] + [(q_t.clone(), scale_t.clone()) for _ in range(copies(q_t.numel()) - 1)],
            "t4": [(int4pack, scale_zeros)] + [(int4pack.clone(), scale_zeros.clone())
                                                for _ in range(copies(int4pack.numel() * int4pack.element_size()) - 1)],
        }

        # bandwidth reference: plain reads of the same bytes, and memcpy of the float32 weight
        def read_ring(nbytes: int) -> list:
            size = (nbytes + 255) // 256 * 256
            bufs = []
            for _ in range(copies(size)):
                b = torch.ones(size // 4 + 16)
                off = (-(b.data_ptr() // 4)) % 16  # 64-byte aligned start
                bufs.append(b[off : off + size // 4])
            return bufs

        bw = {"matrix": label, "N": n, "K": k, "bytes": {"f32": f32_bytes, "int8": i8_bytes, "int4": i4_bytes}}
        for fmt, nbytes in (("f32", f32_bytes), ("int8", i8_bytes), ("int4", i4_bytes)):
            ring = read_ring(nbytes)
            size = ring[0].numel() * 4
            reps = max(20, min(400, int(TARGET_S / max(nbytes / 20e9, 2e-6))))
            for streams in (1, 4):
                bw[f"read_{fmt}_{streams}_us"] = min(
                    median_us(lambda b, s=streams: lib.tp_gemm_read_sum(b.data_ptr(), size, s), ring, reps)
                    for _ in range(rounds))
            del ring
        dst = torch.empty_like(w)
        bw["memcpy_f32_us"] = min(median_us(lambda src: dst.copy_(src), rings["f32"], 30) for _ in range(rounds))
        bandwidth.append(bw)

        for m in rows:
            x = torch.randn(m, k)
            xb = x.to(torch.bfloat16)
            # sanity: ours against the references on the first copy
            exact = x.double() @ w.double().T
            mag = x.double().abs() @ w.double().abs().T
            errs = {
                "f32": ((cpu_gemm.linear_f32(x, w).double() - exact).abs() / mag).max().item(),
                "int8": ((cpu_gemm.linear_int8(x, p8).double() - ref.int8_matmul(x, q, scale).double()).abs()
                         / mag).max().item(),
                "int4": ((cpu_gemm.linear_int4(x, p4).double()
                          - ref.int4_matmul(x, packed, s4, o4, GROUP).double()).abs() / mag).max().item(),
            }
            if max(errs.values()) > 1e-5:
                print(f"WARNING {label} M={m}: relative errors {errs}", file=sys.stderr)
            methods = {
                "torch_f32": (lambda ww: F.linear(x, ww), rings["f32"], f32_bytes),
                "ours_f32": (lambda ww: cpu_gemm.linear_f32(x, ww), rings["f32"], f32_bytes),
                "torch_int8pack": (lambda t: torch.ops.aten._weight_int8pack_mm(xb, t[0], t[1]), rings["t8"],
                                   q_t.numel()),
                "ours_int8": (lambda p: cpu_gemm.linear_int8(x, p), rings["i8"], i8_bytes),
                "torch_int4pack": (lambda t: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t[0], GROUP, t[1]),
                                   rings["t4"], int4pack.numel()),
                "ours_int4": (lambda p: cpu_gemm.linear_int4(x, p), rings["i4"], i4_bytes),
            }
            best: dict[str, float] = {}
            for _ in range(rounds):
                for name, (fn, ring, nbytes) in methods.items():
                    est = median_us(fn, ring[:3], 3)
                    reps = max(10, min(300, int(TARGET_S / max(est * 1e-6, 1e-6))))
                    best[name] = min(best.get(name, math.inf), median_us(fn, ring, reps))
            row = {"matrix": label, "N": n, "K": k, "M": m, "group_size": GROUP, "us": best, "rel_err": errs}
            results.append(row)

            def cell(ours: str, theirs: str) -> str:
                return f"{best[ours]:.0f} ({best[theirs] / best[ours]:.1f}x)"

            table.append(f"| {label} | {m} | {best['torch_f32']:.0f} | {cell('ours_f32', 'torch_f32')} | "
                         f"{best['torch_int8pack']:.0f} | {cell('ours_int8', 'torch_int8pack')} | "
                         f"{best['torch_int4pack']:.0f} | {cell('ours_int4', 'torch_int4pack')} |")
            print(table[-1], file=sys.stderr, flush=True)
        del rings

    print("\n".join(table))
    print("\nBandwidth reference (µs to read the same bytes; GB/s in brackets) and the kernels at M = 1:\n")
    print("| matrix | f32 MiB | read 1 stream | read 4 streams | memcpy f32 | linear_f32 | int8 read 4 str. "
          "| linear_int8 | int4 read 4 str. | linear_int4 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for bw in bandwidth:
        b = bw["bytes"]
        m1 = next((r["us"] for r in results if r["matrix"] == bw["matrix"] and r["M"] == 1), None)

        def gbs(nbytes: int, us: float | None) -> str:
            return "-" if us is None else f"{us:.0f} [{nbytes / us / 1e3:.1f}]"

        print(f"| {bw['matrix']} | {b['f32'] / 2**20:.2f} | {gbs(b['f32'], bw['read_f32_1_us'])} | "
              f"{gbs(b['f32'], bw['read_f32_4_us'])} | {gbs(2 * b['f32'], bw['memcpy_f32_us'])} | "
              f"{gbs(b['f32'], m1 and m1['ours_f32'])} | {gbs(b['int8'], bw['read_int8_4_us'])} | "
              f"{gbs(b['int8'], m1 and m1['ours_int8'])} | {gbs(b['int4'], bw['read_int4_4_us'])} | "
              f"{gbs(b['int4'], m1 and m1['ours_int4'])} |")
    print("\n(memcpy GB/s counts bytes read + written; int8/int4 bytes include scales, offsets and padding.)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "cpu": cpu_name(), "torch": torch.__version__, "threads": 1, "stream_bytes": STREAM_BYTES,
        "rounds": rounds, "group_size": GROUP, "results": results, "bandwidth": bandwidth,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
