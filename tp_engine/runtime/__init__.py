"""The lean runtime: one batched decoder for every family with runtime blocks.

Data flows one way: a family builder (``families/``) reads the sharded HF
model into blocks (``blocks.py``: attention, MLP, MoE, layer wiring), the
:class:`Decoder` runs ragged batches over a slot KV cache
(``kv_cache.py``), :mod:`.vocab` handles the vocabulary shards, and the
:class:`Engine` (``engine.py``) is the step API that ``generate``, the CLI
and a server drive.
"""
from .build import RuntimeUnsupported
from .decoder import Decoder, decoder_for, unsupported_reason
from .engine import Engine, Request, StepOutput, TokenLogprob
from .sampling import SamplingParams

__all__ = [
    "Decoder",
    "Engine",
    "Request",
    "RuntimeUnsupported",
    "SamplingParams",
    "StepOutput",
    "TokenLogprob",
    "decoder_for",
    "unsupported_reason",
]
