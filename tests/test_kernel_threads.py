"""tp_engine.kernels.threads: the kernels split their output rows over the pool, bitwise as on one thread.

Every decode-path kernel (cpu_gemm float32 / int8 / int4; gguf_gemm every
format, float32 and int8 activations, AVX2 and portable builds; the prefill
path's dequantize_rows) must give torch.equal results for 1, 2, 3 and 4
threads (more threads than this machine's 2 cores is fine: only slower).
Shapes put thread boundaries everywhere: odd N (1, 7, 257) leave each thread
a different number of rows left over after its 4 row streams, and N = 7 on 4
threads gives ranges of 1 and 2 rows (fewer streams than the plan). The
pool's minimum work per thread is set to 1 byte so that even these tiny
matmuls split.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import threading

import pytest
import torch

from tp_engine.kernels import cpu_gemm, threads
from tp_engine.kernels import gguf_gemm as G
from tp_engine.kernels import reference as ref

pytestmark = pytest.mark.skipif(not threads.available(), reason="no kernel thread pool here (no C compiler)")

THREADS = (1, 2, 3, 4)
MS = (1, 2, 3, 16)  # 2: the (4, 2) plan, whose left-over rows once took the other summation mode
NS = (1, 7, 257)
PLANS = [(rr, mc) for rr in (1, 2, 4) for mc in range(1, 9)]


@pytest.fixture(autouse=True)
def pool():
    """Split every matmul (min_work 1 byte); restore the pool afterwards."""
    before, (spin, work) = threads.get_threads(), threads.tune()
    threads.tune(min_work=1)
    yield
    threads.tune(spin_us=spin, min_work=work)
    threads.set_threads(before)


def _same_for_every_thread_count(run, what: str) -> None:
    threads.set_threads(1)
    want = run()
    for t in THREADS[1:]:
        threads.set_threads(t)
        got = run()
        assert torch.equal(got, want), f"{what}: {t} threads differ from 1 (max |diff| {(got - want).abs().max()})"


# ------------------------------------------------------------------ cpu_gemm

native = pytest.mark.skipif(not cpu_gemm.available(), reason="cpu_gemm kernels unavailable (no cc / AVX2 / FMA)")


@native
@pytest.mark.parametrize("kind", ["f32", "int8", "int4"])
def test_cpu_gemm_bitwise_for_any_thread_count(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    k = 96 if kind == "int4" else 75  # int4: 3 groups of 32; the others: K % 8 != 0
    for n in NS:
        w = torch.randn(n, k, generator=g)
        bias = torch.randn(n, generator=g)
        if kind == "int8":
            prepared = cpu_gemm.Int8Weight.from_canonical(*ref.quantize_int8(w))
        elif kind == "int4":
            packed, scale, offset = ref.quantize_int4(w, 32)
            prepared = cpu_gemm.Int4Weight.from_canonical(packed, scale, offset, 32)
        for m in MS:
            x = torch.randn(m, k, generator=g)
            # int4's accumulators depend on the plan: every plan must be thread-count independent
            for plan in PLANS if kind == "int4" else [None, (4, 3), (1, 8)]:
                if kind == "f32":
                    def run(x=x, w=w, plan=plan):
                        return cpu_gemm.linear_f32(x, w, bias, plan=plan)
                elif kind == "int8":
                    def run(x=x, p=prepared, plan=plan):
                        return cpu_gemm.linear_int8(x, p, bias, plan=plan)
                else:
                    def run(x=x, p=prepared, plan=plan):
                        return cpu_gemm.linear_int4(x, p, bias, plan=plan)
                _same_for_every_thread_count(run, f"{kind} M={m} N={n} plan={plan}")


# ------------------------------------------------------------------ gguf_gemm

GGUF_KERNELS = [k for k in ("avx512", "avx2", "portable") if G._lib(k) is not None]


def _blocks(qt: int, n: int, k: int, seed: int) -> torch.Tensor:
    """Random valid blocks (any bytes are a valid block once the float16 scales are finite and small)."""
    qk, qb = G.block_shape(qt)
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, k // qk, qb), dtype=torch.uint8, generator=g)
    at = {12: [0, 2], 13: [0, 2], 14: [208]}.get(qt, [0, 2] if qt == 3 else [0])
    for a in at:
        scale = (torch.rand(n, k // qk, generator=g) * 0.04 - 0.02).to(torch.float16)
        raw[..., a:a + 2] = scale.view(torch.uint8).reshape(n, k // qk, 2)
    return raw.reshape(n, -1).contiguous()


@pytest.mark.skipif(not GGUF_KERNELS, reason="no compiled gguf kernels here")
@pytest.mark.parametrize("kernel", GGUF_KERNELS)
@pytest.mark.parametrize("activations", ["float32", "int8"])
@pytest.mark.parametrize("qt", sorted(G.SUPPORTED), ids=lambda q: G._NAMES[q])
def test_gguf_bitwise_for_any_thread_count(qt: int, activations: str, kernel: str) -> None:
    qk = G.block_shape(qt)[0]
    k = 2 * qk
    g = torch.Generator().manual_seed(qt)
    for n in NS:
        b = _blocks(qt, n, k, seed=n)
        for m in MS:
            x = torch.randn(m, k, generator=g)
            _same_for_every_thread_count(
                lambda x=x, b=b: G.gguf_matmul(x, b, qt, k, kernel=kernel, activations=activations),
                f"{kernel} {G._NAMES[qt]} {activations} M={m} N={n}",
            )


@pytest.mark.skipif(not GGUF_KERNELS, reason="no compiled gguf kernels here")
@pytest.mark.parametrize("qt", sorted(G.SUPPORTED), ids=lambda q: G._NAMES[q])
def test_dequantize_rows_and_prefill_bitwise_for_any_thread_count(qt: int) -> None:
    qk = G.block_shape(qt)[0]
    b = _blocks(qt, 257, 2 * qk, seed=3)
    _same_for_every_thread_count(lambda: G.dequantize_rows(b, qt, 2 * qk, kernel=GGUF_KERNELS[-1]), "dequantize_rows")
    x = torch.randn(G.DEQUANT_MIN_ROWS, 2 * qk, generator=torch.Generator().manual_seed(0))
    for kernel in ("avx512", "avx2"):  # M >= DEQUANT_MIN_ROWS: dequantize bands, then torch's matmul
        if kernel in GGUF_KERNELS:
            for act in ("float32", "int8"):  # int8: the int8 kernels at any M (INT8_PREFILL_KERNELS)
                _same_for_every_thread_count(lambda k=kernel, a=act: G.gguf_matmul(x, b, qt, 2 * qk, kernel=k, activations=a),
                                             f"{kernel} {act} prefill")


# ------------------------------------------------------------------ the pool itself


def _one_matmul() -> torch.Tensor:
    w = torch.randn(301, 512, generator=torch.Generator().manual_seed(5))
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(6))
    if cpu_gemm.available():
        return cpu_gemm.linear_f32(x, w)
    b = _blocks(8, 301, 512, seed=5)  # Q8_0
    return G.gguf_matmul(x, b, 8, 512, kernel=GGUF_KERNELS[-1])


@pytest.mark.skipif(not (cpu_gemm.available() or GGUF_KERNELS), reason="no compiled kernels here")
def test_threads_really_run_and_pin_inside_the_mask() -> None:
    assert threads.set_threads(3) == threads.get_threads() == 3
    threads.reset_jobs()
    calls = 0
    while calls < 500 and not all(threads.jobs()[1:]):  # a worker whose core is busy may leave its task to others
        _one_matmul()
        calls += 1
    jobs = threads.jobs()
    assert sum(jobs) == 3 * calls and all(jobs[1:]), jobs  # 3 tasks a call, and both workers ran some
    cpus = threads.worker_cpus()
    assert len(cpus) == 2
    if hasattr(os, "sched_getaffinity"):
        assert set(cpus) <= os.sched_getaffinity(0)
    # a tiny matmul stays on the calling thread (the default minimum work per thread)
    threads.tune(min_work=1 << 20)
    threads.reset_jobs()
    _one_matmul()
    assert threads.jobs() == [1, 0, 0]
    with pytest.raises(ValueError):
        threads.set_threads(0)


def _child(q) -> None:
    threads.tune(min_work=1)
    threads.reset_jobs()
    y = _one_matmul()
    q.put((pickle.dumps(y), threads.jobs()))  # plain pickle: torch's queue reducers share fds that die with the child


@pytest.mark.skipif(not (cpu_gemm.available() or GGUF_KERNELS), reason="no compiled kernels here")
def test_forked_child_starts_its_own_pool() -> None:
    threads.set_threads(2)
    want = _one_matmul()  # the parent's workers exist now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,), daemon=True)
    p.start()
    try:
        y, jobs = q.get(timeout=30)
        y = pickle.loads(y)  # a child using the parent's (absent) workers would hang here
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0
    assert torch.equal(y, want) and sum(jobs) == 2  # the child's own pool ran the call's 2 tasks
    assert torch.equal(_one_matmul(), want)  # and the parent's pool still works


@pytest.mark.skipif(not (cpu_gemm.available() or GGUF_KERNELS), reason="no compiled kernels here")
def test_concurrent_callers_get_the_same_bits() -> None:
    """Python threads calling at once: one gets the pool, the others run serially; nothing hangs or mixes."""
    threads.set_threads(3)
    want = _one_matmul()
    bad: list[str] = []

    def caller() -> None:
        for _ in range(200):
            if not torch.equal(_one_matmul(), want):
                bad.append("differs")

    workers = [threading.Thread(target=caller) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers) and not bad


def test_cli_rejects_bad_thread_counts() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "tp_engine", "generate", "--threads", "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--threads must be at least 1" in proc.stderr, proc.stderr[-2000:]


def test_layout_line() -> None:
    assert threads.layout_line(2, 2, 1, cores=2) == "layout: 1 host, 2 ranks x 1 thread (2 cores)"
    assert threads.layout_line(4, 2, 8, cores=16) == "layout: 2 hosts, 4 ranks (2 per host) x 8 threads (16 cores)"
    assert threads.default_threads_per_rank(10**6) == 1
