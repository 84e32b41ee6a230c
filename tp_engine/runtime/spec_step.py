"""Speculative decoding inside the engine's step: a draft proposes, the step's one forward verifies.

When a step's running batch holds greedy sequences in decode, the draft
proposes up to ``k`` tokens for each of them, in ``k`` batched draft
forwards (one row per sequence; the first also reads whatever the draft has
not seen of the sequence). The target then reads each such sequence's last
token plus its proposals as one ragged segment of the step's single forward,
next to the other sequences' decode tokens and prompt chunks, and each keeps
the longest prefix of its proposals that equals the target's own greedy
choice, plus the target's token after it (:func:`accepted`). Greedy output
is therefore exactly the target's.

The draft is normally the target's own weights quantized to int8 or int4
(:func:`self_draft`), sharded like the target: every rank computes the same
proposals with the collectives it already makes, so speculation adds no
message of its own.

The draft's KV cache has one slot per sequence, at the target's slot index.
It holds the first ``drafted`` positions of the sequence; when a sequence
first speculates, the draft reads its prompt and tokens, at most
``catch_up`` tokens per step for all sequences together (a sequence still
catching up takes a plain step meanwhile), so a long prompt never stalls the
other streams. After verification ``drafted`` drops to the agreed prefix;
the entries beyond are overwritten later (rolling back is free, as in
:mod:`tp_engine.speculative`).

Which sequences speculate is the engine's decision (greedy, without logits
processors or logprobs, at least two tokens left); the others take plain
steps in the same forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .decoder import Decoder

__all__ = ["DRAFT_BITS", "SpecStats", "Speculator", "accepted", "self_draft"]

DRAFT_BITS = {"int8": 8, "int4": 4}


def accepted(proposals: Sequence[int], target: Sequence[int]) -> list[int]:
    """The tokens a verified round yields: the longest prefix of ``proposals`` that agrees with the
    target's greedy tokens, then the target's token after it. ``target`` has one token per
    verified row: ``len(proposals) + 1`` (its last follows the last proposal)."""
    if len(target) != len(proposals) + 1:
        raise ValueError(f"{len(proposals)} proposals need {len(proposals) + 1} target tokens, got {len(target)}")
    n = 0
    while n < len(proposals) and proposals[n] == target[n]:
        n += 1
    return list(proposals[:n]) + [target[n]]


def self_draft(target: Decoder, draft: str, group_size: int | None = None) -> Decoder:
    """The draft "int8" or "int4": a quantized copy of ``target``'s own (possibly sharded) weights,
    on the same communicator. The target keeps its weights; fused ones are read as views."""
    bits = DRAFT_BITS.get(str(draft).lower())
    if bits is None:
        raise ValueError(f"the draft must be one of {sorted(DRAFT_BITS)}, got {draft!r}")
    return Decoder(target.model, comm=target.comm, weight_bits=bits, group_size=group_size)


@dataclass
class SpecStats:
    """Counts since the engine started (the same on every rank)."""

    verified: int = 0  # sequence rounds the target verified
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # proposals the target kept

    @property
    def tokens_per_round(self) -> float:
        """Tokens a sequence gained per verified round (accepted proposals + the target's own)."""
        return (self.accepted + self.verified) / self.verified if self.verified else 0.0


class Speculator:
    """The draft side of speculative steps for one engine (see the module docstring).

    ``target``: the engine's decoder; ``draft``: a decoder on the same
    ranks and vocabulary (``self_draft(target, "int8")``); ``num_draft_tokens``:
    proposals per sequence and round (k); ``catch_up``: draft tokens read
    per step for sequences the draft has not seen yet.
    """

    def __init__(self, target: Decoder, draft: Decoder, num_draft_tokens: int = 4, catch_up: int = 256):
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
        if catch_up < 1:
            raise ValueError(f"catch_up must be >= 1, got {catch_up}")
        if draft is target:
            raise ValueError("the draft needs a decoder (and KV cache) of its own, not the target's")
        if draft.vocab_size != target.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size})")
        if (draft.world, draft.rank) != (target.world, target.rank):
            raise ValueError(f"the draft runs on {draft.world} rank(s) but the target on {target.world}: "
                             "shard both on the same group")
        self.target, self.draft = target, draft
        self.k, self.catch_up = num_draft_tokens, int(catch_up)
        self.stats = SpecStats()
        self._drafted: dict[int, int] = {}  # slot -> positions of its sequence in the draft's cache
        self._length: dict[int, int] = {}  # slot -> the sequence's length when its proposals were made

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` left: the next one there starts with an empty draft cache."""
        self._drafted.pop(slot, None)
        self._length.pop(slot, None)

    @torch.inference_mode()
    def propose(self, seqs: Sequence[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """Proposals for each ``(slot, tokens, rounds)``: ``tokens`` is the whole sequence (prompt and
        generated; its last token is not in the target's cache yet), ``rounds`` the most proposals
        it may take. A sequence whose draft cache is still catching up gets none this step."""
        dr = self.draft
        dr.reserve(self.target.cache.slots, self.target.cache.capacity)
        out: list[list[int]] = [[] for _ in seqs]
        budget = self.catch_up
        feeds: list[tuple[int, list[int], int]] = []  # (index in seqs, tokens fed, start position)
        ready: list[int] = []
        for i, (slot, tokens, rounds) in enumerate(seqs):
            done = self._drafted.get(slot, 0)
            lag = len(tokens) - done
            if rounds < 1 or lag < 1:
                continue
            if lag <= self.k + 1 or lag <= budget:  # in step (a few tokens behind), or fits the catch-up budget
                budget -= lag if lag > self.k + 1 else 0
                feeds.append((i, list(tokens[done:]), done))
                ready.append(i)
            elif budget > 0:  # read part of it now; speculate in a later step
                feeds.append((i, list(tokens[done : done + budget]), done))
                budget = 0
        if not feeds:
            return out
        h = dr.forward(dr.embed(torch.tensor([t for _, fed, _ in feeds for t in fed], dtype=torch.long, device=dr.device)),
                       [seqs[i][0] for i, _, _ in feeds], [p for _, _, p in feeds], [len(f) for _, f, _ in feeds])
        for i, fed, start in feeds:
            self._drafted[seqs[i][0]] = start + len(fed)
        if not ready:
            return out
        rows = [j for j, (i, _, _) in enumerate(feeds) if i in ready]
        live = ready
        h = h[rows] if len(rows) != len(feeds) else h
        for step in range(self.k):
            tokens, emb = dr.vocab.argmax(h, with_embedding=True)
            for i, token in zip(live, tokens):
                out[i].append(token)
            keep = [j for j, i in enumerate(live) if len(out[i]) < seqs[i][2]]
            if not keep or step == self.k - 1:
                break
            live = [live[j] for j in keep]
            x = emb[keep] if emb is not None else dr.embed(torch.tensor([out[i][-1] for i in live], device=dr.device))
            slots = [seqs[i][0] for i in live]
            starts = [self._drafted[s] for s in slots]
            h = dr.forward(x, slots, starts, [1] * len(live))
            for s in slots:
                self._drafted[s] += 1
        for i in ready:
            slot, tokens, _ = seqs[i]
            self._length[slot] = len(tokens)
            self.stats.drafted += len(out[i])
        return out

    @torch.inference_mode()
    def verify(self, slots: Sequence[int], proposals: Sequence[list[int]],
               hidden: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor | None]]:
        """The target's verdict per speculating sequence: ``hidden[i]`` holds its final hidden states
        (``len(proposals[i]) + 1`` rows: its last token, then each proposal). Returns (new tokens, the
        embedding of the last new token, or None) per sequence; one vocabulary exchange for all."""
        target_tokens, emb = self.target.vocab.argmax(torch.cat(list(hidden)), with_embedding=True)
        results, at = [], 0
        for slot, props, h in zip(slots, proposals, hidden):
            mine = target_tokens[at : at + h.shape[0]]
            new = accepted(props, mine)
            carried = emb[at + len(new) - 1 : at + len(new)] if emb is not None else None
            at += h.shape[0]
            # The draft's entries past the agreed prefix are stale; the sequence's newest token is not in it yet.
            self._drafted[slot] = min(self._drafted.get(slot, 0), self._length[slot] + len(new) - 1)
            self.stats.verified += 1
            self.stats.accepted += len(new) - 1
            results.append((new, carried))
        return results
