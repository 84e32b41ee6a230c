"""tp_engine.kernels.gguf_gemm: matmuls on GGUF blocks against gguf-py's own dequantizer in float64.

The reference is independent of the code under test: ``gguf.quants.dequantize``
(numpy) gives the float32 weights, the product is taken in float64.

Error bound. Each output is a float32 sum over K terms in a fixed order.
The AVX2 kernels round each weight once (w = q * d - m by one FMA, d and m
themselves products of the file's float16 scales, one rounding each), or in
dot mode sum x * q per sub-block and scale the sum (d * (x . q) - m * sum(x)),
then run per-lane FMA chains of K / 8 steps, add 2 or 4 accumulator sets and
8 lanes (3 adds). The portable C has no FMA: a multiply and an add per step.
So every term goes through at most n = K / 4 + 16 roundings, and the classic
bound |y_hat - y| <= gamma_n * sum_k |x_k| (|d q_k| + |m|) holds with
gamma_n = n u / (1 - n u), u = 2^-24; |d q| + |m| <= |w| + 2 |m| with w
gguf's float32 weight (itself within 2u of the exact q * d - m, inside the
+16). torch's matmul (the fallback and CUDA paths) sums in an unknown
blocked order: n = K + 16, the bound for any order. The bound is rigorous,
not a fudge factor; observed errors sit far below it.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tp_engine.kernels import gguf_gemm as G  # noqa: E402

T = gguf.GGMLQuantizationType
FORMATS = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
NUMPY_QUANTIZE = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0}
U = 2.0 ** -24


def _kernels() -> list[str]:
    ks = ["portable", "torch"]
    for vec in ("neon", "avx2", "avx512"):  # NEON on AArch64 hosts (elsewhere: tests/test_neon_kernels.py, under qemu)
        if G._lib(vec) is not None:
            ks.insert(0, vec)
    return ks


KERNELS = _kernels()


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(a.shape + (2,))


def make_blocks(qt: int, n: int, k: int, seed: int) -> np.ndarray:
    """Valid (n, k // QK * QB) uint8 blocks: gguf's own quantizer where it has one, else random
    bytes with small finite float16 scales (any bytes are a valid K-quant block)."""
    rng = np.random.default_rng(seed)
    if qt in NUMPY_QUANTIZE:
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qt)
    qk, qb = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (n, k // qk, qb), dtype=np.uint8)
    scale = lambda: rng.uniform(-0.02, 0.02, raw.shape[:2])  # noqa: E731 (negative scales are legal)
    for at in ([0, 2] if qt in (T.Q4_K, T.Q5_K) else [208]):
        raw[..., at:at + 2] = _f16_bytes(scale())
    return raw.reshape(n, -1)


def _min_part(qt: int, b: np.ndarray, k: int) -> np.ndarray:
    """|m| per weight (float64 (n, k)): the minimum that asymmetric formats subtract (0 elsewhere)."""
    n = b.shape[0]
    qk, qb = gguf.GGML_QUANT_SIZES[qt]
    blk = b.reshape(n, k // qk, qb)
    if qt == T.Q4_1:
        m = blk[..., 2:4].copy().view(np.float16).astype(np.float64)  # (n, nb, 1)
        return np.abs(np.repeat(m[..., 0], 32, axis=-1))
    if qt in (T.Q4_K, T.Q5_K):
        dmin = blk[..., 2:4].copy().view(np.float16).astype(np.float64)
        _, mins = gguf.quants.Q4_K.get_scale_min(blk[..., 4:16].reshape(-1, 12))
        dm = np.abs(dmin * mins.reshape(n, k // qk, 8))
        return np.repeat(dm, 32, axis=-1).reshape(n, k)
    return np.zeros((n, k))


def check_matmul(y: torch.Tensor, x: torch.Tensor, b: np.ndarray, qt: int, k: int, kernel: str) -> None:
    w = gguf.quants.dequantize(b, qt).astype(np.float64)
    xd = x.double().numpy()
    exact = xd @ w.T
    mag = np.abs(xd) @ (np.abs(w) + 2 * _min_part(qt, b, k)).T
    n = (k + 16) if kernel == "torch" else (k // 4 + 16)
    gamma = n * U / (1 - n * U)
    err = np.abs(y.double().numpy() - exact)
    bound = 1.01 * gamma * mag
    assert y.dtype == torch.float32 and tuple(y.shape) == exact.shape
    assert np.all(err <= bound), f"{kernel} {qt.name}: max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


SHAPES = {32: [(5, 64), (19, 96)], 256: [(7, 512), (3, 256)]}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_matmul_against_float64_reference(qt, kernel):
    qk = gguf.GGML_QUANT_SIZES[qt][0]
    ms = [1, 3, 16, 17, 40] + ([70] if kernel in ("avx512", "avx2", "neon") else [])  # 70 >= DEQUANT_MIN_ROWS: prefill
    assert 70 >= G.DEQUANT_MIN_ROWS
    for i, (n, k) in enumerate(SHAPES[qk]):
        b = make_blocks(qt, n, k, seed=i)
        bt = torch.from_numpy(b)
        x = torch.randn(max(ms), k, generator=torch.Generator().manual_seed(i))
        for m in ms:
            xm = x[:m].contiguous()
            check_matmul(G.gguf_matmul(xm, bt, int(qt), k, kernel=kernel), xm, b, qt, k, kernel)
        out = torch.full((3, n), float("nan"))
        assert G.gguf_matmul(x[:3].contiguous(), bt, qt, k, out=out, kernel=kernel) is out
        check_matmul(out, x[:3], b, qt, k, kernel)


@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_dequantize_rows_is_gguf_bitwise(qt):
    """Any bytes, float16 scales that are subnormal, inf or NaN included: the same float32 bits."""
    qk, qb = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(int(qt))
    raw = rng.integers(0, 256, (6, 2 * qb), dtype=np.uint8)  # 6 rows of 2 blocks
    raw[0, :] = 0
    if qt in NUMPY_QUANTIZE:
        raw[1:] = make_blocks(qt, 5, 2 * qk, seed=1)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(raw, qt)
    nan = np.isnan(ref)
    bt = torch.from_numpy(raw)
    got = {kernel: G.dequantize_rows(bt, int(qt), 2 * qk, kernel=kernel).numpy() for kernel in KERNELS}
    got["dequantize_torch"] = G.dequantize_torch(bt, qt, 2 * qk).numpy()
    for kernel, y in got.items():
        assert y.dtype == np.float32 and y.shape == ref.shape
        # every bit (signed zeros too), except NaN payloads
        assert np.array_equal(np.isnan(y), nan), kernel
        assert np.array_equal(y.view(np.uint32)[~nan], ref.view(np.uint32)[~nan]), kernel


@pytest.mark.parametrize("qt", [T.Q4_1, T.Q4_K, T.Q6_K], ids=lambda q: q.name)
def test_row_slices(qt):
    """blocks[a:b] (a contiguous slice, as a rank holds it) gives the matching rows."""
    qk = gguf.GGML_QUANT_SIZES[qt][0]
    n, k = 23, 2 * qk
    b = make_blocks(qt, n, k, seed=3)
    bt = torch.from_numpy(b)
    full = G.dequantize_rows(bt, qt, k)
    x = torch.randn(2, k)
    for a, e in [(0, 11), (11, 23), (5, 6), (7, 20)]:
        part = bt[a:e]
        assert part.is_contiguous()
        assert torch.equal(G.dequantize_rows(part, qt, k), full[a:e])
        for kernel in KERNELS:
            check_matmul(G.gguf_matmul(x, part, qt, k, kernel=kernel), x, b[a:e], qt, k, kernel)


def test_block_shape_and_supported():
    assert G.SUPPORTED == frozenset(int(q) for q in FORMATS)
    for q in FORMATS:
        assert G.block_shape(q) == tuple(gguf.GGML_QUANT_SIZES[q])
    with pytest.raises(ValueError, match="unsupported GGUF quantization type"):
        G.block_shape(T.Q2_K)


def test_bad_inputs_raise_clear_errors():
    qt, k = int(T.Q4_K), 512
    bt = torch.from_numpy(make_blocks(T.Q4_K, 4, k, seed=0))
    x = torch.randn(2, k)
    cases = [
        (lambda: G.gguf_matmul(x, bt, int(T.F32), k), "unsupported GGUF quantization type"),
        (lambda: G.gguf_matmul(x, bt, "Q4_K", k), "unsupported GGUF quantization type"),
        (lambda: G.gguf_matmul(x[:, :300].contiguous(), bt[:, :0], qt, 300), "not a multiple of the Q4_K block size 256"),
        (lambda: G.gguf_matmul(torch.randn(2, 256), bt, qt, 256), "bytes per row"),
        (lambda: G.gguf_matmul(x.double(), bt, qt, k), "float32"),
        (lambda: G.gguf_matmul(torch.randn(2, 256), bt, qt, k), "x has 256 columns"),
        (lambda: G.gguf_matmul(torch.randn(k, 2).T, bt, qt, k), "contiguous"),
        (lambda: G.gguf_matmul(x, bt.view(torch.int8), qt, k), "uint8"),
        (lambda: G.gguf_matmul(x, bt[:, ::2], qt, k // 2), "contiguous"),
        (lambda: G.gguf_matmul(x.to("meta"), bt, qt, k), "is on meta"),
        (lambda: G.gguf_matmul(x, bt, qt, k, out=torch.empty(2, 5)), r"shape \(2, 4\)"),
        (lambda: G.gguf_matmul(x, bt, qt, k, out=x[:, :4].contiguous().view(torch.int32)), "float32"),
        (lambda: G.gguf_matmul(x, bt, qt, k, kernel="fast"), "kernel must be one of"),
        (lambda: G.dequantize_rows(bt, qt, k + 256), "bytes per row"),
        (lambda: G.dequantize_rows(bt, qt, 0), "positive int"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    buf = torch.empty(2 * 4 + 2 * k)  # out overlapping x
    xo, out = buf[: 2 * k].view(2, k), buf[2 * k - 4: 2 * k + 4].view(2, 4)
    with pytest.raises(ValueError, match="overlap"):
        G.gguf_matmul(xo, bt, qt, k, out=out)


def test_kernel_name_and_forced_portable(monkeypatch):
    monkeypatch.delenv(G.KERNEL_ENV, raising=False)  # the default choice first (a run may force one)
    if G._lib("avx512") is not None:
        assert G.kernel_name() == "avx512"
        monkeypatch.setenv(G.KERNEL_ENV, "avx2")  # still forces the AVX2 build
        assert G.kernel_name() == "avx2"
        monkeypatch.delenv(G.KERNEL_ENV)
    elif G._lib("avx2") is not None:
        assert G.kernel_name() == "avx2"
    elif G._lib("neon") is not None:
        assert G.kernel_name() == ("neon-dotprod" if G._lib("neon").tp_gguf_is_neon() == 2 else "neon")
    assert G.kernel_name("cuda") == ("triton" if G._triton_runs("cuda") else "torch-dequant")
    monkeypatch.setenv(G.KERNEL_ENV, "portable")
    assert G.kernel_name() == "portable"
    G._warned.discard("portable")
    b = make_blocks(T.Q8_0, 3, 64, seed=0)
    x = torch.randn(2, 64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = G.gguf_matmul(x, torch.from_numpy(b), T.Q8_0, 64)
    assert any("portable path" in str(r.message) for r in rec), "a forced slow path must say so"
    check_matmul(y, x, b, T.Q8_0, 64, "portable")
    monkeypatch.setenv(G.KERNEL_ENV, "nonsense")
    with pytest.raises(ValueError, match=G.KERNEL_ENV):
        G.kernel_name()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qt", [T.Q4_K, T.Q8_0, T.Q6_K], ids=lambda q: q.name)
def test_cuda_path(qt):
    qk = gguf.GGML_QUANT_SIZES[qt][0]
    b = make_blocks(qt, 9, 2 * qk, seed=5)
    x = torch.randn(3, 2 * qk)
    y = G.gguf_matmul(x.cuda(), torch.from_numpy(b).cuda(), qt, 2 * qk, kernel="torch")  # Triton: test_triton_gguf
    assert y.is_cuda
    torch.backends.cuda.matmul.allow_tf32 = False
    check_matmul(y.cpu(), x, b, qt, 2 * qk, "torch")


# ------------------------------------------------------------------ int8 activations
#
# activations="int8" rounds each row of x per block of QK inputs (32, or 256
# for the K-quants): dx = max|x| / 127, q = rint(x * (127 / max|x|)), x taken
# as xq = dx q. The test rounds x itself (numpy, float32 steps written from
# that rule, not from the code) and checks two bounds per output:
#  (a) against the exact product with xq in float64: float32 rounding only.
#      AVX2: integer dot products per block (exact), then per 8-lane
#      accumulator at most 2 FMAs a block (two sets alternating), the product
#      d_w dx, the sets' sum, 3 adds across lanes, Q4_1's minimum sums (a
#      chain of K / 32 adds): n = 2 K / 32 + 8 roundings at most; portable
#      and torch run their float path on xq (n as above);
#  (b) against the exact x @ W.T: (a) plus the rounding of x, per block
#      dx (1/2 + 400 u) sum |w| (|x / dx - q| <= 1/2, and 127 / max|x|,
#      max|x| / 127 and x * iscale are each rounded once: < 400 u more).


def np_quantize(x: np.ndarray, qk: int) -> tuple[np.ndarray, np.ndarray]:
    """(xq float64 (M, K), dx float64 (M, K // qk)) by the rule above, in numpy float32 steps."""
    m, k = x.shape
    xb = x.astype(np.float32).reshape(m, k // qk, qk)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    safe = np.where(amax > 0, amax, np.float32(1))
    iscale = np.where(amax > 0, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    q = np.rint((xb * iscale).astype(np.float32))
    assert np.all(np.abs(q) <= 127)
    dx = (amax / np.float32(127)).astype(np.float32)
    return (q.astype(np.float64) * dx.astype(np.float64)).reshape(m, k), dx[..., 0].astype(np.float64)


def check_int8(y: torch.Tensor, x: torch.Tensor, b: np.ndarray, qt: int, k: int, kernel: str) -> None:
    qk = gguf.GGML_QUANT_SIZES[qt][0]
    w = gguf.quants.dequantize(b, qt).astype(np.float64)
    xq, dx = np_quantize(x.numpy(), qk)
    yd = y.double().numpy()
    assert y.dtype == torch.float32 and yd.shape == (x.shape[0], b.shape[0])
    n = {"avx512": 2 * k // 32 + 8, "avx2": 2 * k // 32 + 8, "neon": 2 * k // 32 + 8, "portable": k // 4 + 16, "torch": k + 16}[kernel]
    float_bound = 1.01 * n * U / (1 - n * U) * (np.abs(xq) @ (np.abs(w) + 2 * _min_part(qt, b, k)).T)
    err_a = np.abs(yd - xq @ w.T)
    assert np.all(err_a <= float_bound), f"{kernel} {qt.name} (a): worst ratio {(err_a / float_bound).max():.3g}"
    # (b): sum over blocks of dx_b (1/2 + 400 u) * sum_{k in b} |w_k|
    wsum = np.abs(w).reshape(w.shape[0], k // qk, qk).sum(-1)  # (N, nb)
    act_bound = (dx * (0.5 + 400 * U)) @ wsum.T
    err_b = np.abs(yd - x.double().numpy() @ w.T)
    assert np.all(err_b <= act_bound + float_bound), \
        f"{kernel} {qt.name} (b): worst ratio {(err_b / (act_bound + float_bound)).max():.3g}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_int8_matmul_against_float64_reference(qt, kernel):
    qk = gguf.GGML_QUANT_SIZES[qt][0]
    for i, (n, k) in enumerate(SHAPES[qk] + [(9, 4 * qk)]):
        b = make_blocks(qt, n, k, seed=10 + i)
        bt = torch.from_numpy(b)
        x = torch.randn(70, k, generator=torch.Generator().manual_seed(i)) * torch.rand(70, 1) * 4
        x[2, :qk] = 0  # an all-zero block: dx = 0
        # 70 >= DEQUANT_MIN_ROWS: the x86 kernels keep int8 there (INT8_PREFILL_KERNELS)
        for m in (1, 2, 3, 16, 17) + ((70,) if kernel in G.INT8_PREFILL_KERNELS else ()):
            xm = x[:m].contiguous()
            check_int8(G.gguf_matmul(xm, bt, int(qt), k, kernel=kernel, activations="int8"), xm, b, qt, k, kernel)


def extreme_blocks(qt) -> tuple[np.ndarray, torch.Tensor, int]:
    """(4 weight rows of all-0x00 / 0xFF / 0x80 / 0x7F blocks with small scales, 4 rows of x at
    +-1 / alternating / 0,3, K): the largest integer products the int8 kernels meet."""
    qk, qb = gguf.GGML_QUANT_SIZES[qt]
    k = 2 * qk
    rows = []
    for fill in (0x00, 0xFF, 0x80, 0x7F):
        raw = np.full((k // qk, qb), fill, dtype=np.uint8)
        for at in ([0, 2] if qt in (T.Q4_1, T.Q4_K, T.Q5_K) else [208] if qt == T.Q6_K else [0]):
            raw[:, at:at + 2] = _f16_bytes(np.full(k // qk, 0.01 if fill != 0x80 else -0.01))
        rows.append(raw.reshape(-1))
    b = np.stack(rows)
    x = torch.tensor([[1.0] * k, [-1.0] * k, [(-1.0) ** j for j in range(k)], [3.0 * (j % 2) for j in range(k)]])
    return b, x, k


@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_int8_extreme_blocks(qt):
    """Largest integer products (all bytes 0x00 / 0xFF / 0x80, x at +-127 after rounding): no int16
    saturation or int32 / float conversion loss in the AVX2 dot products."""
    b, x, k = extreme_blocks(qt)
    for kernel in KERNELS:
        for m in (1, 4):
            xm = x[:m].contiguous()
            check_int8(G.gguf_matmul(xm, torch.from_numpy(b), int(qt), k, kernel=kernel, activations="int8"),
                       xm, b, qt, k, kernel)


@pytest.mark.parametrize("qt", [T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda q: q.name)
def test_quantize_activations_rule(qt):
    """quantize_activations (torch) and the C quantizer of both builds: the rule, bitwise; inf / NaN -> dx NaN."""
    qk = gguf.GGML_QUANT_SIZES[qt][0]
    k = 2 * qk
    x = torch.randn(5, k) * 3
    x[1, :qk] = 0
    x[2, 5] = float("inf")
    x[3, qk + 1] = float("nan")
    q, dx = G.quantize_activations(x, qt)
    fin = torch.isfinite(x.reshape(5, 2, qk)).all(-1)
    assert torch.equal(torch.isnan(dx), ~fin)
    xq, dref = np_quantize(torch.where(fin.repeat_interleave(qk, 1), x, 0.0).numpy(), qk)
    got = (q.double().reshape(5, 2, qk) * dx.double()[:, :, None]).reshape(5, k).numpy()
    assert np.array_equal(got[fin.repeat_interleave(qk, 1).numpy()], xq[fin.repeat_interleave(qk, 1).numpy()])
    for kernel in ("avx512", "avx2", "neon", "portable"):
        lib = G._lib(kernel)
        if lib is None:
            continue
        qc, dc = torch.empty(5, k, dtype=torch.int8), torch.empty(5, 2)
        sc = torch.empty(5, k // 32, dtype=torch.int16)
        assert lib.tp_gguf_quantize_x(int(qt), x.data_ptr(), 5, k, qc.data_ptr(), dc.data_ptr(), sc.data_ptr()) == qk
        assert torch.equal(qc, q) and torch.equal(torch.isnan(dc), torch.isnan(dx)), kernel
        assert torch.equal(dc[fin], dx[fin]), kernel
        assert torch.equal(sc, q.reshape(5, -1, 32).sum(-1, dtype=torch.int16)), kernel
    # a non-finite x gives non-finite outputs in its row (never a silent finite number)
    b = torch.from_numpy(make_blocks(qt, 3, k, seed=2))
    for kernel in KERNELS:
        y = G.gguf_matmul(x, b, int(qt), k, kernel=kernel, activations="int8")
        assert not torch.isfinite(y[2:4]).any() and torch.isfinite(y[[0, 1, 4]]).all(), kernel


def test_activations_selection(monkeypatch):
    qt, k = int(T.Q4_K), 512
    b = torch.from_numpy(make_blocks(T.Q4_K, 5, k, seed=4))
    x = torch.randn(3, k)
    f32 = G.gguf_matmul(x, b, qt, k, activations="float32")
    i8 = G.gguf_matmul(x, b, qt, k, activations="int8")
    assert not torch.equal(f32, i8)  # they are different computations
    monkeypatch.setenv(G.ACTIVATIONS_ENV, "int8")
    assert G.activations_mode() == "int8"
    assert torch.equal(G.gguf_matmul(x, b, qt, k), i8)
    assert torch.equal(G.gguf_matmul(x, b, qt, k, activations="float32"), f32)  # the argument wins
    big = torch.randn(G.DEQUANT_MIN_ROWS, k)
    if G.kernel_name() in G.INT8_PREFILL_KERNELS:  # x86: the int8 kernels at any M
        i8big = G.gguf_matmul(big, b, qt, k)
        assert not torch.equal(i8big, G.gguf_matmul(big, b, qt, k, activations="float32"))
        check_int8(i8big, big, b.numpy(), T.Q4_K, k, G.kernel_name())
        assert torch.equal(i8big[:16], G.gguf_matmul(big[:16].contiguous(), b, qt, k))  # groups of 16 rows
    else:  # elsewhere prefill keeps float32 activations
        assert torch.equal(G.gguf_matmul(big, b, qt, k), G.gguf_matmul(big, b, qt, k, activations="float32"))
    monkeypatch.setenv(G.ACTIVATIONS_ENV, "float32")
    assert torch.equal(G.gguf_matmul(x, b, qt, k), f32)
    monkeypatch.setenv(G.ACTIVATIONS_ENV, "int4")
    with pytest.raises(ValueError, match=G.ACTIVATIONS_ENV):
        G.gguf_matmul(x, b, qt, k)
    monkeypatch.delenv(G.ACTIVATIONS_ENV)
    assert G.activations_mode() == G.DEFAULT_ACTIVATIONS
    with pytest.raises(ValueError, match="activations must be one of"):
        G.gguf_matmul(x, b, qt, k, activations="bf16")


@pytest.mark.skipif(G._lib("avx512") is None or G._lib("avx2") is None, reason="needs AVX-512 F/BW/VL/DQ/VNNI")
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_avx512_is_avx2_bitwise(qt):
    """The AVX-512 build's int8 kernels (gguf_avx512.h) sum the same integers per lane as AVX2's and then take
    the same float steps: int8 results are bitwise the AVX2 build's (extremes included: all-0xFF blocks, x at
    +-127). Float activations: bitwise too except Q4_K / Q5_K / Q6_K, whose dot-mode kernels (gguf_avx512_f32.h)
    sum 16 lanes (their bound: test_matmul_against_float64_reference)."""
    qk = gguf.GGML_QUANT_SIZES[qt][0]
    acts = ("int8",) if qt in (T.Q4_K, T.Q5_K, T.Q6_K) else ("int8", "float32")
    for i, (n, k) in enumerate(SHAPES[qk] + [(37, 4 * qk)]):
        bt = torch.from_numpy(make_blocks(qt, n, k, seed=20 + i))
        x = torch.randn(17, k, generator=torch.Generator().manual_seed(i)) * 3
        for m in (1, 2, 3, 4, 16, 17):
            for act in acts:
                xm = x[:m].contiguous()
                a = G.gguf_matmul(xm, bt, int(qt), k, kernel="avx2", activations=act)
                b = G.gguf_matmul(xm, bt, int(qt), k, kernel="avx512", activations=act)
                assert torch.equal(a, b), f"{qt.name} n={n} k={k} M={m} {act}: max diff {(a - b).abs().max():.3g}"
    ff = torch.from_numpy(np.full((3, 2 * gguf.GGML_QUANT_SIZES[qt][1]), 0xFF, dtype=np.uint8))
    at = [0, 2] if qt in (T.Q4_1, T.Q4_K, T.Q5_K) else [208] if qt == T.Q6_K else [0]
    ff.view(-1, gguf.GGML_QUANT_SIZES[qt][1])[:, [a + j for a in at for j in (0, 1)]] = 0x20  # finite scales
    xe = torch.tensor([[1.0, -1.0] * qk, [-1.0] * (2 * qk)])
    for act in acts:
        assert torch.equal(G.gguf_matmul(xe, ff, int(qt), 2 * qk, kernel="avx2", activations=act),
                           G.gguf_matmul(xe, ff, int(qt), 2 * qk, kernel="avx512", activations=act))
