"""Heartbeats between ranks: a lost or silent peer stops the job in seconds, naming it.

A collective waits for a peer that died on another host, or that is alive
but stopped (``SIGSTOP``, a hung machine, a pulled cable), until its
backend's timeout: 300 s for gloo and the shared-memory path, forever for
some MPI transports. Every rank therefore sends a small UDP datagram to
every peer each ``interval`` from a daemon thread, and checks that each peer
was heard from within ``timeout`` (``TP_ENGINE_PEER_TIMEOUT``, default
20 s; 0 turns the watchdog off). A peer whose process died is known sooner:
its host answers the next heartbeat with "port closed". A peer that exited
or fell silent is reported to ``on_lost``; by default this rank prints one line naming the peer's rank,
host and pid and exits with ``EXIT_PEER_LOST``, because its main thread may
be blocked inside a collective that no Python exception can interrupt. The
launcher (torchrun, mpirun) then stops the rest.

The thread needs the GIL only for a moment per interval, so a rank busy in
torch ops, MPI or gloo keeps beating; a rank that ends normally says
goodbye (``stop()``, also at interpreter exit) so that peers still working
do not take its exit for a loss.

The peers' addresses are exchanged once with the communicator itself (one
all_gather), so this works under every launcher and backend.
"""
from __future__ import annotations

import atexit
import errno
import ipaddress
import json
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .base import Communicator

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EXIT_PEER_LOST",
    "LostPeer",
    "Peer",
    "TIMEOUT_ENV",
    "Watchdog",
    "pick_destination",
    "timeout_from_env",
]

TIMEOUT_ENV = "TP_ENGINE_PEER_TIMEOUT"
DEFAULT_TIMEOUT_S = 20.0  # under the 30 s bound, with room for a rank briefly holding the GIL (loading)
EXIT_PEER_LOST = 3  # the same code as the server's lost-rank exit
_TABLE_BYTES = 2048
_MAGIC = b"TPHB"
_BEAT, _BYE = 1, 2
_PACKET = struct.Struct("!4s8sIB")  # magic, job nonce, rank, kind


def timeout_from_env() -> float:
    """``TP_ENGINE_PEER_TIMEOUT`` in seconds (0 disables); ValueError when malformed."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be >= 0 (0 turns the watchdog off)")
    return value


@dataclass(frozen=True)
class Peer:
    """One rank as the others see it."""

    rank: int
    host: str  # host name, for messages
    host_key: str  # host name + boot id: equal only on one machine (and one UTS namespace)
    pid: int
    port: int
    addrs: tuple[tuple[str, int], ...]  # (IPv4 address, prefix length), loopback excluded
    primary: str | None  # the address that reaches MASTER_ADDR, when known
    nonce: str


@dataclass(frozen=True)
class LostPeer:
    rank: int
    host: str
    pid: int
    reason: str  # "exited" (its port closed without a goodbye) or "silent"
    silent_s: float

    def message(self, me: int, my_host: str, after_error: bool = False) -> str:
        """One line naming the lost peer; ``after_error``: it explains an error already printed."""
        if self.reason == "exited":
            what = "exited without leaving the group (killed, or crashed)"
        else:
            what = (f"has sent no heartbeat for {self.silent_s:.1f} s: it is stopped or hung, "
                    "or its host is unreachable")
        head = f"tp-engine: error (rank {me} on {my_host}): rank {self.rank} on host {self.host} (pid {self.pid}) {what}"
        if after_error:
            return f"{head}; the error above follows from it"
        return f"{head}; stopping instead of waiting in a collective ({TIMEOUT_ENV} sets the silence limit)"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def pick_destination(
    mine: Sequence[tuple[str, int]], peer_addrs: Sequence[tuple[str, int]], primary: str | None, same_host: bool
) -> str | None:
    """Where to send a peer's heartbeats (pure).

    Loopback on one host; else the peer's address on a subnet this rank is
    on; else the address the peer reaches the rendezvous from; else its
    first address; None when it advertised none.
    """
    if same_host:
        return "127.0.0.1"
    nets = [ipaddress.IPv4Network(f"{ip}/{prefix}", strict=False) for ip, prefix in mine]
    for ip, _ in peer_addrs:
        if any(ipaddress.IPv4Address(ip) in net for net in nets):
            return ip
    if primary:
        return primary
    return peer_addrs[0][0] if peer_addrs else None


def _exchange(comm: Communicator, me: dict, device: torch.device | str) -> list[dict]:
    blob = json.dumps(me).encode()
    if len(blob) > _TABLE_BYTES:
        raise ValueError(f"watchdog: this rank's address record is {len(blob)} bytes, over {_TABLE_BYTES}")
    row = torch.zeros(1, _TABLE_BYTES, dtype=torch.uint8)
    row[0, : len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    table = comm.all_gather(row.to(device), dim=0).cpu()
    return [json.loads(bytes(r.tolist()).rstrip(b"\0")) for r in table]


def _default_on_lost(lost: LostPeer, me: int, my_host: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:
        pass
    print(lost.message(me, my_host), file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


class Watchdog:
    """Heartbeats to and from every peer of ``comm`` (collective to construct).

    ``timeout`` (default ``TP_ENGINE_PEER_TIMEOUT``): seconds of silence that
    count as lost; rank 0's value holds for every rank, and 0 turns it off.

    ``addresses`` are this host's non-loopback (IPv4, prefix length) pairs and
    ``primary`` the one that reaches the rendezvous, if known
    (:mod:`tp_engine.launch.interface` finds both); peers on other hosts send
    heartbeats to them. ``on_lost(LostPeer)`` runs once, in the watchdog
    thread, for the first peer that exited without a goodbye (its port
    answers "closed", seen within an interval) or stayed silent longer than
    ``timeout``; the default prints the peer's rank, host and pid and exits
    this process with ``EXIT_PEER_LOST``.
    """

    def __init__(
        self,
        comm: Communicator,
        timeout: float | None = None,
        interval: float | None = None,
        on_lost: Callable[[LostPeer], None] | None = None,
        device: torch.device | str = "cpu",
        addresses: Sequence[tuple[str, int]] = (),
        primary: str | None = None,
    ):
        wish = timeout_from_env() if timeout is None else float(timeout)
        if wish < 0:
            raise ValueError(f"Watchdog: timeout must be >= 0 seconds, got {wish}")
        self.rank = comm.rank
        self.host = socket.gethostname()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("0.0.0.0", 0))
        mine = [tuple(a) for a in addresses]
        record = dict(
            rank=comm.rank, host=self.host, host_key=f"{self.host}|{_boot_id()}", pid=os.getpid(),
            port=self._sock.getsockname()[1], addrs=mine, primary=primary, nonce=secrets.token_hex(8),
            timeout=wish,
        )
        try:
            rows = _exchange(comm, record, device)
        except BaseException:
            self._sock.close()
            raise
        self.peers = [
            Peer(r["rank"], r["host"], r["host_key"], r["pid"], r["port"], tuple(map(tuple, r["addrs"])), r["primary"], r["nonce"])
            for r in rows
        ]
        self._nonce = bytes.fromhex(self.peers[0].nonce)  # rank 0's token names the job
        # Rank 0's setting holds for all: ranks that disagreed (mpirun forwards no
        # environment to other hosts by default) would otherwise wait on each other.
        self.timeout = float(rows[0]["timeout"])
        self.interval = (min(1.0, self.timeout / 5) if interval is None else float(interval)) if self.timeout else 0.0
        self._dest: dict[int, tuple[str, int]] = {}
        for p in self.peers:
            if p.rank == self.rank:
                continue
            ip = pick_destination(mine, p.addrs, p.primary, p.host_key == record["host_key"])
            if ip is None:
                raise ValueError(f"watchdog: rank {p.rank} on {p.host} advertised no address to send heartbeats to")
            self._dest[p.rank] = (ip, p.port)
        self._on_lost = on_lost or (lambda lost: _default_on_lost(lost, self.rank, self.host))
        self._last: dict[int, float] = {}
        self._gone: set[int] = set()  # said goodbye
        self._refused: set[int] = set()  # their port is closed
        self._out: dict[int, socket.socket] = {}
        self._previous_hook = sys.excepthook
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- public ------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether heartbeats run: a timeout above 0 and at least one peer."""
        return self.timeout > 0 and bool(self._dest)

    def start(self) -> "Watchdog":
        """Beat and watch in a daemon thread until :meth:`stop` (not at all when the timeout is 0).

        Also names a lost peer after the traceback when this process dies of
        an exception (a backend's "connection closed" says which address, not
        which rank).
        """
        if not self.active:
            self._closed = True
            self._stopped.set()
            self._sock.close()
            return self
        if self._thread is None:
            now = time.monotonic()
            self._last = {r: now for r in self._dest}
            for r, dest in self._dest.items():
                # One connected socket per peer: a closed port there comes back
                # as ECONNREFUSED, so a killed peer is known within an interval.
                out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                out.connect(dest)
                self._out[r] = out
            self._thread = threading.Thread(target=self._run, name="tp-engine-watchdog", daemon=True)
            self._thread.start()
            self._previous_hook = sys.excepthook
            sys.excepthook = self._excepthook
            atexit.register(self.stop)
        return self

    def set_on_lost(self, on_lost: Callable[[LostPeer], None]) -> None:
        """Replace what happens when a peer is lost (e.g. a server failing its requests first)."""
        self._on_lost = on_lost

    def lost(self) -> LostPeer | None:
        """A peer that exited without a goodbye, else the one silent longest beyond ``timeout``, or None."""
        now = time.monotonic()
        for r in sorted(self._refused):
            if r not in self._gone:
                p = self.peers[r]
                return LostPeer(p.rank, p.host, p.pid, "exited", now - self._last[r])
        worst = None
        for r, seen in self._last.items():
            quiet = now - seen
            if r not in self._gone and quiet > self.timeout and (worst is None or quiet > worst[1]):
                worst = (r, quiet)
        if worst is None:
            return None
        p = self.peers[worst[0]]
        return LostPeer(p.rank, p.host, p.pid, "silent", worst[1])

    def probe(self, wait: float = 1.5) -> LostPeer | None:
        """Beat every 0.1 s for up to ``wait`` seconds until a closed port answers; then :meth:`lost`.

        A killed process's sockets close while it is torn down, which can lag
        the connection reset a backend reports first.
        """
        if self._closed:
            return None
        beat = _PACKET.pack(_MAGIC, self._nonce, self.rank, _BEAT)
        end = time.monotonic() + wait
        while True:
            self._send_all(beat)
            time.sleep(0.1)
            self._collect_errors()
            lost = self.lost()
            if lost is not None or time.monotonic() >= end:
                return lost

    def stop(self) -> None:
        """A normal end: say goodbye to every peer and stop watching. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)
        bye = _PACKET.pack(_MAGIC, self._nonce, self.rank, _BYE)
        for _ in range(3):  # datagrams may drop; three is plenty on a LAN
            self._send_all(bye)
        for out in self._out.values():
            out.close()
        self._sock.close()
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._previous_hook
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    # -- internals ---------------------------------------------------------------

    def _excepthook(self, exc_type, exc, tb) -> None:
        lost = None
        if not issubclass(exc_type, KeyboardInterrupt):
            try:
                lost = self.probe()
            except Exception:
                lost = None
        self._previous_hook(exc_type, exc, tb)
        if lost is not None:
            print(lost.message(self.rank, self.host, after_error=True), file=sys.stderr, flush=True)

    def _send_all(self, packet: bytes) -> None:
        for r, out in list(self._out.items()):
            try:
                out.send(packet)
            except ConnectionRefusedError:
                self._refused.add(r)
            except OSError:  # unreachable right now: silence will tell
                pass

    def _collect_errors(self) -> None:
        for r, out in list(self._out.items()):
            try:
                if out.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
                    self._refused.add(r)
            except OSError:
                pass

    def _receive(self, wait: float) -> None:
        ready, _, _ = select.select([self._sock], [], [], max(0.0, wait))
        while ready:
            try:
                data, _ = self._sock.recvfrom(64)
            except OSError:
                return
            if len(data) == _PACKET.size:
                magic, nonce, rank, kind = _PACKET.unpack(data)
                if magic == _MAGIC and nonce == self._nonce and rank in self._last:
                    self._last[rank] = time.monotonic()
                    if kind == _BYE:
                        self._gone.add(rank)
            ready, _, _ = select.select([self._sock], [], [], 0)

    def _run(self) -> None:
        beat = _PACKET.pack(_MAGIC, self._nonce, self.rank, _BEAT)
        next_beat = time.monotonic()
        while not self._stopped.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._send_all(beat)
                next_beat = now + self.interval
            self._receive(next_beat - time.monotonic())
            self._collect_errors()
            self._receive(0)  # a goodbye that raced the closed port
            if self._stopped.is_set():
                return
            lost = self.lost()
            if lost is not None:
                self._stopped.set()
                self._on_lost(lost)
                return
