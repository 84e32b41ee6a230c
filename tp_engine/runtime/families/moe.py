"""Mixture-of-experts families with the Llama attention: Mixtral, Qwen2-MoE.

The attention, norms and wiring are the Llama builder's; the MLP is a
:class:`~tp_engine.runtime.blocks.MoE`: a replicated router (softmax in
float32, top-k; Mixtral always renormalizes the top-k and keeps the weights
in float32, Qwen2-MoE renormalizes with ``norm_topk_prob`` and casts them to
the model dtype), experts whose fused 3-D weights ``parallelize`` split along
the intermediate dim (gate_up (E, 2 I_local, H) = [gate | up], down
(E, H, I_local); stored transposed when the module says ``is_transposed``),
and Qwen2-MoE's shared expert (a gated MLP over this rank's columns) scaled by
``sigmoid(shared_expert_gate(h))``. The block's output is one partial sum,
all-reduced once by the layer. Qwen2-MoE's dense layers (``mlp_only_layers``,
``decoder_sparse_step``) are ordinary gated MLPs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...quant.layer import is_quantized
from ..blocks import MoE
from ..build import BuildContext, Parts, RuntimeUnsupported, activation
from ..matmul import module_bias
from . import llama
from ._shared import gated_mlp


def _experts(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up (E, 2 I, H), down (E, H, I)) views of the experts' fused weights."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        raise RuntimeUnsupported(f"{type(experts).__name__}: expected fused 3-D gate_up_proj / down_proj expert weights")
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise RuntimeUnsupported(f"{type(experts).__name__}: experts with biases or without a gate")
    if not getattr(experts, "is_concatenated", True):
        raise RuntimeUnsupported(f"{type(experts).__name__}: interleaved [g0, u0, g1, u1, ...] expert weights")
    gate_up, down = gate_up.detach(), down.detach()
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up, down


def _replicated(gate: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``F.linear(h, W)`` of a replicated router or gate in the model dtype, exactly as HF
    (never quantized: routing is discrete)."""
    w = getattr(gate, "weight", None)
    if w is None or is_quantized(gate):
        raise RuntimeUnsupported(f"{type(gate).__name__}: expected a float router weight")
    w, b = w.detach(), module_bias(gate)
    return lambda h: F.linear(h, w, b)


def _mlp_block(mixtral: bool) -> llama.MlpBlock:
    def block(i: int, mlp: nn.Module, ctx: BuildContext):
        experts = getattr(mlp, "experts", None)
        if experts is None:
            if getattr(mlp, "gate_proj", None) is None:
                raise RuntimeUnsupported(f"layer {i}: neither experts nor a gated MLP")
            return gated_mlp(ctx, mlp, ctx.model.config), module_bias(mlp.down_proj)
        router = getattr(mlp, "gate", None)
        if router is None:
            raise RuntimeUnsupported(f"layer {i}: no router (mlp.gate)")
        gate_up, down = _experts(experts)
        config = ctx.model.config
        shared = getattr(mlp, "shared_expert", None)
        shared_gate = getattr(mlp, "shared_expert_gate", None)
        if shared is not None and getattr(shared.down_proj, "bias", None) is not None:
            raise RuntimeUnsupported(f"layer {i}: a shared expert with a down-projection bias")
        moe = MoE(
            router=_replicated(router),
            top_k=int(router.top_k),
            normalize=True if mixtral else bool(getattr(router, "norm_topk_prob", getattr(config, "norm_topk_prob", False))),
            gate_up=gate_up,
            down=down,
            act=activation(experts, config),
            shared=None if shared is None else gated_mlp(ctx, shared, config),
            shared_gate=None if shared_gate is None else _replicated(shared_gate),
            float_weights=mixtral,
        )
        return moe, None

    return block


def build_mixtral(model: nn.Module, ctx: BuildContext) -> Parts:
    return llama.build(model, ctx, _mlp_block(True))


def build_qwen2_moe(model: nn.Module, ctx: BuildContext) -> Parts:
    return llama.build(model, ctx, _mlp_block(False))


BUILDERS = {"mixtral": build_mixtral, "qwen2_moe": build_qwen2_moe}
