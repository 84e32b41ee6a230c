"""``from_pretrained`` loads checkpoints whose tensor names differ from the parameters.

* Mixtral and Qwen2-MoE: transformers 5.x models hold each layer's experts as
  fused 3-D parameters, but ``save_pretrained`` (like the Hub checkpoints)
  writes one 2-D tensor per expert and projection. Each rank builds its
  shard of the fused parameter from its rows/columns of every expert tensor.
* GPT-2 Hub checkpoints name tensors without the ``transformer.`` prefix.
* GPT-NeoX / Pythia: the model's ``lm_head`` is ``embed_out`` in the files
  (the Hub's, and what transformers' own ``save_pretrained`` writes).

Parity is against transformers' own ``from_pretrained`` of the same folder:
logits within 1e-4 (float32), 16 greedy tokens identical, at TP=2 and an
uneven split. All parity cases of one world size share one launch.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import tp_engine
from conftest import run_ranks
from tp_engine import api, loading
from tp_engine.comm.base import SingleProcessCommunicator

NEW_TOKENS = 16
TOL = 1e-4
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 199]])
SINGLE = SingleProcessCommunicator()
COMMON = dict(vocab_size=257, initializer_range=0.2, num_hidden_layers=2, max_position_embeddings=64)

MODELS = {
    # 40 expert columns: 16-byte units of 4 floats, so TP=3 splits them 16/12/12.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=40,
        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    # layer 0 sparse (experts + shared expert), layer 1 dense
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=72,
        moe_intermediate_size=40, shared_expert_intermediate_size=56, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[1])),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_head=4, n_positions=64, bos_token_id=256, eos_token_id=256)),
    # untied (the default), so the head really is read from embed_out
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=64, num_attention_heads=4, intermediate_size=128, tie_word_embeddings=False)),
}

# case -> (model, world, shares)
CASES = {
    "mixtral-tp2": ("mixtral", 2, None),
    "mixtral-tp3": ("mixtral", 3, None),
    "qwen2_moe-tp2": ("qwen2_moe", 2, None),
    "qwen2_moe-shares-3-1": ("qwen2_moe", 2, (3, 1)),
    "gpt2-unprefixed-tp2": ("gpt2", 2, None),
    "gpt2-unprefixed-tp3": ("gpt2", 3, None),
    "gpt_neox-embed_out-tp1": ("gpt_neox", 1, None),
    "gpt_neox-embed_out-tp2": ("gpt_neox", 2, None),
}


def _build(name: str, seed: int = 0):
    import transformers

    config_name, model_name, kwargs = MODELS[name]
    config = getattr(transformers, config_name)(**COMMON, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    # Always generate NEW_TOKENS tokens: no early stop at a random EOS.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _keys(directory) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, over every safetensors file of a folder."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(directory, file), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _save_unprefixed_gpt2(model, directory) -> None:
    """A GPT-2 folder laid out like the Hub's: no ``transformer.`` prefix, no lm_head (tied),
    plus the old ``attn.bias`` mask buffers, which the model does not load."""
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("transformer."):
            tensors[name.removeprefix("transformer.")] = tensor.contiguous().clone()
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


@functools.lru_cache(maxsize=None)
def _folders(root: str) -> dict[str, str]:
    """Each model saved once: Mixtral sharded over several files, Qwen2-MoE in one, GPT-2 rewritten."""
    folders = {}
    for name in MODELS:
        directory = os.path.join(root, name)
        model = _build(name)
        if name == "gpt2":
            _save_unprefixed_gpt2(model, directory)
        else:
            model.save_pretrained(directory, max_shard_size="100KB" if name == "mixtral" else "1GB")
        folders[name] = directory
    return folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _folders(str(tmp_path_factory.mktemp("remap")))


def _reference(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(PROMPT).logits
    generated = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert generated.shape[1] == PROMPT.shape[1] + NEW_TOKENS
    return logits, generated


def _rank_cases(jobs: dict[str, tuple[str, list | None]]) -> dict[str, dict]:
    """On every rank: load each folder, run it, and count the values read per checkpoint tensor."""
    tp_engine.init()
    results = {}
    original = loading.SafetensorsCheckpoint.read
    for key, (path, shares) in jobs.items():
        read: dict[str, int] = {}

        def counting(self, name, spec, dtype):
            out = original(self, name, spec, dtype)
            read[name] = read.get(name, 0) + out.numel()
            return out

        loading.SafetensorsCheckpoint.read = counting
        try:
            model = tp_engine.from_pretrained(path, shares=shares)
            loading.SafetensorsCheckpoint.read = original
            with torch.no_grad():
                logits = model(PROMPT).logits
            generated = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
            results[key] = {"logits": logits, "generated": generated, "read": read}
        except Exception:  # reported per case by the test
            results[key] = {"error": traceback.format_exc()}
        finally:
            loading.SafetensorsCheckpoint.read = original
    return results


@functools.lru_cache(maxsize=None)
def _launch(world: int, root: str) -> list[dict]:
    folders = _folders(root)
    jobs = {
        case: (folders[model], list(shares) if shares else None)
        for case, (model, w, shares) in CASES.items()
        if w == world
    }
    return run_ranks(_rank_cases, world, jobs)


def _expert_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s in shapes.items() if ".experts." in k}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, folders):
    model, world, shares = CASES[case]
    path = folders[model]
    shapes = _keys(path)
    # The checkpoint really is in the other naming (else the test proves nothing).
    if model == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in shapes
        assert not any("gate_up_proj" in k for k in shapes)
        assert os.path.exists(os.path.join(path, loading.SAFETENSORS_INDEX))
    elif model == "qwen2_moe":
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in shapes
        assert not any("gate_up_proj" in k for k in shapes)
    elif model == "gpt_neox":
        assert "embed_out.weight" in shapes and "lm_head.weight" not in shapes
    else:
        assert "h.0.attn.c_attn.weight" in shapes and not any(k.startswith("transformer.") for k in shapes)

    logits, generated = _reference(path)
    if model in ("gpt2", "gpt_neox"):  # transformers itself loaded the files (did not leave random weights)
        original = _build(model)
        with torch.no_grad():
            assert torch.equal(original(PROMPT).logits, logits)

    results = _launch(world, os.path.dirname(path))
    experts = _expert_tensors(shapes)
    for rank, by_case in enumerate(results):
        result = by_case[case]
        assert "error" not in result, f"{case} rank {rank} failed:\n{result.get('error')}"
        diff = (result["logits"] - logits).abs().max().item()
        assert diff < TOL, f"{case} rank {rank}: logits differ by {diff}"
        assert torch.equal(result["generated"], generated), f"{case} rank {rank}: greedy tokens differ"
        # Only this rank's slice of each expert tensor was read.
        for name, shape in experts.items():
            full = int(torch.Size(shape).numel())
            assert 0 < result["read"].get(name, 0) < full, f"{case} rank {rank}: read {result['read'].get(name)} of {full} values of {name}"
    # ... and the slices tile every expert tensor exactly once.
    for name, shape in experts.items():
        total = sum(by_case[case]["read"][name] for by_case in results)
        assert total == torch.Size(shape).numel(), f"{case}: ranks read {total} values of {name}, which has {torch.Size(shape).numel()}"
    if model == "qwen2_moe":
        assert experts  # the per-expert checks above ran


# ------------------------------------------------------------ single-process cases


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def test_fused_checkpoint_still_loads(tmp_path):
    """A checkpoint that stores the fused expert tensors as the model names them is read directly."""
    from safetensors.torch import save_file

    model = _build("mixtral")
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in _keys(tmp_path)
    loaded = api.from_pretrained(tmp_path, comm=SINGLE)
    assert (_logits(loaded) - _logits(model)).abs().max().item() < TOL


def _rewrite(directory, change) -> None:
    """Apply ``change`` to the tensors of a single-file checkpoint folder."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(directory, loading.SAFETENSORS_FILE)
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_both_prefix_forms_equal_is_fine(folders, tmp_path):
    target = tmp_path / "gpt2"
    shutil.copytree(folders["gpt2"], target)
    _rewrite(target, lambda t: t.update({"transformer.wte.weight": t["wte.weight"].clone()}))
    loaded = api.from_pretrained(target, comm=SINGLE)
    assert (_logits(loaded) - _logits(_build("gpt2"))).abs().max().item() < TOL


def test_both_prefix_forms_differing_is_an_error(folders, tmp_path):
    target = tmp_path / "gpt2"
    shutil.copytree(folders["gpt2"], target)
    _rewrite(target, lambda t: t.update({"transformer.wte.weight": t["wte.weight"] + 1}))
    with pytest.raises(ValueError, match=r"'transformer\.wte\.weight' and 'wte\.weight' both map to 'transformer\.wte\.weight' but differ"):
        api.from_pretrained(target, comm=SINGLE)


def test_extra_expert_is_an_error(folders, tmp_path):
    """A checkpoint with more experts than the config is refused, not silently truncated."""
    target = tmp_path / "qwen2_moe"
    shutil.copytree(folders["qwen2_moe"], target)
    config = json.loads((target / "config.json").read_text())
    config["num_experts"] = 3
    (target / "config.json").write_text(json.dumps(config))
    router = "model.layers.0.mlp.gate.weight"  # consistent with 3 experts, so only the experts disagree
    _rewrite(target, lambda t: t.update({router: t[router][:3].clone()}))
    with pytest.raises(ValueError, match=r"checkpoint has 'model\.layers\.0\.mlp\.experts\.3\.gate_proj\.weight', more experts than the config's 3"):
        api.from_pretrained(target, comm=SINGLE)


# ------------------------------------------------------------ a missing expert, on every rank


def _load_error(path):
    try:
        tp_engine.from_pretrained(path)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def test_missing_expert_fails_on_every_rank(folders, tmp_path):
    target = tmp_path / "mixtral"
    shutil.copytree(folders["mixtral"], target)
    missing = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    index = json.loads((target / loading.SAFETENSORS_INDEX).read_text())
    file = index["weight_map"].pop(missing)
    (target / loading.SAFETENSORS_INDEX).write_text(json.dumps(index))

    from safetensors.torch import load_file, save_file

    tensors = load_file(target / file)
    del tensors[missing]
    save_file(tensors, target / file, metadata={"format": "pt"})

    errors = run_ranks(_load_error, 2, str(target))
    for rank, error in enumerate(errors):
        assert error is not None, f"rank {rank} loaded a checkpoint with a missing expert"
        assert error[0] == "ValueError", error
        assert f"checkpoint has no tensor '{missing}'" in error[1], error[1]
        assert "expert 2 of the 4 in 'model.layers.1.mlp.experts.gate_up_proj'" in error[1], error[1]


def test_anchored_rename_only_at_the_start():
    """``^embed_out.`` (GPT-NeoX's head) renames the name's start, never the same words deeper in."""
    assert loading._rename("embed_out.weight", "^embed_out.", "lm_head.") == "lm_head.weight"
    assert loading._rename("gpt_neox.embed_out.weight", "^embed_out.", "lm_head.") == "gpt_neox.embed_out.weight"
    assert loading._rename("a.block_sparse_moe.b", ".block_sparse_moe.", ".mlp.") == "a.mlp.b"
