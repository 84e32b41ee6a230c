"""The lean runtime's forward: many sequences, each with its own slot, position and length.

:class:`Decoder` is built once per model (and per quantized draft copy) from
the family's blocks and holds the per-rank KV cache. It runs on every rank
of the model's group in lockstep; the only collectives are the all-reduces
inside the layers, the embedding all-reduce (skipped when the greedy
exchange already carried the embedding) and the vocabulary exchanges.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..comm.base import Communicator, SingleProcessCommunicator
from ..quant.layer import is_quantized
from .blocks import Batch
from .build import BuildContext, RuntimeUnsupported
from .families import builder_for
from .kv_cache import SlotCache
from .vocab import Vocab

__all__ = ["Decoder", "comm_of", "decoder_for", "runtime_verdict", "unsupported_reason"]


def comm_of(model: nn.Module) -> Communicator | None:
    """The communicator of the model's parallel layers (None for a plain model)."""
    for module in model.modules():
        comm = getattr(module, "comm", None)
        if comm is not None:
            return comm
    return None


def unsupported_reason(model: nn.Module, allow_meta: bool = False) -> str | None:
    """Why the runtime cannot run ``model`` (without building it), or None if it may."""
    try:
        builder_for(model)
    except RuntimeUnsupported as e:
        return str(e)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or model.get_output_embeddings() is None:
        return "the model has no input or output embeddings (not a causal LM)"
    if emb.weight.device.type == "meta" and not allow_meta:
        return "the model's weights are on the meta device (not loaded)"
    return None


def runtime_verdict(skeleton: nn.Module) -> str | None:
    """Why the runtime cannot run this architecture, found by building its blocks on a weightless
    (meta-device) skeleton; None when it can. For ``tp-engine check``: no weights are read."""
    try:
        Decoder(skeleton, _dry_run=True)
    except RuntimeUnsupported as e:
        return str(e).removeprefix("tp-engine runtime: ")
    return None


class Decoder:
    """Prefill, decode and verify for many sequences of one (possibly tensor-parallel) HF model.

    Construct it on every rank (it does no collective). ``comm`` defaults to
    the communicator of the model's parallel layers. ``weight_bits`` 8 or 4
    makes the decoder a quantized copy of the model's own (sharded) weights:
    the cheap draft of speculative decoding; the model is left untouched.
    ``int8_argmax``: the greedy LM-head prefilter (None: automatic).
    ``fuse_in_place=False`` keeps the model's parameters untouched and copies
    fused weights instead.
    """

    def __init__(
        self,
        model: nn.Module,
        comm: Communicator | None = None,
        *,
        weight_bits: int | None = None,
        group_size: int | None = None,
        weight_backend: str = "auto",
        int8_argmax: bool | None = None,
        fuse_in_place: bool = True,
        _dry_run: bool = False,
    ):
        reason = unsupported_reason(model, allow_meta=_dry_run)
        if reason is not None:
            raise RuntimeUnsupported(f"tp-engine runtime: {reason}")
        if weight_bits not in (None, 4, 8):
            raise ValueError(f"weight_bits must be None, 8 or 4, got {weight_bits!r}")
        self.model, self.config = model, model.config
        self.comm: Communicator = comm or comm_of(model) or SingleProcessCommunicator()
        self.rank, self.world = self.comm.rank, self.comm.world_size
        emb_w = model.get_input_embeddings().weight
        # A GGUF embedding's weight is a uint8 placeholder; its lookups are float32.
        self.dtype = emb_w.dtype if emb_w.dtype.is_floating_point else torch.float32
        self.device = emb_w.device
        self.weight_bits = weight_bits
        ctx = BuildContext(model, self.comm, self.dtype, self.device, weight_bits, group_size, weight_backend, fuse_in_place)
        with torch.no_grad():
            parts = builder_for(model)(model, ctx)
            self.vocab = Vocab(
                model, self.comm, self.dtype, weight_bits, group_size, weight_backend, int8_argmax, parts.final_softcap
            )
        self.layers = parts.layers
        self.final_norm, self.final_extra, self.embed_extra = parts.final_norm, parts.final_extra, parts.embed_extra
        self.ropes = parts.ropes
        self.max_positions = parts.max_positions
        self.cache = SlotCache(len(self.layers), parts.kv_heads, parts.head_dim, self.dtype, self.device)
        self.vocab_size = self.vocab.vocab_size
        self.hidden = self.vocab.hidden

    # -- capacity ----------------------------------------------------------------

    def reserve(self, slots: int, length: int) -> None:
        """KV cache for ``slots`` sequences of up to ``length`` positions (grows, keeps contents)."""
        self.cache.reserve(slots, length)
        for rope in self.ropes:
            rope.ensure(length)

    # -- forward -----------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (T, H) of ids (T,)."""
        return self.vocab.embed(ids.to(self.device))

    @torch.inference_mode()
    def forward(
        self, x: torch.Tensor, slots: Sequence[int], starts: Sequence[int], lengths: Sequence[int], last_only: bool = True
    ) -> torch.Tensor:
        """Run rows ``x`` (T, H) of token embeddings: segment i is ``lengths[i]`` tokens of the
        sequence in ``slots[i]`` at positions ``starts[i], starts[i] + 1, ...``.

        The slot's cache must hold that sequence's positions [0, start);
        whatever it holds beyond is overwritten (rolling back is free).
        Returns final (normed) hidden states: each segment's last row
        (segments, H), or all rows (T, H) with ``last_only=False``.
        """
        for s, p, n in zip(slots, starts, lengths):
            if p + n > self.cache.capacity or not 0 <= s < self.cache.slots:
                raise ValueError(f"slot {s} positions up to {p + n} exceed the cache ({self.cache.slots} x "
                                 f"{self.cache.capacity}); call reserve first")
        batch = Batch(list(slots), list(starts), list(lengths), self.device)
        if self.embed_extra is not None:
            x = self.embed_extra(x, batch.positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, self.cache.k[i], self.cache.v[i])
        if last_only:
            x = x[[o + n - 1 for o, n in zip(batch.offsets, batch.lengths)]] if batch.rows != len(lengths) else x
        x = self.final_norm(x)
        if self.final_extra is not None:
            x = self.final_extra(x)
        return x

    # -- one sequence (speculative decoding and its drafts use these) --------------

    def _ensure(self, length: int) -> None:
        self.reserve(max(1, self.cache.slots), length)

    def extend_hidden(self, ids: torch.Tensor, start: int, last_only: bool = True, slot: int = 0) -> torch.Tensor:
        """Run tokens ``ids`` (1-D) of the sequence in ``slot`` at positions ``start, ...``."""
        return self.forward(self.embed(ids), [slot], [start], [ids.shape[0]], last_only)

    def step_hidden(self, x: torch.Tensor, pos: int, slot: int = 0) -> torch.Tensor:
        """One decode step: ``x`` (1, H) is the embedded token at ``pos``; final hidden state (1, H)."""
        return self.forward(x, [slot], [pos], [1])

    def embed_token(self, token: int) -> torch.Tensor:
        return self.embed(torch.tensor([token], device=self.device))

    def rows_argmax(self, h: torch.Tensor) -> list[int]:
        """Global greedy token of each row of final hidden states ``h`` (B, H)."""
        return self.vocab.argmax(h)[0]

    def rows_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits (B, V), the same on every rank."""
        return self.vocab.full_logits(h)


def decoder_for(model: nn.Module) -> Decoder:
    """The decoder cached on ``model``, rebuilt when the model's modules were swapped or quantized."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    # Re-sharding swaps the embeddings; quantizing layers in place changes their strategies.
    quantized = sum(1 for m in model.modules() if is_quantized(m))
    key = (id(emb), id(head), id(comm_of(model)), quantized)
    cached = model.__dict__.get("_tp_engine_decoder")
    if cached is None or cached[0] != key:
        cached = (key, Decoder(model))
        model.__dict__["_tp_engine_decoder"] = cached
    return cached[1]
