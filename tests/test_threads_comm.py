"""The thread communicator: collectives, uneven gathers, failure and timeout handling."""
from __future__ import annotations

import contextvars
import threading
import time

import pytest
import torch

from tp_engine.comm.base import Communicator
from tp_engine.comm.threads import PeerFailed, ThreadGroup, run_threads
from tp_engine.layers import ColumnParallelLinear, RowParallelLinear


def test_implements_the_protocol():
    group = ThreadGroup(3)
    for rank in range(3):
        comm = group.comm(rank)
        assert isinstance(comm, Communicator)
        assert (comm.rank, comm.world_size, comm.name) == (rank, 3, "threads")
    with pytest.raises(ValueError, match="outside"):
        group.comm(3)
    with pytest.raises(ValueError, match="positive"):
        ThreadGroup(0)


def test_all_reduce_sums_in_rank_order_with_identical_bits():
    # float32 addition is not associative: 1e8 + 1 rounds back to 1e8, so the
    # order of the sum is visible in the result.
    values = [torch.tensor([1e8, 1.0, 3.0]), torch.tensor([1.0, -1e8, 0.1]), torch.tensor([-1e8, 1e8, 0.7])]
    expected = values[0].clone()
    for v in values[1:]:
        expected += v

    def fn(comm):
        t = values[comm.rank].clone()
        out = comm.all_reduce_(t)
        assert out is t  # in place
        return t

    results = run_threads(fn, 3, timeout=30)
    for r in results:
        assert torch.equal(r, expected)  # bitwise, not allclose


def test_all_reduce_many_rounds_no_races():
    # Back-to-back collectives where each rank modifies its tensor right after:
    # a missing barrier would let a fast rank corrupt a slow rank's sum.
    def fn(comm):
        acc = []
        for step in range(200):
            t = torch.full((64,), float(comm.rank + step))
            comm.all_reduce_(t)
            acc.append(t[0].item())
            t.fill_(-1e9)  # scribble over the posted tensor
        return acc

    results = run_threads(fn, 3, timeout=60)
    want = [float(3 * step + 3) for step in range(200)]
    assert all(r == want for r in results)


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_all_gather_uneven_sizes(dim):
    sizes = [3, 1, 2]
    full = torch.arange(6 * 4 * 6, dtype=torch.float32).reshape(6, 4, 6)
    d = dim % 3
    extent = full.shape[d]
    # Carve the full tensor into uneven pieces along d (pad sizes to the extent).
    cuts = [round(extent * s / sum(sizes)) for s in sizes]
    cuts[-1] = extent - sum(cuts[:-1])
    starts = [sum(cuts[:r]) for r in range(3)]

    def fn(comm):
        mine = full.narrow(d, starts[comm.rank], cuts[comm.rank]).clone()
        return comm.all_gather(mine, dim=dim, sizes=cuts)

    for out in run_threads(fn, 3, timeout=30):
        assert torch.equal(out, full)


def test_all_gather_checks_sizes():
    def fn(comm):
        return comm.all_gather(torch.zeros(2, 3), dim=1, sizes=[3, 2])  # rank 1 holds 3, not 2

    with pytest.raises(ValueError, match="sizes says"):
        run_threads(fn, 2, timeout=30)


def test_broadcast_and_barrier():
    def fn(comm):
        t = torch.full((5,), float(comm.rank))
        comm.broadcast_(t, src=2)
        comm.barrier()
        return t

    for out in run_threads(fn, 3, timeout=30):
        assert torch.equal(out, torch.full((5,), 2.0))


def test_mismatched_shapes_fail_on_every_rank():
    def fn(comm):
        return comm.all_reduce_(torch.zeros(2 + comm.rank))

    with pytest.raises(ValueError, match="posted"):
        run_threads(fn, 2, timeout=30)


def test_exception_in_one_rank_releases_the_others():
    # Ranks 0 and 2 wait in an all-reduce that rank 1 never joins; the error
    # must surface quickly (not after the 300 s default timeout), with its type.
    arrived = threading.Event()

    def fn(comm):
        if comm.rank == 1:
            arrived.wait(5)
            raise KeyError("boom on rank 1")
        arrived.set()
        comm.all_reduce_(torch.ones(4))
        return "unreachable"

    start = time.monotonic()
    with pytest.raises(KeyError, match="boom on rank 1") as info:
        run_threads(fn, 3)
    assert time.monotonic() - start < 20
    assert any("rank 1" in note for note in getattr(info.value, "__notes__", []))


def test_later_collectives_fail_fast_after_a_failure():
    group = ThreadGroup(2, timeout=60)
    group.abort("rank 1 died")
    with pytest.raises(PeerFailed, match="rank 1 died"):
        group.comm(0).all_reduce_(torch.ones(1))
    with pytest.raises(PeerFailed):
        group.comm(0).barrier()


def test_missing_rank_times_out_instead_of_hanging():
    def fn(comm):
        if comm.rank == 0:
            comm.barrier()  # rank 1 never comes
        return comm.rank

    start = time.monotonic()
    with pytest.raises(PeerFailed, match="did not reach barrier"):
        run_threads(fn, 2, barrier_timeout=0.5)
    assert time.monotonic() - start < 20


def test_run_threads_timeout_on_a_stuck_rank():
    stop = threading.Event()

    def fn(comm):
        if comm.rank == 1:
            stop.wait(30)  # stuck outside any collective
        return comm.rank

    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"\[1\]"):
            run_threads(fn, 2, timeout=0.5)
    finally:
        stop.set()
    assert time.monotonic() - start < 10


def test_close_and_world_of_one():
    [out] = run_threads(lambda comm: (comm.all_reduce_(torch.ones(2)), comm.all_gather(torch.ones(1, 2))), 1)
    assert torch.equal(out[0], torch.ones(2)) and torch.equal(out[1], torch.ones(1, 2))
    comm = ThreadGroup(1).comm(0)
    comm.close()
    with pytest.raises(RuntimeError, match="after close"):
        comm.all_reduce_(torch.ones(1))


def test_ranks_see_the_callers_context():
    var = contextvars.ContextVar("v", default="unset")
    token = var.set("caller")
    try:
        assert run_threads(lambda comm: var.get(), 3, timeout=30) == ["caller"] * 3
    finally:
        var.reset(token)


def test_parallel_linears_on_threads_match_one_linear():
    # The communicator carries the real layers: column then row parallel = the MLP.
    torch.manual_seed(0)
    up, down = torch.nn.Linear(12, 10), torch.nn.Linear(10, 12)
    x = torch.randn(3, 12)
    expected = down(torch.relu(up(x)))
    cols = [(0, 4), (4, 7), (7, 10)]

    def fn(comm):
        a, b = cols[comm.rank]
        col = ColumnParallelLinear(12, [(a, b)], comm)
        row = RowParallelLinear([(a, b)], 12, comm)
        with torch.no_grad():
            col.weight.copy_(up.weight[a:b]), col.bias.copy_(up.bias[a:b])
            row.weight.copy_(down.weight[:, a:b]), row.bias.copy_(down.bias)
            return row(torch.relu(col(x)))

    for out in run_threads(fn, 3, timeout=30):
        assert (out - expected).abs().max().item() < 1e-5
