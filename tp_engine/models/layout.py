"""What a spec's names and layouts mean for a concrete model.

Pure functions shared by the sharding (``parallelize``) and the auto-planner
(``models/auto.py``), which both need them: the key of a layer's *kind*
(``ArchSpec.layer_kinds`` is keyed by it) and a rank's rows of a fused q/k/v
projection in each of ``QKV_LAYOUTS``; and what an RMS norm module computes
(``rms_norm_form``), for norms that are sharded with the heads they normalize.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from ..plan import ModelDims, RankPlan

__all__ = ["RMSNormForm", "fused_qkv_rows", "layer_kind", "layer_types", "merge_ranges", "rms_norm_form", "text_config"]


def merge_ranges(pieces: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Join adjacent (start, stop) pieces; drop empty ones."""
    out: list[tuple[int, int]] = []
    for a, b in pieces:
        if a == b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def fused_qkv_rows(layout: str, rp: RankPlan, dims: ModelDims) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """This rank's rows of a fused q/k/v output, in the order the local reshape expects.

    Returns the (start, stop) pieces and, for the K/V pieces, (local offset,
    global start, length): the rows whose gradients must be summed when a KV
    head is replicated.
    """
    hd, nq, nkv = dims.head_dim, dims.num_q_heads, dims.num_kv_heads
    pieces: list[tuple[int, int]] = []
    kv_flags: list[bool] = []
    if layout == "concat":  # [all Q | all K | all V]
        q0, q1, k0, k1 = rp.q_heads.start, rp.q_heads.stop, rp.kv_heads.start, rp.kv_heads.stop
        pieces = [(q0 * hd, q1 * hd), ((nq + k0) * hd, (nq + k1) * hd), ((nq + nkv + k0) * hd, (nq + nkv + k1) * hd)]
        kv_flags = [False, True, True]
    else:  # "grouped": per KV head j, [Q heads of group j | K_j | V_j]
        g = dims.group_size
        block = (g + 2) * hd
        for j in rp.kv_heads:
            a, b = max(rp.q_heads.start, j * g), min(rp.q_heads.stop, (j + 1) * g)
            base = j * block
            # The planner gives every local KV head the same number of local Q
            # heads, so the local view (-1, q_per_kv + 2, head_dim) lines up.
            pieces += [(base + (a - j * g) * hd, base + (b - j * g) * hd), (base + g * hd, base + block)]
            kv_flags += [False, True]
    kv: list[tuple[int, int, int]] = []
    offset = 0
    for (a, b), is_kv in zip(pieces, kv_flags):
        if is_kv:
            kv.append((offset, a, b - a))
        offset += b - a
    return pieces, kv


def text_config(config: Any) -> Any:
    """The text model's config of a multimodal config (``get_text_config``), else the config itself."""
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else None
    return text if text is not None else (getattr(config, "text_config", None) or config)


def layer_types(config: Any, n_layers: int) -> list[str | None]:
    """The config's per-layer type names (``layer_types``) when it has one entry per layer, else Nones."""
    types = getattr(text_config(config), "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n_layers and all(isinstance(t, str) for t in types):
        return list(types)
    return [None] * n_layers


def layer_kind(layer: nn.Module, layer_type: str | None = None) -> str:
    """The key of a layer's kind: a digest of its parameter names, plus its ``layer_types`` entry.

    Names, not shapes: a tiny copy of a model and the model itself give every
    layer of the same kind the same key, whatever their sizes.
    """
    names = "\n".join(sorted(n for n, _ in layer.named_parameters()))
    digest = hashlib.sha256(names.encode()).hexdigest()[:10]
    return f"{layer_type}/{digest}" if layer_type else digest


class RMSNormForm(NamedTuple):
    """What an RMS norm module computes: ``eps``, and whether it casts back before the weight."""

    eps: float
    cast_first: bool  # True: ``w * normed.to(dtype)`` (Llama); False: ``(w * normed).to(dtype)`` (Olmo 2)


def rms_norm_form(norm: nn.Module) -> RMSNormForm | None:
    """The form of ``norm`` if it is a plain RMS norm over its weight's width, else None.

    A plain RMS norm is ``w * x * rsqrt(mean(x^2) + eps)`` computed in float32,
    with one of the two cast orders transformers uses. Found by running a
    copy of the module (meta-device modules too) on a bfloat16 probe, where
    the two orders round differently; anything else (a LayerNorm, a bias,
    Gemma's ``1 + w``, another formula) gives None.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or [n for n, _ in norm.named_parameters()] != ["weight"]:
        return None
    eps = next(
        (v for v in (getattr(norm, n, None) for n in ("variance_epsilon", "eps", "epsilon"))
         if isinstance(v, (int, float)) and not isinstance(v, bool)),
        None,
    )
    if eps is None:
        return None
    width = weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    # On the CPU explicitly: the planner may run under a meta default device (skeletons).
    w = torch.randn(width, generator=gen, device="cpu").to(torch.bfloat16)
    x = (3 * torch.randn(4, width, generator=gen, device="cpu")).to(torch.bfloat16)
    try:
        probe = copy.deepcopy(norm)
        probe = probe.to_empty(device="cpu") if weight.device.type == "meta" else probe.to("cpu")
        probe = probe.to(torch.bfloat16)
        with torch.no_grad():
            probe.weight.copy_(w)
            got = probe(x)
    except Exception:  # a norm that cannot run alone on a probe is not one we can reproduce
        return None
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if not isinstance(got, torch.Tensor) or got.shape != x.shape or got.dtype != torch.bfloat16:
        return None
    if torch.equal(got, (w * normed).to(torch.bfloat16)):
        return RMSNormForm(float(eps), False)
    if torch.equal(got, w * normed.to(torch.bfloat16)):
        return RMSNormForm(float(eps), True)
    return None
