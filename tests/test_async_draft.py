"""Asynchronous speculative decoding (the draft on its own rank drafts ahead while the target verifies)
against transformers' own decoding of the unsharded target.

Greedy: the output is the target's greedy output token for token at target TP=1 and TP=2, with the draft
rank first or last, for an unrelated draft (almost every proposal rejected: the restart path) and the
target itself (everything accepted: the drafting-ahead path), on thread ranks and on local processes;
and on the real Qwen2.5-Coder 1.5B/0.5B pair when its files are installed.
Sampling: a chi-square test that the output follows the target's distribution.
Failure: a draft rank that raises or stops makes every target rank raise DraftLost within the timeout.
"""
from __future__ import annotations

import copy
import gc
import os
import signal
import threading
import time

import pytest
import torch

import tp_engine
from conftest import run_ranks, tiny_model
from tp_engine.async_speculative import DraftLost, async_speculative_generate, target_group
from tp_engine.comm.threads import run_threads
from tp_engine.distributed import RankFailed
from tp_engine.runtime import Decoder

PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3]])
NEW = 16


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", 8, 4, seed=0, layers=2)


@pytest.fixture(scope="module")
def stranger():
    """A different random model with the same vocabulary: its proposals are mostly wrong."""
    return tiny_model("llama", 8, 4, seed=7, layers=1)


@pytest.fixture(scope="module")
def reference(target):
    return target.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)


def _rank(comm, target, draft, draft_rank, prompt, new, kwargs):
    """One rank of an asynchronous generation on thread ranks: the draft rank drafts, the others
    shard the target over their own sub-group."""
    group = target_group(comm, draft_rank)
    if comm.rank == draft_rank:
        return async_speculative_generate(None, prompt, new, draft(), draft_rank, world=comm, **kwargs)
    model = copy.deepcopy(target)
    if group.world_size > 1:
        model = tp_engine.parallelize(model, comm=group)
    return async_speculative_generate(model, prompt, new, None, draft_rank, world=comm, **kwargs)


def _threads(world, target, draft, draft_rank, prompt=PROMPT, new=NEW, **kwargs):
    kwargs.setdefault("eos_token_id", [])
    return run_threads(_rank, world, target, draft, draft_rank, prompt, new, kwargs, timeout=120)


@pytest.mark.parametrize("world,draft_rank", [(2, 1), (2, 0), (3, 2), (3, 0)])
@pytest.mark.parametrize("adaptive,overlap", [(True, True), (False, True), (False, False)])
def test_greedy_equals_transformers(target, stranger, reference, world, draft_rank, adaptive, overlap):
    for name, source in (("unrelated", stranger), ("self", target)):
        results = _threads(world, target, lambda: copy.deepcopy(source), draft_rank, num_draft_tokens=3,
                           adaptive=adaptive, overlap=overlap)
        for rank, (out, stats) in enumerate(results):
            assert torch.equal(out, reference), f"{name} draft, rank {rank}: {out.tolist()} != {reference.tolist()}"
            assert stats == results[0][1], "every rank reports the same counts"
        stats = results[0][1]
        assert stats.placement == "async" and stats.new_tokens == NEW
        if name == "self":  # the target drafting for itself: every proposal kept
            assert stats.acceptance_rate == 1.0 and stats.stale == 0
            # Fixed blocks are 3 tokens; adaptive ones are as long as the draft gets ahead (timing).
            assert stats.rounds <= (NEW // 3 + 1 if not adaptive else NEW), stats
        else:  # mostly rejected; blocks drafted ahead of a rejection are dropped unverified
            assert stats.acceptance_rate < 0.3, stats
            assert stats.rounds >= NEW - 2
            if not overlap:  # the synchronous baseline drafts nothing that goes stale
                assert stats.stale == 0, stats


def test_eos_and_lengths(target, reference):
    eos = int(reference[0, PROMPT.shape[1] + 5])  # the 6th new token
    first = int((reference[0, PROMPT.shape[1]:] == eos).nonzero()[0, 0])
    for out, _ in _threads(2, target, lambda: copy.deepcopy(target), 1, eos_token_id=eos, num_draft_tokens=4):
        assert torch.equal(out[0], reference[0, : PROMPT.shape[1] + first + 1])
    for new in (0, 1, 2):
        for out, stats in _threads(2, target, lambda: copy.deepcopy(target), 0, new=new):
            assert torch.equal(out, reference[:, : PROMPT.shape[1] + new]) and stats.new_tokens == new


def test_runtime_decoder_as_draft_and_int8_copy(target, reference):
    """The draft may be a runtime Decoder, e.g. an int8 copy of a model (a quantized draft)."""
    def int8_copy():
        return Decoder(copy.deepcopy(target), weight_bits=8)

    for out, stats in _threads(2, target, int8_copy, 1, num_draft_tokens=4):
        assert torch.equal(out, reference)
        assert stats.acceptance_rate > 0.5, stats


def _processes(draft_rank, target, stranger, through_generate):
    rt = tp_engine.init()
    group = target_group(rt.comm, draft_rank)
    results = []
    for source in (stranger, target):  # two calls in a row: the first leaves no message behind
        is_draft = rt.rank == draft_rank
        model = None if is_draft else tp_engine.parallelize(copy.deepcopy(target), comm=group)
        draft = copy.deepcopy(source) if is_draft else None
        if through_generate:
            out = tp_engine.generate(model, PROMPT, max_new_tokens=NEW, draft=draft, draft_rank=draft_rank,
                                     asynchronous=True, num_draft_tokens=3, eos_token_id=[], do_sample=False)
            results.append((out, None))
        else:
            results.append(async_speculative_generate(model, PROMPT, NEW, draft, draft_rank, num_draft_tokens=3,
                                                      eos_token_id=[]))
    return results


@pytest.mark.parametrize("world,draft_rank,through_generate", [(2, 0, True), (3, 2, False)])
def test_greedy_on_processes(target, stranger, reference, world, draft_rank, through_generate):
    for rank, results in enumerate(run_ranks(_processes, world, draft_rank, target, stranger, through_generate)):
        for out, _ in results:
            assert torch.equal(out, reference), f"rank {rank}: {out.tolist()}"


def _tiny_vocab_pair(seed: int):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=6, max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _sampling_rank(comm, target, draft, prompt, draws):
    """``draws`` sampled generations of 2 tokens, each with its own seed; this rank's (t1, t2) and rejections."""
    pairs, rejected = [], 0
    for i in range(draws):
        out, stats = async_speculative_generate(
            target if comm.rank == 0 else None, prompt, 2, draft if comm.rank == 1 else None, 1, world=comm,
            num_draft_tokens=2, do_sample=True, seed=i, eos_token_id=[])
        pairs.append((int(out[0, 3]), int(out[0, 4])))
        rejected += stats.drafted - stats.accepted
    return pairs, rejected


def test_sampling_follows_the_target_distribution():
    """(t1, t2) from asynchronous speculative sampling vs the target's exact joint distribution.

    t1 is judged against the prompt's pending prediction without a forward, t2 inside a block
    or against the next pending one, so both paths of the rejection rule are exercised. Chi-square
    over the 36 outcomes; the draft is an unrelated model (many rejections).
    """
    target, draft = _tiny_vocab_pair(1), _tiny_vocab_pair(2)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        p1 = target(prompt).logits[0, -1].softmax(-1)
        joint = torch.zeros(6, 6, dtype=torch.float64)
        for a in range(6):
            p2 = target(torch.cat([prompt, torch.tensor([[a]])], 1)).logits[0, -1].softmax(-1)
            joint[a] = p1[a].double() * p2.double()
        q1 = draft(prompt).logits[0, -1].softmax(-1)
    assert (p1 - q1).abs().sum() > 0.2, "draft too close to the target to exercise rejections"
    N = 2400
    (pairs, rejected), (pairs_draft, _) = run_threads(_sampling_rank, 2, target, draft, prompt, N, timeout=300)
    assert pairs == pairs_draft, "the draft rank returns the target's tokens"
    counts = torch.zeros(6, 6, dtype=torch.float64)
    for a, b in pairs:
        counts[a, b] += 1
    assert rejected > N // 10
    expected = joint * N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 35 degrees of freedom: P(chi2 > 80) < 1e-5 under a correct rule.
    assert chi2 < 80, f"chi2 {chi2:.1f}; counts {counts.tolist()} expected {expected.tolist()}"


class _Failing:
    """A draft whose decoder raises, stops (blocks until ``release`` is set), or stops its whole
    process (SIGSTOP), after ``after`` draft steps."""

    def __init__(self, model, after: int, mode: str, release: threading.Event | None = None):
        self.decoder = Decoder(copy.deepcopy(model))
        calls = {"n": 0}
        step = self.decoder.step_hidden

        def failing_step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                if mode == "stop":
                    release.wait(30)
                elif mode == "sigstop":
                    os.kill(os.getpid(), signal.SIGSTOP)  # the process stops; its sockets stay open
                raise RuntimeError("the draft rank crashed (test)")
            return step(*args, **kwargs)

        self.decoder.step_hidden = failing_step


def _draft_dies(comm, target, mode, release=None):
    """Every rank: the draft fails after 5 steps; a target rank returns (DraftLost message, seconds waited)."""
    group = target_group(comm, comm.world_size - 1)
    draft = _Failing(target, 5, mode, release).decoder if group is None else None
    model = None if group is None else tp_engine.parallelize(copy.deepcopy(target), comm=group)
    start = time.monotonic()
    try:
        async_speculative_generate(model, PROMPT, 64, draft, comm.world_size - 1, world=comm, timeout=2.0,
                                   eos_token_id=[])
    except DraftLost as e:
        return str(e), time.monotonic() - start
    return None, time.monotonic() - start


@pytest.mark.parametrize("mode", ["raise", "stop"])
def test_a_draft_rank_that_dies_stops_the_target_ranks(target, mode):
    """Thread ranks, target TP=2: a crashed draft fails the targets at once, a stopped one after the timeout."""
    release = threading.Event()
    done = []

    def rank(comm):
        try:
            return _draft_dies(comm, target, mode, release)
        except RuntimeError as e:  # the draft's own crash, or a target interrupted inside a collective
            return f"{type(e).__name__}: {e}", None
        finally:
            done.append(comm.rank)
            if 0 in done and 1 in done:
                release.set()

    results = run_threads(rank, 3, timeout=60)
    for r in (0, 1):
        message, waited = results[r]
        assert message is not None and "rank 2" in message, results
        if mode == "stop":
            assert "TP_ENGINE_DRAFT_TIMEOUT" in message and 2.0 <= waited < 10, results
        else:  # the draft tells the targets it failed
            assert "the draft rank 2 failed" in message and waited < 1.5, results


def _stopped_draft_process(target):
    rt = tp_engine.init()
    message, waited = _draft_dies(rt.comm, target, "sigstop")  # the draft rank stops inside
    raise DraftLost(f"{message} (raised after {waited:.0f} s)")  # a target rank: report it to launch


def test_a_stopped_draft_process_stops_the_target_processes(target):
    """Local processes, target TP=2: the draft process is stopped (SIGSTOP) mid-generation; both target
    ranks raise DraftLost after the 2 s timeout (launch then reports them and kills the stopped rank)."""
    with pytest.raises(RankFailed) as info:
        run_ranks(_stopped_draft_process, 3, target)
    text = str(info.value)
    assert "DraftLost" in text and "draft rank 2 sent nothing for 2 s" in text, text
    assert any(f"(raised after {s} s)" in text for s in range(2, 10)), text


def _disagreeing(comm, target, case):
    group = target_group(comm, 1)
    model = None if group is None else copy.deepcopy(target)
    draft = copy.deepcopy(target) if group is None else None
    k = 2 + comm.rank if case == "k" else 3
    if case == "no-draft":
        draft = None
    try:
        async_speculative_generate(model, PROMPT, 4, draft, 1, world=comm, num_draft_tokens=k)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("case,needles", [("k", ["num_draft_tokens"] * 2),
                                          ("no-draft", ["rank 1 must hold the draft", "the draft rank needs a draft model"])])
def test_ranks_that_disagree_fail_together(target, case, needles):
    for message, needle in zip(run_threads(_disagreeing, 2, target, case, timeout=60), needles):
        assert message is not None and needle in message, message


def test_target_not_sharded_over_the_other_ranks(target):
    def rank(comm):
        target_group(comm, 2)
        try:  # world 3, but each target rank holds an unsharded target
            async_speculative_generate(None if comm.rank == 2 else copy.deepcopy(target), PROMPT, 4,
                                       copy.deepcopy(target) if comm.rank == 2 else None, 2, world=comm)
        except ValueError as e:
            return str(e)

    for message in run_threads(rank, 3, timeout=60):
        assert message is not None and "sharded over the 2 ranks" in message


# ------------------------------------------------------------------ the real pair


def _real_pair():
    from tp_engine.model_files import ModelFilesMissing, locate

    try:
        return str(locate("qwen2.5-coder-1.5b")), str(locate("qwen2.5-coder-0.5b"))
    except ModelFilesMissing as exc:
        pytest.skip(str(exc))


def _real_rank(target_path, draft_path, prompt, new, draft_rank):
    from tp_engine.comm.base import SingleProcessCommunicator

    rt = tp_engine.init()
    group = target_group(rt.comm, draft_rank)
    if group is None:
        draft = tp_engine.from_pretrained(draft_path, dtype=torch.float32, comm=SingleProcessCommunicator())
        out, stats = async_speculative_generate(None, prompt, new, draft, draft_rank, num_draft_tokens=4, eos_token_id=[])
    else:
        model = tp_engine.from_pretrained(target_path, dtype=torch.float32, comm=group)
        out, stats = async_speculative_generate(model, prompt, new, None, draft_rank, num_draft_tokens=4, eos_token_id=[])
    return out, stats.acceptance_rate


def test_real_pair_greedy_equals_transformers(monkeypatch):
    """Qwen2.5-Coder-1.5B (target) with its 0.5B sibling drafting on its own rank: the output is
    transformers' greedy output of the 1.5B (loaded from the same GGUF). Target TP=1: transformers'
    own models on thread ranks (no second load); TP=2: local processes loading with tp_engine."""
    target_path, draft_path = _real_pair()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(target_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prompt = tok("def fibonacci(n):", return_tensors="pt").input_ids
    new = 8
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    reference = hf.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    draft_folder, draft_name = os.path.split(draft_path)
    hf_draft = AutoModelForCausalLM.from_pretrained(draft_folder, gguf_file=draft_name, dtype=torch.float32).eval()

    def tp1(comm, hf, hf_draft):
        model, draft = (hf, None) if comm.rank == 0 else (None, hf_draft)
        out, stats = async_speculative_generate(model, prompt, new, draft, 1, world=comm, eos_token_id=[])
        return out, stats.acceptance_rate

    results = run_threads(tp1, 2, hf, hf_draft, timeout=300)
    del hf, hf_draft
    gc.collect()  # the forked ranks must not inherit 8 GB of transformers' models
    # Dequantizing a 1.5B GGUF on a busy 2-core box can starve the peer heartbeat past its 10 s default.
    monkeypatch.setenv("TP_ENGINE_PEER_TIMEOUT", "120")
    results += run_ranks(_real_rank, 3, target_path, draft_path, prompt, new, 2)
    for i, (out, acceptance) in enumerate(results):
        where = f"TP=1 rank {i}" if i < 2 else f"TP=2 rank {i - 2}"
        assert torch.equal(out, reference), f"{where}: {out.tolist()} != {reference.tolist()}"
        assert acceptance > 0.3, (where, acceptance)  # the 0.5B mostly agrees with the 1.5B on code
