"""The OpenAPI description of the two completion endpoints (served at ``/openapi.json``).

Request schemas state what :func:`.protocol.parse_request` accepts, so that
API testers (schemathesis, Postman, ...) generate valid and near-valid bodies
from them; the checking itself stays in :mod:`.protocol` (a body the schema
allows may still be refused there, e.g. a prompt longer than the context).
Pure data: nothing here touches the app.
"""
from __future__ import annotations

from typing import Any

from .protocol import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, Limits

__all__ = ["chat_operation", "completion_operation"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_ERRORS = {
    "400": "the request is invalid (the error names the field)",
    "401": "a missing or wrong API key",
    "413": "the body is over the size limit",
    "429": "the server is full; retry later",
    "500": "the engine failed on this request (the group and other requests go on)",
    "503": "a rank of the group was lost, or the server is shutting down",
}


def _common(limits: Limits) -> dict[str, Any]:
    """Fields both endpoints share."""
    return {
        "model": {"type": "string", "enum": [limits.model_id]},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2,
                        "description": "below 1e-5: greedy (as vLLM)"},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": ["integer", "null"], "minimum": 0, "description": "an extension (vLLM's); 0: off"},
        "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**63 - 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                 "maxItems": MAX_STOP_STRINGS}, {"type": "null"}]},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": limits.max_model_len - 1},
        "n": {"type": ["integer", "null"], "enum": [1, None]},
        "ignore_eos": {"type": "boolean", "description": "an extension (vLLM's): always max_tokens tokens"},
    }


def _operation(summary: str, request: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {
            "200": {"description": "the completion (JSON), or server-sent events when stream is true",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **{code: {"description": why, "content": {"application/json": {"schema": _ERROR}}}
               for code, why in _ERRORS.items()},
        },
    }


def chat_operation(limits: Limits) -> dict[str, Any]:
    """``POST /v1/chat/completions``: the OpenAPI operation (for FastAPI's ``openapi_extra``)."""
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": part}, {"type": "null"}]}}}
    fields = _common(limits)
    fields |= {
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_completion_tokens": fields["max_tokens"],
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS[True]},
    }
    return _operation("Chat completion (OpenAI-compatible)",
                      {"type": "object", "required": ["model", "messages"], "properties": fields})


def completion_operation(limits: Limits) -> dict[str, Any]:
    """``POST /v1/completions``: the OpenAPI operation."""
    fields = _common(limits)
    fields |= {
        "prompt": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}},
        ]},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS[False]},
    }
    return _operation("Text completion (OpenAI-compatible)",
                      {"type": "object", "required": ["model", "prompt"], "properties": fields})
