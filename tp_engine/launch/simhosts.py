"""Simulated hosts on one Linux machine: network namespaces on a bridge.

``SimHosts(n)`` makes ``n`` hosts. Each is a network namespace with one
interface ``eth0`` (``10.77.0.1``, ``10.77.0.2``, ...) on a bridge that
lives in a namespace of its own, plus a UTS and a mount namespace held open
by a small process: its own host name, a private tmpfs on ``/dev/shm`` and
its own ``/etc/hosts``. So nothing shared by accident makes two hosts look
like one: the shared-memory all-reduce cannot map another host's segment,
and host names differ. The file system (``/tmp``, the checkout, the venv) is
shared, as it would be over NFS.

Commands run on host i through ``nsenter`` into those namespaces
(:meth:`SimHosts.popen`, :meth:`SimHosts.run`, :meth:`SimHosts.command`);
:meth:`SimHosts.shape` limits a host's egress bandwidth with ``tc tbf``.
Link latency cannot be added in this kernel (no netem, fq or etf qdisc);
:mod:`.latency` emulates it above the network instead.

Needs root, ``ip``, ``unshare`` and ``nsenter``; :func:`unavailable` says
why not when they are missing. Names carry this process's pid and a random
token, so runs never collide; ``close()`` (or leaving the ``with`` block)
kills every process started in the hosts and deletes the namespaces, and a
new ``SimHosts`` removes those of runs whose process is gone.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["SimHost", "SimHosts", "unavailable"]

PREFIX = "tpsim"
_NAME_MODES = ("resolve", "loopback", "none")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why simulated hosts cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "simulated hosts need root (network, UTS and mount namespaces)"
    missing = [tool for tool in ("ip", "unshare", "nsenter", "tc") if shutil.which(tool) is None]
    if missing:
        return f"simulated hosts need {', '.join(missing)} on PATH"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class SimHost:
    index: int
    name: str  # host name inside it
    netns: str
    address: str  # eth0's address
    holder_pid: int  # the process holding its UTS and mount namespaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_processes(netns: str) -> None:
    pids = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_stale() -> list[str]:
    """Delete namespaces left by SimHosts runs whose process has ended; their names."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or name.startswith(f"{PREFIX}probe"):
            continue
        try:
            owner = int(name[len(PREFIX):].split("x", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(owner):
            _kill_netns_processes(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


class SimHosts:
    """``n`` simulated hosts joined by a bridge (a context manager).

    ``names``: ``"resolve"`` (every host name resolves to its eth0 address on
    every host, through each host's own /etc/hosts), ``"loopback"`` (a
    host's own name resolves to 127.0.1.1, as Debian's installer writes it)
    or ``"none"`` (host names do not resolve at all).
    """

    def __init__(self, n: int, names: str = "resolve", subnet: str = "10.77.0.0/24", shm_size: str = "512m"):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"SimHosts: n must be a positive integer, got {n!r}")
        if names not in _NAME_MODES:
            raise ValueError(f"SimHosts: names must be one of {', '.join(_NAME_MODES)}, not {names!r}")
        net = ipaddress.IPv4Network(subnet)
        if net.num_addresses - 2 < n:
            raise ValueError(f"SimHosts: subnet {subnet} has no room for {n} hosts")
        reason = unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        remove_stale()
        self.n = n
        self.names = names
        self.tag = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.prefixlen = net.prefixlen
        self._addresses = [str(net.network_address + i + 1) for i in range(n)]
        self._hostnames = [f"{self.tag}-{i}" for i in range(n)]
        self._switch = f"{self.tag}-sw"
        self._dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self._shm_size = shm_size
        self._procs: list[subprocess.Popen] = []
        self._holders: list[subprocess.Popen] = []
        self.hosts: list[SimHost] = []
        self._closed = False
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------------

    def _hosts_file(self, i: int) -> Path:
        lines = ["127.0.0.1 localhost"]
        if self.names == "resolve":
            lines += [f"{a} {h}" for a, h in zip(self._addresses, self._hostnames)]
        elif self.names == "loopback":
            lines.append(f"127.0.1.1 {self._hostnames[i]}")
        path = self._dir / f"hosts{i}"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _build(self) -> None:
        _ip("netns", "add", self._switch)
        _ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._switch, "link", "set", "br0", "up")
        for i in range(self.n):
            ns = f"{self.tag}-h{i}"
            _ip("netns", "add", ns)
            _ip("-n", self._switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self._switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self._addresses[i]}/{self.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            script = (
                f"hostname {self._hostnames[i]} && "
                f"mount -t tmpfs -o size={self._shm_size},mode=1777 {self.tag} /dev/shm && "
                f"mount --bind {self._hosts_file(i)} /etc/hosts && "
                "echo $$ && exec sleep infinity"
            )
            holder = subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "--propagation", "private", "--fork",
                 "sh", "-c", script],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            )
            self._holders.append(holder)
            line = holder.stdout.readline().strip()
            if not line.isdigit():
                holder.kill()
                raise RuntimeError(f"simulated host {i} did not start: {line} {holder.stderr.read().strip()}")
            self.hosts.append(SimHost(i, self._hostnames[i], ns, self._addresses[i], int(line)))

    # -- running commands ----------------------------------------------------------

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs on host ``i`` (its network, host name and /dev/shm)."""
        h = self.hosts[i]
        return ["nsenter", "--target", str(h.holder_pid), "--net", "--uts", "--mount", "--", *argv]

    def popen(self, i: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` on host ``i`` (its own session, killed by ``close()``)."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(i, argv), env=None if env is None else dict(env), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, i: int, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``i`` to completion (output captured as text unless told otherwise)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(i, argv), env=None if env is None else dict(env), timeout=timeout, **kwargs)

    def shape(self, i: int, rate: str, burst: str = "64kb", latency: str = "50ms") -> None:
        """Limit host ``i``'s egress to ``rate`` (tc syntax, e.g. ``"1gbit"``) with a token bucket."""
        cmd = ["ip", "netns", "exec", self.hosts[i].netns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
               "rate", rate, "burst", burst, "latency", latency]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ValueError(f"tc tbf on host {i} failed: {proc.stderr.strip()}")

    def unshape(self, i: int) -> None:
        subprocess.run(["ip", "netns", "exec", self.hosts[i].netns, "tc", "qdisc", "del", "dev", "eth0", "root"],
                       capture_output=True)

    # -- launcher helpers --------------------------------------------------------------

    def hostfile(self, slots: int = 1) -> Path:
        """An Open MPI hostfile naming every host with ``slots`` slots."""
        path = self._dir / "hostfile"
        path.write_text("".join(f"{h.name} slots={slots}\n" for h in self.hosts))
        return path

    def rsh_agent(self) -> Path:
        """A script for ``mpirun --mca plm_rsh_agent``: runs ``<host> <command...>`` on that simulated host
        instead of over ssh (the command is one shell string, as ssh takes it)."""
        path = self._dir / "rsh-agent"
        cases = "".join(
            f"  {h.name}|{h.address}) pid={h.holder_pid} ;;\n" for h in self.hosts
        )
        path.write_text(
            "#!/bin/sh\n"
            "# Open MPI calls: rsh-agent [options] <host> <command...>; ssh options are skipped.\n"
            'while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done\n'
            'host="$1"; shift\n'
            'case "$host" in\n'
            f"{cases}"
            '  *) echo "rsh-agent: unknown simulated host $host" >&2; exit 255 ;;\n'
            "esac\n"
            'exec nsenter --target "$pid" --net --uts --mount -- /bin/sh -c "$*"\n'
        )
        path.chmod(0o755)
        return path

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Kill everything started in the hosts and delete the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
        for i in range(self.n):
            _kill_netns_processes(f"{self.tag}-h{i}")  # children that left their session (mpirun's daemons)
        for holder in self._holders:
            if holder.poll() is None:
                try:
                    os.killpg(holder.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self._procs + self._holders:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        for i in range(self.n):
            _ip("netns", "del", f"{self.tag}-h{i}", check=False)
        _ip("netns", "del", self._switch, check=False)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "SimHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leave namespaces behind
        try:
            self.close()
        except Exception:
            pass
