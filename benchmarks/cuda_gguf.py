"""Time the Triton GGUF matmuls (tp_engine.kernels.triton_gguf) against dequantize + matmul on a CUDA GPU.

For Qwen2.5-1.5B-like shapes (K = 1536: N = 1536 q/o_proj, 8960 gate/up,
256 k/v_proj; K = 8960: N = 1536 down_proj) and M = 1, 4, 16 (decode) and
128 (prefill), per format (Q4_K, Q8_0, Q6_K):

* ``torch-dequant``: what CUDA ran before (``gguf_matmul(..., kernel="torch")``:
  dequantize the whole weight with torch ops at every call, then matmul);
* ``triton``: ``gguf_matmul`` with float32 x (the engine's path), and
  ``gguf_matmul_triton`` with bfloat16 x (tensor cores);
* ``dense bf16``: torch's ``F.linear`` on an already dequantized bf16 weight
  (cuBLAS; what an unquantized model pays, for scale).

Each result is checked against the float64 product of gguf-py's dequantized
weights (max error relative to max |y|; a mismatch prints instead of a time).
Times are CUDA-event medians after warm-up; GB/s is the GGUF weight bytes
read per call / time (H200 HBM peak: ~4.8 TB/s). Prints a Markdown table.

    python benchmarks/cuda_gguf.py [--quick] [--formats Q4_K,Q8_0,Q6_K]

Without a GPU (or without triton) it says so and exits 2.
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
from tp_engine.kernels import triton_available  # noqa: E402

QTYPES = {"Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
# (label, N, K)
SHAPES = [
    ("q/o_proj", 1536, 1536),
    ("gate/up", 8960, 1536),
    ("k/v_proj", 256, 1536),
    ("down", 1536, 8960),
]
ROWS = (1, 4, 16, 128)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}  # relative to max |y|; the exact product with the given x


def cuda_time_us(fn, warmup: int = 20, reps: int = 100) -> float:
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


def random_blocks(qt: int, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Valid blocks: random bytes (every code is valid) with small finite float16 scales."""
    qk, qb = G.block_shape(qt)
    raw = rng.integers(0, 256, (n, k // qk, qb), dtype=np.uint8)
    scale_at = {8: [0], 12: [0, 2], 14: [208]}[qt]
    for at in scale_at:
        raw[..., at:at + 2] = rng.uniform(-0.02, 0.02, raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(
            raw.shape[:2] + (2,))
    return raw.reshape(n, -1)


def rel_err(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor) -> float:
    exact = x.double() @ w64.T
    return ((y.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-300)).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, M = 1 and 16")
    parser.add_argument("--formats", default="Q4_K,Q8_0,Q6_K", help="comma-separated: " + ", ".join(QTYPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/cuda_gguf.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing timed.",
              file=sys.stderr)
        return 2
    if not triton_available("cuda"):
        print("benchmarks/cuda_gguf.py needs triton (not importable here); nothing timed.", file=sys.stderr)
        return 2
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in QTYPES]
    if unknown:
        print(f"unknown format(s) {unknown}; choose from {', '.join(QTYPES)}", file=sys.stderr)
        return 2
    import gguf  # the float64 reference's dequantizer (optional dependency of the engine)
    import triton

    from tp_engine.kernels import triton_gguf as TG

    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = (1, 16) if args.quick else ROWS
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; kernel_name('cuda') = {G.kernel_name('cuda')}\n")
    print("| format | shape (N x K) | M | torch-dequant µs | triton f32-x µs | triton bf16-x µs | dense bf16 µs | "
          "speed-up vs dequant | triton GB/s (best x) | max rel err f32 / bf16 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in formats:
        qt = QTYPES[name]
        for label, n, k in shapes:
            b = random_blocks(qt, n, k, rng)
            w64 = torch.from_numpy(gguf.quants.dequantize(b, qt).astype(np.float64)).cuda()
            blocks = torch.from_numpy(b).cuda()
            w_bf16 = w64.to(torch.bfloat16)
            nbytes = blocks.numel()
            for m in rows:
                x = torch.randn(m, k, device="cuda")
                xb = x.to(torch.bfloat16)
                y32 = G.gguf_matmul(x, blocks, qt, k)
                yb = TG.gguf_matmul_triton(xb, blocks, qt, k)
                e32, eb = rel_err(y32, x, w64), rel_err(yb, xb, w64)
                if e32 > TOL[torch.float32] or eb > TOL[torch.bfloat16]:
                    print(f"| {name} | {label} {n}x{k} | {m} | MISMATCH vs float64: rel err {e32:.3g} / {eb:.3g} |")
                    continue
                t_deq = cuda_time_us(lambda: G.gguf_matmul(x, blocks, qt, k, kernel="torch"), reps=30)
                t32 = cuda_time_us(lambda: G.gguf_matmul(x, blocks, qt, k))
                tb = cuda_time_us(lambda: TG.gguf_matmul_triton(xb, blocks, qt, k))
                t_dense = cuda_time_us(lambda: F.linear(xb, w_bf16))
                print(f"| {name} | {label} {n}x{k} | {m} | {t_deq:.1f} | {t32:.1f} | {tb:.1f} | {t_dense:.1f} | "
                      f"{t_deq / t32:.1f}x | {nbytes / min(t32, tb) / 1e3:.0f} | {e32:.1e} / {eb:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
