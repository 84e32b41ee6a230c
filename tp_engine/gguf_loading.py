"""Read this rank's slices of a GGUF checkpoint: as the file's quantization blocks, or dequantized.

llama.cpp stores a matrix row by row, and every quantization block lies
inside one row (blocks run along the in-features). So a range of rows
(column-parallel layers, vocabulary shards) is cut from the packed bytes
*before* dequantizing; a range of columns (row-parallel layers) needs whole
rows, dequantized a chunk of rows at a time and cut.

Kept quantized (:meth:`GGUFCheckpoint.read_blocks`): a rank's rows of
packed blocks, or, for a row-parallel cut on block boundaries, the band of
whole blocks of every row, read from the file with plain reads (no mapping
of the whole file stays resident). :meth:`GGUFCheckpoint.keep_problem` says
why a tensor cannot stay quantized for a given slice (no kernel for its
type, a cut inside a block, a value transform), so the caller dequantizes
exactly that tensor and can say so.

Names and value transforms follow transformers' own GGUF conversion
(``transformers.modeling_gguf_pytorch_utils``): its name map, its tensor
processors, and gguf's ``dequantize``, so a rank's slice holds exactly the
values transformers would load for those rows. The one transform that is
not elementwise, llama.cpp's Q/K rotary permutation, acts within each head,
so it is undone on whole heads here and the slice cut afterwards.
"""
from __future__ import annotations

import math
import os
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
)

from .gguf_header import TensorInfo, read_header
from .kernels import gguf_gemm
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
        self.path = path
        # The lean header: tensor records and scalar metadata, the tokenizer's arrays skipped.
        header = read_header(path)
        architecture = header.metadata.get("general.architecture")
        if not isinstance(architecture, str):
            raise ValueError(f"{path}: GGUF metadata has no general.architecture")
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
        self.tensors: dict[str, tuple[str, TensorInfo]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for tensor in header.tensors:
            hf_name = name_map.get(tensor.name)
            if hf_name is None:
                continue
            self.tensors[hf_name] = (tensor.name, tensor)
            self.shapes[hf_name] = tensor.shape
        self.default_dtype = torch.float32
        self._file = None

    def where(self, name: str) -> str:
        return self.path

    def close(self) -> None:
        self.tensors.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    # ------------------------------------------------------------ quantized blocks

    def qtype(self, name: str) -> int:
        """The ggml type id of tensor ``name`` (0 F32, 1 F16, 30 BF16, 12 Q4_K, ...)."""
        return self.tensors[name][1].qtype

    def is_quantized(self, name: str) -> bool:
        """Whether ``name`` is stored in quantization blocks (not F32/F16/BF16/F64 or integers)."""
        return self.tensors[name][1].quantized

    def keep_problem(self, name: str, spec: ShardSpec) -> str | None:
        """Why tensor ``name`` cannot stay in its quantization blocks for slice ``spec``; None if it can.

        Only called for quantized tensors. The slice must be rows (any) or
        columns on block boundaries of a matrix, and the loader's value
        transform for the tensor a reordering of rows (or nothing).
        """
        gguf_name, tensor = self.tensors[name]
        qtype = tensor.qtype
        kind = tensor.type_name
        if qtype not in gguf_gemm.SUPPORTED:
            return f"{kind} has no tp-engine matmul kernel"
        shape = tensor.shape
        if len(shape) != 2:
            return f"a {len(shape)}-D {kind} tensor (only matrices stay quantized)"
        if not (self._llama or self._elementwise):
            return f"transformers' {type(self.processor).__name__} changes its values"
        if not spec.replicated and spec.dim == 1:
            qk = gguf_gemm.block_shape(qtype)[0]
            for a, b in spec.ranges:
                for cut in (a, b):
                    if cut % qk:
                        return (f"row-parallel cut at input {cut} is inside a {qk}-element {kind} block "
                                f"(rank slice {a}..{b} of {shape[1]})")
        return None

    def block_unit(self, in_features: int) -> int:
        """The least common multiple of the block sizes of the quantized matrices with ``in_features`` inputs.

        The planner cuts the MLP on multiples of this (the down projections'
        inputs), so their row-parallel slices are whole blocks. 1 if none.
        """
        unit = 1
        for _, tensor in self.tensors.values():
            shape = tensor.shape
            if len(shape) == 2 and shape[1] == in_features and tensor.qtype in gguf_gemm.SUPPORTED:
                unit = math.lcm(unit, gguf_gemm.block_shape(tensor.qtype)[0])
        return unit

    def _pread(self, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` (contiguous) with the file's bytes at ``offset``."""
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"{self.path}: file ends inside tensor data (truncated?)")
            done += n

    @staticmethod
    def _row_bytes(tensor: TensorInfo) -> int:
        """Bytes of one stored row (one element of a vector)."""
        return tensor.nbytes // max(1, tensor.data_shape[0]) if tensor.data_shape else tensor.nbytes

    def _raw_rows(self, tensor: TensorInfo, lo: int, hi: int) -> np.ndarray:
        """Packed rows [lo, hi) in the file's order, uint8 (hi - lo, row_bytes)."""
        row_bytes = self._row_bytes(tensor)
        out = np.empty((hi - lo, row_bytes), dtype=np.uint8)
        self._pread(tensor.offset + lo * row_bytes, out)
        return out

    def _data(self, tensor: TensorInfo, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        """Stored rows [lo, hi) (all by default) as ``gguf.GGUFReader``'s array of the tensor would give
        them (its dtype and shape), read from the file rather than mapped."""
        if not tensor.data_shape:  # a scalar
            raw = np.empty(tensor.nbytes, dtype=np.uint8)
            self._pread(tensor.offset, raw)
            return raw.view(tensor.data_dtype).reshape(())
        lo, hi = (0, tensor.data_shape[0]) if lo is None else (lo, hi)
        return self._raw_rows(tensor, lo, hi).view(tensor.data_dtype).reshape(hi - lo, *tensor.data_shape[1:])

    def _block_rows(self, gguf_name: str, tensor: TensorInfo, start: int, stop: int):
        """Yield (first, last, packed rows) for Hugging Face rows [start, stop), in chunks.

        As :meth:`_rows`, on the packed bytes: llama.cpp's rotary permutation
        of q/k rows (within a head) is undone by reordering whole rows.
        """
        rows, row_bytes = tensor.data_shape
        heads = self._permuted_heads(gguf_name)
        unit = 1
        if heads:
            if rows % heads or (rows // heads) % 2:
                raise ValueError(f"{self.path}: {gguf_name} has {rows} rows, not {heads} heads of even size")
            unit = rows // heads
        lo, hi = start // unit * unit, -(-stop // unit) * unit
        step = max(unit, (CHUNK_ELEMENTS // max(1, row_bytes)) // unit * unit)
        for c0 in range(lo, hi, step):
            c1 = min(c0 + step, hi)
            block = self._raw_rows(tensor, c0, c1)
            if heads:
                n = (c1 - c0) // unit
                block = block.reshape(n, unit // 2, 2, row_bytes).swapaxes(2, 1).reshape(block.shape)
            first, last = max(c0, start), min(c1, stop)
            yield first, last, block[first - c0 : last - c0]

    def read_blocks(self, name: str, spec: ShardSpec) -> tuple[torch.Tensor, int, int]:
        """This shard of quantized matrix ``name`` as the file's blocks: (uint8 (rows, row_bytes), qtype, in_features).

        ``spec`` as for :meth:`read`; :meth:`keep_problem` must have allowed it.
        """
        gguf_name, tensor = self.tensors[name]
        qtype = tensor.qtype
        rows, cols = tensor.shape
        qk, qb = gguf_gemm.block_shape(qtype)
        row_bytes = cols // qk * qb
        # Rows not permuted for rotary are read straight into place: no chunk buffer on top of the result.
        direct = self._permuted_heads(gguf_name) is None
        if spec.replicated or spec.dim == 0:
            ranges = ((0, rows),) if spec.replicated else spec.ranges
            out = np.empty((sum(b - a for a, b in ranges), row_bytes), dtype=np.uint8)
            offset = 0
            for a, b in ranges:
                if direct:
                    self._pread(tensor.offset + a * row_bytes, out[offset : offset + b - a])
                else:
                    for first, last, block in self._block_rows(gguf_name, tensor, a, b):
                        out[offset + first - a : offset + last - a] = block
                offset += b - a
            return torch.from_numpy(out), qtype, cols
        local = spec.length()
        out = np.empty((rows, local // qk * qb), dtype=np.uint8)
        bands = []  # (first byte in a row, bytes) of each range, and where it goes in the output row
        offset = 0
        for a, b in spec.ranges:
            bands.append((a // qk * qb, (b - a) // qk * qb, offset))
            offset += (b - a) // qk * qb
        if direct:  # one read per row and range: only this rank's bytes leave the file
            for r in range(rows):
                for start, width, at in bands:
                    self._pread(tensor.offset + r * row_bytes + start, out[r, at : at + width])
            return torch.from_numpy(out), qtype, local
        for first, last, block in self._block_rows(gguf_name, tensor, 0, rows):
            for start, width, at in bands:
                out[first:last, at : at + width] = block[:, start : start + width]
        return torch.from_numpy(out), qtype, local

    # ------------------------------------------------------------ reading

    def _permuted_heads(self, gguf_name: str) -> int | None:
        """Heads of a tensor llama.cpp permuted for its rotary layout, else None."""
        if not self._llama:
            return None
        for key, heads in self._heads.items():
            if key in gguf_name:
                return heads
        return None

    def _full(self, gguf_name: str, tensor: TensorInfo) -> torch.Tensor:
        """The whole tensor, converted exactly as transformers' GGUF loader does."""
        from gguf import GGMLQuantizationType, dequantize  # optional dependency, see the imports

        weights = dequantize(self._data(tensor), GGMLQuantizationType(tensor.qtype))
        weights = self.processor.process(weights=weights, name=gguf_name).weights
        return torch.from_numpy(np.copy(weights))

    def _rows(self, gguf_name: str, tensor: TensorInfo, start: int, stop: int):
        """Yield (first, last, values) for Hugging Face rows [start, stop), in chunks.

        ``values`` is a float32 array of rows [first, last) with all columns,
        in Hugging Face's order (rotary permutation undone).
        """
        from gguf import GGMLQuantizationType, dequantize  # optional dependency, see the imports

        qtype = GGMLQuantizationType(tensor.qtype)
        rows = tensor.data_shape[0]
        heads = self._permuted_heads(gguf_name)
        unit = 1
        if heads:
            if rows % heads or (rows // heads) % 2:
                raise ValueError(f"{self.path}: {gguf_name} has {rows} rows, not {heads} heads of even size")
            unit = rows // heads  # head_dim: the permutation stays inside a head
        lo, hi = start // unit * unit, -(-stop // unit) * unit
        row_elements = max(1, math.prod(tensor.shape[1:]))
        step = max(unit, CHUNK_ELEMENTS // row_elements // unit * unit)
        for c0 in range(lo, hi, step):
            c1 = min(c0 + step, hi)
            block = dequantize(self._data(tensor, c0, c1), qtype)
            if heads:
                n = (c1 - c0) // unit
                block = block.reshape(n, unit // 2, 2, *block.shape[1:]).swapaxes(2, 1).reshape(block.shape)
            elif not self._llama:
                block = self.processor.process(weights=block, name=gguf_name).weights
            first, last = max(c0, start), min(c1, stop)
            yield first, last, block[first - c0 : last - c0]

    def _sliceable(self, gguf_name: str, tensor: TensorInfo, spec: ShardSpec) -> bool:
        shape = tensor.shape
        if spec.dim not in (0, 1) or spec.dim >= len(shape) or len(shape) > 2:
            return False
        if len(shape) == 1 and tensor.data_shape != shape:  # a vector stored as blocks or bytes (BF16)
            return False
        return self._llama or self._elementwise

    def read(self, name: str, spec: ShardSpec, dtype: torch.dtype) -> torch.Tensor:
        """This shard of tensor ``name`` (full checkpoint coordinates in ``spec``)."""
        gguf_name, tensor = self.tensors[name]
        shape = tensor.shape
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


class GGUFLoadReport:
    """Which GGUF tensors a rank keeps in their quantization blocks, and which it dequantizes and why."""

    def __init__(self, mlp_unit: int = 1, mlp_columns: range | None = None) -> None:
        self.kept: dict[str, tuple[int, int]] = {}  # ggml type name -> (tensors, bytes held)
        self.dequantized: list[tuple[str, str, str]] = []  # (tensor, ggml type, why)
        self.mlp_unit = mlp_unit  # the planner cut the MLP on multiples of this ...
        self.mlp_columns = mlp_columns  # ... giving this rank these columns

    def keep(self, kind: str, nbytes: int) -> None:
        count, total = self.kept.get(kind, (0, 0))
        self.kept[kind] = (count + 1, total + nbytes)

    def dequantize(self, name: str, kind: str, why: str) -> None:
        self.dequantized.append((name, kind, why))

    def lines(self) -> list[str]:
        """One summary line, then one line per dequantized tensor."""
        kept = ", ".join(f"{kind} x{n} ({nbytes / 2**20:.1f} MiB)" for kind, (n, nbytes) in sorted(self.kept.items()))
        out = [f"GGUF kept quantized: {kept or 'nothing'}; dequantized: {len(self.dequantized) or 'none'}"]
        if self.mlp_unit > 1 and self.mlp_columns is not None:
            cols = self.mlp_columns
            out.append(f"  MLP cols [{cols.start}, {cols.stop}): cut on {self.mlp_unit}-column blocks of the down projections")
        out += [f"  dequantized {name} ({kind}): {why}" for name, kind, why in self.dequantized]
        return out
