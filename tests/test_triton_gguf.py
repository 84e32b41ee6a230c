"""tp_engine.kernels.triton_gguf (Triton matmuls on GGUF blocks) against gguf-py's dequantizer in float64.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported), through the same entry point the engine uses
(``gguf_matmul(..., kernel="triton")``); on a CUDA machine the same tests
run the compiled kernels, plus a larger check (``test_cuda_*``).

Shapes hit the edges: N = 40 is not a multiple of the N tile (16 for
M <= 16, 64 above); M = 17 needs a second 16-row M tile; Q8_0's K = 7 blocks runs
both its 4-block loop and the leftover loop; split K (partial sums per
slice of K, added by torch) with a short last slice.

Error bound (rigorous, like tests/test_gguf_kernels.py's). The integer codes
are exact in bf16 / fp16, and float32 x enters as three bf16 pieces that sum
to it exactly (fp16 / bf16 x as itself), so every product of a piece and a
code is exact in float32. Per (sub-)block of L = 32 (16 for Q6_K) weights
tl.dot sums at most 3L such products in float32, in some order (< 3L
roundings); the block scale d * sc (1 rounding) multiplies it (1); Q4_K
subtracts sum(x) * dmin * m (fewer again, plus 1); the float32 accumulator
adds K / L partial sums, and split K adds the slices (a few more). So every
term sees at most n = 110 + K / 16 roundings, and
|y - exact| <= gamma_n sum_k |x_k| (|d sc q_k| + |dmin m|) <= gamma_n sum_k |x_k| (|w_k| + 2 |m_k|),
gamma_n = n u / (1 - n u), u = 2^-24 (2^-23 on CUDA: tensor cores may
truncate their float32 sums), w gguf's float32 weight (within 3u of the
exact one: inside the slack). The pieces' magnitudes add up to |x| (1 + 2^-7)
at most, inside the 1.01.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (triton.jit reads it)

gguf = pytest.importorskip("gguf")

from tp_engine.kernels import gguf_gemm as G  # noqa: E402
from tp_engine.kernels import triton_available  # noqa: E402

T = gguf.GGMLQuantizationType
FORMATS = [T.Q8_0, T.Q4_K, T.Q6_K]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U = 2.0 ** -24
needs_triton = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="triton not installed, or triton imported before TRITON_INTERPRET=1 could be set (no GPU here)",
)
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available("cuda")),
                                reason="needs a CUDA GPU and triton (compiled kernels)")


def make_blocks(qt: int, n: int, k: int, seed: int) -> np.ndarray:
    """Valid (n, k // QK * QB) uint8 blocks: gguf's own quantizer for Q8_0; the K-quants have
    none in gguf-py, so random bytes (every byte pattern is a valid code) with small finite fp16 scales."""
    rng = np.random.default_rng(seed)
    if qt == T.Q8_0:
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qt)
    qk, qb = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (n, k // qk, qb), dtype=np.uint8)
    for at in ([0, 2] if qt == T.Q4_K else [208]):  # d (and dmin); negative scales are legal
        raw[..., at:at + 2] = rng.uniform(-0.02, 0.02, raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(
            raw.shape[:2] + (2,))
    return raw.reshape(n, -1)


def _min_part(qt: int, b: np.ndarray, k: int) -> np.ndarray:
    """|dmin * m| per weight (float64 (n, k)) for Q4_K; 0 for the symmetric formats."""
    if qt != T.Q4_K:
        return np.zeros((b.shape[0], k))
    n = b.shape[0]
    blk = b.reshape(n, k // 256, 144)
    dmin = blk[..., 2:4].copy().view(np.float16).astype(np.float64)
    _, mins = gguf.quants.Q4_K.get_scale_min(blk[..., 4:16].reshape(-1, 12))
    return np.repeat(np.abs(dmin * mins.reshape(n, k // 256, 8)), 32, axis=-1).reshape(n, k)


def check(y: torch.Tensor, x: torch.Tensor, b: np.ndarray, qt: int, k: int) -> None:
    w = gguf.quants.dequantize(b, qt).astype(np.float64)
    xd = x.cpu().double().numpy()
    exact = xd @ w.T
    mag = np.abs(xd) @ (np.abs(w) + 2 * _min_part(qt, b, k)).T
    n, u = 110 + k // 16, (2 * U if y.is_cuda else U)
    bound = 1.01 * n * u / (1 - n * u) * mag
    assert y.dtype == torch.float32 and tuple(y.shape) == exact.shape
    err = np.abs(y.cpu().double().numpy() - exact)
    assert np.all(err <= bound), f"{T(qt).name}: max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"
    assert np.all(err <= 1e-5 * np.abs(exact).max())  # and not vacuous: far below the output's scale


K_OF = {T.Q8_0: 7 * 32, T.Q4_K: 2 * 256, T.Q6_K: 2 * 256}


@needs_triton
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_matches_float64_reference(qt):
    k, n = K_OF[qt], 40
    b = make_blocks(qt, n, k, seed=int(qt))
    bt = torch.from_numpy(b).to(DEVICE)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(int(qt))).to(DEVICE)
    for m in (1, 3, 16, 17):
        xm = x[:m].contiguous()
        check(G.gguf_matmul(xm, bt, int(qt), k, kernel="triton"), xm, b, qt, k)
    out = torch.full((3, n), float("nan"), device=DEVICE)
    assert G.gguf_matmul(x[:3].contiguous(), bt, int(qt), k, out=out, kernel="triton") is out
    check(out, x[:3], b, qt, k)
    # split K (the GPU's default for few tiles): Q8_0's 7 blocks as 3 + 3 + 1, the K-quants' 2 as 1 + 1
    tg, qk = G._triton_gguf(), G.block_shape(int(qt))[0]
    for m in (1, 17):
        check(tg.gguf_matmul_triton(x[:m].contiguous(), bt, int(qt), k, split_k=min(3, k // qk)), x[:m], b, qt, k)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_half_precision_x_sums_in_float32(qt, dtype):
    """fp16 / bf16 x: the result is the exact product with that x, to float32 rounding (no fp16 weights)."""
    tg = G._triton_gguf()
    k, n = K_OF[qt], 24
    b = make_blocks(qt, n, k, seed=7)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    for m in (1, 17):
        xm = x[:m].contiguous()
        check(tg.gguf_matmul_triton(xm, torch.from_numpy(b).to(DEVICE), int(qt), k), xm, b, qt, k)


@needs_triton
def test_bad_inputs_are_clear_errors(monkeypatch):
    tg = G._triton_gguf()
    b = torch.from_numpy(make_blocks(T.Q8_0, 8, 64, seed=0)).to(DEVICE)
    x = torch.randn(2, 64, device=DEVICE)
    q4_0 = torch.from_numpy(gguf.quants.quantize(np.ones((8, 64), np.float32), T.Q4_0)).to(DEVICE)
    with pytest.raises(ValueError, match="no Triton kernel for GGUF Q4_0; implemented: Q8_0, Q4_K, Q6_K"):
        tg.gguf_matmul_triton(x, q4_0, int(T.Q4_0), 64)
    with pytest.raises(ValueError, match="no Triton kernel for GGUF Q4_0"):  # forced through the entry point: no fallback
        G.gguf_matmul(x, q4_0, int(T.Q4_0), 64, kernel="triton")
    with pytest.raises(ValueError, match="unsupported GGUF quantization type 99"):
        tg.gguf_matmul_triton(x, b, 99, 64)
    with pytest.raises(ValueError, match="k = 48 is not a multiple of the Q8_0 block size 32"):
        tg.gguf_matmul_triton(x[:, :48].contiguous(), b[:, :51].contiguous(), int(T.Q8_0), 48)
    with pytest.raises(ValueError, match="needs 2 blocks of 34 bytes = 68"):
        tg.gguf_matmul_triton(x, b[:, :60].contiguous(), int(T.Q8_0), 64)
    with pytest.raises(ValueError, match="blocks must be a contiguous non-empty 2-D uint8"):
        tg.gguf_matmul_triton(x, b.view(torch.int8), int(T.Q8_0), 64)
    for bad in (x.double(), x.to(torch.int32), x.T.contiguous().T):
        with pytest.raises(ValueError, match="x must be a contiguous non-empty 2-D float32, float16, bfloat16 tensor"):
            tg.gguf_matmul_triton(bad, b, int(T.Q8_0), 64)
    with pytest.raises(ValueError, match="x has 32 columns, the weight has k = 64"):
        tg.gguf_matmul_triton(x[:, :32].contiguous(), b, int(T.Q8_0), 64)
    for bad in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match="split_k must be an int in 1..2"):
            tg.gguf_matmul_triton(x, b, int(T.Q8_0), 64, split_k=bad)
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 tensor of shape \(2, 8\)"):
        tg.gguf_matmul_triton(x, b, int(T.Q8_0), 64, out=torch.empty(2, 9, device=DEVICE))
    if DEVICE == "cpu":
        monkeypatch.setattr(tg, "_interpreting", lambda: False)
        with pytest.raises(ValueError, match="only under TRITON_INTERPRET=1"):
            tg.gguf_matmul_triton(x, b, int(T.Q8_0), 64)


@needs_triton
def test_dispatch_choice(monkeypatch):
    """What gguf_matmul runs off the CPU: Triton for its formats, else torch-dequant with a reason (warned once)."""
    pick = G._device_kernel
    assert pick(int(T.Q4_K), "cuda", None, True) == ("triton", "")
    assert pick(int(T.Q6_K), "cuda", "triton", True) == ("triton", "")
    kind, why = pick(int(T.Q5_K), "cuda", None, True)
    assert kind == "torch-dequant" and "no Triton kernel for Q5_K" in why
    kind, why = pick(int(T.Q4_K), "cuda", None, False)
    assert kind == "torch-dequant" and "no Triton kernels on cuda" in why
    assert pick(int(T.Q4_K), "cuda", "torch", True)[0] == "torch-dequant"
    with pytest.raises(RuntimeError, match="kernel='triton' cannot run on cuda here"):
        pick(int(T.Q4_K), "cuda", "triton", False)
    with pytest.raises(ValueError, match="kernel='avx2' is a CPU kernel"):
        pick(int(T.Q4_K), "cuda", "avx2", True)
    monkeypatch.setattr(G, "_triton_runs", lambda dev: dev == "cuda")
    assert G.kernel_name("cuda") == "triton"
    assert G.kernel_name("cuda", int(T.Q8_0)) == "triton"
    assert G.kernel_name("cuda", int(T.Q5_K)) == "torch-dequant"
    monkeypatch.setattr(G, "_triton_runs", lambda dev: False)
    assert G.kernel_name("cuda") == "torch-dequant"
    assert G.kernel_name("cpu") in ("avx512", "avx2", "portable", "torch")  # the CPU choice is untouched


@needs_cuda
def test_cuda_compiled_kernels_and_fallback_warning():
    """Compiled kernels at a Qwen-like K, M up to a prefill tile; a format without a kernel warns once."""
    assert G.kernel_name("cuda", int(T.Q4_K)) == "triton"
    k, n = 1536, 1000
    for qt in FORMATS:
        b = make_blocks(qt, n, k, seed=1)
        bt = torch.from_numpy(b).cuda()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(130, k, device="cuda").to(dtype)
            for m in (1, 4, 16, 17, 130):
                xm = x[:m].contiguous()
                y = G.gguf_matmul(xm, bt, int(qt), k) if dtype == torch.float32 else \
                    G._triton_gguf().gguf_matmul_triton(xm, bt, int(qt), k)
                check(y, xm, b, qt, k)
    b5 = torch.from_numpy(gguf.quants.quantize(np.ones((8, 64), np.float32), T.Q5_0)).cuda()
    G._warned.discard("no Triton kernel for Q5_0")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        G.gguf_matmul(torch.ones(1, 64, device="cuda"), b5, int(T.Q5_0), 64)
        G.gguf_matmul(torch.ones(1, 64, device="cuda"), b5, int(T.Q5_0), 64)
    assert [str(w.message) for w in seen].count(
        "gguf_gemm: dequantizing the whole Q5_0 weight at every call on cuda (no Triton kernel for Q5_0)") == 1


_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tp_engine.kernels import triton_gguf as TG

assert not TG._interpreting()
for name, xt, m in (("_q8_0_kernel", "fp32", 1), ("_q4_k_kernel", "fp32", 1), ("_q6_k_kernel", "fp32", 1),
                    ("_q4_k_kernel", "bf16", 17), ("_q6_k_kernel", "fp16", 17)):
    block_m, block_n, warps = TG._tiles(m)
    sig = {"x_ptr": "*" + xt, "w_ptr": "*u8", "y_ptr": "*fp32"}
    sig.update({a: "i32" for a in ("M", "N", "NB", "BPS", "stride_xm", "stride_wn", "stride_ym", "stride_ys")})
    const = {"INTERPRET": False, "BLOCK_M": block_m, "BLOCK_N": block_n}
    if name == "_q8_0_kernel":
        const["STEP"] = 4
    sig.update({c: "constexpr" for c in const})
    src = ASTSource(fn=getattr(TG, name), signature=sig, constexprs=const)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert kernel.asm["cubin"], name
    print(name, xt, "ok", flush=True)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests above run the compiled kernels themselves")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts some code the compiler rejects (and the reverse): compile each kernel (the
    tiles the launcher picks) to an sm_90 cubin with Triton's own ptxas, in a process without TRITON_INTERPRET."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton with its bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences Triton 3.9's warning; fusion was its default
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _COMPILE], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok") == 5, done.stdout
