"""The placement model: predicted seconds per token of TP, PP and hybrid layouts, and the choice."""
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tp_engine.launch.placement import Links, ModelCost, choose, predict

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
