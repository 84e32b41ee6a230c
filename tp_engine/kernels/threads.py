"""The decode kernels' thread pool: one per process, shared by :mod:`.cpu_gemm` and :mod:`.gguf_gemm`.

A rank is a whole machine (or a NUMA / L3 domain of one), and decode streams
every weight byte from memory once per token: one thread does not reach the
memory bandwidth of a socket. So every decode-path kernel splits its N output
rows into n contiguous ranges for the n threads of this pool (``pool.c``,
compiled at first use like the kernels). The threads claim ranges from a
shared counter, so one that is slow to wake (or whose core another process
took) leaves its range to the others. Each output element is computed by one
thread in one fixed order, so results are bitwise the same for any thread
count, and ranks with different thread counts stay in lockstep.

* :func:`set_threads` / :func:`get_threads`: the pool's size, the calling
  thread included. Default ``$TP_ENGINE_THREADS``, else 1 (the launchers set
  the variable: ``tp-engine --threads``, :func:`tp_engine.launch`). Setting it
  (to any value) re-creates the workers at the next matmul, pinned within
  the affinity mask the process has then: call it again after changing the
  mask.
* Workers pin themselves, worker t to the t-th CPU of the mask (in
  ``$TP_ENGINE_CPUS`` order where the launcher gave one); the calling thread
  is worker 0 and is not pinned. ``TP_ENGINE_THREADS_PIN=0`` (or
  ``set_threads(n, pin=False)``) lets them float instead: on a machine shared
  with other busy processes a pinned worker waits for its one core.
* Between jobs the workers spin for :func:`tune`'s ``spin_us`` (default
  150 µs: the gap between a token's matmuls), then sleep; an idle rank
  costs no CPU. A matmul with under ``min_work`` bytes of weights per thread
  (default 32 KiB) uses fewer threads: waking one costs more than it saves.
* Fork: a forked child forgets the parent's workers (they are not there) and
  starts its own at its first matmul, with the same size.
* Several Python threads may call kernels at once: one of them gets the
  pool, the others run their matmul on their own thread (same results).

Where the pool cannot be built (no C compiler) the kernels run on the
calling thread and :func:`get_threads` says 1.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Any

from ..native import compile_shared

__all__ = [
    "PIN_ENV",
    "THREADS_ENV",
    "available",
    "available_cores",
    "default_threads_per_rank",
    "get_threads",
    "jobs",
    "layout_line",
    "reset_jobs",
    "run_pointer",
    "set_threads",
    "tune",
    "worker_cpus",
]

log = logging.getLogger(__name__)

THREADS_ENV = "TP_ENGINE_THREADS"
PIN_ENV = "TP_ENGINE_THREADS_PIN"  # "0": workers are not pinned
CPUS_ENV = "TP_ENGINE_CPUS"  # the rank's CPUs in the order workers should take them (tp_engine.launch.topology)
MAX_THREADS = 256  # pool.c's MAXT

_ABI = 1
_C_SOURCE = Path(__file__).with_name("pool.c")
_FLAGS = ["-O2", "-std=c11", "-pthread", "-fPIC", "-shared"]

_lock = threading.Lock()
_loaded: list = []  # [CDLL or None] once tried
_LIB: Any = None


def _parse_threads(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{what} must be a positive integer, got {text!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return n


def _env_threads() -> int:
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return 1
    try:
        return _parse_threads(text, THREADS_ENV)
    except ValueError as exc:
        log.warning("%s; the kernels run on 1 thread", exc)
        return 1


def _env_cpus() -> list[int]:
    text = os.environ.get(CPUS_ENV, "").strip()
    if not text:
        return []
    try:
        from ..launch.topology import parse_cpulist

        return parse_cpulist(text)
    except (ImportError, ValueError) as exc:
        log.warning("%s=%r ignored (%s)", CPUS_ENV, text, exc)
        return []


def _set_cpus(lib: Any, cpus: list[int]) -> None:
    arr = (ctypes.c_int * max(1, len(cpus)))(*cpus)
    lib.tp_pool_set_cpus(arr, len(cpus))


def _load() -> Any | None:
    global _LIB
    if _LIB is not None:
        return _LIB
    with _lock:
        if _loaded:
            return _loaded[0]
        lib = None
        try:
            lib = ctypes.CDLL(str(compile_shared(_C_SOURCE, _FLAGS)))
            i, i64, u64, p = ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
            for name, args, res in (
                ("tp_pool_abi", [], i), ("tp_pool_set_threads", [i], i), ("tp_pool_threads", [], i),
                ("tp_pool_started", [], i), ("tp_pool_tune", [i64, i64], None), ("tp_pool_spin_us", [], i64),
                ("tp_pool_min_work", [], i64), ("tp_pool_jobs", [i], u64), ("tp_pool_reset_jobs", [], None),
                ("tp_pool_cpu", [i], i), ("tp_pool_set_cpus", [p, i], None), ("tp_pool_set_pin", [i], None),
            ):
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, res
            if lib.tp_pool_abi() != _ABI:
                raise RuntimeError(f"ABI {lib.tp_pool_abi()} != {_ABI}")
            _set_cpus(lib, _env_cpus())
            lib.tp_pool_set_pin(int(os.environ.get(PIN_ENV, "1").strip() != "0"))
            lib.tp_pool_set_threads(_env_threads())
        except Exception as exc:  # any failure means: the kernels run on the calling thread
            log.info("kernel thread pool unavailable (%s); kernels run on one thread", exc)
            lib = None
        _loaded.append(lib)
        _LIB = lib
        return lib


def available() -> bool:
    """Whether the pool runs here (compiles it at the first call)."""
    return _load() is not None


def run_pointer() -> int | None:
    """The address of ``tp_pool_run`` for a kernel library's ``*_set_pool``; None: no pool (serial)."""
    lib = _load()
    if lib is None:
        return None
    return ctypes.cast(lib.tp_pool_run, ctypes.c_void_p).value


def get_threads() -> int:
    """Threads per matmul (the calling thread included): :func:`set_threads`'s, else ``$TP_ENGINE_THREADS``, else 1."""
    lib = _load()
    return 1 if lib is None else int(lib.tp_pool_threads())


def set_threads(n: int, *, pin: bool | None = None) -> int:
    """Use ``n`` threads per matmul from now on (1..256, the caller included); returns the size set.

    The workers are re-created at the next matmul, pinned within this
    process's affinity mask as it is then (in ``$TP_ENGINE_CPUS`` order if
    set). ``pin``: whether workers pin themselves (default: as before, at
    first ``$TP_ENGINE_THREADS_PIN`` != "0"). Without the pool (no C
    compiler) this does nothing and returns 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    lib = _load()
    if lib is None:
        return 1
    _set_cpus(lib, _env_cpus())
    if pin is not None:
        lib.tp_pool_set_pin(int(bool(pin)))
    return int(lib.tp_pool_set_threads(min(n, MAX_THREADS)))


def tune(spin_us: int | None = None, min_work: int | None = None) -> tuple[int, int]:
    """Set how long workers spin after a job (µs) and the fewest weight bytes per thread; returns both as now set.

    ``min_work=1``: split any matmul over every thread (tests of tiny shapes).
    """
    lib = _load()
    if lib is None:
        return (0, 0)
    for name, v in (("spin_us", spin_us), ("min_work", min_work)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    lib.tp_pool_tune(-1 if spin_us is None else spin_us, -1 if min_work is None else min_work)
    return int(lib.tp_pool_spin_us()), int(lib.tp_pool_min_work())


def jobs() -> list[int]:
    """Tasks each worker has run in this process (index 0: calling threads), for tests and diagnostics."""
    lib = _load()
    if lib is None:
        return []
    return [int(lib.tp_pool_jobs(t)) for t in range(get_threads())]


def reset_jobs() -> None:
    """Zero the counts :func:`jobs` reports."""
    lib = _load()
    if lib is not None:
        lib.tp_pool_reset_jobs()


def worker_cpus() -> list[int]:
    """The CPU each running worker 1.. pinned itself to (-1: not pinned); [] before the first matmul."""
    lib = _load()
    if lib is None:
        return []
    return [int(lib.tp_pool_cpu(t)) for t in range(1, max(1, int(lib.tp_pool_started())))]


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads_per_rank(ranks_on_host: int) -> int:
    """The cores this process may use divided by the ranks on this host, at least 1."""
    return max(1, available_cores() // max(1, ranks_on_host))


def layout_line(world_size: int, ranks_per_host: int, threads: int, cores: int | None = None) -> str:
    """``layout: 1 host, 2 ranks x 1 thread (2 cores)``: what rank 0 prints at start."""
    ranks_per_host = max(1, min(ranks_per_host, world_size))
    hosts = max(1, -(-world_size // ranks_per_host))
    cores = available_cores() if cores is None else cores

    def many(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    ranks = many(world_size, "rank") if hosts == 1 else f"{many(world_size, 'rank')} ({ranks_per_host} per host)"
    return f"layout: {many(hosts, 'host')}, {ranks} x {many(threads, 'thread')} ({many(cores, 'core')})"
