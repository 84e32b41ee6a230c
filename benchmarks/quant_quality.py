"""Quality and speed cost of weight-only quantization on SmolLM2-135M-Instruct.

For float32 and each quantization setting: perplexity of a fixed English text
(benchmarks/quant_text.txt, ~1.7k tokens, one forward pass), top-1
agreement of the next-token prediction with float32 (fraction of positions
whose argmax matches) and mean KL(float32 || quantized) over that pass; the
same agreement when the first 128 tokens are fed one per forward (M = 1, as
in decoding: backends may treat one row differently from many); the time of
one HF decode step (``model(next_token, past_key_values=cache)``, one
thread); and the bytes of the model's weights (tied tables counted once).

Caveat this script measures rather than hides: the default model is a GGUF
whose linear layers are Q4_1 (llama.cpp's int4 with a scale and a min per
block of 32), so its "float32" weights already lie on a 4-bit grid, and int4
with group_size=32 reproduces that grid almost exactly. The "permuted" rows
quantize an exactly equivalent model whose hidden, MLP and value dimensions
are permuted (logits equal up to float rounding; checked), so that groups
mix 32 different Q4_1 blocks -- closer to what a genuinely float model sees.

    python benchmarks/quant_quality.py [--model PATH] [--steps 32] [--quick]

Prints a markdown table; writes benchmarks/out/quant_quality.json.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tp_engine.quantize import is_quantized, quantize  # noqa: E402

TEXT = HERE / "quant_text.txt"
OUT = HERE / "out" / "quant_quality.json"
FLOAT_COPY = Path("/tmp/smol")  # a float32 safetensors copy of the default model, if someone made one

# (label, bits, group_size, backend, skip, head_bits, permuted); bits None: float32
SETTINGS = [
    ("int8 int8pack (auto)", 8, None, "auto", (), 8, False),
    ("int8, lm_head float", 8, None, "auto", ("lm_head",), 8, False),
    ("int8 reference (exact weights)", 8, None, "reference", (), 8, False),
    ("int8 fbgemm (dynamic int8 x)", 8, None, "fbgemm", (), 8, False),
    ("int4 g32 int4pack + int8 head (auto)", 4, 32, "auto", (), 8, False),
    ("int4 g32, int4 head", 4, 32, "auto", (), 4, False),
    ("int4 g32, lm_head float", 4, 32, "auto", ("lm_head",), 8, False),
    ("int4 g64 + int8 head", 4, 64, "auto", (), 8, False),
    ("int4 g32 reference (exact weights)", 4, 32, "reference", (), 8, False),
    ("permuted: float32", None, None, None, (), None, True),
    ("permuted: int8", 8, None, "auto", (), 8, True),
    ("permuted: int4 g32 + int8 head", 4, 32, "auto", (), 8, True),
    ("permuted: int4 g64 + int8 head", 4, 64, "auto", (), 8, True),
    ("permuted: int4 g16 reference + int8 head", 4, 16, "reference", (), 8, True),
]
QUICK = {"int8 int8pack (auto)", "int4 g32 int4pack + int8 head (auto)", "permuted: int4 g32 + int8 head"}
DECODE_TOKENS = 128  # teacher-forced one-token steps for the decode-mode agreement


def load(model_arg: str | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_arg is None and (FLOAT_COPY / "config.json").exists():
        model_arg = str(FLOAT_COPY)
    if model_arg is None:
        from tp_engine import default_model_path

        folder, name = os.path.split(default_model_path())
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        source = default_model_path()
    else:
        tok = AutoTokenizer.from_pretrained(model_arg)
        model = AutoModelForCausalLM.from_pretrained(model_arg, dtype=torch.float32)
        source = model_arg
    return model.eval(), tok, source


@torch.no_grad()
def permute_equivalent(model) -> None:
    """Permute hidden, MLP and per-head value dims in place; the function is unchanged.

    RMSNorm is invariant to a permutation of the hidden dim (its weight moves
    with it); RoPE acts on q/k head dims, which are left alone; v's head dims
    only meet o_proj's matching columns.
    """
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    inner = model.model
    hidden = torch.randperm(cfg.hidden_size, generator=g)
    mlp = torch.randperm(cfg.intermediate_size, generator=g)
    hd = cfg.head_dim
    within = torch.randperm(hd, generator=g)
    kv_rows = torch.cat([j * hd + within for j in range(cfg.num_key_value_heads)])
    q_cols = torch.cat([i * hd + within for i in range(cfg.num_attention_heads)])

    def cols(lin, perm):
        lin.weight.data = lin.weight.data[:, perm].contiguous()

    def rows(lin, perm):
        lin.weight.data = lin.weight.data[perm].contiguous()
        if lin.bias is not None:
            lin.bias.data = lin.bias.data[perm].contiguous()

    emb = inner.embed_tokens
    emb.weight.data = emb.weight.data[:, hidden].contiguous()
    if model.lm_head.weight is not emb.weight:
        cols(model.lm_head, hidden)
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data = norm.weight.data[hidden].contiguous()
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            cols(lin, hidden)
        rows(a.v_proj, kv_rows)
        cols(a.o_proj, q_cols)
        rows(a.o_proj, hidden)
        rows(m.gate_proj, mlp)
        rows(m.up_proj, mlp)
        cols(m.down_proj, mlp)
        rows(m.down_proj, hidden)
    inner.norm.weight.data = inner.norm.weight.data[hidden].contiguous()
    if model.lm_head.weight is emb.weight:  # keep the tie a tie
        model.lm_head.weight = emb.weight


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        if is_quantized(module):  # the codes live in the layer's matmul strategy
            qw = module.quant_method.weight
            if id(qw) not in seen:
                seen.add(id(qw))
                total += qw.nbytes
    return total


@torch.no_grad()
def text_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits[0, :-1].float()


def score(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None) -> dict:
    target = ids[0, 1:]
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, target[:, None]).mean().item()
    out = {"ppl": math.exp(nll)}
    if ref_logits is not None:
        ref_logp = torch.log_softmax(ref_logits, -1)
        out["top1_agree"] = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        out["kl"] = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    return out


@torch.no_grad()
def stepwise_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the first DECODE_TOKENS positions computed one token per forward (M = 1), as in decoding."""
    out = model(ids[:, :1], use_cache=True)
    cache, logits = out.past_key_values, [out.logits[0, -1]]
    for i in range(1, min(DECODE_TOKENS, ids.shape[1])):
        out = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[0, -1])
    return torch.stack(logits).float()


class DecodeTimer:
    """ms of one HF forward step with a KV cache, after a 16-token prefill.

    The machine is shared and interference only ever adds time, so every
    model is timed in turn, round after round (interference spreads over all
    of them), and each reports the best of its per-round medians. Expect
    +-10% between runs on a busy machine all the same.
    """

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self.state: dict[str, list] = {}

    @torch.no_grad()
    def add(self, name: str, model) -> None:
        out = model(self.ids[:, :16], use_cache=True)
        self.state[name] = [model, out.past_key_values, out.logits[:, -1:].argmax(-1), []]

    @torch.no_grad()
    def run(self, steps: int, rounds: int = 3) -> dict[str, float]:
        for _ in range(rounds):
            for name, st in self.state.items():
                model, cache, token, medians = st
                times = []
                for _ in range(max(1, steps // rounds)):
                    t0 = time.perf_counter()
                    out = model(token, past_key_values=cache, use_cache=True)
                    times.append(time.perf_counter() - t0)
                    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                st[1], st[2] = cache, token
                medians.append(statistics.median(times))
        return {name: min(st[3]) * 1e3 for name, st in self.state.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF folder (default: /tmp/smol if present, else the bundled GGUF)")
    parser.add_argument("--steps", type=int, default=60, help="decode steps timed per setting, over all rounds")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each model's best round counts)")
    parser.add_argument("--quick", action="store_true", help="only a few settings")
    parser.add_argument("--time-reference", action="store_true", help="also time the (slow) reference backend")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, tok, source = load(args.model)
    ids = tok(TEXT.read_text(), return_tensors="pt").input_ids
    print(f"model: {source}; text: {ids.shape[1]} tokens; 1 thread", file=sys.stderr)

    ref_logits = text_logits(model, ids)
    ref_steps = stepwise_logits(model, ids)
    timer = DecodeTimer(ids)
    timer.add("float32", model)
    rows = [{"setting": "float32", **score(ref_logits, ids, None), "top1_agree": 1.0, "kl": 0.0,
             "decode_agree": 1.0, "bytes": weight_bytes(model)}]
    permuted = copy.deepcopy(model)
    permute_equivalent(permuted)
    diff = (text_logits(permuted, ids) - ref_logits).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"the permuted model is not equivalent: logits differ by {diff}")
    print(f"permuted float32 model: logits within {diff:.1e} of the original", file=sys.stderr)

    for label, bits, group, backend, skip, head_bits, perm in SETTINGS:
        if args.quick and label not in QUICK:
            continue
        q = copy.deepcopy(permuted if perm else model)
        t0 = time.perf_counter()
        if bits is not None:
            quantize(q, bits=bits, group_size=group, backend=backend, skip=skip, head_bits=head_bits)
        took = time.perf_counter() - t0
        summary = getattr(q, "tp_engine_quantization", None)
        steps = stepwise_logits(q, ids)
        row = {"setting": label, **score(text_logits(q, ids), ids, ref_logits),
               "decode_agree": (steps.argmax(-1) == ref_steps.argmax(-1)).float().mean().item(),
               "bytes": weight_bytes(q), "quantize_s": took,
               "backends": sorted(set(summary.quantized.values())) if summary else []}
        rows.append(row)
        print(f"{label}: ppl {row['ppl']:.3f}, agree {row['top1_agree']:.4f}, "
              f"decode agree {row['decode_agree']:.4f}", file=sys.stderr)
        if "reference" in label and not perm:
            row["decode_ms"] = None  # the slow exact oracle: timed below only if asked
        if "reference" not in label or args.time_reference:
            timer.add(label, q)
        gc.collect()
    del permuted

    print("timing decode steps ...", file=sys.stderr)
    times = timer.run(args.steps, args.rounds)
    for row in rows:
        row["decode_ms"] = times.get(row["setting"])

    base = rows[0]
    print(f"\nSmolLM2-135M-Instruct ({source}), {ids.shape[1]} tokens, torch {torch.__version__}, 1 thread\n")
    print("| setting | perplexity | top-1 agree | KL (nats) | decode-mode agree | decode step ms | speed vs fp32 | weights MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ms = r["decode_ms"]
        timing = f"{ms:.1f} | {base['decode_ms'] / ms:.2f}x" if ms else "- | -"
        print(f"| {r['setting']} | {r['ppl']:.3f} | {r['top1_agree'] * 100:.2f}% | {r['kl']:.4f} | "
              f"{r['decode_agree'] * 100:.1f}% | {timing} | {r['bytes'] / 2**20:.1f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": source, "tokens": ids.shape[1], "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"\nwrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
