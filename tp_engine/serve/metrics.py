"""What the server measures, in Prometheus' text format (``GET /metrics``).

One registry per server (not prometheus_client's global one), so several
servers in one process (tests) do not collide.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
_TPS_WINDOW_S = 10.0


class Metrics:
    """The server's counters, gauges and histograms (thread-safe: the engine loop updates them)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("tp_engine_queue_depth", "Requests accepted but not yet in the running batch", registry=r)
        self.running = Gauge("tp_engine_running_sequences", "Sequences in the running batch", registry=r)
        self.generated = Counter("tp_engine_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("tp_engine_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.requests = Counter("tp_engine_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("tp_engine_time_to_first_token_seconds",
                              "From accepting a request to its first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tp_engine_inter_token_latency_seconds",
                             "Between consecutive tokens of one sequence", buckets=_LATENCY_BUCKETS, registry=r)
        self.step = Histogram("tp_engine_step_seconds", "One engine step (all ranks, lockstep)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        Gauge("tp_engine_generation_tokens_per_second", f"Tokens generated per second over the last {_TPS_WINDOW_S:g} s",
              registry=r).set_function(self.tokens_per_second)
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()

    def add_tokens(self, n: int) -> None:
        if n <= 0:
            return
        self.generated.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / _TPS_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - _TPS_WINDOW_S:
            self._recent.popleft()

    def render(self) -> bytes:
        return generate_latest(self.registry)
