"""Ranks as threads of one process: a Communicator for in-process checks.

The parity guard and the coverage walk run a model on N ranks many times;
starting N processes (and a rendezvous) for each would cost seconds, while
threads cost microseconds. torch kernels release the GIL, so the ranks do
run in parallel, if on a small scale.

Every collective works the same way: each rank posts its tensor in its own
slot, all ranks meet at a barrier, the result is computed from the slots,
and a second barrier keeps any rank from overwriting (or the caller from
modifying) a posted tensor while a peer still reads it. All-reduce sums the
slots in rank order once, into a fresh tensor every rank copies from, so all
ranks get the same bits.

A rank that fails, inside or outside a collective, aborts the group's barrier:
every peer waiting in (or later entering) a collective gets a
``PeerFailed`` at once, instead of waiting out the timeout.
"""
from __future__ import annotations

import contextvars
import os
import queue
import threading
import time
from typing import Any, Callable, Sequence

import torch

from .base import resolve_gather

__all__ = ["PeerFailed", "ThreadCommunicator", "ThreadGroup", "run_threads"]

DEFAULT_TIMEOUT_S = 300.0


def _default_timeout() -> float:
    return float(os.environ.get("TP_ENGINE_THREAD_TIMEOUT", DEFAULT_TIMEOUT_S))


class PeerFailed(RuntimeError):
    """A collective could not complete: a peer rank failed, or waiting timed out."""


class ThreadGroup:
    """The shared state of ``world_size`` thread ranks; hands out one communicator per rank.

    ``timeout`` bounds each wait at a barrier (default ``TP_ENGINE_THREAD_TIMEOUT``
    or 300 s), so a rank that never arrives cannot hang its peers forever.
    """

    def __init__(self, world_size: int, timeout: float | None = None):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be a positive integer, got {world_size!r}")
        self.world_size = world_size
        self.timeout = _default_timeout() if timeout is None else float(timeout)
        self._barrier = threading.Barrier(world_size)
        self._slots: list[Any] = [None] * world_size
        self._result: Any = None
        self._failure: str | None = None
        self._lock = threading.Lock()
        self._comms = [ThreadCommunicator(self, r) for r in range(world_size)]
        # Point-to-point mailboxes (tp_engine.comm.p2p) and sub-groups (tp_engine.comm.groups):
        # made on first use; sub-groups are aborted with their parent.
        self._mailboxes: dict[tuple[int, int, int], queue.Queue] = {}
        self._children: dict[Any, list["ThreadGroup"]] = {}
        self._layouts: dict[Any, tuple] = {}

    def comm(self, rank: int) -> "ThreadCommunicator":
        """The communicator of ``rank`` (each rank's thread must use only its own)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a group of {self.world_size}")
        return self._comms[rank]

    def abort(self, why: str) -> None:
        """Release every rank waiting in a collective; later collectives fail at once."""
        with self._lock:
            if self._failure is None:
                self._failure = why
            children = [g for groups in self._children.values() for g in groups]
        self._barrier.abort()
        for child in children:
            child.abort(why)

    def mailbox(self, src: int, dst: int, tag: int = 0) -> queue.Queue:
        """The FIFO of messages from ``src`` to ``dst`` (with ``tag``), made on first use."""
        key = (src, dst, tag)
        with self._lock:
            box = self._mailboxes.get(key)
            if box is None:
                box = self._mailboxes[key] = queue.Queue()
            return box

    def split(self, key: Any, groups: Sequence[Sequence[int]]) -> list["ThreadGroup"]:
        """Child groups, one per entry of ``groups`` (lists of ranks), the same objects for every
        rank asking with ``key``; ranks asking with one key must pass the same ``groups``.

        The first rank to ask makes them; a peer failure in this group aborts them too.
        """
        layout = tuple(tuple(g) for g in groups)
        with self._lock:
            made = self._children.get(key)
            if made is None:
                made = [ThreadGroup(len(g), timeout=self.timeout) for g in layout]
                self._children[key] = made
                self._layouts[key] = layout
                if self._failure is not None:
                    for child in made:
                        child._failure = self._failure
                        child._barrier.abort()
            elif self._layouts[key] != layout:
                why = f"ranks asked for different sub-groups: {list(self._layouts[key])} and {list(layout)}"
                self._failure = self._failure or why
                raise ValueError(why)
            return made

    @property
    def failure(self) -> str | None:
        return self._failure

    def _wait(self, rank: int, what: str) -> None:
        try:
            self._barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            why = self._failure
            if why is None:  # the wait itself timed out (Barrier breaks itself)
                why = f"a peer did not reach {what} within {self.timeout:g} s"
                self.abort(why)
            raise PeerFailed(f"thread rank {rank}: {what} aborted: {why}") from None


class ThreadCommunicator:
    """One rank's view of a ``ThreadGroup`` (implements the Communicator protocol)."""

    name = "threads"

    def __init__(self, group: ThreadGroup, rank: int):
        self._group = group
        self.group = group  # public: p2p channels and sub-groups are made from it
        self.rank = rank
        self.world_size = group.world_size
        self._closed = False
        self._splits = 0

    def next_split_key(self) -> int:
        """The key of this rank's next sub-group request: the n-th request of every rank meets
        the n-th of its peers, as torch's ``new_group`` and MPI's ``Split`` calls do."""
        self._splits += 1
        return self._splits

    # Every collective: post, meet, compute, meet. Any error inside aborts
    # the group, so peers are released instead of waiting out the timeout.
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"thread rank {self.rank}: communicator used after close()")

    def _collective(
        self, what: str, tensor: torch.Tensor, body: Callable[[], torch.Tensor], trailing: bool = True
    ) -> torch.Tensor:
        g = self._group
        if g.failure is not None:
            raise PeerFailed(f"thread rank {self.rank}: {what} aborted: {g.failure}")
        try:
            g._slots[self.rank] = tensor
            g._wait(self.rank, what)
            out = body()
            if trailing:  # peers may still be reading this rank's posted tensor
                g._wait(self.rank, what)
            return out
        except PeerFailed:
            raise
        except BaseException as exc:
            g.abort(f"rank {self.rank} failed in {what}: {type(exc).__name__}: {exc}")
            raise

    def _check_like(self, tensor: torch.Tensor, what: str) -> None:
        for r, other in enumerate(self._group._slots):
            if other.shape != tensor.shape or other.dtype != tensor.dtype:
                raise ValueError(
                    f"{what}: rank {r} posted {tuple(other.shape)} {other.dtype}, "
                    f"rank {self.rank} posted {tuple(tensor.shape)} {tensor.dtype}"
                )

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check_open()
        if self.world_size == 1:
            return tensor
        g = self._group

        def body() -> torch.Tensor:
            if self.rank == 0:
                self._check_like(tensor, "all_reduce_")
                # Rank order, once, into a fresh tensor: identical bits everywhere,
                # and nobody reads a tensor its owner may modify after returning.
                total = g._slots[0].clone()
                for other in g._slots[1:]:
                    total.add_(other.to(total.device))
                g._result = total
            g._wait(self.rank, "all_reduce_")
            # No trailing barrier: the slots were read before the wait above, and
            # rank 0 replaces _result only after every rank posts again.
            tensor.copy_(g._result)
            return tensor

        return self._collective("all_reduce_", tensor, body, trailing=False)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None) -> torch.Tensor:
        self._check_open()
        dim, sizes = resolve_gather(tensor, dim, sizes, self.rank, self.world_size)
        if self.world_size == 1:
            return tensor
        g = self._group

        def body() -> torch.Tensor:
            parts = []
            for r, other in enumerate(g._slots):
                if other.dim() != tensor.dim() or other.shape[dim] != sizes[r]:
                    raise ValueError(
                        f"all_gather: rank {r} posted shape {tuple(other.shape)}, "
                        f"expected extent {sizes[r]} along dim {dim}"
                    )
                parts.append(other.to(tensor.device))
            return torch.cat(parts, dim=dim)

        return self._collective("all_gather", tensor, body)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_open()
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast_: src {src} is outside a group of {self.world_size}")
        if self.world_size == 1:
            return tensor
        g = self._group

        def body() -> torch.Tensor:
            if self.rank != src:
                source = g._slots[src]
                if source.shape != tensor.shape:
                    raise ValueError(f"broadcast_: rank {src} sent {tuple(source.shape)}, rank {self.rank} expects {tuple(tensor.shape)}")
                tensor.copy_(source)
            return tensor

        return self._collective("broadcast_", tensor, body)

    def barrier(self) -> None:
        self._check_open()
        if self.world_size > 1:
            if self._group.failure is not None:
                raise PeerFailed(f"thread rank {self.rank}: barrier aborted: {self._group.failure}")
            self._group._wait(self.rank, "barrier")

    def close(self) -> None:
        self._closed = True


def run_threads(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float | None = None,
    barrier_timeout: float | None = None,
) -> list[Any]:
    """Run ``fn(comm, *args)`` on ``world_size`` thread ranks; return results by rank.

    Each rank runs in a copy of the caller's ``contextvars`` context, so
    context-scoped settings reach every rank. If a rank raises, the group is
    aborted (peers in collectives are released) and the first exception is
    re-raised here, noted with its rank. If the ranks are not done after
    ``timeout`` seconds (default: twice the group's barrier wait plus a second, so
    that a barrier timing out is reported as such and not raced by this limit),
    a TimeoutError is raised;
    the threads are daemons, so a rank stuck outside any collective cannot keep
    the process alive.
    """
    group = ThreadGroup(world_size, timeout=barrier_timeout)
    limit = 2 * group.timeout + 1.0 if timeout is None else float(timeout)
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []
    errors_lock = threading.Lock()

    def rank_main(rank: int) -> None:
        comm = group.comm(rank)
        try:
            results[rank] = fn(comm, *args)
        except BaseException as exc:  # reported to the caller below
            with errors_lock:
                errors.append((rank, exc))
            group.abort(f"rank {rank} raised {type(exc).__name__}: {exc}")
        finally:
            comm.close()

    threads = []
    for rank in range(world_size):
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(rank_main, rank), name=f"tp-rank-{rank}", daemon=True)
        threads.append(t)
        t.start()
    deadline = time.monotonic() + limit
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    if stuck:
        group.abort(f"run_threads timed out after {limit:g} s")
        for t in threads:
            t.join(1.0)
        raise TimeoutError(f"thread ranks {stuck} of {world_size} did not finish within {limit:g} s")
    if errors:
        # The first failure is the cause; peers' PeerFailed errors are its echo.
        causes = [e for e in errors if not isinstance(e[1], PeerFailed)] or errors
        rank, exc = causes[0]
        exc.add_note(f"(raised on thread rank {rank} of {world_size})")
        raise exc
    return results
