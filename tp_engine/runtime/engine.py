"""The step API: requests join and leave a running batch between steps.

Every rank of the model's group drives its own :class:`Engine` with the
same calls in the same order (``add_request``, ``cancel``, ``step``); the
engine then takes identical decisions everywhere, because everything it
decides from (token ids, gathered logits, seeded generators) is identical
on every rank. A server runs the scheduler's decisions on rank 0 and
broadcasts the calls; ``generate`` simply makes the same calls on all ranks.

One step:

1. admit waiting requests while there are free batch places (each gets a
   KV-cache slot sized for its prompt plus its ``max_new_tokens``);
2. one forward over every running sequence: decoding sequences contribute
   their last token; sequences still reading their prompt contribute the
   next chunk of it, at most ``prefill_chunk`` prompt tokens per step in
   all, so a long prompt never stalls the streams of the others;
3. each sequence that produced a token picks it (greedy, sampled, with or
   without processors; see :mod:`.sampling`), and finished ones (stop
   token, stop string, length, cancelled) leave and free their slot.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch

from .decoder import Decoder
from .sampling import SamplingParams, choose_from_logits, sample_from_top_k, shared_seed
from .spec_step import Speculator

__all__ = ["Engine", "Request", "StepOutput", "TokenLogprob"]


@dataclass
class Request:
    """One sequence's state in the engine."""

    id: Hashable
    prompt: list[int]
    params: SamplingParams
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None  # why, when finish_reason is "error"
    generator: torch.Generator | None = None
    carried: torch.Tensor | None = None  # embedding of tokens[-1] from the greedy exchange

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens the sequence has now (prompt + generated)."""
        return len(self.prompt) + len(self.tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model, and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: Hashable
    new_tokens: list[int]
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for them
    error: str | None = None  # finish_reason "error": what failed (this request alone; the others go on)


class Engine:
    """Continuous batching on top of a :class:`Decoder`.

    ``max_batch``: sequences decoded together; ``prefill_chunk``: prompt
    tokens per step (all sequences together; at least one chunk of one
    prompt advances every step); ``max_model_len``: the longest prompt +
    new tokens a request may ask for; ``tokenizer``: needed for
    ``stop_strings``; ``seed``: seeds the generator of sampled requests that
    bring no seed of their own (rank 0's value is used on every rank);
    ``generator``: use this generator instead (``generate`` passes torch's
    global one, for HF-compatible sampling). ``speculator``: speculative
    steps (:mod:`.spec_step`) for greedy sequences without logits processors
    or logprobs; the others take plain steps in the same forward.
    """

    def __init__(
        self,
        decoder: Decoder,
        *,
        max_batch: int = 64,
        prefill_chunk: int = 256,
        max_model_len: int | None = None,
        tokenizer: Any = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        speculator: Speculator | None = None,
    ):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1")
        if speculator is not None and speculator.target is not decoder:
            raise ValueError("the speculator was built for another decoder than the engine's")
        self.speculator = speculator
        self.decoder = decoder
        self.max_batch, self.prefill_chunk = int(max_batch), int(prefill_chunk)
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self._seed = seed
        self._generator = generator
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._known: dict[Hashable, Request] = {}

    # -- requests ------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int] | torch.Tensor, params: SamplingParams | None = None,
                    request_id: Hashable | None = None) -> Hashable:
        """Queue a request; returns its id. Bad input raises ValueError before anything runs."""
        params = params or SamplingParams()
        params.validate()
        ids = prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("a request needs a prompt of at least one token")
        bad = [t for t in ids if not 0 <= t < self.decoder.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.decoder.vocab_size})")
        total = len(ids) + params.max_new_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds "
                f"max_model_len {self.max_model_len}"
            )
        limit = self.decoder.max_positions
        if limit is not None and total > limit:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds the "
                f"model's {limit} learned positions"
            )
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer= to the engine (or to generate)")
        rid = next(self._ids) if request_id is None else request_id
        if rid in self._known and not self._known[rid].finished:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(rid, ids, params)
        if params.do_sample:
            if params.seed is not None:
                req.generator = torch.Generator(device="cpu").manual_seed(int(params.seed))
            else:
                req.generator = self._shared_generator()
        self._known[rid] = req
        self.waiting.append(req)
        return rid

    def cancel(self, request_id: Hashable) -> bool:
        """Stop a request now (its slot is freed); False if it is unknown or already finished."""
        req = self._known.get(request_id)
        if req is None or req.finished:
            return False
        self._finish(req, "cancelled")
        return True

    def request(self, request_id: Hashable) -> Request:
        return self._known[request_id]

    def forget(self, request_id: Hashable) -> None:
        """Drop a finished request's record."""
        req = self._known.get(request_id)
        if req is not None and req.finished:
            del self._known[request_id]

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _shared_generator(self) -> torch.Generator:
        if self._generator is None:
            seed = shared_seed(self.decoder.comm, self._seed, self.decoder.device)
            self._generator = torch.Generator(device="cpu").manual_seed(seed)
        return self._generator

    # -- the step ------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit, run one forward over the running batch, pick tokens; what each request produced."""
        outputs: list[StepOutput] = []
        self._admit(outputs)
        if not self.running:
            return outputs
        dec = self.decoder
        segments: list[tuple[Request, list[int], int]] = []  # (request, tokens fed, start position)
        budget = self.prefill_chunk
        drafts = self._propose()  # request id -> draft proposals (speculative steps only)
        for req in self.running:
            if req.prefilled >= len(req.prompt):
                segments.append((req, [req.tokens[-1]] + drafts.get(req.id, []), req.length - 1))
        for req in self.running:
            rest = len(req.prompt) - req.prefilled
            if rest > 0 and (budget > 0 or not segments):
                n = min(rest, max(budget, 1))
                segments.append((req, req.prompt[req.prefilled : req.prefilled + n], req.prefilled))
                budget -= n
        x = self._embed(segments)
        h = dec.forward(x, [r.slot for r, _, _ in segments], [p for _, _, p in segments],
                        [len(t) for _, t, _ in segments], last_only=not drafts)
        if drafts:  # every row came back: the speculating sequences' rows are verified, the others use their last
            ends = list(itertools.accumulate(len(fed) for _, fed, _ in segments))
            verified = self._verify([(req, h[e - len(fed) : e]) for (req, fed, _), e in zip(segments, ends)
                                     if req.id in drafts], drafts)
            h = h[[e - 1 for e in ends]]
        emitting = []
        for i, (req, fed, start) in enumerate(segments):
            if req.id in drafts:
                continue
            if start < len(req.prompt):
                req.prefilled = start + len(fed)
                if req.prefilled < len(req.prompt):
                    continue  # more prompt to read
            emitting.append((i, req))
        produced, failed = self._choose(h, emitting)
        for req, message in failed:
            self.fail(req.id, message)
            outputs.append(StepOutput(req.id, [], True, "error", error=message))
        if failed:
            emitting = [(i, req) for i, req in emitting if not req.finished]
        logprobs = self._logprobs(h, emitting, produced)
        for req, token in produced:
            req.tokens.append(token)
            reason = self._stop_reason(req, token)
            if reason is not None:
                self._finish(req, reason)
            lp = logprobs.get(id(req))
            outputs.append(StepOutput(req.id, [token], req.finished, req.finish_reason, None if lp is None else [lp]))
        if drafts:
            outputs += self._take_verified(verified)
        return outputs

    # -- speculative steps ---------------------------------------------------------

    def _draft_rounds(self, req: Request) -> int:
        """Proposals ``req`` may take this step (0: a plain step). Greedy only: a sampled or processed
        row keeps the plain path (no rejection rule), and the round leaves room for the target's token."""
        p = req.params
        if (not req.tokens or req.prefilled < len(req.prompt) or p.do_sample or p.logprobs is not None
                or p.processes_at(len(req.tokens))):
            return 0
        return min(self.speculator.k, p.max_new_tokens - len(req.tokens) - 1)

    def _propose(self) -> dict[Hashable, list[int]]:
        if self.speculator is None:
            return {}
        seqs = [(req, self._draft_rounds(req)) for req in self.running]
        seqs = [(req, k) for req, k in seqs if k > 0]
        if not seqs:
            return {}
        proposals = self.speculator.propose([(req.slot, req.prompt + req.tokens, k) for req, k in seqs])
        return {req.id: p for (req, _), p in zip(seqs, proposals) if p}

    def _verify(self, rows: list[tuple[Request, torch.Tensor]], drafts: dict[Hashable, list[int]]):
        results = self.speculator.verify([r.slot for r, _ in rows], [drafts[r.id] for r, _ in rows], [h for _, h in rows])
        return [(req, new, carried) for (req, _), (new, carried) in zip(rows, results)]

    def _take_verified(self, verified: list[tuple[Request, list[int], torch.Tensor | None]]) -> list[StepOutput]:
        """Append each speculating sequence's verified tokens, stopping at the first stop rule that fires."""
        outputs = []
        for req, new, carried in verified:
            kept = []
            for token in new:
                req.tokens.append(token)
                kept.append(token)
                reason = self._stop_reason(req, token)
                if reason is not None:
                    self._finish(req, reason)
                    break
            if not req.finished:
                req.carried = carried
            outputs.append(StepOutput(req.id, kept, req.finished, req.finish_reason))
        return outputs

    def _logprobs(self, h: torch.Tensor, emitting: list[tuple[int, Request]],
                  produced: list[tuple[Request, int]]) -> dict[int, TokenLogprob]:
        """Log-probabilities for the requests that asked (keyed by ``id(request)``).

        Their rows' full logits are gathered once (a collective: every rank has
        the same requests, so every rank takes part); the others cost nothing.
        """
        asking = [(i, req, token) for (i, req), (_, token) in zip(emitting, produced) if req.params.logprobs is not None]
        if not asking:
            return {}
        logp = torch.log_softmax(self.decoder.vocab.full_logits(h[[i for i, _, _ in asking]]).float(), dim=-1).cpu()
        out = {}
        for row, (_, req, token) in zip(logp, asking):
            k = req.params.logprobs
            top = torch.topk(row, k) if k else None
            pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
            out[id(req)] = TokenLogprob(token, float(row[token]), pairs)
        return out

    def _admit(self, outputs: list[StepOutput]) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting.pop(0)
            if req.params.max_new_tokens == 0:
                req.finish_reason = "length"
                outputs.append(StepOutput(req.id, [], True, "length"))
                continue
            cache = self.decoder.cache
            req.slot = cache.acquire()
            need = len(req.prompt) + req.params.max_new_tokens
            self.decoder.reserve(cache.slots, max(need, cache.capacity))
            self.running.append(req)

    def _embed(self, segments: list[tuple[Request, list[int], int]]) -> torch.Tensor:
        """Rows for the forward: carried greedy embeddings where there are, one lookup for the rest."""
        dec = self.decoder
        lookup = [t for req, fed, start in segments if not (len(fed) == 1 and req.carried is not None) for t in fed]
        looked = dec.embed(torch.tensor(lookup, dtype=torch.long, device=dec.device)) if lookup else None
        parts, at = [], 0
        for req, fed, start in segments:
            if len(fed) == 1 and req.carried is not None:
                parts.append(req.carried)
            else:
                parts.append(looked[at : at + len(fed)])
                at += len(fed)
            req.carried = None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _choose(self, h: torch.Tensor, emitting: list[tuple[int, Request]]
                ) -> tuple[list[tuple[Request, int]], list[tuple[Request, str]]]:
        """(next token of each emitting request, in ``emitting`` order; the requests whose choice failed).

        A choice that raises (a sampling setting that cannot be computed, a user's processor that
        fails) fails its request alone. The collectives (argmax, top-k, full logits) run for the
        whole batch before any per-row work, and the per-row work sees the same numbers on every
        rank, so every rank fails the same requests and the group stays in step."""
        vocab = self.decoder.vocab
        chosen: dict[int, int] = {}
        failed: dict[int, str] = {}
        greedy = [(i, r) for i, r in emitting if not r.params.do_sample and not r.params.processes_at(len(r.tokens))]
        if greedy:
            rows = h[[i for i, _ in greedy]]
            tokens, emb = vocab.argmax(rows, with_embedding=True)
            for j, ((i, req), token) in enumerate(zip(greedy, tokens)):
                chosen[i] = token
                if emb is not None:
                    req.carried = emb[j : j + 1]
        topk = [(i, r) for i, r in emitting if r.params.do_sample and not r.params.processes_at(len(r.tokens))
                and 0 < r.params.top_k < vocab.vocab_size]
        for k in sorted({r.params.top_k for _, r in topk}):
            group = [(i, r) for i, r in topk if r.params.top_k == k]
            vals, idx = vocab.top_k(vocab.local_logits(h[[i for i, _ in group]]).float(), k)
            for j, (i, req) in enumerate(group):
                _per_row(chosen, failed, i, sample_from_top_k, vals[j], idx[j], vocab.vocab_size, req.params,
                         req.generator)
        full = [(i, r) for i, r in emitting if i not in chosen and i not in failed]
        if full:
            logits = vocab.full_logits(h[[i for i, _ in full]])
            for j, (i, req) in enumerate(full):
                ids = torch.tensor(req.prompt + req.tokens, dtype=torch.long)
                _per_row(chosen, failed, i, choose_from_logits, logits[j].cpu(), ids, req.params, len(req.prompt),
                         req.generator)
        return ([(req, chosen[i]) for i, req in emitting if i in chosen],
                [(req, failed[i]) for i, req in emitting if i in failed])

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if token in p.eos_token_ids and len(req.tokens) >= p.min_new_tokens:
            return "stop"
        if p.stop_strings and self._hits_stop_string(req):
            return "stop"
        if len(req.tokens) >= p.max_new_tokens:
            return "length"
        return None

    def _hits_stop_string(self, req: Request) -> bool:
        """A stop string that ends inside the newest token's text (the token may run past it)."""
        longest = max(len(s) for s in req.params.stop_strings)
        n, tail = 1, self.tokenizer.decode(req.tokens[-1:], skip_special_tokens=False)
        while n < len(req.tokens) and len(tail) < longest + 16:  # enough text to hold the longest stop string
            n += 1
            tail = self.tokenizer.decode(req.tokens[-n:], skip_special_tokens=False)
        before = self.tokenizer.decode(req.tokens[-n:-1], skip_special_tokens=False) if n > 1 else ""
        return any(s in tail and s not in before for s in req.params.stop_strings)

    def fail(self, request_id: Hashable, message: str) -> bool:
        """End a request with finish reason "error" (its slot is freed); False if unknown or finished."""
        req = self._known.get(request_id)
        if req is None or req.finished:
            return False
        req.error = message
        self._finish(req, "error")
        return True

    def fail_running(self, message: str) -> list[StepOutput]:
        """End every admitted request with ``message``: after a step that raised part-way, their
        state (prefill progress, carried embeddings, the draft's cache) cannot be trusted. Waiting
        requests were not touched by the step and stay queued."""
        outputs = []
        for req in list(self.running):
            self.fail(req.id, message)
            outputs.append(StepOutput(req.id, [], True, "error", error=message))
        return outputs

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.carried = None
        if req in self.running:
            self.running.remove(req)
            self.decoder.cache.release(req.slot)
            if self.speculator is not None:
                self.speculator.release(req.slot)
        elif req in self.waiting:
            self.waiting.remove(req)


def _per_row(chosen: dict[int, int], failed: dict[int, str], i: int, choose: Any, *args: Any) -> None:
    """``chosen[i] = choose(*args)``, or ``failed[i]`` = the error it raised (see ``Engine._choose``)."""
    try:
        chosen[i] = choose(*args)
    except Exception as exc:  # noqa: BLE001 - whatever one request's settings raise ends that request only
        failed[i] = f"choosing the next token failed: {type(exc).__name__}: {exc}".splitlines()[0]
