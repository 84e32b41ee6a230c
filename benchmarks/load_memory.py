"""Peak memory per rank of ``tp_engine.from_pretrained`` at TP = 1, 2, 4.

    python benchmarks/load_memory.py [--ranks 1 2 4] [--skip-hf]
    python benchmarks/load_memory.py --gguf [FILE.gguf | smollm2 | qwen2.5-coder-1.5b] [--ranks 1 2]

``--gguf``: GGUF rows instead (default file: the bundled SmolLM2): each TP
size loaded with ``dtype="auto"`` (quantized blocks kept) and ``float32``
(dequantized), with growth as a fraction of the file size (the target for
``auto`` at TP=2 is at most 0.6), both with and without the fixed cost of
importing the model's transformers code.

Creates once (cached under benchmarks/out/load_memory_ckpt/, git-ignored) a
random Llama checkpoint of about 1 GB: float32, hidden 1024, 16 layers,
16 Q / 4 KV heads of 64, MLP 3072, vocabulary 32000, untied LM head, saved
as safetensors shards of at most 600 MiB with an index. For each TP size it starts
that many *fresh* Python processes (subprocess + torchrun's variables, so no
rank inherits a parent's pages), each loads the checkpoint and reports its
peak resident memory; plus one process that loads it with plain
``AutoModelForCausalLM.from_pretrained`` for comparison.

Peak RSS is the kernel's high-water mark for the process's own address
space (``VmHWM`` in /proc/self/status). ``ru_maxrss`` is not used: after
``exec`` Linux keeps the pre-exec maximum in it, and Python's subprocess
forks (or vforks) from the parent, so it can report the parent's size.
Both anonymous memory and mapped file pages count. safetensors (0.8) and
transformers hand out tensors that are views of the file mapping, whose
pages are only read on first use, so RSS right after loading can be tiny;
the peak reported is therefore taken after one short forward pass, which
touches every weight. The peak right after loading is shown too.

Prints a markdown table and writes benchmarks/out/<checkpoint name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
CHECKPOINT = OUT / "load_memory_ckpt"

DIMS = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
SHARD_BYTES = 600 * 2**20


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# ------------------------------------------------------------ checkpoint


def create_checkpoint(path: Path) -> None:
    """Write the random checkpoint tensor by tensor (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**DIMS, dtype="float32")
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).named_parameters()}
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name])
            else:
                tensors[name] = torch.randn(shapes[name], generator=generator) * 0.02
            weight_map[name] = file
            total += tensors[name].numel() * 4
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
    with open(tmp / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config.save_pretrained(tmp)
    tmp.rename(path)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ------------------------------------------------------------ workers


def worker(mode: str, path: str, dtype: str = "auto") -> None:
    """Runs in a fresh process: load, report peak RSS as one JSON line."""
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    import tp_engine
    from tp_engine.api import from_pretrained

    rank = int(os.environ.get("RANK", 0))
    if mode == "tp":
        tp_engine.init()  # join the group first, so its cost is in "before"
    before = _status_mib("VmRSS")
    before_code = before
    if mode == "tp":
        # The model's transformers module, imported before loading and measured apart: a fixed cost
        # whatever the model's size (for Qwen2 ~150 MiB, mostly torch._dynamo, which transformers'
        # modeling code imports), which the GGUF rows report separately from the weights.
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from tp_engine.loading import load_config

        MODEL_FOR_CAUSAL_LM_MAPPING[type(load_config(path))]
        before_code = _status_mib("VmRSS")
    start = time.perf_counter()
    if mode == "tp":
        model = from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    seconds = time.perf_counter() - start
    load_peak = _status_mib("VmHWM")
    with torch.no_grad():  # touches every weight: mapped-but-unread pages count from here on
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    peak = _status_mib("VmHWM")
    status = {f: _status_mib(f) for f in ("VmRSS", "RssAnon", "RssFile")}
    print(
        "RESULT "
        + json.dumps(
            dict(
                rank=rank,
                before_mib=before,
                before_code_mib=before_code,
                load_peak_mib=load_peak,
                peak_mib=peak,
                status_after_forward_mib=status,
                seconds=seconds,
                params=sum(p.numel() for p in model.parameters()),
                finite=bool(torch.isfinite(logits).all()),
            )
        ),
        flush=True,
    )
    if mode == "tp":
        tp_engine.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, world: int, path: Path, timeout: float = 900, dtype: str = "auto") -> list[dict]:
    """Start ``world`` fresh processes; return their reports by rank."""
    port = _free_port()
    env_base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env_base["PYTHONPATH"] = str(ROOT) + os.pathsep + env_base.get("PYTHONPATH", "")
    env_base.setdefault("HF_HUB_OFFLINE", "1")
    env_base.setdefault("OMP_NUM_THREADS", "1")
    procs = []
    for rank in range(world):
        env = dict(env_base)
        if mode == "tp":
            env.update(
                RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", mode, "--path", str(path), "--dtype", dtype],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    reports = []
    for rank, p in enumerate(procs):
        out, err = p.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"{mode} rank {rank} of {world} failed (exit {p.returncode}):\n{err[-3000:]}")
        reports.append(json.loads(lines[-1][len("RESULT "):]))
    return sorted(reports, key=lambda r: r["rank"])


# ------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--skip-hf", action="store_true", help="skip the plain transformers baseline")
    parser.add_argument("--layers", type=int, default=DIMS["num_hidden_layers"],
                        help="decoder layers of the checkpoint (16: about 1 GB; each adds 46 MiB)")
    parser.add_argument("--gguf", nargs="?", const="smollm2", default=None, metavar="FILE|NAME",
                        help="GGUF rows (auto vs float32) for a .gguf file, smollm2 (bundled) or a tp-engine model name")
    parser.add_argument("--dtypes", nargs="+", default=["auto", "float32"], choices=["auto", "float32", "bfloat16"],
                        help="with --gguf: the dtype rows to run (auto keeps the blocks)")
    parser.add_argument("--worker", choices=["tp", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.path, args.dtype)
        return
    if args.gguf:
        gguf_rows(args.gguf, args.ranks, args.dtypes)
        return

    OUT.mkdir(parents=True, exist_ok=True)
    global CHECKPOINT
    if args.layers != DIMS["num_hidden_layers"]:
        DIMS["num_hidden_layers"] = args.layers
        CHECKPOINT = CHECKPOINT.with_name(f"{CHECKPOINT.name}_{args.layers}layers")
    if not CHECKPOINT.exists():
        print(f"creating {CHECKPOINT} ...", file=sys.stderr, flush=True)
        # In a child, so this process never holds the weights.
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                        f"import load_memory, pathlib; load_memory.DIMS['num_hidden_layers'] = {args.layers}; "
                        f"load_memory.create_checkpoint(pathlib.Path({str(CHECKPOINT)!r}))"],
                       check=True)
    size_mib = checkpoint_bytes(CHECKPOINT) / 2**20

    rows = []
    if not args.skip_hf:
        print("transformers baseline ...", file=sys.stderr, flush=True)
        (r,) = run("hf", 1, CHECKPOINT)
        rows.append(("transformers from_pretrained", 1, [r]))
    for world in args.ranks:
        print(f"tp_engine TP={world} ...", file=sys.stderr, flush=True)
        rows.append(("tp_engine.from_pretrained", world, run("tp", world, CHECKPOINT)))

    tp1 = next((reports for name, world, reports in rows if name.startswith("tp_engine") and world == 1), None)
    tp1_peak = max(r["peak_mib"] for r in tp1) if tp1 else None
    tp1_growth = max(r["peak_mib"] - r["before_mib"] for r in tp1) if tp1 else None
    print(f"\ncheckpoint: {size_mib:.0f} MiB float32 safetensors ({CHECKPOINT.name}, {len(list(CHECKPOINT.glob('*.safetensors')))} shards). "
          f"Per-rank peak = VmHWM of the rank's own process after loading and one 4-token forward "
          f"(which touches every weight, so weights left as file mappings count too); max over ranks. "
          f"Growth = peak - RSS just before loading.\n")
    print("| loader | TP | peak RSS after load (MiB) | per-rank peak RSS (MiB) | ratio to TP=1 | RSS before load (MiB) | growth (MiB) | growth ratio | load time (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, world, reports in rows:
        load_peak = max(r["load_peak_mib"] for r in reports)
        peak = max(r["peak_mib"] for r in reports)
        before = max(r["before_mib"] for r in reports)
        growth = max(r["peak_mib"] - r["before_mib"] for r in reports)
        seconds = max(r["seconds"] for r in reports)
        ratio = f"{peak / tp1_peak:.2f}" if tp1_peak else "-"
        gratio = f"{growth / tp1_growth:.2f}" if tp1_growth else "-"
        print(f"| {name} | {world} | {load_peak:.0f} | {peak:.0f} | {ratio} | {before:.0f} | {growth:.0f} | {gratio} | {seconds:.1f} |")
    with open(OUT / f"{CHECKPOINT.name}.json", "w") as f:
        json.dump({"checkpoint_mib": size_mib, "dims": DIMS,
                   "rows": [{"loader": n, "tp": w, "ranks": rs} for n, w, rs in rows]}, f, indent=2)


def gguf_file(name: str) -> Path:
    """A .gguf path, the bundled SmolLM2 ("smollm2"), or a model assembled by tp_engine.model_files."""
    if name.endswith(".gguf"):
        return Path(name)
    sys.path.insert(0, str(ROOT))
    if name == "smollm2":
        from tp_engine.loading import default_model_path

        return Path(default_model_path())
    from tp_engine.model_files import locate

    return locate(name)


def gguf_rows(name: str, ranks: list[int], dtypes: list[str] = ("auto", "float32")) -> None:
    """Per-rank peak and growth of from_pretrained on a GGUF file, quantized blocks kept vs dequantized."""
    path = gguf_file(name)
    size_mib = path.stat().st_size / 2**20
    rows = []
    for dtype in dtypes:
        for world in ranks:
            print(f"tp_engine GGUF dtype={dtype} TP={world} ...", file=sys.stderr, flush=True)
            rows.append((dtype, world, run("tp", world, path, dtype=dtype)))
    print(f"\nGGUF file: {path.name}, {size_mib:.0f} MiB. Per-rank peak = VmHWM after loading and one 4-token "
          f"forward; growth = peak - RSS just before loading (the process with torch and the group up); "
          f"model code = RSS added by importing the model's transformers module (a fixed cost, any model size); "
          f"net growth = growth - model code; max over ranks.\n")
    print("| dtype | TP | per-rank peak RSS (MiB) | RSS before load (MiB) | growth (MiB) | growth / file size "
          "| model code (MiB) | net growth (MiB) | net growth / file size | load time (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dtype, world, reports in rows:
        peak = max(r["peak_mib"] for r in reports)
        before = max(r["before_mib"] for r in reports)
        growth = max(r["peak_mib"] - r["before_mib"] for r in reports)
        code = max(r["before_code_mib"] - r["before_mib"] for r in reports)
        net = max(r["peak_mib"] - r["before_code_mib"] for r in reports)
        seconds = max(r["seconds"] for r in reports)
        print(f"| {dtype} | {world} | {peak:.0f} | {before:.0f} | {growth:.0f} | {growth / size_mib:.2f} "
              f"| {code:.0f} | {net:.0f} | {net / size_mib:.2f} | {seconds:.1f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"gguf_{path.stem}.json", "w") as f:
        json.dump({"file": str(path), "file_mib": size_mib,
                   "rows": [{"dtype": d, "tp": w, "ranks": rs} for d, w, rs in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
