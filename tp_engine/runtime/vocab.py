"""The vocabulary ends of the model on one rank: embedding lookup and LM head.

Both are split by vocabulary rows across ranks. What this module makes cheap:

* Greedy decoding never gathers logits. Each rank takes the max and argmax
  of its shard per row, and ranks exchange (max, index, embedding row of
  that index) in one small all-gather. The winner (ties: lowest global
  index, like ``torch.argmax`` on full logits) is the next token *and* its
  embedding, so the next step needs no embedding all-reduce either.
* The greedy argmax reads an int8 copy of the LM-head shard (a quarter of
  the bytes of float32; per-row bf16 scales) for approximate logits, then
  computes exact logits only for the rows a rigorous error bound cannot rule
  out (Cauchy-Schwarz on the quantization error, plus bf16 input/output and
  float32 accumulation rounding). The result is the argmax of the model's
  own logits; when the bound leaves too many rows it falls back to the full
  head.
* Top-k sampling gathers only each shard's top-k candidates.
* GGUF models kept quantized (``quant.gguf``): the embedding lookup (and
  the row the greedy exchange carries) dequantizes just the rows it reads,
  and the LM head runs on its blocks. The int8 prefilter is off for them:
  a Q6_K/Q8_0 head already reads about a byte per weight or less, so an
  int8 copy would cost memory and save nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..comm.base import Communicator
from ..quant.gguf import GGUFEmbedding
from ..quant.layer import is_quantized
from .matmul import linear_weight, module_bias, module_matmul

__all__ = ["Vocab"]


class Vocab:
    """Embedding and LM-head shards of ``model`` on this rank.

    The int8 prefilter pays for a few rows only: torch's int8 kernel costs
    about as much per row as MKL's float32 matmul does for many rows
    (49152 x 1024 head, one thread: 1 row 10 vs 16 ms, 16 rows 49 vs 57 ms,
    64 rows 199 vs 70 ms), so above ``Q8_MAX_ROWS`` rows it reads the float head.

    ``weight_bits``: the head becomes a quantized copy (a draft); ``int8_argmax``:
    the greedy prefilter (None: on for CPU shards of >= 4096 rows when the
    kernel passes a self-check). ``final_softcap``: Gemma-2's
    ``tanh(logits / c) * c``.
    """

    Q8_MAX_ROWS = 8

    def __init__(
        self,
        model: nn.Module,
        comm: Communicator,
        dtype: torch.dtype,
        weight_bits: int | None = None,
        group_size: int | None = None,
        backend: str = "auto",
        int8_argmax: bool | None = None,
        final_softcap: float | None = None,
    ):
        self.comm, self.world, self.dtype = comm, comm.world_size, dtype
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError("the model has no output embeddings (LM head)")
        if isinstance(emb, GGUFEmbedding):
            self.emb_w = None
            self._gguf_emb = emb.gguf
        else:
            self.emb_w = emb.weight.detach()
            self._gguf_emb = None
        self.device = emb.weight.device
        self.hidden = int(emb.weight.shape[1])
        self.emb_start = int(getattr(emb, "start", 0))
        self.emb_stop = self.emb_start + int(emb.weight.shape[0])
        scale = getattr(emb, "embed_scale", None)
        self.emb_scale = scale.detach().to(dtype) if isinstance(scale, torch.Tensor) else None
        self.head_w = linear_weight(head) if weight_bits is None and not is_quantized(head) else None
        self.head_b = module_bias(head)
        self._head_mm = module_matmul(head, weight_bits, group_size, backend)
        self.head_start = int(getattr(head, "start", 0))
        rows = int(getattr(head, "out_features", None) or head.weight.shape[0])
        sizes = getattr(head, "vocab_sizes", None)
        self.vocab_sizes = tuple(sizes) if sizes is not None else (rows,)
        if self.world > 1 and len(self.vocab_sizes) != self.world:
            raise ValueError("lm_head shards do not match the communicator's world size")
        self.vocab_size = sum(self.vocab_sizes)
        self.sharded = self.world > 1 and len(self.vocab_sizes) > 1
        self.emb_sharded = self.world > 1 and not (self.emb_start == 0 and self.emb_stop == self.vocab_size)
        # The greedy exchange carries the embedding row of the local winner:
        # only valid when embedding and lm_head hold the same vocab slice.
        self.same_slices = (self.emb_start, self.emb_stop) == (self.head_start, self.head_start + rows)
        self.payload_dtype = torch.float32 if self.vocab_size < (1 << 24) else torch.float64
        self.final_softcap = final_softcap
        if weight_bits is not None or final_softcap is not None or self.head_w is None:
            int8_argmax = False
        self._build_q8(int8_argmax)

    # -- embedding -------------------------------------------------------------

    def _emb_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Rows ``local`` (local indices, 1-D) of this rank's embedding shard, in the model's dtype."""
        if self._gguf_emb is not None:
            return self._gguf_emb.rows(local).to(self.dtype)
        return F.embedding(local, self.emb_w)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (T, H) of token ids (T,), summed over vocabulary shards."""
        if not self.emb_sharded:
            x = self._emb_rows(ids)
        else:
            outside = (ids < self.emb_start) | (ids >= self.emb_stop)
            local = (ids - self.emb_start).masked_fill_(outside, 0)
            x = self._emb_rows(local).masked_fill_(outside.unsqueeze(-1), 0.0)
            self.comm.all_reduce_(x)
        if self.emb_scale is not None:
            x = x * self.emb_scale
        return x

    # -- logits ----------------------------------------------------------------

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary-shard logits (B, V_local) of final hidden states (B, H)."""
        logits = self._head_mm(h)
        if self.head_b is not None:
            logits = logits + self.head_b
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits (B, V), the same on every rank."""
        logits = self.local_logits(h).float()
        if self.sharded:
            logits = self.comm.all_gather(logits, dim=-1, sizes=self.vocab_sizes)
        return logits

    def argmax(self, h: torch.Tensor, with_embedding: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """Global greedy tokens for rows of ``h`` (B, H), and (optionally) their embeddings (B, H).

        Ties go to the lowest vocabulary index. Sharded: one all-gather of
        (max, index[, embedding row]) per row and rank. The embedding comes
        back only when the exchange can carry it (else None: embed the tokens).
        """
        val, idx = self._local_best(h)
        if not self.sharded:
            return idx.tolist(), None
        pd = self.payload_dtype
        carry = with_embedding and self.same_slices
        parts = [val.to(pd)[:, None], (idx + self.head_start).to(pd)[:, None]]
        if carry:
            parts.append(self._emb_rows(idx).to(pd))
        table = self.comm.all_gather(torch.cat(parts, dim=1)[None], dim=0)  # (world, B, 2 [+ H])
        winner = table[:, :, 0].argmax(0)  # first maximal rank = lowest vocab index
        rows = torch.arange(h.shape[0], device=table.device)
        picked = table[winner, rows]  # (B, 2 [+ H])
        tokens = picked[:, 1].long().tolist()
        if not carry:
            return tokens, None
        x = picked[:, 2:].to(self.dtype)
        if self.emb_scale is not None:
            x = x * self.emb_scale
        return tokens, x

    def top_k(self, local: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global top-k (values, vocab ids) of each row, from per-shard top-k; sorted by vocab id.

        ``local``: this rank's shard logits (B, V_local), float32.
        """
        kk = min(k, local.shape[-1])
        vals, idx = local.topk(kk, dim=-1)
        idx = idx + self.head_start
        if self.sharded:
            pad = k - kk
            if pad:
                vals = torch.cat([vals, vals.new_full((vals.shape[0], pad), float("-inf"))], dim=1)
                idx = torch.cat([idx, idx.new_zeros(idx.shape[0], pad)], dim=1)
            pd = torch.float64  # exact for any vocab id
            table = self.comm.all_gather(torch.stack([vals.to(pd), idx.to(pd)])[None], dim=0)  # (world, 2, B, k)
            vals = table[:, 0].permute(1, 0, 2).reshape(local.shape[0], -1).float()
            idx = table[:, 1].permute(1, 0, 2).reshape(local.shape[0], -1).long()
            top = vals.topk(k, dim=-1).indices
            vals, idx = vals.gather(1, top), idx.gather(1, top)
        order = idx.argsort(dim=-1)
        return vals.gather(1, order), idx.gather(1, order)

    # -- the int8 greedy prefilter ----------------------------------------------

    def _local_best(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max logit, its local index) per row over this rank's vocab shard."""
        if self._q8 is not None and h.shape[0] <= self.Q8_MAX_ROWS:
            best = self._q8_best(h)
            if best is not None:
                return best
        return self.local_logits(h).max(-1)

    def _build_q8(self, enabled: bool | None) -> None:
        """An int8 copy of the local LM head (per-row bf16 scales) for the greedy prefilter."""
        self._q8 = None
        self._q8_calls = self._q8_fallbacks = 0
        W = self.head_w
        if enabled is False or W is None or W.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return
        if enabled is None and W.shape[0] < 4096:
            return
        if self.hidden % 16:  # torch's _weight_int8pack_mm crashes (SIGSEGV) on widths that are not multiples of 16
            return
        with torch.no_grad():
            rows = W.shape[0]
            q = torch.empty(W.shape, dtype=torch.int8, device=W.device)
            scale = torch.empty(rows, dtype=torch.bfloat16, device=W.device)
            err = norm = w_norm = 0.0
            for a in range(0, rows, 8192):  # chunked: no full-size float temporaries
                Wf = W[a : a + 8192].float()
                sc = (Wf.abs().amax(1) / 127.0).clamp_min(1e-30).to(torch.bfloat16)
                sf = sc.float()[:, None]
                qc = torch.round(Wf / sf).clamp_(-127, 127)
                deq = qc * sf  # exact: a 7-bit integer times a bf16 scale fits float32
                q[a : a + 8192] = qc.to(torch.int8)
                scale[a : a + 8192] = sc
                err = max(err, float(torch.linalg.vector_norm(Wf - deq, dim=1).max()))
                norm = max(norm, float(torch.linalg.vector_norm(deq, dim=1).max()))
                w_norm = max(w_norm, float(torch.linalg.vector_norm(Wf, dim=1).max()))
            self._q8_err, self._q8_norm = err, norm
            self._q8_fp_err = w_norm * 2.0**-23 * (self.hidden + 4)
            self._q8_out_eps = 0.0 if W.dtype == torch.float32 else float(torch.finfo(W.dtype).eps)
            self._q8_bias = None if self.head_b is None else self.head_b.float()
            self._q8_max_candidates = max(64, rows // 16)
            # Self-check on a slice: the kernel must stay within the bound the prefilter assumes.
            n = min(rows, 4096)
            g = torch.Generator().manual_seed(0)
            exact_w = W[:n].double()
            for scale_h in (1.0, 30.0):
                h = (torch.randn(2, self.hidden, generator=g) * scale_h).to(W.dtype)
                try:
                    approx = torch.ops.aten._weight_int8pack_mm(h.to(torch.bfloat16), q[:n], scale[:n]).float()
                except (RuntimeError, NotImplementedError):
                    return
                exact = h.double() @ exact_w.t()
                bound = self._q8_bound(h, approx) / 2.0
                if bool(((approx.double() - exact).abs().amax(1) > bound.double()).any()):
                    return
            self._q8, self._q8_scale = q, scale

    def _q8_bound(self, h: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
        """Per-row bound on |int8 approx - exact logit|, with a factor-2 safety margin. h (B, H)."""
        hf = h.float()
        hb = h.to(torch.bfloat16).float()
        h_norm = torch.linalg.vector_norm(hf, dim=1)
        h_round = torch.linalg.vector_norm(hf - hb, dim=1)
        hb_norm = torch.linalg.vector_norm(hb, dim=1)
        amax = approx.abs().amax(1)
        K = self.hidden
        b = (
            self._q8_err * h_norm  # weight quantization: |h . (w - q s)| <= ||h|| ||w - q s||
            + self._q8_norm * (h_round + K * 2.0**-23 * hb_norm)  # bf16(h) rounding + fp32 accumulation
            + amax * (2.0**-8 + self._q8_out_eps)  # bf16 output of the kernel; model-dtype logits
            + self._q8_fp_err * h_norm  # fp32 accumulation in the model's own logits
        )
        return 2.0 * b + 1e-30

    def _q8_best(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact argmax of each row's local logits, reading the int8 head plus a few float rows.

        approx_r differs from the exact logit by at most B, so the true argmax
        r* satisfies approx_r* >= max(approx) - 2B. Only those candidates get
        exact logits. None (use the full head) when the bound is not finite or
        leaves too many candidates.
        """
        approx = torch.ops.aten._weight_int8pack_mm(h.to(torch.bfloat16), self._q8, self._q8_scale).float()
        if self._q8_bias is not None:
            approx += self._q8_bias
        bound = self._q8_bound(h, approx)
        self._q8_calls += 1
        if not bool(torch.isfinite(bound).all()):
            self._q8_fallbacks += 1
            return None
        keep = approx >= (approx.amax(1) - 2.0 * bound)[:, None]
        cand = keep.any(0).nonzero()[:, 0]
        if cand.numel() == 0 or cand.numel() > self._q8_max_candidates:
            self._q8_fallbacks += 1
            if self._q8_calls >= 32 and self._q8_fallbacks * 4 > self._q8_calls:
                self._q8 = None  # this model's logits defeat the bound: stop paying for the prefilter
            return None
        rows = self.head_w.index_select(0, cand)
        bias = None if self.head_b is None else self.head_b.index_select(0, cand)
        exact = F.linear(h, rows, bias)
        if h.shape[0] > 1:
            exact = exact.masked_fill(~keep[:, cand], float("-inf"))
        val, j = exact.max(-1)  # first max = lowest index (cand is ascending)
        return val, cand[j]
