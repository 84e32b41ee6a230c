"""Time the Triton kernels against torch on a CUDA GPU.

For decode-like (M = 1, 4) and prefill-like (M = 512) shapes of
SmolLM2-135M and a Llama-7B-sized layer:

* int8 and int4 (group 64 and 128) weight-only matmuls vs torch's fp16
  ``F.linear`` (cuBLAS) on the float weights, and vs the reference
  (dequantize in torch, then matmul), all with fp16 activations;
* fused residual add + RMSNorm vs ``x + r`` followed by torch's
  ``F.rms_norm``.

Prints a markdown table (µs per call, CUDA-event timed, median of many
runs after warm-up; effective weight bandwidth for the matmuls). Without a
GPU it says so and exits 0: the interpreter (TRITON_INTERPRET=1) checks
correctness, not speed.

    python benchmarks/kernels.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (label, N, K)
SHAPES = [
    ("SmolLM2 gate/up (1536x576)", 1536, 576),
    ("SmolLM2 down (576x1536)", 576, 1536),
    ("SmolLM2 lm_head (49152x576)", 49152, 576),
    ("7B q_proj (4096x4096)", 4096, 4096),
    ("7B gate/up (11008x4096)", 11008, 4096),
]
ROWS = (1, 4, 512)


def cuda_time_us(fn, warmup: int = 10, reps: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to time.")
        return 0
    from tp_engine.kernels import load_triton
    from tp_engine.kernels import reference as ref

    k = load_triton()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| op | shape | M | torch fp16 µs | reference µs | triton µs | speed-up vs fp16 | triton weight GB/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    shapes = SHAPES[:2] if args.quick else SHAPES
    for label, n, kk in shapes:
        w = torch.randn(n, kk, device="cuda", dtype=torch.float16) * 0.02
        q, scale = ref.quantize_int8(w)
        variants = [("int8", q.numel() + 4 * n, lambda x: k.int8_matmul(x, q, scale), lambda x: ref.int8_matmul(x, q, scale))]
        for group in (64, 128):
            if kk % group:
                continue
            codes = ref.quantize_int4(w, group)
            nbytes = codes[0].numel() + 8 * codes[1].numel()
            variants.append((
                f"int4 g{group}", nbytes,
                lambda x, c=codes, g=group: k.int4_matmul(x, *c, g),
                lambda x, c=codes, g=group: ref.int4_matmul(x, *c, g),
            ))
        for m in ROWS:
            x = torch.randn(m, kk, device="cuda", dtype=torch.float16)
            base = cuda_time_us(lambda: F.linear(x, w))
            for name, nbytes, fast, slow in variants:
                err = (fast(x).float() - slow(x).float()).abs().max().item()
                if err > 1e-2 * max(1.0, slow(x).float().abs().max().item()):
                    print(f"| {name} | {label} | {m} | MISMATCH vs reference: {err:.3g} |")
                    continue
                t = cuda_time_us(lambda: fast(x))
                t_ref = cuda_time_us(lambda: slow(x), reps=10)
                print(f"| {name} | {label} | {m} | {base:.1f} | {t_ref:.1f} | {t:.1f} | {base / t:.2f}x | "
                      f"{nbytes / t / 1e3:.0f} |")
    for hidden in (576, 4096):
        for rows in (1, 512):
            x = torch.randn(rows, hidden, device="cuda", dtype=torch.float16)
            r = torch.randn_like(x)
            wn = torch.rand(hidden, device="cuda", dtype=torch.float16) + 0.5

            def torch_norm():
                h = x + r
                return F.rms_norm(h, (hidden,), wn, 1e-6), h

            base = cuda_time_us(torch_norm)
            t = cuda_time_us(lambda: k.rms_norm(x, wn, 1e-6, r))
            t_ref = cuda_time_us(lambda: ref.rms_norm(x, wn, 1e-6, r))
            print(f"| add+RMSNorm | hidden {hidden} | {rows} | {base:.1f} | {t_ref:.1f} | {t:.1f} | {base / t:.2f}x | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
