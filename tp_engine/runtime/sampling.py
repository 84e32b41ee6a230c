"""Per-sequence sampling settings and the token choice for a batch of rows.

Greedy rows without logits processors never gather logits (the vocabulary
shards exchange only (max, index, embedding); see :mod:`.vocab`). Sampled
rows without processors gather only each shard's top-k. Everything else
(repetition penalty, no-repeat n-grams, minimum length, user logits
processors, top-p without top-k) gathers the row's full logits once and
applies transformers' own processor classes, in transformers' order
(processors, then temperature, top-k, top-p), so the numbers are HF's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..comm.base import Communicator

__all__ = ["MAX_LOGPROBS", "SamplingParams", "eos_ids", "shared_seed", "synced_global_generator"]

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows


@dataclass
class SamplingParams:
    """How one sequence picks its tokens and when it stops."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # None: the engine's generator (or torch's global one in generate)
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # needs the engine's tokenizer
    logits_processors: tuple[Any, ...] = field(default=(), compare=False)  # HF LogitsProcessor objects
    # Report each new token's log-probability and this many alternatives (None: off). The model's
    # own distribution (log-softmax of its logits, before penalties, temperature, top-k or top-p).
    logprobs: int | None = None

    def validate(self) -> None:
        """A ValueError naming the first bad setting."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0 or self.min_new_tokens < 0:
            raise ValueError("no_repeat_ngram_size and min_new_tokens must be >= 0")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def has_processors(self) -> bool:
        """Whether any processor may change the logits (then the row's full logits are gathered)."""
        return bool(
            self.repetition_penalty != 1.0 or self.no_repeat_ngram_size or self.logits_processors
            or (self.min_new_tokens and self.eos_token_ids)
        )

    def processes_at(self, generated: int) -> bool:
        """``has_processors`` for the next token after ``generated`` new ones: the minimum-length
        rule only suppresses EOS until it is met, so past it (or without an EOS) it costs nothing."""
        return bool(
            self.repetition_penalty != 1.0 or self.no_repeat_ngram_size or self.logits_processors
            or (self.eos_token_ids and generated < self.min_new_tokens)
        )

    def processors(self, prompt_len: int) -> list[Any]:
        """transformers' processors for this sequence, in ``generate``'s order."""
        out: list[Any] = []
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(penalty=self.repetition_penalty))
        if self.no_repeat_ngram_size:
            out.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.min_new_tokens and self.eos_token_ids:
            out.append(MinNewTokensLengthLogitsProcessor(prompt_len, self.min_new_tokens, list(self.eos_token_ids)))
        out.extend(self.logits_processors)
        if self.do_sample:
            if self.temperature != 1.0:
                out.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                out.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                out.append(TopPLogitsWarper(self.top_p))
        return out


def eos_ids(model: Any, eos_token_id: int | Sequence[int] | torch.Tensor | None) -> tuple[int, ...]:
    """The stop tokens: ``eos_token_id``, or the model's ``generation_config.eos_token_id`` when None."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return tuple(int(e) for e in eos_token_id)


def shared_seed(comm: Communicator, seed: int | None, device: torch.device) -> int:
    """``seed`` (or a fresh draw when None), rank 0's value on every rank."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    if comm.world_size > 1:
        t = torch.tensor([seed], dtype=torch.int64, device=device)
        comm.broadcast_(t, src=0)
        seed = int(t.cpu())
    return seed


def synced_global_generator(comm: Communicator, device: torch.device) -> torch.Generator:
    """torch's global generator, given rank 0's state on every rank: ``torch.manual_seed(s)``
    then sampling gives what HF's ``generate`` samples after the same seed."""
    if comm.world_size > 1:
        state = torch.get_rng_state().to(device)  # NCCL carries device tensors only
        comm.broadcast_(state, src=0)
        torch.set_rng_state(state.cpu())
    return torch.default_generator


def sample_from_top_k(vals: torch.Tensor, idx: torch.Tensor, vocab_size: int, params: SamplingParams,
                      gen: torch.Generator) -> int:
    """One draw from the global top-k (vals, vocab ids sorted by id) of one row: temperature, then
    top-p, then a multinomial over a full-vocabulary vector (zeros outside the top-k), as HF draws."""
    if params.temperature != 1.0:
        vals = vals / params.temperature
    if params.top_p < 1.0:
        order = torch.argsort(vals)  # ascending
        cum = torch.softmax(vals[order], -1).cumsum(-1)
        drop = cum <= (1.0 - params.top_p)
        drop[-1] = False  # keep at least one
        vals = vals.clone()
        vals[order[drop]] = float("-inf")
    probs = torch.softmax(vals, -1).cpu()
    full = probs.new_zeros(vocab_size)
    full[idx.cpu()] = probs
    return int(torch.multinomial(full, 1, generator=gen))


def choose_from_logits(logits: torch.Tensor, ids: torch.Tensor, params: SamplingParams, prompt_len: int,
                       gen: torch.Generator | None) -> int:
    """Full logits (V,) of one row -> its token, through transformers' processors."""
    scores = logits[None].float()
    for proc in params.processors(prompt_len):
        scores = proc(ids[None], scores)
    if not params.do_sample:
        return int(scores[0].argmax())
    probs = torch.softmax(scores[0], -1).cpu()
    return int(torch.multinomial(probs, 1, generator=gen))
