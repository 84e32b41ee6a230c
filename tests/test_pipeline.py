"""Pipeline parallelism and hybrid TP x PP compute what transformers computes.

The reference is the unsharded transformers model in this process: its
prompt logits and its greedy ``generate`` of each prompt alone. Each case
runs its ranks as threads (``run_threads``) and checks, for one sequence and
for a batch of sequences in flight (micro-batched through the stages):
prompt logits within 1e-4 and greedy tokens identical. Splits: PP=2, PP=3
over an uneven layer count, TP=2 x PP=2 in both rank orders, weighted stage
and TP shares, on Llama (GQA, untied), Qwen2 (tied embeddings) and GPT-2
(learned positions on the first stage, Conv1D). Every rank also shows that it
holds only its own stage's layers and only their KV cache.
"""
from __future__ import annotations

import copy
import functools
import re
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tp_engine
from tp_engine.api import plan_pipeline
from tp_engine.comm.threads import run_threads
from tp_engine.plan import HybridLayout, plan_stages

TOL = 1e-4
NEW = 10
PROMPTS = [[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199], [7, 7, 100], [200, 1, 2, 3, 4, 5, 6, 9], [33], [90, 80, 70]]


def build(family: str, layers: int) -> nn.Module:
    """A fresh copy of the tiny model (thread ranks share torch's global RNG, so each is built once)."""
    return copy.deepcopy(_built(family, layers))


@functools.cache
def _built(family: str, layers: int) -> nn.Module:
    import transformers

    kw = dict(vocab_size=257, initializer_range=0.2, num_hidden_layers=layers)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_head=4, n_inner=None, n_positions=64, **kw)
        cls = transformers.GPT2LMHeadModel
    else:
        config = getattr(transformers, {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}[family])(
            hidden_size=128, intermediate_size=200, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, tie_word_embeddings=family == "qwen2", **kw)
        cls = getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family])
    torch.manual_seed(0)
    model = cls(config).eval()
    model.generation_config.eos_token_id = None  # always NEW tokens
    model.generation_config.pad_token_id = 0
    return model


@functools.cache
def reference(family: str, layers: int) -> dict:
    model = build(family, layers)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits[0]
        tokens = [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
                  for p in PROMPTS]
    return {"logits": logits, "tokens": tokens}


@dataclass(frozen=True)
class Case:
    family: str
    layers: int
    world: int
    pp: int
    order: str = "tp_inner"
    shares: tuple | None = None  # TP shares inside each stage
    stage_shares: tuple | None = None


CASES = {
    "llama-pp2": Case("llama", 4, 2, 2),
    "llama-pp3-uneven": Case("llama", 5, 3, 3),
    "llama-pp2-stage-shares-3-1": Case("llama", 4, 2, 2, stage_shares=(3, 1)),
    "llama-tp2xpp2": Case("llama", 4, 4, 2),
    "llama-tp2xpp2-pp-inner-weighted": Case("llama", 5, 4, 2, "pp_inner", shares=(3, 1), stage_shares=(1, 2)),
    "qwen2-pp2-tied": Case("qwen2", 3, 2, 2),
    "gpt2-pp2": Case("gpt2", 3, 2, 2),
    "gpt2-tp2xpp2": Case("gpt2", 4, 4, 2),
}

_LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def _rank(comm, case: Case) -> dict:
    model = build(case.family, case.layers)
    model = tp_engine.parallelize(model, list(case.shares) if case.shares else None, comm=comm, pp=case.pp,
                                  stage_shares=list(case.stage_shares) if case.stage_shares else None,
                                  order=case.order)
    stage = model.tp_engine_pipeline
    held = sorted({int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER_INDEX.search(name))})
    logits = stage.prefill_logits(PROMPTS[0])
    one = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NEW)[0, len(PROMPTS[0]):].tolist()
    many = stage.generate(PROMPTS, NEW)
    rows = (model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
    return {"stage": stage.stage, "held": held, "cache_layers": len(stage.cache.k), "cache_n": stage.cache.n_layers,
            "vocab_rows": rows, "logits": logits, "one": one, "many": many}


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_matches_transformers(name):
    case = CASES[name]
    ref = reference(case.family, case.layers)
    got = run_threads(_rank, case.world, case, timeout=240)
    stages = plan_stages(case.layers, case.pp, case.stage_shares)
    layout = HybridLayout(case.world, case.pp, case.order)
    for rank, g in enumerate(got):
        assert g["stage"] == layout.position(rank)[0]
        mine = stages[g["stage"]]
        assert g["held"] == list(mine), f"rank {rank} holds layers {g['held']}, its stage is {mine}"
        assert g["cache_layers"] == g["cache_n"] == len(mine)
        # The embedding only where it is read (first stage; the last too when it is the tied LM head),
        # the LM head only on the last stage (and the first when tied).
        tied = case.family != "llama"
        first, last = g["stage"] == 0, g["stage"] == case.pp - 1
        emb_rows, head_rows = g["vocab_rows"]
        assert (emb_rows > 0) == (first or (tied and last)), (rank, g["vocab_rows"])
        assert (head_rows > 0) == (last or (tied and first)), (rank, g["vocab_rows"])
        err = float((g["logits"] - ref["logits"]).abs().max())
        assert err < TOL, f"rank {rank}: logits differ from transformers by {err:.2e}"
        assert g["one"] == ref["tokens"][0]
        assert g["many"] == ref["tokens"]


def test_stages_overlap_with_sequences_in_flight():
    """With 4 sequences on 2 stages, the first stage sends both micro-batches down the pipeline before it
    waits for the first tokens; with one micro-batch it waits after every send. (Receives are posted
    early; "recv" is logged where a rank waits for one.)"""
    from tp_engine.comm import groups

    ref = reference("llama", 4)["tokens"]  # builds the model before the ranks copy it

    def rank(comm, micro):
        model = tp_engine.parallelize(build("llama", 4), comm=comm, pp=2)
        stage = model.tp_engine_pipeline
        log = []

        class Logged:  # records the order of the first stage's sends and receives
            def __init__(self, inner):
                self.inner = inner

            def isend(self, t, dst):
                log.append("send" if t.dtype == torch.int64 and t.numel() > NEW else "data")
                return self.inner.isend(t, dst)

            def recv(self, t, src):
                log.append("recv")
                return self.inner.recv(t, src)

            def irecv(self, t, src):
                handle = self.inner.irecv(t, src)
                outer = SimpleNamespace(wait=lambda: (log.append("recv"), handle.wait()),
                                        is_completed=handle.is_completed)
                return outer

        stage.p2p = Logged(groups.p2p_of(comm))
        out = stage.generate(PROMPTS[:4], 3, micro_batches=micro)
        first_recv = log.index("recv") if "recv" in log else None
        return out, log[:first_recv].count("send")

    for micro, expect in ((2, 2), (1, 1)):
        got = run_threads(rank, 2, micro, timeout=120)
        assert got[0][0] == [t[:3] for t in ref[:4]] == got[1][0]
        assert got[0][1] == expect


@pytest.mark.parametrize("world, layers, pp, shares, stage_shares, message", [
    (4, 4, 3, None, None, "pp=3 does not divide the world of 4 ranks"),
    (4, 3, 4, None, None, "cannot cut 3 layers into 4 pipeline stages"),
    (2, 4, 2, None, [1, 2, 3], "stage shares has 3 entries but there are 2 pipeline stages"),
    (4, 4, 2, [1, 2, 3], None, "shares has 3 entries but each pipeline stage has 2 tensor-parallel ranks"),
    (18, 4, 2, None, None, "cannot split 8 attention heads over 9 ranks"),
])
def test_bad_requests_are_refused_before_anything_runs(world, layers, pp, shares, stage_shares, message):
    config = build("llama", layers).config
    with pytest.raises(ValueError, match=message):
        plan_pipeline(SimpleNamespace(world_size=world), config, pp, shares, stage_shares, "tp_inner")


def test_parallelize_refuses_before_touching_the_model():
    model = build("llama", 2)
    before = copy.deepcopy(model.state_dict())

    def rank(comm):
        with pytest.raises(ValueError, match="cannot cut 2 layers into 3 pipeline stages"):
            tp_engine.parallelize(model if comm.rank == 0 else build("llama", 2), comm=comm, pp=3)
        return True

    assert run_threads(rank, 3, timeout=60) == [True] * 3
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _load_rank(path: str) -> tuple[list[int], list[list[int]]]:
    comm = tp_engine.init().comm
    model = tp_engine.from_pretrained(path, dtype=torch.float32, comm=comm, device="cpu", pp=2)
    model.generation_config.eos_token_id = None
    held = sorted({int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER_INDEX.search(name))})
    out = tp_engine.generate(model, torch.tensor([PROMPTS[1], PROMPTS[4]]), max_new_tokens=NEW)
    return held, out[:, 3:].tolist()


def test_from_pretrained_reads_only_the_stage(tmp_path):
    """Loading a checkpoint with pp=2: each stage materializes only its layers, and the pipeline matches
    transformers. (Processes, not threads: building skeletons patches torch module-wide.)"""
    from conftest import run_ranks

    build("llama", 4).save_pretrained(tmp_path)
    ref = reference("llama", 4)
    got = run_ranks(_load_rank, 2, str(tmp_path))
    assert [g[0] for g in got] == [[0, 1], [2, 3]]
    assert all(g[1] == [ref["tokens"][1], ref["tokens"][4]] for g in got)


def _launched_rank(case: Case) -> tuple[list[int], list[list[int]]]:
    import tp_engine.distributed as dist_mod

    comm = dist_mod.init().comm
    model = tp_engine.parallelize(build(case.family, case.layers), comm=comm, pp=case.pp, order=case.order)
    logits = model.tp_engine_pipeline.prefill_logits(PROMPTS[0])
    return logits, model.tp_engine_pipeline.generate(PROMPTS, NEW)


def test_processes_hybrid_over_torch_distributed():
    """Real processes (``tp_engine.launch``: shared-memory all-reduce inside each stage, gloo sends between
    stages), TP=2 x PP=2 with the stages interleaved (pp_inner)."""
    from conftest import run_ranks

    case = Case("llama", 4, 4, 2, "pp_inner")
    ref = reference(case.family, case.layers)
    for logits, tokens in run_ranks(_launched_rank, 4, case):
        assert float((logits - ref["logits"]).abs().max()) < TOL
        assert tokens == ref["tokens"]


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "4", "--pp", "3", "--greedy"], "pp=3 does not divide the world of 4 ranks"),
    (["--nproc", "2", "--pp", "2"], "--pp decodes greedily only"),
    (["--nproc", "4", "--pp", "2", "--greedy", "--shares", "1,1,1,1"], "--shares has 4 entries but there are 2 ranks per pipeline stage"),
    (["--nproc", "2", "--pp", "2", "--greedy", "--stage-shares", "1,2,3"], "--stage-shares has 3 entries but there are 2"),
    (["--nproc", "2", "--pp", "2", "--greedy", "--draft", "int8"], "--pp does not combine with --draft"),
])
def test_cli_refuses_bad_pipeline_requests(argv, message, capsys):
    from tp_engine.cli import main

    assert main(["generate", "hi", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_more_stages_than_layers_before_spawning(tmp_path, capsys, monkeypatch):
    from tp_engine import spawn
    from tp_engine.cli import main

    build("llama", 2).save_pretrained(tmp_path)
    monkeypatch.setattr(spawn, "run_local_ranks", lambda *a: pytest.fail("ranks were started"))
    assert main(["generate", "hi", "--model", str(tmp_path), "--nproc", "3", "--pp", "3", "--greedy"]) == 2
    assert "cannot cut 2 layers into 3 pipeline stages" in capsys.readouterr().err


def _failing_load_rank(path: str) -> str:
    try:
        tp_engine.from_pretrained(path, dtype=torch.float32, device="cpu", pp=2)
    except Exception as exc:  # noqa: BLE001 - each rank's error is checked by the test
        return str(exc)
    return "loaded"


def test_a_stage_that_fails_to_load_stops_the_others(tmp_path):
    """Only the last stage reads layer 3; with that tensor missing it fails, and the first stage (which loaded
    fine) raises too instead of waiting for activations that never come."""
    from safetensors.torch import load_file, save_file

    from conftest import run_ranks

    build("llama", 4).save_pretrained(tmp_path)
    [file] = tmp_path.glob("*.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    start = time.monotonic()
    first, last = run_ranks(_failing_load_rank, 2, str(tmp_path))
    assert time.monotonic() - start < 30
    assert "model.layers.3.mlp.down_proj.weight" in last
    assert "another pipeline stage failed" in first


def test_ranks_given_different_prompts_are_refused():
    reference("llama", 2)  # builds the model before the ranks copy it

    def rank(comm):
        model = tp_engine.parallelize(build("llama", 2), comm=comm, pp=2)
        with pytest.raises(ValueError, match="ranks \\[1\\] were given different input_ids"):
            model.tp_engine_pipeline.generate([PROMPTS[comm.rank]], 3)
        with pytest.raises(ValueError, match="greedily and does not take: do_sample=True, num_beams"):
            model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=3, do_sample=True, num_beams=2)
        return True

    assert run_threads(rank, 2, timeout=60) == [True, True]
