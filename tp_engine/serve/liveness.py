"""Noticing a lost rank in seconds instead of at a collective's timeout.

At start every rank tells the others its process id and host
(one all_gather). Each rank then checks, twice a second, that the
processes of its peers on the same host still run (a zombie counts as
dead); the first one found gone is reported to ``on_lost``. Peers on other
hosts are not watched here: their loss surfaces as a failed collective
(gloo at once, shared memory and MPI after their timeouts) or through the
launcher (torchrun and mpirun stop the whole job).
"""
from __future__ import annotations

import os
import socket
import threading
import zlib
from typing import Callable

import psutil
import torch

from ..comm.base import Communicator

__all__ = ["PeerWatch"]

CHECK_INTERVAL_S = 0.5


def _host_key() -> int:
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    return zlib.crc32(f"{socket.gethostname()}|{boot}".encode())


class PeerWatch:
    """The processes of this rank's same-host peers (collective to construct)."""

    def __init__(self, comm: Communicator, device: torch.device | str = "cpu"):
        host = _host_key()
        me = torch.tensor([[os.getpid(), host]], dtype=torch.int64, device=device)
        table = comm.all_gather(me, dim=0).cpu().tolist() if comm.world_size > 1 else [[os.getpid(), host]]
        self.pids = {r: int(pid) for r, (pid, _) in enumerate(table)}
        self.watched: dict[int, psutil.Process] = {}
        for r, (pid, h) in enumerate(table):
            if r != comm.rank and h == host:
                try:
                    self.watched[r] = psutil.Process(int(pid))
                except psutil.Error:  # another PID namespace: cannot watch it from here
                    pass
        self._stopped = threading.Event()

    def lost(self) -> tuple[int, int] | None:
        """(rank, pid) of a watched peer whose process is gone, or None."""
        for rank, proc in self.watched.items():
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return rank, proc.pid
        return None

    def start(self, on_lost: Callable[[int, int], None]) -> None:
        """Check in a daemon thread until :meth:`stop`; call ``on_lost(rank, pid)`` once."""
        if not self.watched:
            return

        def run() -> None:
            while not self._stopped.wait(CHECK_INTERVAL_S):
                found = self.lost()
                if found is not None and not self._stopped.is_set():
                    on_lost(*found)
                    return

        threading.Thread(target=run, name="tp-engine-peer-watch", daemon=True).start()

    def stop(self) -> None:
        """A normal end is under way: peers leaving is no longer a loss."""
        self._stopped.set()
