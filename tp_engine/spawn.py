"""Start N local ranks of a command, the way torchrun would (``--nproc N``).

Rank 0 owns the terminal (stdin and stdout); every rank's stderr reaches
this terminal prefixed with its rank, so an error anywhere is seen here. If
a rank fails, the others are stopped and its exit code is returned (a rank
killed by a signal is named here). SIGTERM to the launcher stops every rank
(SIGTERM, then SIGKILL after 5 s), as Ctrl-C does.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(stream, rank: int, out) -> None:
    prefix = f"[rank {rank}] " if rank else ""
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode(errors="replace"))
        out.flush()
    stream.close()


class _Terminated(Exception):
    """SIGTERM reached the launcher: stop the ranks as for Ctrl-C (they would be orphaned otherwise)."""


def _terminated(signum, frame) -> None:
    raise _Terminated()


def run_local_ranks(
    argv: Sequence[str],
    nprocs: int,
    threads_per_rank: int | None = None,
    grace_s: float = 3.0,
    rank_env: Sequence[Mapping[str, str]] | None = None,
) -> int:
    """Run ``python -m tp_engine *argv`` as ``nprocs`` ranks; return the exit code.

    ``rank_env[r]``: variables for rank r only (its ``TP_ENGINE_CPUS`` and thread counts from
    :func:`tp_engine.launch.topology.plan_ranks`), over the shared ones.
    ``threads_per_rank`` (default: the cores this process may use divided by
    ``nprocs``, at least 1) reaches each rank as ``TP_ENGINE_THREADS`` (the
    kernels' thread pool) and ``OMP_NUM_THREADS`` (torch's).
    """
    from .kernels.threads import THREADS_ENV, default_threads_per_rank

    port = free_port()
    threads = threads_per_rank or default_threads_per_rank(nprocs)
    procs: list[subprocess.Popen] = []
    forwarders = []
    for rank in range(nprocs):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(threads),
            TP_ENGINE_LAUNCHER="tp-engine",
        )
        env[THREADS_ENV] = str(threads)
        if rank_env is not None:
            env.update(rank_env[rank])
        if env[THREADS_ENV] != "1":
            # GNU OpenMP's threads spin after every torch op by default, on the
            # cores the kernel pool's workers need for the next matmul (measured
            # on 2 busy cores, Qwen2.5-1.5B Q4_K_M decode: 0.9 tok/s spinning vs
            # 3.5-5.5 passive); it must be set before torch loads, so here
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tp_engine", *argv],
            env=env,
            stdin=None if rank == 0 else subprocess.DEVNULL,
            stdout=None if rank == 0 else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        t = threading.Thread(target=_forward, args=(proc.stderr, rank, sys.stderr), daemon=True)
        t.start()
        forwarders.append(t)

    code = 0
    stop_on_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if stop_on_sigterm else None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                if code < 0:  # killed by a signal: it could not say so itself
                    try:
                        name = signal.Signals(-code).name
                    except ValueError:
                        name = f"signal {-code}"
                    print(f"tp-engine: rank {rank} was killed by {name}; stopping the other ranks", file=sys.stderr, flush=True)
                # Let the others print their own view, then stop them.
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.05)
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        code = 130
    except _Terminated:
        code = 143
    finally:
        if stop_on_sigterm:
            signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in forwarders:
            t.join(timeout=2)
    return code
