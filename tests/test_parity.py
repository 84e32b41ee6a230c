"""Sharded models compute what single-process transformers computes.

For every covered family and every kind of split: logits within 1e-4 of the
unsharded model, 16 greedy tokens identical on every rank, and each rank's
KV cache holding only its own heads.
"""
from __future__ import annotations

import copy

import pytest
import torch

import tp_engine
from conftest import ARCHITECTURES, SPLITS, run_ranks, tiny_model

NEW_TOKENS = 16


def _sharded_run(model, input_ids, shares):
    tp_engine.init()
    model = tp_engine.parallelize(model, shares=shares)
    rank_plan = model.tp_engine_plan[model.tp_engine_rank]
    with torch.no_grad():
        out = model(input_ids, use_cache=True)
    cache_shapes = [tuple(layer.keys.shape) for layer in out.past_key_values.layers]
    generated = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {
        "logits": out.logits,
        "generated": generated,
        "cache_shapes": cache_shapes,
        "kv_heads": len(rank_plan.kv_heads),
    }


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_matches_transformers(arch, split):
    world, shares, num_q, num_kv = SPLITS[split]
    reference = tiny_model(arch, num_q, num_kv)
    input_ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199]])
    with torch.no_grad():
        expected_logits = reference(input_ids).logits
    expected_tokens = reference.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert expected_tokens.shape[1] == input_ids.shape[1] + NEW_TOKENS

    results = run_ranks(_sharded_run, world, copy.deepcopy(reference), input_ids, shares)

    for rank, result in enumerate(results):
        diff = (result["logits"] - expected_logits).abs().max().item()
        assert diff < 1e-4, f"rank {rank}: logits differ by {diff}"
        assert torch.equal(result["generated"], expected_tokens), f"rank {rank}: greedy tokens differ"
        for shape in result["cache_shapes"]:
            assert shape[1] == result["kv_heads"], f"rank {rank}: cache holds {shape[1]} heads, plan says {result['kv_heads']}"
    # The split really is a split: together the ranks hold at least every KV head.
    assert sum(r["kv_heads"] for r in results) >= num_kv
    if split == "tp4-kv-replicated":
        assert sum(r["kv_heads"] for r in results) > num_kv
