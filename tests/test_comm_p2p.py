"""Point-to-point channels and sub-groups on every launcher: thread ranks, ``launch`` (torch.distributed
with the shared-memory path), and ``mpirun`` (mpi4py).

Each world runs the same exchange (:func:`exchange`): a ring of sends, a burst of ``isend``s received in
order, an ``irecv`` posted before its send, and a partition into two sub-groups whose all-reduce sums
only the members. The expected values are computed here from the ranks, not from any rank's output.
Under mpirun the ranks also run a 2-stage pipeline (``tests/test_pipeline.py`` covers threads and gloo),
whose greedy tokens must be transformers'.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as an mpirun worker from a checkout
    sys.path.insert(0, str(ROOT))

from tp_engine.comm.groups import p2p_of, partition, subgroup  # noqa: E402
from tp_engine.comm.threads import PeerFailed, run_threads  # noqa: E402

BURST = 5


def exchange(comm) -> dict:
    """What every launcher's ranks run; returns what this rank received and summed."""
    p2p = p2p_of(comm)
    r, n = comm.rank, comm.world_size
    nxt, prv = (r + 1) % n, (r - 1) % n
    # A ring: even ranks send first, odd ranks receive first (blocking sends may wait for the receiver).
    got = torch.empty(3)
    if r % 2 == 0:
        p2p.send(torch.full((3,), float(r)), nxt)
        p2p.recv(got, prv)
    else:
        p2p.recv(got, prv)
        p2p.send(torch.full((3,), float(r)), nxt)
    # A burst of isends arrives in order; an irecv is posted before its message is sent.
    burst = []
    if r == 0:
        handles = [p2p.isend(torch.tensor([i, 10 * i], dtype=torch.int64), 1) for i in range(BURST)]
        for h in handles:
            h.wait()
        late = torch.empty(2, 2, dtype=torch.float64)
        h = p2p.irecv(late, 1)
        h.wait()
        assert h.is_completed()
        burst = late.flatten().tolist()
    elif r == 1:
        for _ in range(BURST):
            t = torch.empty(2, dtype=torch.int64)
            p2p.recv(t, 0)
            burst.append(t.tolist())
        p2p.send(torch.arange(4, dtype=torch.float64).view(2, 2) + 0.5, 0)
    sub = partition(comm, sub_groups(n))
    x = torch.tensor([float(r + 1)])
    sub.all_reduce_(x)
    lone = subgroup(comm, [0])
    return {"ring": got.tolist(), "burst": burst, "sub_sum": x.item(), "sub_rank": sub.rank,
            "sub_world": sub.world_size, "lone": None if lone is None else lone.world_size}


def sub_groups(n: int) -> list[list[int]]:
    """Even and odd ranks, the odd ones listed backwards; with two ranks, both in reverse order."""
    if n == 2:
        return [[1, 0]]
    return [list(range(0, n, 2)), list(range(n - 1 if n % 2 == 0 else n - 2, 0, -2))]


def expected(n: int) -> list[dict]:
    groups = sub_groups(n)
    out = []
    for r in range(n):
        g = next(g for g in groups if r in g)
        burst = [[i, 10 * i] for i in range(BURST)] if r == 1 else [0.5, 1.5, 2.5, 3.5] if r == 0 else []
        out.append({"ring": [float((r - 1) % n)] * 3, "burst": burst, "sub_sum": float(sum(x + 1 for x in g)),
                    "sub_rank": g.index(r), "sub_world": len(g), "lone": 1 if r == 0 else None})
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_threads(world):
    assert run_threads(exchange, world, timeout=60) == expected(world)


def test_threads_recv_from_a_failed_peer_fails_fast():
    released = []

    def fn(comm):
        if comm.rank == 1:
            time.sleep(0.2)  # rank 0 is waiting in recv by now
            raise RuntimeError("rank 1 is gone")
        try:
            p2p_of(comm).recv(torch.empty(1), 1)
        except PeerFailed as e:
            released.append(str(e))
            raise

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 is gone"):
        run_threads(fn, 2, timeout=30)
    assert time.monotonic() - start < 5
    assert len(released) == 1 and "rank 1 raised RuntimeError" in released[0]


def test_threads_recv_wrong_shape_and_bad_peers():
    def fn(comm):
        p2p = p2p_of(comm)
        if comm.rank == 0:
            with pytest.raises(ValueError, match="outside a group of 2"):
                p2p.send(torch.ones(1), 2)
            with pytest.raises(ValueError, match="itself"):
                p2p.send(torch.ones(1), 0)
            p2p.send(torch.ones(3), 1)
        else:
            p2p.recv(torch.empty(4), 0)

    with pytest.raises(ValueError, match=r"rank 0 sent \(3,\).*expected \(4,\)"):
        run_threads(fn, 2, timeout=30)


def test_partition_rejects_bad_groups():
    def fn(comm):
        with pytest.raises(ValueError, match="more than one group"):
            partition(comm, [[0, 1], [1]])
        with pytest.raises(ValueError, match="outside a world of 2"):
            partition(comm, [[0, 2]])
        with pytest.raises(ValueError, match="empty"):
            partition(comm, [[0, 1], []])
        return True

    assert run_threads(fn, 2, timeout=30) == [True, True]


def _launched() -> dict:
    import tp_engine

    return exchange(tp_engine.init().comm)


def test_launch_torch_distributed():
    from conftest import run_ranks

    assert run_ranks(_launched, 3) == expected(3)


def test_mpirun(tmp_path):
    from conftest import mpirun_command

    pytest.importorskip("mpi4py")
    cmd = mpirun_command(2) + [sys.executable, __file__, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["exchange"] for g in got] == expected(2)
    # A 2-stage pipeline over MPI sends decodes what transformers decodes.
    from test_pipeline import reference

    ref = reference("llama", 3)["tokens"]
    assert all(g["pipeline"] == ref for g in got)


if __name__ == "__main__":  # an mpirun worker
    import tp_engine

    torch.set_num_threads(1)
    rt = tp_engine.init()
    assert rt.comm.name == "mpi", rt.comm.name
    result = {"exchange": exchange(rt.comm)}
    sys.path.insert(0, str(Path(__file__).parent))
    from test_pipeline import NEW, PROMPTS, build

    model = tp_engine.parallelize(build("llama", 3), comm=rt.comm, pp=2)
    result["pipeline"] = model.tp_engine_pipeline.generate(PROMPTS, NEW)
    Path(sys.argv[1], f"rank{rt.rank}.json").write_text(json.dumps(result))
