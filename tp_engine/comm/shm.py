"""Intra-host shared-memory collectives for small tensors.

Under ``torchrun`` on one machine, gloo moves even a 4 KiB all-reduce through
loopback TCP in over a millisecond; decode does two such all-reduces per
layer per token. :class:`ShmCommunicator` carries small collectives through
one shared-memory segment instead (a few microseconds) and hands everything
else (large tensors, non-CPU devices, unsupported dtypes) to the
torch.distributed communicator it wraps.

How it works (protocol in detail: ``shm_allreduce.c``):

- Rendezvous through the fallback: rank 0 creates a file in ``/dev/shm`` (or
  the temp dir where there is none) holding a random nonce, broadcasts its
  path, every rank maps it and checks the nonce (so ranks on another host or
  in another container fail the check instead of mapping a different file),
  and once all have it mapped rank 0 unlinks it. The memory then lives
  exactly as long as the mappings: nothing is left behind even if a rank is
  killed.
- Each rank owns two data slots (double buffered by collective number) and
  a sequence counter. A collective copies the payload into the rank's slot,
  publishes the counter, waits for every other rank's counter, then reads.
  All-reduce sums the slots in rank order, so every rank gets the same bits.
- Waiting spins briefly, then yields the CPU (oversubscribed ranks still make
  progress), then sleeps; after ``timeout`` seconds (``TP_ENGINE_SHM_TIMEOUT``,
  default 300) it raises a RuntimeError naming the rank that did not arrive.

The hot loops are a small C file compiled with the system C compiler at first
use (cached under ``$TP_ENGINE_CACHE_DIR``, ``$XDG_CACHE_HOME/tp_engine`` or
``~/.cache/tp_engine``) and called through ctypes. If compiling or loading
fails, a pure-Python/numpy implementation of the same protocol is used
(slower, still far faster than gloo); all ranks agree on one of the two.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import secrets
import socket
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..native import compile_shared
from .base import gather_layout, resolve_gather

__all__ = ["ShmCommunicator", "ShmUnavailable", "try_shm_communicator", "load_native"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20  # largest payload per rank carried through shared memory
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "TP_ENGINE_SHM_TIMEOUT"
NO_NATIVE_ENV = "TP_ENGINE_SHM_NO_C"  # set to 1 to force the pure-Python path
SPIN_ENV = "TP_ENGINE_SHM_SPIN_US"

# Waiting: busy-wait SPIN_S (TP_ENGINE_SHM_SPIN_US overrides), then
# sched_yield until YIELD_S, then sleep 50 us at a time. Yielding early costs
# nothing on an idle machine (sched_yield returns at once) but matters under
# load: on the 2-vCPU dev VM, spinning 50 us made 4 KiB all-reduces take
# ~110 us whenever a third process wanted a core; yielding after 5 us kept
# them at ~5-15 us.
SPIN_S = 5e-6
YIELD_S = 2e-3
TWO_PHASE_MIN_BYTES = 32 << 10  # all-reduces this large split the summing across ranks (measured)

_MAGIC = b"TPSHM001"
_NONCE_BYTES = 16
_PAGE = 4096
_HDR_OFF = _PAGE  # per-rank counter blocks start here
_HDR_STRIDE = 256  # arrive counter at +0, done counter at +128: separate cache lines
_DONE_OFF = 128
_PATH_BYTES = 512  # rendezvous message: path + nonce + max_bytes, fixed size

_ABI = 1
_C_SOURCE = Path(__file__).with_name("shm_allreduce.c")
_C_DTYPES = {torch.float32: 0, torch.float64: 1, torch.int32: 2, torch.int64: 3}
# Summed through a wider dtype: 16-bit floats in float32 (one rounding at the
# end; the same choice as the MPI path), small ints in int64 (cast back wraps).
_UPCAST = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.int16: torch.int64,
    torch.int8: torch.int64,
    torch.uint8: torch.int64,
}


class ShmUnavailable(RuntimeError):
    """The ranks cannot share memory (different hosts or containers, no shm)."""


# -- the native helper ---------------------------------------------------------


_native_lock = threading.Lock()
_native: list = []  # [lib or None] once tried


def load_native() -> Any | None:
    """The compiled helper (ctypes CDLL), or None where it cannot be built.

    Compiles at most once per process; the result is cached on disk by a
    hash of the source, compiler and flags.
    """
    with _native_lock:
        if _native:
            return _native[0]
        lib = None
        if os.environ.get(NO_NATIVE_ENV, "") not in ("", "0"):
            log.info("shm: native helper disabled by %s", NO_NATIVE_ENV)
        else:
            try:
                so = compile_shared(_C_SOURCE, ["-O3", "-std=c11", "-fPIC", "-shared"], timeout=120)  # never -ffast-math: sums must not reassociate
                lib = ctypes.CDLL(str(so))
                _declare(lib)
                if lib.tp_shm_abi() != _ABI:
                    raise RuntimeError(f"ABI {lib.tp_shm_abi()} != {_ABI}")
            except Exception as exc:  # any failure means: use the Python path
                log.warning("shm: native helper unavailable (%s); using the slower pure-Python path", exc)
                lib = None
        _native.append(lib)
        return lib


def _declare(lib: Any) -> None:
    c = ctypes
    lib.tp_shm_abi.argtypes, lib.tp_shm_abi.restype = [], c.c_int
    lib.tp_shm_new.argtypes = [c.c_void_p, c.c_int, c.c_int] + [c.c_int64] * 7 + [c.c_double] * 3
    lib.tp_shm_new.restype = c.c_void_p
    lib.tp_shm_free.argtypes, lib.tp_shm_free.restype = [c.c_void_p], None
    lib.tp_shm_set_timeout.argtypes, lib.tp_shm_set_timeout.restype = [c.c_void_p, c.c_double], None
    lib.tp_shm_exchange.argtypes = [c.c_void_p, c.c_void_p, c.c_int64, c.c_uint64]
    lib.tp_shm_exchange.restype = c.c_int
    lib.tp_shm_allreduce.argtypes = [c.c_void_p, c.c_void_p, c.c_int64, c.c_int, c.c_uint64]
    lib.tp_shm_allreduce.restype = c.c_int


# -- pure-Python memory ordering ---------------------------------------------------

_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier, best effort, for the pure-Python path.

    Taking and releasing a lock executes atomic read-modify-write instructions,
    which order the surrounding loads and stores on x86 and ARM alike.
    """
    _fence_lock.acquire()
    _fence_lock.release()


_sched_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


# -- the communicator ----------------------------------------------------------------


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class _Layout:
    """Offsets inside the segment; identical on every rank."""

    def __init__(self, world: int, max_bytes: int):
        self.world = world
        self.max_bytes = max_bytes
        self.slot_bytes = _align(max(max_bytes, 64), _PAGE)
        self.data_off = _align(_HDR_OFF + world * _HDR_STRIDE, _PAGE)
        self.result_off = self.data_off + 2 * world * self.slot_bytes
        self.size = self.result_off + self.slot_bytes

    def slot_off(self, parity: int, rank: int) -> int:
        return self.data_off + (parity * self.world + rank) * self.slot_bytes


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class ShmCommunicator:
    """Shared-memory collectives for small CPU tensors; the rest via ``fallback``.

    Collective: every rank of ``fallback``'s group constructs it at the same
    time. Raises :class:`ShmUnavailable` (on every rank alike) when the ranks
    cannot map one segment, e.g. they run on different hosts.

    ``max_bytes``: largest per-rank payload carried through shared memory
    (rank 0's value is used by all). ``timeout``: seconds to wait for a peer
    before raising (default ``$TP_ENGINE_SHM_TIMEOUT`` or 300). ``native``:
    True requires the compiled helper, False forces the pure-Python path,
    None (default) uses the helper where every rank could build it.
    ``close_fallback``: close() also closes the fallback communicator.
    """

    def __init__(
        self,
        fallback: Any,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        timeout: float | None = None,
        native: bool | None = None,
        close_fallback: bool = True,
    ):
        self.fallback = fallback
        self.rank = int(fallback.rank)
        self.world_size = int(fallback.world_size)
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        self.timeout = float(timeout)
        self.close_fallback = close_fallback
        # More ranks than cores: a spinning rank only delays the one it waits
        # for, so give the CPU away at once instead of busy-waiting first. A rank
        # pinned by the launcher (TP_ENGINE_CPUS, launch/topology.py) owns its CPUs,
        # which no other rank shares: it may spin however few they are.
        pinned = bool(os.environ.get("TP_ENGINE_CPUS"))
        self._spin_s = 0.0 if not pinned and self.world_size > _usable_cpus() else SPIN_S
        if os.environ.get(SPIN_ENV):
            self._spin_s = float(os.environ[SPIN_ENV]) * 1e-6
        self._seq = 0
        self._broken: str | None = None
        self._closed = False
        self._ctx = None
        self._mm: mmap.mmap | None = None

        lib = load_native() if native is not False else None
        if native is True and lib is None:
            raise RuntimeError("ShmCommunicator(native=True): the C helper could not be built (see log)")
        # All ranks must speak the same variant (the native all-reduce may use
        # the two-phase protocol, the Python one never does).
        votes = torch.tensor([0 if lib is None else 1], dtype=torch.int64)
        fallback.all_reduce_(votes)
        self._lib = lib if int(votes.item()) == self.world_size else None
        self.native = self._lib is not None
        self.name = "shm" if self.native else "shm-py"

        mm, layout = self._rendezvous(int(max_bytes))
        self._mm = mm
        self._layout = layout
        self.max_bytes = layout.max_bytes
        self._views(mm, layout)
        if self._lib is not None:
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            self._ctx = self._lib.tp_shm_new(
                base, self.world_size, self.rank, _HDR_OFF, _HDR_STRIDE, _DONE_OFF, layout.data_off,
                layout.slot_bytes, layout.result_off, TWO_PHASE_MIN_BYTES, self._spin_s, YIELD_S, self.timeout,
            )
            if not self._ctx:
                raise MemoryError("tp_shm_new failed")
            self._c_allreduce = self._lib.tp_shm_allreduce
            self._c_exchange = self._lib.tp_shm_exchange
        # Runs on close() or garbage collection. Not at interpreter exit: the
        # file is already unlinked, the kernel frees the memory with the last
        # mapping, and freeing the C context there could pull it from under a
        # late collective.
        self._finalizer = weakref.finalize(self, ShmCommunicator._release, self._lib, self._ctx, mm)
        self._finalizer.atexit = False

    # -- setup -----------------------------------------------------------------------

    def _rendezvous(self, max_bytes: int) -> tuple[mmap.mmap, _Layout]:
        fb = self.fallback
        msg = torch.zeros(_PATH_BYTES, dtype=torch.uint8)
        path = None
        mm = None
        try:
            if self.rank == 0:
                layout = _Layout(self.world_size, max_bytes)
                nonce = secrets.token_bytes(_NONCE_BYTES)
                try:
                    path, mm = _create_segment(layout, nonce)
                    blob = path.encode() + b"\0" + nonce + max_bytes.to_bytes(8, "little")
                    msg[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
                except OSError as exc:
                    log.warning("shm: cannot create a segment in %s: %s", _shm_dir(), exc)
            fb.broadcast_(msg, src=0)
            raw = msg.numpy().tobytes()
            name, _, rest = raw.partition(b"\0")
            ok = 1 if (self.rank == 0 and mm is not None) else 0
            if self.rank != 0 and name:
                nonce = rest[:_NONCE_BYTES]
                max_bytes = int.from_bytes(rest[_NONCE_BYTES : _NONCE_BYTES + 8], "little")
                layout = _Layout(self.world_size, max_bytes)
                mm = _attach_segment(name.decode(), layout, nonce)
                ok = 1 if mm is not None else 0
            oks = torch.tensor([ok], dtype=torch.int64)
            fb.all_reduce_(oks)
            if int(oks.item()) != self.world_size:
                hosts = self._hostnames()
                if mm is not None:
                    mm.close()
                raise ShmUnavailable(
                    f"ranks cannot share memory (only {int(oks.item())} of {self.world_size} mapped "
                    f"the segment); hosts by rank: {hosts}"
                )
            fb.barrier()  # every rank has it mapped: the name is no longer needed
        finally:
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return mm, layout

    def _hostnames(self) -> list[str]:
        t = torch.zeros(1, 64, dtype=torch.uint8)
        name = socket.gethostname().encode()[:64]
        t[0, : len(name)] = torch.frombuffer(bytearray(name), dtype=torch.uint8)
        allt = self.fallback.all_gather(t, dim=0)
        return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in allt]

    def _views(self, mm: mmap.mmap, layout: _Layout) -> None:
        w = self.world_size
        self._slots = [
            [torch.frombuffer(mm, dtype=torch.uint8, count=layout.slot_bytes, offset=layout.slot_off(p, r)) for r in range(w)]
            for p in (0, 1)
        ]
        self._np_slots = [
            [np.frombuffer(mm, dtype=np.uint8, count=layout.slot_bytes, offset=layout.slot_off(p, r)) for r in range(w)]
            for p in (0, 1)
        ]
        # Counters for the pure-Python path (8-byte aligned: single-copy atomic loads/stores).
        self._arrive = np.ndarray((w,), dtype=np.uint64, buffer=mm, offset=_HDR_OFF, strides=(_HDR_STRIDE,))

    @staticmethod
    def _release(lib: Any, ctx: Any, mm: mmap.mmap) -> None:
        if lib is not None and ctx:
            lib.tp_shm_free(ctx)
        try:
            mm.close()
        except BufferError:  # views still exported somewhere: the GC unmaps later
            pass

    # -- the protocol ----------------------------------------------------------------

    def _check(self) -> None:
        if self._broken:
            raise RuntimeError(self._broken)
        if self._closed:
            raise RuntimeError("ShmCommunicator is closed")

    def _fail(self, rc: int, seq: int, what: str) -> None:
        if rc < 0:
            raise RuntimeError(f"ShmCommunicator: internal error {rc} in {what}")
        self._broken = (
            f"ShmCommunicator: rank {rc - 1} did not arrive at collective #{seq} ({what}) within "
            f"{self.timeout:g} s (rank {self.rank} waited); set {TIMEOUT_ENV} to wait longer"
        )
        self._lib = None  # the fast path now falls through to _check(), which raises
        raise RuntimeError(self._broken)

    def _exchange(self, src: torch.Tensor | None, what: str) -> int:
        """Put src's bytes in this rank's slot, arrive, wait for all. Returns seq."""
        nbytes = 0 if src is None else src.nbytes
        if self._lib is None:
            return self._py_exchange(src.reshape(-1).view(torch.uint8).numpy() if nbytes else None, what)
        self._seq = seq = self._seq + 1
        rc = self._c_exchange(self._ctx, src.data_ptr() if nbytes else None, nbytes, seq)
        if rc:
            self._fail(rc, seq, what)
        return seq

    def _py_exchange(self, src: np.ndarray | None, what: str) -> int:
        """The pure-Python _exchange; ``src`` is a flat uint8 array."""
        self._seq = seq = self._seq + 1
        if src is not None:
            self._np_slots[seq & 1][self.rank][: src.shape[0]] = src
        _fence()  # payload before counter (release)
        arrive = self._arrive
        arrive[self.rank] = seq
        start = None
        for r in range(self.world_size):
            while arrive[r] < seq:
                now = time.perf_counter()
                if start is None:
                    start = now
                elapsed = now - start
                if elapsed >= self._spin_s:
                    if elapsed > self.timeout:
                        self._fail(r + 1, seq, what)
                    if elapsed >= YIELD_S:
                        time.sleep(50e-6)
                    else:
                        _sched_yield()
        _fence()  # counters before payload reads (acquire)
        return seq

    # -- collectives -------------------------------------------------------------------

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        code = _C_DTYPES.get(tensor.dtype)
        if (
            code is not None
            and self._lib is not None
            and tensor.is_cpu
            and tensor.nbytes <= self.max_bytes
            and tensor.is_contiguous()
        ):
            self._seq = seq = self._seq + 1
            rc = self._c_allreduce(self._ctx, tensor.data_ptr(), tensor.numel(), code, seq)
            if rc:
                self._fail(rc, seq, "all_reduce_")
            return tensor
        return self._all_reduce_general(tensor)

    def _all_reduce_general(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check()
        work_dtype = _UPCAST.get(tensor.dtype, tensor.dtype)
        nbytes = tensor.numel() * work_dtype.itemsize
        if work_dtype not in _C_DTYPES or not tensor.is_cpu or nbytes > self.max_bytes:
            return self.fallback.all_reduce_(tensor)
        if work_dtype != tensor.dtype or not tensor.is_contiguous():
            work = tensor.to(dtype=work_dtype, memory_format=torch.contiguous_format, copy=True)
            self.all_reduce_(work)
            tensor.copy_(work)
            return tensor
        if self._lib is not None:
            self._seq = seq = self._seq + 1
            rc = self._c_allreduce(self._ctx, tensor.data_ptr(), tensor.numel(), _C_DTYPES[tensor.dtype], seq)
            if rc:
                self._fail(rc, seq, "all_reduce_")
            return tensor
        # Pure-Python path, in numpy (several times less overhead than torch ops).
        flat = tensor.numpy().reshape(-1)
        seq = self._py_exchange(flat.view(np.uint8), "all_reduce_")
        n = tensor.nbytes
        slots = [s[:n].view(flat.dtype) for s in self._np_slots[seq & 1]]
        if self.world_size == 1:
            return tensor
        np.add(slots[0], slots[1], out=flat)  # rank order: same bits on every rank
        for s in slots[2:]:
            np.add(flat, s, out=flat)
        return tensor

    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        self._check()
        dim, sizes = resolve_gather(tensor, dim, sizes, self.rank, self.world_size)
        shape = list(tensor.shape)
        outer, inner = gather_layout(shape, tensor.element_size(), dim)  # inner: bytes per step along dim
        if not tensor.is_cpu or outer * max(sizes) * inner > self.max_bytes:
            return self.fallback.all_gather(tensor, dim=dim, sizes=sizes)
        src = tensor.detach().contiguous()
        seq = self._exchange(src, "all_gather")
        slots = self._slots[seq & 1]
        total = sum(sizes)
        out = torch.empty(shape[:dim] + [total] + shape[dim + 1 :], dtype=tensor.dtype)
        dst = out.view(-1).view(torch.uint8).view(outer, total * inner)
        col = 0
        for r, s in enumerate(sizes):
            width = s * inner
            if width:
                dst[:, col : col + width].copy_(slots[r][: outer * width].view(outer, width))
            col += width
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check()
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast_: src {src} outside world of {self.world_size}")
        if not tensor.is_cpu or tensor.nbytes > self.max_bytes:
            return self.fallback.broadcast_(tensor, src)
        if self.rank == src:
            self._exchange(tensor.detach().contiguous(), "broadcast_")
            return tensor
        seq = self._exchange(None, "broadcast_")
        n = tensor.nbytes
        if n:
            data = self._slots[seq & 1][src][:n]
            if tensor.is_contiguous():
                tensor.view(-1).view(torch.uint8).copy_(data)
            else:
                tensor.copy_(data.view(tensor.dtype).view(tensor.shape))
        return tensor

    def barrier(self) -> None:
        self._check()
        self._exchange(None, "barrier")

    def close(self) -> None:
        """Unmap the segment (already unlinked) and close the fallback if asked."""
        if self._closed:
            return
        self._closed = True
        self._lib = None  # the fast path now falls through to _check(), which raises
        self._slots = []
        self._np_slots = []
        self._arrive = None
        self._finalizer()
        if self.close_fallback:
            self.fallback.close()


def _create_segment(layout: _Layout, nonce: bytes) -> tuple[str, mmap.mmap]:
    directory = _shm_dir()
    for _ in range(10):
        path = os.path.join(directory, f"tp_engine-{os.getpid()}-{secrets.token_hex(8)}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise OSError("could not pick a fresh shared-memory file name")
    try:
        os.ftruncate(fd, layout.size)
        if hasattr(os, "posix_fallocate"):
            # Reserve the pages now: a too-small /dev/shm (Docker's default is
            # 64 MB) then fails here with ENOSPC instead of SIGBUS on first touch.
            os.posix_fallocate(fd, 0, layout.size)
        mm = mmap.mmap(fd, layout.size)  # MAP_SHARED, zero-filled
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    mm[: len(_MAGIC)] = _MAGIC
    mm[len(_MAGIC) : len(_MAGIC) + _NONCE_BYTES] = nonce
    return path, mm


def _attach_segment(path: str, layout: _Layout, nonce: bytes) -> mmap.mmap | None:
    """Map the creator's segment; None when it is not the same one (other host)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != layout.size:
            return None
        mm = mmap.mmap(fd, layout.size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if mm[: len(_MAGIC) + _NONCE_BYTES] != _MAGIC + nonce:
        mm.close()
        return None
    return mm


def try_shm_communicator(fallback: Any, max_bytes: int = DEFAULT_MAX_BYTES, **kwargs: Any) -> ShmCommunicator | None:
    """A ShmCommunicator over ``fallback``, or None where ranks cannot share memory.

    Collective, like the constructor; every rank gets None or every rank a
    communicator.
    """
    try:
        return ShmCommunicator(fallback, max_bytes, **kwargs)
    except ShmUnavailable as exc:
        log.info("shm: %s", exc)
        return None
