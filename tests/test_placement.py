"""The placement model: predicted seconds per token of TP, PP and hybrid layouts, and the choice;
ranks and threads inside one host (saturating memory domains, L3-resident shards)."""
import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tp_engine.launch.placement import (
    Links,
    MemoryDomain,
    ModelCost,
    choose,
    compare_rank_splits,
    host_from_topology,
    host_topology,
    predict,
    rank_links,
)

MODEL = ModelCost(weight_bytes=1e9, layers=24)
BW = 5e9  # bytes/s one rank streams


def _links(n_hosts=2, per_host=1, allreduce=50e-6, hop=40e-6, local=None, bw=BW):
    hosts = tuple(h for h in range(n_hosts) for _ in range(per_host))
    return Links(bandwidth=(bw,) * len(hosts), host_of=hosts, allreduce_s=allreduce, hop_s=hop, local_allreduce_s=local)


def test_fast_link_picks_tp_and_predicts_the_split():
    chosen, ranked = choose(MODEL, _links(allreduce=20e-6))
    assert chosen.layout.kind == "tp"
    assert chosen.seconds_per_token == pytest.approx(1e9 / (2 * BW) + 2 * 24 * 20e-6)
    pp = next(p for p in ranked if p.layout.kind == "pp")
    assert pp.seconds_per_token == pytest.approx(1e9 / BW + 2 * 40e-6)  # both stages in turn + two hops


def test_slow_link_gives_up_tp():
    chosen, _ = choose(MODEL, _links(allreduce=5e-3, hop=1e-3))
    assert chosen.layout.kind == "pp"


def test_sequences_in_flight_overlap_pipeline_stages():
    one = predict(choose(MODEL, _links(), "pp")[0].layout, MODEL, _links())
    four = predict(one.layout, MODEL, _links(), in_flight=4)
    assert four.seconds_per_token == pytest.approx(1e9 / (2 * BW) + 40e-6)  # the slowest stage and its hop


def test_hybrid_uses_the_local_all_reduce():
    links = _links(per_host=2, allreduce=2e-3, hop=1e-3, local=5e-6)
    chosen, ranked = choose(MODEL, links)
    assert {p.layout.kind for p in ranked} == {"tp", "pp", "hybrid"}
    hybrid = next(p for p in ranked if p.layout.kind == "hybrid")
    assert hybrid.layout.stages == ((0, 1), (2, 3))
    assert hybrid.seconds_per_token == pytest.approx(1e9 / (2 * BW) + 2 * 24 * 5e-6 + 2 * 1e-3)
    assert chosen is hybrid


def test_forced_placements_and_bad_input():
    assert choose(MODEL, _links(), "pp")[0].layout.kind == "pp"
    with pytest.raises(ValueError, match="hybrid"):
        choose(MODEL, _links(), "hybrid")
    with pytest.raises(ValueError, match="placement must be one of"):
        choose(MODEL, _links(), "fastest")
    with pytest.raises(ValueError, match="one entry per rank"):
        Links(bandwidth=(1.0,), host_of=(0, 1), allreduce_s=0, hop_s=0)
    with pytest.raises(ValueError, match="at least 3 layers"):
        predict(choose(MODEL, _links(n_hosts=3), "pp")[0].layout, ModelCost(1e6, 2), _links(n_hosts=3))


@settings(max_examples=60, deadline=None)
@given(
    bws=st.lists(st.floats(1e8, 1e11), min_size=1, max_size=6),
    per_host=st.integers(1, 3),
    allreduce=st.floats(0, 1e-2),
    hop=st.floats(0, 1e-2),
    layers=st.integers(6, 64),
    in_flight=st.integers(1, 8),
)
def test_choice_is_the_fastest_and_shares_are_consistent(bws, per_host, allreduce, hop, layers, in_flight):
    hosts = tuple(i // per_host for i in range(len(bws)))
    links = Links(tuple(bws), hosts, allreduce, hop, local_allreduce_s=allreduce / 10)
    model = ModelCost(1e9, layers)
    chosen, ranked = choose(model, links, in_flight=in_flight)
    assert chosen is ranked[0]
    assert [p.seconds_per_token for p in ranked] == sorted(p.seconds_per_token for p in ranked)
    for p in ranked:
        assert p.seconds_per_token > 0 and sum(p.layer_split) == layers and min(p.layer_split) >= 1
        for stage in p.layout.stages:
            assert sum(p.shares[r] for r in stage) == pytest.approx(1.0)
        # a slower all-reduce never makes a layout faster
        slower = Links(tuple(bws), hosts, allreduce * 2 + 1e-6, hop, local_allreduce_s=allreduce / 5 + 1e-6)
        assert predict(p.layout, model, slower, in_flight).seconds_per_token >= p.seconds_per_token - 1e-12


def test_measured_links_of_a_live_group(monkeypatch):
    """measure_links on 4 thread ranks posing as 2 hosts x 2: every figure positive, hosts found, a choice made."""
    from tp_engine.comm.host_identity import HOST_ID_ENV
    from tp_engine.comm.threads import run_threads
    from tp_engine.launch.measure import measure_links

    monkeypatch.setenv(HOST_ID_ENV, "a,a,b,b")
    out = run_threads(lambda comm: measure_links(comm, hidden=1024), 4, timeout=120)
    links = out[0]
    assert all(o == links for o in out[1:])  # every rank decides from the same numbers
    assert links.host_of == (0, 0, 1, 1)
    assert min(links.bandwidth) > 1e8 and links.allreduce_s > 0 and links.hop_s > 0
    assert links.local_allreduce_s is not None and links.local_allreduce_s > 0
    chosen, ranked = choose(ModelCost(4e8, 12), links)
    assert {p.layout.kind for p in ranked} == {"tp", "pp", "hybrid"} and chosen is ranked[0]


def _decide_rank(comm, delay_s: float, placement: str, greedy: bool = True):
    from tp_engine.launch.decide import decide
    from tp_engine.launch.latency import LatencyCommunicator

    slow = LatencyCommunicator(comm, delay_s)
    config = SimpleNamespace(num_hidden_layers=24, hidden_size=1024)
    return decide(slow, config, weight_bytes=4e8, placement=placement, greedy=greedy)


@pytest.mark.parametrize("delay_s, expected", [(0.0, "tp"), (5e-3, "pp")])
def test_auto_placement_across_hosts_follows_the_link(monkeypatch, delay_s, expected):
    """Two thread ranks posing as two hosts: a fast link keeps TP, a slow one (emulated 5 ms) moves to PP."""
    from tp_engine.comm.host_identity import HOST_ID_ENV
    from tp_engine.comm.threads import run_threads

    monkeypatch.setenv(HOST_ID_ENV, "a,b")
    decisions = run_threads(_decide_rank, 2, delay_s, "auto", timeout=120)
    assert decisions[0].kind == decisions[1].kind == expected
    d = decisions[0]
    assert d.chosen is d.ranked[0] and d.lines()[0].startswith(f"placement: {expected} (measured)")
    assert (d.pp, d.stage_shares is not None) == ((2, True) if expected == "pp" else (1, False))


def test_placement_on_one_host_and_refusals(monkeypatch):
    from tp_engine.comm.host_identity import HOST_ID_ENV
    from tp_engine.comm.threads import run_threads

    monkeypatch.delenv(HOST_ID_ENV, raising=False)
    assert [d.kind for d in run_threads(_decide_rank, 2, 0.0, "auto", timeout=60)] == ["tp", "tp"]
    assert run_threads(_decide_rank, 2, 0.0, "auto", False, timeout=60)[0].reason.startswith("sampling")
    with pytest.raises(ValueError, match="greedily only"):
        run_threads(_decide_rank, 2, 0.0, "pp", False, timeout=60)
    with pytest.raises(ValueError, match="hybrid"):
        run_threads(_decide_rank, 2, 0.0, "hybrid", timeout=60)


# ---------------------------------------------------------------- ranks and threads inside one host

GB = 1e9
SIXTEEN = (MemoryDomain(cores=16, bandwidth=40 * GB, per_core=6 * GB),)  # one node, one L3
TWO_SOCKETS = tuple(MemoryDomain(cores=8, bandwidth=20 * GB, per_core=5 * GB) for _ in range(2))


def test_streaming_saturates_the_domain():
    assert rank_links(SIXTEEN, 1, 4).bandwidth == (24 * GB,)  # below saturation: threads x per core
    assert rank_links(SIXTEEN, 1, 16).bandwidth == (40 * GB,)  # the node's DRAM caps it
    assert rank_links(SIXTEEN, 2, 8).bandwidth == (20 * GB, 20 * GB)  # two ranks share it
    assert rank_links(SIXTEEN, 2).threads == (8, 8)
    # Memory-bound on one node: splitting the host only adds all-reduces.
    one, two = compare_rank_splits(ModelCost(1e9, 28), SIXTEEN, (1, 2), total_threads=16)
    assert (one.ranks, one.threads, two.ranks, two.threads) == (1, (16,), 2, (8, 8))
    assert one.tokens_per_s == pytest.approx(40.0) and two.tokens_per_s < one.tokens_per_s
    assert two.prediction.terms["all-reduces"] == pytest.approx(2 * 28 * 5e-6)
    assert one.describe().startswith("1 rank(s) x 16 thread(s): 40.0 tok/s (weights from DRAM")


def test_a_rank_per_socket_reads_local_memory():
    # One rank on both sockets: its weights sit on socket 0 (first touch), so socket 1's DRAM idles.
    assert rank_links(TWO_SOCKETS, 1).bandwidth == (20 * GB,)
    assert rank_links(TWO_SOCKETS, 1, interleave=True).bandwidth == (40 * GB,)
    one, auto = compare_rank_splits(ModelCost(1e9, 28), TWO_SOCKETS, (1, "auto"))
    assert auto.ranks == 2 and auto.threads == (8, 8)
    assert one.prediction.seconds_per_token == pytest.approx(1e9 / (20 * GB))
    assert auto.prediction.seconds_per_token == pytest.approx(1e9 / (40 * GB) + 2 * 28 * 5e-6)  # ~2x
    with pytest.raises(ValueError, match="3 ranks do not split evenly over 2 NUMA domains"):
        rank_links(TWO_SOCKETS, 3)
    with pytest.raises(ValueError, match="16 threads cannot be split over 32 ranks"):
        compare_rank_splits(ModelCost(1e9, 28), TWO_SOCKETS, (32,), total_threads=16)


def test_a_shard_that_fits_its_l3_is_read_at_cache_speed():
    # One node, two 32 MiB L3 domains (CCDs) of 8 cores; a 48 MiB model on 8 threads in all.
    ccds = (MemoryDomain(16, 60 * GB, 5 * GB, l3_domains=2, l3_bytes=32 * 2**20, l3_link=30 * GB, cache_per_core=20 * GB),)
    model = ModelCost(48 * 2**20, 24)
    one, two = compare_rank_splits(model, ccds, (1, 2), total_threads=8, prefer="l3", allreduce_s=0.0)
    # 1 x 8: every thread on the first CCD (its link caps it, its 32 MiB hold 2/3 of the model);
    # 2 x 4: a rank per CCD, 24 MiB each in 32 MiB: cache speed, 4 x 20 GB/s.
    assert one.in_cache == (False,) and two.in_cache == (True, True)
    assert one.tokens_per_s == pytest.approx(30 * GB / model.weight_bytes)
    assert two.tokens_per_s == pytest.approx(80 * GB / (model.weight_bytes / 2))
    assert "weights from L3" in two.describe()


def test_host_model_of_a_read_topology():
    from tp_engine.launch.topology import Topology

    topo = Topology(cpus=tuple(range(8)), numa=((0, 1, 2, 3), (4, 5, 6, 7)), l3=((0, 1, 2, 3), (4, 5), (6, 7)),
                    l3_bytes=(2**25, 2**24, 2**24), cores=((0, 1), (2, 3), (4,), (5,), (6,), (7,)))
    a, b = host_from_topology(topo, bandwidth=10 * GB, per_core=2 * GB)
    assert (a.cores, a.l3_domains, a.l3_bytes) == (2, 1, 2**25)  # SMT siblings count once
    assert (b.cores, b.l3_domains, b.l3_bytes) == (4, 2, 2**24)
    assert host_topology((a, b)).l3 == ((0, 1), (2, 3), (4, 5))


domains = st.builds(
    lambda l3, per_l3, **kw: MemoryDomain(cores=l3 * per_l3, l3_domains=l3, **kw),
    l3=st.sampled_from([1, 2]),
    per_l3=st.sampled_from([1, 2, 3, 4]),
    bandwidth=st.floats(1 * GB, 200 * GB),
    per_core=st.floats(0.5 * GB, 20 * GB),
    l3_bytes=st.sampled_from([0.0, 2**20, 2**25]),
    l3_link=st.sampled_from([math.inf, 10 * GB]),
    cache_per_core=st.sampled_from([0.0, 30 * GB]),
)


@settings(max_examples=150, deadline=None)
@given(host=st.lists(domains, min_size=1, max_size=3),
       ranks=st.integers(1, 8), prefer=st.sampled_from(["numa", "l3"]), interleave=st.booleans(),
       weight_mib=st.sampled_from([1, 8, 64, 1024]))
def test_host_streaming_is_bounded_and_threads_never_hurt(host, ranks, prefer, interleave, weight_mib):
    try:
        links = rank_links(host, ranks, None, prefer, 5e-6, 0.0, interleave)
    except ValueError:
        return  # an uneven split: the planner's refusals are tested in test_topology
    for r, bw in enumerate(links.bandwidth):
        assert 0 < bw <= links.threads[r] * max(d.per_core for d in host) * (1 + 1e-9)
    assert sum(links.bandwidth) <= sum(d.bandwidth for d in host) * (1 + 1e-9)  # no more than the DRAM gives
    assert sum(links.cache_bytes) <= sum(d.l3_bytes * d.l3_domains for d in host) * (1 + 1e-9)
    model = ModelCost(weight_mib * 2**20, 12)
    layout = choose(model, links, "tp")[0].layout
    with_cache = predict(layout, model, links)
    without = predict(layout, model, Links(links.bandwidth, links.host_of, links.allreduce_s, 0.0, links.local_allreduce_s))
    assert with_cache.seconds_per_token <= without.seconds_per_token * (1 + 1e-9)  # a cache never slows a read
    # One rank: every added thread streams at least as fast.
    cores = sum(d.cores for d in host)
    speeds = [rank_links(host, 1, t, prefer, 0.0, 0.0, interleave).bandwidth[0] for t in range(1, cores + 1)]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(speeds, speeds[1:]))
