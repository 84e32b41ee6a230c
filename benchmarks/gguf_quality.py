"""GGUF numerics against llama.cpp: tp-engine's float32 and int8 activations on the real Qwen2.5-Coder-1.5B Q4_K_M.

    python benchmarks/gguf_quality.py [--tokens N] [--chunk 32] [--threads 2] [--model qwen2.5-coder-1.5b|PATH]
        [--save logits.npz]

(~12 min on a quiet 2-core VM: llama.cpp twice, ~1 min each; tp-engine float32 ~5 min, int8 ~3 min.)

llama.cpp is the reference for what a GGUF file's numbers should give:
llama-cpp-python (``make bench-llamacpp``) scores the text with
``logits_all=True`` in one pass (``n_threads=2``, flash attention off, its
default float16 KV cache), in a subprocess that writes its token ids and
logits to a temporary file; a second llama.cpp pass with a float32 KV cache
(``type_k``/``type_v`` F32) shows how far llama.cpp moves from itself when
only its attention precision changes (the noise floor of the comparison:
on this model int8-rounded activations turn any tiny difference upstream
into different roundings downstream). tp-engine then scores the same
token ids twice in one process (one rank, the file kept quantized): with
float32 activations (the default, "exact": within float32 rounding of the
exact product with the file's weights, as transformers gives) and with int8
activations (``TP_ENGINE_GGUF_ACTIVATIONS=int8``, read at every call).

Path. int8 applies only to the direct CPU kernels, i.e. matmuls with fewer
than ``DEQUANT_MIN_ROWS`` (48) rows of x; from 48 rows (prefill) the kernels
dequantize for torch's float32 GEMM whatever the setting. So tp-engine scores
the text in chunks of ``--chunk`` (default 32 < 48) tokens through the
decode runtime (``Decoder.extend_hidden`` at growing positions with the KV
cache, then ``rows_logits``): every GGUF matmul, the LM head included, runs
the kernels that decoding runs (one row of x at a time or 32: each row of x is
rounded on its own, so the numerics per row are those of decoding). The
script counts the GGUF matmul calls and their rows, and fails if any call of
the int8 pass took the float path.

Text: benchmarks/quant_text.txt (English prose), tokenized by llama.cpp with the
file's tokenizer: all of it (1,718 tokens for Qwen2.5), or the first ``--tokens`` (at least 512).
Metrics over that one sequence: perplexity (mean NLL of tokens 1..n-1 given
their prefix), top-1 agreement of each tp-engine mode's argmax with
llama.cpp's at every position, mean KL(llama.cpp || mode), max and mean
|logit difference|. Decision rule (issue 18): if int8's perplexity is within
0.5 % of llama.cpp's and its top-1 agreement with llama.cpp is >= 98 %, int8
becomes the default for GGUF files.

What llama.cpp does differently even from a bit-exact int8 path: its KV
cache is float16 (K and V, and with them Q and the attention weights, are
rounded to f16 for the attention products), it rounds every activation
feeding a K-quant matmul to Q8_K (the rule int8 copies) and sums in another
order. Position 0 (no attention context) shows the rounding rule itself:
there tp-engine int8 and llama.cpp agree within 0.2 logits while float32
differs by 12 (Qwen's first-token outlier activations).

Prints a table; writes benchmarks/gguf_quality.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

TEXT = HERE / "quant_text.txt"
OUT = HERE / "gguf_quality.json"
PPL_TOL = 0.005  # int8 perplexity within 0.5 % of llama.cpp's ...
AGREE_MIN = 0.98  # ... and top-1 agreement with llama.cpp at least 98 %


def _model_path(name: str) -> Path:
    if os.path.exists(name):
        return Path(name)
    from tp_engine.model_files import locate

    return locate(name)


# ------------------------------------------------------------------ llama.cpp (subprocess)


def llamacpp_worker(path: str, text: str, tokens: int, threads: int, kv: str, out: str) -> None:
    """Tokenize and score in llama.cpp (KV cache ``kv``); save ids and logits (n, V) float32 to ``out`` (.npz)."""
    import numpy as np

    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: run `make bench-llamacpp` "
                         "(a source build with cmake, ~10 min)") from None
    probe = Llama(model_path=path, vocab_only=True, verbose=False)
    ids = probe.tokenize(text.encode(), add_bos=True, special=False)
    del probe
    if tokens and len(ids) < tokens:
        raise SystemExit(f"the text has only {len(ids)} tokens, {tokens} asked")
    ids = ids[:tokens] if tokens else ids
    n_batch = min(512, len(ids))
    kv_type = {"f16": 1, "f32": 0}[kv]  # GGML_TYPE_F16 (llama.cpp's default), GGML_TYPE_F32
    # flash attention off (llama-cpp-python's default): attention is ggml's plain KQ / softmax / KQV
    llm = Llama(model_path=path, n_ctx=len(ids), n_batch=n_batch, n_ubatch=n_batch, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False, seed=0, type_k=kv_type, type_v=kv_type, flash_attn=False)
    start = time.perf_counter()
    llm.eval(ids)
    elapsed = time.perf_counter() - start
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)
    np.savez(out, ids=np.array(ids, dtype=np.int64), logits=logits, seconds=elapsed,
             version=llama_cpp.__version__, n_batch=n_batch)


def llamacpp_scores(path: Path, text_path: str, tokens: int, threads: int, kv: str, tmp: str):
    import numpy as np

    out = os.path.join(tmp, f"llamacpp-{kv}.npz")
    cmd = [sys.executable, __file__, "--llamacpp-worker", out, "--model", str(path), "--tokens", str(tokens),
           "--threads", str(threads), "--text", text_path, "--kv", kv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp scoring failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    data = np.load(out)
    return data["ids"], data["logits"], float(data["seconds"]), str(data["version"]), int(data["n_batch"])


# ------------------------------------------------------------------ tp-engine (this process)


def tp_engine_scores(path: Path, ids, chunk: int, threads: int):
    """{mode: (logits (n, V) float32, seconds, calls)} for activations float32 and int8."""
    import torch

    import tp_engine
    from tp_engine.kernels import gguf_gemm
    from tp_engine.runtime.decoder import decoder_for

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if chunk >= gguf_gemm.DEQUANT_MIN_ROWS:
        raise SystemExit(f"--chunk {chunk}: from {gguf_gemm.DEQUANT_MIN_ROWS} rows the kernels take the float "
                         "dequantize + GEMM path, where int8 activations do not apply")
    calls: dict[str, int] = {}
    original = gguf_gemm.gguf_matmul

    def counted(x, *a, **kw):
        mode = gguf_gemm.activations_mode(kw.get("activations"))
        int8 = mode == "int8" and x.shape[0] < gguf_gemm.DEQUANT_MIN_ROWS and x.device.type == "cpu"
        key = "int8 kernels" if int8 else ("float, dequant + GEMM" if x.shape[0] >= gguf_gemm.DEQUANT_MIN_ROWS
                                           else "float kernels")
        calls[key] = calls.get(key, 0) + 1
        calls["rows"] = calls.get("rows", 0) + x.shape[0]
        return original(x, *a, **kw)

    gguf_gemm.gguf_matmul = counted
    model = tp_engine.from_pretrained(str(path))  # dtype "auto": the file's blocks kept
    decoder = decoder_for(model)
    n = len(ids)
    decoder.reserve(1, n)
    tokens = torch.as_tensor(ids, dtype=torch.long)
    results = {}
    saved = os.environ.get(gguf_gemm.ACTIVATIONS_ENV)
    try:
        for mode in ("float32", "int8"):
            os.environ[gguf_gemm.ACTIVATIONS_ENV] = mode
            calls.clear()
            rows = []
            start = time.perf_counter()
            with torch.inference_mode():
                for s in range(0, n, chunk):
                    h = decoder.extend_hidden(tokens[s:s + chunk], s, last_only=False, slot=0)
                    rows.append(decoder.rows_logits(h).float())
            elapsed = time.perf_counter() - start
            results[mode] = (torch.cat(rows), elapsed, dict(calls))
            print(f"tp-engine {mode}: {elapsed:.1f} s, GGUF matmul calls {calls}", file=sys.stderr, flush=True)
    finally:
        gguf_gemm.gguf_matmul = original
        if saved is None:
            os.environ.pop(gguf_gemm.ACTIVATIONS_ENV, None)
        else:
            os.environ[gguf_gemm.ACTIVATIONS_ENV] = saved
    bad = results["int8"][2].get("float kernels", 0) + results["int8"][2].get("float, dequant + GEMM", 0)
    if bad or not results["int8"][2].get("int8 kernels"):
        raise SystemExit(f"int8 activations did not apply to every GGUF matmul: {results['int8'][2]}")
    return results


# ------------------------------------------------------------------ metrics


def per_position(logits, ref, ids) -> dict:
    """Per position of ``logits`` (n, V) against llama.cpp's ``ref`` (n, V): NLL of the next token, KL(ref ||
    logits), whether the argmaxes agree, max |logit diff|, and ref's top-2 margin (torch tensors of n)."""
    import torch

    n = ids.shape[0]
    v = min(logits.shape[1], ref.shape[1])
    out = {k: torch.zeros(n, dtype=torch.float64) for k in ("nll", "kl", "same", "maxdiff", "meandiff", "margin")}
    for s in range(0, n, 64):  # chunked: (64, 151936) float64 at a time
        e = min(n, s + 64)
        a, b = logits[s:e, :v].double(), ref[s:e, :v].double()
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        out["kl"][s:e] = (lb.exp() * (lb - la)).sum(-1)
        out["same"][s:e] = (a.argmax(-1) == b.argmax(-1)).double()
        d = (a - b).abs()
        out["maxdiff"][s:e], out["meandiff"][s:e] = d.max(-1).values, d.mean(-1)
        two = b.topk(2, dim=-1).values
        out["margin"][s:e] = two[:, 0] - two[:, 1]
        nxt = torch.arange(s + 1, e + 1).clamp(max=n - 1)
        out["nll"][s:e] = -la[torch.arange(e - s), ids[nxt]]
    out["nll"][n - 1] = float("nan")  # the last position predicts nothing in the text
    return out


def compare(logits, ref, ids) -> dict:
    """Metrics of ``logits`` (n, V) against llama.cpp's ``ref`` (n, V), both torch float32: over every
    position, and from position 1 on (position 0, the first token, carries Qwen's outlier activations)."""
    p = per_position(logits, ref, ids)
    n = ids.shape[0]
    differ = p["same"] == 0
    out = {"ppl": math.exp(p["nll"][: n - 1].mean().item()), "agree": p["same"].mean().item(),
           "kl": p["kl"].mean().item(), "max_abs_diff": p["maxdiff"].max().item(),
           "max_abs_diff_at": int(p["maxdiff"].argmax()), "mean_abs_diff": p["meandiff"].mean().item(),
           "disagreements": int(differ.sum()),
           "disagree_ref_margin_median": p["margin"][differ].median().item() if differ.any() else None,
           "disagree_ref_margin_lt_0.5": int((differ & (p["margin"] < 0.5)).sum()),
           "agree_from_1": p["same"][1:].mean().item(), "kl_from_1": p["kl"][1:].mean().item(),
           "max_abs_diff_from_1": p["maxdiff"][1:].max().item()}
    return out


def perplexity(logits, ids) -> float:
    import torch

    n = ids.shape[0]
    nll = 0.0
    for s in range(0, n - 1, 64):
        e = min(n - 1, s + 64)
        la = torch.log_softmax(logits[s:e].double(), -1)
        nll -= la[torch.arange(e - s), ids[s + 1:e + 1]].sum().item()
    return math.exp(nll / (n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="a model name of tp-engine's list or a .gguf path")
    parser.add_argument("--tokens", type=int, default=0, help="positions scored (default 0: the whole text; >= 512)")
    parser.add_argument("--chunk", type=int, default=32, help="tokens per tp-engine forward (< 48: the decode kernels)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--save", metavar="NPZ", help="also save the ids and the three logits (float16) here")
    parser.add_argument("--llamacpp-worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--kv", default="f16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    text = Path(args.text).read_text()
    if args.llamacpp_worker:
        llamacpp_worker(args.model, text, args.tokens, args.threads, args.kv, args.llamacpp_worker)
        return
    if args.tokens and args.tokens < 512:
        parser.error("--tokens: at least 512 positions")
    import torch

    path = _model_path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        # the reference: llama.cpp as it runs by default (KV cache float16); then with a float32 KV cache,
        # to show how far llama.cpp moves from itself when only its attention precision changes
        ids_np, ref_np, ref_s, version, n_batch = llamacpp_scores(path, args.text, args.tokens, args.threads, "f16", tmp)
        ids32, ref32_np, ref32_s, _, _ = llamacpp_scores(path, args.text, args.tokens, args.threads, "f32", tmp)
    if not (ids32 == ids_np).all():
        raise SystemExit("llama.cpp tokenized the text differently twice")
    if len(ids_np) < 512:
        raise SystemExit(f"the text has {len(ids_np)} tokens: at least 512 are needed")
    print(f"llama.cpp {version}: {len(ids_np)} tokens in {ref_s:.1f} s (KV f16), {ref32_s:.1f} s (KV f32)",
          file=sys.stderr, flush=True)
    ids = torch.from_numpy(ids_np)
    ref, ref32 = torch.from_numpy(ref_np), torch.from_numpy(ref32_np)
    del ref_np, ref32_np
    results = tp_engine_scores(path, ids_np.tolist(), args.chunk, args.threads)
    if args.save:
        import numpy as np

        np.savez(args.save, ids=ids_np, llamacpp=ref.half().numpy(), llamacpp_kv_f32=ref32.half().numpy(),
                 **{mode: r[0].half().numpy() for mode, r in results.items()})

    rows = [{"engine": "llama.cpp", "activations": "Q8_K (int8 per 256)", "mode": "reference",
             "path": f"one pass, n_batch {n_batch}, KV cache f16 (default)", "ppl": perplexity(ref, ids),
             "seconds": ref_s, "version": version},
            {"engine": "llama.cpp", "activations": "Q8_K (int8 per 256)", "mode": "kv_f32",
             "path": f"one pass, n_batch {n_batch}, KV cache f32", "seconds": ref32_s, **compare(ref32, ref, ids)}]
    for mode, (logits, seconds, calls) in results.items():
        label = "float32 (exact)" if mode == "float32" else "int8 per block (as Q8_K)"
        rows.append({"engine": "tp-engine", "activations": label, "mode": mode,
                     "path": f"decode kernels, chunks of {args.chunk}", "seconds": seconds, "calls": calls,
                     **compare(logits, ref, ids), "vs_kv_f32": compare(logits, ref32, ids)})
    # int8 against tp-engine's own float32: what the rounding of x alone changes
    own = compare(results["int8"][0], results["float32"][0], ids)
    base = rows[0]["ppl"]
    int8 = rows[3]
    ppl_rel = int8["ppl"] / base - 1
    verdict = abs(ppl_rel) <= PPL_TOL and int8["agree"] >= AGREE_MIN

    date = time.strftime("%Y-%m-%d")
    print(f"\n{path.name}, {date}, {len(ids)} tokens of {Path(args.text).name}, {args.threads} threads; "
          f"reference: llama.cpp (llama-cpp-python {version}) with its default f16 KV cache\n")
    print("| engine | activations | path | perplexity | vs llama.cpp | top-1 = llama.cpp | mean KL | "
          "max abs logit diff (at) | from position 1: top-1, mean KL, max diff | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rel = f"{(r['ppl'] / base - 1) * 100:+.2f} %"
        if "agree" in r:
            agree = f"{r['agree'] * 100:.2f} % ({r['disagreements']} differ)"
            rest = (f"{r['kl']:.2e} | {r['max_abs_diff']:.3f} ({r['max_abs_diff_at']}) | {r['agree_from_1'] * 100:.2f} %, "
                    f"{r['kl_from_1']:.2e}, {r['max_abs_diff_from_1']:.3f}")
        else:
            agree, rest = "-", "- | - | -"
        print(f"| {r['engine']} | {r['activations']} | {r['path']} | {r['ppl']:.4f} | {rel} | {agree} | {rest} | "
              f"{r['seconds']:.1f} |")
    print()
    for r in rows[1:]:
        print(f"{r['engine']} {r['mode']}: of its {r['disagreements']} top-1 differences from llama.cpp, "
              f"{r['disagree_ref_margin_lt_0.5']} are where llama.cpp's own top two logits are < 0.5 apart (median gap "
              f"{r['disagree_ref_margin_median'] or 0:.3f})")
    for r in rows[2:]:
        v = r["vs_kv_f32"]
        print(f"tp-engine {r['mode']} vs llama.cpp with a f32 KV cache: perplexity {(r['ppl'] / rows[1]['ppl'] - 1) * 100:+.2f} %, "
              f"top-1 {v['agree'] * 100:.2f} %, mean KL {v['kl']:.2e}")
    print(f"\ntp-engine int8 vs tp-engine float32: top-1 {own['agree'] * 100:.2f} %, mean KL {own['kl']:.2e}, "
          f"max abs logit diff {own['max_abs_diff']:.3f} (at position {own['max_abs_diff_at']}); from position 1: "
          f"top-1 {own['agree_from_1'] * 100:.2f} %, max diff {own['max_abs_diff_from_1']:.3f}")
    print(f"int8 GGUF matmul calls: {results['int8'][2]} (every one on the int8 kernels)")
    print(f"\nDecision rule: int8 perplexity within {PPL_TOL * 100:.1f} % of llama.cpp's ({ppl_rel * 100:+.2f} %) and "
          f"top-1 agreement >= {AGREE_MIN * 100:.0f} % ({int8['agree'] * 100:.2f} %): "
          f"{'MET: int8 becomes the default for GGUF files' if verdict else 'NOT met: float32 stays the default'}")
    f32, kv = rows[2], rows[1]
    print(f"For scale, by the same rule: tp-engine float32 (exact) {(f32['ppl'] / base - 1) * 100:+.2f} %, "
          f"{f32['agree'] * 100:.2f} %; llama.cpp itself with a f32 KV cache {(kv['ppl'] / base - 1) * 100:+.2f} %, "
          f"{kv['agree'] * 100:.2f} %.")
    Path(args.out).write_text(json.dumps({
        "date": date, "model": path.name, "tokens": len(ids), "text": Path(args.text).name, "threads": args.threads,
        "chunk": args.chunk, "reference": "llama.cpp, KV cache f16", "rows": rows, "int8_vs_float32": own,
        "rule": {"ppl_tol": PPL_TOL, "agree_min": AGREE_MIN, "int8_ppl_rel": ppl_rel, "met": verdict},
    }, indent=1))


if __name__ == "__main__":
    main()
