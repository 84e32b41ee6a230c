"""The partition planner, in-process: examples from the design and properties."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tp_engine.plan import ModelDims, normalize_shares, plan_model, split_by_shares

SMOLLM2 = ModelDims(num_q_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536, vocab_size=49152)


def counts(plan, attr):
    return [len(getattr(r, attr)) for r in plan.ranks]


def test_even_split():
    plan = plan_model(ModelDims(16, 4, 64, 1024, 2816, 49152), 2)
    assert counts(plan, "q_heads") == [8, 8]
    assert counts(plan, "kv_heads") == [2, 2]
    assert counts(plan, "mlp_columns") == [1408, 1408]
    assert plan.replicated_kv_heads == frozenset()


def test_uneven_smollm2_on_two_ranks_splits_by_kv_groups():
    plan = plan_model(SMOLLM2, 2)
    assert [tuple(r.q_heads) for r in plan.ranks] == [tuple(range(0, 6)), tuple(range(6, 9))]
    assert [tuple(r.kv_heads) for r in plan.ranks] == [(0, 1), (2,)]
    assert [r.q_per_kv for r in plan.ranks] == [3, 3]


def test_smollm2_on_three_ranks_is_one_group_each():
    plan = plan_model(SMOLLM2, 3)
    assert counts(plan, "q_heads") == [3, 3, 3]
    assert [tuple(r.kv_heads) for r in plan.ranks] == [(0,), (1,), (2,)]


def test_kv_replication_single_kv_head():
    plan = plan_model(ModelDims(4, 1, 64, 256, 512, 1000), 4)
    assert counts(plan, "q_heads") == [1, 1, 1, 1]
    assert all(tuple(r.kv_heads) == (0,) for r in plan.ranks)
    assert plan.replicated_kv_heads == {0}


def test_kv_replication_9q_3kv_on_four_ranks():
    plan = plan_model(SMOLLM2, 4)
    assert sorted(counts(plan, "q_heads")) == [2, 2, 2, 3]
    assert plan.replicated_kv_heads  # 3 KV heads cannot serve 4 ranks without copies


def test_weighted_shares():
    plan = plan_model(ModelDims(8, 8, 64, 512, 1000, 1000), 2, [3, 1])
    assert counts(plan, "q_heads") == [6, 2]
    assert counts(plan, "mlp_columns") == [750, 250]
    assert counts(plan, "vocab") == [750, 250]
    plan = plan_model(ModelDims(8, 8, 64, 512, 1000, 1000), 3, [2, 1, 1])
    assert counts(plan, "q_heads") == [4, 2, 2]
    assert counts(plan, "mlp_columns") == [500, 250, 250]


@pytest.mark.parametrize(
    "world, shares, message",
    [
        (10, None, "at most 9 ranks"),
        (2, [1], "shares has 1 entries but there are 2 ranks"),
        (2, [1, 0], "positive"),
        (2, [1, -2], "positive"),
        (2, [1, float("nan")], "positive"),
        (2, [1, "a"], "positive"),
        (0, None, "world size must be a positive integer"),
    ],
)
def test_impossible_requests_are_refused(world, shares, message):
    with pytest.raises(ValueError, match=message):
        plan_model(SMOLLM2, world, shares)


def test_bad_dims_are_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        ModelDims(9, 4, 64, 576, 1536, 100)
    with pytest.raises(ValueError, match="num_q_heads must be a positive integer"):
        ModelDims(0, 1, 64, 576, 1536, 100)


def test_from_config_reads_hf_names():
    class Config:
        num_attention_heads = 9
        num_key_value_heads = 3
        hidden_size = 576
        head_dim = 64
        intermediate_size = 1536
        vocab_size = 49152

    assert ModelDims.from_config(Config()) == SMOLLM2


def test_split_by_shares_largest_remainder():
    pieces = split_by_shares(10, normalize_shares(3, None))
    assert [len(p) for p in pieces] == [4, 3, 3]
    assert pieces[0].start == 0 and pieces[-1].stop == 10


@st.composite
def requests(draw):
    num_kv = draw(st.integers(1, 12))
    group = draw(st.integers(1, 8))
    num_q = num_kv * group
    world = draw(st.integers(1, min(num_q, 12)))
    shares = draw(st.one_of(st.none(), st.lists(st.integers(1, 5), min_size=world, max_size=world)))
    dims = ModelDims(
        num_q_heads=num_q,
        num_kv_heads=num_kv,
        head_dim=draw(st.sampled_from([8, 64, 80, 128])),
        hidden_size=draw(st.integers(8, 4096)),
        intermediate_size=draw(st.integers(world, 20000)),
        vocab_size=draw(st.integers(world, 200000)),
    )
    return dims, world, shares


def _tiles(ranges, total):
    start = 0
    for r in ranges:
        assert r.start == start and r.stop >= r.start
        start = r.stop
    assert start == total


@settings(max_examples=300, deadline=None)
@given(requests())
def test_plan_properties(request):
    dims, world, shares = request
    plan = plan_model(dims, world, shares)
    assert len(plan.ranks) == world
    g = dims.group_size
    # Every Q head lands on exactly one rank, in order; MLP columns and vocab tile.
    _tiles([r.q_heads for r in plan.ranks], dims.num_q_heads)
    _tiles([r.mlp_columns for r in plan.ranks], dims.intermediate_size)
    _tiles([r.vocab for r in plan.ranks], dims.vocab_size)
    held_kv = set()
    for r in plan.ranks:
        assert len(r.q_heads) >= 1 and len(r.vocab) >= 1
        # Each rank's Q heads find their KV head locally ...
        needed = {h // g for h in r.q_heads}
        assert needed == set(r.kv_heads)
        # ... and every local KV head serves the same number of local Q heads,
        # which is what the module's num_key_value_groups says.
        per_kv = [sum(1 for h in r.q_heads if h // g == kv) for kv in r.kv_heads]
        assert per_kv == [r.q_per_kv] * len(r.kv_heads)
        held_kv |= set(r.kv_heads)
    assert held_kv == set(range(dims.num_kv_heads))
    # Replication only when unavoidable: never when ranks can take whole groups evenly.
    if shares is None and dims.num_kv_heads % world == 0:
        assert not plan.replicated_kv_heads
        assert counts(plan, "q_heads") == [dims.num_q_heads // world] * world


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 100000), st.lists(st.integers(1, 9), min_size=1, max_size=16))
def test_split_by_shares_is_proportional(total, shares):
    pieces = split_by_shares(total, normalize_shares(len(shares), shares))
    _tiles(pieces, total)
    weight = sum(shares)
    for piece, share in zip(pieces, shares):
        assert abs(len(piece) - total * share / weight) < 1
