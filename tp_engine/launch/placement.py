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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["PLACEMENTS", "Layout", "Links", "ModelCost", "Prediction", "candidate_layouts", "choose", "predict"]

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
    """

    bandwidth: tuple[float, ...]
    host_of: tuple[int, ...]
    allreduce_s: float
    hop_s: float
    local_allreduce_s: float | None = None
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth or len(self.bandwidth) != len(self.host_of):
            raise ValueError("bandwidth and host_of need one entry per rank")
        if min(self.bandwidth) <= 0 or min(self.allreduce_s, self.hop_s, self.overhead_s) < 0:
            raise ValueError(f"measurements must be positive: {self}")

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
        compute = model.weight_bytes * n_layers / model.layers / bw
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
