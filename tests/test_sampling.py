"""Seeded sampling gives the same tokens on every rank, and the same as
single-process transformers with the same seed."""
from __future__ import annotations

import copy

import pytest
import torch

import tp_engine
from conftest import run_ranks, tiny_model

SAMPLING = dict(do_sample=True, temperature=1.3, top_k=50, top_p=0.95, max_new_tokens=24)
SEED = 1234


def _sample_with_rank_seed(model, input_ids):
    rt = tp_engine.init()
    model = tp_engine.parallelize(model)
    # Deliberately different seeds per rank: tp_engine.generate must still keep ranks in step.
    torch.manual_seed(SEED + 1000 * rt.rank)
    return tp_engine.generate(model, input_ids, **SAMPLING)


def _sample_same_seed(model, input_ids):
    tp_engine.init()
    model = tp_engine.parallelize(model)
    torch.manual_seed(SEED)
    return model.generate(input_ids, **SAMPLING)


@pytest.mark.parametrize("world", [2, 3])
def test_sampling_same_on_all_ranks_and_as_transformers(world):
    reference = tiny_model("llama", 6, 3)
    input_ids = torch.tensor([[5, 17, 42, 99]])
    torch.manual_seed(SEED)
    expected = reference.generate(input_ids, **SAMPLING)
    torch.manual_seed(SEED + 1)
    other_seed = reference.generate(input_ids, **SAMPLING)
    assert not torch.equal(expected, other_seed), "sampling must actually depend on the seed"

    for outputs in (
        run_ranks(_sample_with_rank_seed, world, copy.deepcopy(reference), input_ids),
        run_ranks(_sample_same_seed, world, copy.deepcopy(reference), input_ids),
    ):
        for rank, tokens in enumerate(outputs):
            assert torch.equal(tokens, expected), f"rank {rank} sampled {tokens.tolist()} not {expected.tolist()}"


def _plain_generate_after_parallelize(model, input_ids):
    rt = tp_engine.init()
    if rt.rank == 0:
        torch.manual_seed(SEED)
    else:
        torch.manual_seed(999)
    model = tp_engine.parallelize(model)  # hands rank 0's RNG state to everyone
    return model.generate(input_ids, **SAMPLING)


def test_parallelize_synchronizes_rng_for_plain_generate():
    reference = tiny_model("qwen2", 4, 2)
    input_ids = torch.tensor([[1, 2, 3]])
    torch.manual_seed(SEED)
    expected = reference.generate(input_ids, **SAMPLING)
    outputs = run_ranks(_plain_generate_after_parallelize, 2, copy.deepcopy(reference), input_ids)
    for rank, tokens in enumerate(outputs):
        assert torch.equal(tokens, expected), f"rank {rank} diverged"


def _different_prompts(model):
    rt = tp_engine.init()
    model = tp_engine.parallelize(model)
    return tp_engine.generate(model, torch.tensor([[1, 2, 3 + rt.rank]]), max_new_tokens=2)


def test_generate_refuses_different_prompts_per_rank():
    with pytest.raises(tp_engine.distributed.RankFailed, match="different input_ids"):
        run_ranks(_different_prompts, 2, tiny_model("llama", 4, 2))
