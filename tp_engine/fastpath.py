"""A lean decode loop for Llama-layout models, sharded (TP=N) or not (TP=1).

Hugging Face's ``generate`` spends a large part of each decode step in
Python: module calls, mask and cache bookkeeping, logits processors. Tensor
parallelism halves the matmuls but not that overhead, so on CPU it caps the
speed-up. :class:`FastDecoder` runs the same math with as few tensor ops as
possible, reading the (already sharded) weights straight from the model:

* q/k/v and gate/up are fused into one weight each, one matmul each. The
  fused tensor *becomes* the storage of the original parameters (they are
  re-pointed at row views of it), so fusing costs no extra memory and the HF
  model still works and sees the same numbers.
* A static KV cache holding only this rank's KV heads, filled in place.
* RoPE from a cos/sin table computed once by the model's own rotary module
  (so every static ``rope_type`` HF implements gives HF's exact numbers);
  rotate-half is a flip plus a sign folded into the sin table, applied to q
  and k in one go.
* Exactly one in-place all-reduce after the attention output projection and
  one after the MLP down projection per layer.
* Greedy decoding never gathers logits: each rank takes the max and argmax
  of its vocabulary shard and ranks exchange (max, index, embedding row of
  that index) in one small all-gather. The winner (ties: lowest global index,
  like ``torch.argmax`` on the full logits) is the next token *and* its
  embedding, so the next step needs no embedding all-reduce either.
* The greedy argmax reads an int8 copy of the LM-head shard (a quarter of
  the bytes of float32; per-row bf16 scales) to get approximate logits, then
  computes exact logits only for the rows that a rigorous error bound cannot
  rule out (Cauchy-Schwarz on the quantization error, plus bf16 input/output
  and float32 accumulation rounding). The result is the argmax of the model's
  own logits; if the bound ever leaves too many rows it falls back to the full
  head. Costs an int8 copy of the head shard (``int8_argmax=False`` to skip).
* Sampling: top-k draws from the exact global top-k (gathered per-shard
  top-k candidates); otherwise full logits are gathered. Every rank draws
  from an identically seeded ``torch.Generator`` over identical data, so all
  ranks pick the same token without a broadcast.

Supported: ``model_type`` llama, mistral (sliding window), qwen2 (biases,
sliding window), qwen3 (q/k norm), gemma (offset RMSNorm, scaled embedding);
rope types default, linear, llama3, yarn; batch size 1. Anything else raises
:class:`FastPathUnsupported` (a ValueError) with the reason, so callers can
fall back to ``model.generate``; :func:`unsupported_reason` asks without
raising.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .comm.base import Communicator, SingleProcessCommunicator

__all__ = [
    "FastDecoder",
    "FastPathUnsupported",
    "fast_generate",
    "unsupported_reason",
]


class FastPathUnsupported(ValueError):
    """The model (or request) is outside what the fast path implements."""


@dataclass(frozen=True)
class _Family:
    norm_offset: bool = False  # Gemma: x_normed * (1 + w), in float32
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k, before RoPE
    sliding: str = "none"  # "config": config.sliding_window (Mistral); "module": attn.sliding_window


FAMILIES: dict[str, _Family] = {
    "llama": _Family(),
    "mistral": _Family(sliding="config"),
    "qwen2": _Family(sliding="module"),
    "qwen3": _Family(qk_norm=True, sliding="module"),
    "gemma": _Family(norm_offset=True),
}
# cos/sin depend only on the position for these (not on the sequence length).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_SOFTCAPS = ("attn_logit_softcapping", "final_logit_softcapping")


# ----------------------------------------------------------------- helpers


def _comm_of(model: nn.Module) -> Communicator | None:
    for module in model.modules():
        comm = getattr(module, "comm", None)
        if comm is not None:
            return comm
    return None


def _rope_type(model: nn.Module) -> str | None:
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return None
    rope_type = getattr(rotary, "rope_type", None)
    if rope_type is None:
        params = getattr(model.config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
    return rope_type


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`FastDecoder` cannot run ``model``, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model_type {model_type!r} is not one of {sorted(FAMILIES)}"
    for name in _SOFTCAPS:
        if getattr(config, name, None) is not None:
            return f"{name} is not implemented by the fast path"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1 is not implemented by the fast path"
    if not isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList):
        return "expected the Llama module layout (model.model.layers)"
    rope_type = _rope_type(model)
    if rope_type is None:
        return "model.model.rotary_emb not found"
    if rope_type not in ROPE_TYPES:
        return f"rope_type {rope_type!r} is not supported by the fast path (supported: {', '.join(ROPE_TYPES)})"
    weight = model.model.layers[0].self_attn.q_proj.weight
    if weight.device.type == "meta":
        return "the model's weights are on the meta device (not loaded)"
    if not weight.dtype.is_floating_point:
        return f"quantized or integer weights ({weight.dtype}) are not supported by the fast path"
    return None


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps")
    return float(eps)


def _fuse(params: Sequence[torch.Tensor], in_place: bool) -> torch.Tensor:
    """One tensor holding ``params`` stacked along dim 0.

    With ``in_place`` the parameters are re-pointed at row views of the fused
    tensor, so the model keeps working and no memory is duplicated. Params
    that already are consecutive views of one storage (a second decoder on the
    same model) are fused without a copy.
    """
    first = params[0]
    rows = sum(p.shape[0] for p in params)
    shape = (rows,) + tuple(first.shape[1:])
    adjacent, offset = True, first.storage_offset()
    for p in params:
        if (
            not p.is_contiguous()
            or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or p.storage_offset() != offset
        ):
            adjacent = False
            break
        offset += p.numel()
    if adjacent:
        return first.detach().as_strided(shape, torch.empty(shape, device="meta").stride())
    fused = torch.cat([p.detach() for p in params], dim=0)
    if in_place:
        start = 0
        for p in params:
            p.data = fused[start : start + p.shape[0]]
            start += p.shape[0]
    return fused


def _fuse_bias(linears: Sequence[nn.Module], in_place: bool) -> torch.Tensor | None:
    biases = [getattr(m, "bias", None) for m in linears]
    if all(b is None for b in biases):
        return None
    if any(b is None for b in biases):  # mixed: zeros where a projection has none
        return torch.cat(
            [b.detach() if b is not None else m.weight.new_zeros(m.weight.shape[0]) for b, m in zip(biases, linears)]
        )
    return _fuse(biases, in_place)


class _Layer:
    __slots__ = (
        "in_w", "post_w", "eps", "wqkv", "bqkv", "wo", "bo", "wgu", "bgu", "wd", "bd",
        "qk_w", "qk_eps", "window", "k_cache", "v_cache",
        "mm_qkv", "mm_o", "mm_gu", "mm_d",
    )


def _float_matmul(w: torch.Tensor, b: torch.Tensor | None):
    """``x -> x @ w.T + b``.

    On an AVX2 CPU with float32 weights: tp-engine's kernel for up to 16 rows
    (kernels/cpu_gemm.c): it reads each weight row once for all rows of x, 2x
    faster than MKL's single-row path here and about as fast for the k+1 rows
    of a speculative verification as for one, with bit-identical results
    whatever the number of rows (so verifying a block gives exactly the
    numbers of stepping through it). Else F.linear.
    """
    if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() and _cpu_gemm() is not None:
        gemm = _cpu_gemm()
        bias = None if b is None else b.float().contiguous()

        def matmul(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 2 and x.shape[0] <= 16 and x.dtype == torch.float32 and x.is_contiguous():
                return gemm.linear_f32(x, w, bias)
            return F.linear(x, w, b)

        return matmul
    return lambda x: F.linear(x, w, b)


def _cpu_gemm():
    """The AVX2 kernels module, or None (no AVX2/FMA, no compiler, or TP_ENGINE_GEMM_NO_C=1)."""
    from .kernels import cpu_gemm

    return cpu_gemm if cpu_gemm.available() else None


def _int4_group(k: int, requested: int | None) -> int | None:
    """The int4 group size for a weight with ``k`` inputs: ``requested`` (default 64) when it
    divides k, else the largest even divisor of k below it (sharding can leave odd widths),
    else None."""
    from .quantize import DEFAULT_GROUP_SIZE

    want = requested or DEFAULT_GROUP_SIZE
    if k % want == 0:
        return want
    for g in range(min(want, k) - (min(want, k) % 2), 1, -2):
        if k % g == 0:
            return g
    return None


def _quantized_matmul(qw, b: torch.Tensor | None):
    return qw if b is None else (lambda x: qw(x).add_(b))


# ----------------------------------------------------------------- decoder


class FastDecoder:
    """Prefill + decode for one (possibly tensor-parallel) HF model.

    Construct it on every rank (it does no collective). It keeps references
    to the model's weights (q/k/v and gate/up fused, see the module doc) and
    allocates its KV cache per call to :meth:`generate`. ``comm`` defaults to
    the communicator of the model's parallel layers (TP=1 for a plain model).
    ``int8_argmax``: the greedy LM-head prefilter (None: on for CPU shards of
    at least 4096 rows when the kernel is available and passes a self-check).
    ``fuse_in_place=False`` keeps the model's parameters untouched and copies
    the fused weights instead (twice the memory for q/k/v and gate/up).
    ``weight_bits`` 8 or 4 makes this decoder a quantized copy of the model
    (``tp_engine.quantize.quantize_weight`` on the fused weights and the LM
    head; the embedding stays shared): the cheap draft of speculative
    decoding. The model itself is left untouched. int4 uses groups of
    ``group_size`` inputs, smaller where a shard's width demands it, and int8
    for a matrix whose width has no even divisor (an uneven split's odd shard).
    ``weight_backend``: :func:`tp_engine.quantize.quantize_weight`'s backend.
    """

    def __init__(
        self,
        model: nn.Module,
        comm: Communicator | None = None,
        fuse_in_place: bool = True,
        int8_argmax: bool | None = None,
        weight_bits: int | None = None,
        group_size: int | None = None,
        weight_backend: str = "auto",
    ):
        reason = unsupported_reason(model)
        if reason is not None:
            raise FastPathUnsupported(f"tp-engine fast path: {reason}; use model.generate instead")
        config = model.config
        self.family = FAMILIES[config.model_type]
        self.config = config
        self.model = model
        self.comm: Communicator = comm or _comm_of(model) or SingleProcessCommunicator()
        self.rank, self.world = self.comm.rank, self.comm.world_size
        base = model.model
        first = base.layers[0].self_attn.q_proj.weight
        self.dtype, self.device = first.dtype, first.device

        attn0 = base.layers[0].self_attn
        self.head_dim = hd = int(attn0.head_dim)
        self.scaling = float(attn0.scaling)
        self.n_q = base.layers[0].self_attn.q_proj.weight.shape[0] // hd
        self.n_kv = base.layers[0].self_attn.k_proj.weight.shape[0] // hd
        if self.n_q * hd != first.shape[0] or self.n_kv < 1 or self.n_q % self.n_kv:
            raise FastPathUnsupported(
                f"tp-engine fast path: this rank holds {first.shape[0]} q rows / {self.n_kv} KV heads of dim {hd}"
            )
        self.group = self.n_q // self.n_kv
        self.hidden = int(config.hidden_size)
        self._norm_shape = (self.hidden,)
        self.weight_bits, self.group_size, self.weight_backend = weight_bits, group_size, weight_backend
        if weight_bits is not None:
            fuse_in_place = False  # a quantized copy must not re-point the float model's parameters
            int8_argmax = False  # the head itself is quantized

        with torch.no_grad():
            self.layers = [self._layer(layer, fuse_in_place) for layer in base.layers]
            self.norm_w = self._norm_weight(base.norm)
            self.norm_eps = _eps(base.norm)
            self._vocab(model)
            self._build_q8(int8_argmax)
        self._rope_len = 0
        self._cache_len = 0
        self._cos = self._sin = None

    # -- construction ----------------------------------------------------------

    def _norm_weight(self, norm: nn.Module) -> torch.Tensor:
        w = norm.weight.detach()
        return (1.0 + w.float()) if self.family.norm_offset else w

    def _layer(self, layer: nn.Module, fuse_in_place: bool) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        hd = self.head_dim
        L = _Layer()
        L.in_w = self._norm_weight(layer.input_layernorm)
        L.post_w = self._norm_weight(layer.post_attention_layernorm)
        L.eps = _eps(layer.input_layernorm)
        if _eps(layer.post_attention_layernorm) != L.eps:
            raise FastPathUnsupported("tp-engine fast path: different eps in the two layer norms")
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        if q.weight.shape[0] != self.n_q * hd or k.weight.shape[0] != self.n_kv * hd or v.weight.shape[0] != self.n_kv * hd:
            raise FastPathUnsupported("tp-engine fast path: layers hold different head counts")
        if float(attn.scaling) != self.scaling or int(getattr(attn, "num_key_value_groups", self.group)) != self.group:
            raise FastPathUnsupported("tp-engine fast path: layers differ in attention scaling or grouping")
        L.wqkv = _fuse([q.weight, k.weight, v.weight], fuse_in_place)
        L.bqkv = _fuse_bias([q, k, v], fuse_in_place)
        L.wo = o.weight.detach()
        L.bo = None if o.bias is None else o.bias.detach()
        L.wgu = _fuse([mlp.gate_proj.weight, mlp.up_proj.weight], fuse_in_place)
        L.bgu = _fuse_bias([mlp.gate_proj, mlp.up_proj], fuse_in_place)
        L.wd = mlp.down_proj.weight.detach()
        L.bd = None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach()
        L.mm_qkv, L.mm_gu = self._matmul(L.wqkv, L.bqkv), self._matmul(L.wgu, L.bgu)
        L.mm_o, L.mm_d = self._matmul(L.wo, None), self._matmul(L.wd, None)  # their bias comes after the all-reduce
        if self.weight_bits is not None:  # keep only the quantized copies
            L.wqkv = L.wo = L.wgu = L.wd = None
        if mlp.gate_proj.weight.shape != mlp.up_proj.weight.shape:
            raise FastPathUnsupported("tp-engine fast path: gate and up projections differ in shape")
        act = getattr(self.config, "hidden_act", None) or getattr(self.config, "hidden_activation", None)
        self.act = F.silu if act == "silu" else mlp.act_fn
        L.qk_w = None
        L.qk_eps = 0.0
        if self.family.qk_norm:
            qw = self._norm_weight(attn.q_norm)
            kw = self._norm_weight(attn.k_norm)
            # One norm over q and k heads together: a per-row weight table.
            L.qk_w = torch.cat([qw.expand(self.n_q, hd), kw.expand(self.n_kv, hd)])
            L.qk_eps = _eps(attn.q_norm)
            if _eps(attn.k_norm) != L.qk_eps:
                raise FastPathUnsupported("tp-engine fast path: q_norm and k_norm eps differ")
        if self.family.sliding == "config":
            L.window = getattr(self.config, "sliding_window", None)
        elif self.family.sliding == "module":
            L.window = getattr(attn, "sliding_window", None)
        else:
            L.window = None
        L.window = int(L.window) if L.window else None
        L.k_cache = L.v_cache = None
        return L

    def _matmul(self, w: torch.Tensor, b: torch.Tensor | None):
        if self.weight_bits is None:
            return _float_matmul(w, b)
        from .quantize import quantize_weight

        bits, group = self.weight_bits, None
        if bits == 4:
            group = _int4_group(w.shape[1], self.group_size)
            if group is None:  # no even group fits this shard's width (e.g. 67 columns): int8 for this matrix
                bits = 8
        backend = self.weight_backend if bits == self.weight_bits else "auto"
        if backend == "auto" and w.device.type == "cpu" and _cpu_gemm() is not None:
            backend = "avx2"  # a draft wants speed: the AVX2 kernels, int4 included
        return _quantized_matmul(quantize_weight(w, bits, group, backend=backend), b)

    def _vocab(self, model: nn.Module) -> None:
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self.emb_w = emb.weight.detach()
        self.emb_start = int(getattr(emb, "start", 0))
        self.emb_stop = self.emb_start + self.emb_w.shape[0]
        scale = getattr(emb, "embed_scale", None)
        self.emb_scale = scale.detach().to(self.dtype) if isinstance(scale, torch.Tensor) else None
        self.head_w = head.weight.detach()
        self.head_b = None if getattr(head, "bias", None) is None else head.bias.detach()
        self._head_mm = self._matmul(self.head_w, self.head_b)
        self.head_start = int(getattr(head, "start", 0))
        sizes = getattr(head, "vocab_sizes", None)
        self.vocab_sizes = tuple(sizes) if sizes is not None else (self.head_w.shape[0],)
        if len(self.vocab_sizes) != self.world:
            raise FastPathUnsupported("tp-engine fast path: lm_head shards do not match the communicator's world")
        self.vocab_size = sum(self.vocab_sizes)
        self.sharded_vocab = self.world > 1 and len(self.vocab_sizes) > 1
        # The greedy exchange carries the embedding row of the local winner:
        # only valid when embedding and lm_head hold the same vocab slice.
        self.same_slices = (self.emb_start, self.emb_stop) == (self.head_start, self.head_start + self.head_w.shape[0])
        self.payload_dtype = torch.float32 if self.vocab_size < (1 << 24) else torch.float64

    def _ensure(self, length: int) -> None:
        """RoPE table and KV cache for ``length`` positions."""
        if length > self._rope_len:
            rotary = self.model.model.rotary_emb
            pos = torch.arange(length, device=self.device)[None]
            x = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = rotary(x, pos)  # HF's own numbers, in the model dtype
            cos, sin = cos[0].contiguous(), sin[0].contiguous()
            half = self.head_dim // 2
            sin[:, :half].neg_()  # rotate_half(x) * sin == flip_halves(x) * [-sin1, sin2]
            self._cos, self._sin, self._rope_len = cos, sin, length
        if length > self._cache_len:
            for L in self.layers:
                shape = (self.n_kv, length, self.head_dim)
                L.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
                L.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self._cache_len = length

    # -- math ------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """HF's RMSNorm, same op order (Llama: w * normed.to(dtype); Gemma: (normed * (1+w)).to(dtype))."""
        if x.dtype == torch.float32:
            if not self.family.norm_offset and w.dim() == 1:
                return F.rms_norm(x, self._norm_shape, w, eps)
            r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
            return (x * r).mul_(w)
        xf = x.float()
        r = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        if self.family.norm_offset:
            return (xf * r).mul_(w).to(x.dtype)
        return w * (xf * r).to(x.dtype)

    def _rope_(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q*cos + rotate_half(q)*sin, for q and k heads at once. qk: (..., heads, hd)."""
        shape = qk.shape
        half = self.head_dim // 2
        swapped = qk.reshape(-1, 2, half).flip(1).view(shape)
        out = qk * cos
        return out.add_(swapped.mul_(sin))

    def _qkv(self, h: torch.Tensor, L: _Layer) -> torch.Tensor:
        return L.mm_qkv(h)

    def _gate_up(self, h: torch.Tensor, L: _Layer) -> torch.Tensor:
        return L.mm_gu(h)

    def _mlp(self, x: torch.Tensor, L: _Layer) -> torch.Tensor:
        h = self._norm(x, L.post_w, L.eps)
        gu = self._gate_up(h, L)
        inter = gu.shape[-1] // 2
        a = self.act(gu[..., :inter]).mul_(gu[..., inter:])
        d = L.mm_d(a)
        if self.world > 1:
            self.comm.all_reduce_(d)
        if L.bd is not None:
            d += L.bd
        return d

    def _embed_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world == 1 or (self.emb_start == 0 and self.emb_stop == self.vocab_size):
            x = F.embedding(ids, self.emb_w)
        else:
            outside = (ids < self.emb_start) | (ids >= self.emb_stop)
            local = (ids - self.emb_start).masked_fill_(outside, 0)
            x = F.embedding(local, self.emb_w).masked_fill_(outside.unsqueeze(-1), 0.0)
            self.comm.all_reduce_(x)
        if self.emb_scale is not None:
            x = x * self.emb_scale
        return x

    def _embed_token(self, token: int) -> torch.Tensor:
        if self.emb_start <= token < self.emb_stop:
            x = self.emb_w[token - self.emb_start].unsqueeze(0).clone()
        else:
            x = self.emb_w.new_zeros(1, self.hidden)
        if self.world > 1 and not (self.emb_start == 0 and self.emb_stop == self.vocab_size):
            self.comm.all_reduce_(x)
        if self.emb_scale is not None:
            x = x * self.emb_scale
        return x

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x[-1:], self.norm_w, self.norm_eps)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's vocab-shard logits, (1, V_local), from the final hidden state."""
        return self._head_mm(h)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` (1-D) from position 0; this rank's logits of its last token."""
        return self._logits(self.prefill_hidden(ids))

    def step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """One decode step for the embedded token ``x`` (1, H) at ``pos``; this rank's logits."""
        return self._logits(self.step_hidden(x, pos))

    def prefill_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` (1-D) from position 0; final hidden state of its last token, (1, H)."""
        return self.extend_hidden(ids, 0)[-1:]

    def extend_hidden(self, ids: torch.Tensor, start: int, last_only: bool = True) -> torch.Tensor:
        """Run tokens ``ids`` (1-D) at positions ``start, start+1, ...`` over the cached prefix.

        The cache must hold valid keys/values for positions ``[0, start)``;
        whatever it holds beyond is overwritten (that is how speculative
        decoding rolls back: it just runs again from an earlier position).
        Returns final (normed) hidden states: the last token's (1, H), or all
        rows (S, H) with ``last_only=False`` (verifying drafted tokens).
        """
        S = ids.shape[0]
        end = start + S
        if end > self._cache_len:
            raise ValueError(f"positions up to {end} exceed the cache ({self._cache_len}); call _ensure first")
        hd, nq, nkv = self.head_dim, self.n_q, self.n_kv
        x = self._embed_prompt(ids)  # (S, H)
        cos, sin = self._cos[start:end, None], self._sin[start:end, None]
        mask_cache: dict[int | None, torch.Tensor] = {}
        for L in self.layers:
            h = self._norm(x, L.in_w, L.eps)
            qkv = self._qkv(h, L)  # (S, (nq+2nkv)*hd)
            qk = qkv[:, : (nq + nkv) * hd].view(S, nq + nkv, hd)
            if L.qk_w is not None:
                qk = self._norm(qk, L.qk_w, L.qk_eps)
            qk = self._rope_(qk, cos, sin)
            L.k_cache[:, start:end].copy_(qk[:, nq:].transpose(0, 1))
            L.v_cache[:, start:end].copy_(qkv[:, (nq + nkv) * hd :].view(S, nkv, hd).transpose(0, 1))
            q = qk[:, :nq].transpose(0, 1)[None]  # (1, nq, S, hd)
            k, v = L.k_cache[None, :, :end], L.v_cache[None, :, :end]
            if self.group > 1:
                k = k.repeat_interleave(self.group, dim=1)
                v = v.repeat_interleave(self.group, dim=1)
            if start == 0 and (L.window is None or L.window >= S):
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
            else:
                if L.window not in mask_cache:
                    i = torch.arange(start, end, device=self.device)
                    d = i[:, None] - torch.arange(end, device=self.device)[None, :]  # query pos - key pos
                    allowed = d >= 0
                    if L.window is not None:
                        allowed &= d < L.window
                    mask_cache[L.window] = allowed
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_cache[L.window], scale=self.scaling)
            a = a[0].transpose(0, 1).reshape(S, nq * hd)
            o = L.mm_o(a)
            if self.world > 1:
                self.comm.all_reduce_(o)
            if L.bo is not None:
                o += L.bo
            x = x + o
            x = x + self._mlp(x, L)
        return self._norm(x[-1:] if last_only else x, self.norm_w, self.norm_eps)

    def step_hidden(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """One decode step: ``x`` (1, H) is the embedded token at ``pos``; final hidden state (1, H)."""
        hd, nq, nkv, g = self.head_dim, self.n_q, self.n_kv, self.group
        qk_end = (nq + nkv) * hd
        cos, sin = self._cos[pos], self._sin[pos]
        reduce = self.comm.all_reduce_ if self.world > 1 else None
        scaling = self.scaling
        fp32 = self.dtype == torch.float32
        end = pos + 1
        for L in self.layers:
            h = self._norm(x, L.in_w, L.eps)
            qkv = self._qkv(h, L)[0]
            qk = qkv[:qk_end].view(nq + nkv, hd)
            if L.qk_w is not None:
                qk = self._norm(qk, L.qk_w, L.qk_eps)
            qk = self._rope_(qk, cos, sin)
            kc, vc = L.k_cache, L.v_cache
            kc[:, pos] = qk[nq:]
            vc[:, pos] = qkv[qk_end:].view(nkv, hd)
            start = 0 if L.window is None else max(0, end - L.window)
            k, v = kc[:, start:end], vc[:, start:end]
            if fp32:
                # Decode attention per KV head: its g query heads against its keys.
                s = torch.bmm(qk[:nq].view(nkv, g, hd), k.transpose(1, 2))
                p = torch.softmax(s.mul_(scaling), dim=-1)
                a = torch.bmm(p, v).view(1, nq * hd)
            else:  # 16-bit: SDPA accumulates in float32, as HF's attention does
                a = F.scaled_dot_product_attention(
                    qk[:nq].view(1, nkv, g, hd), k[None], v[None], scale=scaling
                ).view(1, nq * hd)
            o = L.mm_o(a)
            if reduce is not None:
                reduce(o)
            if L.bo is not None:
                o += L.bo
            x = x + o
            x += self._mlp(x, L)
        return self._final(x)

    # -- token choice ----------------------------------------------------------

    def _local_best(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max logit, its local index) over this rank's vocab shard, as 1-element tensors."""
        if self._q8 is not None:
            best = self._q8_best(h)
            if best is not None:
                return best
        return self._logits(h).max(-1)

    def _q8_best(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact argmax of the local logits, reading the int8 copy of the head plus a few fp rows.

        approx_r differs from the exact logit by at most B (see _build_q8), so
        the true argmax r* satisfies approx_r* >= max(approx) - 2B. Only those
        candidates get exact logits. None (use the full head) when the bound
        is not finite or leaves too many candidates.
        """
        hf = h.float()
        hb = h.to(torch.bfloat16)
        approx = torch.ops.aten._weight_int8pack_mm(hb, self._q8, self._q8_scale)[0].float()
        if self._q8_bias is not None:
            approx += self._q8_bias
        top = approx.max()
        stats = torch.stack([
            torch.linalg.vector_norm(hf),
            torch.linalg.vector_norm(hf - hb.float()),
            torch.linalg.vector_norm(hb.float()),
            approx.abs().max(),
        ]).tolist()
        h_norm, h_round, hb_norm, amax = stats
        bound = self._q8_bound(h_norm, h_round, hb_norm, amax)
        if not bound < float("inf"):  # NaN or inf anywhere
            self._q8_fallbacks += 1
            return None
        cand = (approx >= top - 2.0 * bound).nonzero()[:, 0]
        self._q8_candidates += cand.numel()
        self._q8_calls += 1
        if cand.numel() == 0 or cand.numel() > self._q8_max_candidates:
            self._q8_fallbacks += 1
            if self._q8_calls >= 32 and self._q8_fallbacks * 4 > self._q8_calls:
                self._q8 = None  # this model's logits defeat the bound: stop paying for the prefilter
            return None
        rows = self.head_w.index_select(0, cand)
        bias = None if self.head_b is None else self.head_b.index_select(0, cand)
        val, j = F.linear(h, rows, bias).max(-1)  # first max = lowest index (cand is ascending)
        return val, cand[j]

    def _q8_bound(self, h_norm: float, h_round: float, hb_norm: float, amax: float) -> float:
        """Bound on |int8 approx - exact logit| for every row, with a factor-2 safety margin."""
        K = self.hidden
        b = (
            self._q8_err * h_norm  # weight quantization: |h . (w - q s)| <= ||h|| ||w - q s||
            + self._q8_norm * (h_round + K * 2.0**-23 * hb_norm)  # bf16(h) rounding + fp32 accumulation
            + amax * (2.0**-8 + self._q8_out_eps)  # bf16 output of the kernel; model-dtype logits
            + self._q8_fp_err * h_norm  # fp32 accumulation in the model's own logits
        )
        return 2.0 * b + 1e-30

    def _build_q8(self, enabled: bool | None) -> None:
        """An int8 copy of the local LM head (per-row bf16 scales) for the greedy prefilter.

        Reading a quarter of the bytes of a float32 head, the kernel gives
        approximate logits; a per-row error bound (precomputed norms) picks
        the few rows whose exact logits must be computed. Greedy stays exact.
        Enabled by default on CPU when the kernel exists, passes a self-check
        and the shard has at least 4096 rows; ``enabled=True`` forces it
        (tests), False disables it (saves the extra int8 copy of the head).
        """
        self._q8 = None
        self._q8_calls = self._q8_candidates = self._q8_fallbacks = 0
        W = self.head_w
        if enabled is False or W.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return
        if enabled is None and W.shape[0] < 4096:
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
                for i in range(h.shape[0]):
                    hf = h[i].float()
                    hb = h[i].to(torch.bfloat16).float()
                    bound = self._q8_bound(
                        float(hf.norm()), float((hf - hb).norm()), float(hb.norm()), float(approx[i].abs().max())
                    ) / 2.0
                    if float((approx[i].double() - exact[i]).abs().max()) > bound:
                        return
            self._q8, self._q8_scale = q, scale

    def _greedy(self, h: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Global argmax over vocab shards; returns (token, its embedding or None)."""
        val, idx = self._local_best(h)
        if not self.sharded_vocab:
            return int(idx), None
        pd = self.payload_dtype
        parts = [val.to(pd), (idx + self.head_start).to(pd)]
        if self.same_slices:
            parts.append(self.emb_w[idx].view(-1).to(pd))
        payload = torch.cat(parts)
        table = self.comm.all_gather(payload[None], dim=0)  # (world, 2 [+ H])
        # First maximal entry = lowest vocab index among equal maxima (shards are in vocab order).
        winner = int(table[:, 0].argmax())
        token = int(table[winner, 1])
        if not self.same_slices:
            return token, None
        x = table[winner, 2:].to(self.dtype)[None]
        if self.emb_scale is not None:
            x = x * self.emb_scale
        return token, x

    def rows_argmax(self, h: torch.Tensor) -> list[int]:
        """Global greedy token for each row of final hidden states ``h`` (S, H).

        Ties go to the lowest vocabulary index, as ``torch.argmax`` on full
        logits. Sharded: one all-gather of (max, index) per row and rank.
        """
        val, idx = self._logits(h).max(-1)
        if not self.sharded_vocab:
            return idx.tolist()
        pd = torch.float64  # exact for any vocab id
        table = self.comm.all_gather(torch.stack([val.to(pd), (idx + self.head_start).to(pd)])[None], dim=0)
        winner = table[:, 0].argmax(0)  # (S,): first maximal rank = lowest vocab index
        return table[:, 1].gather(0, winner[None])[0].long().tolist()

    def rows_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits (S, V) for final hidden states ``h`` (S, H), same on every rank."""
        logits = self._logits(h).float()
        if self.sharded_vocab:
            logits = self.comm.all_gather(logits, dim=-1, sizes=self.vocab_sizes)
        return logits

    def _full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.sharded_vocab:
            logits = self.comm.all_gather(logits, dim=-1, sizes=self.vocab_sizes)
        return logits[0]

    def _sample(self, logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
        """HF's order: temperature, top-k, top-p, then one multinomial draw over the vocabulary.

        The draw is over a full-vocabulary probability vector (zeros outside
        the top-k), like transformers' sampler: the same seed then gives the
        same tokens as ``torch.manual_seed(seed); model.generate(...)``.
        """
        if top_k and top_k < self.vocab_size:
            vals, idx = self._global_top_k(logits.float(), top_k)
        else:
            vals, idx = self._full_logits(logits), None
        if temperature != 1.0:
            vals = vals / temperature
        if top_p < 1.0:
            order = torch.argsort(vals)  # ascending
            cum = torch.softmax(vals[order], -1).cumsum(-1)
            drop = cum <= (1.0 - top_p)
            drop[-1] = False  # keep at least one
            vals = vals.clone()
            vals[order[drop]] = float("-inf")
        probs = torch.softmax(vals, -1).cpu()
        if idx is not None:
            full = probs.new_zeros(self.vocab_size)
            full[idx.cpu()] = probs
            probs = full
        return int(torch.multinomial(probs, 1, generator=gen))

    def _global_top_k(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global top-k (values, vocab ids) sorted by vocab id, from per-shard top-k."""
        local = logits[0]
        kk = min(k, local.shape[0])
        vals, idx = local.topk(kk)
        idx = idx + self.head_start
        if self.sharded_vocab:
            pad = k - kk
            if pad:
                vals = torch.cat([vals, vals.new_full((pad,), float("-inf"))])
                idx = torch.cat([idx, idx.new_zeros(pad)])
            pd = torch.float64  # exact for any vocab id
            table = self.comm.all_gather(torch.stack([vals.to(pd), idx.to(pd)])[None], dim=0)  # (world, 2, k)
            vals, idx = table[:, 0].reshape(-1).float(), table[:, 1].reshape(-1).long()
            top = vals.topk(k).indices
            vals, idx = vals[top], idx[top]
        order = torch.argsort(idx)
        return vals[order], idx[order]

    # -- generation ------------------------------------------------------------

    def _check_same_input(self, ids: torch.Tensor) -> None:
        weights = torch.arange(1, ids.numel() + 1, dtype=torch.int64)
        digest = torch.tensor([[ids.numel(), int((ids.cpu().long() * weights).sum())]], dtype=torch.int64)
        everyone = self.comm.all_gather(digest.to(self.device), dim=0).cpu()
        bad = [r for r in range(self.world) if not torch.equal(everyone[r], everyone[0])]
        if bad:
            raise ValueError(f"fast_generate: ranks {bad} were given different input_ids than rank 0")

    def _generator(self, seed: int | None) -> torch.Generator:
        """``seed``: a fresh generator. None: torch's global one with rank 0's state on every rank,
        so ``torch.manual_seed(s)`` then this gives what HF's ``generate`` samples after the same seed."""
        if seed is not None:
            return torch.Generator(device="cpu").manual_seed(self._shared_seed(seed))
        if self.world > 1:
            state = torch.get_rng_state().to(self.device)  # NCCL carries device tensors only
            self.comm.broadcast_(state, src=0)
            torch.set_rng_state(state.cpu())
        return torch.default_generator

    def _shared_seed(self, seed: int | None) -> int:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))  # rank 0's draw wins below
        if self.world > 1:
            t = torch.tensor([seed], dtype=torch.int64, device=self.device)
            self.comm.broadcast_(t, src=0)
            seed = int(t.cpu())
        return seed

    def _eos_set(self, eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
        if eos_token_id is None:
            gen_config = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(gen_config, "eos_token_id", None)
        if eos_token_id is None:
            return frozenset()
        if isinstance(eos_token_id, torch.Tensor):
            eos_token_id = eos_token_id.flatten().tolist()
        if isinstance(eos_token_id, int):
            return frozenset((eos_token_id,))
        return frozenset(int(e) for e in eos_token_id)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        streamer: Any = None,
    ) -> torch.Tensor:
        """Prompt + new tokens, shape (1, prompt_len + n). See :func:`fast_generate`."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"fast_generate handles batch size 1, got input_ids of shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] < 1:
            raise ValueError("fast_generate needs a prompt of at least one token")
        if int(max_new_tokens) < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if do_sample and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        max_new_tokens = int(max_new_tokens)
        prompt = input_ids[0].to(self.device)
        S = prompt.shape[0]
        if self.world > 1:
            self._check_same_input(prompt)
        gen = None
        if do_sample:
            gen = self._generator(seed)
        eos = self._eos_set(eos_token_id)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        out: list[int] = []
        if max_new_tokens:
            self._ensure(S + max_new_tokens)
            h = self.prefill_hidden(prompt)
            pos = S
            while True:
                if do_sample:
                    token = self._sample(self._logits(h), temperature, top_k, top_p, gen)
                    x = None
                else:
                    token, x = self._greedy(h)
                out.append(token)
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
                if len(out) >= max_new_tokens or token in eos:
                    break
                if x is None:
                    x = self._embed_token(token)
                h = self.step_hidden(x, pos)
                pos += 1
        if streamer is not None:
            streamer.end()
        new = torch.tensor([out], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, new], dim=1)


def _decoder_for(model: nn.Module) -> FastDecoder:
    """The decoder cached on ``model``, rebuilt if the model's modules were swapped."""
    key = (id(model.model.layers[0].self_attn.q_proj), id(model.get_output_embeddings()), id(_comm_of(model)))
    cached = model.__dict__.get("_tp_engine_fast_decoder")
    if cached is None or cached[0] != key:
        cached = (key, FastDecoder(model))
        model.__dict__["_tp_engine_fast_decoder"] = cached
    return cached[1]


def fast_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    streamer: Any = None,
) -> torch.LongTensor:
    """Generate with the fast path; every rank of the model's group calls it.

    Returns the prompt followed by the new tokens, shape (1, prompt + n),
    identical on every rank. Greedy (``do_sample=False``) picks what
    transformers' ``model.generate(do_sample=False)`` picks on the unsharded
    model. ``eos_token_id`` None means the model's
    ``generation_config.eos_token_id`` (as ``generate`` does); pass ``[]`` to
    never stop early. Sampling applies temperature, then ``top_k`` (0: off),
    then ``top_p``, and draws with a generator seeded by ``seed`` (None:
    torch's global generator, given rank 0's state), so ranks agree without
    exchanging the token.
    ``streamer`` gets ``put(prompt)``, ``put(tensor([token]))`` per token and
    ``end()``, like transformers' streamers. Raises
    :class:`FastPathUnsupported` for models outside the fast path.
    """
    return _decoder_for(model).generate(
        input_ids,
        max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        seed=seed,
        streamer=streamer,
    )
