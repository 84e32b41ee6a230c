"""The NEON (AArch64) kernels of gguf_gemm.c, cross-compiled and run under qemu-user.

torch does not run under qemu here, so a small C driver
(``tests/support/neon_harness.c``) is linked statically with gguf_gemm.c
built as gguf_gemm.py builds it on Arm (``-DTP_GGUF_NEON``, baseline
ARMv8-A: the sdot kernels carry their own target attribute), fed requests
on stdin and answered on stdout; the checks are test_gguf_kernels.py's,
against gguf-py's dequantizer in float64, with the same bounds as the AVX2
kernels: float32 activations (``check_matmul``, n = K / 4 + 16 roundings)
and int8 activations (``check_int8``, the AVX2 int8 bound). Twice: on
``-cpu max`` (has the dot-product extension: the sdot kernels) and on
``-cpu cortex-a72`` (has not: smull / sadalp), and the C side must say
which it picked. The harness also hands gguf_gemm.c a pthread pool, so the
thread split is checked too (the same bits for 1, 2, 3, 5 threads).

Needs ``aarch64-linux-gnu-gcc`` (Debian: gcc-aarch64-linux-gnu) and
``qemu-aarch64`` (qemu-user or qemu-user-static); skips without them.
The harness binary is cached by a hash of its sources and flags;
``TP_ENGINE_NEON_HARNESS=path`` tests a harness built otherwise (another
compiler, e.g. clang --target=aarch64-linux-gnu).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from test_gguf_kernels import FORMATS, T, check_int8, check_matmul, extreme_blocks, make_blocks  # noqa: E402

from tp_engine.kernels import gguf_gemm as G  # noqa: E402
from tp_engine.native import cache_dir  # noqa: E402

KERNELS_DIR = Path(G.__file__).parent
HARNESS = Path(__file__).with_name("support") / "neon_harness.c"
SOURCES = [HARNESS, KERNELS_DIR / "gguf_gemm.c", KERNELS_DIR / "gguf_neon.h", KERNELS_DIR / "gguf_neon_i8.h"]
CC = os.environ.get("TP_ENGINE_AARCH64_CC", "aarch64-linux-gnu-gcc")
# kernel_name() -> the qemu CPU model that must select it (cortex-a72: ARMv8.0, no dot product)
CPUS = {"neon-dotprod": "max", "neon": "cortex-a72"}
RUN_TIMEOUT_S = 120

OP_GEMM, OP_GEMM_I8, OP_QUANTIZE, OP_DEQUANT, OP_INFO, OP_THREADS = 1, 2, 3, 4, 5, 6
_REQ = struct.Struct("<iiqqqiiqq")


def _qemu() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def _missing() -> str | None:
    if shutil.which(CC) is None:
        return f"no AArch64 cross compiler ({CC!r} not on PATH; Debian: apt-get install gcc-aarch64-linux-gnu)"
    if _qemu() is None:
        return "no qemu-aarch64 (Debian: apt-get install qemu-user)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(scope="module")
def harness() -> Path:
    if os.environ.get("TP_ENGINE_NEON_HARNESS"):
        return Path(os.environ["TP_ENGINE_NEON_HARNESS"])
    flags = [f for f in G._FLAGS["neon"] if f not in ("-fPIC", "-shared")] + ["-static", "-pthread"]
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in SOURCES), CC.encode(), " ".join(flags).encode()]))
    out_dir = cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        out_dir = Path(tempfile.gettempdir())
    exe = out_dir / f"neon_harness-{key.hexdigest()[:16]}"
    if not exe.exists():
        tmp = exe.with_name(f".{exe.name}.{os.getpid()}")
        proc = subprocess.run([CC, *flags, "-o", str(tmp), str(HARNESS), str(SOURCES[1])],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{CC} failed:\n{proc.stderr[-4000:]}"
        os.replace(tmp, exe)
    return exe


def _run(exe: Path, cpu: str, reqs: list[tuple]) -> list[tuple[int, bytes]]:
    """Send ``reqs`` ((op, t, M, K, N, a, b, x float32 array | None, w uint8 array | None), ...) to one
    harness process on ``cpu``; its (rc, payload) per request."""
    buf = bytearray()
    for op, t, m, k, n, a, b, x, w in reqs:
        xb = b"" if x is None else np.ascontiguousarray(x, dtype=np.float32).tobytes()
        wb = b"" if w is None else np.ascontiguousarray(w, dtype=np.uint8).tobytes()
        buf += _REQ.pack(op, int(t), m, k, n, a, b, len(xb) // 4, len(wb)) + xb + wb
    buf += _REQ.pack(0, 0, 0, 0, 0, 0, 0, 0, 0)
    proc = subprocess.run([_qemu(), "-cpu", cpu, str(exe)], input=bytes(buf), capture_output=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"harness on {cpu}: rc {proc.returncode}\n{proc.stderr.decode(errors='replace')}"
    out, at, res = proc.stdout, 0, []
    for _ in reqs:
        rc, size = struct.unpack_from("<iq", out, at)
        at += 12
        res.append((rc, out[at:at + size]))
        at += size
    assert at == len(out)
    return res


def _y(res: tuple[int, bytes], m: int, n: int) -> torch.Tensor:
    rc, data = res
    assert rc == 0, f"internal error {rc}"
    return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(m, n).copy())


@pytest.mark.parametrize("name", list(CPUS))
def test_dotprod_is_detected_at_run_time(harness, name):
    """getauxval(AT_HWCAP) & HWCAP_ASIMDDP: 2 (sdot kernels) on a CPU with the dot product, 1 without."""
    [(rc, _)] = _run(harness, CPUS[name], [(OP_INFO, 0, 0, 0, 0, 0, 0, None, None)])
    assert rc == (2 if name == "neon-dotprod" else 1)


# (N, K) per block size: N not a multiple of 4 (the plans' leftover rows), several blocks a row
SHAPES = {32: [(19, 96), (6, 32)], 256: [(7, 512), (13, 256)]}
MS = (1, 2, 5, 16)


@pytest.mark.parametrize("name", list(CPUS))
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_matmul_against_float64_reference(harness, qt, name):
    """float32 and int8 activations, M = 1, 2, 5, 16 with gguf_gemm.py's plan for each M, and M = 5
    under every plan the tables hold."""
    qk = gguf.GGML_QUANT_SIZES[qt][0]
    cases, reqs = [], []
    for i, (n, k) in enumerate(SHAPES[qk]):
        b = make_blocks(qt, n, k, seed=20 + i)
        x = torch.randn(max(MS), k, generator=torch.Generator().manual_seed(i))
        x = x * torch.rand(max(MS), 1, generator=torch.Generator().manual_seed(7)) * 4
        x[2, :qk] = 0  # an all-zero block: dx = 0
        plans = [(m, *G._PLANS.get(min(m, 16), G._PLAN_DEFAULT)) for m in MS]
        plans += [(5, rr, mc) for rr, mcs in ((1, range(1, 9)), (2, range(1, 5)), (4, (1, 2))) for mc in mcs]
        for m, rr, mc in plans:
            xm = x[:m].contiguous()
            cases.append(("float32", xm, b, n, k, (rr, mc)))
            reqs.append((OP_GEMM, qt, m, k, n, rr, mc, xm.numpy(), b))
        for m in MS:
            for rr in (1, 2, 4):
                xm = x[:m].contiguous()
                cases.append(("int8", xm, b, n, k, (rr,)))
                reqs.append((OP_GEMM_I8, qt, m, k, n, rr, 0, xm.numpy(), b))
    for (act, xm, b, n, k, plan), res in zip(cases, _run(harness, CPUS[name], reqs)):
        y = _y(res, xm.shape[0], n)
        try:
            (check_matmul if act == "float32" else check_int8)(y, xm, b, qt, k, "neon")
        except AssertionError as e:
            raise AssertionError(f"{name} {act} M={xm.shape[0]} N={n} K={k} plan={plan}: {e}") from None


@pytest.mark.parametrize("name", list(CPUS))
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_int8_extreme_blocks(harness, qt, name):
    """All bytes 0x00 / 0xFF / 0x80 / 0x7F, x at +-127 after rounding: the largest integer products
    (smull pairs near the int16 limit, int32 lanes near 2^24) stay exact."""
    b, x, k = extreme_blocks(qt)
    reqs = [(OP_GEMM_I8, qt, m, k, 4, rr, 0, x[:m].numpy(), b) for m in (1, 4) for rr in (1, 4)]
    reqs += [(OP_GEMM, qt, 4, k, 4, 2, 4, x.numpy(), b)]
    res = _run(harness, CPUS[name], reqs)
    for (op, _, m, *_r), r in zip(reqs, res):
        (check_int8 if op == OP_GEMM_I8 else check_matmul)(_y(r, m, 4), x[:m], b, qt, k, "neon")


@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_dequantize_and_quantize_x_bitwise(harness, qt):
    """The NEON build's dequantize_rows (fcvt for the float16 scales) is gguf's, bitwise, any bytes
    (subnormal, inf, NaN scales); its x quantizer is quantize_activations', bitwise (inf / NaN: dx NaN)."""
    qk, qb = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(int(qt))
    raw = rng.integers(0, 256, (6, 2 * qb), dtype=np.uint8)
    raw[0, :] = 0
    if qt in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0):
        raw[1:3] = make_blocks(qt, 2, 2 * qk, seed=1)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(raw, qt)
    k = 2 * qk
    x = torch.randn(5, k) * 3
    x[1, :qk] = 0
    x[2, 5] = float("inf")
    x[3, qk + 1] = float("nan")
    reqs = [(OP_DEQUANT, qt, 0, k, 6, 0, 0, None, raw), (OP_QUANTIZE, qt, 5, k, 0, 0, 0, x.numpy(), None)]
    for name, cpu in CPUS.items():
        (rc, deq), (qx, qd) = _run(harness, cpu, reqs)
        assert rc == 0
        y = np.frombuffer(deq, dtype=np.float32).reshape(ref.shape)
        nan = np.isnan(ref)
        assert np.array_equal(np.isnan(y), nan), name
        assert np.array_equal(y.view(np.uint32)[~nan], ref.view(np.uint32)[~nan]), name
        assert qx == qk, name
        q = torch.from_numpy(np.frombuffer(qd, dtype=np.int8, count=5 * k).reshape(5, k).copy())
        d = torch.from_numpy(np.frombuffer(qd, dtype=np.float32, count=5 * (k // qk), offset=5 * k).reshape(5, -1).copy())
        s = np.frombuffer(qd, dtype=np.int16, offset=5 * k + 4 * 5 * (k // qk)).reshape(5, k // 32)
        qref, dref = G.quantize_activations(x, qt)
        assert torch.equal(q, qref) and torch.equal(torch.isnan(d), torch.isnan(dref)), name
        fin = ~torch.isnan(dref)
        assert torch.equal(d[fin], dref[fin]), name
        assert np.array_equal(s, qref.reshape(5, -1, 32).sum(-1, dtype=torch.int16).numpy()), name


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda q: q.name)
def test_same_result_for_every_thread_count(harness, qt):
    """The entry points split the output rows across the pool's threads (the harness's: one pthread a
    share); each output's order of operations does not depend on the split, so 2, 3, 5 threads give
    bitwise what 1 gives, float32 and int8, for every M's plan."""
    qk = gguf.GGML_QUANT_SIZES[qt][0]
    n, k = 29, 2 * qk
    b = make_blocks(qt, n, k, seed=5)
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(3)).numpy()
    calls = [(OP_GEMM, qt, m, k, n, *G._PLANS.get(m, G._PLAN_DEFAULT), x[:m], b) for m in MS]
    calls += [(OP_GEMM_I8, qt, m, k, n, G.INT8_ROWS, 0, x[:m], b) for m in MS]
    for cpu in CPUS.values():
        reqs = []
        for nt in (1, 2, 3, 5):
            reqs += [(OP_THREADS, 0, 0, 0, 0, nt, 0, None, None), *calls]
        res = _run(harness, cpu, reqs)
        per = len(calls) + 1
        assert all(rc == 0 for rc, _ in res)
        one = res[1:per]
        for i in range(1, 4):
            assert res[i * per + 1:(i + 1) * per] == one, f"{cpu}: {(1, 2, 3, 5)[i]} threads differ from 1"
