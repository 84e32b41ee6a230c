"""Which network interface reaches ``MASTER_ADDR``, and telling gloo to use it.

Gloo binds the address its host name resolves to. When the name does not
resolve, or resolves to loopback (``127.0.1.1`` in many /etc/hosts files),
gloo listens on loopback, the other hosts can never connect, and the error
only hints at ``GLOO_SOCKET_IFNAME``. The kernel already knows the answer:
connecting a UDP socket (no packet is sent) to MASTER_ADDR picks the source
address the route uses, and that address belongs to exactly one interface.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, MutableMapping, Sequence

import psutil

__all__ = [
    "InterfaceChoice",
    "choose_interface",
    "ensure_gloo_interface",
    "host_addresses",
    "hostname_address",
    "interface_addresses",
    "interface_of",
    "rendezvous_source",
    "resolve_ipv4",
    "source_address",
]

# (address, prefix length) per interface name.
AddressTable = Mapping[str, Sequence[tuple[str, int]]]


@dataclass(frozen=True)
class InterfaceChoice:
    """The interface (and its address) whose route reaches ``target``."""

    name: str
    address: str
    target: str


def resolve_ipv4(host: str) -> str:
    """``host`` as an IPv4 address; ValueError naming it when it does not resolve."""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError) as exc:
        raise ValueError(f"MASTER_ADDR {host!r} does not resolve to an IPv4 address ({exc})") from None


def source_address(target_ip: str) -> str:
    """The local address the kernel's route to ``target_ip`` leaves from (sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target_ip, 9))  # UDP connect only selects a route
        return s.getsockname()[0]


def interface_addresses() -> dict[str, list[tuple[str, int]]]:
    """Every interface's IPv4 addresses with their prefix lengths."""
    table: dict[str, list[tuple[str, int]]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET:
                prefix = ipaddress.IPv4Network(f"0.0.0.0/{a.netmask}").prefixlen if a.netmask else 32
                table.setdefault(name, []).append((a.address, prefix))
    return table


def interface_of(address: str, table: AddressTable) -> str | None:
    """The interface that owns ``address`` in ``table``, or None (pure)."""
    for name, addrs in table.items():
        if any(ip == address for ip, _ in addrs):
            return name
    return None


def hostname_address() -> str | None:
    """What gloo binds by default: this host name's IPv4 address, None if it does not resolve."""
    try:
        return resolve_ipv4(socket.gethostname())
    except ValueError:
        return None


def choose_interface(target: str, table: AddressTable | None = None) -> InterfaceChoice | None:
    """The interface whose address reaches ``target`` (a name or an address).

    None when ``target`` is a loopback address (one host: gloo's default
    works) or no interface owns the source address (unusual routing).
    """
    target_ip = resolve_ipv4(target)
    if ipaddress.ip_address(target_ip).is_loopback:
        return None
    source = source_address(target_ip)
    name = interface_of(source, interface_addresses() if table is None else table)
    return None if name is None else InterfaceChoice(name, source, target_ip)


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_gloo_interface(
    rank: int,
    environ: MutableMapping[str, str] | None = None,
    log: Callable[[str], None] = _stderr_line,
) -> InterfaceChoice | None:
    """Set ``GLOO_SOCKET_IFNAME`` (and ``NCCL_SOCKET_IFNAME``) to the interface that reaches ``MASTER_ADDR``.

    Each variable already set is left alone; nothing happens when MASTER_ADDR
    is unset or loopback. NCCL picks the first non-loopback interface by
    itself, which on a multi-homed host need not be the one that reaches the
    others; its bootstrap and socket transport get the same route as gloo.
    Rank 0 says which interface it chose for gloo in one line; another rank
    speaks only when its host name would have made gloo bind elsewhere (the
    case this exists for). Returns the choice made for gloo, or None.
    """
    env = os.environ if environ is None else environ
    gloo_set, nccl_set = bool(env.get("GLOO_SOCKET_IFNAME")), bool(env.get("NCCL_SOCKET_IFNAME"))
    if (gloo_set and nccl_set) or not env.get("MASTER_ADDR"):
        return None
    choice = choose_interface(env["MASTER_ADDR"])
    if choice is None:
        return None
    if not nccl_set:
        env["NCCL_SOCKET_IFNAME"] = choice.name
    if gloo_set:
        return None
    env["GLOO_SOCKET_IFNAME"] = choice.name
    default = hostname_address()
    if rank == 0 or default != choice.address:
        why = "" if default == choice.address else (
            f"; the host name {socket.gethostname()!r} "
            + ("does not resolve" if default is None else f"resolves to {default}")
        )
        log(
            f"tp-engine: rank {rank} uses interface {choice.name} ({choice.address}) for gloo, the one that "
            f"reaches MASTER_ADDR {choice.target}{why}; set GLOO_SOCKET_IFNAME to choose another"
        )
    return choice


def host_addresses() -> list[tuple[str, int]]:
    """This host's non-loopback IPv4 (address, prefix length) pairs, where peers may reach it."""
    return [
        (ip, prefix)
        for addrs in interface_addresses().values()
        for ip, prefix in addrs
        if not ipaddress.ip_address(ip).is_loopback
    ]


def rendezvous_source(environ: Mapping[str, str] | None = None) -> str | None:
    """The local address that reaches ``MASTER_ADDR``; None when unset, loopback or unresolvable."""
    env = os.environ if environ is None else environ
    target = env.get("MASTER_ADDR")
    if not target:
        return None
    try:
        ip = resolve_ipv4(target)
        return None if ipaddress.ip_address(ip).is_loopback else source_address(ip)
    except (ValueError, OSError):
        return None
