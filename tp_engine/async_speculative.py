"""Asynchronous speculative decoding: one rank drafts ahead while the other ranks verify.

The draft runs alone on ``draft_rank``; the target runs on every other rank
(unsharded, or tensor-parallel over those ranks). Unlike the synchronous
one-rank placement (:mod:`tp_engine.speculative`), neither side waits for the
other: the draft keeps drafting, assuming its proposals will be accepted,
while the target verifies the block it sent before.

Messages (point to point, :mod:`tp_engine.comm.p2p`; one ordered channel per pair of ranks):

* draft -> every target rank: ``BLOCK(epoch, start, tokens)`` (+ the draft's
  distributions when sampling), and ``END`` once the target said ``DONE``.
* first target rank -> draft: ``VERDICT(epoch, committed, accepted, correction)``
  per verified block, and ``DONE`` (+ the final tokens) once generation ends.

Every target rank consumes the same message stream and computes the same
verdicts (collectives give identical bits on all ranks), so timing never
decides anything on the target side; all timing-dependent choices (how
long a block is, when to send it) are the draft's.

Target state: the committed tokens ``seq`` (prompt + output) and either a
*pending* prediction for position ``len(seq)`` (from the last forward: its
argmax, or its sampling distribution) with every committed token in the KV
cache, or, after a rejection, the correction as the last committed token,
not yet in the cache. A block always starts at ``len(seq)``:

* pending: the block's first token is checked against the pending
  prediction with no forward at all; if it is kept, the block is run in one
  forward that checks the rest and leaves a new pending prediction.
* after a correction: ``[correction] + block`` is run in one forward.

A token is kept by the rejection rule (greedy: iff it is the target's
argmax; sampling: with probability ``min(1, p/q)``, else a correction is drawn
from ``(p - q)+``), so greedy output is the target's greedy output and sampled
output follows the target's distribution. A rejection bumps the epoch: blocks
the draft sent before it heard of the rejection are dropped unverified.

Block length (the draft's choice): a block goes out as soon as the target
has nothing to verify (so it idles at most one draft step after a
rejection, like PEARL's pre-verify), and otherwise once the draft holds
``want`` tokens, ``want`` being the expected run of accepted tokens at the
measured acceptance ``a`` (``1 / (1 - a)``, exponentially averaged), capped
by ``num_draft_tokens``; while two blocks are in flight the draft keeps
drafting up to the cap, so blocks grow to what the draft makes while the
target verifies (PEARL's post-verify). ``adaptive=False`` sends blocks of
exactly ``num_draft_tokens``.

A draft rank that fails: it sends ``ABORT`` and every target rank raises
:class:`DraftLost` at once; one whose process dies: the transport's error
(a closed connection) does the same; one that stops answering: the target
ranks raise :class:`DraftLost` after ``timeout`` seconds
(``TP_ENGINE_DRAFT_TIMEOUT``, default 30) without a message. There is no
silent fallback to plain decoding (the caller may catch DraftLost and decode
without a draft).
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .comm.agree import token_digest
from .comm.base import Communicator
from .comm.groups import p2p_of, subgroup
from .comm.p2p import PointToPoint
from .distributed import init
from .runtime import Decoder, decoder_for
from .runtime.sampling import eos_ids, shared_seed
from .speculative import SpeculativeStats, sampling_probs

__all__ = ["AsyncStats", "DraftLost", "async_speculative_generate", "draft_timeout", "target_group"]

DEFAULT_DRAFT_TIMEOUT_S = 30.0
PROTOCOL_VERSION = 1
# Message kinds.
_BLOCK, _END, _VERDICT, _DONE, _ABORT = 1, 2, 3, 4, 5
_VERDICT_LEN = 6  # kind, epoch after, committed length, accepted, correction, output length
_STATS_LEN = 5  # the final message: rounds, drafted, accepted, stale, forwards, then the output tokens


def draft_timeout() -> float:
    """Seconds a target rank waits for the draft rank's next message (``TP_ENGINE_DRAFT_TIMEOUT``)."""
    return float(os.environ.get("TP_ENGINE_DRAFT_TIMEOUT", DEFAULT_DRAFT_TIMEOUT_S))


class DraftLost(RuntimeError):
    """The draft rank (or, seen from the draft, the target) stopped answering."""


class _Link:
    """This rank's side of the protocol over a :class:`PointToPoint` channel, with what it needs on
    top: sends that return at once, and receives from one peer that can be polled or given up on.

    A daemon thread receives every message from ``src`` in order (blocking receives: gloo's
    receive handles only complete inside ``wait``, so they cannot be polled); ``next_shape``
    gives the shape and dtype of the message after the one just received (None: the last).
    A transport error in that thread is raised to the caller by its next ``get``.
    """

    def __init__(self, p2p: PointToPoint, src: int, first: tuple, next_shape):
        self.p2p, self.src = p2p, src
        self._sends: deque = deque()
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._receive, args=(first, next_shape), daemon=True,
                                        name=f"tp-draft-link-from-{src}")
        self._thread.start()

    def _receive(self, shape, next_shape) -> None:
        try:
            while shape is not None:
                msg = self.p2p.recv(torch.empty(shape[0], dtype=shape[1]), self.src)
                self._inbox.put(msg)
                shape = next_shape(msg)
        except BaseException as e:  # handed to the main thread
            self._inbox.put(e)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        # Never wait here: a send to a stopped peer may never complete, and the caller must stay
        # free to notice that by its receive timeout. Finished handles are dropped as we go
        # (gloo's complete only inside wait: those few-byte messages wait for flush).
        while self._sends and self._sends[0].is_completed():
            self._sends.popleft()
        self._sends.append(self.p2p.isend(tensor, dst))

    def get(self, timeout: float | None) -> torch.Tensor | None:
        """The next message from ``src``: None at once if ``timeout`` is None and none is there;
        TimeoutError after ``timeout`` seconds without one."""
        try:
            got = self._inbox.get_nowait() if timeout is None else self._inbox.get(timeout=timeout)
        except queue.Empty:
            if timeout is None:
                return None
            raise TimeoutError(f"no message from rank {self.src} within {timeout:g} s") from None
        if isinstance(got, BaseException):
            raise RuntimeError(f"receiving from rank {self.src} failed: {type(got).__name__}: {got}") from got
        return got

    def flush(self) -> None:
        """Wait for this rank's sends (the peer drains every message before it returns)."""
        while self._sends:
            self._sends.popleft().wait()
        self._thread.join(timeout=1.0)


@dataclass
class AsyncStats(SpeculativeStats):
    """Counts of one asynchronous speculative generation (identical on every rank)."""

    stale: int = 0  # proposals dropped unverified: drafted before the draft heard of a rejection
    forwards: int = 0  # target forwards after the prompt's (a rejected first token needs none)

    @property
    def tokens_per_round(self) -> float:
        """New tokens per verified block (every token here comes out of a block)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0


@dataclass(frozen=True)
class _Settings:
    k_max: int
    draft_rank: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    adaptive: bool
    overlap: bool
    timeout: float


def _handshake(world: Communicator, s: _Settings, prompt: torch.Tensor, holds: str, vocab: int, target_world: int) -> None:
    """Every rank checks, before any point-to-point message, that all made the same call and
    that the draft rank holds the draft and only the target ranks hold the target."""
    fields = {
        "protocol": PROTOCOL_VERSION, "num_draft_tokens": s.k_max, "draft_rank": s.draft_rank,
        "do_sample": int(s.do_sample), "max_new_tokens": s.max_new_tokens, "prompt": token_digest(prompt),
        "adaptive": int(s.adaptive), "overlap": int(s.overlap), "temperature_x1e6": round(s.temperature * 1e6), "top_k": s.top_k,
        "top_p_x1e6": round(s.top_p * 1e6),
    }
    roles = {"none": 0, "draft": 1, "target": 2}
    row = torch.tensor([[*fields.values(), roles[holds], vocab, target_world]], dtype=torch.int64)
    table = world.all_gather(row, dim=0).cpu()
    for r in range(table.shape[0]):
        for i, name in enumerate(fields):
            if int(table[r, i]) != int(table[0, i]):
                raise ValueError(
                    f"asynchronous speculative decoding: rank {r} has {name}={int(table[r, i])} but rank 0 has "
                    f"{int(table[0, i])}; every rank must make the same call"
                )
    n = len(fields)
    role = [int(table[r, n]) for r in range(table.shape[0])]
    wrong = [r for r in range(len(role)) if role[r] != (1 if r == s.draft_rank else 2)]
    if wrong:
        r = wrong[0]
        need = "the draft (a model; the target argument is ignored)" if r == s.draft_rank else "the target model and draft=None"
        raise ValueError(f"asynchronous speculative decoding: rank {r} must hold {need} (draft_rank={s.draft_rank})")
    vocabs = {int(table[r, n + 1]) for r in range(table.shape[0])}
    if len(vocabs) != 1:
        raise ValueError(f"the draft's vocabulary differs from the target's ({sorted(vocabs)}); they must share a tokenizer")
    sizes = {int(table[r, n + 2]) for r in range(table.shape[0]) if r != s.draft_rank}
    if sizes != {table.shape[0] - 1}:
        raise ValueError(
            f"asynchronous speculative decoding: the target must be sharded over the {table.shape[0] - 1} ranks other "
            f"than the draft rank (unsharded when there is one), but its group has {sorted(sizes)} rank(s)"
        )


@torch.inference_mode()
def async_speculative_generate(
    model: nn.Module | None,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    draft: Any,
    draft_rank: int,
    *,
    world: Communicator | None = None,
    p2p: PointToPoint | None = None,
    num_draft_tokens: int = 4,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    streamer: Any = None,
    adaptive: bool = True,
    overlap: bool = True,
    timeout: float | None = None,
) -> tuple[torch.Tensor, AsyncStats]:
    """Generate with the draft on ``draft_rank`` drafting ahead of the target; every rank calls it.

    On ``draft_rank``: ``draft`` is the draft (a model or a runtime
    :class:`~tp_engine.runtime.Decoder`; "int8"/"int4" are not: a self-copy
    needs the target's weights) and ``model`` is ignored (pass None). On the
    other ranks: ``model`` is the target, unsharded or parallelized over
    exactly those ranks (:func:`target_group`), and ``draft`` is None.
    ``world``: the communicator of all ranks (default: ``tp_engine.init()``'s),
    for the opening agreement; ``p2p``: its point-to-point channel (default
    ``p2p_of(world)``). ``num_draft_tokens`` caps a block; ``timeout``: see
    :func:`draft_timeout`. ``overlap=False`` makes the draft wait for each verdict before drafting
    on (blocks of ``num_draft_tokens``): the synchronous baseline, for measurements. Returns (prompt + new tokens, stats), identical on every rank.
    """
    if world is None:
        world = init().comm
    rank, world_size = world.rank, world.world_size
    if world_size < 2:
        raise ValueError("asynchronous speculative decoding needs at least 2 ranks: one drafts, the others verify")
    if not 0 <= int(draft_rank) < world_size:
        raise ValueError(f"draft_rank {draft_rank} is not a rank of this group (world size {world_size})")
    if int(num_draft_tokens) < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if int(max_new_tokens) < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if do_sample and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"speculative decoding handles one non-empty prompt, got input_ids of shape {tuple(input_ids.shape)}")
    settings = _Settings(
        int(num_draft_tokens), int(draft_rank), bool(do_sample), float(temperature) if do_sample else 1.0,
        int(top_k) if do_sample else 0, float(top_p) if do_sample else 1.0, int(max_new_tokens),
        bool(adaptive) and bool(overlap), bool(overlap), draft_timeout() if timeout is None else float(timeout),
    )
    is_draft = rank == settings.draft_rank
    # Build this rank's part; a failure is shared at the handshake's all_gather (as "none"), so no rank hangs.
    error: Exception | None = None
    decoder: Decoder | None = None
    try:
        if is_draft:
            if draft is None or isinstance(draft, str):
                raise ValueError(
                    f"the draft rank needs a draft model (got {draft!r}); int8/int4 self-copies are sharded with the "
                    "target: use the synchronous placement for them"
                )
            decoder = draft if isinstance(draft, Decoder) else decoder_for(draft)
        else:
            if model is None or draft is not None:
                raise ValueError("a target rank takes the target model and draft=None")
            decoder = decoder_for(model)
    except (ValueError, TypeError, RuntimeError) as e:
        error, decoder = e, None
    holds = "none" if decoder is None else ("draft" if is_draft else "target")
    try:
        _handshake(world, settings, input_ids, holds, -1 if decoder is None else decoder.vocab_size,
                   0 if decoder is None or is_draft else decoder.world)
    except ValueError:
        if error is not None:
            raise error from None
        raise
    if error is not None:  # pragma: no cover - the handshake above raised on every rank already
        raise error
    shared = shared_seed(world, seed, torch.device("cpu")) if do_sample else 0
    targets = [r for r in range(world_size) if r != settings.draft_rank]
    channel = p2p if p2p is not None else p2p_of(world)
    if is_draft:
        link = _Link(channel, targets[0], ((_VERDICT_LEN,), torch.int64), _verdict_stream())
    else:
        link = _Link(channel, settings.draft_rank, ((4 + settings.k_max,), torch.int64),
                     _block_stream(settings, decoder.vocab_size))
    stats = AsyncStats(placement="async")
    prompt = input_ids[0].tolist()
    if is_draft:
        try:
            out = _DraftSide(decoder, settings, link, targets, prompt, shared + 1, stats, streamer).run()
        except Exception:  # tell the target ranks at once instead of leaving them to time out
            abort = _header(settings.k_max)
            abort[0] = _ABORT
            for r in targets:
                link.send(abort, r)
            raise
    else:
        eos = frozenset(eos_ids(model, eos_token_id))
        out = _TargetSide(decoder, settings, link, rank == targets[0], prompt, eos, shared, stats, streamer).run()
    link.flush()
    stats.new_tokens = len(out)
    tokens = torch.tensor([out], dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, tokens], dim=1), stats


def target_group(world: Communicator, draft_rank: int) -> Communicator | None:
    """The communicator to shard the target over: every rank but ``draft_rank`` (None there).
    Collective over ``world``: every rank calls it, in the same order of calls."""
    if not 0 <= int(draft_rank) < world.world_size:
        raise ValueError(f"draft_rank {draft_rank} is not a rank of this group (world size {world.world_size})")
    return subgroup(world, [r for r in range(world.world_size) if r != int(draft_rank)])


def _verdict_stream():
    """Shapes of the messages the draft receives: verdicts, then after DONE the final one."""
    state = {"final": False}

    def next_shape(msg: torch.Tensor):
        if state["final"]:
            return None
        if int(msg[0]) == _DONE:
            state["final"] = True
            return (_STATS_LEN + int(msg[5]),), torch.int64
        return (_VERDICT_LEN,), torch.int64

    return next_shape


def _block_stream(s: _Settings, vocab: int):
    """Shapes of the messages a target rank receives: block headers (each followed by its
    distributions when sampling), until END."""
    header = ((4 + s.k_max,), torch.int64)

    def next_shape(msg: torch.Tensor):
        if msg.dtype != torch.int64:  # distributions: a header follows
            return header
        if int(msg[0]) in (_END, _ABORT):
            return None
        if int(msg[0]) == _BLOCK and s.do_sample:
            return (int(msg[3]), vocab), torch.float32
        return header

    return next_shape


def _header(k_max: int) -> torch.Tensor:
    return torch.zeros(4 + k_max, dtype=torch.int64)


class _TargetSide:
    """One target rank: verify blocks in the order they come, answer with verdicts (first rank only)."""

    def __init__(self, target: Decoder, s: _Settings, link: _Link, leader: bool, prompt: list[int], eos: frozenset,
                 seed: int, stats: AsyncStats, streamer: Any):
        self.t, self.s, self.link, self.leader = target, s, link, leader
        self.seq, self.S, self.eos, self.stats, self.streamer = list(prompt), len(prompt), eos, stats, streamer
        self.gen = torch.Generator(device="cpu").manual_seed(seed) if s.do_sample else None
        self._pending = None  # the prediction left by the last forward (see _verify)

    def _recv(self) -> torch.Tensor:
        try:
            return self.link.get(self.s.timeout)
        except TimeoutError:
            raise DraftLost(
                f"asynchronous speculative decoding: the draft rank {self.s.draft_rank} sent nothing for "
                f"{self.s.timeout:g} s (TP_ENGINE_DRAFT_TIMEOUT); it died or stopped"
            ) from None
        except RuntimeError as e:  # the transport saw the peer go (connection closed, group aborted)
            raise DraftLost(f"asynchronous speculative decoding: lost the draft rank {self.s.draft_rank}: {e}") from e

    def _predictions(self, h: torch.Tensor) -> list:
        """Argmax tokens (greedy) or sampling distributions (CPU rows) of hidden rows h."""
        if not self.s.do_sample:
            return self.t.rows_argmax(h)
        return list(sampling_probs(self.t.rows_logits(h), self.s.temperature, self.s.top_k, self.s.top_p).cpu())

    def _judge(self, pred, x: int, q: torch.Tensor | None) -> int | None:
        """None if proposal x is kept against prediction ``pred``, else the correction."""
        if not self.s.do_sample:
            return None if x == pred else pred
        u = float(torch.rand(1, generator=self.gen))
        if u * float(q[x]) < float(pred[x]):  # u < p/q without dividing by a tiny q
            return None
        residual = (pred - q).clamp_(min=0)
        total = float(residual.sum())
        return int(torch.multinomial(residual / total if total > 0 else pred, 1, generator=self.gen))

    def run(self) -> list[int]:
        s, t = self.s, self.t
        out: list[int] = []
        if self.streamer is not None:
            self.streamer.put(torch.tensor([self.seq]))
        done = s.max_new_tokens == 0
        pending = None
        if not done:
            t._ensure(self.S + s.max_new_tokens + s.k_max + 2)
            pending = self._predictions(t.extend_hidden(torch.tensor(self.seq, device=t.device), 0))[0]
        epoch = 0
        while not done:
            header = self._recv()
            kind, block_epoch, start, n = (int(v) for v in header[:4])
            if kind == _ABORT:
                raise DraftLost(f"asynchronous speculative decoding: the draft rank {s.draft_rank} failed (see its error)")
            if kind != _BLOCK or not 1 <= n <= s.k_max:
                raise RuntimeError(f"asynchronous speculative decoding: protocol error, got message {header.tolist()}")
            q = self._recv() if s.do_sample else None
            if block_epoch != epoch:
                self.stats.stale += n
                continue
            if start != len(self.seq):
                raise RuntimeError(f"asynchronous speculative decoding: protocol error, block at {start}, "
                                   f"expected {len(self.seq)}")
            proposals = header[4: 4 + n].tolist()
            new, correction = self._verify(pending, proposals, q)
            kept = len(new) - (correction is not None)
            self.stats.rounds += 1
            self.stats.drafted += n
            self.stats.accepted += kept
            if correction is not None:
                epoch += 1
                pending = None
            else:
                pending = self._pending
            for i, token in enumerate(new):
                if token in self.eos:
                    new = new[: i + 1]
                    break
            new = new[: s.max_new_tokens - len(out)]
            self.seq += new
            out += new
            if self.streamer is not None and new:
                self.streamer.put(torch.tensor(new))
            done = len(out) >= s.max_new_tokens or (bool(new) and new[-1] in self.eos)
            if self.leader:
                verdict = torch.tensor([_DONE if done else _VERDICT, epoch, len(self.seq), kept,
                                        -1 if correction is None else correction, len(out)], dtype=torch.int64)
                self.link.send(verdict, s.draft_rank)
        if self.leader:
            if s.max_new_tokens == 0:
                self.link.send(torch.tensor([_DONE, 0, self.S, 0, -1, 0], dtype=torch.int64), s.draft_rank)
            st = self.stats
            self.link.send(torch.tensor([st.rounds, st.drafted, st.accepted, st.stale, st.forwards, *out],
                                        dtype=torch.int64), s.draft_rank)
        # Drain until END so that no message of this call is left for the next one.
        while True:
            msg = self._recv()
            if msg.dtype == torch.int64 and int(msg[0]) in (_END, _ABORT):
                break
        if self.streamer is not None:
            self.streamer.end()
        return out

    def _verify(self, pending, proposals: list[int], q) -> tuple[list[int], int | None]:
        """Check ``proposals`` (starting at len(seq)); returns (new tokens, the correction or None)
        and leaves the next pending prediction in ``self._pending`` when all were kept."""
        t = self.t
        L = len(self.seq)
        qrow = (lambda i: q[i]) if q is not None else (lambda i: None)
        if pending is not None:
            correction = self._judge(pending, proposals[0], qrow(0))
            if correction is not None:  # rejected before any forward
                return [correction], correction
            feed, start, offset = proposals, L, 1  # preds[i] checks proposals[i + 1]
        else:
            feed, start, offset = [self.seq[-1]] + proposals, L - 1, 0  # preds[i] checks proposals[i]
        preds = self._predictions(t.extend_hidden(torch.tensor(feed, device=t.device), start, last_only=False))
        self.stats.forwards += 1
        for i in range(offset, len(proposals)):
            correction = self._judge(preds[i - offset], proposals[i], qrow(i))
            if correction is not None:
                return proposals[:i] + [correction], correction
        self._pending = preds[-1]
        return list(proposals), None


class _DraftSide:
    """The draft rank: draft ahead, send blocks, follow the verdicts."""

    EMA = 0.3  # weight of the newest block's acceptance in the running estimate

    def __init__(self, drafter: Decoder, s: _Settings, link: _Link, targets: list[int], prompt: list[int], seed: int,
                 stats: AsyncStats, streamer: Any):
        self.d, self.s, self.link, self.targets, self.stats, self.streamer = drafter, s, link, targets, stats, streamer
        self.spec = list(prompt)  # committed tokens, then drafted ones
        self.S = len(prompt)
        self.gen = torch.Generator(device="cpu").manual_seed(seed) if s.do_sample else None
        self.acceptance = 0.8  # prior; measured per block below

    def want(self) -> int:
        """Tokens worth queueing behind the block being verified: the expected accepted run."""
        if not self.s.adaptive:
            return self.s.k_max
        a = min(self.acceptance, 0.95)
        return max(1, min(self.s.k_max, math.ceil(1.0 / (1.0 - a))))

    def run(self) -> list[int]:
        s, d = self.s, self.d
        if s.max_new_tokens:
            d._ensure(self.S + s.max_new_tokens + s.k_max + 2)
        if self.streamer is not None:
            self.streamer.put(torch.tensor([self.spec]))
        self.d_len = 0  # the draft's cache holds spec[:d_len]
        self.sent = self.S  # spec[sent:] is drafted but not yet sent
        self.committed = self.S
        self.epoch, self.in_flight = 0, 0
        self.qs: list[torch.Tensor] = []  # draft distributions of spec[sent:] (sampling)
        limit = self.S + s.max_new_tokens  # no use drafting past the last position
        while True:
            verdict = self._wait() if s.max_new_tokens == 0 else self.link.get(None)
            if verdict is not None:
                if self._heard(verdict):
                    break
                continue
            buffered = len(self.spec) - self.sent
            if s.adaptive:  # see the module docstring
                threshold = 1 if self.in_flight == 0 else self.want() if self.in_flight == 1 else None
            elif s.overlap:
                threshold = s.k_max if self.in_flight < 2 else None
            else:  # synchronous: one block at a time, nothing drafted while it is verified
                threshold = s.k_max if self.in_flight == 0 else None
            if buffered and threshold is not None and (buffered >= threshold or len(self.spec) >= limit):
                n = min(buffered, s.k_max)
                self._send_block(self.epoch, self.sent, self.spec[self.sent: self.sent + n], self.qs[:n])
                self.sent, self.qs, self.in_flight = self.sent + n, self.qs[n:], self.in_flight + 1
            elif buffered < s.k_max and len(self.spec) < limit and (s.overlap or self.in_flight == 0):
                self._draft_one()
            elif self._heard(verdict := self._wait()):  # nothing useful to do until the target answers
                break
        result = self._finish(verdict)
        if self.streamer is not None:
            if len(result) > self.committed - self.S:
                self.streamer.put(torch.tensor(result[self.committed - self.S:]))
            self.streamer.end()
        return result

    def _draft_one(self) -> None:
        s, d = self.s, self.d
        feed = self.spec[self.d_len:]
        if len(feed) == 1:  # the lean single-token step
            h = d.step_hidden(d.embed_token(feed[0]), self.d_len)
        else:
            h = d.extend_hidden(torch.tensor(feed, device=d.device), self.d_len)
        self.d_len += len(feed)
        if s.do_sample:
            q = sampling_probs(d.rows_logits(h), s.temperature, s.top_k, s.top_p)[0].cpu()
            self.qs.append(q)
            self.spec.append(int(torch.multinomial(q, 1, generator=self.gen)))
        else:
            self.spec.append(d.rows_argmax(h)[0])

    def _heard(self, verdict: torch.Tensor) -> bool:
        """Apply one verdict; True when it says DONE."""
        kind, new_epoch, length, kept, correction, _ = (int(v) for v in verdict)
        if kind == _DONE:
            return True
        if kind != _VERDICT:
            raise RuntimeError(f"asynchronous speculative decoding: protocol error, got verdict {verdict.tolist()}")
        self.in_flight -= 1
        rejected = new_epoch != self.epoch
        if rejected:  # restart after the correction, dropping the drafted rest
            self.spec = self.spec[: length - 1] + [correction]
            self.d_len = min(self.d_len, length - 1)
            self.sent, self.epoch, self.in_flight, self.qs = length, new_epoch, 0, []
        judged = kept + int(rejected)
        self.acceptance = (1 - self.EMA) * self.acceptance + self.EMA * (kept / max(1, judged))
        if self.streamer is not None and length > self.committed:
            self.streamer.put(torch.tensor(self.spec[self.committed: length]))
        self.committed = length
        return False

    def _send_block(self, epoch: int, start: int, tokens: list[int], qs: list[torch.Tensor]) -> None:
        header = _header(self.s.k_max)
        header[:4] = torch.tensor([_BLOCK, epoch, start, len(tokens)])
        header[4: 4 + len(tokens)] = torch.tensor(tokens)
        payload = torch.stack(qs).float().contiguous() if self.s.do_sample else None
        for r in self.targets:
            self.link.send(header, r)
            if payload is not None:
                self.link.send(payload, r)

    def _wait(self) -> torch.Tensor:
        # The target may take a while (a long prompt, a big model): wait as long as a collective would.
        from_env = float(os.environ.get("TP_ENGINE_TIMEOUT", 300))
        wait = max(self.s.timeout, from_env)
        start = time.monotonic()
        try:
            verdict = self.link.get(wait)
        except TimeoutError:
            raise DraftLost(
                f"asynchronous speculative decoding: target rank {self.targets[0]} sent no verdict for "
                f"{time.monotonic() - start:.0f} s; it died or stopped"
            ) from None
        return verdict

    def _finish(self, verdict: torch.Tensor) -> list[int]:
        """After DONE: take the final tokens, then tell every target rank the stream ended."""
        n = int(verdict[5])
        final = self.link.get(max(self.s.timeout, 1.0))
        if final.shape != (_STATS_LEN + n,):
            raise RuntimeError(f"asynchronous speculative decoding: protocol error, final message {final.tolist()}")
        st = self.stats
        st.rounds, st.drafted, st.accepted, st.stale, st.forwards = (int(v) for v in final[:_STATS_LEN])
        end = _header(self.s.k_max)
        end[0] = _END
        for r in self.targets:
            self.link.send(end, r)
        return final[_STATS_LEN:].tolist()
