"""Rank 0's side of the lockstep loop: requests in, decisions out, tokens back to the clients.

The HTTP handlers (asyncio thread) call :meth:`Scheduler.submit` and
:meth:`Scheduler.cancel`; the engine loop (:func:`lead`, rank 0's main
thread) takes the news as one decision per step, broadcasts it
(:mod:`.lockstep`), steps, and hands each request's new tokens to its
handler through an asyncio queue. Admission: at most ``max_batch`` running
plus ``max_queue`` waiting; beyond that a request gets 429 at once.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..comm.base import Communicator
from ..runtime import Engine, StepOutput
from . import lockstep
from .metrics import Metrics
from .protocol import APIError

__all__ = ["Scheduler", "Sequence", "lead"]

IDLE_MIN_S, IDLE_MAX_S = 0.002, 0.05  # idle decision interval: doubles from min to max while nothing happens


@dataclass(eq=False)
class Sequence:
    """One request as rank 0 tracks it."""

    rid: int
    prompt: list[int]
    params: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    # ("tokens", ids, finish, logprobs or None) | ("error", APIError)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    generated: int = 0
    done: bool = False


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, metrics: Metrics | None = None):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._inbox: list[Sequence] = []  # accepted, not yet sent to the ranks
        self._live: dict[int, Sequence] = {}  # sent, not finished
        self._cancels: list[int] = []
        self._stop = False
        self.closed: APIError | None = None  # why new requests are refused

    # -- the HTTP side (any thread) ----------------------------------------------------

    def submit(self, prompt: list[int], params: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Sequence:
        with self._cond:
            if self.closed is not None:
                raise self.closed
            active = len(self._inbox) + len(self._live)
            if active >= self.max_batch + self.max_queue:
                raise APIError(429, f"the server is full: {active} requests running or queued "
                               f"(--max-batch {self.max_batch} + --max-queue {self.max_queue}); retry later",
                               code="queue_full")
            seq = Sequence(next(self._ids), prompt, params, loop)
            self._inbox.append(seq)
            self.metrics.queue_depth.inc()
            self._cond.notify()
            return seq

    def cancel(self, seq: Sequence, outcome: str = "cancelled") -> None:
        """Drop the request (its client is gone, or rank 0 saw a stop string), freeing its place and slot."""
        with self._cond:
            if seq.done:
                return
            seq.done = True
            self.metrics.requests.labels(outcome).inc()
            if seq in self._inbox:
                self._inbox.remove(seq)
                self.metrics.queue_depth.dec()
            elif self._live.pop(seq.rid, None) is not None:
                self._cancels.append(seq.rid)
                self._cond.notify()

    @property
    def active(self) -> int:
        return len(self._inbox) + len(self._live)

    def fail(self, error: APIError) -> None:
        """Refuse new requests with ``error``, end every open one with it, and stop the loop."""
        with self._cond:
            if self.closed is None:
                self.closed = error
            doomed = self._inbox + list(self._live.values())
            self._inbox, self._live, self._stop = [], {}, True
            for seq in doomed:
                seq.done = True
                self.metrics.requests.labels("error").inc()
            self._cond.notify()
        self._deliver([(seq, ("error", error)) for seq in doomed])

    # -- the engine loop (rank 0's main thread) -----------------------------------------

    def take(self, busy: bool) -> dict[str, Any] | None:
        """The next step's decision, or None when there is nothing to do."""
        with self._cond:
            if self._stop:
                return {"op": "stop"}
            if not (busy or self._inbox or self._cancels):
                return None
            add = [[s.rid, s.prompt, s.params] for s in self._inbox]
            for s in self._inbox:
                self._live[s.rid] = s
                self.metrics.prompt_tokens.inc(len(s.prompt))
            cancel, self._inbox, self._cancels = self._cancels, [], []
            return {"op": "step", "add": add, "cancel": cancel}

    def wait(self, timeout: float) -> None:
        """Block (idle) until news arrives or ``timeout`` passes."""
        with self._cond:
            if not (self._stop or self._inbox or self._cancels):
                self._cond.wait(timeout)

    def publish(self, outputs: list[StepOutput], errors: dict[Any, str], engine: Engine) -> None:
        """Hand one step's tokens (and refused requests) to their handlers; update the gauges."""
        now = time.perf_counter()
        m = self.metrics
        events = []
        with self._cond:
            for rid, message in errors.items():
                seq = self._live.pop(rid, None)
                if seq is not None:
                    seq.done = True
                    events.append((seq, ("error", APIError(400, message))))
            for out in outputs:
                seq = self._live.get(out.request_id)
                if seq is None:  # cancelled meanwhile
                    continue
                if out.new_tokens:
                    n = len(out.new_tokens)
                    if seq.last_token_at is None:
                        m.ttft.observe(now - seq.arrived)
                    else:
                        m.itl.observe((now - seq.last_token_at) / n)
                    seq.last_token_at, seq.generated = now, seq.generated + n
                    m.add_tokens(n)
                if out.finished:
                    del self._live[out.request_id]
                    seq.done = True
                    m.requests.labels(out.finish_reason or "stop").inc()
                if out.error is not None:  # this request alone failed; the group and the others go on
                    events.append((seq, ("error", APIError(500, f"the engine failed on this request: {out.error}",
                                                           code="engine_error"))))
                    continue
                events.append((seq, ("tokens", list(out.new_tokens), out.finish_reason if out.finished else None,
                                     out.logprobs)))
            m.running.set(len(engine.running))
            m.queue_depth.set(len(engine.waiting) + len(self._inbox))
        self._deliver(events)

    @staticmethod
    def _deliver(events: list[tuple[Sequence, tuple]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, event in events:
            by_loop.setdefault(seq.loop, []).append((seq.events, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


def _put_all(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def lead(comm: Communicator, engine: Engine, scheduler: Scheduler) -> None:
    """Rank 0's engine loop: decide, broadcast, step, publish, until the scheduler says stop."""
    idle, device = IDLE_MIN_S, engine.decoder.device
    while True:
        decision = scheduler.take(engine.has_unfinished)
        if decision is None:
            lockstep.send(comm, {"op": "idle", "sleep": idle}, device)
            scheduler.wait(idle)
            idle = min(2 * idle, IDLE_MAX_S)
            continue
        idle = IDLE_MIN_S
        lockstep.send(comm, decision, device)
        if decision["op"] == "stop":
            return
        start = time.perf_counter()
        outputs, errors = lockstep.apply(engine, decision)
        scheduler.metrics.step.observe(time.perf_counter() - start)
        scheduler.publish(outputs, errors, engine)
