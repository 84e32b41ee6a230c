"""Proof before use: the runtime's Llama blocks on an architecture without a runtime family.

Families with their own builder (``runtime/families``) are proven by the
test suite. Any other architecture laid out like Llama module for module
(the auto-planner's territory) may still compute something else: an extra
scale, a norm in another place. Before ``generate`` runs such a model on the
runtime, a tiny random copy of the same architecture must give
transformers' logits (within 1e-4) through the runtime, both for a whole
prompt at once and one token at a time from the cache. The verdict is
cached per process; a failed proof sends ``generate`` to transformers'
``generate``, with the reason.
"""
from __future__ import annotations

import torch
from torch import nn

from .comm.base import SingleProcessCommunicator
from .runtime import Decoder, RuntimeUnsupported
from .runtime.families import is_declared
from .tiny import tiny_model

__all__ = ["runtime_problem"]

TOL = 1e-4
_verdicts: dict[tuple[str, str], str | None] = {}


def runtime_problem(model: nn.Module) -> str | None:
    """None when the runtime may run ``model``; else why not, in one line."""
    if is_declared(model):
        return None
    config = model.config
    key = (type(model).__name__, config.to_json_string(use_diff=False))
    if key not in _verdicts:
        _verdicts[key] = _prove(model)
    return _verdicts[key]


@torch.no_grad()
def _prove(model: nn.Module) -> str | None:
    model_type = getattr(model.config, "model_type", "?")
    try:
        tiny = tiny_model(model.config, type(model))
        vocab = tiny.get_input_embeddings().weight.shape[0]
        ids = torch.randint(1, vocab, (12,), generator=torch.Generator().manual_seed(0))
        reference = tiny(ids[None]).logits[0].float()
        dec = Decoder(tiny, SingleProcessCommunicator(), fuse_in_place=False)
        dec.reserve(1, ids.shape[0])
        whole = dec.rows_logits(dec.forward(dec.embed(ids), [0], [0], [ids.shape[0]], last_only=False))
        dec.forward(dec.embed(ids[:8]), [0], [0], [8])
        stepped = torch.cat([dec.rows_logits(dec.step_hidden(dec.embed(ids[i : i + 1]), i)) for i in range(8, 12)])
    except RuntimeUnsupported as e:
        return str(e)
    except Exception as e:  # a layout that only looks like Llama's: any failure is a refusal, with its reason
        return f"the runtime's Llama blocks cannot read {model_type}: {type(e).__name__}: {e}".splitlines()[0]
    diff = max(float((whole - reference).abs().max()), float((stepped - reference[8:]).abs().max()))
    if not diff < TOL:
        return (f"the runtime's Llama blocks do not reproduce {model_type} "
                f"(max |logit diff| {diff:.2g} on a tiny copy; transformers' generate is used)")
    return None
