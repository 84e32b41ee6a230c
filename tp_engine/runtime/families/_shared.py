"""Helpers the family builders share: finding the layers, widths, rotary tables, MLPs and layers."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..blocks import Attention, GatedMLP, Layer, PlainMLP
from ..build import BuildContext, RuntimeUnsupported, activation
from ..matmul import module_bias
from ..norms import Norm
from ..rope import RopeTable

# cos/sin depend only on the position for these (not on the sequence length).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def find_base(model: nn.Module, path: str, layers: str, family: str) -> nn.Module:
    """``model.<path>`` (dotted), the module whose ``<layers>`` ModuleList holds the decoder layers.

    Raises :class:`RuntimeUnsupported` naming the expected layout otherwise, so the
    caller falls back to Hugging Face instead of failing on a missing attribute.
    """
    base: Any = model
    for name in path.split("."):
        base = getattr(base, name, None)
    if base is None or not isinstance(getattr(base, layers, None), nn.ModuleList):
        raise RuntimeUnsupported(f"expected the {family} module layout (model.{path}.{layers})")
    return base


def rotary_module(base: nn.Module, path: str) -> nn.Module:
    """The model-level rotary module ``base.rotary_emb`` (``base`` is ``model.<path>``)."""
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise RuntimeUnsupported(f"model.{path}.rotary_emb not found")
    return rotary


def rope_type(rotary: nn.Module, config: Any, layer_type: str | None = None) -> str:
    """The rope type of ``rotary`` (per layer type where it holds a dict, as Gemma 3's does)."""
    kind = getattr(rotary, "rope_type", None)
    if isinstance(kind, dict):
        kind = kind.get(layer_type)
    if kind is None:
        params = getattr(config, "rope_parameters", None) or {}
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        kind = params.get("rope_type", "default")
    return kind


def rope_table(rotary: nn.Module, config: Any, ctx: BuildContext, layer_type: str | None = None) -> RopeTable:
    """The ``half``-style table of a model-level rotary module ``rotary(x, position_ids) -> (cos, sin)``.

    With ``layer_type`` the module is called as ``rotary(x, position_ids, layer_type)``.
    Only rope types whose cos/sin depend on the position alone: dynamic ones
    (``dynamic``, ``longrope``) change with the sequence length and are refused.
    """
    kind = rope_type(rotary, config, layer_type)
    if kind not in ROPE_TYPES:
        raise RuntimeUnsupported(f"rope_type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    probe = torch.empty(1, dtype=ctx.dtype, device=ctx.device)  # only its dtype and device are read
    extra = () if layer_type is None else (layer_type,)
    return ctx.rope_from(lambda pos: tuple(c[0] for c in rotary(probe, pos[None], *extra)), "half")


def out_rows(linear: nn.Module) -> int:
    """Output features of a (possibly column-parallel, local) Linear, or an HF Conv1D (``nf``)."""
    # Conv1D stores its weight (in, out): weight.shape[0] is only right for (out, in) weights.
    n = getattr(linear, "out_features", None) or getattr(linear, "nf", None)
    return int(n) if n else int(linear.weight.shape[0])


def in_cols(linear: nn.Module) -> int:
    """Input features of a (possibly row-parallel, local) linear."""
    return int(getattr(linear, "in_features", None) or linear.weight.shape[1])


def separate_qkv_attention(ctx: BuildContext, attn: nn.Module, o_proj: nn.Module, head_dim: int, scaling: float,
                           **variant: Any) -> Attention:
    """Attention over separate ``attn.q_proj`` / ``k_proj`` / ``v_proj`` (fused into one matmul in
    place) and ``o_proj``; ``variant``: the other :class:`Attention` fields (rope, norms, windows ...)."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    return Attention(mm_qkv=ctx.fused([q, k, v]), n_q=out_rows(q) // head_dim, n_kv=out_rows(k) // head_dim,
                     head_dim=head_dim, scaling=scaling, mm_o=ctx.matmul(o_proj), **variant)


def equal_qkv_heads(width: int, head_dim: int, what: str) -> int:
    """Heads of a fused [Q | K | V] output ``width`` wide with as many KV heads as Q heads."""
    n = width // (3 * head_dim)
    if n < 1 or width != 3 * n * head_dim:
        raise RuntimeUnsupported(f"{what} width {width} is not 3 x heads x {head_dim}")
    return n


def fused_qkv_heads(qkv: nn.Module, o_proj: nn.Module, head_dim: int) -> tuple[int, int]:
    """(Q heads, KV heads) of a fused Q/K/V projection with fewer (or as many) KV heads.

    The Q heads are read from the output projection's input width; the rest of
    the fused rows are K and V in equal parts.
    """
    n_q = in_cols(o_proj) // head_dim
    return n_q, (out_rows(qkv) // head_dim - n_q) // 2


def plain_mlp(ctx: BuildContext, up: nn.Module, act: Callable[[torch.Tensor], torch.Tensor], down: nn.Module) -> PlainMLP:
    """``down(act(up(h)))``; the up bias is column-split so it goes in the matmul, the down bias
    (replicated) is the layer's (see :func:`biased_layer`)."""
    return PlainMLP(ctx.matmul(up, bias=True), act, ctx.matmul(down))


def gated_mlp(ctx: BuildContext, mlp: nn.Module, config: Any) -> GatedMLP:
    """The gated MLP of separate ``gate_proj`` / ``up_proj`` / ``down_proj`` (fused into [gate | up])."""
    return GatedMLP(ctx.fused([mlp.gate_proj, mlp.up_proj]), activation(mlp, config), ctx.matmul(mlp.down_proj))


def biased_layer(
    ctx: BuildContext,
    attn_norm: Norm,
    attention: Attention,
    o_proj: nn.Module,
    mlp: Callable[[torch.Tensor], torch.Tensor],
    down_proj: nn.Module,
    *,
    mlp_norm: Norm | None = None,
    parallel: bool = False,
) -> Layer:
    """A :class:`Layer` that adds ``o_proj``'s and ``down_proj``'s biases itself.

    Their matmuls leave the bias out: on a row-parallel projection it is
    replicated, so it must be added once, after the all-reduce.
    """
    return Layer(
        attn_norm=attn_norm,
        attention=attention,
        mlp=mlp,
        mlp_norm=mlp_norm,
        attn_bias=module_bias(o_proj),
        mlp_bias=module_bias(down_proj),
        parallel=parallel,
        reduce=ctx.reduce,
    )


def layer_head_dim(attn: nn.Module, first: int | None) -> int:
    """The attention module's head_dim, which must equal the first layer's (``first``; None for the
    first layer): the KV cache holds one head size."""
    hd = int(attn.head_dim)
    if first is not None and hd != first:
        raise RuntimeUnsupported(f"layers with different head dims ({first} and {hd})")
    return hd
