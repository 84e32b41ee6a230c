"""Pipeline parallelism (and hybrid TP x PP) on the lean runtime's blocks.

The world is ``tp x pp`` ranks (:class:`tp_engine.plan.HybridLayout`). Each
pipeline stage holds a contiguous run of decoder layers
(:func:`tp_engine.plan.plan_stages`), tensor-parallel over its own group of
``tp`` ranks; the first stage embeds tokens, the last applies the final norm
and the LM head. Hidden states go from stage to stage over point-to-point
sends (``tp_engine.comm.p2p``): tp rank t of stage s sends to tp rank t of
stage s + 1 (after the stage's all-reduces every tp rank holds the same
rows), and the last stage sends the chosen tokens back to the first.

Each stage keeps the weights and the KV cache of its own layers only: the
other stages' layers are removed from its model (:func:`keep_stage_layers`)
before sharding, so loading reads only them.

The first stage schedules. One sequence decodes strictly stage after stage,
so pipelining cannot make it faster (each token still passes every layer,
plus one send per stage boundary). Several sequences in flight are split
into micro-batches; while stage s + 1 runs micro-batch m, stage s runs
m + 1, so with at least ``pp`` micro-batches every stage is busy.

Message between stages: a fixed-size int64 header ``[kind, segments, rows,
last_only, slots..., starts..., lengths...]`` followed (for a forward) by
the (rows, hidden) activations.
"""
from __future__ import annotations

import copy
from collections import deque
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..comm.agree import check_same_tokens
from ..comm.base import Communicator
from ..comm.p2p import Handle, PointToPoint
from ..plan import HybridLayout
from .blocks import Batch
from .build import BuildContext
from .families import builder_for, is_declared
from .kv_cache import SlotCache
from .vocab import Vocab

__all__ = ["PipelineStage", "StageLayers", "find_layers", "keep_stage_layers", "release_unused_vocab"]

STOP, TOKENS, LOGITS = 0, 1, 2  # header kinds: end of a run, forward for greedy tokens, forward for full logits


class StageLayers(nn.ModuleList):
    """One stage's decoder layers, registered under their global indices.

    Parameter names stay the checkpoint's (``model.layers.5.mlp...``), so a
    stage loads exactly its own tensors. Iteration and ``len`` see only this
    stage's layers; integer indexing is by position within the stage.
    """

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for i, layer in layers.items():
            self.add_module(str(i), layer)

    @property
    def indices(self) -> list[int]:
        return [int(k) for k in self._modules]

    def __getitem__(self, idx: Any) -> Any:
        modules = list(self._modules.values())
        if isinstance(idx, slice):
            return nn.ModuleList(modules[idx])
        return modules[idx]


def find_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the decoder layers: the first ModuleList (pre-order) that holds
    ``config.num_hidden_layers`` modules."""
    n = getattr(model.config, "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n is not None and len(module) == n and path:
            parent_path, _, name = path.rpartition(".")
            return model.get_submodule(parent_path), name
    raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers found to cut into pipeline stages")


def keep_stage_layers(model: nn.Module, layers: range) -> nn.Module:
    """Remove every decoder layer outside ``layers`` from ``model`` (in place); return it.

    Works on a meta-device skeleton (before loading) as on a loaded model
    (the dropped layers' memory is freed once nothing else holds them). The
    model gets its own config copy with ``num_hidden_layers`` and per-layer
    lists (``layer_types``) cut to the stage, so builders and the sharding
    plan see the stage's layers at its indices.
    """
    parent, name = find_layers(model)
    full = getattr(parent, name)
    if not (0 <= layers.start < layers.stop <= len(full)):
        raise ValueError(f"stage layers {layers} are outside the model's {len(full)} layers")
    setattr(parent, name, StageLayers({i: full[i] for i in layers}))
    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == total and key.endswith("layer_types"):
            setattr(config, key, type(value)(value[layers.start:layers.stop]))
    config.num_hidden_layers = len(layers)
    model.config = config
    model.tp_engine_stage_layers = layers
    return model


def release_unused_vocab(model: nn.Module, first: bool, last: bool) -> list[str]:
    """Empty the embedding on stages after the first and the LM head on stages before the last
    (a tied matrix is kept where either is used); return what was released.

    The parameters stay (empty, 0 rows) so the module tree keeps its shape;
    their memory is freed. GGUF blocks kept quantized are not touched.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    released = []
    for name, module, needed in (("embedding", emb, first or (tied and last)), ("lm_head", head, last or (tied and first))):
        w = getattr(module, "weight", None)
        if needed or not isinstance(w, nn.Parameter) or not w.dtype.is_floating_point or w.numel() == 0:
            continue
        w.data = w.data.new_empty((0,) + tuple(w.shape[1:]))
        released.append(name)
    return released


class PipelineStage:
    """One rank's part of a pipeline: its stage's layers (tensor-parallel over ``tp``), its KV cache,
    and the sends to its neighbours.

    ``model``: this stage's model, already cut (:func:`keep_stage_layers`) and
    sharded over ``tp``. ``world``: the communicator of all ``tp x pp`` ranks,
    ``p2p`` its point-to-point channel. Every rank of the world calls the same
    methods with the same arguments.
    """

    def __init__(self, model: nn.Module, layout: HybridLayout, layers: range, world: Communicator,
                 tp: Communicator, p2p: PointToPoint, max_segments: int = 256):
        if layout.world_size != world.world_size:
            raise ValueError(f"layout is for {layout.world_size} ranks, the communicator has {world.world_size}")
        self.model, self.layout, self.layers_range = model, layout, layers
        self.world, self.tp, self.p2p = world, tp, p2p
        self.stage, self.tp_rank = layout.position(world.rank)
        self.first, self.last = self.stage == 0, self.stage == layout.pp - 1
        if not is_declared(model):
            # Layout-matched architectures need the runtime's parity proof first, which covers whole models.
            raise ValueError(f"pipeline stages run the runtime's own families only, not {model.config.model_type!r}")
        emb_w = model.get_input_embeddings().weight
        # A GGUF embedding kept quantized has a uint8 placeholder weight; its lookups are float32.
        self.dtype = emb_w.dtype if emb_w.dtype.is_floating_point else torch.float32
        self.device = emb_w.device
        ctx = BuildContext(model, tp, self.dtype, self.device)
        with torch.no_grad():
            parts = builder_for(model)(model, ctx)
            # Before the Vocab reads them: weights this stage never uses are released, so nothing keeps them.
            self.released = release_unused_vocab(model, self.first, self.last)
            self.vocab = Vocab(model, tp, self.dtype, final_softcap=parts.final_softcap,
                               int8_argmax=None if self.last else False) if (self.first or self.last) else None
        if len(parts.layers) != len(layers):
            raise ValueError(f"stage {self.stage}: built {len(parts.layers)} layers for the range {layers}")
        self.blocks, self.ropes = parts.layers, parts.ropes
        self.final_norm, self.final_extra, self.embed_extra = parts.final_norm, parts.final_extra, parts.embed_extra
        self.cache = SlotCache(len(self.blocks), parts.kv_heads, parts.head_dim, self.dtype, self.device)
        self.max_positions = parts.max_positions
        # The width the layers see (OPT's project_in makes it differ from the embedding's).
        self.hidden = int(getattr(model.config, "hidden_size", 0) or emb_w.shape[1])
        self.vocab_size = int(model.config.vocab_size) if self.vocab is None else self.vocab.vocab_size
        self.max_segments = max_segments
        self.prev = None if self.first else layout.rank_of(self.stage - 1, self.tp_rank)
        self.next = None if self.last else layout.rank_of(self.stage + 1, self.tp_rank)
        self.head_rank = layout.rank_of(0, self.tp_rank)  # where the last stage sends tokens
        self.tail_rank = layout.rank_of(layout.pp - 1, self.tp_rank)
        self._pending: list[Handle] = []

    # -- compute ------------------------------------------------------------------

    def reserve(self, slots: int, length: int) -> None:
        self.cache.reserve(slots, length)
        for rope in self.ropes:
            rope.ensure(length)

    @torch.inference_mode()
    def _run(self, x: torch.Tensor, slots: list[int], starts: list[int], lengths: list[int],
             last_only: bool) -> torch.Tensor:
        """This stage's layers over rows ``x``; on the last stage also the final norm (and only the
        segments' last rows with ``last_only``)."""
        batch = Batch(slots, starts, lengths, self.device)
        if self.first and self.embed_extra is not None:
            x = self.embed_extra(x, batch.positions)
        for i, layer in enumerate(self.blocks):
            x = layer(x, batch, self.cache.k[i], self.cache.v[i])
        if not self.last:
            return x
        if last_only and batch.rows != len(lengths):
            x = x[[o + n - 1 for o, n in zip(batch.offsets, batch.lengths)]]
        x = self.final_norm(x)
        return x if self.final_extra is None else self.final_extra(x)

    # -- messages -----------------------------------------------------------------

    def _header(self, kind: int, slots: Sequence[int] = (), starts: Sequence[int] = (),
                lengths: Sequence[int] = (), last_only: bool = True) -> torch.Tensor:
        n = len(slots)
        if n > self.max_segments:
            raise ValueError(f"{n} segments in one forward, more than the pipeline's max_segments={self.max_segments}")
        h = torch.zeros(4 + 3 * self.max_segments, dtype=torch.int64)
        h[:4] = torch.tensor([kind, n, sum(lengths), int(last_only)])
        m = self.max_segments
        h[4:4 + n] = torch.tensor(list(slots), dtype=torch.int64)
        h[4 + m:4 + m + n] = torch.tensor(list(starts), dtype=torch.int64)
        h[4 + 2 * m:4 + 2 * m + n] = torch.tensor(list(lengths), dtype=torch.int64)
        return h

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        # Non-blocking, so a stage goes on with its next micro-batch; the handles are finished later.
        self._pending.append(self.p2p.isend(tensor, dst))
        if len(self._pending) > 64:
            for h in self._pending[:32]:
                h.wait()
            del self._pending[:32]

    def _flush(self) -> None:
        for h in self._pending:
            h.wait()
        self._pending.clear()

    def _send_forward(self, kind: int, x: torch.Tensor, slots: list[int], starts: list[int], lengths: list[int],
                      last_only: bool) -> None:
        self._send(self._header(kind, slots, starts, lengths, last_only), self.next)
        self._send(x.contiguous(), self.next)

    def _post_header(self) -> tuple[torch.Tensor, Handle]:
        """Post the receive of the next header early, so its transfer overlaps this stage's compute."""
        h = torch.empty(4 + 3 * self.max_segments, dtype=torch.int64)
        return h, self.p2p.irecv(h, self.prev)

    def _recv_forward(self, posted: tuple[torch.Tensor, Handle]
                      ) -> tuple[int, torch.Tensor | None, list[int], list[int], list[int], bool]:
        h, handle = posted
        handle.wait()
        kind, n, rows, last_only = (int(v) for v in h[:4])
        if kind == STOP:
            return kind, None, [], [], [], True
        m = self.max_segments
        slots, starts, lengths = h[4:4 + n].tolist(), h[4 + m:4 + m + n].tolist(), h[4 + 2 * m:4 + 2 * m + n].tolist()
        x = self.p2p.recv(torch.empty(rows, self.hidden, dtype=self.dtype, device=self.device), self.prev)
        return kind, x, slots, starts, lengths, bool(last_only)

    def _serve(self) -> torch.Tensor | None:
        """Stages after the first: run what arrives until STOP; the last stage sends tokens back
        (TOKENS) or keeps the full logits (LOGITS, returned)."""
        logits = None
        posted = self._post_header()
        while True:
            kind, x, slots, starts, lengths, last_only = self._recv_forward(posted)
            if kind == STOP:
                if not self.last:
                    self._send(self._header(STOP), self.next)
                self._flush()
                return logits
            posted = self._post_header()
            y = self._run(x, slots, starts, lengths, last_only)
            if not self.last:
                self._send_forward(kind, y, slots, starts, lengths, last_only)
            elif kind == TOKENS:
                self._send(torch.tensor(self.vocab.argmax(y)[0], dtype=torch.int64), self.head_rank)
            else:
                logits = self.vocab.full_logits(y)

    def _forward_first(self, kind: int, ids: list[torch.Tensor], slots: list[int], starts: list[int],
                       last_only: bool = True) -> list[int] | torch.Tensor | None:
        """First stage: embed and run one micro-batch, then pass it on (or, with one stage, finish it)."""
        lengths = [int(t.numel()) for t in ids]
        x = self.vocab.embed(torch.cat(ids).to(self.device))
        y = self._run(x, slots, starts, lengths, last_only)
        if not self.last:
            self._send_forward(kind, y, slots, starts, lengths, last_only)
            return None
        return self.vocab.argmax(y)[0] if kind == TOKENS else self.vocab.full_logits(y)

    def _post_tokens(self, n: int) -> tuple[torch.Tensor, Handle]:
        """Post the receive of a micro-batch's tokens as soon as it is sent (they come back in order)."""
        t = torch.empty(n, dtype=torch.int64)
        return t, self.p2p.irecv(t, self.tail_rank)

    def _stop(self) -> None:
        if not self.last:
            self._send(self._header(STOP), self.next)
        self._flush()

    # -- entry points (every rank of the world calls them alike) --------------------

    @torch.inference_mode()
    def prefill_logits(self, prompt: Sequence[int]) -> torch.Tensor:
        """Float32 logits (T, V) of every position of one prompt, the same on every rank."""
        ids = torch.as_tensor(list(prompt), dtype=torch.long)
        self.reserve(1, ids.numel())
        logits = None
        if self.first:
            logits = self._forward_first(LOGITS, [ids], [0], [0], last_only=False)
            self._stop()
        else:
            logits = self._serve()
        if logits is None:
            logits = torch.empty(ids.numel(), self.vocab_size, dtype=torch.float32, device=self.device)
        return self.world.broadcast_(logits, src=self.layout.rank_of(self.layout.pp - 1, 0))

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_token_ids: Sequence[int] = (), micro_batches: int | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """Greedy tokens for each prompt (each as if decoded alone), the same list on every rank.

        ``micro_batches`` (default: ``min(len(prompts), pp)``): the sequences
        are dealt round-robin into that many groups that move through the
        stages one after another, so different stages work on different groups.
        ``on_token(sequence, token)`` is called on the first stage as each token arrives.
        """
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ValueError("pipeline generate: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        for p in prompts:
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"pipeline generate: token ids {bad[:5]} are outside the vocabulary of {self.vocab_size}")
        m = micro_batches or min(len(prompts), self.layout.pp)
        if not 1 <= m <= len(prompts):
            raise ValueError(f"micro_batches must be between 1 and {len(prompts)}, got {m}")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if self.max_positions is not None and longest > self.max_positions:
            raise ValueError(f"prompt plus max_new_tokens ({longest}) exceeds the model's {self.max_positions} positions")
        # Ranks fed different prompts would wait on each other's messages forever: compare first.
        lengths = torch.tensor([len(p) for p in prompts] + [max_new_tokens, m], dtype=torch.int64)
        check_same_tokens(torch.cat([lengths, torch.tensor([t for p in prompts for t in p])]).to(self.device),
                          self.world, "pipeline generate")
        self.reserve(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        out: list[list[int]] = [[] for _ in prompts]
        if self.first:
            self._schedule(prompts, max_new_tokens, set(eos_token_ids), m, out, on_token)
        else:
            self._serve()
        return self._share(out, max_new_tokens)

    def _schedule(self, prompts: list[list[int]], max_new: int, eos: set[int], m: int, out: list[list[int]],
                  on_token: Callable[[int, int], None] | None) -> None:
        """First stage: prefill every micro-batch, then feed each group its next tokens as they come back."""
        in_flight: deque[tuple[list[int], tuple[torch.Tensor, Handle]]] = deque()  # sent groups, oldest first
        ready: deque[tuple[list[int], list[int]]] = deque()  # (group, tokens) done here (one stage)

        def send(members: list[int], prefill: bool) -> None:
            if prefill:
                ids = [torch.tensor(prompts[i]) for i in members]
                starts = [0] * len(members)
            else:
                ids = [torch.tensor([out[i][-1]]) for i in members]
                starts = [len(prompts[i]) + len(out[i]) - 1 for i in members]
            got = self._forward_first(TOKENS, ids, members, starts)
            if got is None:
                in_flight.append((members, self._post_tokens(len(members))))
            else:
                ready.append((members, got))

        for g in range(m):
            send(list(range(g, len(prompts), m)), prefill=True)
        while in_flight or ready:
            if ready:
                members, tokens = ready.popleft()
            else:
                members, (buf, handle) = in_flight.popleft()
                handle.wait()
                tokens = buf.tolist()
            live = []
            for i, t in zip(members, tokens):
                out[i].append(t)
                if on_token is not None:
                    on_token(i, t)
                if len(out[i]) < max_new and t not in eos:
                    live.append(i)
            if live:
                send(live, prefill=False)
        self._stop()

    def _share(self, out: list[list[int]], max_new: int) -> list[list[int]]:
        """The first stage's tokens, broadcast to every rank (padded with -1)."""
        table = torch.full((len(out), max_new), -1, dtype=torch.int64)
        for i, toks in enumerate(out):
            table[i, :len(toks)] = torch.tensor(toks, dtype=torch.int64)
        table = self.world.broadcast_(table.to(self.device), src=self.layout.rank_of(0, 0)).cpu()
        return [[t for t in row if t >= 0] for row in table.tolist()]

    def generate_ids(self, input_ids: torch.Tensor, *, max_new_tokens: int | None = None, do_sample: bool = False,
                     eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                     attention_mask: torch.Tensor | None = None, micro_batches: int | None = None,
                     streamer: Any = None, **unsupported: Any) -> torch.Tensor:
        """``model.generate``'s layout on a pipeline: (B, T) left-padded ids in, prompt + new tokens out.

        Greedy only; settings not given come from the model's ``generation_config``.
        Anything else is refused with its name rather than ignored.
        """
        unsupported = {k: v for k, v in unsupported.items() if v is not None}
        if do_sample or unsupported:
            what = ["do_sample=True"] if do_sample else []
            raise ValueError(f"pipeline generate decodes greedily and does not take: {', '.join(what + sorted(unsupported))}")
        gen = getattr(self.model, "generation_config", None)
        if max_new_tokens is None:
            max_new_tokens = getattr(gen, "max_new_tokens", None)
        if max_new_tokens is None:
            raise ValueError("pipeline generate needs max_new_tokens")
        if eos_token_id is None:
            eos_token_id = getattr(gen, "eos_token_id", None)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if pad_token_id is None:
            pad_token_id = getattr(gen, "pad_token_id", None)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]  # left padding removed
        on_token = None
        if streamer is not None:
            if len(prompts) != 1:
                raise ValueError("pipeline generate streams one sequence only")
            streamer.put(torch.tensor(prompts[0]))  # HF's streamers take the prompt first
            on_token = lambda i, t: streamer.put(torch.tensor([t]))  # noqa: E731
        new = self.generate(prompts, int(max_new_tokens), eos, micro_batches, on_token)
        if streamer is not None:
            streamer.end()
        width = max(len(t) for t in new)
        rows = [t + [pad] * (width - len(t)) for t in new]
        return torch.cat([ids, torch.tensor(rows, dtype=ids.dtype, device=ids.device)], dim=1)
