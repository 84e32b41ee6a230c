"""What a family builder receives and returns.

A builder reads one (possibly sharded) Hugging Face model and returns the
runtime's blocks holding references to its weights. It never copies a
weight it can share (fused q/k/v and gate/up become the storage of the
original parameters), and it raises :class:`RuntimeUnsupported` with the
reason for anything it does not implement, so callers can fall back to HF.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..comm.base import Communicator
from ..quant.gguf import fuse_gguf_rows, gguf_weight_of
from ..quant.layer import is_quantized
from .blocks import Layer
from .matmul import Matmul, fuse_rows, linear_weight, module_bias, module_matmul, weight_matmul
from .norms import Norm
from .rope import RopeTable

__all__ = ["RuntimeUnsupported", "BuildContext", "Parts"]


class RuntimeUnsupported(ValueError):
    """The model (or the request) is outside what the lean runtime implements."""


@dataclass
class Parts:
    """A family builder's result."""

    layers: list[Layer]
    final_norm: Norm
    kv_heads: list[int]
    head_dim: int
    ropes: list[RopeTable] = field(default_factory=list)
    # x (T, H) token embeddings, positions (T,) -> the first layer's input
    # (learned positions, an embedding norm, a projection); None: x as is.
    embed_extra: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # After the final norm, before the LM head (OPT's project_out).
    final_extra: Callable[[torch.Tensor], torch.Tensor] | None = None
    final_softcap: float | None = None
    # Positions the model has embeddings for (learned position tables); None: unbounded (rotary, ALiBi).
    max_positions: int | None = None


@dataclass
class BuildContext:
    """How the builder makes matmuls: float (fused in place), quantized layers, or a quantized copy."""

    model: nn.Module
    comm: Communicator
    dtype: torch.dtype
    device: torch.device
    weight_bits: int | None = None
    group_size: int | None = None
    backend: str = "auto"
    fuse_in_place: bool = True

    @property
    def reduce(self) -> Callable[[torch.Tensor], Any] | None:
        return self.comm.all_reduce_ if self.comm.world_size > 1 else None

    def sharded(self, module: nn.Module) -> bool:
        """Whether a row-parallel-position module really is split (a partial plan keeps some whole)."""
        spec = getattr(getattr(module, "weight", None), "tp_shard", None)
        return self.comm.world_size > 1 and spec is not None and not spec.replicated

    def matmul(self, module: nn.Module, bias: bool = False) -> Matmul:
        """``x @ W^T`` (plus the module's bias with ``bias=True``)."""
        mm = module_matmul(module, self.weight_bits, self.group_size, self.backend)
        b = module_bias(module) if bias else None
        return mm if b is None else (lambda x: mm(x).add_(b))

    def fused(self, modules: Sequence[nn.Module], bias: bool = True) -> Matmul:
        """One matmul for several linears reading the same input, outputs concatenated.

        Float weights are fused into one tensor that becomes their storage (no
        extra memory; see ``matmul.fuse_rows``). GGUF layers next to each other
        with the same ggml type are fused the same way (``quant.gguf.fuse_gguf_rows``;
        a Q4_K_M file mixes Q4_K and Q6_K, so q/k may fuse while v runs alone).
        Other quantized layers run one by one.
        """
        if any(is_quantized(m) for m in modules):
            # A quantized copy (weight_bits) requantizes each layer on its own.
            runs = _gguf_runs(modules) if self.weight_bits is None else [[m] for m in modules]
            mms = [self._fused_gguf(group, bias) for group in runs]
            if len(mms) == 1:
                return mms[0]
            return lambda x: torch.cat([mm(x) for mm in mms], dim=-1)
        in_place = self.fuse_in_place and self.weight_bits is None
        weights = [linear_weight(m, in_place) for m in modules]
        w = fuse_rows(weights, in_place)
        b = None
        if bias:
            biases = [module_bias(m) for m in modules]
            if any(x is not None for x in biases):
                b = torch.cat([x if x is not None else w.new_zeros(wt.shape[0]) for x, wt in zip(biases, weights)])
        return weight_matmul(w, b, self.weight_bits, self.group_size, self.backend)

    def _fused_gguf(self, modules: Sequence[nn.Module], bias: bool) -> Matmul:
        """One matmul for a run of GGUF layers of one ggml type (or one layer of any kind)."""
        if len(modules) == 1:
            return self.matmul(modules[0], bias)
        w = fuse_gguf_rows([gguf_weight_of(m) for m in modules], in_place=self.fuse_in_place)
        b = None
        if bias:
            biases = [module_bias(m) for m in modules]
            if any(x is not None for x in biases):
                b = torch.cat([x if x is not None else torch.zeros(int(m.out_features), device=self.device)
                               for x, m in zip(biases, modules)]).float()
        return w if b is None else (lambda x: w(x).add_(b))

    def rope_from(self, source: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], style: str) -> RopeTable:
        return RopeTable(source, style, self.device)


def _gguf_runs(modules: Sequence[nn.Module]) -> list[list[nn.Module]]:
    """``modules`` cut into runs of consecutive GGUF layers with one ggml type and input width;
    every other layer is a run of its own."""
    runs: list[list[nn.Module]] = []
    last = None
    for m in modules:
        w = gguf_weight_of(m)
        key = None if w is None else (w.qtype, w.in_features)
        if key is not None and key == last:
            runs[-1].append(m)
        else:
            runs.append([m])
        last = key
    return runs


def activation(module: nn.Module, config: Any, *names: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP's activation callable (HF's own), found under one of ``names``."""
    for name in names or ("act_fn", "act", "activation_fn", "activation"):
        act = getattr(module, name, None)
        if callable(act):
            return act
    raise RuntimeUnsupported(f"{type(module).__name__}: no activation function found")
