"""Collectives among a few ranks over a full mesh of plain TCP connections.

Between hosts the floor of an all-reduce is the network round trip (about
33 us between two simulated hosts here), but gloo's all-reduce over TCP took
about 1.7 ms. For the handful of host leaders of a hierarchical all-reduce
(or one rank per host) a leaner exchange gets near that floor: every rank
keeps one persistent TCP connection (``TCP_NODELAY``) to every other, sends
its bytes to each peer in one ``sendmsg`` and receives theirs; all-reduce is
then a local sum in rank order, so every rank gets the same bits.

Each message carries a 16-byte header (collective number, payload bytes),
checked on receipt, so ranks that call different collectives get an error
instead of reading each other's bytes. A peer that dies is noticed at once
(connection reset or end of stream); a silent one after ``timeout`` seconds;
both raise a RuntimeError naming the rank.

Traffic: every rank sends its whole buffer to each of the ``n - 1`` others,
which is optimal for two ranks and fine for a few; many ranks with large
tensors would want a ring instead.
"""
from __future__ import annotations

import ctypes
import secrets
import select
import socket
import struct
import time
from typing import Any, Sequence

import torch

from .base import gather_byte_counts, resolve_gather, stitch_blocks

__all__ = ["TcpCommunicator", "tcp_mesh"]

_HEADER = struct.Struct("<QQ")  # collective number, payload bytes
_HELLO = struct.Struct("<32sI")  # the listener's token (hex), the connecting rank's index
_RECORD_BYTES = 128  # bootstrap record: address, port, token
_CONNECT_TIMEOUT_S = 30.0
_CACHE_LIMIT = 256
_STAGE_MAX_BYTES = 64 << 10  # payloads up to this size are copied behind the header and sent in one piece
_NATIVE = (torch.float32, torch.float64, torch.int32, torch.int64)
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


class _Peer:
    __slots__ = ("index", "sock", "fd")

    def __init__(self, index: int, sock: socket.socket):
        self.index = index
        self.sock = sock
        self.fd = sock.fileno()


class TcpCommunicator:
    """A Communicator over TCP connections between every pair of its ranks.

    Built collectively by :func:`tcp_mesh`. ``members[i]`` is the bootstrap
    rank that is rank i here (kept for error messages). Moves CPU tensors;
    others are staged through a CPU copy.
    """

    def __init__(self, index: int, members: Sequence[int], peers: dict[int, socket.socket], timeout: float):
        self.name = "tcp"
        self.rank = index
        self.world_size = len(members)
        self.members = tuple(members)
        self.timeout = float(timeout)
        self._peers = [_Peer(i, s) for i, s in sorted(peers.items())]
        self._by_index = {p.index: p for p in self._peers}
        self._seq = 0
        self._recv: dict[int, tuple[bytearray, torch.Tensor]] = {}  # per peer: buffer, a uint8 tensor over it
        self._views: dict[tuple, Any] = {}  # cached memoryviews and tensor views (the hot path avoids torch ops)
        self._stage = bytearray(_HEADER.size + 4096)
        self._broken: str | None = None
        self._closed = False

    # -- the exchange ------------------------------------------------------------------

    def _mem(self, t: torch.Tensor) -> memoryview:
        """Bytes of a contiguous CPU tensor, no copy; cached by address and size as in mpi.py
        (used only while the caller holds a tensor at that address)."""
        key = (t.data_ptr(), t.nbytes)
        mv = self._views.get(key)
        if mv is None:
            if len(self._views) >= _CACHE_LIMIT:
                self._views.clear()
            mv = self._views[key] = memoryview((ctypes.c_char * t.nbytes).from_address(key[0])).cast("B")
        return mv

    def _received(self, i: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """Peer i's last payload as a flat tensor of ``dtype`` (a view of the receive buffer)."""
        key = (i, nbytes, dtype)
        t = self._views.get(key)
        if t is None:
            t = self._views[key] = self._recv[i][1][_HEADER.size : _HEADER.size + nbytes].view(dtype)
        return t

    def _who(self, index: int) -> str:
        return f"rank {self.members[index]}" if self.members[index] != index else f"rank {index}"

    def _exchange(self, payload: memoryview | None, send_to: Sequence[_Peer], recv_bytes: dict[int, int], what: str) -> None:
        """Send ``payload`` to ``send_to``; receive ``recv_bytes[i]`` bytes from each peer i.

        What peer i sent is then at ``self._recv[i]`` behind the header,
        until the next collective.
        """
        if self._broken:
            raise RuntimeError(self._broken)
        if self._closed:
            raise RuntimeError("TcpCommunicator is closed")
        self._seq = seq = self._seq + 1
        hs = _HEADER.size
        nbytes = 0 if payload is None else payload.nbytes
        sends = {}
        if send_to:
            # One send per message: a header and a payload in two iovecs or two
            # sends took several times longer per round trip here. Large payloads
            # go uncopied, the header corked in front of them with MSG_MORE.
            if nbytes <= _STAGE_MAX_BYTES:
                if len(self._stage) < hs + nbytes:
                    self._stage = bytearray(hs + nbytes)
                _HEADER.pack_into(self._stage, 0, seq, nbytes)
                staged = memoryview(self._stage)[: hs + nbytes]
                if nbytes:
                    staged[hs:] = payload
                parts = [(staged, 0)]
            else:
                parts = [(memoryview(_HEADER.pack(seq, nbytes)), socket.MSG_MORE), (payload, 0)]
            sends = {p.index: list(parts) for p in send_to}
        recvs = {}
        for i, n in recv_bytes.items():
            buf = self._recv.get(i)
            if buf is None or len(buf[0]) < hs + n:
                self._views = {k: v for k, v in self._views.items() if k[0] != i}  # views of the old buffer
                raw = bytearray(max(hs + n, 4096))
                buf = self._recv[i] = (raw, torch.frombuffer(raw, dtype=torch.uint8))
            recvs[i] = [memoryview(buf[0])[: hs + n], 0]  # [whole message, bytes received so far]
        try:
            self._pump(sends, recvs, seq, what)
        except Exception as exc:
            self._broken = str(exc)
            raise

    def _pump(self, sends: dict, recvs: dict, seq: int, what: str) -> None:
        deadline = None
        while sends or recvs:
            progress = False
            for i in list(sends):
                parts = sends[i]
                sock = self._by_index[i].sock
                try:
                    while parts:
                        view, flags = parts[0]
                        n = sock.send(view, flags)
                        progress = True
                        if n < view.nbytes:
                            parts[0] = (view[n:], flags)
                            break
                        parts.pop(0)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise RuntimeError(f"TcpCommunicator: {self._who(i)} is gone ({exc}) during {what} #{seq}") from None
                if not parts:
                    del sends[i]
            for i in list(recvs):
                if self._receive(i, recvs[i], seq, what):
                    del recvs[i]
                    progress = True
            if not (sends or recvs) or progress:
                continue
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.timeout
            elif now > deadline:
                silent = sorted(recvs) or sorted(sends)
                raise RuntimeError(
                    f"TcpCommunicator: {', '.join(self._who(i) for i in silent)} sent nothing for {self.timeout:g} s "
                    f"during {what} #{seq} (rank {self.members[self.rank]} waited)"
                )
            poller = select.poll()
            for i in recvs:
                poller.register(self._by_index[i].fd, select.POLLIN)
            for i in sends:
                poller.register(self._by_index[i].fd, select.POLLOUT | (select.POLLIN if i in recvs else 0))
            poller.poll(max(1, int((deadline - now) * 1000)))

    def _receive(self, i: int, state: list, seq: int, what: str) -> bool:
        """Read what has arrived from peer i; True once its message is complete."""
        view, got = state
        sock = self._by_index[i].sock
        hs = _HEADER.size
        try:
            while got < view.nbytes:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise RuntimeError(f"TcpCommunicator: {self._who(i)} closed its connection during {what} #{seq}")
                before, got = got, got + n
                state[1] = got
                if before < hs <= got:
                    their_seq, their_bytes = _HEADER.unpack(view[:hs])
                    if their_seq != seq or their_bytes != view.nbytes - hs:
                        raise RuntimeError(
                            f"TcpCommunicator: {self._who(i)} sent collective #{their_seq} with {their_bytes} bytes, "
                            f"but this rank is in {what} #{seq} expecting {view.nbytes - hs} bytes: "
                            "the ranks called different collectives"
                        )
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            raise RuntimeError(f"TcpCommunicator: {self._who(i)} is gone ({exc}) during {what} #{seq}") from None

    # -- collectives ----------------------------------------------------------------------

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype not in _NATIVE or not tensor.is_cpu or not tensor.is_contiguous():
            work_dtype = _UPCAST.get(tensor.dtype, tensor.dtype)
            if work_dtype not in _NATIVE:
                raise TypeError(f"TcpCommunicator.all_reduce_: unsupported dtype {tensor.dtype}")
            work = tensor.detach().to(device="cpu", dtype=work_dtype, memory_format=torch.contiguous_format, copy=True)
            self.all_reduce_(work)
            tensor.copy_(work)
            return tensor
        if self.world_size == 1:
            return tensor
        n = tensor.nbytes
        self._exchange(self._mem(tensor) if n else None, self._peers, {p.index: n for p in self._peers}, "all_reduce_")
        if not n:
            return tensor
        flat = tensor.view(-1)
        if self.world_size == 2:
            flat.add_(self._received(1 - self.rank, n, tensor.dtype))  # IEEE addition commutes: same bits on both
            return tensor
        parts = [flat if i == self.rank else self._received(i, n, tensor.dtype) for i in range(self.world_size)]
        acc = torch.add(parts[0], parts[1])  # rank order: the same bits on every rank
        for p in parts[2:]:
            acc.add_(p)
        flat.copy_(acc)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None) -> torch.Tensor:
        dim, sizes = resolve_gather(tensor, dim, sizes, self.rank, self.world_size)
        src = tensor.detach().to("cpu").contiguous()
        counts = gather_byte_counts(src, dim, sizes)
        self._exchange(self._mem(src) if src.nbytes else None, self._peers, {p.index: counts[p.index] for p in self._peers},
                       "all_gather")
        blocks = [src if r == self.rank else self._recv[r][1][_HEADER.size : _HEADER.size + counts[r]]
                  for r in range(len(sizes))]
        out = stitch_blocks(blocks, src, dim, sizes)
        return out if tensor.is_cpu else out.to(tensor.device)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast_: src {src} outside world of {self.world_size}")
        if not tensor.is_cpu or not tensor.is_contiguous():
            work = tensor.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
            self.broadcast_(work, src)
            tensor.copy_(work)
            return tensor
        n = tensor.nbytes
        if self.rank == src:
            self._exchange(self._mem(tensor) if n else None, self._peers, {}, "broadcast_")
        else:
            self._exchange(None, [], {src: n}, "broadcast_")
            if n:
                self._mem(tensor)[:] = memoryview(self._recv[src][0])[_HEADER.size : _HEADER.size + n]
        return tensor

    def barrier(self) -> None:
        self._exchange(None, self._peers, {p.index: 0 for p in self._peers}, "barrier")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self._peers:
            try:
                p.sock.close()
            except OSError:
                pass
        self._views.clear()
        self._recv.clear()


# -- building the mesh -----------------------------------------------------------------


def _row(text: bytes) -> torch.Tensor:
    row = torch.zeros(1, _RECORD_BYTES, dtype=torch.uint8)
    if len(text) > _RECORD_BYTES:
        raise ValueError(f"tcp_mesh: record too long: {text!r}")
    if text:
        row[0, : len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return row


def _listen(address: str, backlog: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        srv.bind((address, 0))
    except OSError:
        srv.close()
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("0.0.0.0", 0))  # the advertised address is not local (NAT): accept on all
    srv.listen(max(backlog, 1))
    return srv


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small all-reduces must not wait for Nagle


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection during the handshake")
        data += chunk
    return data


def _connect_mesh(index: int, members: Sequence[int], records: list[tuple[str, int, bytes]], srv: socket.socket,
                  token: bytes, deadline: float) -> dict[int, socket.socket]:
    """Connect to every later member, accept every earlier one; authenticate by token."""
    peers: dict[int, socket.socket] = {}
    try:
        for j in range(index + 1, len(members)):
            host, port, their_token = records[members[j]]
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            _tune(sock)
            sock.sendall(_HELLO.pack(their_token, index))
            peers[j] = sock
        srv.settimeout(max(0.1, deadline - time.monotonic()))
        while len(peers) < len(members) - 1:
            sock, _ = srv.accept()
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            their_token, i = _HELLO.unpack(_read_exact(sock, _HELLO.size))
            if their_token != token or not 0 <= i < index or i in peers:
                sock.close()  # a stranger or a stale connection: not one of ours
                continue
            _tune(sock)
            peers[i] = sock
        for sock in peers.values():
            sock.setblocking(False)
        return peers
    except BaseException:
        for sock in peers.values():
            sock.close()
        raise


def tcp_mesh(bootstrap: Any, members: Sequence[int], *, address: str, timeout: float) -> TcpCommunicator | None:
    """Connect ``members`` (ranks of ``bootstrap``) into a TcpCommunicator.

    Collective over ``bootstrap``: every one of its ranks calls it, members
    or not; members get their communicator (rank = position in ``members``),
    the others None. ``address``: this rank's IP address as the others can
    reach it. If any member fails to connect, every rank raises.
    """
    members = [int(m) for m in members]
    if sorted(set(members)) != sorted(members) or not all(0 <= m < bootstrap.world_size for m in members):
        raise ValueError(f"tcp_mesh: members must be distinct ranks of the bootstrap group: {members}")
    me = int(bootstrap.rank)
    index = members.index(me) if me in members else None
    srv = None
    token = b""
    record = b""
    error = ""
    if index is not None:
        try:
            srv = _listen(address, len(members))
            token = secrets.token_hex(16).encode()
            record = b"%s %d %s" % (address.encode(), srv.getsockname()[1], token)
        except OSError as exc:
            error = f"rank {me} cannot listen on {address}: {exc}"
    rows = bootstrap.all_gather(_row(record), dim=0)
    records: list[tuple[str, int, bytes]] = []
    for r in range(bootstrap.world_size):
        fields = bytes(rows[r].tolist()).rstrip(b"\0").split()
        records.append((fields[0].decode(), int(fields[1]), fields[2]) if len(fields) == 3 else ("", 0, b""))
    comm = None
    if index is not None and not error:
        if any(not records[m][0] for m in members):
            error = "a member could not listen"
        else:
            try:
                peers = _connect_mesh(index, members, records, srv, token, time.monotonic() + _CONNECT_TIMEOUT_S)
                comm = TcpCommunicator(index, members, peers, timeout)
            except (OSError, ValueError, struct.error) as exc:
                error = f"rank {me} could not connect to its peers: {exc}"
    if srv is not None:
        srv.close()
    # Fail together: a member that could not connect must not leave the others waiting.
    failed = torch.tensor([1 if error else 0], dtype=torch.int64)
    bootstrap.all_reduce_(failed)
    if int(failed.item()):
        if comm is not None:
            comm.close()
        raise RuntimeError(f"tcp_mesh: {int(failed.item())} rank(s) failed to connect" + (f"; here: {error}" if error else ""))
    return comm
