"""ShmCommunicator with 2 and 4 local ranks over a gloo process group.

Each test starts its ranks as subprocesses running this file (``python
tests/test_comm_shm.py MODE OUTDIR`` with RANK/WORLD_SIZE/MASTER_* set, as
torchrun would); every rank saves its outputs, and the test process checks
them against values it computes itself. The shared-memory path sums in rank
order, so its float results must equal that rank-order sum exactly, on every
rank. Every launch has a hard deadline, so a deadlock fails instead of hanging.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
LAUNCH_TIMEOUT_S = 90  # hard limit per launch; CI must never hang
MAX_BYTES = 512 << 10  # ranks use this max_bytes; larger tensors go to gloo
HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

# -- deterministic inputs, shared by the workers and the checks ------------------------

REDUCE_CASES = [
    (0, torch.float32),
    (1, torch.float32),
    (1000, torch.float32),
    (4096, torch.float32),  # 16 KiB
    (16384, torch.float32),  # 64 KiB: two-phase in the C helper
    (100_000, torch.float32),  # 400 KB, just under MAX_BYTES
    (333, torch.float64),
    (1000, torch.int64),
    (1000, torch.int32),
    (1000, torch.bfloat16),
    (1000, torch.float16),
    (1000, torch.int8),
]
LARGE_NUMEL = 200_000  # 800 KB of float32: above MAX_BYTES, carried by gloo


def reduce_input(numel: int, dtype: torch.dtype, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(numel * 31 + rank * 7 + 1)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    return torch.randint(-100, 100, (numel,), generator=g).to(dtype)


def rank_order_sum(numel: int, dtype: torch.dtype, world: int) -> torch.Tensor:
    """What the shared-memory path must produce, bit for bit."""
    work = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.int8: torch.int64}.get(dtype, dtype)
    parts = [reduce_input(numel, dtype, r).to(work) for r in range(world)]
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    return acc.to(dtype)


def gather_cases(world: int) -> list[tuple[str, tuple[int, ...], int, list[int], torch.dtype]]:
    uneven = [(3, 1, 0, 2)[r % 4] for r in range(world)]
    return [
        ("dim0", (5, 4, 3), 0, uneven, torch.float32),
        ("dim1", (2, 5, 3), 1, uneven, torch.float32),
        ("dim-1", (2, 4, 5), -1, uneven, torch.float32),
        ("even", (2, 3), -1, [3] * world, torch.int64),
        ("bf16", (3, 7), -1, [2 + r for r in range(world)], torch.bfloat16),
        ("large", (2000, 1000), -1, [100 + 10 * r for r in range(world)], torch.float32),  # fallback
    ]


def gather_input(shape: tuple[int, ...], dim: int, size: int, dtype: torch.dtype, rank: int) -> torch.Tensor:
    shape = list(shape)
    shape[dim] = size
    g = torch.Generator().manual_seed(1000 + rank)
    return (torch.randint(-100, 100, shape, generator=g) + 1000 * rank).to(dtype)


def broadcast_input(rank: int, dtype: torch.dtype, shape: tuple[int, ...] = (6, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(77 + rank)
    return torch.randint(-50, 50, shape, generator=g).to(dtype)


# -- the worker (one rank) -----------------------------------------------------------


class _Counting:
    """Wraps the fallback communicator, counting the collectives it carries."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.rank, self.world_size = inner.name, inner.rank, inner.world_size
        self.calls = {"all_reduce_": 0, "all_gather": 0, "broadcast_": 0, "barrier": 0}

    def all_reduce_(self, t):
        self.calls["all_reduce_"] += 1
        return self.inner.all_reduce_(t)

    def all_gather(self, t, dim=-1, sizes=None):
        self.calls["all_gather"] += 1
        return self.inner.all_gather(t, dim=dim, sizes=sizes)

    def broadcast_(self, t, src=0):
        self.calls["broadcast_"] += 1
        return self.inner.broadcast_(t, src)

    def barrier(self):
        self.calls["barrier"] += 1
        return self.inner.barrier()

    def close(self):
        return self.inner.close()


def _worker(mode: str, outdir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from tp_engine.comm import shm
    from tp_engine.comm.torch_dist import TorchDistCommunicator

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    fallback = _Counting(TorchDistCommunicator())
    out: dict[str, object] = {}

    def save() -> None:
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))

    if mode == "unavailable":
        if rank == 1:  # pretend rank 1 is on another host: it cannot map the segment
            shm._attach_segment = lambda *args: None
        out["comm"] = shm.try_shm_communicator(fallback, MAX_BYTES)
        out["leftover"] = glob.glob(os.path.join(shm._shm_dir(), f"tp_engine-{os.getpid()}-*"))
        save()
        fallback.close()
        return

    if mode == "timeout":
        # TP_ENGINE_SHM_TIMEOUT=1 in the environment; rank 1 never arrives.
        comm = shm.ShmCommunicator(fallback, MAX_BYTES)
        out["timeout"] = comm.timeout
        done = os.path.join(outdir, "rank0.pt")
        if rank == 0:
            start = time.monotonic()
            try:
                comm.all_reduce_(torch.ones(16))
                out["error"] = None
            except RuntimeError as exc:
                out["error"] = str(exc)
            out["elapsed"] = time.monotonic() - start
            try:  # the communicator stays broken, it does not wait again
                comm.barrier()
                out["second"] = None
            except RuntimeError as exc:
                out["second"] = str(exc)
            save()
        else:
            deadline = time.monotonic() + 60
            while not os.path.exists(done) and time.monotonic() < deadline:
                time.sleep(0.05)
            save()
        comm.close()
        return

    native = {"native": None, "python": False}[mode]
    comm = shm.ShmCommunicator(fallback, MAX_BYTES, native=native)
    out["name"], out["native"] = comm.name, comm.native
    # The segment file (named after its creator's pid) is unlinked right after setup.
    out["leftover"] = glob.glob(os.path.join(shm._shm_dir(), f"tp_engine-{os.getpid()}-*"))
    before = dict(fallback.calls)
    for numel, dtype in REDUCE_CASES:
        t = reduce_input(numel, dtype, rank)
        assert comm.all_reduce_(t) is t
        out[f"reduce/{numel}/{dtype}"] = t
    t = reduce_input(60, torch.float32, rank).view(6, 10).t()  # non-contiguous
    comm.all_reduce_(t)
    out["reduce/strided"] = t.clone()
    for name, shape, dim, sizes, dtype in gather_cases(world):
        if name != "large":
            out[f"gather/{name}"] = comm.all_gather(gather_input(shape, dim, sizes[rank], dtype, rank), dim, sizes)
    for dtype in (torch.float32, torch.bfloat16):
        b = broadcast_input(rank, dtype).t()  # non-contiguous on purpose
        assert comm.broadcast_(b, src=world - 1) is b
        out[f"bcast/{dtype}"] = b.clone()
    comm.barrier()
    out["small_fallback_calls"] = {k: fallback.calls[k] - before[k] for k in before}

    # Above max_bytes: carried by the fallback.
    before = dict(fallback.calls)
    big = reduce_input(LARGE_NUMEL, torch.float32, rank)
    comm.all_reduce_(big)
    out["reduce/large"] = big
    name, shape, dim, sizes, dtype = gather_cases(world)[-1]
    out["gather/large"] = comm.all_gather(gather_input(shape, dim, sizes[rank], dtype, rank), dim, sizes)
    b = broadcast_input(rank, torch.float32, (500, 300))
    comm.broadcast_(b, src=0)
    out["bcast/large"] = b
    out["large_fallback_calls"] = {k: fallback.calls[k] - before[k] for k in before}
    # A burst of back-to-back small all-reduces (exercises slot reuse).
    acc = torch.zeros(64)
    for i in range(200):
        t = torch.full((64,), float(rank + i))
        comm.all_reduce_(t)
        acc += t
    out["burst"] = acc
    save()
    comm.close()


# -- launching ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, world: int, tmp_path: Path, extra_env: dict[str, str] | None = None) -> list[dict]:
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    env.update(extra_env or {})
    procs = []
    for r in range(world):
        env_r = dict(env, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), mode, str(tmp_path)],
                env=env_r,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"{mode} with {world} ranks did not finish within {LAUNCH_TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


# -- the tests ------------------------------------------------------------------------


@needs_gloo
@pytest.mark.parametrize(
    "world,mode",
    [(2, "native"), (4, "native"), (2, "python"), (4, "python")],
)
def test_shm_collectives(world: int, mode: str, tmp_path: Path) -> None:
    extra = {}
    if mode == "native" and world == 2:
        extra["TP_ENGINE_CACHE_DIR"] = str(tmp_path / "cache")  # compile from scratch, all ranks at once
    results = _launch(mode, world, tmp_path, extra)
    res0 = results[0]
    expect_native = mode == "native" and HAVE_CC
    assert res0["native"] is expect_native and res0["name"] == ("shm" if expect_native else "shm-py")
    assert all(res["leftover"] == [] for res in results)

    for key, ref in res0.items():
        if isinstance(ref, torch.Tensor):
            for r, res in enumerate(results[1:], 1):
                assert torch.equal(_bits(res[key]), _bits(ref)), f"{key}: rank {r} differs bitwise from rank 0"

    for numel, dtype in REDUCE_CASES:
        got = res0[f"reduce/{numel}/{dtype}"]
        assert got.dtype == dtype and got.shape == (numel,)
        assert torch.equal(got, rank_order_sum(numel, dtype, world)), f"all_reduce_ {numel} x {dtype}"
    strided = rank_order_sum(60, torch.float32, world).view(6, 10).t()
    assert torch.equal(res0["reduce/strided"], strided)

    for name, shape, dim, sizes, dtype in gather_cases(world):
        expected = torch.cat([gather_input(shape, dim, sizes[r], dtype, r) for r in range(world)], dim=dim)
        got = res0[f"gather/{name}"]
        assert got.dtype == dtype and torch.equal(got, expected), name
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(res0[f"bcast/{dtype}"], broadcast_input(world - 1, dtype).t())
    assert torch.equal(res0["bcast/large"], broadcast_input(0, torch.float32, (500, 300)))

    # Small collectives never touched gloo; large ones all went there.
    for r, res in enumerate(results):
        assert res["small_fallback_calls"] == {"all_reduce_": 0, "all_gather": 0, "broadcast_": 0, "barrier": 0}, r
        assert res["large_fallback_calls"] == {"all_reduce_": 1, "all_gather": 1, "broadcast_": 1, "barrier": 0}, r
    large = sum(reduce_input(LARGE_NUMEL, torch.float32, r).double() for r in range(world))
    torch.testing.assert_close(res0["reduce/large"].double(), large, rtol=1e-5, atol=1e-5)
    burst = sum(float(sum(r + i for r in range(world))) for i in range(200))
    assert torch.equal(res0["burst"], torch.full((64,), burst))


@needs_gloo
@pytest.mark.parametrize("native", [True, False])
def test_shm_timeout_names_missing_rank(native: bool, tmp_path: Path) -> None:
    extra = {"TP_ENGINE_SHM_TIMEOUT": "1"}
    if not native:
        extra["TP_ENGINE_SHM_NO_C"] = "1"
    results = _launch("timeout", 2, tmp_path, extra)
    res0 = results[0]
    assert res0["timeout"] == 1.0
    assert res0["error"] is not None and "rank 1 did not arrive" in res0["error"], res0["error"]
    assert 0.9 < res0["elapsed"] < 10, res0["elapsed"]
    assert res0["second"] == res0["error"]


@needs_gloo
def test_shm_unavailable_falls_back_on_every_rank(tmp_path: Path) -> None:
    results = _launch("unavailable", 2, tmp_path)
    assert [res["comm"] for res in results] == [None, None]
    assert all(res["leftover"] == [] for res in results)


@pytest.mark.parametrize("cc", ["false", "no-such-compiler-tp-engine"])
def test_native_build_failure_falls_back_cleanly(cc: str, tmp_path: Path, monkeypatch, caplog) -> None:
    from tp_engine.comm import shm

    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("TP_ENGINE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TP_ENGINE_SHM_NO_C", raising=False)
    monkeypatch.setattr(shm, "_native", [])  # forget this process's earlier result
    assert shm.load_native() is None
    assert "pure-Python" in caplog.text
    assert not list(tmp_path.glob("*.so"))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
