"""Who am I, how many are we, where do tensors live, and how do we talk.

``init()`` reads the launcher's environment (torchrun today; mpirun through
``tp_engine.comm``), chooses the device and backend, and returns a
``Runtime``. ``launch()`` starts local ranks from Python for tests and
notebooks.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .comm.base import Communicator, SingleProcessCommunicator
from .comm.hierarchical import describe, mpi_hierarchical, torch_hierarchical
from .comm.host_identity import detect_hosts
from .comm.mpi import MPICommunicator, mpi_world_from_env
from .comm.shm import ShmCommunicator, try_shm_communicator
from .comm.torch_dist import TorchDistCommunicator
from .comm.watchdog import Watchdog
from .kernels.threads import THREADS_ENV, default_threads_per_rank
from .kernels.threads import set_threads as set_kernel_threads
from .launch.interface import ensure_gloo_interface, host_addresses, rendezvous_source

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Runtime:
    """This process's place in the tensor-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    comm: Communicator
    launcher: str  # "single", "torchrun", "mpirun" or "launch"
    watchdog: Watchdog | None = None  # heartbeats to the peers (TP_ENGINE_PEER_TIMEOUT), when running

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_runtime: Runtime | None = None


def current() -> Runtime | None:
    """The runtime set up by ``init()``, or None before it."""
    return _runtime


def choose_device(local_rank: int, requested: str | torch.device | None = None) -> torch.device:
    """CUDA (one GPU per local rank) if present, else MPS, else CPU."""
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_backend(device: torch.device, requested: str | None = None) -> str:
    """NCCL for CUDA; gloo for CPU and for MPS (staged through host memory)."""
    if requested:
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def torchrun_world_from_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when torchrun-style variables are set."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is None or world is None:
        return None
    local = _env_int("LOCAL_RANK")
    return rank, world, rank if local is None else local


def timeout_seconds() -> float:
    """How long a collective may wait for a silent peer (TP_ENGINE_TIMEOUT)."""
    return float(os.environ.get("TP_ENGINE_TIMEOUT", DEFAULT_TIMEOUT_S))


BACKENDS = ("auto", "gloo", "nccl", "mpi", "shm")


def _resolve_backend(backend: str | None) -> str:
    choice = (backend or os.environ.get("TP_ENGINE_BACKEND") or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r}; choose one of {', '.join(BACKENDS)}")
    return choice


def init(backend: str | None = None, device: str | torch.device | None = None) -> Runtime:
    """Join the tensor-parallel group described by the environment.

    Launchers: torchrun-style variables (``RANK``, ``WORLD_SIZE``, ...), or
    Open MPI / PMI variables under ``mpirun``; without either, a world of
    one process. ``backend`` (or ``TP_ENGINE_BACKEND``): ``auto`` picks MPI
    through mpi4py under mpirun on CPU, the shared-memory path under
    torchrun when all ranks share a host, NCCL on CUDA, gloo otherwise.
    Idempotent: later calls return the same Runtime. With gloo and no
    ``GLOO_SOCKET_IFNAME``, the interface that reaches ``MASTER_ADDR`` is
    used; across ranks a heartbeat watchdog (``TP_ENGINE_PEER_TIMEOUT``)
    stops this rank, naming the peer, when one dies or falls silent.
    """
    global _runtime
    if _runtime is not None:
        if device is not None and torch.device(device) != _runtime.device:
            raise ValueError(f"tp_engine.init: already running on {_runtime.device}, not {device}")
        return _runtime
    choice = _resolve_backend(backend)
    world = torchrun_world_from_env()
    launcher = os.environ.get("TP_ENGINE_LAUNCHER", "torchrun")
    if world is None:
        world = mpi_world_from_env()
        launcher = "mpirun"
    if world is None or (world[1] == 1 and not dist.is_initialized()):
        local_rank = 0 if world is None else world[2]
        _runtime = Runtime(0, 1, local_rank, choose_device(local_rank, device), SingleProcessCommunicator(), "single")
        return _runtime

    rank, world_size, local_rank = world
    dev = choose_device(local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launcher == "mpirun":
        comm = _mpirun_communicator(choice, dev, rank, world_size)
    else:
        comm = _torchrun_communicator(choice, dev, rank, world_size)
    _runtime = Runtime(rank, world_size, local_rank, dev, comm, launcher, _start_watchdog(comm, dev))
    return _runtime


def _start_watchdog(comm: Communicator, dev: torch.device) -> Watchdog | None:
    """Heartbeats to every peer, so a lost or stopped host ends the job in seconds (collective)."""
    watchdog = Watchdog(comm, device=dev, addresses=host_addresses(), primary=rendezvous_source()).start()
    return watchdog if watchdog.active else None


def _init_torch_distributed(torch_backend: str, dev: torch.device, rank: int, world_size: int) -> None:
    if dist.is_initialized():
        return
    if torch_backend == "mpi" and not dist.is_mpi_available():
        raise ValueError(
            "this torch build has no MPI backend; launch with mpirun to use MPI through mpi4py"
        )
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"tp_engine.init: RANK/WORLD_SIZE are set but {var} is not")
    if torch_backend == "gloo":
        ensure_gloo_interface(rank)  # a host name that does not resolve would leave gloo on loopback
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda" and torch_backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(
        backend=torch_backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_seconds()),
        **kwargs,
    )


def _torchrun_communicator(choice: str, dev: torch.device, rank: int, world_size: int) -> Communicator:
    if choice in ("auto", "shm"):
        _init_torch_distributed(choose_backend(dev), dev, rank, world_size)
        fallback = TorchDistCommunicator()
        if dev.type != "cpu":
            if choice == "shm":
                raise ValueError(f"the shm backend moves CPU tensors only, not {dev.type}")
            return fallback
        if choice == "shm":
            return ShmCommunicator(fallback)
        layout = detect_hosts(fallback)
        if layout.n_hosts == 1:
            return try_shm_communicator(fallback) or fallback
        # Several hosts: shared memory inside each, lean TCP between host leaders
        # (gloo's all-reduce across hosts costs ~50 network round trips).
        address = rendezvous_source() or "127.0.0.1"  # None: MASTER_ADDR is loopback, so one machine
        return _announce(torch_hierarchical(fallback, layout, address=address, timeout=timeout_seconds()))
    _init_torch_distributed(choice, dev, rank, world_size)
    return TorchDistCommunicator()


def _announce(comm: Communicator) -> Communicator:
    """Say once (rank 0, stderr) which path carries collectives across hosts."""
    if comm.rank == 0:
        print(f"tp-engine: collectives via {describe(comm)}", file=sys.stderr, flush=True)
    return comm


def _mpirun_communicator(choice: str, dev: torch.device, rank: int, world_size: int) -> Communicator:
    try:
        mpi = MPICommunicator()  # imports mpi4py
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError(f"launched by mpirun but mpi4py is unavailable ({exc}); pip install mpi4py") from None
    if choice == "mpi" or (choice == "auto" and dev.type == "cpu"):
        layout = detect_hosts(mpi) if choice == "auto" else None
        if layout is not None and layout.n_hosts > 1 and layout.max_local > 1:
            return _announce(mpi_hierarchical(mpi, layout))
        return mpi
    # torch.distributed under mpirun: rendezvous at rank 0's address, told over MPI.
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        addr = mpi.comm.bcast((socket.gethostbyname(socket.gethostname()), _free_port()) if rank == 0 else None, root=0)
        os.environ.setdefault("MASTER_ADDR", addr[0])
        os.environ.setdefault("MASTER_PORT", str(addr[1]))
    return _torchrun_communicator(choice, dev, rank, world_size)


def shutdown() -> None:
    """Leave the group (tests and ``launch`` call this; scripts may too)."""
    global _runtime
    if _runtime is not None:
        if _runtime.watchdog is not None:
            _runtime.watchdog.stop()  # a goodbye first: peers still working must not take this exit for a loss
        _runtime.comm.close()
    elif dist.is_initialized():
        dist.destroy_process_group()
    _runtime = None


# ---------------------------------------------------------------- launch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Threads that only ever sit parked (a receive of an abandoned draft link, tqdm's monitor's sleep)
# hold no library lock a forked child could inherit.
_PARKED_THREADS = ("tp-draft-link-", "tqdm_monitor")


def _only_thread(wait: float = 2.0) -> bool:
    """Whether the calling thread is this process's only working Python thread, waiting up to ``wait``
    seconds for others to end (threads of a finished call, e.g. thread ranks, are usually just returning)."""
    end = time.monotonic() + wait
    me = threading.current_thread()
    while any(t is not me and not t.name.startswith(_PARKED_THREADS) for t in threading.enumerate()):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _rank_main(fn, args, rank, nprocs, port, threads, results, placement=None) -> None:
    global _runtime
    _runtime = None  # a forked child must not inherit the parent's runtime
    if placement is not None:  # pinned before torch or the kernels start a thread (threads inherit the mask)
        from .launch.topology import pin_rank

        os.environ.update(placement.env())
        try:
            threads = pin_rank(rank)
        except Exception:
            results.put((rank, False, traceback.format_exc()))
            return
    # The launching process watches its children and stops them all when one fails, naming it;
    # a heartbeat watchdog in each rank would race it (a survivor's exit taken for the failure).
    os.environ.setdefault("TP_ENGINE_PEER_TIMEOUT", "0")
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TP_ENGINE_LAUNCHER="launch",
    )
    # torch's pool and the kernels' pool get the same size (the kernel pool is
    # made at the rank's first matmul: never one inherited across the fork)
    os.environ[THREADS_ENV] = str(threads)
    torch.set_num_threads(threads)
    set_kernel_threads(threads)
    try:
        value = fn(*args)
        # Plain pickle: torch's queue reducers would share tensors through
        # file descriptors that die with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, including SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            shutdown()
        except Exception:
            pass


class RankFailed(RuntimeError):
    """A rank started by ``launch`` raised or died."""


def _drain(results, values: dict, errors: dict, wait: float) -> None:
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            rank, ok, payload = results.get(timeout=max(0.0, end - time.monotonic()))
        except queue_mod.Empty:
            return
        if ok:
            values[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload


def _raise_if_failed(procs, values: dict, errors: dict, nprocs: int, deadline: float | None) -> None:
    dead = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in errors and r not in values}
    if dead:
        # A rank that died without a word is the root cause; others' errors follow from it.
        r, code = min(dead.items())
        others = f" (then ranks {sorted(errors)} failed)" if errors else ""
        raise RankFailed(f"rank {r} exited with code {code} without a result{others}")
    if errors:
        r = next(iter(errors))  # the first to report; later ones are usually its echo
        others = f"\n(ranks {sorted(set(errors) - {r})} failed after it)" if len(errors) > 1 else ""
        raise RankFailed(f"rank {r} failed:\n{errors[r]}{others}")
    missing = sorted(set(range(nprocs)) - set(values))
    if missing:
        reason = "timed out" if deadline is not None and time.monotonic() > deadline else "ended without a result"
        raise RankFailed(f"ranks {missing} {reason}")


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    threads_per_rank: int | None = None,
    timeout: float | None = None,
    start_method: str | None = None,
    placements: Any = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` local ranks; return their results by rank.

    ``placements``: one :class:`tp_engine.launch.topology.RankPlacement` per rank
    (``plan_ranks(read_topology(), nprocs)``): each rank pins itself to its CPUs
    and runs its thread count (``TP_ENGINE_CPUS``/``TP_ENGINE_THREADS`` set),
    in place of ``threads_per_rank``.

    Each rank sees torchrun's variables, so ``tp_engine.init()`` inside
    ``fn`` joins the group. ``threads_per_rank`` (default: the cores this
    process may use divided by ``nprocs``, at least 1) sizes both torch's
    thread pool and the kernels' (:mod:`tp_engine.kernels.threads`; also
    ``TP_ENGINE_THREADS`` in the rank). If any rank raises or dies, the others are
    stopped and RankFailed names the rank and carries its traceback.
    ``start_method`` defaults to fork on Linux when ranks run one thread
    (no re-import, and ``args`` need not pickle) and this process runs no
    other Python thread, else spawn: GNU OpenMP deadlocks in a forked child
    that starts a thread pool, and a lock another thread holds at the fork
    stays held in the child forever (seen once in CI: a forked rank spinning
    forever in MKL's allocator in its first GEMM, the holder not identified).
    The kernels' pool is not the reason: a forked rank never uses the
    parent's workers, it starts its own at its first matmul.
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive integer, got {nprocs!r}")
    if placements is not None:
        if len(placements) != nprocs:
            raise ValueError(f"launch: {len(placements)} placements for {nprocs} ranks")
        threads_per_rank = max(p.threads for p in placements)
    if threads_per_rank is None:
        threads_per_rank = default_threads_per_rank(nprocs)
    if start_method is None:
        forkable = sys.platform.startswith("linux") and threads_per_rank == 1 and _only_thread()
        start_method = "fork" if forkable else "spawn"
    elif start_method == "fork" and threads_per_rank > 1:
        raise ValueError("launch: start_method='fork' needs threads_per_rank=1 (OpenMP is not fork-safe)")
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, args, r, nprocs, port, threads_per_rank, results,
                                             None if placements is None else placements[r]), daemon=True)
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(values) + len(errors) < nprocs:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                silent = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in values and r not in errors]
                if silent:
                    _drain(results, values, errors, wait=1.0)  # its message may still be in flight
                    silent = [r for r in silent if r not in values and r not in errors]
                    if silent:
                        break
                if deadline is not None and time.monotonic() > deadline:
                    break
                continue
            if ok:
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                # Peers of a failed rank fail next ("connection reset"); give
                # them a moment so the report can name the rank that failed first.
                _drain(results, values, errors, wait=2.0)
                break
        _raise_if_failed(procs, values, errors, nprocs, deadline)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(nprocs)]
