"""Start-up placement: measure the live group, choose TP, PP or hybrid, and say why.

Collective (every rank calls :func:`decide` with the same arguments). On one
host ``auto`` is tensor parallelism without measuring: the shared-memory
all-reduce costs microseconds, so splitting every layer always pays there.
Across hosts it measures (:func:`~tp_engine.launch.measure.measure_links`)
and takes the layout :func:`~tp_engine.launch.placement.choose` predicts
fastest; ``tp``/``pp``/``hybrid`` force one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..comm.base import Communicator
from ..comm.host_identity import HostLayout, detect_hosts
from .measure import measure_links
from .placement import PLACEMENTS, ModelCost, Prediction, choose

__all__ = ["Decision", "decide"]

# Speed shares closer than this to even are not worth an uneven split (measurement noise).
UNEVEN_SHARES_ABOVE = 1.2


@dataclass(frozen=True)
class Decision:
    """How to build the model: ``pp`` stages (``order`` of ranks), TP ``shares``, ``stage_shares``."""

    kind: str  # "tp", "pp" or "hybrid"
    pp: int = 1
    order: str = "tp_inner"
    shares: tuple[float, ...] | None = None
    stage_shares: tuple[float, ...] | None = None
    chosen: Prediction | None = None
    ranked: tuple[Prediction, ...] = ()
    reason: str = ""

    def lines(self) -> list[str]:
        """What to print: the decision, then every candidate's prediction."""
        out = [f"placement: {self.kind} ({self.reason})"]
        out += [f"  {'*' if p is self.chosen else ' '} {p.describe()}" for p in self.ranked]
        return out


def _speed_shares(shares: tuple[float, ...], ranks: tuple[int, ...]) -> tuple[float, ...] | None:
    mine = tuple(shares[r] for r in ranks)
    return mine if max(mine) / min(mine) > UNEVEN_SHARES_ABOVE else None


def _contiguous(hosts: HostLayout) -> bool:
    size = len(hosts.groups[0])
    return all(g == tuple(range(i * size, (i + 1) * size)) for i, g in enumerate(hosts.groups))


def decide(comm: Communicator, config: Any, weight_bytes: float, placement: str = "auto",
           greedy: bool = True, in_flight: int = 1) -> Decision:
    """The layout for this group and model (collective). ``greedy``: the pipeline decodes greedily
    only, so a sampled call keeps TP under ``auto`` and is refused under ``pp``/``hybrid``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement != "tp" and not greedy:
        if placement == "auto":
            return Decision("tp", reason="sampling: the pipeline decodes greedily only")
        raise ValueError(f"--placement {placement} decodes greedily only: add --greedy")
    if comm.world_size == 1:
        return Decision("tp", reason="one rank")
    if placement == "tp":
        return Decision("tp", reason="asked for")
    hosts = detect_hosts(comm)
    if placement == "auto" and hosts.n_hosts == 1:
        return Decision("tp", reason="one host: the shared-memory all-reduce makes TP pay")
    layers = int(getattr(config, "num_hidden_layers"))
    links = measure_links(comm, int(getattr(config, "hidden_size")), hosts)
    chosen, ranked = choose(ModelCost(weight_bytes, layers), links, placement, in_flight)
    kind = chosen.layout.kind
    if kind == "hybrid" and (len({len(g) for g in hosts.groups}) != 1 or not _contiguous(hosts)):
        raise ValueError(f"hybrid placement needs the same number of ranks on every host, numbered host by host; "
                         f"got {hosts.describe()}")
    reason = "measured" if placement == "auto" else "asked for"
    stage_shares = tuple(float(n) for n in chosen.layer_split) if chosen.layout.pp > 1 else None
    if kind == "tp":
        return Decision("tp", shares=_speed_shares(chosen.shares, chosen.layout.stages[0]), chosen=chosen,
                        ranked=tuple(ranked), reason=reason)
    tp_shares = _speed_shares(chosen.shares, chosen.layout.stages[0]) if kind == "hybrid" else None
    return Decision(kind, pp=chosen.layout.pp, shares=tp_shares, stage_shares=stage_shares, chosen=chosen,
                    ranked=tuple(ranked), reason=reason)
