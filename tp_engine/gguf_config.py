"""A GGUF file's Hugging Face config, built from its header without parsing the tokenizer.

``AutoConfig.from_pretrained(folder, gguf_file=name)`` sends the common
architectures (llama, qwen2, mistral, ...) through transformers'
``load_gguf_checkpoint``, which parses every metadata array, the whole
vocabulary and merge table included: for a 150k-token model a ~0.5 GiB
spike and ~20 s of CPU in every rank, for a dozen numbers. Here the same
config comes from :mod:`gguf_header`'s scalar metadata, renamed with
transformers' own tables (``GGUF_CONFIG_MAPPING``, its defaults, and the
same architecture renames); the vocabulary contributes only its length.

Chosen over reading the config once in a child process and caching it:
this costs ~0.1 s, has no cache to go stale, and a test checks the result
against ``AutoConfig`` for the files we ship with. Architectures whose
config transformers assembles with extra steps not repeated here (T5,
gpt-oss, MiniMax-M2, LFM2, Gemma 4, the Qwen 3.5 family it reads with its
own lean reader) are handed to ``AutoConfig`` itself.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .gguf_header import GGUFHeader, SkippedArray

# Architectures whose config transformers builds with steps beyond the generic renaming.
_DELEGATED = ("t5", "gpt-oss", "gpt_oss", "minimax-m2", "lfm2", "gemma4", "qwen35")
# llama.cpp writes no output.weight for these even when the head is not tied (transformers' list).
_UNTIED_WITHOUT_OUTPUT = ("falcon", "bloom")


def config_dict(header: GGUFHeader) -> dict[str, Any] | None:
    """The config dict transformers would build from this header; None where it takes its own path."""
    metadata = header.metadata
    architecture = metadata["general.architecture"]
    if any(name in architecture for name in _DELEGATED):
        return None
    names = [metadata["general.name"]] if "general.name" in metadata else []
    updated = architecture
    if "llama" in architecture and "mistral" in names:  # llama.cpp writes Mistral as llama
        updated = "mistral"
    if "qwen2moe" in architecture:
        updated = "qwen2_moe"
    elif "qwen3moe" in architecture:
        updated = "qwen3_moe"
    if architecture not in GGUF_CONFIG_MAPPING and updated not in GGUF_CONFIG_MAPPING:
        raise ValueError(f"GGUF model with architecture {architecture} is not supported by transformers")

    config: dict[str, Any] = {}
    tensor_names = {t.name for t in header.tensors}
    if "stablelm" in architecture:  # read from the tensors present, as transformers does
        config["use_qkv_bias"] = any(b in n for n in tensor_names for b in ("attn_q.bias", "attn_k.bias", "attn_v.bias"))
        config["use_parallel_residual"] = not any("ffn_norm" in n for n in tensor_names)
    config["tie_word_embeddings"] = "output.weight" not in tensor_names or architecture in _UNTIED_WITHOUT_OUTPUT
    defaults = GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture) or {})
    for key, value in defaults.items():
        config.setdefault(key, value)

    for key, value in metadata.items():
        prefix, _, config_key = key.replace(architecture, updated).partition(".")
        renames = GGUF_CONFIG_MAPPING.get(prefix)
        if not renames or config_key not in renames or renames[config_key] in (None, -1):
            continue
        if isinstance(value, SkippedArray):
            return None  # a long array the config wants: not expected; let transformers read it
        if isinstance(value, list) and len(value) == 1:  # transformers unwraps one-element arrays
            value = value[0]
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        config[renames[config_key]] = value

    if config.get("model_type") == "gemma3":  # the file holds the text backbone only
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    return config


def load_gguf_config(path: str | os.PathLike, header: GGUFHeader) -> PretrainedConfig:
    """``AutoConfig.from_pretrained(folder, gguf_file=name)``, from ``header`` where :func:`config_dict` can."""
    config = config_dict(header)
    if config is None:
        # Not silent: for some of these transformers parses the whole tokenizer in every rank.
        warnings.warn(f"{path}: architecture {header.architecture!r}: config read by transformers' GGUF loader "
                      "(slower, parses the tokenizer)", RuntimeWarning, stacklevel=2)
        folder, name = os.path.split(os.path.abspath(path))
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: GGUF architecture {model_type!r} has no transformers config class")
    return CONFIG_MAPPING[model_type].from_dict(config)
