"""Every rank runs the same :class:`~tp_engine.runtime.Engine` calls in the same order.

Rank 0 decides; before each engine step it broadcasts the decision to the
other ranks, and every rank (rank 0 included) applies it the same way:

- ``{"op": "step", "add": [[id, prompt_ids, params], ...], "cancel": [id, ...]}``:
  ``add_request`` each new request (``params``: SamplingParams fields, JSON
  values only), ``cancel`` each listed id, then one ``engine.step()``;
- ``{"op": "idle", "sleep": s}``: nothing to do; the next decision comes in
  about ``s`` seconds, so the other ranks sleep instead of waiting inside a
  collective (a shared-memory or MPI wait polls, a sleep does not);
- ``{"op": "stop"}``: leave the loop.

On the wire a decision is UTF-8 JSON (never pickle) in a uint8 tensor: one
fixed frame of ``FRAME`` bytes whose first 8 bytes are the payload length
(little-endian), then a second broadcast for whatever did not fit (long
prompts). A step without news costs one small broadcast.

An ``add_request`` that raises ValueError raises it on every rank alike
(the engine's checks are deterministic), so the ranks stay in step; rank 0
reports the error to the request's client.

No request takes the group down. A token choice that fails (a sampling
setting that cannot be computed) ends that request alone, inside the engine.
A step that raises anywhere else, outside a collective, raised on every rank
alike (the same code on the same numbers): every rank ends the requests the
step was running with that error and the group goes on. An error raised from
inside a collective (the communicator, torch.distributed, MPI) means a rank is
gone or stuck: it propagates, and the server's loss handling takes over.
"""
from __future__ import annotations

import json
import time
import traceback
from typing import Any, Callable

import torch

from ..comm.base import Communicator
from ..runtime import Engine, SamplingParams, StepOutput

__all__ = ["FRAME", "apply", "follow", "from_collective", "receive", "send"]

FRAME = 4096
_HEADER = 8
_PARAM_FIELDS = {
    "max_new_tokens": int, "do_sample": bool, "temperature": float, "top_k": int, "top_p": float,
    "seed": int, "eos_token_ids": tuple, "stop_strings": tuple, "logprobs": int,
}


def _bytes_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def send(comm: Communicator, decision: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Rank 0: broadcast ``decision`` to the group; returns it. ``device``: where the
    communicator carries tensors (the model's device: NCCL moves CUDA tensors only)."""
    payload = json.dumps(decision, separators=(",", ":")).encode()
    head, rest = payload[: FRAME - _HEADER], payload[FRAME - _HEADER :]
    frame = len(payload).to_bytes(_HEADER, "little") + head
    comm.broadcast_(_bytes_tensor(frame + bytes(FRAME - len(frame)), torch.device(device)), src=0)
    if rest:
        comm.broadcast_(_bytes_tensor(rest, torch.device(device)), src=0)
    return decision


def receive(comm: Communicator, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Other ranks: the next decision from rank 0."""
    frame = torch.zeros(FRAME, dtype=torch.uint8, device=device)
    comm.broadcast_(frame, src=0)
    raw = frame.cpu().numpy().tobytes()
    n = int.from_bytes(raw[:_HEADER], "little")
    payload = raw[_HEADER : _HEADER + min(n, FRAME - _HEADER)]
    if n > FRAME - _HEADER:
        rest = torch.zeros(n - (FRAME - _HEADER), dtype=torch.uint8, device=device)
        comm.broadcast_(rest, src=0)
        payload += rest.cpu().numpy().tobytes()
    return json.loads(payload)


def sampling_params(fields: dict[str, Any]) -> SamplingParams:
    """SamplingParams from a decision's JSON fields (only the known ones, with their types)."""
    unknown = set(fields) - set(_PARAM_FIELDS)
    if unknown:
        raise ValueError(f"unknown sampling fields {sorted(unknown)}")
    kwargs = {k: (None if v is None else _PARAM_FIELDS[k](v)) for k, v in fields.items()}
    return SamplingParams(**kwargs)


def apply(engine: Engine, decision: dict[str, Any]) -> tuple[list[StepOutput], dict[Any, str]]:
    """Run one decision on this rank's engine: (the step's outputs, {request id: error} for refused adds)."""
    if decision.get("op") != "step":
        return [], {}
    errors: dict[Any, str] = {}
    for rid, prompt, fields in decision.get("add", ()):
        try:
            engine.add_request(prompt, sampling_params(fields), request_id=rid)
        except (ValueError, TypeError) as exc:
            errors[rid] = str(exc)
    for rid in decision.get("cancel", ()):
        engine.cancel(rid)
        engine.forget(rid)
    try:
        outputs = engine.step()
    except Exception as exc:
        if from_collective(exc):
            raise
        outputs = engine.fail_running(f"the engine failed on this step: {type(exc).__name__}: {exc}".splitlines()[0])
    for out in outputs:
        if out.finished:
            engine.forget(out.request_id)
    return outputs, errors


_COLLECTIVE_MODULES = ("tp_engine.comm", "torch.distributed", "mpi4py")


def from_collective(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) was raised inside a communicator: then the group itself failed."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            if str(frame.f_globals.get("__name__", "")).startswith(_COLLECTIVE_MODULES):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def follow(comm: Communicator, engine: Engine, stopping: Callable[[], None] = lambda: None) -> None:
    """Ranks other than 0: apply rank 0's decisions until it says stop (``stopping`` is called first)."""
    while True:
        decision = receive(comm, engine.decoder.device)
        op = decision.get("op")
        if op == "stop":
            stopping()
            return
        if op == "idle":
            time.sleep(min(float(decision.get("sleep", 0.0)), 1.0))
            continue
        apply(engine, decision)
