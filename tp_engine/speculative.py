"""Speculative decoding: a cheap draft proposes, the (sharded) target verifies.

Each round the draft proposes ``k`` tokens one by one; the target runs the
last accepted token plus the ``k`` proposals in ONE forward (``k + 1``
positions) and keeps the longest prefix it agrees with, plus one token of
its own. A round therefore yields between 1 and ``k + 1`` tokens for one
target forward, whose cost on a memory-bound machine grows much less than
``k + 1`` times.

* Greedy: a proposal is accepted iff it is the target's argmax at that
  position, so the output is the target's greedy output.
* Sampling: the standard rejection rule (Leviathan et al. 2023; Chen et al.
  2023). Proposal ``x ~ q`` is kept with probability ``min(1, p(x)/q(x))``;
  on rejection a token is drawn from ``normalize(max(0, p - q))``; when all
  ``k`` are kept a bonus token is drawn from the target's next ``p``. The
  output is distributed exactly as the target's own sampling (with the same
  temperature / top-k / top-p applied to both p and q).
* Roll-back is free: both caches are static, attention reads positions
  ``[0, end)`` only, and the next forward overwrites rejected positions.

Draft placements:

* **sharded** (``draft="int8"`` / ``"int4"``, or a draft that was itself
  ``parallelize``-d on the same group): every rank runs its shard of the
  draft in lockstep with the target; proposals agree without a message.
* **replicated** (an unsharded draft model on every rank, ``draft_rank=None``):
  every rank runs the whole draft; rank 0's proposals are broadcast so ranks
  cannot drift apart (different CPUs may round differently).
* **one rank** (``draft_rank=r``; "the second machine runs the draft"): only
  rank r holds and runs the draft (others pass ``draft=None``); it
  broadcasts the proposals (and, when sampling, their probabilities).

The target and a model draft run on the lean runtime (:mod:`tp_engine.runtime`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .comm.agree import token_digest
from .runtime import Decoder, RuntimeUnsupported, decoder_for
from .runtime.sampling import eos_ids, shared_seed

__all__ = ["SpeculativeStats", "draft_decoder", "sampling_probs", "speculative_generate"]

_PLACEMENTS = ("sharded", "replicated", "one-rank")


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation."""

    rounds: int = 0  # target verification forwards
    drafted: int = 0  # tokens proposed by the draft
    accepted: int = 0  # proposals the target kept
    new_tokens: int = 0  # tokens returned (the first comes from the prompt's forward)
    placement: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.new_tokens - 1) / self.rounds if self.rounds else 0.0


def draft_decoder(
    target: nn.Module, draft: Any, group_size: int | None = None
) -> Decoder | None:
    """The runtime decoder of ``draft``: None, "int8"/"int4" (a quantized
    copy of ``target``'s own, possibly sharded, weights), a model, or a
    :class:`~tp_engine.runtime.Decoder`. Self-copies are cached on the target."""
    if draft is None or isinstance(draft, Decoder):
        return draft
    if isinstance(draft, str):
        bits = {"int8": 8, "int4": 4}.get(draft.lower())
        if bits is None:
            raise ValueError(f"draft must be 'int8', 'int4', a model or None, got {draft!r}")
        cache = target.__dict__.setdefault("_tp_engine_draft_decoders", {})
        target_decoder = decoder_for(target)  # fuse the target first: the draft then reads views, no copy
        key = (bits, group_size, id(target_decoder))
        if key not in cache:
            cache.clear()
            cache[key] = Decoder(target, comm=target_decoder.comm, weight_bits=bits, group_size=group_size)
        return cache[key]
    if isinstance(draft, nn.Module):
        try:
            return decoder_for(draft)
        except RuntimeUnsupported as e:
            raise RuntimeUnsupported(f"speculative decoding: the draft model is not supported: {e}") from None
    raise TypeError(f"draft must be 'int8', 'int4', a model or None, got {type(draft).__name__}")


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distributions (S, V) from logits (S, V): HF's order, temperature -> top-k -> top-p."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    if top_k and top_k < V:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1.0 - top_p)
        drop[:, -1] = False  # keep at least one
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits.softmax(-1)


class _Round:
    """What every rank must agree on before the first collective of the loop."""

    FIELDS = ("num_draft_tokens", "draft_rank", "placement", "do_sample", "max_new_tokens", "prompt_digest")

    @staticmethod
    def check(comm, values: dict[str, int], holds_draft: bool, draft_vocab: int, placement: str, draft_rank) -> None:
        row = torch.tensor(
            [[values[f] for f in _Round.FIELDS] + [int(holds_draft), draft_vocab]], dtype=torch.int64
        )
        table = comm.all_gather(row, dim=0) if comm.world_size > 1 else row
        for r in range(table.shape[0]):
            for i, name in enumerate(_Round.FIELDS):
                if int(table[r, i]) != int(table[0, i]):
                    raise ValueError(
                        f"speculative decoding: rank {r} has {name}={int(table[r, i])} but rank 0 has "
                        f"{int(table[0, i])}; every rank must make the same call"
                    )
        holders = [r for r in range(table.shape[0]) if int(table[r, -2])]
        needed = [draft_rank] if placement == "one-rank" else list(range(table.shape[0]))
        missing = [r for r in needed if r not in holders]
        if missing:
            raise ValueError(
                f"speculative decoding: ranks {missing} have no draft model "
                + ("(draft_rank=%d must hold it)" % draft_rank if placement == "one-rank"
                   else "(with draft_rank=None every rank runs the draft; pass draft_rank=r to run it on rank r only)")
            )


def _fail_together(comm, error: Exception | None) -> None:
    """Raise on every rank if building the draft failed on any (no rank waits for a dead peer)."""
    flags = comm.all_gather(torch.tensor([[int(error is not None)]], dtype=torch.int64), dim=0)
    failed = [r for r in range(flags.shape[0]) if int(flags[r, 0])]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"speculative decoding: rank {failed[0]} could not build its draft (see its error)")


@torch.inference_mode()
def speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    draft: Any,
    num_draft_tokens: int = 4,
    draft_rank: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    streamer: Any = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generate with ``draft`` proposing ``num_draft_tokens`` per round; every rank calls it.

    Returns (prompt + new tokens of shape (1, S + n), stats), identical on
    every rank. ``draft``: "int8" / "int4" (quantized copy of the target,
    sharded like it), a model (unsharded: replicated or on ``draft_rank``;
    or parallelized on the same group: sharded), or None on ranks that do not
    hold the draft when ``draft_rank`` is set. ``group_size``: int4 groups of
    a self-copy draft. Other arguments as :func:`tp_engine.generate`.
    """
    target = decoder_for(model)
    comm, world, rank = target.comm, target.world, target.rank
    k = int(num_draft_tokens)
    if k < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if int(max_new_tokens) < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if do_sample and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if draft_rank is not None and not 0 <= int(draft_rank) < world:
        raise ValueError(f"draft_rank {draft_rank} is not a rank of this group (world size {world})")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"speculative decoding handles one non-empty prompt, got input_ids of shape {tuple(input_ids.shape)}")

    draft_error: Exception | None = None
    try:
        drafter = draft_decoder(model, draft, group_size)
        if drafter is target:  # the model drafting for itself: it needs a cache of its own
            drafter = Decoder(draft, comm=target.comm)
    except (ValueError, TypeError, RuntimeError) as e:  # shared with the other ranks below, then raised
        if world == 1:
            raise
        drafter, draft_error = None, e
    if world > 1:
        _fail_together(comm, draft_error)
    if drafter is not None and drafter.world > 1:
        if drafter.world != world or drafter.rank != rank:
            raise ValueError(
                f"the draft is sharded over {drafter.world} ranks but the target over {world}: "
                "shard both on the same group, or pass an unsharded draft"
            )
        placement = "sharded"
    elif draft_rank is not None and world > 1:
        placement = "one-rank"
    else:
        placement = "replicated"
    if placement == "sharded" and draft_rank is not None:
        raise ValueError("draft_rank applies to an unsharded draft; this draft is sharded over all ranks")
    if drafter is not None and drafter.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({drafter.vocab_size}) differs from the target's ({target.vocab_size}); "
            "they must share a tokenizer"
        )
    if drafter is None and world == 1:
        raise ValueError("speculative decoding needs a draft: pass draft='int8', 'int4' or a model")
    src = 0 if draft_rank is None else int(draft_rank)
    runs_draft = placement == "sharded" or (placement == "replicated") or rank == src
    if world > 1:
        code = {"num_draft_tokens": k, "draft_rank": -1 if draft_rank is None else int(draft_rank),
                "placement": _PLACEMENTS.index(placement), "do_sample": int(bool(do_sample)),
                "max_new_tokens": int(max_new_tokens), "prompt_digest": token_digest(input_ids)}
        _Round.check(comm, code, drafter is not None, -1 if drafter is None else drafter.vocab_size, placement, src)

    stats = SpeculativeStats(placement=placement)
    prompt = input_ids[0].to(target.device)
    S, n_max = prompt.shape[0], int(max_new_tokens)
    eos = frozenset(eos_ids(model, eos_token_id))  # None: generation_config, as generate does
    gen_accept = gen_draft = None
    if do_sample:
        shared = shared_seed(comm, seed, target.device)
        gen_accept = torch.Generator(device="cpu").manual_seed(shared)
        gen_draft = torch.Generator(device="cpu").manual_seed(shared + 1)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def choose(h: torch.Tensor) -> list[int]:
        """Target tokens for rows of h (greedy), or a sampled first token."""
        if not do_sample:
            return target.rows_argmax(h)
        p = sampling_probs(target.rows_logits(h), temperature, top_k, top_p)
        return [int(torch.multinomial(p[i].cpu(), 1, generator=gen_accept)) for i in range(p.shape[0])]

    out: list[int] = []
    if n_max:
        capacity = S + n_max + k + 1
        target._ensure(capacity)
        if runs_draft and drafter is not None:
            drafter._ensure(capacity)
        out.append(choose(target.extend_hidden(prompt, 0))[0])
        if streamer is not None:
            streamer.put(torch.tensor([out[-1]]))
    seq = prompt.tolist() + out
    t_len = S  # target cache holds seq[:t_len]
    d_len = 0  # draft cache holds seq[:d_len]
    while out and len(out) < n_max and out[-1] not in eos:
        k_round = min(k, n_max - len(out) - 1)
        proposals: list[int] = []
        q_rows: list[torch.Tensor] = []
        if k_round and runs_draft:
            feed = seq[d_len:]
            for _ in range(k_round):
                if len(feed) == 1:  # the lean single-token step
                    h = drafter.step_hidden(drafter.embed_token(feed[0]), d_len)
                else:
                    h = drafter.extend_hidden(torch.tensor(feed, device=drafter.device), d_len)
                d_len += len(feed)
                if do_sample:
                    q = sampling_probs(drafter.rows_logits(h), temperature, top_k, top_p)[0]
                    q_rows.append(q)
                    token = int(torch.multinomial(q.cpu(), 1, generator=gen_draft))
                else:
                    token = drafter.rows_argmax(h)[0]
                proposals.append(token)
                feed = [token]
        if k_round and placement != "sharded" and world > 1:
            proposals, q_rows = _share_proposals(comm, src, rank, k_round, proposals, q_rows, do_sample, target)
        # Verify: the last accepted token and the proposals, in one forward.
        block = torch.tensor([seq[-1]] + proposals, device=target.device)
        hv = target.extend_hidden(block, t_len, last_only=False)
        if do_sample:
            new = _accept_sampled(target, hv, proposals, q_rows, temperature, top_k, top_p, gen_accept)
        else:
            g = target.rows_argmax(hv)
            n = 0
            while n < k_round and proposals[n] == g[n]:
                n += 1
            new = proposals[:n] + [g[n]]
        stats.rounds += 1
        stats.drafted += k_round
        stats.accepted += len(new) - 1
        t_len += len(new)  # seq[-1] and the accepted proposals are now in the target cache
        for i, token in enumerate(new):
            if token in eos:
                new = new[: i + 1]
                break
        new = new[: n_max - len(out)]
        seq += new
        out += new
        d_len = min(d_len, len(seq) - 1)  # the draft's entries past the first rejection are stale
        if streamer is not None:
            for token in new:
                streamer.put(torch.tensor([token]))
    if streamer is not None:
        streamer.end()
    stats.new_tokens = len(out)
    tokens = torch.tensor([out], dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, tokens], dim=1), stats


def _share_proposals(comm, src: int, rank: int, k: int, proposals, q_rows, do_sample: bool, target: Decoder):
    """Broadcast the draft rank's proposals (and their distributions when sampling)."""
    ids = torch.tensor(proposals if rank == src else [0] * k, dtype=torch.int64, device=target.device)
    comm.broadcast_(ids, src=src)
    if do_sample:
        q = torch.stack(q_rows) if rank == src else torch.empty(k, target.vocab_size, device=target.device)
        q_rows = list(comm.broadcast_(q.contiguous(), src=src))
    return ids.tolist(), q_rows


def _accept_sampled(target: Decoder, hv: torch.Tensor, proposals: list[int], q_rows, temperature, top_k, top_p, gen):
    """The rejection rule: keep x_i with prob min(1, p_i(x_i)/q_i(x_i)), else resample from (p_i - q_i)+."""
    p = sampling_probs(target.rows_logits(hv), temperature, top_k, top_p).cpu()
    new: list[int] = []
    for i, x in enumerate(proposals):
        q = q_rows[i].cpu()
        u = float(torch.rand(1, generator=gen))
        if u * float(q[x]) < float(p[i, x]):  # u < p/q without dividing by a tiny q
            new.append(x)
            continue
        residual = (p[i] - q).clamp_(min=0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[i]
        new.append(int(torch.multinomial(dist, 1, generator=gen)))
        return new
    new.append(int(torch.multinomial(p[len(proposals)], 1, generator=gen)))
    return new
