"""This host's CPU topology, and one rank per memory domain, pinned inside it.

A rank is a whole machine: one process per host, or per NUMA node (or per L3
domain, a CCD on an EPYC), its threads pinned inside that domain, so every
weight it streams comes from its own memory controllers and stays in its own
L3. This module reads the topology from sysfs (:func:`read_topology`, pure
given a ``root``), plans which CPUs each local rank takes (:func:`plan_ranks`,
pure) and pins a rank (:func:`pin_rank`). Nothing here imports torch.

The contract between the launcher and a rank (environment, per rank):

``TP_ENGINE_CPUS``
    The rank's CPUs in cpulist syntax, e.g. ``0-7,64-71``. The order matters:
    one CPU of every physical core first, then their SMT siblings, so a pool
    that pins worker ``i`` to the ``i``-th CPU of this list puts its first
    workers on distinct cores. ``os.sched_getaffinity`` loses this order; a
    pool that wants it reads this variable. The launcher (``tp-engine --nproc N
    --ranks-per-host auto``, :func:`tp_engine.launch` with ``placements=``) sets
    it; the rank calls :func:`pin_rank` first thing, before torch, OpenMP or
    the C kernel pool create a thread (threads inherit the mask of the thread
    that creates them).
``TP_ENGINE_THREADS``
    Threads of the C kernel pool (its meaning belongs to that pool). The
    launcher sets it from the plan: one per physical core of the rank's CPUs
    unless ``--threads`` says otherwise. ``OMP_NUM_THREADS`` gets the same
    value for torch's own pool.

A rank started by torchrun or mpirun with ``--ranks-per-host`` has no
``TP_ENGINE_CPUS``: it plans the whole host itself (every local rank computes
the same plan from the same sysfs and the same mask) and takes its local
rank's share. That needs every local rank to start with the same affinity
mask: mpirun binds ranks by default (``--bind-to core``/``socket``), so give
it ``--bind-to none``, or let mpirun bind and leave ``--ranks-per-host`` out.

Without sysfs (macOS, some containers) the host degrades to one domain of all
allowed CPUs, each CPU its own core, and :attr:`Topology.reason` says why.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, MutableMapping, Sequence

__all__ = [
    "CPUS_ENV",
    "PREFER",
    "THREADS_ENV",
    "RankPlacement",
    "Topology",
    "format_cpulist",
    "local_rank_from_env",
    "parse_cpulist",
    "pin_rank",
    "plan_ranks",
    "read_topology",
]

CPUS_ENV = "TP_ENGINE_CPUS"
THREADS_ENV = "TP_ENGINE_THREADS"
PREFER = ("numa", "l3")

_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8-11"`` -> ``[0, 1, 2, 3, 8, 9, 10, 11]``, in the written order (``""``: none).

    Also takes the kernel's stride form ``0-15:2``. A CPU listed twice is an error.
    """
    out: list[int] = []
    text = text.strip()
    if not text:
        return out
    for part in text.split(","):
        m = _RANGE.match(part.strip())
        if m is None:
            raise ValueError(f"bad cpulist {text!r}: {part!r} is not N, N-M or N-M:S")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        step = int(m.group(3)) if m.group(3) is not None else 1
        if last < first or step < 1:
            raise ValueError(f"bad cpulist {text!r}: {part!r} is an empty range")
        out.extend(range(first, last + 1, step))
    if len(set(out)) != len(out):
        raise ValueError(f"bad cpulist {text!r}: a CPU is listed twice")
    return out


def format_cpulist(cpus: Iterable[int]) -> str:
    """The cpulist of ``cpus`` in their order: runs of consecutive numbers become ``a-b``."""
    cpus = list(cpus)
    parts: list[str] = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


# ---------------------------------------------------------------- reading sysfs


@dataclass(frozen=True)
class Topology:
    """The CPUs this process may use, grouped three ways. Every grouping partitions ``cpus``.

    ``numa``: NUMA nodes' usable CPUs (nodes with none, e.g. memory-only, left out);
    ``l3``: L3 domains split at NUMA boundaries, ordered node by node (so neighbours share a node);
    ``l3_bytes``: each of those L3 caches' whole size (None: unknown);
    ``cores``: physical cores, SMT siblings together.
    Tuples are ascending by CPU number. ``reason``: what was guessed, and why ("" when sysfs said all).
    """

    cpus: tuple[int, ...]
    numa: tuple[tuple[int, ...], ...]
    l3: tuple[tuple[int, ...], ...]
    l3_bytes: tuple[int | None, ...]
    cores: tuple[tuple[int, ...], ...]
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.cpus:
            raise ValueError("a topology needs at least one CPU")
        for name in ("numa", "l3", "cores"):
            groups = getattr(self, name)
            flat = [c for g in groups for c in g]
            if sorted(flat) != sorted(self.cpus) or len(flat) != len(set(flat)) or not all(groups):
                raise ValueError(f"topology: {name} must partition the CPUs {format_cpulist(self.cpus)}, got {groups}")
        if len(self.l3_bytes) != len(self.l3):
            raise ValueError("topology: l3_bytes needs one entry per L3 domain")
        node_of = {c: i for i, g in enumerate(self.numa) for c in g}
        if any(len({node_of[c] for c in g}) != 1 for g in self.l3):
            raise ValueError("topology: every L3 domain must lie inside one NUMA node (split them)")

    def domains(self, prefer: str = "numa") -> tuple[tuple[int, ...], ...]:
        """One group per rank ``auto`` would start: NUMA nodes, or L3 domains with ``prefer="l3"``."""
        _check_prefer(prefer)
        return self.numa if prefer == "numa" else self.l3

    def physical_cores(self, cpus: Iterable[int]) -> int:
        """How many physical cores ``cpus`` touch (two SMT siblings count once)."""
        wanted = set(cpus)
        return sum(1 for core in self.cores if wanted.intersection(core))

    def describe(self) -> str:
        smt = len(self.cpus) / len(self.cores)
        sizes = sorted({b for b in self.l3_bytes if b})
        cache = f", L3 {'/'.join(f'{b / 2**20:g}' for b in sizes)} MiB" if sizes else ""
        text = (f"{len(self.cpus)} CPUs ({format_cpulist(self.cpus)}), {len(self.cores)} cores"
                f"{f' x {smt:g} SMT' if smt != 1 else ''}, {len(self.numa)} NUMA node(s), "
                f"{len(self.l3)} L3 domain(s){cache}")
        return text + (f" [{self.reason}]" if self.reason else "")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _size_bytes(text: str | None) -> int | None:
    """sysfs cache sizes: ``32768K``, ``1M``, or plain bytes."""
    if not text:
        return None
    m = re.match(r"^(\d+)\s*([KMG]?)", text.upper())
    if m is None:
        return None
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]


def _index(path: str, prefix: str) -> int:
    return int(os.path.basename(path)[len(prefix):])


def _partition(cpus: Sequence[int], group_of: Callable[[int], Iterable[int] | None]) -> tuple[list[tuple[int, ...]], bool]:
    """Group ``cpus`` by each one's listed group (clipped to ``cpus``); a CPU without a list, or whose
    list misses itself, stands alone. Returns the groups and whether every CPU had a list.

    First come, first served: a CPU already placed is not moved, so overlapping lists still partition.
    """
    usable, placed, groups, complete = set(cpus), set(), [], True
    for cpu in cpus:
        if cpu in placed:
            continue
        listed = group_of(cpu)
        if listed is None:
            complete = False
            listed = (cpu,)
        group = sorted((set(listed) & usable) - placed | {cpu})
        placed.update(group)
        groups.append(tuple(group))
    return groups, complete


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity masks
        return None


def read_topology(root: str = "/sys", allowed: Iterable[int] | None = None) -> Topology:
    """This host's topology from ``root`` (sysfs), clipped to ``allowed`` (default: this process's mask).

    Missing files degrade, never fail: no online list -> the ``cpuN`` directories, else the allowed CPUs;
    no NUMA nodes -> one node; no L3 -> the NUMA nodes; no SMT siblings -> one core per CPU.
    """
    cpu_dir = os.path.join(root, "devices", "system", "cpu")
    notes: list[str] = []
    online_text = _read(os.path.join(cpu_dir, "online"))
    if online_text is not None:
        online: set[int] | None = set(parse_cpulist(online_text))
    else:
        dirs = glob.glob(os.path.join(cpu_dir, "cpu[0-9]*"))
        online = {_index(d, "cpu") for d in dirs if os.path.basename(d)[3:].isdigit()} or None
    mask = set(allowed) if allowed is not None else _affinity()
    if online is None and mask is None:
        online = set(range(os.cpu_count() or 1))
        notes.append(f"no CPU list under {cpu_dir} and no affinity mask: {len(online)} CPUs assumed")
    elif online is None:
        notes.append(f"no CPU list under {cpu_dir}: the affinity mask's CPUs taken")
    cpus = sorted((online if online is not None else mask) & (mask if mask is not None else online))
    if not cpus:
        raise ValueError(f"no usable CPU: online {format_cpulist(sorted(online or ()))}, "
                         f"allowed {format_cpulist(sorted(mask or ()))}")

    # NUMA nodes, in node-number order.
    node_of: dict[int, int] = {}
    nodes = sorted(glob.glob(os.path.join(root, "devices", "system", "node", "node[0-9]*")), key=lambda p: _index(p, "node"))
    for path in nodes:
        text = _read(os.path.join(path, "cpulist"))
        for cpu in parse_cpulist(text) if text else ():
            node_of.setdefault(cpu, _index(path, "node"))
    if not node_of:
        notes.append("no NUMA nodes in sysfs: one memory domain")
    elif any(c not in node_of for c in cpus):
        notes.append("CPUs outside every NUMA node: grouped as one more node")
    numa: dict[int, list[int]] = {}
    for cpu in cpus:
        numa.setdefault(node_of.get(cpu, -1), []).append(cpu)
    numa_groups = [tuple(numa[k]) for k in sorted(numa, key=lambda k: (k < 0, k))]

    def cache_list(cpu: int) -> tuple[list[int], int | None] | None:
        for index in sorted(glob.glob(os.path.join(cpu_dir, f"cpu{cpu}", "cache", "index[0-9]*"))):
            if _read(os.path.join(index, "level")) == "3" and _read(os.path.join(index, "type")) in ("Unified", "Data"):
                shared = _read(os.path.join(index, "shared_cpu_list"))
                if shared:
                    return parse_cpulist(shared), _size_bytes(_read(os.path.join(index, "size")))
        return None

    # L3 domains, cut at NUMA boundaries (Intel's sub-NUMA clustering shares one L3 over several nodes).
    l3_groups: list[tuple[int, ...]] = []
    l3_bytes: list[int | None] = []
    complete = True
    for node in numa_groups:
        found = {cpu: cache_list(cpu) for cpu in node}
        groups, whole = _partition(node, lambda c: found[c][0] if found[c] else None)
        if not any(found.values()):
            groups = [node]  # no cache information at all: the node is the domain
        complete &= whole
        l3_groups += groups
        l3_bytes += [found[g[0]][1] if found[g[0]] else None for g in groups]
    if not complete:
        notes.append("no L3 information for some CPUs: their NUMA node taken as their L3 domain"
                     if len(l3_groups) == len(numa_groups) else "no L3 information for some CPUs: each its own domain")

    def siblings(cpu: int) -> list[int] | None:
        for name in ("thread_siblings_list", "core_cpus_list"):
            text = _read(os.path.join(cpu_dir, f"cpu{cpu}", "topology", name))
            if text:
                return parse_cpulist(text)
        return None

    cores, whole = _partition(cpus, siblings)
    if not whole:
        notes.append("SMT siblings unknown: every CPU counted as a core")
    return Topology(tuple(cpus), tuple(numa_groups), tuple(l3_groups), tuple(l3_bytes), tuple(cores), "; ".join(notes))


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class RankPlacement:
    """One local rank's CPUs (one per physical core first, then siblings: the order pool workers take
    them) and how many threads it runs."""

    local_rank: int
    cpus: tuple[int, ...]
    threads: int

    def cpulist(self) -> str:
        return format_cpulist(self.cpus)

    def env(self) -> dict[str, str]:
        """The variables a launcher sets for this rank (see the module docstring)."""
        return {CPUS_ENV: self.cpulist(), THREADS_ENV: str(self.threads), "OMP_NUM_THREADS": str(self.threads)}


def _check_prefer(prefer: str) -> None:
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {', '.join(PREFER)}, got {prefer!r}")


def _flat(node) -> list[int]:
    return [node] if isinstance(node, int) else [c for child in node for c in _flat(child)]


def _balanced(children: Sequence, k: int) -> list[list]:
    """``children`` cut into ``k`` consecutive runs whose lengths differ by at most one."""
    n, out, start = len(children), [], 0
    for i in range(k):
        size = n // k + (i < n % k)
        out.append(list(children[start:start + size]))
        start += size
    return out


class _Uneven(ValueError):
    pass


def _split(children: Sequence, k: int, hard: Sequence[bool], names: Sequence[str]) -> list[list[int]]:
    """Cut one tree level (``children``: subtrees; CPUs at the leaves) into ``k`` CPU groups.

    ``hard[0]``: whether this level's boundaries bind (the NUMA nodes; the L3 domains under
    ``prefer="l3"``). A hard level hands out whole children (k divides them) or an equal number of ranks
    to each (k is a multiple); where it cannot and a hard level lies below, it dissolves into that level,
    else refuses. A soft level does the same only over equal children and otherwise dissolves into its
    children's children, so ranks get equal CPUs rather than respect a boundary nobody asked for.
    """
    n = len(children)
    if k == 1:
        return [[c for child in children for c in _flat(child)]]
    if not hard:  # CPUs, ordered core by core: a contiguous cut keeps siblings together
        if k > n:
            raise _Uneven(f"{k} ranks would share a domain of {n} CPUs")
        return _balanced(children, k)
    if len(hard) == 1 and k <= n:  # whole cores, as equal in number as they can be
        return [[c for core in group for c in core] for group in _balanced(children, k)]
    if hard[0] or len({len(_flat(child)) for child in children}) == 1:
        try:
            if k <= n and n % k == 0:
                per = n // k
                return [[c for child in children[i * per:(i + 1) * per] for c in _flat(child)] for i in range(k)]
            if k > n and k % n == 0:
                return [group for child in children for group in _split(child, k // n, hard[1:], names[1:])]
            raise _Uneven(f"{k} ranks do not split evenly over {n} {names[0]} domains of "
                          f"{'/'.join(str(len(_flat(c))) for c in children)} CPUs: ask for a divisor or a multiple of {n}")
        except _Uneven:
            if hard[0] and not any(hard[1:]):
                raise
    # Dissolve this level: its children's children become the children.
    return _split([g for child in children for g in child], k, hard[1:], names[1:])


def _core_first(cpus: Sequence[int], topo: Topology) -> tuple[int, ...]:
    """One CPU of every core, then the second sibling of every core, ... (cores in CPU order)."""
    mine = set(cpus)
    per_core = [[c for c in core if c in mine] for core in topo.cores]
    per_core = [core for core in per_core if core]
    depth = max(len(core) for core in per_core)
    return tuple(core[i] for i in range(depth) for core in per_core if i < len(core))


def plan_ranks(topo: Topology, ranks: int | str = "auto", threads: int | None = None, prefer: str = "numa") -> list[RankPlacement]:
    """Each local rank's CPUs and thread count when ``ranks`` ranks share this host.

    ``ranks="auto"``: one rank per NUMA node (``prefer="l3"``: per L3 domain, where that measures
    faster). Fewer ranks than domains take whole domains (an equal number each); more take an equal
    number of ranks per domain, each inside one domain, cut along L3 domains and then cores. Every CPU
    of ``topo`` goes to exactly one rank. ``threads``: per rank (None: one per physical core it got).
    ValueError, saying why, for what cannot be placed evenly.
    """
    _check_prefer(prefer)
    domains = topo.domains(prefer)
    if ranks == "auto":
        ranks = len(domains)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks per host must be 'auto' or a positive integer, got {ranks!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads per rank must be a positive integer, got {threads!r}")
    if ranks > len(topo.cpus):
        raise ValueError(f"{ranks} ranks but this host lets this process use {len(topo.cpus)} CPUs "
                         f"({format_cpulist(topo.cpus)})")
    # The tree: NUMA nodes > L3 domains > cores > CPUs. Only the NUMA nodes, and the L3 domains when
    # preferred, are boundaries a rank must not cross (a rank's memory lives on one node).
    cores = sorted(topo.cores)
    tree = []
    for node in topo.numa:
        inside = set(node)
        pieces = []
        for l3 in topo.l3:
            if l3[0] in inside:
                members = set(l3)
                # Cores clipped to their L3 domain (an SMT core straddles a cut only in a made-up topology).
                pieces.append([clipped for clipped in ([c for c in core if c in members] for core in cores) if clipped])
        tree.append(pieces)
    names = ["NUMA", "L3", "core"]
    try:
        groups = _split(tree, ranks, [True, prefer == "l3", False], names)
    except _Uneven as exc:
        raise ValueError(f"cannot place {ranks} ranks on this host ({topo.describe()}): {exc}") from None
    out = []
    for rank, cpus in enumerate(groups):
        n = topo.physical_cores(cpus) if threads is None else threads
        if n > len(cpus):
            raise ValueError(f"{threads} threads per rank, but rank {rank} has {len(cpus)} CPUs "
                             f"({format_cpulist(sorted(cpus))}) with {ranks} ranks on this host")
        out.append(RankPlacement(rank, _core_first(cpus, topo), n))
    return out


# ---------------------------------------------------------------- applying


def local_rank_from_env(environ: MutableMapping[str, str] | None = None) -> tuple[int, int] | None:
    """(local rank, ranks on this host) from torchrun's or an MPI launcher's variables, None outside them."""
    env = os.environ if environ is None else environ
    for rank_var, size_var in (("LOCAL_RANK", "LOCAL_WORLD_SIZE"),
                               ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                               ("MPI_LOCALRANKID", "MPI_LOCALNRANKS")):
        if env.get(rank_var, "") != "" and env.get(size_var, "") != "":
            return int(env[rank_var]), int(env[size_var])
    return None


def pin_rank(
    local_rank: int,
    ranks: int | str = "auto",
    threads: int | None = None,
    prefer: str = "numa",
    *,
    root: str = "/sys",
    allowed: Iterable[int] | None = None,
    environ: MutableMapping[str, str] | None = None,
    setaffinity: Callable[[int, Iterable[int]], None] | None = None,
) -> int:
    """Pin this process to its local rank's CPUs and return its thread count. Call it before any thread pool.

    With ``TP_ENGINE_CPUS`` set (the launcher planned), that list is taken and ``ranks``/``prefer`` are
    ignored; threads: ``threads``, else ``TP_ENGINE_THREADS``, else one per physical core of the list.
    Without it the rank plans the host itself (:func:`plan_ranks`) and takes ``local_rank``'s share.
    Either way ``TP_ENGINE_CPUS``, ``TP_ENGINE_THREADS`` and ``OMP_NUM_THREADS`` are left set in
    ``environ`` for the pools created later. No affinity call (macOS): the environment only.
    """
    env = os.environ if environ is None else environ
    topo = read_topology(root, allowed)
    given = env.get(CPUS_ENV, "")
    if given:
        cpus = tuple(parse_cpulist(given))
        outside = sorted(set(cpus) - set(topo.cpus))
        if outside:
            raise ValueError(f"{CPUS_ENV}={given} names CPUs this process may not use: {format_cpulist(outside)} "
                             f"(allowed: {format_cpulist(topo.cpus)})")
        if threads is None and env.get(THREADS_ENV, ""):
            threads = int(env[THREADS_ENV])
        n = threads if threads is not None else topo.physical_cores(cpus)
        if not 1 <= n <= len(cpus):
            raise ValueError(f"{n} threads do not fit this rank's {len(cpus)} CPUs ({CPUS_ENV}={given})")
        placement = RankPlacement(local_rank, cpus, n)
    else:
        plan = plan_ranks(topo, ranks, threads, prefer)
        if not 0 <= local_rank < len(plan):
            raise ValueError(f"local rank {local_rank} is not one of the {len(plan)} ranks planned for this host")
        placement = plan[local_rank]
    env.update(placement.env())
    set_mask = setaffinity if setaffinity is not None else getattr(os, "sched_setaffinity", None)
    if set_mask is not None:
        set_mask(0, set(placement.cpus))
    return placement.threads
