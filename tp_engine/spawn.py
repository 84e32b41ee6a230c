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
from typing import Sequence


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
) -> int:
    """Run ``python -m tp_engine *argv`` as ``nprocs`` ranks; return the exit code."""
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nprocs)
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
