"""Decoding in lockstep: the fast path when it applies, speculative decoding
with a draft, and Hugging Face's ``generate`` for everything else.

Ranks stay in step because they see identical inputs and identical full
logits (all-gather is a concatenation, and every communicator returns
bitwise-identical all-reduce results on all ranks). Sampling additionally
needs identical random numbers: every path hands all ranks rank 0's seed or
RNG state first, whatever each rank seeded.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .comm.base import Communicator
from .fastpath import FastPathUnsupported, fast_generate, unsupported_reason
from .parallelize import synchronize_rng

# What the fast path (and speculative decoding) implement. Anything else in
# the call or in the model's generation_config goes to HF's generate.
_FAST_KWARGS = frozenset({"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "seed", "streamer"})
# Harmless for one unpadded prompt.
_BATCH1_KWARGS = frozenset({"pad_token_id", "attention_mask", "use_cache"})
# generation_config fields whose non-default values change the output of a
# plain greedy/sampled decode (logits processors the fast path lacks).
_NEUTRAL_CONFIG = {
    "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
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
    "stop_strings": (None,),
}


def _comm_of(model: nn.Module) -> Communicator | None:
    for module in model.modules():
        comm = getattr(module, "comm", None)
        if comm is not None:
            return comm
    return None


def fast_path_arguments(model: nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(arguments for ``fast_generate``, "") or (None, why the call needs HF's generate).

    Sampling settings not given in the call come from the model's
    ``generation_config``, as HF's generate takes them (top_k defaults to 50).
    """
    reason = unsupported_reason(model)
    if reason is not None:
        return None, reason
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        return None, f"batch of {tuple(input_ids.shape)}: the fast path decodes one prompt"
    extra = set(kwargs) - _FAST_KWARGS - _BATCH1_KWARGS
    if extra:
        return None, f"arguments {sorted(extra)} are not implemented by the fast path"
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        return None, "a padded attention_mask"
    if kwargs.get("max_new_tokens") is None:
        return None, "max_new_tokens not given"
    gc = getattr(model, "generation_config", None)
    for name, neutral in _NEUTRAL_CONFIG.items():
        value = getattr(gc, name, None)
        if value not in neutral:
            return None, f"generation_config.{name}={value!r} is not implemented by the fast path"

    def setting(name: str, default: Any) -> Any:
        value = kwargs.get(name)
        if value is None:
            value = getattr(gc, name, None)
        return default if value is None else value

    args = {name: kwargs[name] for name in ("max_new_tokens", "eos_token_id", "seed", "streamer") if name in kwargs}
    args["do_sample"] = bool(setting("do_sample", False))
    if args["do_sample"]:
        args["temperature"] = float(setting("temperature", 1.0))
        args["top_k"] = int(setting("top_k", 50))
        args["top_p"] = float(setting("top_p", 1.0))
    return args, ""


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    draft: Any = None,
    num_draft_tokens: int = 4,
    draft_rank: int | None = None,
    draft_group_size: int | None = None,
    fast_path: bool | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Generate on every rank of the model's group; returns prompt + new tokens.

    * With ``draft`` (``"int8"``, ``"int4"``, or a model; see
      :mod:`tp_engine.speculative`): speculative decoding, ``num_draft_tokens``
      proposals per round; ``draft_rank`` runs an unsharded draft on that rank
      only.
    * Else the fast path when the model and the call allow it
      (``fast_path=None``: automatically; True: insist, raising
      :class:`FastPathUnsupported` with the reason; False: never).
    * Else ``model.generate(input_ids, **kwargs)`` with every rank's sampler
      drawing rank 0's numbers.

    Inputs are checked to be identical on all ranks (a cheap checksum), since
    ranks fed different prompts would silently compute garbage.
    """
    if draft is not None or draft_rank is not None:
        from .speculative import speculative_generate

        args, reason = fast_path_arguments(model, input_ids, kwargs)
        if args is None:
            raise FastPathUnsupported(f"speculative decoding runs on the fast path, which does not apply: {reason}")
        tokens, _ = speculative_generate(
            model, input_ids, draft=draft, num_draft_tokens=num_draft_tokens, draft_rank=draft_rank,
            group_size=draft_group_size, **args,
        )
        return tokens
    if fast_path is not False:
        args, reason = fast_path_arguments(model, input_ids, kwargs)
        if args is not None:
            return fast_generate(model, input_ids, **args)
        if fast_path:
            raise FastPathUnsupported(f"tp-engine fast path does not apply: {reason}")
    comm = _comm_of(model)
    if comm is not None and comm.world_size > 1:
        _check_same_input(input_ids, comm)
        synchronize_rng(comm)
    return model.generate(input_ids, **kwargs)


def _check_same_input(input_ids: torch.Tensor, comm: Communicator) -> None:
    ids = input_ids.detach().to("cpu", torch.int64)
    weights = torch.arange(1, ids.numel() + 1, dtype=torch.int64)
    digest = torch.tensor([[ids.numel(), int((ids.flatten() * weights).sum())]], dtype=torch.int64)
    everyone = comm.all_gather(digest.to(input_ids.device) if input_ids.device.type != "cpu" else digest, dim=0)
    everyone = everyone.cpu()
    bad = [r for r in range(comm.world_size) if not torch.equal(everyone[r], everyone[0])]
    if bad:
        raise ValueError(f"tp_engine.generate: ranks {bad} were given different input_ids than rank 0")
