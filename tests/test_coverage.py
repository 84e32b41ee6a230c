"""The coverage walk over every causal LM in the installed transformers.

By default this walks all of them: measured on the 2-core development VM the
whole walk takes 50-130 s (two worker processes; the spread is other load),
under the 3-minute budget for running it whole. ``TP_ENGINE_COVERAGE_SAMPLE=N``
walks a sample instead: the N model types with the smallest SHA-256 of their
name (fixed across runs and machines, spread over families, picked by no one).
"""
from __future__ import annotations

import os

import pytest

from tp_engine.coverage import Row, architectures, deterministic_sample, summary, to_markdown, walk

SAMPLE = os.environ.get("TP_ENGINE_COVERAGE_SAMPLE")
TARGET = 0.90
# Full walk, transformers 5.23: 161 built, 59 pass (every architecture that
# gets a plan passes; the rest are refused with a reason). A regression
# guard: fewer passes means the planner, tiny configs or a spec broke.
MIN_PASS_FULL_WALK = 59


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    names = architectures()
    if SAMPLE:
        names = deterministic_sample(names, int(SAMPLE))
    return walk(names, jobs=2, timeout=180)


def _built(rows):
    return [r for r in rows if r.built]


def test_every_architecture_has_a_row(rows):
    names = architectures() if not SAMPLE else deterministic_sample(architectures(), int(SAMPLE))
    assert [r.model_type for r in rows] == list(names)
    assert len(_built(rows)) >= len(rows) // 2  # tiny_config builds most of them


def test_every_non_pass_row_says_why(rows):
    for row in rows:
        if row.passed:
            assert row.reasons() == []
            continue
        reasons = row.reasons()
        assert reasons, f"{row.model_type}: not a pass, and no reason"
        for reason in reasons:
            why = reason.split(":", 1)[-1].strip()
            assert why, f"{row.model_type}: empty reason {reason!r}"


def test_architectures_with_a_plan_pass(rows):
    """Of the built architectures that get a plan (declared or inferred), >= 90% pass parity."""
    planned = [r for r in _built(rows) if r.plan_source in ("spec", "auto")]
    assert planned
    failed = [f"{r.model_type}: {r.reasons()}" for r in planned if not r.passed]
    assert len(planned) - len(failed) >= TARGET * len(planned), "\n".join(failed)


@pytest.mark.skipif(bool(SAMPLE), reason="the floor is for the full walk")
def test_no_regression_in_passes(rows):
    passed = [r.model_type for r in _built(rows) if r.passed]
    assert len(passed) >= MIN_PASS_FULL_WALK, f"{summary(rows)}: {passed}"


@pytest.mark.xfail(
    strict=True,
    reason="target not met: 37% of built architectures pass (transformers 5.23); the rest are "
    "MoE (48), cross-attention decoders (11), fused q/k/v or gate/up layouts, latent attention, "
    "hybrids and per-layer configs, all refused with a reason; see docs/coverage.md",
)
def test_target_share_of_built_architectures_pass(rows):
    built = _built(rows)
    assert sum(r.passed for r in built) >= TARGET * len(built), summary(rows)


def test_markdown_table(rows):
    text = to_markdown(rows)
    assert f"**{summary(rows)}**" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model_type") and not line.startswith("| ---")]
    not_built = len(rows) - len(_built(rows))
    assert len(table) == len(_built(rows)) + not_built


def test_a_hanging_architecture_does_not_stall_the_walk():
    # 0.5 s is less than a worker needs to import transformers and build the
    # model, so the row must come back as a timeout, and the walk go on.
    rows = walk(["llama", "olmo"], jobs=1, timeout=0.5)
    assert [r.model_type for r in rows] == ["llama", "olmo"]
    assert all(not r.built and r.build_error.startswith("timed out after 0.5 s") for r in rows)
