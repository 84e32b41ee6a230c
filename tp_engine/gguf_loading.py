"""Read this rank's slices of a GGUF checkpoint, dequantizing only what it holds.

llama.cpp stores a matrix row by row, and every quantization block lies
inside one row (blocks run along the in-features). So a range of rows
(column-parallel layers, vocabulary shards) is cut from the packed bytes
*before* dequantizing; a range of columns (row-parallel layers) needs whole
rows, dequantized a chunk of rows at a time and cut.

Names and value transforms follow transformers' own GGUF conversion
(``transformers.modeling_gguf_pytorch_utils``): its name map, its tensor
processors, and gguf's ``dequantize``, so a rank's slice holds exactly the
values transformers would load for those rows. The one transform that is
not elementwise, llama.cpp's Q/K rotary permutation, acts within each head,
so it is undone on whole heads here and the slice cut afterwards.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    Gemma2TensorProcessor,
    LlamaTensorProcessor,
    NemotronTensorProcessor,
    TensorProcessor,
    get_gguf_hf_weights_map,
    read_field,
)

from .layers import ShardSpec

# ``gguf`` is imported where a GGUF file is read, not here: an optional
# dependency that safetensors-only users need not have installed.

# Largest number of float32 values dequantized at once (64 MiB).
CHUNK_ELEMENTS = 1 << 24


def _writable(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array``; copied first if it is a read-only file mapping."""
    if not array.flags.writeable:
        array = np.array(array)
    return torch.from_numpy(array)


def _name_map(architecture: str, model: nn.Module, text_config: Any) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, from gguf's table for this architecture.

    The same table transformers' ``get_gguf_hf_weights_map`` consults, looked
    up once for the whole model instead of once per submodule.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map  # optional dependency, see the imports

    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        return {}
    table = get_tensor_name_map(arch, int(text_config.num_hidden_layers))
    mapping = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = hf_name
    return mapping


class GGUFCheckpoint:
    """The tensors of one GGUF file, keyed by Hugging Face parameter name."""

    def __init__(self, path: str, config: Any, skeleton: nn.Module):
        from gguf import GGUFReader  # optional dependency, see the imports

        self.path = path
        try:
            self.reader = GGUFReader(path)
            architecture = read_field(self.reader, "general.architecture")[0]
        except Exception as exc:  # gguf raises ValueError, IndexError, struct errors...
            raise ValueError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
        # Transforms that commute with cutting rows: identity and elementwise ones.
        self._elementwise = type(self.processor) in (TensorProcessor, Gemma2TensorProcessor, NemotronTensorProcessor)
        self._llama = type(self.processor) is LlamaTensorProcessor
        text = getattr(config, "text_config", None) or config
        self._heads = {
            ".attn_q.": int(text.num_attention_heads),
            ".attn_k.": int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        }
        name_map = _name_map(architecture, skeleton, text)
        if not set(dict(skeleton.named_parameters())) <= set(name_map.values()):
            # Layouts the flat lookup misses: transformers' own (slower, recursive) map.
            name_map = {**get_gguf_hf_weights_map(skeleton, self.processor), **name_map}
        self.tensors: dict[str, tuple[str, Any]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for tensor in self.reader.tensors:
            hf_name = name_map.get(tensor.name)
            if hf_name is None:
                continue
            self.tensors[hf_name] = (tensor.name, tensor)
            # ggml lists dimensions fastest-moving first, torch the other way round
            self.shapes[hf_name] = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        self.default_dtype = torch.float32

    def where(self, name: str) -> str:
        return self.path

    def close(self) -> None:
        self.reader = None
        self.tensors.clear()

    # ------------------------------------------------------------ reading

    def _permuted_heads(self, gguf_name: str) -> int | None:
        """Heads of a tensor llama.cpp permuted for its rotary layout, else None."""
        if not self._llama:
            return None
        for key, heads in self._heads.items():
            if key in gguf_name:
                return heads
        return None

    def _full(self, gguf_name: str, tensor: Any) -> torch.Tensor:
        """The whole tensor, converted exactly as transformers' GGUF loader does."""
        from gguf import dequantize  # optional dependency, see the imports

        weights = dequantize(tensor.data, tensor.tensor_type)
        weights = self.processor.process(weights=weights, name=gguf_name).weights
        return torch.from_numpy(np.copy(weights))

    def _rows(self, gguf_name: str, tensor: Any, start: int, stop: int):
        """Yield (first, last, values) for Hugging Face rows [start, stop), in chunks.

        ``values`` is a float32 array of rows [first, last) with all columns,
        in Hugging Face's order (rotary permutation undone).
        """
        from gguf import dequantize  # optional dependency, see the imports

        data = tensor.data
        heads = self._permuted_heads(gguf_name)
        unit = 1
        if heads:
            if data.shape[0] % heads or (data.shape[0] // heads) % 2:
                raise ValueError(f"{self.path}: {gguf_name} has {data.shape[0]} rows, not {heads} heads of even size")
            unit = data.shape[0] // heads  # head_dim: the permutation stays inside a head
        lo, hi = start // unit * unit, -(-stop // unit) * unit
        row_elements = max(1, math.prod(self.shape_of(tensor)[1:]))
        step = max(unit, CHUNK_ELEMENTS // row_elements // unit * unit)
        for c0 in range(lo, hi, step):
            c1 = min(c0 + step, hi)
            block = dequantize(data[c0:c1], tensor.tensor_type)
            if heads:
                n = (c1 - c0) // unit
                block = block.reshape(n, unit // 2, 2, *block.shape[1:]).swapaxes(2, 1).reshape(block.shape)
            elif not self._llama:
                block = self.processor.process(weights=block, name=gguf_name).weights
            first, last = max(c0, start), min(c1, stop)
            yield first, last, block[first - c0 : last - c0]

    @staticmethod
    def shape_of(tensor: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(tensor.shape.tolist()))

    def _sliceable(self, gguf_name: str, tensor: Any, spec: ShardSpec) -> bool:
        shape = self.shape_of(tensor)
        if spec.dim not in (0, 1) or spec.dim >= len(shape) or len(shape) > 2:
            return False
        if tensor.data.ndim != len(shape):  # e.g. a quantized vector: rows are not separable
            return False
        return self._llama or self._elementwise

    def read(self, name: str, spec: ShardSpec, dtype: torch.dtype) -> torch.Tensor:
        """This shard of tensor ``name`` (full checkpoint coordinates in ``spec``)."""
        gguf_name, tensor = self.tensors[name]
        shape = self.shape_of(tensor)
        if spec.replicated or not self._sliceable(gguf_name, tensor, spec):
            full = self._full(gguf_name, tensor).reshape(shape)
            return spec.take(full).to(dtype).contiguous()
        out_shape = list(shape)
        out_shape[spec.dim] = spec.length()
        out = torch.empty(out_shape, dtype=dtype)
        if spec.dim == 0:
            offset = 0
            for a, b in spec.ranges:
                for first, last, block in self._rows(gguf_name, tensor, a, b):
                    out[offset + first - a : offset + last - a].copy_(_writable(block).reshape(last - first, *shape[1:]))
                offset += b - a
        else:  # columns of a matrix: whole rows, chunk by chunk
            for first, last, block in self._rows(gguf_name, tensor, 0, shape[0]):
                offset = 0
                for a, b in spec.ranges:
                    out[first:last, offset : offset + b - a].copy_(_writable(block[:, a:b]))
                    offset += b - a
        return out
