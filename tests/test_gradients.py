"""Backward through the sharded model gives the unsharded gradients, per shard,
and a training step leaves the sharded model computing what the unsharded one does."""
from __future__ import annotations

import copy

import pytest
import torch

import tp_engine
from conftest import run_ranks, tiny_model

LR = 0.05


def _loss(model, input_ids):
    return model(input_ids, labels=input_ids).loss


def _sharded_step(model, input_ids):
    tp_engine.init()
    model = tp_engine.parallelize(model).train()
    loss = _loss(model, input_ids)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        spec = getattr(p, "tp_shard", None)
        grads[name] = (p.grad.clone(), spec)
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    model.eval()
    with torch.no_grad():
        logits_after = model(input_ids).logits
    return loss.detach(), grads, logits_after


@pytest.mark.parametrize(
    "arch, world, num_q, num_kv",
    [
        ("llama", 2, 8, 4),  # even split
        ("qwen2", 4, 6, 2),  # KV heads replicated (and q/k/v biases): partial grads must be summed
        ("gemma", 3, 10, 5),  # uneven, tied and scaled embedding
    ],
)
def test_gradients_match_unsharded(arch, world, num_q, num_kv):
    reference = tiny_model(arch, num_q, num_kv, layers=2).train()
    input_ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12]])
    sharded_copy = copy.deepcopy(reference)

    loss = _loss(reference, input_ids)
    loss.backward()
    ref_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    with torch.no_grad():
        for p in reference.parameters():
            p -= LR * p.grad
    reference.eval()
    with torch.no_grad():
        ref_logits_after = reference(input_ids).logits

    results = run_ranks(_sharded_step, world, sharded_copy, input_ids)
    for rank, (rank_loss, grads, logits_after) in enumerate(results):
        torch.testing.assert_close(rank_loss, loss.detach(), atol=1e-5, rtol=1e-5)
        assert grads.keys() <= ref_grads.keys()
        missing = {n for n in ref_grads if n not in grads and not n.startswith("lm_head")}
        assert not missing, f"parameters lost by sharding: {missing}"
        for name, (grad, spec) in grads.items():
            expected = ref_grads[name] if spec is None else spec.take(ref_grads[name])
            torch.testing.assert_close(grad, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"rank {rank} {name}: {m}")
        diff = (logits_after - ref_logits_after).abs().max().item()
        assert diff < 1e-4, f"rank {rank}: after one SGD step logits differ by {diff}"
