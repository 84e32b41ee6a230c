"""The runtime's building blocks: attention, MLPs, MoE, and the layer that wires them.

Each block holds this rank's weights (already sharded by ``parallelize``)
and returns a *partial sum* where the unsharded model has a row-parallel
projection; the :class:`Layer` all-reduces once per partial sum (twice per
layer, or once for parallel blocks) and adds the replicated biases after the
reduction, as the parallel layers do.

A batch is a set of segments (one per sequence): a slot in the KV cache, a
start position and a length. Rows of the hidden-state matrix are the
segments' tokens, concatenated. Single-token segments (decode) are attended
in one batched computation; longer ones (prefill chunks, speculative
verification) one segment at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .matmul import Matmul
from .norms import Norm
from .rope import RopeTable, apply_rope

__all__ = ["Batch", "Attention", "GatedMLP", "PlainMLP", "MoE", "Layer"]

_NEG_INF = float("-inf")


class Batch:
    """Rows of one forward: segments (slot, start, length) in row order.

    What the layers need (positions, per-row slots, the decode rows, masks,
    rotary rows) is computed once per forward and shared by all layers.
    """

    def __init__(self, slots: list[int], starts: list[int], lengths: list[int], device: torch.device):
        self.slots, self.starts, self.lengths, self.device = slots, starts, lengths, device
        self.single = len(slots) == 1
        if self.single:
            self.offsets = [0]
            self.rows = lengths[0]
            self.positions = torch.arange(starts[0], starts[0] + lengths[0], device=device)
        else:
            self.offsets, off = [], 0
            for n in lengths:
                self.offsets.append(off)
                off += n
            self.rows = off
            self.positions = torch.cat([torch.arange(p, p + n) for p, n in zip(starts, lengths)]).to(device)
            self.row_slots = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in zip(slots, lengths)]).to(device)
        self.decode = [i for i, n in enumerate(lengths) if n == 1]
        self.extend = [i for i, n in enumerate(lengths) if n != 1]
        if self.decode and not self.single:
            self.decode_rows = torch.tensor([self.offsets[i] for i in self.decode], device=device)
            dslots = [slots[i] for i in self.decode]
            self.decode_slots = torch.tensor(dslots, device=device)
            contiguous = dslots == list(range(dslots[0], dslots[0] + len(dslots)))
            self.decode_slot_range = (dslots[0], dslots[0] + len(dslots)) if contiguous else None
            self.decode_ends = torch.tensor([starts[i] + 1 for i in self.decode], device=device)
        self.masks: dict = {}  # per (window, segment) attention masks
        self._rope: dict = {}  # per rotary table: its (cos, sin) rows

    def rope_rows(self, table: RopeTable) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rope.get(id(table))
        if rows is None:
            rows = self._rope[id(table)] = table.rows(self.positions)
        return rows

    def write(self, cache: torch.Tensor, values: torch.Tensor) -> None:
        """Store rows' keys or values (T, kv_heads, hd) at their slots and positions."""
        if self.single:
            p = self.starts[0]
            cache[self.slots[0], :, p : p + self.rows] = values.transpose(0, 1)
        else:
            cache[self.row_slots, :, self.positions] = values


@dataclass
class Attention:
    """Multi-head attention over this rank's heads: GQA/MQA, fused q/k/v, and the variants the specs describe.

    ``layout``: "concat" ([Q | K | V] rows) or "grouped" (per KV head
    [its Q heads | K | V], read in place without reordering the weight).
    """

    mm_qkv: Matmul
    n_q: int
    n_kv: int
    head_dim: int
    scaling: float
    mm_o: Matmul
    layout: str = "concat"
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    rope: RopeTable | None = None
    softcap: float | None = None
    window: int | None = None
    alibi: torch.Tensor | None = None  # (n_q,) float32 slopes of this rank's heads
    upcast: bool = False  # scores from float32 q and k (GPT-J's eager attention)
    # q/k norms over all heads at once (Olmo 2): (flat q (T, n_q*hd), flat k (T, n_kv*hd)) -> normed
    # (q, k); at TP > 1 it all-reduces the per-token sums of squares (``norms.SpanQKNorm``).
    qk_norm: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.n_kv < 1 or self.n_q % self.n_kv:
            raise ValueError(f"{self.n_q} query heads cannot share {self.n_kv} KV heads evenly")
        self.group = self.n_q // self.n_kv
        self.plain = self.softcap is None and self.alibi is None and not self.upcast

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, hd, nq, nkv = qkv.shape[0], self.head_dim, self.n_q, self.n_kv
        if self.layout == "concat":
            q = qkv[:, : nq * hd].view(T, nq, hd)
            k = qkv[:, nq * hd : (nq + nkv) * hd].view(T, nkv, hd)
            v = qkv[:, (nq + nkv) * hd :].view(T, nkv, hd)
        else:
            t = qkv.view(T, nkv, self.group + 2, hd)
            q = t[:, :, : self.group].reshape(T, nq, hd)
            k, v = t[:, :, self.group], t[:, :, self.group + 1]
        return q, k, v

    def __call__(self, h: torch.Tensor, batch: Batch, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """Partial output projection (T, hidden) of this rank's heads; writes K/V into the cache."""
        qkv = self.mm_qkv(h)
        q, k, v = self.split(qkv)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.qk_norm is not None:
            T = q.shape[0]
            qn, kn = self.qk_norm(q.reshape(T, -1), k.reshape(T, -1))
            q, k = qn.view(T, self.n_q, self.head_dim), kn.view(T, self.n_kv, self.head_dim)
        if self.rope is not None:
            cos, sin = batch.rope_rows(self.rope)
            if cos.dtype != q.dtype:
                # A float32 table with 16-bit q/k (Olmo 2's rotary): rotate in float32, cast back, as HF does.
                q = apply_rope(q.float(), cos, sin, self.rope.style).to(v.dtype)
                k = apply_rope(k.float(), cos, sin, self.rope.style).to(v.dtype)
            elif self.layout == "concat" and self.q_norm is None and self.qk_norm is None:
                # q and k heads are adjacent: rotate them at once
                nq = self.n_q
                qk = apply_rope(qkv[:, : (nq + self.n_kv) * self.head_dim].view(qkv.shape[0], nq + self.n_kv, -1),
                                cos, sin, self.rope.style)
                q, k = qk[:, :nq], qk[:, nq:]
            else:
                q = apply_rope(q, cos, sin, self.rope.style)
                k = apply_rope(k, cos, sin, self.rope.style)
        batch.write(kc, k)
        batch.write(vc, v)
        if batch.single and batch.decode:
            a = self._decode_one(q, kc[batch.slots[0]], vc[batch.slots[0]], batch.starts[0] + 1)
        elif not batch.extend:  # every row decodes one token, rows in segment order
            a = self._decode_many(q, kc, vc, batch)
        else:
            a = torch.empty(q.shape[0], self.n_q * self.head_dim, dtype=q.dtype, device=q.device)
            if batch.decode:
                rows = batch.decode_rows
                a[rows] = self._decode_many(q[rows], kc, vc, batch)
            for i in batch.extend:
                r0, n = batch.offsets[i], batch.lengths[i]
                a[r0 : r0 + n] = self._extend(q[r0 : r0 + n], kc[batch.slots[i]], vc[batch.slots[i]], batch.starts[i], batch, i)
        return self.mm_o(a)

    # -- the three shapes of attention ------------------------------------------

    def _decode_one(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, end: int) -> torch.Tensor:
        """One new token against its own slot: per KV head, its query heads against its keys."""
        start = 0 if self.window is None else max(0, end - self.window)
        k, v = kc[:, start:end], vc[:, start:end]
        nkv, g, hd = self.n_kv, self.group, self.head_dim
        if self.plain and q.dtype != torch.float32:  # 16-bit: SDPA accumulates in float32, as HF's attention does
            a = F.scaled_dot_product_attention(q.view(1, nkv, g, hd), k[None], v[None], scale=self.scaling)
            return a.reshape(1, self.n_q * hd)
        s = torch.bmm(self._up(q).view(nkv, g, hd), self._up(k).transpose(1, 2)).mul_(self.scaling)
        if not self.plain:
            s = self._adjust(s, torch.arange(start, end, device=q.device), 1)
        if s.dtype == torch.float32 and v.dtype == torch.float32:
            return torch.bmm(torch.softmax(s, dim=-1), v).view(1, self.n_q * hd)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.bmm(p, v).reshape(1, self.n_q * hd)

    def _decode_many(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Many single-token segments in one padded computation over their slots."""
        ends = batch.decode_ends
        L = int(ends.max())
        B, nkv, g, hd = q.shape[0], self.n_kv, self.group, self.head_dim
        if batch.decode_slot_range is not None:  # slots a..a+B-1 in order (the usual case): views, no copy
            a0, a1 = batch.decode_slot_range
            K, V = kc[a0:a1, :, :L], vc[a0:a1, :, :L]
        else:
            K = kc[batch.decode_slots, :, :L]  # (B, nkv, L, hd)
            V = vc[batch.decode_slots, :, :L]
        s = torch.matmul(self._up(q).view(B, nkv, g, hd), self._up(K).transpose(-1, -2)).mul_(self.scaling)
        j = torch.arange(L, device=q.device)
        s = self._adjust(s, j, 1)
        allowed = j[None, :] < ends[:, None]
        if self.window is not None:
            allowed &= j[None, :] >= (ends - self.window)[:, None]
        s = s.masked_fill(~allowed[:, None, None, :], _NEG_INF)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(V.dtype)
        return torch.matmul(p, V).reshape(B, self.n_q * hd)

    def _extend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, start: int, batch: Batch, seg: int):
        """A run of S tokens at positions [start, start + S) over the slot's cached prefix."""
        S = q.shape[0]
        end = start + S
        k, v = kc[:, :end], vc[:, :end]
        key = (self.window, seg)
        allowed = batch.masks.get(key)
        if allowed is None and not (start == 0 and (self.window is None or self.window >= S)):
            i = torch.arange(start, end, device=q.device)
            d = i[:, None] - torch.arange(end, device=q.device)[None, :]  # query pos - key pos
            allowed = d >= 0
            if self.window is not None:
                allowed &= d < self.window
            batch.masks[key] = allowed
        qh = q.transpose(0, 1)  # (nq, S, hd)
        if self.plain:
            if self.group > 1:
                k = k.repeat_interleave(self.group, dim=0)
                v = v.repeat_interleave(self.group, dim=0)
            if allowed is None:
                a = F.scaled_dot_product_attention(qh[None], k[None], v[None], is_causal=True, scale=self.scaling)
            else:
                a = F.scaled_dot_product_attention(qh[None], k[None], v[None], attn_mask=allowed, scale=self.scaling)
            return a[0].transpose(0, 1).reshape(S, self.n_q * self.head_dim)
        nkv, g, hd = self.n_kv, self.group, self.head_dim
        s = torch.matmul(self._up(qh).reshape(nkv, g * S, hd), self._up(k).transpose(1, 2))
        s = s.view(nkv, g, S, end).mul_(self.scaling)
        s = self._adjust(s, torch.arange(end, device=q.device), 2)
        if allowed is None:
            i = torch.arange(S, device=q.device)
            allowed = i[:, None] >= torch.arange(end, device=q.device)[None, :]
        s = s.masked_fill(~allowed, _NEG_INF)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
        a = torch.matmul(p.view(nkv, g * S, end), v).view(self.n_q, S, hd)
        return a.transpose(0, 1).reshape(S, self.n_q * hd)

    def _up(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() if self.upcast else t

    def _adjust(self, s: torch.Tensor, key_pos: torch.Tensor, trailing: int) -> torch.Tensor:
        """Soft-capping and ALiBi on scaled scores (..., nkv, g, <trailing dims>), in HF's order.

        ALiBi adds slope * key position; softmax is shift-invariant, so this
        equals the relative form (key - query) per row.
        """
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.alibi is not None:
            slopes = self.alibi.view(self.n_kv, self.group, *([1] * trailing))
            s = s + slopes * key_pos.to(slopes.dtype)
        return s


@dataclass
class GatedMLP:
    """``down(act(gate(h)) * up(h))`` with gate and up fused into one matmul ([gate | up] columns)."""

    mm_gate_up: Matmul
    act: Callable[[torch.Tensor], torch.Tensor]
    mm_down: Matmul

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        gu = self.mm_gate_up(h)
        inter = gu.shape[-1] // 2
        return self.mm_down(self.act(gu[..., :inter]) * gu[..., inter:])


@dataclass
class PlainMLP:
    """``down(act(up(h)))`` (GPT-2, GPT-NeoX, Falcon, GPT-J, BLOOM, OPT)."""

    mm_up: Matmul
    act: Callable[[torch.Tensor], torch.Tensor]
    mm_down: Matmul

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.mm_down(self.act(self.mm_up(h)))


@dataclass
class MoE:
    """Top-k routed experts, each split along its intermediate dimension; a partial sum.

    The router is replicated (full hidden in, all experts out). ``gate_up``
    (E, 2 I_local, H) holds [gate | up] per expert, ``down`` (E, H, I_local).
    ``shared`` (an MLP, also split) is scaled by ``sigmoid(shared_gate(h))``
    (Qwen2-MoE) or added as is. ``float_weights``: the routing weights stay
    float32 and scale each expert's output before its cast (Mixtral);
    otherwise they are cast to the model dtype first (Qwen2-MoE).
    """

    router: Matmul
    top_k: int
    normalize: bool
    gate_up: torch.Tensor
    down: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    softmax_first: bool = True
    shared: Callable[[torch.Tensor], torch.Tensor] | None = None
    shared_gate: Matmul | None = None
    float_weights: bool = False

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.router(h)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float_weights:
            weights = weights.to(h.dtype)
        # Each (token, slot)'s weighted output, summed over the slots in one reduction and
        # cast once: transformers' default (grouped_mm) experts order.
        per = torch.zeros(
            h.shape[0], self.top_k, self.down.shape[1], dtype=torch.promote_types(h.dtype, weights.dtype), device=h.device
        )
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            x = h[token]
            gu = F.linear(x, self.gate_up[e])
            inter = gu.shape[-1] // 2
            y = F.linear(self.act(gu[..., :inter]) * gu[..., inter:], self.down[e])
            per[token, slot] = y * weights[token, slot, None]
        out = per.sum(dim=1).to(h.dtype)
        if self.shared is not None:
            s = self.shared(h)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(h)) * s
            out = out + s
        return out


@dataclass
class Layer:
    """One decoder layer: norms, attention, MLP, residual wiring, and its all-reduces.

    * sequential (Llama): x += attn(n1(x)); x += mlp(n2(x))
    * ``post_attn_norm`` / ``post_mlp_norm`` (Gemma 2/3): the block's output is
      normed (after the all-reduce) before it joins the residual
    * ``parallel`` (GPT-J, GPT-NeoX, Falcon): x += attn(n1(x)) + mlp(n2(x) or
      n1(x)), with ONE all-reduce of the two partial sums

    A partial plan keeps a block whole on every rank (``attn_sharded`` /
    ``mlp_sharded`` False): its output is already complete and is not reduced.
    """

    attn_norm: Norm
    attention: Attention
    mlp: Callable[[torch.Tensor], torch.Tensor]
    mlp_norm: Norm | None = None
    post_attn_norm: Norm | None = None
    post_mlp_norm: Norm | None = None
    attn_bias: torch.Tensor | None = None
    mlp_bias: torch.Tensor | None = None
    parallel: bool = False
    reduce: Callable[[torch.Tensor], object] | None = None  # in-place all-reduce (None at TP=1)
    attn_sharded: bool = True
    mlp_sharded: bool = True

    def __post_init__(self) -> None:
        self._attn_reduce = self.reduce if self.attn_sharded else None
        self._mlp_reduce = self.reduce if self.mlp_sharded else None

    def __call__(self, x: torch.Tensor, batch: Batch, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        if self.parallel:
            out = self.attention(h, batch, kc, vc)
            m = self.mlp(self.mlp_norm(x) if self.mlp_norm is not None else h)
            if self._attn_reduce is not None and self._mlp_reduce is not None:
                out = out + m
                self.reduce(out)  # one all-reduce for both partial sums
            else:
                for part, reduce in ((out, self._attn_reduce), (m, self._mlp_reduce)):
                    if reduce is not None:
                        reduce(part)
                out = out + m
            if self.attn_bias is not None:
                out = out + self.attn_bias
            if self.mlp_bias is not None:
                out = out + self.mlp_bias
            return x + out
        o = self.attention(h, batch, kc, vc)
        if self._attn_reduce is not None:
            self._attn_reduce(o)
        if self.attn_bias is not None:
            o = o + self.attn_bias
        if self.post_attn_norm is not None:
            o = self.post_attn_norm(o)
        x = x + o
        d = self.mlp(self.mlp_norm(x))
        if self._mlp_reduce is not None:
            self._mlp_reduce(d)
        if self.mlp_bias is not None:
            d = d + self.mlp_bias
        if self.post_mlp_norm is not None:
            d = self.post_mlp_norm(d)
        return x + d
