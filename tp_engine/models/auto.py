"""Infer an architecture spec from a model's module structure.

For a causal LM without a declared spec, ``infer_spec`` reads the model the
way a person would: the decoder layer list (a ModuleList as long as the
config's layer count), and in each *kind* of layer (layers are grouped by
their parameter names and ``layer_types`` entry, so hybrids, dense + MoE
stacks and decoders with cross-attention are planned kind by kind):

* the self-attention: separate q/k/v/o projections (found by role names,
  checked against the head counts), or a fused q/k/v projection; q/k RMS
  norms over the whole projection (Olmo 2) are split with the heads
  (``ArchSpec.qk_norm_span``; a copy of the norm is run on a probe to
  learn its cast order, ``layout.rms_norm_form``);
* the MLP: column (hidden -> width) and row (width -> hidden) projections
  found by shape, a fused [gate | up] projection, or fused 3-D MoE experts
  (plus a shared expert);
* the input embedding and the LM head.

What it cannot shard with certainty it *replicates*: every rank keeps that
module whole and computes it fully, which is correct by construction
(cross-attention, latent attention, state-space and other token mixers,
norms spanning heads that are not plain RMS norms, attention with
parameters of unknown role, experts of an unknown layout, embeddings with
their own forward). A partial plan
is still tensor parallel where it shards, and says what it replicates.

Where the structure admits several readings, they are *hypotheses*, proven
on a tiny random copy of the same architecture against transformers' own
unsharded forward (random weights make a wrong reading fail by orders of
magnitude). The proof is the caller's ``passes`` function
(``check.hypothesis_passes``, wired up by ``check.inferred_spec``): this
module only reads structure and never shards or runs a model itself.

* a fused q/k/v or [gate | up] projection: every plausible row layout is
  tried alone, and the unique one that passes is kept (none, or more than
  one: that module is replicated);
* anything unusual (extra parameters or projections inside attention,
  experts, unfamiliar names, scaled embeddings, partial plans): the whole
  plan is checked once at TP=2; if it fails, each part is tried alone and
  a part that fails alone is replicated.

A plan that shards nothing in any layer is refused: it would give no tensor
parallelism. What ``infer_spec`` returns is still only used after the guard
(``check.guard_auto_spec``) passes it at the requested split on a tiny copy
that infers the very same spec.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..plan import ModelDims, plan_model
from .layout import fused_qkv_rows, layer_kind, layer_types, merge_ranges, rms_norm_form, text_config
from .spec import QKV_LAYOUTS, ArchSpec

__all__ = ["HYPOTHESIS_WORLD", "Prover", "Unprovable", "infer_spec"]

# Role names (last path component of a projection).
Q_NAMES = ("q_proj", "query", "q", "wq", "Wq", "query_proj", "project_q", "q_lin")
K_NAMES = ("k_proj", "key", "k", "wk", "Wk", "key_proj", "project_k", "k_lin")
V_NAMES = ("v_proj", "value", "v", "wv", "Wv", "value_proj", "project_v", "v_lin")
O_NAMES = ("o_proj", "out_proj", "dense", "o", "wo", "Wo", "output_proj", "attention_out", "out_lin", "c_proj", "proj")
FUSED_QKV_HINTS = ("qkv", "query_key_value", "c_attn", "w_pack", "kv_proj", "in_proj")
LATENT_HINTS = ("q_a_proj", "kv_a_proj", "kv_b_proj", "q_b_proj", "kv_a_proj_with_mqa")
COLUMN_NAMES = (
    "gate_proj", "up_proj", "w1", "w3", "fc1", "c_fc", "fc_in", "dense_h_to_4h", "wi", "wi_0", "wi_1", "Wi",
    "linear_1", "layer_1", "lin1", "input_linear", "proj_up", "intermediate", "dense", "gate_up_proj",
)
ROW_NAMES = (
    "down_proj", "w2", "fc2", "c_proj", "fc_out", "dense_4h_to_h", "wo", "Wo", "linear_2", "layer_2", "lin2",
    "output_linear", "proj_down", "out", "dense",
)
MLP_MODULE_NAMES = ("mlp", "feed_forward", "ffn", "ff", "mlp_block", "shared_mlp", "shared_expert", "shared_experts")
CROSS_HINTS = ("cross", "encoder_attn", "enc_attn")
MIXER_HINTS = ("mamba", "mixer", "ssm", "conv", "linear_attn", "recurrent", "temporal", "mlstm", "rwkv")
TOWER_HINTS = ("vision", "image", "visual", "audio", "speech", "video", "img_")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
COLWISE = ("colwise", "colwise_rep", "local_colwise", "colwise_gather_output")
ROWWISE = ("rowwise", "rowwise_rep", "local_rowwise", "rowwise_split_input")
# Hypotheses are tested at this world size (the guard then checks the
# requested one): a function of the model's structure only, so every rank
# and every run infers the same spec.
HYPOTHESIS_WORLD = 2


def _last(path: str) -> str:
    return path.rpartition(".")[2]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _rel(path: str, root: str) -> str:
    """``path`` relative to the module at ``root`` ("" is the top)."""
    if not root:
        return path
    assert path == root or path.startswith(root + "."), (path, root)
    return path[len(root) + 1:]


def _under(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + ".")


def _common(paths: Iterable[str]) -> str:
    """The deepest module containing every projection at ``paths``."""
    parts = [p.split(".")[:-1] for p in paths]
    common: list[str] = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common)


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def _io(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or transformers' Conv1D (weight stored (in, out))."""
    if _is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return module.in_features, module.out_features


def _in_out(module: nn.Module) -> tuple[int, int]:
    return module.in_features, module.out_features


def _is_plain_linear(module: nn.Module) -> bool:
    # A subclass with its own forward (LoRA wrappers, quantized or ternary
    # linears such as BitNet's) does something a ColumnParallelLinear would not.
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _is_plain_proj(module: nn.Module) -> bool:
    return _is_plain_linear(module) or type(module) is Conv1D


def _linears(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and n}


def _projection_like(module: nn.Module) -> dict[str, nn.Module]:
    """Linear layers and transformers' Conv1D (GPT-2 style, weight stored transposed)."""
    return {n: m for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))}


_EXPERT_WEIGHT_HINTS = ("up", "down", "gate", "w1", "w2", "w3", "expert", "linear")


def _expert_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Modules holding fused 3-D expert weights (two or more 3-D parameters of their own,
    named like projections: XLNet's 3-D q/k/v/o attention weights are not experts)."""
    out = {}
    for n, m in module.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        three_d = [pn for pn, p in m.named_parameters(recurse=False) if p.dim() == 3]
        if len(three_d) >= 2 and any(h in pn.lower() for pn in three_d for h in _EXPERT_WEIGHT_HINTS):
            out[n] = m
    return out


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of the model")


# ------------------------------------------------------------ hypotheses and parts


@dataclass(frozen=True)
class _Option:
    """One way to shard a part: the ArchSpec fields it sets, and a label for people."""

    fields: tuple[tuple[str, Any], ...]
    label: str


@dataclass
class _Part:
    """A shardable role in one layer kind (or the model's vocabulary).

    ``options``: ways to shard it, in order of preference (none: replicated).
    ``certain``: the single option is today's well-understood layout (only
    the guard checks it). ``unique``: the options are alternative layouts
    of the same weights; exactly one may pass, else the part is replicated.
    """

    kind: str  # layer kind key; "" for the embedding / LM head
    role: str  # "attention", "experts", "mlp" (dense or shared expert), "embedding", "lm_head"
    options: list[_Option]
    certain: bool = False
    unique: bool = False
    notes: list[str] = field(default_factory=list)
    top: str | None = None  # attention: the layer child holding it (its token mixer when replicated)
    absent: bool = False  # the layer kind has no such role at all (an MLP-only block): nothing to shard
    several_kinds: bool = False  # name the kind in messages

    @property
    def name(self) -> str:
        return f"{self.role} of layer kind {self.kind}" if self.kind and self.several_kinds else self.role


# ------------------------------------------------------------ the layer list


def _layer_counts(config: Any) -> set[int]:
    counts = set()
    for cfg in (text_config(config), config):
        for k in _LAYER_KEYS:
            try:
                v = getattr(cfg, k, None)
            except Exception:  # heterogeneous configs raise on some global reads
                v = None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                counts.add(v)
    return counts


def _has_qkv_somewhere(layer: nn.Module) -> bool:
    return any(_qkv_children(m) is not None for m in layer.modules()) or any(
        any(h in _last(n).lower() for h in FUSED_QKV_HINTS + LATENT_HINTS) for n in _projection_like(layer)
    )


def _find_layer_list(model: nn.Module, counts: set[int]) -> str:
    def is_layers(m: nn.Module) -> bool:
        return all(
            isinstance(x, nn.Module) and (_projection_like(x) or _expert_modules(x)) for x in m
        )

    candidates = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) in counts and name and is_layers(m)
    ]
    # A list inside another candidate's layers (several attentions per layer) is not the layer list.
    candidates = [c for c in candidates if not any(c != o and c.startswith(o + ".") for o in candidates)]
    if not candidates:
        raise ValueError(f"no ModuleList of {' or '.join(map(str, sorted(counts)))} layers (the config's layer count) in {type(model).__name__}")
    # Multimodal models: vision/audio towers have layer lists too.
    text = [c for c in candidates if not any(h in c.lower() for h in TOWER_HINTS)]
    candidates = text or candidates
    # Per-layer lists of small pieces (XLM keeps attentions, norms and FFNs in
    # separate lists) are not decoder layers: a decoder layer holds attention.
    with_attention = [c for c in candidates if _has_qkv_somewhere(model.get_submodule(c)[0])]
    pool = with_attention or candidates
    if len(pool) > 1:
        inside = _decoder_prefix(model)
        if inside is not None:
            narrowed = [c for c in pool if inside == "" or c.startswith(inside + ".")]
            pool = narrowed or pool
    if len(pool) > 1:
        try:
            emb_path = _path_of(model, model.get_input_embeddings()).split(".")
        except (ValueError, NotImplementedError, AttributeError):
            emb_path = []

        def shared(c: str) -> int:
            n = 0
            for a, b in zip(c.split("."), emb_path):
                if a != b:
                    break
                n += 1
            return n

        best = max(shared(c) for c in pool)
        pool = [c for c in pool if shared(c) == best]
    if len(pool) == 1:
        return pool[0]
    raise ValueError(f"several layer lists ({', '.join(pool)}): cannot tell which is the decoder")


def _decoder_prefix(model: nn.Module) -> str | None:
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except Exception:  # models without a decoder accessor raise various errors
        return None
    if not isinstance(decoder, nn.Module):
        return None
    try:
        return _path_of(model, decoder)
    except ValueError:
        return None


# ------------------------------------------------------------ attention


def _qkv_children(module: nn.Module) -> tuple[str, str, str] | None:
    names = {n for n, m in module.named_children() if isinstance(m, nn.Linear)}
    found = []
    for roles in (Q_NAMES, K_NAMES, V_NAMES):
        hits = [r for r in roles if r in names]
        if len(hits) != 1:
            return None
        found.append(hits[0])
    return tuple(found)  # type: ignore[return-value]


def _mixer_hint(layer: nn.Module) -> str:
    kinds = sorted({n.split(".")[0] for n, _ in layer.named_modules() if n and any(h in n.split(".")[0].lower() for h in MIXER_HINTS)})
    return f" (its token mixer is {', '.join(kinds)}: a state-space/recurrent/convolution block, not attention)" if kinds else ""


def _is_cross(path: str) -> bool:
    return any(h in path.lower() for h in CROSS_HINTS)


def _attention_holders(layer: nn.Module, dims: ModelDims) -> tuple[list[tuple[str, tuple[str, str, str] | None, str | None]], list[str]]:
    """Modules that hold an attention's input projections: (path, (q, k, v) or None, fused name or None),
    and the paths of latent (low-rank) attention modules."""
    holders: list[tuple[str, tuple[str, str, str] | None, str | None]] = []
    latent: list[str] = []
    hd, nq, nkv = dims.head_dim, dims.num_q_heads, dims.num_kv_heads
    for n, m in layer.named_modules():
        qkv = _qkv_children(m)
        if qkv is not None:
            holders.append((n, qkv, None))
            continue
        children = {c: x for c, x in m.named_children() if isinstance(x, nn.Linear) or _is_conv1d(x)}
        if any(c in LATENT_HINTS for c in children):
            latent.append(n)
            continue
        fused = [
            c for c, x in children.items()
            if any(h in c.lower() for h in FUSED_QKV_HINTS) and _io(x)[1] == (nq + 2 * nkv) * hd
        ]
        outs = [c for c in children if c in O_NAMES]
        if len(fused) == 1 and len(outs) == 1:
            holders.append((n, None, fused[0]))
    return holders, latent


def _attention_part(layer: nn.Module, dims: ModelDims, kind: str, where: str) -> tuple[_Part, str | None, list[str]]:
    """The self-attention part of a layer kind, its attention path (None: none found),
    and the paths of every attention-like module (kept out of the MLP search)."""
    holders, latent = _attention_holders(layer, dims)
    cross = [h for h in holders if _is_cross(h[0])]
    own = [h for h in holders if not _is_cross(h[0])]
    notes = [f"cross-attention {h[0]} replicated" for h in cross]
    attention_like = [h[0] for h in holders] + latent
    part = _Part(kind, "attention", [], notes=notes)
    if latent and not own:
        part.notes.append(f"latent (low-rank) attention {', '.join(latent)} replicated: its heads are not separate q/k/v rows")
        part.top = latent[0].split(".")[0] if len(latent) == 1 and latent[0] else None
        return part, None, attention_like
    if not own:
        part.absent = not holders and not latent  # settled in _infer_kind: absent unless some other block is left
        fused = [n for n in _projection_like(layer) if any(h in _last(n).lower() for h in FUSED_QKV_HINTS)]
        if cross:
            why = "no self-attention besides the cross-attention"
        elif fused:
            why = f"fused projection {fused[0]} does not have the (Q + 2 KV heads) x head_dim outputs of a q/k/v projection"
        else:
            why = "no attention module with q/k/v projections" + _mixer_hint(layer)
        part.notes.append(f"token mixer replicated: {why}")
        return part, None, attention_like
    if len(own) > 1:
        part.notes.append(f"several attention modules ({', '.join(h[0] or '<layer>' for h in own)}) replicated")
        return part, None, attention_like
    holder, qkv, fused = own[0]
    part.top = holder.split(".")[0] if holder else None
    try:
        if fused is not None:
            options, certain, unique, path, extra = _fused_attention(layer, holder, fused, dims, where)
        else:
            options, certain, unique, path, extra = _separate_attention(layer, holder, qkv, dims, where)
    except _Replicate as exc:
        part.notes.append(f"attention replicated: {exc}")
        return part, None, attention_like
    part.options, part.certain, part.unique = options, certain, unique
    part.notes += extra
    return part, path, attention_like


class _Replicate(Exception):
    """This part cannot be sharded (the message says why); it stays whole on every rank."""


def _locate_output(layer: nn.Module, holder: str, where: str) -> tuple[str, str, str]:
    """(attention path, core path under it, output projection path under attention)."""
    holder_mod = layer.get_submodule(holder)
    o_here = [n for n, m in holder_mod.named_children() if (isinstance(m, nn.Linear) or _is_conv1d(m)) and n in O_NAMES]
    if len(o_here) == 1:
        return holder, "", o_here[0]
    if not o_here and holder:
        # BERT-style: the q/k/v module sits next to an output module in a parent.
        parent = holder.rpartition(".")[0]
        parent_mod = layer.get_submodule(parent)
        outs = [
            n for n, m in parent_mod.named_modules()
            if isinstance(m, nn.Linear) and _last(n) in O_NAMES and not (n + ".").startswith(_rel(holder, parent) + ".")
        ]
        if len(outs) != 1:
            raise _Replicate(f"{where}.{holder}: found q/k/v but {'no' if not outs else 'several'} output projection ({', '.join(outs)})")
        return parent, _rel(holder, parent), outs[0]
    raise _Replicate(f"{where}.{holder}: found q/k/v but {'no' if not o_here else 'several'} output projection ({', '.join(o_here)})")


def _head_attrs(module: nn.Module, dims: ModelDims, wide: bool = False) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Integer attributes holding the Q / KV head counts or the Q width (made rank-local).

    ``wide`` also takes attributes that split or reshape by the Q width under
    other names (GPT-BigCode's ``embed_dim``, GPT-1's ``split_size``,
    Persimmon's ``hidden_size``): only for hypotheses, which are tested.
    """
    width_names = ("all_head_size", "inner_dim") + (("embed_dim", "split_size", "hidden_size") if wide else ())
    q_attrs, kv_attrs, width = [], [], []
    for name, value in vars(module).items():
        if not isinstance(value, int) or isinstance(value, bool) or name.startswith("_"):
            continue
        lname = name.lower()
        if "head" in lname and not any(w in lname for w in ("dim", "size")):
            if value == dims.num_q_heads:
                q_attrs.append(name)
            elif value == dims.num_kv_heads:
                kv_attrs.append(name)
        elif lname in width_names and value == dims.num_q_heads * dims.head_dim:
            width.append(name)
    if dims.num_q_heads == dims.num_kv_heads:
        q_attrs, kv_attrs = q_attrs + kv_attrs, []
    return tuple(q_attrs), tuple(kv_attrs), tuple(width)


def _attention_extras(
    layer: nn.Module, attention: str, core: str, used: set[str], dims: ModelDims, hidden_in: int, where: str
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], list[str]]:
    """Everything with weights inside the attention core besides q/k/v/o.

    Returns (Q-head projections, Q-head parameters, norms spanning the Q or KV
    heads, assumptions); raises _Replicate for what sharded heads cannot reproduce.
    """
    attn = layer.get_submodule(attention)
    core_mod = attn.get_submodule(core) if core else attn
    core_prefix = f"{core}." if core else ""
    hd, nq = dims.head_dim, dims.num_q_heads
    q_projs: list[str] = []
    q_params: list[str] = []
    span_norms: list[str] = []
    assumed: list[str] = []
    for name, m in core_mod.named_modules():
        full = core_prefix + name
        if not name or full in used or any(full.startswith(u + ".") for u in used):
            continue
        if isinstance(m, nn.Linear) or _is_conv1d(m):
            i, o = _io(m)
            if _is_plain_proj(m) and i == hidden_in and o in (nq * hd, nq) and "." not in name:
                # An output gate per head (or per head and channel), read from the layer input.
                q_projs.append(full)
                assumed.append(f"{full} gates each Q head")
                continue
            raise _Replicate(f"{where}.{_join(attention, full)}: an extra projection {_io(m)} inside attention")
        if isinstance(m, nn.Embedding):
            raise _Replicate(f"{where}.{_join(attention, full)}: an embedding inside attention (relative positions?)")
        if any(full.startswith(p + ".") for p in q_projs):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() == 1 and p.shape[0] == hd:
                continue  # a per-head norm (q_norm/k_norm over head_dim): replicated, unaffected
            span = {nq * hd: "Q", dims.num_kv_heads * hd: "KV"}.get(int(p.shape[0])) if p.dim() == 1 else None
            if span and "." not in name and rms_norm_form(m) is not None:
                # An RMS norm over the rows of all Q (or KV) heads: Olmo 2's q/k norms over the
                # whole projection, BitNet's sub-norm of the attention output. Split with the
                # heads, one all-reduce of per-token sums of squares; proven on a tiny copy.
                span_norms.append(full)
                assumed.append(f"{full} is an RMS norm over the rows of all {span} heads (split with them)")
                continue
            raise _Replicate(
                f"{where}.{_join(attention, full, pname)} (shape {tuple(p.shape)}) acts on the attention's "
                f"sharded activations; only head_dim-wide norms are safe to keep whole"
            )
    for pname, p in core_mod.named_parameters(recurse=False):
        if p.dim() >= 1 and p.shape[0] == nq and not (p.dim() == 1 and nq == hd):
            q_params.append(pname)
            assumed.append(f"{pname} holds one entry per Q head")
        elif p.dim() == 1 and p.shape[0] == hd:
            assumed.append(f"{pname} (head_dim wide) is shared by all heads")
        else:
            raise _Replicate(
                f"{where}.{_join(attention, core, pname)} (shape {tuple(p.shape)}): a parameter of the attention "
                f"module itself whose role is unknown"
            )
    return tuple(q_projs), tuple(q_params), tuple(span_norms), assumed


def _separate_attention(
    layer: nn.Module, holder: str, qkv: tuple[str, str, str], dims: ModelDims, where: str
) -> tuple[list[_Option], bool, bool, str, list[str]]:
    attention, core, o = _locate_output(layer, holder, where)
    prefix = f"{core}." if core else ""
    q, k, v = (prefix + n for n in qkv)
    attn = layer.get_submodule(attention)
    hd, nq, nkv = dims.head_dim, dims.num_q_heads, dims.num_kv_heads
    mods = {name: attn.get_submodule(name) for name in (q, k, v, o)}
    for name, m in mods.items():
        if not _is_plain_linear(m):
            raise _Replicate(f"{where}.{attention}.{name} is a {type(m).__name__} with its own forward, not a plain nn.Linear")
    shapes = {name: _in_out(m) for name, m in mods.items()}
    extra_fields: dict[str, Any] = {}
    notes: list[str] = []
    q_out = shapes[q][1]
    if q_out != nq * hd and q_out % (nq * hd) == 0 and shapes[k][1] == nkv * hd and shapes[o][0] == nq * hd:
        # A gated attention: q_proj holds [q_h | gate_h] per head (Qwen3-Next), a hypothesis to prove.
        extra_fields["q_rows_per_head"] = q_out // nq
        notes.append(f"assumed: {q} holds {q_out // (nq * hd)} x head_dim rows per Q head (query and gate)")
    expected = {q: (None, nq * (extra_fields.get("q_rows_per_head") or hd)), k: (None, nkv * hd), v: (None, nkv * hd), o: (nq * hd, None)}
    if any((wi is not None and shapes[n][0] != wi) or (wo is not None and shapes[n][1] != wo) for n, (wi, wo) in expected.items()):
        raise _Replicate(
            f"{where}.{attention}: projection shapes (in, out) {shapes} disagree with {nq} Q / {nkv} KV heads "
            f"of dim {hd} from the config"
        )
    if not shapes[q][0] == shapes[k][0] == shapes[v][0]:
        raise _Replicate(f"{where}.{attention}: q/k/v read different widths {shapes[q][0]}/{shapes[k][0]}/{shapes[v][0]}")
    if shapes[o][1] != shapes[q][0]:
        raise _Replicate(f"{where}.{attention}: {o} writes {shapes[o][1]} features but {q} reads {shapes[q][0]}")
    core_mod = attn.get_submodule(core) if core else attn
    q_projs, q_params, span_norms, assumed = _attention_extras(layer, attention, core, {q, k, v, o}, dims, shapes[q][0], where)
    q_attrs, kv_attrs, width = _head_attrs(core_mod, dims)
    fields = dict(
        attention=attention, q_proj=q, k_proj=k, v_proj=v, o_proj=o,
        q_head_attrs=q_attrs, kv_head_attrs=kv_attrs, **extra_fields,
    )
    if core:
        fields["attention_core"] = core
    if width:
        fields["q_width_attrs"] = width
    if q_projs:
        fields["q_head_projs"] = q_projs
    if q_params:
        fields["q_head_params"] = q_params
    if span_norms:
        fields["qk_norm_span"] = span_norms
    certain = not assumed and not extra_fields
    notes += [f"assumed: {a}" for a in assumed]
    return [_Option(tuple(sorted(fields.items())), "separate q/k/v")], certain, False, attention, notes


def _equivalent_layouts(dims: ModelDims, layouts: Sequence[str]) -> list[str]:
    """Drop layouts that give every rank the same rows as an earlier one (for these head counts)."""
    seen: list[tuple] = []
    kept: list[str] = []
    for layout in layouts:
        rows = []
        for world in (2, 3):
            try:
                plan = plan_model(dims, world)
            except ValueError:
                continue
            rows.append(tuple(merge_ranges(fused_qkv_rows(layout, plan[r], dims)[0]) for r in range(world)))
        sig = tuple(rows)
        if sig not in seen:
            seen.append(sig)
            kept.append(layout)
    return kept


def _fused_attention(
    layer: nn.Module, holder: str, fused: str, dims: ModelDims, where: str
) -> tuple[list[_Option], bool, bool, str, list[str]]:
    attention, core, o = _locate_output(layer, holder, where)
    if core:
        raise _Replicate(f"{where}.{attention}: a fused q/k/v projection in a sub-module")
    attn = layer.get_submodule(attention)
    proj, out = attn.get_submodule(fused), attn.get_submodule(o)
    for name, m in ((fused, proj), (o, out)):
        if not _is_plain_proj(m):
            raise _Replicate(f"{where}.{attention}.{name} is a {type(m).__name__} with its own forward")
    hd, nq = dims.head_dim, dims.num_q_heads
    if _io(out)[0] != nq * hd:
        raise _Replicate(f"{where}.{attention}.{o} reads {_io(out)[0]} features, not {nq} heads x {hd}")
    q_projs, q_params, span_norms, assumed = _attention_extras(layer, attention, "", {fused, o}, dims, _io(proj)[0], where)
    q_attrs, kv_attrs, width = _head_attrs(attn, dims, wide=True)
    base: dict[str, Any] = dict(attention=attention, qkv_proj=fused, o_proj=o, q_head_attrs=q_attrs, kv_head_attrs=kv_attrs)
    if width:
        base["q_width_attrs"] = width
    if q_projs:
        base["q_head_projs"] = q_projs
    if q_params:
        base["q_head_params"] = q_params
    if span_norms:
        base["qk_norm_span"] = span_norms
    try:
        config_heads = getattr(getattr(attn, "config", None), "num_attention_heads", None)
    except Exception:  # heterogeneous configs raise on some global reads
        config_heads = None
    if config_heads == nq:
        # Phi-3 style: the forward slices the fused output at config.num_attention_heads x head_dim.
        base["attention_config_heads"] = ("num_attention_heads",)
    options = [
        _Option(tuple(sorted({**base, "qkv_layout": layout}.items())), f"fused q/k/v layout {layout}")
        for layout in _equivalent_layouts(dims, QKV_LAYOUTS)
    ]
    notes = [f"assumed: {a}" for a in assumed]
    return options, False, True, attention, notes


# ------------------------------------------------------------ MLP and experts


@dataclass(frozen=True)
class _Unit:
    """A dense MLP in a layer: its module, column and row projections (relative to the module)."""

    module: str
    columns: tuple[str, ...]
    row: str
    stacked: int
    familiar: bool
    plain_linear: bool

    def options(self) -> list[_Option]:
        base = dict(mlp_column=self.columns, mlp_row=self.row)
        if self.stacked == 1:
            return [_Option(tuple(sorted(base.items())), "MLP")]
        return [
            _Option(tuple(sorted({**base, "mlp_stacked": self.stacked, "mlp_stacked_layout": layout}.items())), f"fused gate/up layout {layout}")
            for layout in ("blocks", "interleaved")
        ]


def _dense_units(layer: nn.Module, hidden: int, excluded: Sequence[str], where: str) -> tuple[list[_Unit], list[str]]:
    """Every dense MLP in ``layer`` outside ``excluded`` subtrees (attention modules, experts)."""
    projs = {
        n: m for n, m in _projection_like(layer).items()
        if not any(_under(n, e) for e in excluded if e != "")
    }
    rows = {n: m for n, m in projs.items() if _io(m)[1] == hidden and _io(m)[0] != hidden}
    cols = {n: m for n, m in projs.items() if _io(m)[0] == hidden and _io(m)[1] != hidden}
    units: list[_Unit] = []
    problems: list[str] = []
    for rn, r in rows.items():
        width = _io(r)[0]
        plain = [c for c, m in cols.items() if _io(m)[1] == width]
        stacked = [c for c, m in cols.items() if _io(m)[1] == 2 * width]
        if 1 <= len(plain) <= 2 and not stacked:
            columns, k = tuple(plain), 1
        elif len(stacked) == 1 and not plain:
            columns, k = tuple(stacked), 2
        else:
            continue
        paths = list(columns) + [rn]
        module = _common(paths)
        mod = layer.get_submodule(module) if module else layer
        # Everything with weights inside the unit besides the projections sees
        # sharded activations (BitNet's ffn_sub_norm normalizes all columns);
        # convolutions and state parameters belong to token mixers, not MLPs.
        bad = ""
        for n, m in mod.named_modules():
            full = _join(module, n)
            if full in paths or any(_under(full, e) for e in excluded if e and e != module and not _under(module, e)):
                continue
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                bad = f"{where}.{full} is a convolution"
                break
            if (isinstance(m, nn.Linear) or _is_conv1d(m)) and width in _io(m):
                bad = f"{where}.{full} {_io(m)} also reads or writes the MLP width {width}"
                break
            for pname, p in m.named_parameters(recurse=False):
                if isinstance(m, (nn.Linear,)) or _is_conv1d(m):
                    break
                if width in p.shape or p.dim() == 3:
                    bad = f"{where}.{_join(full, pname)} (shape {tuple(p.shape)}) spans the MLP's sharded columns"
                    break
            if bad:
                break
        if bad:
            problems.append(bad)
            continue
        familiar = all(_last(c) in COLUMN_NAMES for c in columns) and _last(rn) in ROW_NAMES
        plain_linear = all(_is_plain_linear(layer.get_submodule(p)) for p in paths)
        if not all(_is_plain_proj(layer.get_submodule(p)) for p in paths):
            problems.append(f"{where}.{module}: MLP projections with their own forward")
            continue
        units.append(_Unit(module, tuple(_rel(c, module) for c in columns), _rel(rn, module), k, familiar, plain_linear))
    return units, problems


def _pick_unit(units: list[_Unit]) -> tuple[_Unit | None, str]:
    """The layer's MLP among the dense units (others stay whole): familiar names, an MLP-like module name."""
    if not units:
        return None, ""
    if len(units) == 1:
        return units[0], ""

    def score(u: _Unit) -> tuple[int, int]:
        name = _last(u.module).lower() if u.module else ""
        return (int(u.familiar), int(name in MLP_MODULE_NAMES or any(h in name for h in ("mlp", "ffn", "feed_forward", "expert"))))

    best = max(score(u) for u in units)
    top = [u for u in units if score(u) == best]
    if len(top) > 1:
        return None, f"several dense MLPs ({', '.join(u.module or '<layer>' for u in top)}): cannot tell which is the MLP"
    others = [u.module or "<layer>" for u in units if u is not top[0]]
    return top[0], f"other dense blocks kept whole: {', '.join(others)}"


def _experts_option(layer: nn.Module, path: str, experts: nn.Module, hidden: int, where: str) -> tuple[dict[str, Any] | None, str]:
    """ArchSpec fields for sharding fused 3-D experts by intermediate columns, or (None, why not)."""
    params = {n: p for n, p in experts.named_parameters(recurse=False)}
    gated = "gate_up_proj" in params
    up_name = "gate_up_proj" if gated else ("up_proj" if "up_proj" in params else None)
    if up_name is None or "down_proj" not in params or params[up_name].dim() != 3 or params["down_proj"].dim() != 3:
        return None, f"{where}.{path}: experts with parameters {sorted(params)}, not gate_up_proj/up_proj + down_proj"
    biased = getattr(experts, "has_bias", False) or any(n.endswith("_bias") for n in params)
    if biased and not (getattr(experts, "has_bias", False) and {f"{up_name}_bias", "down_proj_bias"} <= set(params)):
        return None, f"{where}.{path}: experts with biases other than {up_name}_bias / down_proj_bias"
    if getattr(experts, "has_post_expert_norm", False):
        return None, f"{where}.{path}: experts with a norm after each expert"
    if hasattr(experts, "has_gate") and bool(experts.has_gate) != gated:
        return None, f"{where}.{path}: has_gate={experts.has_gate} but the weights are named {up_name}"
    up, down = params[up_name], params["down_proj"]
    if up.shape[0] != down.shape[0]:
        return None, f"{where}.{path}: {up.shape[0]} gate/up experts but {down.shape[0]} down experts"
    fields: dict[str, Any] = dict(moe_gate_up=up_name, moe_down="down_proj")
    if not hasattr(experts, "is_transposed"):
        # No flags from transformers' experts decorator: read the layout off the shapes.
        blocks = 2 if gated else 1
        if up.shape[2] == hidden and down.shape[1] == hidden and up.shape[1] == blocks * down.shape[2]:
            fields["moe_transposed"] = False
        elif up.shape[1] == hidden and down.shape[2] == hidden and up.shape[2] == blocks * down.shape[1]:
            fields["moe_transposed"] = True
        else:
            return None, f"{where}.{path}: expert weights {tuple(up.shape)} / {tuple(down.shape)} in no layout known"
    return fields, ""


def _mlp_parts(
    layer: nn.Module, dims: ModelDims, kind: str, attention_like: Sequence[str], where: str
) -> list[_Part]:
    """The MLP parts of a layer kind: fused experts (if any) and the dense MLP / shared expert."""
    hidden = dims.hidden_size
    experts = _expert_modules(layer)
    experts = {n: m for n, m in experts.items() if not any(_under(n, a) for a in attention_like if a)}
    excluded = [a for a in attention_like if a] + list(experts)
    units, problems = _dense_units(layer, hidden, excluded, where)
    unit, pick_note = _pick_unit(units)
    parts: list[_Part] = []
    dense = _Part(kind, "mlp", [])
    if unit is not None:
        dense.top = unit.module.split(".")[0] if unit.module else None
        dense.options = unit.options()
        dense.unique = unit.stacked > 1
        dense.certain = unit.stacked == 1 and unit.familiar and unit.plain_linear
        if not unit.familiar:
            dense.notes.append(f"assumed: {unit.module or '<layer>'} is an MLP ({', '.join(unit.columns)} -> {unit.row}; unfamiliar names)")
        if pick_note:
            dense.notes.append(pick_note)
    elif pick_note:
        dense.notes.append(f"MLP replicated: {pick_note}")
    elif not experts:
        if problems:
            dense.notes.append(f"MLP replicated: {'; '.join(problems)}")
        else:
            dense.absent = True  # no MLP-shaped projections at all (a mixer-only block)
    if experts:
        part = _Part(kind, "experts", [])
        candidates = experts
        if len(experts) > 1:
            # Several: shard the one transformers' experts decorator describes
            # (the routed experts); the others stay whole, which is right when
            # the partial sums are reduced at the experts module.
            flagged = {n: m for n, m in experts.items() if hasattr(m, "is_transposed")}
            candidates = flagged if len(flagged) == 1 else {}
            kept = [n for n in experts if n not in candidates]
            part.notes.append(f"expert modules kept whole: {', '.join(kept)}")
        if candidates:
            (path, mod), = candidates.items()
            part.top = path.split(".")[0]
            fields, why = _experts_option(layer, path, mod, hidden, where)
            if fields is None:
                part.notes.append(f"experts replicated: {why}")
            else:
                part.options = [_Option(tuple(sorted({**fields, "_experts": path}.items())), "fused 3-D experts")]
        parts.append(part)
    if unit is not None and experts:
        dense.notes.append(f"{unit.module or '<layer>'} is the shared expert")
    dense_fields = {"_unit": unit.module} if unit is not None else {}
    dense.options = [_Option(o.fields + tuple(dense_fields.items()), o.label) for o in dense.options]
    parts.append(dense)
    return parts


# ------------------------------------------------------------ a layer kind


@dataclass
class _Kind:
    key: str
    parts: list[_Part]
    block: str | None  # the MoE block whose output is the experts' + shared expert's sum (one all-reduce), or None
    gates: tuple[str, ...]  # replicated modules in that block scaling a partial sum (shared-expert gates)
    tops: tuple[str, ...]  # the layer's direct children holding projections or experts

    def signature(self) -> tuple:
        return tuple((p.role, tuple(p.options), p.certain, p.unique, p.top, p.absent) for p in self.parts), self.block, self.gates, self.tops


def _infer_kind(layer: nn.Module, dims: ModelDims, key: str, where: str) -> _Kind:
    attn, _, attention_like = _attention_part(layer, dims, key, where)
    mlp_parts = _mlp_parts(layer, dims, key, attention_like, where)
    experts = next((p for p in mlp_parts if p.role == "experts"), None)
    dense = next(p for p in mlp_parts if p.role == "mlp")
    if experts is not None and not dense.options and not dense.notes:
        mlp_parts.remove(dense)  # an MoE block without a shared expert: nothing else to shard
    block, gates = None, ()
    if experts is not None and experts.options:
        # One all-reduce per MoE block needs a real block (not the layer)
        # holding the experts and the shared expert, whose output is their sum.
        path = dict(experts.options[0].fields)["_experts"]
        unit = dict(dense.options[0].fields).get("_unit") if dense.options else None
        anchor = _common([path] + ([unit + ".x"] if unit is not None else []))
        others = [n for n in _expert_modules(layer) if n != path and _under(n, anchor)]
        if anchor and not others and not (dense.options and _has_row_bias(layer, dense)):
            block = anchor
            gates = tuple(sorted(n for n, m in _linears(layer.get_submodule(anchor)).items() if m.out_features == 1))
    # The layer's blocks with weight matrices (norms have only vectors).
    tops = tuple(n for n, m in layer.named_children() if any(p.dim() >= 2 for p in m.parameters()))
    if attn.absent:
        # No attention found: absent only if the MLP parts account for every
        # block with weights (else that block is the token mixer, kept whole).
        mlp_tops = {p.top for p in mlp_parts}
        dense_unit = dict(dense.options[0].fields).get("_unit") if dense.options else None
        if dense_unit == "":
            mlp_tops |= {_join(*c.split(".")[:1]) for c in dict(dense.options[0].fields)["mlp_column"]}
            mlp_tops.add(dict(dense.options[0].fields)["mlp_row"].split(".")[0])
        attn.absent = all(t in mlp_tops for t in tops)
        if attn.absent:
            attn.notes = [n for n in attn.notes if not n.startswith("token mixer replicated")]
    return _Kind(key, [attn, *mlp_parts], block, gates, tops)


def _has_row_bias(layer: nn.Module, dense: _Part) -> bool:
    fields = dict(dense.options[0].fields)
    row = layer.get_submodule(_join(fields["_unit"], fields["mlp_row"]))
    return getattr(row, "bias", None) is not None


# ------------------------------------------------------------ embedding and head


def _vocab_parts(model: nn.Module, dims: ModelDims) -> tuple[_Part, _Part, str, str]:
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_part, head_part = _Part("", "embedding", []), _Part("", "lm_head", [])
    emb_path = head_path = ""
    if not isinstance(emb, nn.Embedding):
        emb_part.notes.append(f"embedding replicated: it is a {type(emb).__name__}, not an nn.Embedding")
    else:
        emb_path = _path_of(model, emb)
        if emb.num_embeddings != dims.vocab_size:
            emb_part.notes.append(f"embedding replicated: {emb.num_embeddings} rows, but the config says vocab_size {dims.vocab_size}")
        elif type(emb).forward is nn.Embedding.forward:
            emb_part.options, emb_part.certain = [_Option((), "vocab-parallel embedding")], True
        else:
            scale = getattr(emb, "embed_scale", None)
            known = getattr(emb, "scalar_embed_scale", None) is not None or isinstance(scale, torch.Tensor) or (
                isinstance(scale, (int, float)) and not isinstance(scale, bool)
            )
            if known:
                emb_part.options = [_Option((), "vocab-parallel embedding with a scale")]
                emb_part.notes.append(f"assumed: {type(emb).__name__} only multiplies by its embed_scale")
            else:
                emb_part.notes.append(f"embedding replicated: {type(emb).__name__} has its own forward")
    if head is None:
        head_part.notes.append(f"no LM head ({type(model).__name__}.get_output_embeddings() is None)")
    else:
        head_path = _path_of(model, head)
        if not _is_plain_linear(head):
            head_part.notes.append(f"LM head replicated: a {type(head).__name__}, not a plain nn.Linear")
        elif head.out_features != dims.vocab_size:
            head_part.notes.append(f"LM head replicated: {head.out_features} outputs, but the config says vocab_size {dims.vocab_size}")
        else:
            head_part.options, head_part.certain = [_Option((), "vocab-parallel LM head")], True
    tied = isinstance(emb, nn.Embedding) and head is not None and getattr(head, "weight", None) is emb.weight
    if tied and not head_part.options and emb_part.options:
        # A whole head cannot share its table with a split embedding.
        emb_part.options = []
        emb_part.notes.append("embedding replicated: tied to an LM head that stays whole")
    return emb_part, head_part, emb_path, head_path


def _tp_plan_disagreement(config: Any, layers: str, fields: dict[str, Any]) -> str:
    """transformers' own plan (glob -> style), where present, against the roles we inferred: "" if they agree."""
    plan = getattr(text_config(config), "base_model_tp_plan", None) or getattr(config, "base_model_tp_plan", None)
    if not plan:
        return ""
    roles: dict[str, str] = {}
    if "q_proj" in fields:
        att = fields["attention"]
        roles.update({_join(att, fields[n]): "colwise" for n in ("q_proj", "k_proj", "v_proj")})
        roles[_join(att, fields["o_proj"])] = "rowwise"
    if "mlp_row" in fields:
        mlp = fields.get("_unit", "")
        roles.update({_join(mlp, c): "colwise" for c in fields["mlp_column"]})
        roles[_join(mlp, fields["mlp_row"])] = "rowwise"
    for rel, want in roles.items():
        path = f"{layers}.0.{rel}"
        for glob, style in plan.items():
            pattern = re.escape(glob).replace(r"\*", r"\d+")
            if not re.search(rf"(^|\.){pattern}$", path):
                continue
            if str(style) not in (COLWISE if want == "colwise" else ROWWISE):
                return f"transformers' base_model_tp_plan marks {glob} as {str(style)!r}, the auto-planner inferred {want} for {path}"
    return ""


# ------------------------------------------------------------ building specs


@dataclass
class _Plan:
    """Everything inferred about a model, before the choices among hypotheses are made."""

    model_type: str
    layers: str
    kinds: list[_Kind]
    emb: _Part
    head: _Part
    emb_path: str
    head_path: str

    def parts(self) -> list[_Part]:
        seen: dict[int, _Part] = {}
        for k in self.kinds:
            for p in k.parts:
                seen.setdefault(id(p), p)
        return list(seen.values()) + [self.emb, self.head]


def _kind_spec(plan: _Plan, kind: _Kind, choice: dict[int, int | None], one_reduce: bool) -> ArchSpec:
    fields: dict[str, Any] = {}
    replicate: list[str] = []
    parts = {p.role: p for p in kind.parts}
    attn = parts["attention"]
    absent: list[str] = []
    if attn.absent:
        absent.append("attention")
    elif choice.get(id(attn)) is None:
        replicate.append("attention")
    else:
        fields.update(dict(attn.options[choice[id(attn)]].fields))
    dense, experts = parts.get("mlp"), parts.get("experts")
    dense_fields = dict(dense.options[choice[id(dense)]].fields) if dense is not None and choice.get(id(dense)) is not None else None
    exp_fields = dict(experts.options[choice[id(experts)]].fields) if experts is not None and choice.get(id(experts)) is not None else None
    unit = dense_fields.pop("_unit") if dense_fields is not None else None
    if exp_fields is not None:
        exp_path = exp_fields.pop("_experts")
        if one_reduce and kind.block is not None and (unit is None or _under(unit, kind.block)):
            block, fields["moe_reduce"] = kind.block, "block"
            if dense_fields is not None and kind.gates:
                fields["moe_gates"] = kind.gates
        else:
            block = _common([exp_path] + ([unit + ".x"] if unit is not None else []))
            fields["moe_reduce"] = "experts"
        fields.update(mlp=block, moe_experts=_rel(exp_path, block), **exp_fields)
        if dense_fields is not None:
            fields.update(moe_shared_expert=_rel(unit, block) if unit != block else "", **dense_fields)
    elif dense_fields is not None:
        fields.update(mlp=unit, **dense_fields)
    elif dense is not None and dense.absent and experts is None:
        absent.append("mlp")
    else:
        replicate.append("mlp")
    if absent:
        fields["absent"] = tuple(absent)
    covered = []
    if "attention" not in replicate and "attention" not in absent:
        covered.append(fields["attention"])
    if dense_fields is not None:
        covered += [_join(unit, c) for c in dense_fields["mlp_column"]] + [_join(unit, dense_fields["mlp_row"])]
    if exp_fields is not None:
        covered.append(exp_path)
    # The replicated roles' own modules are described by ``replicate``.
    own = {attn.top} if "attention" in replicate else set()
    if dense is not None and dense_fields is None:
        own.add(dense.top)
    if experts is not None and exp_fields is None:
        own.add(experts.top)
    whole = tuple(
        t for t in kind.tops
        if not any(c == "" or _under(c, t) or _under(t, c) for c in covered) and t not in own
    )
    if whole:
        fields["kept_whole"] = whole
    return ArchSpec(family=f"auto:{plan.model_type}", layers=plan.layers, replicate=tuple(replicate), **fields)


def _notes(plan: _Plan, choice: dict[int, int | None], extra: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for part in plan.parts():
        prefix = f"[{part.kind}] " if part.kind and part.several_kinds else ""
        chosen = choice.get(id(part))
        for note in part.notes:
            if note.startswith("assumed:") and chosen is None:
                continue  # an assumption about a part that is not sharded after all
            out.append(prefix + note)
        if chosen is not None and not part.certain:
            out.append(prefix + f"{part.role}: {part.options[chosen].label} (proven on a tiny copy)")
    out += extra
    return tuple(dict.fromkeys(out))


def _build(plan: _Plan, choice: dict[int, int | None], one_reduce: bool, extra_notes: Sequence[str] = ()) -> ArchSpec:
    kind_specs = [(k.key, _kind_spec(plan, k, choice, one_reduce)) for k in plan.kinds]
    model_replicate = tuple(r for r, p in (("embedding", plan.emb), ("lm_head", plan.head)) if choice.get(id(p)) is None)
    model_fields: dict[str, Any] = {}
    if plan.emb_path:
        model_fields["embedding"] = plan.emb_path
    if plan.head_path:
        model_fields["lm_head"] = plan.head_path
    notes = _notes(plan, choice, extra_notes)
    first = kind_specs[0][1]
    if all(s == first for _, s in kind_specs):
        return first.replace(replicate=first.replicate + model_replicate, notes=notes, **model_fields)
    return ArchSpec(
        family=f"auto:{plan.model_type}", layers=plan.layers, replicate=model_replicate,
        layer_kinds=tuple(sorted(kind_specs, key=lambda kv: kv[0])), notes=notes, **model_fields,
    )


def _shards_nothing(plan: _Plan, choice: dict[int, int | None]) -> bool:
    return all(choice.get(id(p)) is None for k in plan.kinds for p in k.parts)


def _shards_no_role(spec: ArchSpec) -> bool:
    """A layer spec that leaves attention and MLP whole (or has neither)."""
    return all(role in spec.replicate + spec.absent for role in ("attention", "mlp"))


# ------------------------------------------------------------ proving hypotheses


class Unprovable(ValueError):
    """Raised by a prover when the tiny copy cannot judge any plan (transformers' own unsharded run fails)."""


# Whether a candidate spec for the model passes on a tiny copy at HYPOTHESIS_WORLD
# ranks (``check.hypothesis_passes``); raises Unprovable when nothing can be proven.
Prover = Callable[[nn.Module, ArchSpec], bool]


def _resolve(model: nn.Module, plan: _Plan, passes: Prover) -> ArchSpec:
    parts = plan.parts()
    choice: dict[int, int | None] = {id(p): (0 if p.options else None) for p in parts}
    extra: list[str] = []

    def alone(part: _Part, i: int) -> ArchSpec:
        solo = {id(p): None for p in parts}
        solo[id(part)] = i
        return _build(plan, solo, one_reduce=False)

    # Alternative layouts of the same weights: exactly one may pass.
    for part in parts:
        if part.unique and part.options:
            good = [i for i in range(len(part.options)) if passes(model, alone(part, i))]
            if len(good) == 1:
                choice[id(part)] = good[0]
                extra.append(f"{part.name}: of {', '.join(o.label for o in part.options)}, only {part.options[good[0]].label} passes")
            else:
                choice[id(part)] = None
                what = "none" if not good else "more than one"
                extra.append(f"{part.name} replicated: {what} of {', '.join(o.label for o in part.options)} passes on a tiny copy")
    if _shards_nothing(plan, choice):
        return _build(plan, choice, one_reduce=False, extra_notes=extra)
    optimistic = _build(plan, choice, one_reduce=True, extra_notes=extra)
    vanilla = (
        all(p.certain for p in parts if p.options)
        and all(choice[id(p)] is not None for p in parts)
        and not any(p.notes for p in parts)
        and not optimistic.layer_kinds and not optimistic.kept_whole and not optimistic.replicate
    )
    if vanilla:
        # Today's well-understood layout in every layer: the guard's check is proof enough.
        return optimistic
    # Anything unusual: the whole plan once; on failure, every part alone.
    if passes(model, optimistic):
        return optimistic
    if any(k.block for k in plan.kinds) and passes(model, _build(plan, choice, one_reduce=False)):
        return _build(plan, choice, one_reduce=False, extra_notes=extra + ["MoE partial sums reduced at the experts (one reduce per block failed)"])
    for part in parts:
        if choice[id(part)] is None or part.unique:
            continue
        chosen = next((i for i in range(len(part.options)) if passes(model, alone(part, i))), None)
        if chosen is None:
            extra.append(f"{part.name} replicated: {', '.join(o.label for o in part.options)} fails on a tiny copy")
        choice[id(part)] = chosen
    return _build(plan, choice, one_reduce=False, extra_notes=extra)


# ------------------------------------------------------------ entry point


def _infer_plan(model: nn.Module) -> _Plan:
    config = model.config
    model_type = str(getattr(config, "model_type", "?"))
    try:
        dims = ModelDims.from_config(config)
    except Exception as exc:  # any config the planner cannot read is a refusal
        raise ValueError(f"the planner cannot read head counts and sizes from the config ({type(exc).__name__}: {exc})") from None
    counts = _layer_counts(config)
    if not counts:
        raise ValueError("the config names no layer count (num_hidden_layers)")
    layers_path = _find_layer_list(model, counts)
    layers = model.get_submodule(layers_path)
    kinds: dict[str, _Kind] = {}
    for i, (layer, kind_type) in enumerate(zip(layers, layer_types(config, len(layers)))):
        key = layer_kind(layer, kind_type)
        found = _infer_kind(layer, dims, key, f"{layers_path}.{i}")
        if key not in kinds:
            kinds[key] = found
        elif found.signature() != kinds[key].signature():
            # Same parameter names and layer type, different structure (shapes):
            # nothing that tells the layers apart by name; keep that kind whole.
            kind = kinds[key]
            for part in kind.parts:
                part.options = []
                part.notes.append(f"replicated: layers {layers_path}.* of kind {key} differ in shape (e.g. layer {i})")
    # Per-layer pieces kept in lists beside the layer list (XLM keeps its FFNs
    # in transformer.ffns): a role the layers lack is then not absent but
    # left whole there.
    siblings = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == len(layers) and n != layers_path
        and not _under(n, layers_path) and not any(h in n.lower() for h in TOWER_HINTS)
        and any(p.dim() >= 2 for p in m.parameters())
    ]
    if siblings:
        for kind in kinds.values():
            for part in kind.parts:
                if part.absent:
                    part.absent = False
                    part.notes.append(f"{part.role} replicated: per-layer modules in {', '.join(siblings)} are kept whole")
    # Parts of identical kinds are shared, so a choice applies to all of them.
    by_signature: dict[tuple, _Kind] = {}
    for kind in kinds.values():
        twin = by_signature.setdefault(kind.signature(), kind)
        if twin is not kind:
            kind.parts = twin.parts
    emb, head, emb_path, head_path = _vocab_parts(model, dims)
    plan = _Plan(model_type, layers_path, sorted(kinds.values(), key=lambda k: k.key), emb, head, emb_path, head_path)
    several = len({k.signature() for k in plan.kinds}) > 1
    for kind in plan.kinds:
        for part in kind.parts:
            part.several_kinds = several
    for kind in plan.kinds:
        for part in kind.parts:
            if part.certain and part.options:
                why = _tp_plan_disagreement(config, layers_path, dict(part.options[0].fields))
                if why:
                    # The roles we read disagree with transformers' own plan: prove them.
                    part.certain = False
                    part.notes.append(f"to prove: {why}")
    return plan


def infer_spec(model: nn.Module, passes: Prover) -> ArchSpec:
    """An ``ArchSpec`` (family ``"auto:<model_type>"``) read off ``model``'s structure.

    Parts it cannot shard with certainty are replicated (``spec.replicate``,
    per layer kind; ``spec.notes`` says why); readings that need proof are
    proven by ``passes`` (``check.hypothesis_passes``: a tiny random copy at
    TP=2, see the module docstring). Raises
    ValueError saying why when nothing in the layers can be sharded or the
    model cannot be read. Works on meta-device models (reads no weights).
    """
    model_type = getattr(model.config, "model_type", "?")
    try:
        plan = _infer_plan(model)
    except ValueError as exc:
        raise ValueError(f"{model_type}: {exc}") from None
    try:
        spec = _resolve(model, plan, passes)
    except Unprovable as exc:
        raise ValueError(f"{model_type}: {exc}") from None
    per_layer = [s for _, s in spec.layer_kinds] or [spec]
    if all(_shards_no_role(s) for s in per_layer):
        reasons = "; ".join(n for n in spec.notes if "replicated" in n) or "no attention or MLP found"
        raise ValueError(
            f"{model_type}: nothing in the layers can be sharded (a plan that only splits the vocabulary gives "
            f"no tensor parallelism): {reasons}"
        )
    return spec
