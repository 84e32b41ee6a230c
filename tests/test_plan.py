"""The partition planner, in-process: examples from the design and properties."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tp_engine.plan import ModelDims, normalize_shares, plan_model, split_by_shares, split_in_units

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


# ------------------------------------------------------------ block-aligned MLP cuts (GGUF)

QWEN25_15B = ModelDims(num_q_heads=12, num_kv_heads=2, head_dim=128, hidden_size=1536, intermediate_size=8960,
                       vocab_size=151936)


def test_qwen_mlp_cut_on_k_quant_blocks():
    # 8960 = 35 x 256: an even cut (4480) would split a Q4_K/Q6_K block of the down projection.
    plain = plan_model(QWEN25_15B, 2)
    assert counts(plain, "mlp_columns") == [4480, 4480]
    plan = plan_model(QWEN25_15B, 2, mlp_unit=256)
    assert [(r.mlp_columns.start, r.mlp_columns.stop) for r in plan.ranks] == [(0, 18 * 256), (18 * 256, 8960)]
    assert plan.mlp_unit == 256 and "blocks of 256" in plan.describe()
    # Heads and vocabulary are not affected by the MLP unit.
    assert [r.q_heads for r in plan.ranks] == [r.q_heads for r in plain.ranks]
    assert [r.vocab for r in plan.ranks] == [r.vocab for r in plain.ranks]


def test_mlp_unit_must_be_positive():
    with pytest.raises(ValueError, match="unit must be a positive integer"):
        plan_model(SMOLLM2, 2, mlp_unit=0)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 50000), st.sampled_from([1, 32, 64, 256]), st.lists(st.integers(1, 9), min_size=1, max_size=8))
def test_split_in_units_cuts_on_block_boundaries(total, unit, shares):
    pieces = split_in_units(total, normalize_shares(len(shares), shares), unit)
    _tiles(pieces, total)
    weight = sum(shares)
    for piece, share in zip(pieces, shares):
        # Every cut is on a block boundary (or the end) ...
        assert piece.start % unit == 0 or piece.start == total
        assert piece.stop % unit == 0 or piece.stop == total
        # ... and each rank is within two blocks of its exact share (one for rounding
        # whole units, one for a last partial unit counted as whole).
        assert abs(len(piece) - total * share / weight) < 2 * unit + 1
    if unit == 1:
        assert pieces == split_by_shares(total, normalize_shares(len(shares), shares))


@settings(max_examples=100, deadline=None)
@given(requests(), st.sampled_from([32, 256]))
def test_plan_with_mlp_unit_tiles_on_blocks(request, unit):
    dims, world, shares = request
    plan = plan_model(dims, world, shares, mlp_unit=unit)
    _tiles([r.mlp_columns for r in plan.ranks], dims.intermediate_size)
    for r in plan.ranks:
        assert r.mlp_columns.start % unit == 0 or r.mlp_columns.start == dims.intermediate_size


# ------------------------------------------------------------ pipeline stages and TP x PP layouts

from tp_engine.plan import HybridLayout, plan_stages  # noqa: E402


def test_plan_stages_examples():
    assert plan_stages(4, 2) == [range(0, 2), range(2, 4)]
    assert plan_stages(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]  # uneven: earlier stages take the extra
    assert plan_stages(8, 2, [3, 1]) == [range(0, 6), range(6, 8)]
    assert plan_stages(3, 3, [100, 1, 1]) == [range(0, 1), range(1, 2), range(2, 3)]  # every stage keeps a layer


@pytest.mark.parametrize("layers, pp, shares, message", [
    (2, 3, None, "cannot cut 2 layers into 3 pipeline stages"),
    (4, 2, [1, 1, 1], "stage shares has 3 entries but there are 2 pipeline stages"),
    (4, 0, None, "positive integer"),
    (4, 2, [1, -1], "positive finite"),
])
def test_plan_stages_refuses(layers, pp, shares, message):
    with pytest.raises(ValueError, match=message):
        plan_stages(layers, pp, shares)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 80), st.data())
def test_plan_stages_properties(layers, data):
    pp = data.draw(st.integers(1, layers))
    shares = data.draw(st.none() | st.lists(st.integers(1, 9), min_size=pp, max_size=pp))
    stages = plan_stages(layers, pp, shares)
    # Contiguous, in order, covering every layer once, none empty.
    assert stages[0].start == 0 and stages[-1].stop == layers
    assert all(a.stop == b.start for a, b in zip(stages, stages[1:]))
    assert all(len(s) >= 1 for s in stages)
    # Each stage is within one layer (plus the one-layer minimum) of its share.
    weights = shares or [1] * pp
    for s, w in zip(stages, weights):
        ideal = 1 + (layers - pp) * w / sum(weights)
        assert abs(len(s) - ideal) < 1
    # A larger share never gets fewer layers.
    for (s1, w1), (s2, w2) in zip(zip(stages, weights), zip(stages[1:], weights[1:])):
        if w1 > w2:
            assert len(s1) >= len(s2)


def test_hybrid_layout_orders():
    tp_inner = HybridLayout(4, 2)
    assert tp_inner.tp_groups == [[0, 1], [2, 3]]
    assert [tp_inner.position(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    pp_inner = HybridLayout(4, 2, "pp_inner")
    assert pp_inner.tp_groups == [[0, 2], [1, 3]]
    assert [pp_inner.position(r) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]


@pytest.mark.parametrize("world, pp, order, message", [
    (4, 3, "tp_inner", "pp=3 does not divide the world of 4 ranks"),
    (4, 0, "tp_inner", "positive integer"),
    (4, 2, "sideways", "unknown rank order"),
])
def test_hybrid_layout_refuses(world, pp, order, message):
    with pytest.raises(ValueError, match=message):
        HybridLayout(world, pp, order)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from(["tp_inner", "pp_inner"]))
def test_hybrid_layout_is_a_bijection(tp, pp, order):
    layout = HybridLayout(tp * pp, pp, order)
    assert layout.tp == tp
    positions = [layout.position(r) for r in range(tp * pp)]
    assert sorted(positions) == [(s, t) for s in range(pp) for t in range(tp)]
    assert all(layout.rank_of(*layout.position(r)) == r for r in range(tp * pp))
    groups = layout.tp_groups
    assert sorted(r for g in groups for r in g) == list(range(tp * pp))
    assert all(layout.position(r)[0] == s for s, g in enumerate(groups) for r in g)
