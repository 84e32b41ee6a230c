"""Infer an architecture spec from a model's module structure.

For a causal LM without a declared spec, ``infer_spec`` reads the model the
way a person would: the decoder layer list (a ModuleList as long as
``num_hidden_layers``), in each layer the attention module with separate
q/k/v/o projections (found by role names, checked against the head counts),
the MLP's column (hidden -> intermediate) and row (intermediate -> hidden)
projections (found by shape and role names), the input embedding and the LM
head. ``config.base_model_tp_plan`` (transformers' own glob -> style table),
where the config has one, must agree with every role.

It refuses (ValueError, saying why) whatever it cannot shard with certainty:
fused q/k/v, latent (low-rank) attention, mixture-of-experts or unrecognised
MLPs, cross-attention, layers that differ (hybrids), norms or per-head
parameters that span heads, extra projections inside attention, embeddings
or heads with their own forward. What it returns is still a guess about the
forward code, which is why ``models.resolve_spec`` uses it only after it
passes the parity check on a tiny copy (``tp_engine/check.py``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..plan import ModelDims
from .spec import ArchSpec

__all__ = ["infer_spec"]

# Role names (last path component of a projection).
Q_NAMES = ("q_proj", "query", "q", "wq", "Wq", "query_proj", "project_q", "q_lin")
K_NAMES = ("k_proj", "key", "k", "wk", "Wk", "key_proj", "project_k", "k_lin")
V_NAMES = ("v_proj", "value", "v", "wv", "Wv", "value_proj", "project_v", "v_lin")
O_NAMES = ("o_proj", "out_proj", "dense", "o", "wo", "Wo", "output_proj", "attention_out", "out_lin", "c_proj", "proj")
FUSED_QKV_HINTS = ("qkv", "query_key_value", "c_attn", "w_pack", "kv_proj", "in_proj")
LATENT_HINTS = ("q_a_proj", "kv_a_proj", "kv_b_proj", "q_b_proj", "kv_a_proj_with_mqa")
COLUMN_NAMES = (
    "gate_proj", "up_proj", "w1", "w3", "fc1", "c_fc", "fc_in", "dense_h_to_4h", "wi", "wi_0", "wi_1", "Wi",
    "linear_1", "layer_1", "lin1", "input_linear", "proj_up", "intermediate", "dense",
)
ROW_NAMES = (
    "down_proj", "w2", "fc2", "c_proj", "fc_out", "dense_4h_to_h", "wo", "Wo", "linear_2", "layer_2", "lin2",
    "output_linear", "proj_down", "out", "dense",
)
EXPERT_HINTS = ("expert", "router", "moe")
MIXER_HINTS = ("mamba", "mixer", "ssm", "conv", "linear_attn", "recurrent", "temporal", "mlstm", "rwkv")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
COLWISE = ("colwise", "colwise_rep", "local_colwise", "colwise_gather_output")
ROWWISE = ("rowwise", "rowwise_rep", "local_rowwise", "rowwise_split_input")


def _spec_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(ArchSpec)}


def _last(path: str) -> str:
    return path.rpartition(".")[2]


def _rel(path: str, root: str) -> str:
    """``path`` relative to the module at ``root`` ("" is the top)."""
    if not root:
        return path
    assert path == root or path.startswith(root + "."), (path, root)
    return path[len(root) + 1:]


def _in_out(module: nn.Module) -> tuple[int, int]:
    return module.in_features, module.out_features


def _is_plain_linear(module: nn.Module) -> bool:
    # A subclass with its own forward (LoRA wrappers, quantized or ternary
    # linears such as BitNet's) does something a ColumnParallelLinear would not.
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else None
    return text if text is not None else (getattr(config, "text_config", None) or config)


@dataclass(frozen=True)
class _Layer:
    """What one decoder layer looks like, relative to the layer."""

    attention: str
    q: str
    k: str
    v: str
    o: str
    core: str  # under ``attention``: the module holding q/k/v ("" = attention itself)
    q_attrs: tuple[str, ...]
    kv_attrs: tuple[str, ...]
    width_attrs: tuple[str, ...]
    mlp: str
    columns: tuple[str, ...]
    row: str


def _linears(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and n}


def _projection_like(module: nn.Module) -> dict[str, nn.Module]:
    """Linear layers and transformers' Conv1D (GPT-2 style, weight stored transposed)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        Conv1D = ()  # type: ignore[assignment]
    return {n: m for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))}


def _find_layer_list(model: nn.Module, n_layers: int) -> str:
    candidates = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n_layers and name
        and all(isinstance(x, nn.Module) and any(True for _ in x.parameters()) for x in m)
    ]
    # Per-layer lists of small pieces (XLM keeps attentions, norms and FFNs in
    # separate lists) are not decoder layers: a decoder layer holds attention.
    with_attention = [c for c in candidates if _has_qkv_somewhere(model.get_submodule(c)[0])]
    if len(with_attention) > 1:
        # Multimodal models: vision/audio towers have layer lists too. The
        # decoder's list is the one inside get_decoder(), or else the one
        # sharing the deepest ancestor with the input embedding.
        inside = _decoder_prefix(model)
        if inside is not None:
            narrowed = [c for c in with_attention if inside == "" or c.startswith(inside + ".")]
            with_attention = narrowed or with_attention
    if len(with_attention) > 1:
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

        best = max(shared(c) for c in with_attention)
        with_attention = [c for c in with_attention if shared(c) == best]
    if len(with_attention) == 1:
        return with_attention[0]
    if not candidates:
        raise ValueError(f"no ModuleList of {n_layers} layers (config.num_hidden_layers) in {type(model).__name__}")
    if not with_attention:
        raise ValueError(
            f"the layer list {candidates[0]} has no attention module with separate q/k/v projections"
            + _mixer_hint(model.get_submodule(candidates[0])[0])
        )
    raise ValueError(f"several {n_layers}-long layer lists with attention ({', '.join(with_attention)}): cannot tell which is the decoder")


def _decoder_prefix(model: nn.Module) -> str | None:
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - models without a decoder accessor raise various errors
        return None
    if not isinstance(decoder, nn.Module):
        return None
    try:
        return _path_of(model, decoder)
    except ValueError:
        return None


def _has_qkv_somewhere(layer: nn.Module) -> bool:
    return any(_qkv_children(m) is not None for m in layer.modules()) or any(
        any(h in _last(n).lower() for h in FUSED_QKV_HINTS + LATENT_HINTS) for n in _projection_like(layer)
    )


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


def _find_attention(layer: nn.Module, dims: ModelDims, where: str) -> tuple[str, str, str, str, str, str]:
    """(attention path, q, k, v, o, core) relative to the layer."""
    holders = [(n, _qkv_children(m)) for n, m in layer.named_modules()]
    holders = [(n, qkv) for n, qkv in holders if qkv is not None]
    linears = _projection_like(layer)
    if not holders:
        fused = [n for n in linears if any(h in _last(n).lower() for h in FUSED_QKV_HINTS)]
        latent = [n for n in linears if _last(n) in LATENT_HINTS]
        if latent:
            raise ValueError(f"{where}: latent (low-rank) attention ({', '.join(latent)}): heads are not separate q/k/v rows")
        if fused:
            raise ValueError(f"{where}: fused q/k/v projection {fused[0]}: its row layout cannot be inferred (needs a declared spec)")
        raise ValueError(f"{where}: no attention module with separate q/k/v projections" + _mixer_hint(layer))
    if len(holders) > 1:
        names = [n or "<layer>" for n, _ in holders]
        cross = [n for n in names if "cross" in n or "encoder" in n]
        what = f"cross-attention ({', '.join(cross)})" if cross else "several attention modules"
        raise ValueError(f"{where}: {what} besides {names[0]}: the auto-planner shards exactly one self-attention per layer")
    holder, (q, k, v) = holders[0]
    holder_mod = layer.get_submodule(holder)
    o_here = [n for n, m in holder_mod.named_children() if isinstance(m, nn.Linear) and n in O_NAMES]
    if len(o_here) == 1:
        attention, core, o = holder, "", o_here[0]
    elif not o_here and holder:
        # BERT-style: the q/k/v module sits next to an output module in a parent.
        parent = holder.rpartition(".")[0]
        parent_mod = layer.get_submodule(parent)
        outs = [
            n for n, m in parent_mod.named_modules()
            if isinstance(m, nn.Linear) and _last(n) in O_NAMES and not (n + ".").startswith(_rel(holder, parent) + ".")
        ]
        if len(outs) != 1:
            raise ValueError(f"{where}.{holder}: found q/k/v but {'no' if not outs else 'several'} output projection ({', '.join(outs)})")
        attention, core, o = parent, _rel(holder, parent), outs[0]
    else:
        raise ValueError(f"{where}.{holder}: found q/k/v but {'no' if not o_here else 'several'} output projection ({', '.join(o_here)})")
    prefix = f"{core}." if core else ""
    return attention, prefix + q, prefix + k, prefix + v, o, core


def _check_attention(layer: nn.Module, att: tuple[str, str, str, str, str, str], dims: ModelDims, where: str) -> None:
    attention, q, k, v, o, core = att
    attn = layer.get_submodule(attention)
    hd, nq, nkv = dims.head_dim, dims.num_q_heads, dims.num_kv_heads
    mods = {name: attn.get_submodule(name) for name in (q, k, v, o)}
    for name, m in mods.items():
        if not _is_plain_linear(m):
            raise ValueError(f"{where}.{attention}.{name} is a {type(m).__name__} with its own forward, not a plain nn.Linear")
    shapes = {name: _in_out(m) for name, m in mods.items()}
    expected = {q: (None, nq * hd), k: (None, nkv * hd), v: (None, nkv * hd), o: (nq * hd, None)}
    for name, (want_in, want_out) in expected.items():
        got_in, got_out = shapes[name]
        if (want_in is not None and got_in != want_in) or (want_out is not None and got_out != want_out):
            raise ValueError(
                f"{where}.{attention}: projection shapes (in, out) {shapes} disagree with {nq} Q / {nkv} KV heads "
                f"of dim {hd} from the config"
            )
    if not shapes[q][0] == shapes[k][0] == shapes[v][0]:
        raise ValueError(f"{where}.{attention}: q/k/v read different widths {shapes[q][0]}/{shapes[k][0]}/{shapes[v][0]}")
    if shapes[o][1] != shapes[q][0]:
        raise ValueError(f"{where}.{attention}: {o} writes {shapes[o][1]} features but {q} reads {shapes[q][0]}")
    # Anything else with weights inside the attention's q/k/v module works on
    # sharded activations: only per-head norms (width head_dim) are safe.
    core_mod = attn.get_submodule(core) if core else attn
    core_prefix = f"{core}." if core else ""
    used = {name for name in (q, k, v, o)}
    for name, m in core_mod.named_modules():
        full = core_prefix + name
        if not name or full in used or any(full.startswith(u + ".") for u in used):
            continue
        if isinstance(m, nn.Linear):
            raise ValueError(
                f"{where}.{attention}.{full}: an extra projection {_in_out(m)} inside attention; "
                f"only separate q/k/v/o can be sharded by the auto-planner"
            )
        if isinstance(m, nn.Embedding):
            raise ValueError(f"{where}.{attention}.{full}: an embedding inside attention (relative positions?) is not supported")
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() == 1 and p.shape[0] == hd:
                continue  # a per-head norm (q_norm/k_norm over head_dim): replicated, unaffected
            raise ValueError(
                f"{where}.{attention}.{full}.{pname} (shape {tuple(p.shape)}) acts on the attention's "
                f"sharded activations; only head_dim-wide norms are safe to replicate"
            )
    for pname, p in core_mod.named_parameters(recurse=False):
        raise ValueError(
            f"{where}.{attention}.{core_prefix}{pname} (shape {tuple(p.shape)}): a parameter of the attention module "
            f"itself (per-head sinks or scales?) would need sharding"
        )


def _head_attrs(module: nn.Module, dims: ModelDims) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Integer attributes holding the Q / KV head counts or the Q width (made rank-local)."""
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
        elif lname in ("all_head_size", "inner_dim") and value == dims.num_q_heads * dims.head_dim:
            width.append(name)
    return tuple(q_attrs), tuple(kv_attrs), tuple(width)


def _find_mlp(layer: nn.Module, attention: str, dims: ModelDims, where: str) -> tuple[str, tuple[str, ...], str]:
    hidden, inter = dims.hidden_size, dims.intermediate_size
    outside = {
        n: m for n, m in _linears(layer).items()
        if not (attention and (n == attention or n.startswith(attention + ".")))
    }
    columns = [n for n, m in outside.items() if _in_out(m) == (hidden, inter)]
    rows = [n for n, m in outside.items() if _in_out(m) == (inter, hidden)]
    experts = sorted({n.split(".")[0] for n, _ in layer.named_modules() if any(h in n.lower() for h in EXPERT_HINTS)})
    three_d = [n for n, p in layer.named_parameters() if p.dim() == 3 and not (attention and n.startswith(attention + "."))]
    if experts or three_d:
        raise ValueError(
            f"{where}: mixture-of-experts MLP ({', '.join(experts or three_d[:2])}): the auto-planner does not shard experts"
        )
    if len(rows) != 1 or not 1 <= len(columns) <= 2:
        fused = [n for n, m in outside.items() if _in_out(m) in ((hidden, 2 * inter),)]
        if fused and len(rows) == 1:
            raise ValueError(f"{where}: fused gate/up projection {fused[0]} ({hidden} -> 2 x {inter}): its layout cannot be inferred")
        # An MLP of another width than the config's is a plan the planner would get wrong.
        for n, m in outside.items():
            i, o = _in_out(m)
            if i == hidden and o != inter and _last(n) in COLUMN_NAMES and any(
                _in_out(r) == (o, hidden) and _last(rn) in ROW_NAMES for rn, r in outside.items()
            ):
                raise ValueError(
                    f"{where}: the MLP is {hidden} -> {o} -> {hidden} ({n}), but the planner reads intermediate "
                    f"size {inter} from the config"
                )
        raise ValueError(
            f"{where}: no recognisable MLP: expected one or two {hidden} -> {inter} projections and one "
            f"{inter} -> {hidden}, found {len(columns)} and {len(rows)} (intermediate size from the config: {inter})"
            + _mixer_hint(layer)
        )
    for n in columns + rows:
        if not _is_plain_linear(outside[n]):
            raise ValueError(f"{where}.{n} is a {type(outside[n]).__name__} with its own forward, not a plain nn.Linear")
    unknown = [n for n in columns if _last(n) not in COLUMN_NAMES] + [n for n in rows if _last(n) not in ROW_NAMES]
    if unknown:
        raise ValueError(f"{where}: MLP projections with unfamiliar names ({', '.join(unknown)}): roles not certain")
    paths = columns + rows
    parts = [p.split(".")[:-1] for p in paths]
    common: list[str] = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    mlp = ".".join(common)
    # Everything with weights inside the MLP module besides the projections
    # sees sharded activations (BitNet's ffn_sub_norm normalizes all columns).
    if mlp:
        mlp_mod = layer.get_submodule(mlp)
        for n, m in mlp_mod.named_modules():
            full = f"{mlp}.{n}" if n else mlp
            if full in paths or not n:
                continue
            for pname, p in m.named_parameters(recurse=False):
                if inter in p.shape:
                    raise ValueError(f"{where}.{full}.{pname} (shape {tuple(p.shape)}) spans the MLP's sharded columns")
    return mlp, tuple(_rel(c, mlp) for c in columns), _rel(rows[0], mlp)


def _infer_layer(layer: nn.Module, dims: ModelDims, where: str) -> _Layer:
    att = _find_attention(layer, dims, where)
    _check_attention(layer, att, dims, where)
    attention, q, k, v, o, core = att
    attn = layer.get_submodule(attention)
    q_attrs, kv_attrs, width = _head_attrs(attn.get_submodule(core) if core else attn, dims)
    if dims.num_q_heads == dims.num_kv_heads:
        q_attrs, kv_attrs = q_attrs + kv_attrs, ()
    mlp, columns, row = _find_mlp(layer, attention, dims, where)
    return _Layer(attention, q, k, v, o, core, q_attrs, kv_attrs, width, mlp, columns, row)


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of the model")


def _embedding(model: nn.Module, dims: ModelDims) -> str:
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"the input embedding is a {type(emb).__name__}, not an nn.Embedding")
    if type(emb).forward is not nn.Embedding.forward:
        # A scaled embedding is fine when the scale is where parallelize reads it.
        scale = getattr(emb, "embed_scale", None)
        known = getattr(emb, "scalar_embed_scale", None) is not None or (
            scale is not None and hasattr(scale, "shape")
        ) or scale == 1.0
        if not known:
            raise ValueError(
                f"the input embedding {type(emb).__name__} has its own forward (scale {scale!r}) that a "
                f"vocab-parallel embedding would not reproduce"
            )
    if emb.num_embeddings != dims.vocab_size:
        raise ValueError(f"the input embedding has {emb.num_embeddings} rows, the config says vocab_size {dims.vocab_size}")
    return _path_of(model, emb)


def _lm_head(model: nn.Module, dims: ModelDims) -> str:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
    if not _is_plain_linear(head):
        raise ValueError(f"the LM head is a {type(head).__name__}, not a plain nn.Linear")
    if head.out_features != dims.vocab_size:
        raise ValueError(f"the LM head has {head.out_features} outputs, the config says vocab_size {dims.vocab_size}")
    return _path_of(model, head)


def _tp_plan_check(config: Any, layers: str, layer: _Layer) -> None:
    """transformers' own plan (glob -> style), where present, must agree with every role we inferred."""
    plan = getattr(_text_config(config), "base_model_tp_plan", None) or getattr(config, "base_model_tp_plan", None)
    if not plan:
        return

    def join(*parts: str) -> str:
        return ".".join(p for p in parts if p)

    roles = {join(layer.attention, n): "colwise" for n in (layer.q, layer.k, layer.v)}
    roles[join(layer.attention, layer.o)] = "rowwise"
    roles.update({join(layer.mlp, c): "colwise" for c in layer.columns})
    roles[join(layer.mlp, layer.row)] = "rowwise"
    for rel, want in roles.items():
        path = f"{layers}.0.{rel}"
        for glob, style in plan.items():
            pattern = re.escape(glob).replace(r"\*", r"\d+")
            if not re.search(rf"(^|\.){pattern}$", path):
                continue
            style = str(style)
            ok = style in (COLWISE if want == "colwise" else ROWWISE)
            if not ok:
                raise ValueError(
                    f"transformers' base_model_tp_plan marks {glob} as {style!r}, the auto-planner inferred "
                    f"{want} for {path}: the two disagree"
                )


def _refuse_by_config(config: Any) -> None:
    text = _text_config(config)
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 1:
            raise ValueError(f"mixture of experts ({key}={value}): the auto-planner does not shard experts")
    if getattr(text, "add_cross_attention", False):
        raise ValueError("the config adds cross-attention (add_cross_attention=True)")


def infer_spec(model: nn.Module) -> ArchSpec:
    """An ``ArchSpec`` (family ``"auto:<model_type>"``) read off ``model``'s structure.

    Raises ValueError saying why when the structure is not one the auto-planner
    can shard with certainty. Works on meta-device models (reads no weights).
    """
    config = model.config
    model_type = getattr(config, "model_type", "?")
    try:
        _refuse_by_config(config)
        try:
            dims = ModelDims.from_config(config)
        except Exception as exc:  # noqa: BLE001 - any config the planner cannot read is a refusal
            raise ValueError(f"the planner cannot read head counts and sizes from the config ({type(exc).__name__}: {exc})") from None
        text = _text_config(config)
        n_layers = next((getattr(text, k) for k in _LAYER_KEYS if isinstance(getattr(text, k, None), int)), None)
        if n_layers is None:
            raise ValueError("the config names no layer count (num_hidden_layers)")
        layers_path = _find_layer_list(model, n_layers)
        layers = model.get_submodule(layers_path)
        found = [_infer_layer(layer, dims, f"{layers_path}.{i}") for i, layer in enumerate(layers)]
    except ValueError as exc:
        raise ValueError(f"{model_type}: {exc}") from None
    first = found[0]
    for i, other in enumerate(found[1:], 1):
        if other != first:
            raise ValueError(f"{model_type}: layers differ in structure (layer 0: {first}; layer {i}: {other})")
    try:
        embedding = _embedding(model, dims)
        lm_head = _lm_head(model, dims)
        _tp_plan_check(config, layers_path, first)
    except ValueError as exc:
        raise ValueError(f"{model_type}: {exc}") from None

    fields = _spec_fields()
    extra: dict[str, Any] = {}
    if first.core:
        if "attention_core" not in fields:
            raise ValueError(f"{model_type}: q/k/v live in {first.attention}.{first.core}, which needs ArchSpec.attention_core")
        extra["attention_core"] = first.core
    if first.width_attrs:
        if "q_width_attrs" not in fields:
            raise ValueError(f"{model_type}: attention width attributes {first.width_attrs} need ArchSpec.q_width_attrs")
        extra["q_width_attrs"] = first.width_attrs
    return ArchSpec(
        family=f"auto:{model_type}",
        layers=layers_path,
        attention=first.attention,
        q_proj=first.q,
        k_proj=first.k,
        v_proj=first.v,
        o_proj=first.o,
        mlp=first.mlp,
        mlp_column=first.columns,
        mlp_row=first.row,
        embedding=embedding,
        lm_head=lm_head,
        q_head_attrs=first.q_attrs,
        kv_head_attrs=first.kv_attrs,
        **extra,
    )
