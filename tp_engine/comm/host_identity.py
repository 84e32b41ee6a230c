"""Which ranks share a host, from facts rather than the hostname.

Two processes share a host for the engine's purposes when they can share
memory: the intra-host all-reduce maps one segment from every rank. A
hostname proves nothing (containers and network namespaces set their own;
cloned VMs keep the same one), so every rank contributes:

- the kernel's boot id (``/proc/sys/kernel/random/boot_id``): ranks with
  different boot ids run on different kernels, hence different machines;
- its hostname (reported, and the machine key where there is no boot id);
- a probe: each rank creates a small shared-memory file holding a random
  token; every rank with the same boot id tries to open the others' files
  and read the token back. Two containers on one kernel with private
  ``/dev/shm`` mounts share a boot id but fail this probe: different hosts.

:func:`group_hosts` turns the exchanged facts into host groups (pure, and
property-tested); :func:`detect_hosts` is the collective that gathers them.

For tests only: ``TP_ENGINE_HOST_ID`` replaces the boot id with a label,
either one label for this rank or a comma-separated list with one label per
global rank (the same variable then works for every rank of a launch), so
one machine can pose as several hosts. Ranks with the same label must still
pass the shared-memory probe to be grouped together.
"""
from __future__ import annotations

import os
import secrets
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["HOST_ID_ENV", "HostLayout", "RankFacts", "detect_hosts", "group_hosts", "local_facts"]

HOST_ID_ENV = "TP_ENGINE_HOST_ID"
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_FIELD_BYTES = 128  # fixed width of each exchanged string
_TOKEN_BYTES = 16


@dataclass(frozen=True)
class RankFacts:
    """What one rank knows about its machine."""

    machine: str  # boot id (or the test override); "" when unknown
    hostname: str

    @property
    def key(self) -> str:
        """Ranks with different keys are certainly on different machines."""
        return self.machine or f"hostname:{self.hostname}"


@dataclass(frozen=True)
class HostLayout:
    """Ranks grouped by host.

    ``groups[h]`` lists host h's ranks in ascending order; hosts are ordered by
    their lowest rank, which is the host's leader. ``hostnames[h]`` is the
    leader's hostname.
    """

    groups: tuple[tuple[int, ...], ...]
    hostnames: tuple[str, ...]

    def __post_init__(self) -> None:
        ranks = sorted(r for g in self.groups for r in g)
        if ranks != list(range(len(ranks))) or any(not g for g in self.groups):
            raise ValueError(f"host groups must partition the ranks 0..n-1: {self.groups}")
        if any(list(g) != sorted(g) for g in self.groups) or [g[0] for g in self.groups] != sorted(g[0] for g in self.groups):
            raise ValueError(f"host groups must be sorted (ranks within, hosts by leader): {self.groups}")
        if len(self.hostnames) != len(self.groups):
            raise ValueError("one hostname per host group")

    @property
    def world_size(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def n_hosts(self) -> int:
        return len(self.groups)

    @property
    def leaders(self) -> tuple[int, ...]:
        return tuple(g[0] for g in self.groups)

    @property
    def max_local(self) -> int:
        """The most ranks on any one host."""
        return max(len(g) for g in self.groups)

    def host_of(self, rank: int) -> int:
        for h, g in enumerate(self.groups):
            if rank in g:
                return h
        raise ValueError(f"rank {rank} is not in this layout of {self.world_size} ranks")

    def describe(self) -> str:
        """One line, e.g. ``2 hosts: hostA [0, 1], hostB [2, 3]``."""
        parts = ", ".join(f"{name} {list(g)}" for name, g in zip(self.hostnames, self.groups))
        return f"{self.n_hosts} host{'s' if self.n_hosts != 1 else ''}: {parts}"


def group_hosts(facts: Sequence[RankFacts], can_map: Sequence[Sequence[bool]]) -> HostLayout:
    """Group ranks into hosts from exchanged facts. Pure.

    ``can_map[i][j]``: rank i opened rank j's probe segment and read its token
    (the diagonal is ignored). Two ranks share a host when they have the same
    machine key and each can map the other's segment. Ranks are placed in
    ascending order into the first host whose every member shares a host with
    them, so each group is one where all pairs can share memory, even if the
    probe results were not transitive.
    """
    n = len(facts)
    if len(can_map) != n or any(len(row) != n for row in can_map):
        raise ValueError(f"can_map must be {n}x{n} for {n} ranks")
    groups: list[list[int]] = []
    for r in range(n):
        for g in groups:
            if all(facts[m].key == facts[r].key and can_map[r][m] and can_map[m][r] for m in g):
                g.append(r)
                break
        else:
            groups.append([r])
    return HostLayout(tuple(tuple(g) for g in groups), tuple(facts[g[0]].hostname for g in groups))


def _boot_id() -> str:
    try:
        with open(_BOOT_ID_PATH) as f:
            return f.read().strip()
    except OSError:
        return ""  # not Linux: the hostname and the probe decide


def _override(rank: int) -> str | None:
    value = os.environ.get(HOST_ID_ENV, "").strip()
    if not value:
        return None
    labels = value.split(",")
    if len(labels) == 1:
        return labels[0].strip()
    if rank >= len(labels):
        raise ValueError(f"{HOST_ID_ENV}={value!r} names {len(labels)} ranks, but this is rank {rank}")
    return labels[rank].strip()


def local_facts(rank: int) -> RankFacts:
    """This process's facts (with the test override applied)."""
    label = _override(rank)
    machine = f"override:{label}" if label is not None else _boot_id()
    return RankFacts(machine=machine, hostname=socket.gethostname())


# -- the collective ----------------------------------------------------------------


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _encode(*fields: bytes) -> torch.Tensor:
    row = torch.zeros(1, _FIELD_BYTES * len(fields), dtype=torch.uint8)
    for i, f in enumerate(fields):
        if len(f) > _FIELD_BYTES:
            raise ValueError(f"host identity field too long: {f[:40]!r}...")
        if f:
            row[0, i * _FIELD_BYTES : i * _FIELD_BYTES + len(f)] = torch.frombuffer(bytearray(f), dtype=torch.uint8)
    return row


def _decode(row: torch.Tensor, count: int) -> list[bytes]:
    raw = bytes(row.tolist())
    return [raw[i * _FIELD_BYTES : (i + 1) * _FIELD_BYTES].rstrip(b"\0") for i in range(count)]


def _create_probe() -> tuple[str, bytes]:
    token = secrets.token_hex(_TOKEN_BYTES).encode()  # hex: no NUL bytes, which _decode strips
    path = os.path.join(_shm_dir(), f"tp_engine-host-{os.getpid()}-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, token)
    finally:
        os.close(fd)
    return path, token


def _read_probe(path: str, token: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(token) + 1) == token
    except OSError:
        return False


def detect_hosts(comm: Any) -> HostLayout:
    """Group the ranks of ``comm`` by host. Collective: every rank calls it.

    Costs three small all-gathers and a barrier on ``comm`` (use it before a
    fast path exists; gloo takes a few milliseconds). Every rank returns the
    same layout.
    """
    rank, world = int(comm.rank), int(comm.world_size)
    facts = local_facts(rank)
    try:
        path, token = _create_probe()
    except OSError:
        path, token = "", b""  # no shared memory here: this rank shares a host with no one
    try:
        mine = _encode(facts.machine.encode(), facts.hostname.encode(), path.encode(), token)
        rows = comm.all_gather(mine, dim=0)
        table = [_decode(rows[r], 4) for r in range(world)]
        everyone = [RankFacts(m.decode(), h.decode(errors="replace")) for m, h, _, _ in table]
        reach = torch.zeros(1, world, dtype=torch.uint8)
        for j, (_, _, other_path, other_token) in enumerate(table):
            same_machine = everyone[j].key == facts.key
            if j == rank or (same_machine and other_path and _read_probe(other_path.decode(), other_token)):
                reach[0, j] = 1
        matrix = comm.all_gather(reach, dim=0).tolist()
        comm.barrier()  # every rank has read every probe it could: the files may go
    finally:
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return group_hosts(everyone, [[bool(v) for v in row] for row in matrix])
