"""The HTTP app (FastAPI on uvicorn, rank 0 only): OpenAI's endpoints over the :class:`Scheduler`.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as
server-sent events or not), ``GET /v1/models``, ``GET /health`` and
``GET /metrics``, the OpenAPI description at ``GET /openapi.json`` (request
schemas from :mod:`.schema`), and a chat page at ``/``. Every failure is OpenAI's error JSON with its status
code; a streamed request that fails after its first byte gets the error
JSON as its last event. A client that goes away cancels its sequence.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import CONTENT_TYPE
from .protocol import (
    APIError,
    Completion,
    Limits,
    TextStream,
    chunk_body,
    logprobs_body,
    parse_request,
    response_body,
    usage,
)
from .scheduler import Scheduler, Sequence
from .schema import chat_operation, completion_operation

__all__ = ["create_app"]

DISCONNECT_POLL_S = 1.0
_PAGE = Path(__file__).with_name("chat.html")  # the chat page at /: static HTML and JS, no build step


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body has {length} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def create_app(scheduler: Scheduler, tokenizer: Any, limits: Limits, *, api_key: str | None = None,
               info: dict[str, Any] | None = None) -> FastAPI:
    """The app; ``info`` (ranks, split, ...) is shown in ``/v1/models`` and ``/health``."""
    app = FastAPI(title="tp-engine", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    info = dict(info or {})

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "a missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.closed is not None:
            return JSONResponse(scheduler.closed.body(), status_code=503)
        return JSONResponse({"status": "ok", **info})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(scheduler.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        card = {"id": limits.model_id, "object": "model", "created": 0, "owned_by": "tp-engine",
                "max_model_len": limits.max_model_len, **info}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions", openapi_extra=chat_operation(limits))
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions", openapi_extra=completion_operation(limits))
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def complete(request: Request, chat: bool) -> Response:
        authorize(request)
        body = await _read_json(request, limits.max_body_bytes)
        req = parse_request(body, tokenizer, limits, chat=chat)
        seq = scheduler.submit(req.prompt, req.params, asyncio.get_running_loop())
        if req.stream:
            return StreamingResponse(stream(req, seq), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        task = asyncio.ensure_future(collect(req, seq))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return JSONResponse(task.result())
                if await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
        finally:
            scheduler.cancel(seq)  # no-op once finished

    async def pieces(req: Completion, seq: Sequence) -> AsyncIterator[tuple[str, str | None, int, list]]:
        """(new text, finish reason or None, tokens so far, the new tokens' logprobs) as the engine produces them."""
        text = TextStream(tokenizer, req.stop)
        while True:
            event = await seq.events.get()
            if event[0] == "error":
                raise event[1]
            _, tokens, finish, logprobs = event
            if text.stopped:  # tokens past a stop string: neither text nor logprobs
                logprobs = None
            delta = text.add(tokens, final=finish is not None)
            if text.stopped:
                if finish is None:  # a stop string the engine's own check did not see (special tokens)
                    scheduler.cancel(seq, outcome="stop")
                finish = "stop"
            finish = None if finish is None else "length" if finish == "length" else "stop"
            yield delta, finish, len(text.tokens), logprobs or []
            if finish is not None:
                return

    async def collect(req: Completion, seq: Sequence) -> dict[str, Any]:
        parts, finish, n, entries = [], "stop", 0, []
        async for delta, finish, n, logprobs in pieces(req, seq):
            parts.append(delta)
            entries.extend(logprobs)
        return response_body(req, limits.model_id, "".join(parts), finish, n, logprobs_body(req, tokenizer, entries))

    async def stream(req: Completion, seq: Sequence) -> AsyncIterator[str]:
        try:
            if req.chat:
                yield _sse(chunk_body(req, limits.model_id, None, None, first=True))
            n, sent = 0, 0
            async for delta, finish, n, logprobs in pieces(req, seq):
                if delta or finish or logprobs:
                    lp = logprobs_body(req, tokenizer, logprobs, sent)
                    yield _sse(chunk_body(req, limits.model_id, delta, finish, logprobs=lp))
                    sent += len(delta)
            if req.include_usage:
                yield _sse(chunk_body(req, limits.model_id, None, None, usage_counts=usage(len(req.prompt), n)))
            yield "data: [DONE]\n\n"
        except APIError as exc:
            yield _sse(exc.body())
        finally:
            scheduler.cancel(seq)  # the client went away (or we are done: then a no-op)

    return app
