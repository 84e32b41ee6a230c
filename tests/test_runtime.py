"""init(), device/backend choice, MPS staging (with a CPU stand-in), launch()."""
from __future__ import annotations

import os

import pytest
import torch

import tp_engine
from conftest import run_ranks
from tp_engine import distributed
from tp_engine.comm import torch_dist
from tp_engine.comm.torch_dist import Staged, needs_staging


def test_single_process_fallback_is_idempotent(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_runtime", None)
    rt = tp_engine.init()
    assert (rt.rank, rt.world_size, rt.launcher) == (0, 1, "single")
    assert rt.device == torch.device("cpu")
    assert tp_engine.init() is rt
    x = torch.arange(4.0)
    assert rt.comm.all_reduce_(x) is x and torch.equal(x, torch.arange(4.0))
    with pytest.raises(ValueError, match="already running"):
        tp_engine.init(device="meta")
    monkeypatch.setattr(distributed, "_runtime", None)


def test_backend_choice():
    assert distributed.choose_backend(torch.device("cuda", 0)) == "nccl"
    assert distributed.choose_backend(torch.device("cpu")) == "gloo"
    assert distributed.choose_backend(torch.device("mps")) == "gloo"
    assert distributed.choose_backend(torch.device("cpu"), "mpi") == "mpi"


def test_staging_rules():
    assert needs_staging("gloo", "mps")
    assert not needs_staging("gloo", "cpu")
    assert not needs_staging("nccl", "cuda")
    assert needs_staging("gloo", "cuda")


def test_staged_copies_back_only_on_success():
    original = torch.zeros(3)
    with Staged(original, enabled=True) as host:
        assert host.data_ptr() != original.data_ptr()
        host += 5
    assert torch.equal(original, torch.full((3,), 5.0))

    with pytest.raises(RuntimeError):
        with Staged(original, enabled=True) as host:
            host += 1
            raise RuntimeError("collective failed")
    assert torch.equal(original, torch.full((3,), 5.0)), "a failed collective must not write back"

    with Staged(original, enabled=False) as same:
        assert same is original


def _collectives_through_staging():
    # Stand-in for MPS: pretend gloo cannot move CPU tensors, so every
    # collective takes the staging path, and check results land in place.
    torch_dist.NATIVE_DEVICES["gloo"] = frozenset()
    rt = tp_engine.init(backend="gloo")
    assert rt.comm.name == "torch-gloo"
    r = rt.rank
    x = torch.full((4,), float(r + 1))
    same = rt.comm.all_reduce_(x)
    b = torch.full((2,), float(r))
    rt.comm.broadcast_(b, src=1)
    g = rt.comm.all_gather(torch.full((1, r + 1), float(r)), dim=1, sizes=[1, 2, 3])
    return same is x, x, b, g


def test_collectives_with_staging_stand_in():
    for is_same, x, b, g in run_ranks(_collectives_through_staging, 3):
        assert is_same
        assert torch.equal(x, torch.full((4,), 6.0))
        assert torch.equal(b, torch.ones(2))
        assert torch.equal(g, torch.tensor([[0.0, 1.0, 1.0, 2.0, 2.0, 2.0]]))


def _whoami(tag):
    rt = tp_engine.init()
    assert tp_engine.init() is rt
    return tag, rt.rank, rt.world_size, rt.launcher, int(os.environ["LOCAL_RANK"])


def test_launch_returns_results_by_rank():
    assert run_ranks(_whoami, 3, "x") == [("x", r, 3, "launch", r) for r in range(3)]


def _raise_on_rank_one():
    rt = tp_engine.init()
    if rt.rank == 1:
        raise KeyError("boom on one")
    rt.comm.barrier()  # rank 0 would wait here forever without launch's cleanup
    return rt.rank


def test_launch_reports_the_failing_rank():
    with pytest.raises(distributed.RankFailed, match=r"rank 1 failed(.|\n)*boom on one"):
        run_ranks(_raise_on_rank_one, 2)


def _die_on_rank_two():
    rt = tp_engine.init()
    if rt.rank == 2:
        os._exit(3)
    rt.comm.barrier()
    return rt.rank


def test_launch_reports_a_dead_rank():
    with pytest.raises(distributed.RankFailed, match="rank 2 exited with code 3"):
        run_ranks(_die_on_rank_two, 3)


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nprocs"):
        tp_engine.launch(_whoami, 0, "x")
    with pytest.raises(ValueError, match="fork"):
        tp_engine.launch(_whoami, 2, "x", threads_per_rank=2, start_method="fork")


def test_parallelize_refuses_unknown_architecture_and_double_sharding():
    from transformers import MambaConfig, MambaForCausalLM

    from conftest import tiny_model

    # No spec, and no attention heads for the auto-planner to split: refused, with the reason.
    with pytest.raises(ValueError, match="mamba"):
        tp_engine.parallelize(MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=50, state_size=4)),
                              comm=tp_engine.comm.SingleProcessCommunicator())
    model = tp_engine.parallelize(tiny_model("llama", 4, 2), comm=tp_engine.comm.SingleProcessCommunicator())
    with pytest.raises(ValueError, match="already sharded"):
        tp_engine.parallelize(model, comm=tp_engine.comm.SingleProcessCommunicator())


def _mismatched_shares():
    rt = tp_engine.init()
    from conftest import tiny_model

    tp_engine.parallelize(tiny_model("llama", 8, 8), shares=[1, 1] if rt.rank == 0 else [3, 1])


def test_ranks_with_different_shares_fail_together():
    with pytest.raises(distributed.RankFailed, match="planned a different split"):
        run_ranks(_mismatched_shares, 2)
