"""Olmo 2: attention split by heads although q_norm / k_norm span all heads.

Olmo 2 normalizes ``q_proj(x)`` over all ``num_heads x head_dim`` features
(and ``k_proj(x)`` over all KV heads) before the head reshape. The
auto-planner shards these norms with their heads (``ArchSpec.qk_norm_span``,
``layers.HeadShardedRMSNorm``: one all-reduce of per-token sums of squares)
instead of keeping attention whole. Against unsharded transformers, at TP=1,
TP=2, an uneven TP=3 (cuts inside KV groups) and TP=4 (8 Q / 2 KV heads: every
KV head on two ranks, counted once in the k sum):

* the sharded HF model: logits within 1e-4, 16 greedy tokens identical;
* the lean runtime (``runtime/families/olmo2.py``): prompt logits within
  1e-4, 16 greedy tokens from ``generate(..., fast_path=True)`` identical;
* the plan shards attention (each rank's q_proj is a slice) and every q / k
  row counts exactly once in the sums of squares;
* backward gives the unsharded gradients, per shard.
"""
from __future__ import annotations

import copy
import functools
import traceback
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import tp_engine
from conftest import run_ranks
from tp_engine.check import inferred_spec
from tp_engine.comm.base import SingleProcessCommunicator
from tp_engine.layers import HeadShardedRMSNorm
from tp_engine.models.layout import rms_norm_form

NEW_TOKENS = 16
TOL = 1e-4
NQ, NKV, HD, HIDDEN = 8, 2, 16, 128
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199]])
WORLDS = [1, 2, 3, 4]


def build() -> nn.Module:
    config = transformers.Olmo2Config(
        vocab_size=257, hidden_size=HIDDEN, intermediate_size=200, num_attention_heads=NQ, num_key_value_heads=NKV,
        num_hidden_layers=2, max_position_embeddings=256, initializer_range=0.2, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
    model.generation_config.pad_token_id = 0
    return model


@functools.cache
def reference() -> tuple[torch.Tensor, list[int]]:
    """Unsharded transformers: prompt logits and greedy tokens."""
    model = build()
    with torch.no_grad():
        logits = model(PROMPT).logits[0]
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT.shape[1]:].tolist()
    return logits, tokens


def _norm_rows(norm: nn.Module) -> dict[str, Any]:
    """The global rows a (sharded) norm holds and those it counts in its sum of squares."""
    (start, stop), = norm.weight.tp_shard.ranges
    counted = [start + i for a, b in norm.counted for i in range(a, b)]
    return {"held": list(range(start, stop)), "counted": counted}


def _run(world: int) -> dict[str, Any]:
    """One rank: shard (parallelize, auto-planned), then the HF forward and generate, then the runtime."""
    try:
        model = build()
        full = build()
        comm = SingleProcessCommunicator() if world == 1 else None
        model = tp_engine.parallelize(model, comm=comm)
        attn = model.model.layers[0].self_attn
        out: dict[str, Any] = {
            "q_rows": attn.q_proj.out_features,
            "k_rows": attn.k_proj.out_features,
            "q_norm": _norm_rows(attn.q_norm),
            "k_norm": _norm_rows(attn.k_norm),
            "norm_types": {type(attn.q_norm).__name__, type(attn.k_norm).__name__},
        }
        with torch.no_grad():
            # The norms alone: each rank's rows of the unsharded k_norm(k_proj(x)) and q_norm(q_proj(x)).
            x = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
            ref_attn = full.model.layers[0].self_attn
            diffs = []
            for name, proj in (("q_norm", "q_proj"), ("k_norm", "k_proj")):
                mine = getattr(attn, name)(getattr(attn, proj)(x))
                rows = out[name]["held"]
                ref = getattr(ref_attn, name)(getattr(ref_attn, proj)(x))[..., rows]
                diffs.append(float((mine - ref).abs().max()))
            out["norm_diff"] = max(diffs)
            # Counting every held k row (a replicated KV head twice) would be wrong: the control.
            k_norm = attn.k_norm
            naive = HeadShardedRMSNorm(k_norm.width, k_norm.weight.tp_shard.ranges, k_norm.comm, k_norm.variance_epsilon)
            naive.weight.copy_(k_norm.weight)
            rows = out["k_norm"]["held"]
            out["naive_k_diff"] = float(
                (naive(attn.k_proj(x)) - ref_attn.k_norm(ref_attn.k_proj(x))[..., rows]).abs().max()
            )
            out["hf_logits"] = model(PROMPT).logits[0]
            hf = tp_engine.generate(model, PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, fast_path=False)
            out["hf_tokens"] = hf[0, PROMPT.shape[1]:].tolist()

            from tp_engine.runtime import decoder_for

            dec = decoder_for(model)
            dec.reserve(1, PROMPT.shape[1] + NEW_TOKENS + 1)
            h = dec.forward(dec.embed(PROMPT[0]), [0], [0], [PROMPT.shape[1]], last_only=False)
            out["rt_logits"] = dec.rows_logits(h)
            rt = tp_engine.generate(model, PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, fast_path=True)
            out["rt_tokens"] = rt[0, PROMPT.shape[1]:].tolist()
        return out
    except Exception:  # reported by the test
        return {"error": traceback.format_exc()}


@functools.cache
def results(world: int) -> list[dict[str, Any]]:
    if world == 1:
        torch.set_num_threads(1)
        return [_run(1)]
    return run_ranks(_run, world, world)


def test_planner_shards_olmo2_attention():
    spec = inferred_spec(build())
    assert spec.qk_norm_span == ("q_norm", "k_norm")
    assert spec.replicate == () and not spec.layer_kinds, spec.notes


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"tp{w}")
def test_sharded_olmo2_matches_transformers(world):
    ref_logits, ref_tokens = reference()
    got = results(world)
    for rank, r in enumerate(got):
        assert "error" not in r, r.get("error")
        err = float((r["hf_logits"] - ref_logits).abs().max())
        assert err < TOL, f"rank {rank}: HF forward of the sharded model differs by {err:.2e}"
        assert r["hf_tokens"] == ref_tokens, f"rank {rank}"
        err = float((r["rt_logits"] - ref_logits).abs().max())
        assert err < TOL, f"rank {rank}: runtime logits differ by {err:.2e}"
        assert r["rt_tokens"] == ref_tokens, f"rank {rank}"
        assert r["norm_diff"] < 1e-5, f"rank {rank}: q/k norms differ by {r['norm_diff']:.2e}"


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"tp{w}")
def test_attention_is_split_and_every_row_counts_once(world):
    got = results(world)
    assert all("error" not in r for r in got), next(r["error"] for r in got if "error" in r)
    assert all(r["norm_types"] == {"HeadShardedRMSNorm"} for r in got)
    if world > 1:
        assert all(r["q_rows"] < NQ * HD for r in got)  # attention really is split
    for name, width in (("q_norm", NQ * HD), ("k_norm", NKV * HD)):
        counted = sorted(i for r in got for i in r[name]["counted"])
        assert counted == list(range(width)), f"{name}: rows counted {counted}"
        held = sorted({i for r in got for i in r[name]["held"]})
        assert held == list(range(width))
    if world == 4:
        # 8 Q / 2 KV heads on 4 ranks: each KV head sits on two ranks, counted on one.
        assert [len(r["k_norm"]["held"]) for r in got] == [HD] * 4
        assert [len(r["k_norm"]["counted"]) for r in got] == [HD, 0, HD, 0]
        assert max(r["naive_k_diff"] for r in got) > 1e-2  # double counting would show


def test_rms_norm_form():
    olmo2 = transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm(8, eps=1e-5)
    llama = transformers.models.llama.modeling_llama.LlamaRMSNorm(8, eps=1e-6)
    gemma = transformers.models.gemma.modeling_gemma.GemmaRMSNorm(8)
    assert rms_norm_form(olmo2) == (1e-5, False)
    assert rms_norm_form(llama) == (1e-6, True)
    assert rms_norm_form(gemma) is None  # (1 + w)
    assert rms_norm_form(nn.LayerNorm(8)) is None
    with torch.device("meta"):
        assert rms_norm_form(transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm(8)) == (1e-6, False)


# ------------------------------------------------------------ gradients

LR = 0.05


def _loss(model, input_ids):
    return model(input_ids, labels=input_ids).loss


def _sharded_grads(model, input_ids):
    tp_engine.init()
    model = tp_engine.parallelize(model).train()
    _loss(model, input_ids).backward()
    return {name: (p.grad.clone(), getattr(p, "tp_shard", None)) for name, p in model.named_parameters()}


@pytest.mark.parametrize("world", [3, 4], ids=lambda w: f"tp{w}")
def test_gradients_match_unsharded(world):
    reference_model = build().train()
    input_ids = PROMPT[:, :10]
    sharded_copy = copy.deepcopy(reference_model)
    _loss(reference_model, input_ids).backward()
    ref_grads = {name: p.grad.clone() for name, p in reference_model.named_parameters()}
    for rank, grads in enumerate(run_ranks(_sharded_grads, world, sharded_copy, input_ids)):
        assert any(name.endswith("self_attn.k_norm.weight") and spec is not None for name, (_, spec) in grads.items())
        for name, (grad, spec) in grads.items():
            expected = ref_grads[name] if spec is None else spec.take(ref_grads[name])
            torch.testing.assert_close(grad, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"rank {rank} {name}: {m}")


# ------------------------------------------------------------ loading


def _load(path):
    model = tp_engine.from_pretrained(path)
    k_norm = model.model.layers[0].self_attn.k_norm
    with torch.no_grad():
        logits = model(PROMPT).logits[0]
    return {
        "logits": logits,
        "k_norm": (type(k_norm).__name__, k_norm.weight.tp_shard.ranges, k_norm.weight.clone()),
        "meta": [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta],
    }


def test_from_pretrained_reads_each_norm_slice(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    ref_logits, _ = reference()
    full_k = model.model.layers[0].self_attn.k_norm.weight.detach()
    for rank, r in enumerate(run_ranks(_load, 4, str(tmp_path))):
        assert not r["meta"], r["meta"]
        name, ranges, weight = r["k_norm"]
        assert name == "HeadShardedRMSNorm" and ranges == (((rank // 2) * HD, (rank // 2 + 1) * HD),)
        assert torch.equal(weight, full_k[ranges[0][0] : ranges[0][1]])
        err = float((r["logits"] - ref_logits).abs().max())
        assert err < TOL, f"rank {rank}: logits differ by {err:.2e}"
