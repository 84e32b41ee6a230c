"""Generation on every rank: the lean runtime whenever the call allows it, else HF's ``generate``.

``generate(model, input_ids, **kwargs)`` and ``model.generate(...)`` on a
model returned by ``from_pretrained`` or ``parallelize`` are the same thing.
The call is mapped onto the runtime (:mod:`tp_engine.runtime`): batches
(left-padded with an attention mask, as HF takes them) become ragged
sequences, each decoded exactly as it would be alone; ``max_new_tokens`` or
``max_length``, ``min_new_tokens``, sampling settings, ``repetition_penalty``,
``no_repeat_ngram_size``, ``stop_strings`` (with ``tokenizer=``), user
``logits_processor`` lists, ``eos_token_id``/``pad_token_id``, ``seed`` and
``streamer`` are handled. Settings not given come from the model's
``generation_config``, as HF takes them.

Anything else (beam search, returning scores, ...) runs HF's ``generate``,
with a warning that says why, once per reason; ``fast_path=True`` raises
:class:`RuntimeUnsupported` instead, ``fast_path=False`` always takes HF's.

Ranks stay in step because they see identical inputs (checked) and
identical logits (every communicator's all-reduce and all-gather give
bitwise-identical results on all ranks); sampling also needs identical
random numbers, so every path gives all ranks rank 0's seed or RNG state.
"""
from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import nn

from .async_speculative import async_speculative_generate
from .comm.agree import check_same_tokens
from .parallelize import synchronize_rng
from .runtime import Engine, RuntimeUnsupported, SamplingParams, decoder_for, unsupported_reason
from .runtime.decoder import Decoder, comm_of
from .runtime.sampling import eos_ids, synced_global_generator
from .runtime_check import runtime_problem
from .speculative import speculative_generate

__all__ = ["generate", "runtime_arguments", "install_generate", "RuntimeUnsupported", "FastPathUnsupported"]

# The old name of the runtime's refusal (a ValueError), kept for callers that catch it.
FastPathUnsupported = RuntimeUnsupported

# Call arguments the runtime implements. Others go to HF's generate.
_RUNTIME_KWARGS = frozenset({
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "eos_token_id", "pad_token_id", "attention_mask", "use_cache", "seed", "streamer", "repetition_penalty",
    "no_repeat_ngram_size", "stop_strings", "tokenizer", "logits_processor", "generation_config",
    "return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    "num_beams", "num_return_sequences", "min_length",
})
# generation_config fields and the values that leave a plain decode unchanged.
_NEUTRAL_CONFIG = {
    "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "min_p": (None,),
    "exponential_decay_length_penalty": (None,),
    "penalty_alpha": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "renormalize_logits": (None, False),
    "return_dict_in_generate": (None, False),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "min_length": (None, 0),
    "assistant_model": (None,),
    "prompt_lookup_num_tokens": (None,),
}
_warned: set[str] = set()


class _Call:
    """A generate call mapped onto the runtime."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams, pad: int, padded: torch.Tensor,
                 tokenizer: Any, streamer: Any, use_global_rng: bool):
        self.prompts, self.params, self.pad, self.padded = prompts, params, pad, padded
        self.tokenizer, self.streamer, self.use_global_rng = tokenizer, streamer, use_global_rng


def runtime_arguments(model: nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> tuple[_Call | None, str]:
    """(the call for the runtime, "") or (None, why this call needs HF's generate)."""
    reason = unsupported_reason(model) or runtime_problem(model)
    if reason is not None:
        return None, reason
    extra = sorted(set(kwargs) - _RUNTIME_KWARGS)
    if extra:
        return None, f"arguments {extra} are not implemented by the runtime"
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(name: str, default: Any = None) -> Any:
        value = kwargs.get(name)
        if value is None:
            value = getattr(gc, name, None)
        return default if value is None else value

    for name, neutral in _NEUTRAL_CONFIG.items():
        value = kwargs.get(name, getattr(gc, name, None))
        if value not in neutral:
            return None, f"{name}={value!r} is not implemented by the runtime"
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        return None, f"input_ids of shape {tuple(input_ids.shape)}"
    mask = kwargs.get("attention_mask")
    prompts: list[list[int]] = []
    if mask is None:
        prompts = input_ids.tolist()
    else:
        mask = torch.as_tensor(mask).bool().cpu()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        for row, m in zip(input_ids.cpu(), mask):
            n = int(m.sum())
            if n == 0 or not bool(m[-n:].all()):
                return None, "an attention_mask that is not left padding"
            prompts.append(row[-n:].tolist())
    max_new = kwargs.get("max_new_tokens")
    if max_new is None and kwargs.get("max_length") is not None:
        max_new = int(kwargs["max_length"]) - input_ids.shape[1]
    if max_new is None:
        max_new = getattr(gc, "max_new_tokens", None)
    if max_new is None:
        max_length = getattr(gc, "max_length", None)
        if max_length is None:
            return None, "neither max_new_tokens nor max_length given"
        max_new = int(max_length) - input_ids.shape[1]
    if int(max_new) < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (max_length below the prompt length?), got {max_new}")
    do_sample = bool(setting("do_sample", False))
    stop = setting("stop_strings", ())
    processors = tuple(kwargs.get("logits_processor") or ())
    eos = eos_ids(model, setting("eos_token_id"))
    params = SamplingParams(
        max_new_tokens=int(max_new),
        do_sample=do_sample,
        temperature=float(setting("temperature", 1.0)) if do_sample else 1.0,
        top_k=int(setting("top_k", 50)) if do_sample else 0,
        top_p=float(setting("top_p", 1.0)) if do_sample else 1.0,
        seed=kwargs.get("seed"),
        min_new_tokens=int(setting("min_new_tokens", 0)),
        repetition_penalty=float(setting("repetition_penalty", 1.0)),
        no_repeat_ngram_size=int(setting("no_repeat_ngram_size", 0)),
        eos_token_ids=eos,
        stop_strings=(stop,) if isinstance(stop, str) else tuple(stop),
        logits_processors=processors,
    )
    params.validate()
    pad = setting("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    streamer = kwargs.get("streamer")
    if streamer is not None and len(prompts) > 1:
        raise ValueError("a streamer takes one prompt (as in transformers); got a batch of %d" % len(prompts))
    return _Call(prompts, params, int(pad), input_ids, kwargs.get("tokenizer"), streamer, params.seed is None), ""


def run_call(model: nn.Module, call: _Call) -> torch.Tensor:
    """Decode every prompt of the call on the runtime; HF's output layout (input + new tokens, padded)."""
    decoder = decoder_for(model)
    if decoder.world > 1:
        check_same_tokens(call.padded, decoder.comm, "tp_engine.generate")
    generator = None
    if call.params.do_sample and call.use_global_rng:
        generator = synced_global_generator(decoder.comm, decoder.device)
    engine = Engine(decoder, max_batch=max(1, len(call.prompts)), tokenizer=call.tokenizer, generator=generator)
    if call.streamer is not None:
        call.streamer.put(call.padded.cpu())
    ids = [engine.add_request(p, call.params) for p in call.prompts]
    while engine.has_unfinished:
        for out in engine.step():
            if out.error is not None:  # one command, one answer: a failed sequence fails the call
                raise RuntimeError(f"tp_engine.generate: sequence {out.request_id} failed: {out.error}")
            if call.streamer is not None and out.new_tokens:
                call.streamer.put(torch.tensor(out.new_tokens))
    if call.streamer is not None:
        call.streamer.end()
    new = [engine.request(i).tokens for i in ids]
    width = max((len(t) for t in new), default=0)
    rows = [t + [call.pad] * (width - len(t)) for t in new]
    out = torch.tensor(rows, dtype=call.padded.dtype).reshape(len(rows), width).to(call.padded.device)
    return torch.cat([call.padded, out], dim=1)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    draft: Any = None,
    num_draft_tokens: int = 4,
    draft_rank: int | None = None,
    draft_group_size: int | None = None,
    asynchronous: bool = False,
    fast_path: bool | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Generate on every rank of the model's group; returns prompt + new tokens (HF's layout).

    * With ``draft`` (``"int8"``, ``"int4"``, or a model; see
      :mod:`tp_engine.speculative`): speculative decoding, ``num_draft_tokens``
      proposals per round; ``draft_rank`` runs an unsharded draft on that rank only.
    * With ``asynchronous=True`` (and ``draft_rank``; see :mod:`tp_engine.async_speculative`):
      ``draft_rank`` runs only the draft, drafting ahead while the other ranks verify; there
      ``model`` may be None and ``draft`` is the draft model, elsewhere ``model`` is the target
      sharded over the other ranks (``target_group``) and ``draft`` is None.
    * Else the runtime when the model and the call allow it (``fast_path=None``:
      automatically, warning once per reason when it does not; True: insist,
      raising :class:`RuntimeUnsupported` with the reason; False: never).
    * Else HF's ``generate`` with every rank's sampler drawing rank 0's numbers.
    * A pipeline stage (``parallelize(..., pp=N)``) holds only its layers, so only the pipeline runs it.
    """
    pipeline = getattr(model, "tp_engine_pipeline", None)
    if pipeline is not None:
        if draft is not None or draft_rank is not None or asynchronous or fast_path is False:
            raise ValueError("a pipeline-parallel model decodes through its pipeline only (no draft, no fast_path=False)")
        return pipeline.generate_ids(input_ids, **kwargs)
    if asynchronous:
        return _generate_async(model, input_ids, draft, draft_rank, num_draft_tokens, kwargs)
    if draft is not None or draft_rank is not None:
        call, reason = runtime_arguments(model, input_ids, kwargs)
        if call is None:
            raise RuntimeUnsupported(f"speculative decoding runs on the runtime, which does not apply: {reason}")
        if len(call.prompts) != 1 or call.params.has_processors or call.params.stop_strings:
            raise RuntimeUnsupported("speculative decoding takes one prompt without logits processors or stop strings")
        p = call.params
        tokens, _ = speculative_generate(
            model, call.padded, max_new_tokens=p.max_new_tokens, draft=draft, num_draft_tokens=num_draft_tokens,
            draft_rank=draft_rank, group_size=draft_group_size, do_sample=p.do_sample, temperature=p.temperature,
            top_k=p.top_k, top_p=p.top_p, eos_token_id=list(p.eos_token_ids), seed=p.seed, streamer=call.streamer,
        )
        return tokens
    if fast_path is not False:
        call, reason = runtime_arguments(model, input_ids, kwargs)
        if call is not None:
            return run_call(model, call)
        if fast_path:
            raise RuntimeUnsupported(f"tp-engine runtime does not apply: {reason}")
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"tp-engine: this call runs transformers' generate, not the lean runtime: {reason}",
                          stacklevel=2)
    comm = comm_of(model)
    if comm is not None and comm.world_size > 1:
        check_same_tokens(input_ids, comm, "tp_engine.generate")
        synchronize_rng(comm)
    hf_generate = model.__dict__.get("_tp_engine_hf_generate") or model.generate
    return hf_generate(input_ids, **kwargs)


def _generate_async(model: nn.Module | None, input_ids: torch.Tensor, draft: Any, draft_rank: int | None,
                    num_draft_tokens: int, kwargs: dict[str, Any]) -> torch.Tensor:
    """``generate(..., asynchronous=True)``: the call's settings resolved as for the runtime (on the
    draft rank from the draft model's generation_config), then the asynchronous protocol."""
    if draft_rank is None:
        raise ValueError("asynchronous=True needs draft_rank: the rank that runs only the draft")
    resolver = model if model is not None else (draft.model if isinstance(draft, Decoder) else draft)
    if resolver is None:
        raise ValueError(f"asynchronous speculative decoding: rank {draft_rank} (the draft rank) needs draft=a model, "
                         "the other ranks the target model")
    call, reason = runtime_arguments(resolver, input_ids, kwargs)
    if call is None:
        raise RuntimeUnsupported(f"speculative decoding runs on the runtime, which does not apply: {reason}")
    if len(call.prompts) != 1 or call.params.has_processors or call.params.stop_strings:
        raise RuntimeUnsupported("speculative decoding takes one prompt without logits processors or stop strings")
    p = call.params
    tokens, _ = async_speculative_generate(
        model, call.padded, p.max_new_tokens, draft, draft_rank, num_draft_tokens=num_draft_tokens,
        do_sample=p.do_sample, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
        eos_token_id=list(p.eos_token_ids), seed=p.seed, streamer=call.streamer,
    )
    return tokens


def install_generate(model: nn.Module) -> nn.Module:
    """Make ``model.generate(...)`` the runtime's :func:`generate` (HF's own stays the fallback)."""
    if "_tp_engine_hf_generate" not in model.__dict__ and hasattr(model, "generate"):
        model.__dict__["_tp_engine_hf_generate"] = model.generate
        model.generate = types.MethodType(_generate_method, model)
    return model


def _generate_method(self: nn.Module, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None:
        return self.__dict__["_tp_engine_hf_generate"](**kwargs)
    return generate(self, input_ids, **kwargs)
