"""A TCP ping-pong between two (simulated) hosts: the link's round trip.

Run as a script (``python pingpong.py serve SIZE`` on one host, ``python
pingpong.py client ADDR PORT SIZE ROUNDS ADDED_ONE_WAY_S`` on another) so a
host starts it without importing torch. ``added_one_way_s`` holds every
message that long before sending it (:func:`hold`, the same delay
:class:`tp_engine.launch.latency.LatencyCommunicator` adds), so a measured
round trip with it shows what the emulation really adds; figures from it
are *emulated* latency, not a slower wire. :func:`measure_round_trip` runs
both ends on :class:`~tp_engine.launch.simhosts.SimHosts`.
"""
from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

SPIN_S = 400e-6  # sleep() overshoots by ~50-300 us on a loaded box; spin the last stretch


def hold(seconds: float) -> None:
    """Wait ``seconds`` accurately: sleep most of it, spin the rest."""
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    if seconds > SPIN_S:
        time.sleep(seconds - SPIN_S)
    while time.perf_counter() < end:
        pass


def _recv_exact(conn: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = conn.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def serve(size: int, added_one_way_s: float = 0.0) -> None:
    """Echo ``size``-byte messages on one connection; prints the port first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("0.0.0.0", 0))
        srv.listen(1)
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(bytearray(size))
        try:
            while True:
                _recv_exact(conn, buf)
                hold(added_one_way_s)
                conn.sendall(buf)
        except ConnectionError:
            pass


def client(addr: str, port: int, size: int, rounds: int, added_one_way_s: float = 0.0) -> dict[str, Any]:
    """Round trips of ``size`` bytes there and back, in microseconds (after 20 warm-up rounds)."""
    conn = socket.create_connection((addr, port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = bytes(size)
    buf = memoryview(bytearray(size))
    samples = []
    for i in range(rounds + 20):
        start = time.perf_counter()
        hold(added_one_way_s)
        conn.sendall(msg)
        _recv_exact(conn, buf)
        if i >= 20:
            samples.append((time.perf_counter() - start) * 1e6)
    conn.close()
    samples.sort()
    return {"median_us": statistics.median(samples), "p10_us": samples[len(samples) // 10],
            "p90_us": samples[len(samples) * 9 // 10], "rounds": rounds, "size": size,
            "added_one_way_us": added_one_way_s * 1e6}


@dataclass(frozen=True)
class RoundTrip:
    median_us: float
    p10_us: float
    p90_us: float
    size: int
    rounds: int
    added_one_way_us: float  # emulated latency added per message (0: the wire alone)


def measure_round_trip(hosts: Any, a: int, b: int, size: int = 4096, rounds: int = 500,
                       added_one_way_s: float = 0.0, timeout: float = 60.0) -> RoundTrip:
    """The TCP round trip from simulated host ``a`` to ``b`` (``hosts``: a SimHosts)."""
    script = [sys.executable, __file__]
    server = hosts.popen(b, [*script, "serve", str(size), repr(added_one_way_s)], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"ping-pong server on host {b} did not start (said {port!r})")
        done = hosts.run(a, [*script, "client", hosts.hosts[b].address, port, str(size), str(rounds),
                             repr(added_one_way_s)], timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"ping-pong client on host {a} failed: {done.stderr.strip()[-500:]}")
        r = json.loads(done.stdout)
        return RoundTrip(r["median_us"], r["p10_us"], r["p90_us"], size, rounds, r["added_one_way_us"])
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    else:
        print(json.dumps(client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                                float(sys.argv[6]) if len(sys.argv) > 6 else 0.0)))
