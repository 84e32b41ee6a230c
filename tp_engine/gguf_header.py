"""A lean reader of a GGUF file's header: scalar metadata and the tensor table, nothing else.

``gguf.GGUFReader`` builds a numpy object for every element of every
metadata array; for a 150k-token vocabulary (tokens, merges, scores, token
types) that is hundreds of MiB of short-lived objects in every rank, just to
learn the tensor offsets and a dozen config numbers. This reader walks the
same bytes and keeps scalars, strings and short arrays, but steps over long
arrays by their lengths (:class:`SkippedArray` records the element type and
count, which is all a config needs of a vocabulary).

The format (little-endian, versions 2 and 3): magic ``GGUF``, u32 version,
u64 tensor count, u64 key/value count; the key/value pairs (string key,
u32 value type, value); one record per tensor (string name, u32 n_dims,
u64 dims fastest-moving first, u32 ggml type, u64 offset from the data
start); then padding to ``general.alignment`` (default 32) and the data.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted with 32-bit integers; no file in use still has it
DEFAULT_ALIGNMENT = 32

# Arrays longer than this are skipped, not read (tokenizer tables; a config's arrays are a few entries).
MAX_KEPT_ARRAY = 1024

# Metadata value types: fixed-size scalars (struct format), then STRING = 8 and ARRAY = 9.
_SCALAR_FORMAT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9

# ggml tensor types: id -> (name, elements per block, bytes per block). The format's own
# constants (ggml.h); tests check them against the gguf package's GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# Types stored as plain numpy values (the rest, BF16 included, are bytes: numpy has no bfloat16).
NUMPY_TYPES = {0: "float32", 1: "float16", 28: "float64", 24: "int8", 25: "int16", 26: "int32", 27: "int64"}


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array too long to be worth reading: its element type and length."""

    element_type: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's record: where its data lies and how it is stored."""

    name: str
    dims: tuple[int, ...]  # ggml order: fastest-moving first
    qtype: int  # ggml type id
    offset: int  # absolute, from the start of the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape in torch order."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.qtype][0]

    @property
    def quantized(self) -> bool:
        """Stored in blocks of several elements (not F32/F16/BF16/F64 or integers)."""
        return GGML_TYPES[self.qtype][1] > 1

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The stored array's shape, as ``gguf.GGUFReader`` gives it: elements for numpy types, and
        for the others (blocks, BF16) the last dimension in bytes."""
        shape = self.shape
        if self.qtype in NUMPY_TYPES or not shape:
            return shape
        _, qk, qb = GGML_TYPES[self.qtype]
        return (*shape[:-1], shape[-1] // qk * qb)

    @property
    def data_dtype(self) -> str:
        """The numpy dtype of :attr:`data_shape` (``uint8`` for blocks and BF16)."""
        return NUMPY_TYPES.get(self.qtype, "uint8")


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata (long arrays skipped) and tensor table."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_start: int  # absolute offset of the tensor data section

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


class _Cursor:
    """Sequential little-endian reads from a mapped file; running off its end is a ValueError."""

    def __init__(self, buffer: mmap.mmap, path: str):
        self.buffer, self.path, self.pos = buffer, path, 0

    def unpack(self, fmt: str) -> tuple:
        try:
            values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        except struct.error:
            raise ValueError(f"{self.path}: file ends inside the GGUF header (truncated?)") from None
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self, what: str) -> str:
        (length,) = self.unpack("Q")
        end = self.pos + length
        if end > len(self.buffer):
            raise ValueError(f"{self.path}: file ends inside the GGUF header (truncated?)")
        raw = self.buffer[self.pos : end]
        self.pos = end
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} is not valid UTF-8 (corrupt GGUF header?)") from None

    def skip_strings(self, count: int) -> None:
        unpack_from, buffer, pos, size = struct.unpack_from, self.buffer, self.pos, len(self.buffer)
        for _ in range(count):  # each string says its own length: nothing to do but walk them
            if pos + 8 > size:
                raise ValueError(f"{self.path}: file ends inside the GGUF header (truncated?)")
            pos += 8 + unpack_from("<Q", buffer, pos)[0]
        if pos > size:
            raise ValueError(f"{self.path}: file ends inside the GGUF header (truncated?)")
        self.pos = pos

    def value(self, value_type: int, key: str, max_array: int) -> Any:
        if value_type in _SCALAR_FORMAT:
            return self.unpack(_SCALAR_FORMAT[value_type])[0]
        if value_type == STRING:
            return self.string(f"metadata {key!r}")
        if value_type != ARRAY:
            raise ValueError(f"{self.path}: metadata {key!r} has unknown value type {value_type} (corrupt GGUF header?)")
        element_type, count = self.unpack("IQ")
        if element_type in _SCALAR_FORMAT:
            width = struct.calcsize("<" + _SCALAR_FORMAT[element_type])
            if count > max_array:
                if self.pos + count * width > len(self.buffer):
                    raise ValueError(f"{self.path}: file ends inside the GGUF header (truncated?)")
                self.pos += count * width
                return SkippedArray(element_type, count)
            return list(self.unpack(f"{count}{_SCALAR_FORMAT[element_type]}"))
        if element_type == STRING:
            if count > max_array:
                self.skip_strings(count)
                return SkippedArray(element_type, count)
            return [self.string(f"metadata {key!r}") for _ in range(count)]
        # Arrays of arrays exist in the format but not in any model file's metadata we read.
        raise ValueError(f"{self.path}: metadata {key!r} is an array of type {element_type}, which tp-engine cannot read")


def read_header(path: str | os.PathLike, max_array: int = MAX_KEPT_ARRAY) -> GGUFHeader:
    """Parse ``path``'s GGUF header; metadata arrays longer than ``max_array`` become :class:`SkippedArray`.

    Raises ValueError naming the file for anything that is not a whole,
    readable little-endian GGUF v2/v3 file (bad magic, truncation, tensor
    data past the end of the file, unknown tensor types).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path}: too short to be a GGUF file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        # Only the header's pages are touched, and the mapping is closed before returning.
        cursor = _Cursor(buffer, path)
        if buffer[:4] != MAGIC:
            raise ValueError(f"{path}: not a GGUF file (starts with {bytes(buffer[:4])!r}, not {MAGIC!r})")
        cursor.pos = 4
        (version,) = cursor.unpack("I")
        if version not in VERSIONS:
            if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
                raise ValueError(f"{path}: a big-endian GGUF file; tp-engine reads little-endian ones only")
            raise ValueError(f"{path}: GGUF version {version}; tp-engine reads versions {VERSIONS}")
        tensor_count, kv_count = cursor.unpack("QQ")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string("a metadata key")
            (value_type,) = cursor.unpack("I")
            metadata[key] = cursor.value(value_type, key, max_array)
        records = []
        for _ in range(tensor_count):
            name = cursor.string("a tensor name")
            (n_dims,) = cursor.unpack("I")
            if n_dims > 8:
                raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions (corrupt GGUF header?)")
            dims = cursor.unpack(f"{n_dims}Q")
            qtype, offset = cursor.unpack("IQ")
            records.append((name, dims, qtype, offset))
        end_of_table = cursor.pos

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-end_of_table // alignment) * alignment
    tensors, names = [], set()
    for name, dims, qtype, offset in records:
        if qtype not in GGML_TYPES:
            raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {qtype}")
        if name in names:
            raise ValueError(f"{path}: tensor {name!r} appears twice")
        names.add(name)
        _, qk, qb = GGML_TYPES[qtype]
        elements = 1
        for d in dims:
            elements *= d
        if dims and dims[0] % qk:
            raise ValueError(f"{path}: tensor {name!r} rows of {dims[0]} are not whole {GGML_TYPES[qtype][0]} blocks")
        info = TensorInfo(name, tuple(dims), qtype, data_start + offset, elements // qk * qb)
        if info.offset + info.nbytes > size:
            raise ValueError(f"{path}: file ends inside tensor {name!r} data (truncated? {size} bytes, "
                             f"the tensor ends at {info.offset + info.nbytes})")
        tensors.append(info)
    return GGUFHeader(path, version, metadata, tuple(tensors), alignment, data_start)
