"""The same greedy tokens as single-process transformers through every
communication path (gloo, shared memory, MPI under mpirun), and no hangs
when a rank is killed mid-generation (torchrun and mpirun)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tp_engine
from conftest import mpirun_command, run_ranks, tiny_model

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16
PROMPT = [[5, 17, 42, 99, 3, 250, 8, 61]]
WORKER_TIMEOUT_S = 180


def _reference():
    model = tiny_model("llama", 10, 5)
    return model, model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)


def _generate_with(model, backend):
    rt = tp_engine.init(backend=backend)
    model = tp_engine.parallelize(model)
    return rt.comm.name, tp_engine.generate(model, torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.mark.parametrize("backend, expected_name", [("gloo", "torch-gloo"), ("shm", "shm"), ("auto", None)])
def test_same_tokens_through_torchrun_paths(backend, expected_name):
    model, expected = _reference()
    for rank, (name, tokens) in enumerate(run_ranks(_generate_with, 2, copy.deepcopy(model), backend)):
        if expected_name == "shm":
            assert name.startswith("shm"), name
        elif expected_name:
            assert name == expected_name
        assert torch.equal(tokens, expected), f"rank {rank} via {name}"


def _worker_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def test_same_tokens_through_mpi(tmp_path):
    pytest.importorskip("mpi4py")
    _, expected = _reference()
    cmd = mpirun_command(2) + [sys.executable, __file__, "generate", str(tmp_path)]
    proc = subprocess.run(cmd, env=_worker_env(), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in range(2):
        name, tokens = torch.load(tmp_path / f"rank{rank}.pt")
        assert name == "mpi"
        assert torch.equal(tokens, expected), f"rank {rank} via MPI"


def _killed_run(cmd):
    start = time.monotonic()
    proc = subprocess.run(cmd, env=_worker_env(), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    return proc, time.monotonic() - start


def test_killed_rank_under_torchrun_does_not_hang(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", "2", "--monitor-interval", "0.5", __file__, "die", str(tmp_path)]
    proc, elapsed = _killed_run(cmd)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert "rank      : 1" in out or "rank: 1" in out or "rank 1" in out, out[-3000:]
    assert (tmp_path / "started0").exists(), "rank 0 never got going: the test proves nothing"


def test_killed_rank_under_mpirun_does_not_hang(tmp_path):
    pytest.importorskip("mpi4py")
    proc, elapsed = _killed_run(mpirun_command(2) + [sys.executable, __file__, "die", str(tmp_path)])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert "rank 1" in out, out[-3000:]
    assert (tmp_path / "started0").exists(), "rank 0 never got going: the test proves nothing"


# ---------------------------------------------------------------- worker side


def _worker(mode: str, outdir: Path) -> None:
    torch.set_num_threads(1)
    rt = tp_engine.init()
    model = tp_engine.parallelize(tiny_model("llama", 10, 5))
    if mode == "generate":
        tokens = tp_engine.generate(model, torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
        torch.save((rt.comm.name, tokens), outdir / f"rank{rt.rank}.pt")
        return
    # mode "die": rank 1 kills itself in the middle of decoding (a streamer sees every token).
    class KillAtThirdToken:
        def __init__(self):
            self.n = 0

        def put(self, value):
            self.n += 1
            if self.n == 3:
                (outdir / f"started{rt.rank}").touch()
                if rt.rank == 1:
                    os.kill(os.getpid(), 9)

        def end(self):
            pass

    tp_engine.generate(model, torch.tensor(PROMPT), max_new_tokens=1000, min_new_tokens=1000, do_sample=False,
                       streamer=KillAtThirdToken())
    raise SystemExit("unreachable: a peer died, generation must not finish")


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
