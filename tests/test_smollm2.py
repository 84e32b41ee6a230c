"""The real SmolLM2-135M-Instruct (9 Q / 3 KV heads, 30 layers, tied
embeddings) sharded in memory: 32 greedy tokens identical to transformers."""
from __future__ import annotations

import copy

import pytest
import torch

import tp_engine
from conftest import run_ranks

NEW_TOKENS = 32


def _generate(model, input_ids):
    tp_engine.init()
    model = tp_engine.parallelize(model)
    with torch.no_grad():
        logits = model(input_ids).logits[:, -1]
    # min_new_tokens keeps all 32 tokens even past an end-of-turn token.
    return logits, tp_engine.generate(
        model, input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )


@pytest.fixture(scope="module")
def prompt_and_reference(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Name three uses of copper and explain one of them."}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    input_ids = getattr(input_ids, "input_ids", input_ids)
    with torch.no_grad():
        logits = model(input_ids).logits[:, -1]
    tokens = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    assert tokens.shape[1] == input_ids.shape[1] + NEW_TOKENS
    return input_ids, logits, tokens


@pytest.mark.parametrize("world", [2, 3])
def test_smollm2_greedy_identical(smollm2, prompt_and_reference, world):
    model, tokenizer = smollm2
    input_ids, expected_logits, expected = prompt_and_reference
    results = run_ranks(_generate, world, copy.deepcopy(model), input_ids)
    for rank, (logits, tokens) in enumerate(results):
        diff = (logits - expected_logits).abs().max().item()
        assert diff < 1e-4, f"rank {rank}: last-position logits differ by {diff}"
        assert torch.equal(tokens, expected), (
            f"rank {rank} at TP={world}: {tokenizer.decode(tokens[0, input_ids.shape[1]:])!r} != "
            f"{tokenizer.decode(expected[0, input_ids.shape[1]:])!r}"
        )
