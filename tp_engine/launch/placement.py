"""Link-aware placement: predict tokens/s of TP, PP and hybrid layouts from measured links, and choose.

Decode on a CPU (or any memory-bound device) streams every weight once per
token, so a rank's share of a step costs ``its weight bytes / the bandwidth
its matmuls reach``. Tensor parallelism splits those bytes but adds two
all-reduces per layer; pipeline parallelism keeps all bytes on the critical
path of one sequence (stages run one after another) and adds one hand-off per
stage boundary, plus the hop that returns the chosen token to the first
stage. Per token, for one sequence in flight:

    TP      max_r(W_r / bw_r) + 2 L t_allreduce + overhead
    PP      sum_s(W_s / bw_s) + pp t_hop + overhead
    hybrid  sum over stages of [max over the stage's ranks (W_r / bw_r) + 2 L_s t_allreduce(local)] + pp t_hop

With M sequences in flight, TP decodes them as one batch (the weights are
read once per step: ``trip / M``, optimistic where the batch stops being
memory-bound), and a pipeline overlaps its stages, one micro-batch per
sequence: ``max(slowest stage + hop, trip / M)`` per token.
Everything here is a pure function of measurements (:class:`Links`) so the
choice can be tested; :mod:`.measure` takes the measurements on the live group.

Inside one host, ranks are memory domains (:mod:`.topology`): a rank's
streaming speed grows with its threads until its domain's memory saturates,
``min(threads x per_core, domain bandwidth)``, shared with any rank on the
same domain; a rank whose shard fits its share of its L3 caches reads it at
cache speed instead. :func:`rank_links` turns a host (:class:`MemoryDomain`
per NUMA node) and a rank count into :class:`Links`, and
:func:`compare_rank_splits` predicts "1 rank x T threads" against "R ranks x
T/R threads" on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .topology import Topology, plan_ranks

__all__ = ["PLACEMENTS", "Layout", "Links", "MemoryDomain", "ModelCost", "Prediction", "SplitPrediction",
           "candidate_layouts", "choose", "compare_rank_splits", "host_from_topology", "host_topology", "predict",
           "rank_links"]

PLACEMENTS = ("auto", "tp", "pp", "hybrid")


@dataclass(frozen=True)
class ModelCost:
    """What one decode step of the model reads and exchanges."""

    weight_bytes: float  # all layers' weights (the embedding lookup reads one row: excluded; the LM head included)
    layers: int

    def __post_init__(self) -> None:
        if self.weight_bytes <= 0 or self.layers < 1:
            raise ValueError(f"a model cost needs weight_bytes > 0 and layers >= 1, got {self}")


@dataclass(frozen=True)
class Links:
    """Measured speeds of a group (seconds and bytes per second).

    ``bandwidth[r]``: weight bytes per second rank r's matmuls stream at one
    sequence; ``host_of[r]``: rank r's host (ranks with the same value share
    memory); ``allreduce_s``: one decode-sized all-reduce over every rank;
    ``local_allreduce_s``: the same inside one host (hybrid stages), None if
    no host has two ranks; ``hop_s``: one activation hand-off across hosts;
    ``overhead_s``: per-token cost outside matmuls and collectives.
    Optional, per rank (None: not modelled): ``cache_bytes``, the L3 a rank's
    shard may stay in, and ``cache_bandwidth``, the speed it reads a shard
    that does; ``threads``, the threads it runs (for reports).
    """

    bandwidth: tuple[float, ...]
    host_of: tuple[int, ...]
    allreduce_s: float
    hop_s: float
    local_allreduce_s: float | None = None
    overhead_s: float = 0.0
    cache_bytes: tuple[float, ...] | None = None
    cache_bandwidth: tuple[float, ...] | None = None
    threads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.bandwidth or len(self.bandwidth) != len(self.host_of):
            raise ValueError("bandwidth and host_of need one entry per rank")
        if min(self.bandwidth) <= 0 or min(self.allreduce_s, self.hop_s, self.overhead_s) < 0:
            raise ValueError(f"measurements must be positive: {self}")
        if (self.cache_bytes is None) != (self.cache_bandwidth is None):
            raise ValueError("cache_bytes and cache_bandwidth come together")
        for name in ("cache_bytes", "cache_bandwidth", "threads"):
            values = getattr(self, name)
            if values is not None and (len(values) != len(self.bandwidth) or min(values) < 0):
                raise ValueError(f"{name} needs one non-negative entry per rank, got {values}")

    def read_speed(self, rank: int, shard_bytes: float) -> float:
        """Bytes per second rank ``rank`` streams a shard of ``shard_bytes``: cache speed if it fits its L3.

        All or nothing: a decode step reads the shard in the same order every token, and an LRU cache
        read cyclically by more than it holds keeps nothing until the next visit.
        """
        if self.cache_bytes is not None and shard_bytes <= self.cache_bytes[rank]:
            return max(self.cache_bandwidth[rank], self.bandwidth[rank])
        return self.bandwidth[rank]

    @property
    def world_size(self) -> int:
        return len(self.bandwidth)

    def hosts(self) -> list[list[int]]:
        """Ranks grouped by host, hosts in order of their first rank."""
        groups: dict[int, list[int]] = {}
        for rank, host in enumerate(self.host_of):
            groups.setdefault(host, []).append(rank)
        return list(groups.values())


@dataclass(frozen=True)
class Layout:
    """``stages[s]``: the ranks of pipeline stage s (they split its layers by tensor parallelism)."""

    kind: str  # "tp", "pp" or "hybrid"
    stages: tuple[tuple[int, ...], ...]

    @property
    def tp(self) -> int:
        return max(len(s) for s in self.stages)

    @property
    def pp(self) -> int:
        return len(self.stages)

    def describe(self) -> str:
        parts = " | ".join(",".join(map(str, s)) for s in self.stages)
        return f"{self.kind} (TP={self.tp} x PP={self.pp}; stages: {parts})"


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    seconds_per_token: float  # aggregate: one token of some sequence every this many seconds
    shares: tuple[float, ...]  # per rank: its fraction of its stage's work (speed shares)
    layer_split: tuple[int, ...]  # layers per stage
    terms: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    def describe(self) -> str:
        detail = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.terms.items())
        return f"{self.layout.describe()}: predicted {self.tokens_per_s:.1f} tok/s ({detail})"


def _split_layers(layers: int, weights: Sequence[float]) -> tuple[int, ...]:
    """Contiguous layer counts proportional to ``weights``, each stage at least one layer."""
    n = len(weights)
    if layers < n:
        raise ValueError(f"{n} pipeline stages need at least {n} layers, the model has {layers}")
    total = sum(weights)
    counts = [max(1, round(layers * w / total)) for w in weights]
    while sum(counts) > layers:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < layers:
        counts[counts.index(min(counts))] += 1
    return tuple(counts)


def predict(layout: Layout, model: ModelCost, links: Links, in_flight: int = 1) -> Prediction:
    """Seconds per token of ``layout`` (shares by speed inside a stage, layers by stage speed)."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    stage_bw = [sum(links.bandwidth[r] for r in stage) for stage in layout.stages]
    layer_split = _split_layers(model.layers, stage_bw)
    shares = [0.0] * links.world_size
    stage_times, collectives = [], 0.0
    for stage, bw, n_layers in zip(layout.stages, stage_bw, layer_split):
        for r in stage:
            shares[r] = links.bandwidth[r] / bw
        # Speed shares make every rank of a stage finish together: bytes / the stage's summed bandwidth.
        stage_bytes = model.weight_bytes * n_layers / model.layers
        compute = stage_bytes / bw
        if links.cache_bytes is not None:  # shares stay by DRAM speed (what --shares is measured from)
            compute = max(stage_bytes * shares[r] / links.read_speed(r, stage_bytes * shares[r]) for r in stage)
        if len(stage) > 1:
            one_host = len({links.host_of[r] for r in stage}) == 1
            t_ar = links.local_allreduce_s if one_host and links.local_allreduce_s is not None else links.allreduce_s
            comm = 2 * n_layers * t_ar
        else:
            comm = 0.0
        collectives += comm
        stage_times.append(compute + comm)
    hops = layout.pp * links.hop_s if layout.pp > 1 else 0.0
    trip = sum(stage_times) + hops + links.overhead_s  # one token of one sequence, start to end
    if layout.pp == 1:
        per_token = trip / in_flight  # one batched step reads the weights once for every sequence
    elif in_flight == 1:
        per_token = trip
    else:
        # Stages overlap: a stage hands on and takes the next micro-batch; the slowest bounds the rate.
        slowest = max(t + links.hop_s for t in stage_times)
        per_token = max(slowest, trip / in_flight)
    terms = {"weights": sum(stage_times) - collectives, "all-reduces": collectives, "hops": hops,
             "overhead": links.overhead_s}
    return Prediction(layout, per_token, tuple(shares), layer_split, terms)


def candidate_layouts(links: Links) -> dict[str, Layout]:
    """TP over every rank, PP with one rank per stage, and (several hosts with several ranks) TP in a host x PP across."""
    ranks = tuple(range(links.world_size))
    out = {"tp": Layout("tp", (ranks,))}
    if links.world_size > 1:
        out["pp"] = Layout("pp", tuple((r,) for r in ranks))
    hosts = links.hosts()
    if 1 < len(hosts) < links.world_size:
        out["hybrid"] = Layout("hybrid", tuple(tuple(h) for h in hosts))
    return out


def choose(model: ModelCost, links: Links, placement: str = "auto", in_flight: int = 1) -> tuple[Prediction, list[Prediction]]:
    """The chosen layout's prediction and every candidate's, fastest first.

    ``placement``: ``auto`` (the fastest predicted), or ``tp``/``pp``/``hybrid``
    to force one (a clear error when this group cannot form it).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    candidates = candidate_layouts(links)
    predictions = sorted((predict(layout, model, links, in_flight) for layout in candidates.values()),
                         key=lambda p: p.seconds_per_token)
    if placement == "auto":
        return predictions[0], predictions
    if placement not in candidates:
        why = "one rank" if links.world_size == 1 else "one host, or one rank per host"
        raise ValueError(f"placement {placement!r} needs several hosts with several ranks each; this group has {why}")
    return next(p for p in predictions if p.layout.kind == placement), predictions


# ---------------------------------------------------------------- ranks inside one host


@dataclass(frozen=True)
class MemoryDomain:
    """One NUMA node of a host: its cores, what they stream, and its L3 caches.

    ``bandwidth``: bytes/s its DRAM gives all its cores together (where streaming saturates);
    ``per_core``: bytes/s one thread's matmuls stream (bound by the kernel or the core, not the DRAM);
    its cores split equally over ``l3_domains`` caches of ``l3_bytes`` each (CCDs on an EPYC), each
    of which pulls at most ``l3_link`` bytes/s from DRAM (a CCD's fabric link; inf: no such limit);
    ``cache_per_core``: bytes/s one thread reads a shard that stays in its L3 (0: no faster than DRAM).
    """

    cores: int
    bandwidth: float
    per_core: float
    l3_domains: int = 1
    l3_bytes: float = 0.0
    l3_link: float = math.inf
    cache_per_core: float = 0.0

    def __post_init__(self) -> None:
        if self.cores < 1 or self.l3_domains < 1 or self.cores % self.l3_domains:
            raise ValueError(f"a memory domain needs cores >= 1 split equally over its L3 domains, got {self}")
        if min(self.bandwidth, self.per_core, self.l3_link) <= 0 or min(self.l3_bytes, self.cache_per_core) < 0:
            raise ValueError(f"a memory domain needs positive speeds and non-negative cache figures, got {self}")


def host_topology(host: Sequence[MemoryDomain]) -> Topology:
    """The CPU topology the planner sees for ``host``: one CPU per core, numbered node by node."""
    if not host:
        raise ValueError("a host needs at least one memory domain")
    numa, l3, sizes, cpu = [], [], [], 0
    for node in host:
        numa.append(tuple(range(cpu, cpu + node.cores)))
        per = node.cores // node.l3_domains
        for j in range(node.l3_domains):
            l3.append(tuple(range(cpu + j * per, cpu + (j + 1) * per)))
            sizes.append(int(node.l3_bytes) or None)
        cpu += node.cores
    return Topology(tuple(range(cpu)), tuple(numa), tuple(l3), tuple(sizes), tuple((c,) for c in range(cpu)))


def host_from_topology(topo: Topology, bandwidth: float, per_core: float, cache_per_core: float = 0.0,
                       l3_link: float = math.inf) -> tuple[MemoryDomain, ...]:
    """A host model of a read topology: one domain per NUMA node, its physical cores and L3 sizes from sysfs,
    ``bandwidth`` per node and the per-thread speeds measured (or assumed) by the caller."""
    host = []
    for node in topo.numa:
        inside = set(node)
        caches = [i for i, group in enumerate(topo.l3) if group[0] in inside]
        cores = topo.physical_cores(node)
        # Unequal L3 domains (a container's mask cuts one): modelled as one cache of their total size.
        n_l3 = len(caches) if cores % len(caches) == 0 else 1
        total = sum(topo.l3_bytes[i] or 0 for i in caches)
        host.append(MemoryDomain(cores, bandwidth, per_core, n_l3, total / n_l3, l3_link, cache_per_core))
    return tuple(host)


def rank_links(host: Sequence[MemoryDomain], ranks: int | str = "auto", threads: int | None = None,
               prefer: str = "numa", allreduce_s: float = 0.0, overhead_s: float = 0.0,
               interleave: bool = False) -> Links:
    """What ``ranks`` ranks on this host, placed as :func:`.topology.plan_ranks` places them, stream.

    A rank's workers run on the first ``threads`` CPUs of its set (one per core first, as pinned). Each
    thread asks ``per_core``; an L3 domain's threads share its ``l3_link``, and a node's DRAM serves at
    most ``bandwidth``, both split in proportion to what is asked. A rank's weights live on one node,
    the one its first CPU is in (the loading thread touches them first), so a rank spanning nodes reads
    the far ones' share across the socket link from that node; ``interleave=True`` spreads them over the
    nodes its threads run on instead. A rank's L3 share: each cache it runs on, in proportion to its
    threads there.
    """
    topo = host_topology(host)
    plan = plan_ranks(topo, ranks, threads, prefer)
    node_of = {c: n for n, group in enumerate(topo.numa) for c in group}
    l3_of = {c: i for i, group in enumerate(topo.l3) for c in group}
    node_of_l3 = [node_of[group[0]] for group in topo.l3]
    # threads[r][l3 domain]
    counts = [{} for _ in plan]
    for r, p in enumerate(plan):
        for c in p.cpus[:p.threads]:
            counts[r][l3_of[c]] = counts[r].get(l3_of[c], 0) + 1
    asked = [{i: t * host[node_of_l3[i]].per_core for i, t in mine.items()} for mine in counts]
    for i in range(len(topo.l3)):  # each L3 domain's link
        total = sum(a.get(i, 0.0) for a in asked)
        link = host[node_of_l3[i]].l3_link
        if total > link:
            for a in asked:
                if i in a:
                    a[i] *= link / total
    # Traffic by the node whose DRAM serves it.
    served = [{} for _ in plan]
    for r, a in enumerate(asked):
        home = node_of[plan[r].cpus[0]]
        for i, speed in a.items():
            node = node_of_l3[i] if interleave else home
            served[r][node] = served[r].get(node, 0.0) + speed
    load = [sum(s.get(n, 0.0) for s in served) for n in range(len(host))]
    scale = [min(1.0, node.bandwidth / load[n]) if load[n] else 1.0 for n, node in enumerate(host)]
    bandwidth = tuple(sum(speed * scale[n] for n, speed in s.items()) for s in served)
    per_l3 = [sum(c.get(i, 0) for c in counts) for i in range(len(topo.l3))]
    cache_bytes = tuple(sum(host[node_of_l3[i]].l3_bytes * t / per_l3[i] for i, t in c.items()) for c in counts)
    cache_bw = tuple(sum(host[node_of_l3[i]].cache_per_core * t for i, t in c.items()) for c in counts)
    local = allreduce_s if len(plan) > 1 else None
    return Links(bandwidth, (0,) * len(plan), allreduce_s, 0.0, local, overhead_s, cache_bytes, cache_bw,
                 tuple(p.threads for p in plan))


@dataclass(frozen=True)
class SplitPrediction:
    """One way of running a host: ``ranks`` ranks (TP over them) with ``threads[r]`` threads each."""

    ranks: int
    threads: tuple[int, ...]
    in_cache: tuple[bool, ...]  # per rank: its shard stays in its L3
    prediction: Prediction

    @property
    def tokens_per_s(self) -> float:
        return self.prediction.tokens_per_s

    def describe(self) -> str:
        t = self.threads
        per = f"{t[0]}" if len(set(t)) == 1 else "/".join(map(str, t))
        cached = sum(self.in_cache)
        where = "L3" if cached == self.ranks else "DRAM" if not cached else f"L3 on {cached} of {self.ranks} ranks"
        terms = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.prediction.terms.items() if v)
        return f"{self.ranks} rank(s) x {per} thread(s): {self.tokens_per_s:.1f} tok/s (weights from {where}; {terms})"


def compare_rank_splits(
    model: ModelCost,
    host: Sequence[MemoryDomain],
    ranks: Sequence[int | str] = (1, "auto"),
    total_threads: int | None = None,
    prefer: str = "numa",
    allreduce_s: float | Mapping[int, float] = 5e-6,
    overhead_s: float = 0.0,
    in_flight: int = 1,
    interleave: bool = False,
) -> list[SplitPrediction]:
    """Predicted decode speed of each rank count in ``ranks`` on this host, in that order.

    ``total_threads``: threads on the host, split equally (None: every rank one per core of its share),
    so ``ranks=(1, 2), total_threads=16`` compares 1 x 16 threads with 2 x 8. ``allreduce_s``: one
    decode-sized all-reduce among the host's ranks (shm), one figure or one per rank count; the default,
    5 us, is twice the 2.4 us measured for 2 ranks and 4 KiB on the development VM (README).
    """
    out = []
    for r in ranks:
        n = len(host_topology(host).domains(prefer)) if r == "auto" else r
        threads = None
        if total_threads is not None:
            if not isinstance(n, int) or n < 1 or total_threads < n:
                raise ValueError(f"{total_threads} threads cannot be split over {n!r} ranks")
            threads = total_threads // n
        t_ar = allreduce_s[n] if isinstance(allreduce_s, Mapping) else allreduce_s
        links = rank_links(host, n, threads, prefer, t_ar, overhead_s, interleave)
        layout = Layout("tp", (tuple(range(links.world_size)),))
        prediction = predict(layout, model, links, in_flight)
        shard = [model.weight_bytes * s for s in prediction.shares]
        in_cache = tuple(b <= links.cache_bytes[i] for i, b in enumerate(shard))
        out.append(SplitPrediction(links.world_size, links.threads, in_cache, prediction))
    return out
