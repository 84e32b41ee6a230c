"""``tp-engine serve``: one OpenAI-compatible server on a tensor-parallel group.

Every rank loads its shard and builds the same :class:`Engine`. Rank 0 runs
the HTTP app (uvicorn, in a thread) and the engine loop (its main thread):
each step it broadcasts the decision and every rank applies it
(:mod:`.lockstep`). The other ranks only follow.

Ending:

- SIGINT/SIGTERM on rank 0: open requests end with a 503 error, rank 0
  broadcasts ``stop``, every rank exits 0. The other ranks ignore these
  signals for ``SIGNAL_GRACE_S`` (rank 0's ``stop`` is on its way), then exit.
- A lost rank (:mod:`.liveness` sees its process gone, or a collective
  fails): rank 0 ends every open request with a 503 error naming the rank
  and exits with ``EXIT_LOST_RANK``; the other ranks exit when they see
  rank 0 or a peer gone.

Speculative decoding (``--draft int8|int4``, ``--num-draft-tokens K``): every
rank builds the same quantized copy of its own shard as the draft
(:mod:`tp_engine.runtime.spec_step`), so the ranks agree on the proposals
without a message. Greedy requests (temperature 0, no logprobs) take
speculative steps, up to K + 1 tokens per step, exactly the target's greedy
answer; sampled requests and requests asking for logprobs take plain steps
in the same batch (no rejection sampling). ``/metrics`` counts the drafted
and accepted tokens and the verified rounds.
"""
from __future__ import annotations

import copy
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import uvicorn
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..runtime import Engine, decoder_for, unsupported_reason
from ..runtime.sampling import eos_ids
from ..runtime.spec_step import Speculator, self_draft
from . import lockstep
from .app import create_app
from .liveness import PeerWatch
from .metrics import Metrics
from .protocol import APIError, Limits
from .scheduler import Scheduler, lead

__all__ = ["EXIT_LOST_RANK", "bind", "serve"]

EXIT_LOST_RANK = 3
SIGNAL_GRACE_S = 5.0
FLUSH_ERRORS_S = 3.0  # how long a failing rank 0 lets open requests receive their error
DEFAULT_MAX_MODEL_LEN = 2048


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken before the model loads (a busy port fails at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def model_id(path: str | None) -> str:
    if path is None:
        return "SmolLM2-135M-Instruct"
    name = os.path.basename(os.path.normpath(path))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _log(message: str) -> None:
    print(f"tp-engine: {message}", file=sys.stderr, flush=True)


def serve(args: Any, rt: Any, model: Any, tokenizer: Any, sock: socket.socket | None, draft_model: Any = None) -> int:
    """Run the server on this rank until rank 0 stops it; the exit code.

    ``draft_model``: with ``--draft PATH``, that model loaded on the same ranks (sharded like ``model``);
    otherwise ``args.draft`` ("int8"/"int4") makes a quantized copy of ``model`` the draft."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"tp-engine serve runs on the lean runtime, which does not apply to this model: {reason}")
    decoder = decoder_for(model)
    context = decoder.max_positions or getattr(model.config, "max_position_embeddings", None)
    max_model_len = args.max_model_len or min(DEFAULT_MAX_MODEL_LEN, context or DEFAULT_MAX_MODEL_LEN)
    if decoder.max_positions is not None and max_model_len > decoder.max_positions:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's {decoder.max_positions} learned positions")
    draft = getattr(args, "draft", None)
    speculator = None
    if draft_model is not None:  # sharded over the same ranks: every rank computes the same proposals
        reason = unsupported_reason(draft_model)
        if reason is not None:
            raise ValueError(f"--draft {draft}: the lean runtime does not apply to this draft model: {reason}")
        speculator = Speculator(decoder, decoder_for(draft_model), args.num_draft_tokens, catch_up=args.prefill_chunk)
    elif draft is not None:  # the same quantized copy of its own shard on every rank: proposals agree without messages
        speculator = Speculator(decoder, self_draft(decoder, draft), args.num_draft_tokens, catch_up=args.prefill_chunk)
    engine = Engine(decoder, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                    max_model_len=max_model_len, tokenizer=tokenizer, speculator=speculator)
    watch = PeerWatch(rt.comm, decoder.device)
    if rt.rank != 0:
        return _follow(rt, engine, watch)
    eos = eos_ids(model, None) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    limits = Limits(args.served_model_name or model_id(args.model), max_model_len, eos)
    plan = getattr(model, "tp_engine_plan", None)
    info = {"ranks": rt.world_size, "comm": rt.comm.name, "device": str(decoder.device)}
    if plan is not None:
        info["q_heads_per_rank"] = [len(r.q_heads) for r in plan.ranks]
    if speculator is not None:
        kind = {"model": model_id(draft)} if draft_model is not None else {"weights": draft.lower()}
        info["draft"] = {**kind, "num_draft_tokens": speculator.k}
    return _lead(args, rt, engine, tokenizer, watch, sock, limits, info)


def _follow(rt: Any, engine: Engine, watch: PeerWatch) -> int:
    def lost(rank: int, pid: int) -> None:
        _log(f"error (rank {rt.rank}): rank {rank} (pid {pid}) of the group is gone; leaving")
        os._exit(EXIT_LOST_RANK)

    def on_signal(signum: int, frame: Any) -> None:  # rank 0 decides when to stop; give it time to say so
        timer = threading.Timer(SIGNAL_GRACE_S, os._exit, (128 + signum,))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    watch.start(lost)
    lockstep.follow(rt.comm, engine, stopping=watch.stop)
    return 0


def _lead(args: Any, rt: Any, engine: Engine, tokenizer: Any, watch: PeerWatch, sock: socket.socket,
          limits: Limits, info: dict[str, Any]) -> int:
    metrics = Metrics()
    if engine.speculator is not None:
        metrics.registry.register(_SpecCollector(engine.speculator))
    scheduler = Scheduler(args.max_batch, args.max_queue, metrics)
    # The HTTP thread gets its own tokenizer: a fast tokenizer used from two threads at once can fail ("Already
    # borrowed"), and the engine's stop-string checks decode with the original.
    app = create_app(scheduler, copy.deepcopy(tokenizer), limits, api_key=args.api_key, info=info)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=int(SIGNAL_GRACE_S)))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tp-engine-http", daemon=True)

    def fail_and_exit(message: str) -> None:
        """A lost rank: every open request gets the error, then this process exits (the engine
        loop may be stuck in a collective with the dead rank, so no clean return is possible)."""
        watch.stop()
        scheduler.fail(APIError(503, f"{message}; the server is exiting", code="group_lost"))
        deadline = time.monotonic() + FLUSH_ERRORS_S
        while time.monotonic() < deadline and server.server_state.tasks:
            time.sleep(0.05)
        _log(f"error: {message}; open requests were failed, exiting")
        os._exit(EXIT_LOST_RANK)

    def stop(signum: int, frame: Any) -> None:
        scheduler.fail(APIError(503, "the server is shutting down", code="shutting_down"))

    http.start()
    deadline = time.monotonic() + 60
    while not server.started and http.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the HTTP server did not start")
    host, port = sock.getsockname()[:2]
    _log(f"serving {limits.model_id} on http://{host}:{port} ({rt.world_size} rank(s), max batch {args.max_batch}, "
         f"max queue {args.max_queue}, max model len {limits.max_model_len}"
         + (f", speculative steps: {info['draft'].get('weights') or info['draft']['model']} draft, "
              f"k={info['draft']['num_draft_tokens']}" if "draft" in info
            else "") + ")")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    watch.start(lambda rank, pid: fail_and_exit(f"rank {rank} (pid {pid}) of the tensor-parallel group is gone"))
    watchdog = getattr(rt, "watchdog", None)  # heartbeats: peers on other hosts, dead or stopped
    if watchdog is not None:  # fail the open requests before exiting, instead of the watchdog's bare exit
        watchdog.set_on_lost(lambda lost: fail_and_exit(_remote_loss(lost)))
    try:
        lead(rt.comm, engine, scheduler)
    except Exception as exc:  # noqa: BLE001 - a collective failed: some rank is gone or stuck
        found, remote = watch.lost(), watchdog.probe() if watchdog is not None else None
        who = (f"rank {found[0]} (pid {found[1]}) of the tensor-parallel group is gone" if found
               else _remote_loss(remote) if remote else "the group failed")
        fail_and_exit(f"{who} ({type(exc).__name__}: {exc})".splitlines()[0])
    watch.stop()
    server.should_exit = True
    http.join(SIGNAL_GRACE_S + 2)
    _log("stopped")
    return 0


def _remote_loss(lost: Any) -> str:
    what = "exited" if lost.reason == "exited" else f"has been silent for {lost.silent_s:.1f} s (stopped or unreachable)"
    return f"rank {lost.rank} on host {lost.host} (pid {lost.pid}) of the tensor-parallel group {what}"


class _SpecCollector:
    """Speculative-decoding counts for ``/metrics``, read from the engine's speculator when scraped."""

    def __init__(self, speculator: Speculator):
        self.speculator = speculator

    def collect(self):
        s = self.speculator.stats
        yield CounterMetricFamily("tp_engine_spec_draft_tokens", "Tokens proposed by the draft", value=s.drafted)
        yield CounterMetricFamily("tp_engine_spec_accepted_tokens", "Draft tokens the target kept", value=s.accepted)
        yield CounterMetricFamily("tp_engine_spec_verified_rounds", "Sequence rounds the target verified",
                                  value=s.verified)
        yield GaugeMetricFamily("tp_engine_spec_tokens_per_round",
                                "Tokens gained per verified round since start (accepted + 1 per round)",
                                value=s.tokens_per_round)
