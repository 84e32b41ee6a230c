"""The OpenAI wire format: request checking, response bodies, error JSON, streamed text.

Nothing here touches the network or the engine: a request body (already
parsed from JSON; nothing is ever unpickled) becomes a :class:`Completion`
(prompt token ids plus the engine's sampling settings) or an
:class:`APIError`, which the app turns into OpenAI's error JSON
``{"error": {"message", "type", "param", "code"}}`` with its status code.
"""
from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "GREEDY_BELOW_TEMPERATURE",
    "APIError",
    "Completion",
    "Limits",
    "TextStream",
    "chat_prompt_ids",
    "logprobs_body",
    "parse_request",
    "usage",
]

# Fields that change what OpenAI would return and that this server does not implement: refused, not ignored.
_UNSUPPORTED = {
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4
# Temperatures below this are greedy, as vLLM does (its _SAMPLING_EPS): logits / 1e-300 overflow to inf and
# the softmax to NaN, and a temperature that small picks the argmax anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = {True: 20, False: 5}  # alternatives per token OpenAI allows: chat, legacy completions


class APIError(Exception):
    """A request that gets an OpenAI-style error instead of a completion."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the server accepts (from the command line)."""

    model_id: str
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    max_body_bytes: int = 1 << 20


@dataclass
class Completion:
    """One checked request: what the engine runs and how to answer."""

    chat: bool
    prompt: list[int]
    params: dict[str, Any]  # the engine's SamplingParams fields, JSON-safe (sent to every rank as is)
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token to report (0: only the chosen token); None: off
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"{name} must be a number, got {value!r}", name, "invalid_type")
    if value < lo or (lo_open and value == lo) or value > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(f"{name} must be in {interval}, got {value!r}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop", "invalid_value")
    return tuple(s for s in stops if s)


def _message_text(message: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _bad(f"{param} must be an object with role and content", param, "invalid_type")
    role, content = message.get("role"), message.get("content")
    if role not in _ROLES:
        raise _bad(f"{param}.role must be one of {', '.join(_ROLES)}, got {role!r}", f"{param}.role", "invalid_value")
    if content is None:
        content = ""
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}.content: only text parts are supported", f"{param}.content", "invalid_value")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise _bad(f"{param}.content must be a string or a list of text parts", f"{param}.content", "invalid_type")
    return {"role": "system" if role == "developer" else role, "content": content}


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of ``messages`` through the tokenizer's chat template, ready for the assistant's
    turn: the same ids ``tp-engine generate`` feeds (see cli._prompt_ids)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = getattr(ids, "input_ids", ids) if not hasattr(ids, "flatten") else ids
    return [int(t) for t in ids.flatten().tolist()]


def _prompt(body: dict, tokenizer: Any, chat: bool) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages must be a non-empty list", "messages", "invalid_type")
        messages = [_message_text(m, i) for i, m in enumerate(messages)]
        if not getattr(tokenizer, "chat_template", None):
            raise _bad("this model has no chat template: use /v1/completions", "messages", "no_chat_template")
        try:
            return chat_prompt_ids(tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation (roles out of order, ...)
            raise _bad(f"the chat template rejected these messages: {exc}".splitlines()[0], "messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt must not be empty", "prompt", "invalid_value")
        return [int(t) for t in tokenizer(prompt)["input_ids"]]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise _bad(f"token ids {bad[:5]} are outside the vocabulary (size {vocab})", "prompt", "invalid_value")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("one prompt per request (n=1): send a string or a list of token ids", "prompt", "invalid_value")
    raise _bad("prompt must be a non-empty string or a list of token ids", "prompt", "invalid_type")


def parse_request(body: Any, tokenizer: Any, limits: Limits, *, chat: bool) -> Completion:
    """A request body -> a :class:`Completion`, or an :class:`APIError` (400) naming the bad field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model must be a string", "model", "invalid_type")
    if model != limits.model_id:
        raise _bad(f"the model {model!r} does not exist; this server serves {limits.model_id!r}", "model",
                   "model_not_found")
    for name, neutral in _UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise _bad(f"{name} is not supported by this server", name, "unsupported_parameter")
    n = _integer(body, "n")
    if n not in (None, 1):
        raise _bad(f"only n=1 is supported, got {n}", "n", "invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be a boolean, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options must be an object", "stream_options", "invalid_type")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage must be a boolean", "stream_options.include_usage", "invalid_type")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k") or 0  # an extension (vLLM's): 0 or absent = off
    if top_k < 0:
        raise _bad(f"top_k must be >= 0, got {top_k}", "top_k", "invalid_value")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad(f"seed must be in [0, 2**63), got {seed}", "seed", "invalid_value")
    stop = _stop_strings(body)
    ignore_eos = body.get("ignore_eos", False)  # an extension (vLLM's): always max_tokens tokens, for load tests
    if not isinstance(ignore_eos, bool):
        raise _bad(f"ignore_eos must be a boolean, got {ignore_eos!r}", "ignore_eos", "invalid_type")

    logprobs = _logprobs(body, chat)
    prompt = _prompt(body, tokenizer, chat)
    room = limits.max_model_len - len(prompt)
    if room < 1:
        raise _bad(f"the prompt has {len(prompt)} tokens; this server takes at most {limits.max_model_len - 1} "
                   f"(--max-model-len {limits.max_model_len} includes at least one new token)",
                   "messages" if chat else "prompt", "context_length_exceeded")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens, param = None, names[-1]
    for name in names:
        value = _integer(body, name)
        if value is not None:
            max_tokens, param = value, name
            break
    if max_tokens is None:
        max_tokens = room
    elif max_tokens < 1:
        raise _bad(f"{param} must be at least 1, got {max_tokens}", param, "invalid_value")
    elif max_tokens > room:
        raise _bad(f"{param} {max_tokens} plus the prompt's {len(prompt)} tokens exceeds the context of "
                   f"{limits.max_model_len} tokens", param, "context_length_exceeded")
    sample = temperature >= GREEDY_BELOW_TEMPERATURE
    params = dict(
        max_new_tokens=max_tokens,
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_k=top_k if sample else 0,
        top_p=top_p if sample else 1.0,
        # An unseeded sampled request gets a seed drawn here: every rank then samples with it, no collective needed.
        seed=(seed if seed is not None else secrets.randbits(63)) if sample else None,
        eos_token_ids=[] if ignore_eos else list(limits.eos_token_ids),
        stop_strings=list(stop),
        logprobs=logprobs,
    )
    return Completion(chat, prompt, params, stream, include_usage and stream, stop, logprobs)


def _logprobs(body: dict, chat: bool) -> int | None:
    """Alternatives per token the request asks for, None when it asks for no log-probabilities.

    Chat: ``logprobs`` (a boolean) and ``top_logprobs`` (0..20, only with
    ``logprobs: true``). Completions: ``logprobs`` (an integer 0..5).
    """
    limit = MAX_TOP_LOGPROBS[chat]
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise _bad(f"logprobs must be a boolean, got {wanted!r}", "logprobs", "invalid_type")
        top = _integer(body, "top_logprobs")
        if top is not None and not wanted:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        if not wanted:
            return None
        name = "top_logprobs"
        top = 0 if top is None else top
    else:
        name, top = "logprobs", _integer(body, "logprobs")
        if top is None:
            return None
    if not 0 <= top <= limit:
        raise _bad(f"{name} must be in [0, {limit}], got {top}", name, "invalid_value")
    return top


def logprobs_body(req: Completion, tokenizer: Any, entries: list[Any], text_offset: int = 0) -> dict | None:
    """OpenAI's ``logprobs`` object for ``entries`` (runtime TokenLogprob values), or None when not asked.

    Chat: ``{"content": [{token, logprob, bytes, top_logprobs}]}``; completions:
    ``{tokens, token_logprobs, top_logprobs, text_offset}`` (``text_offset``:
    where the first token's text starts in the completion).
    """
    if req.logprobs is None:
        return None

    def text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    if req.chat:
        def item(token: int, logprob: float) -> dict:
            t = text(token)
            return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}
    tokens = [text(e.token) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


class TextStream:
    """Token ids -> text deltas, for one sequence.

    Re-decodes the sequence's tokens at each step (special tokens skipped,
    as ``tp-engine generate`` prints them) and hands out only text that is
    final: an incomplete UTF-8 character (a trailing U+FFFD) and a tail
    that may still become a stop string are held back; text from a stop
    string on is never sent (``stopped`` becomes True).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""  # everything handed out so far
        self.stopped = False

    def add(self, tokens: list[int], final: bool = False) -> str:
        """The new text after ``tokens`` (``final``: the sequence ended, flush everything)."""
        if self.stopped:
            return ""
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        end = len(text)
        if self.stop:
            start = max(0, len(self.text) - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end, self.stopped = min(hits), True
        if not final and not self.stopped:
            while end > len(self.text) and text[end - 1] == "\ufffd":
                end -= 1
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, end - len(self.text)), 0, -1):
                    if text[end - k : end] == s[:k]:
                        end -= k
                        break
        if end <= len(self.text) or not text.startswith(self.text):
            return ""
        delta = text[len(self.text) : end]
        self.text = text[:end]
        return delta


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(req: Completion, model_id: str, text: str, finish_reason: str, completion_tokens: int,
                  logprobs: dict | None = None) -> dict:
    """The non-streamed answer."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        kind, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        kind, prefix = "text_completion", "cmpl-"
    return {"id": prefix + req.id, "object": kind, "created": req.created, "model": model_id, "choices": [choice],
            "usage": usage(len(req.prompt), completion_tokens)}


def chunk_body(req: Completion, model_id: str, text: str | None, finish_reason: str | None,
               *, first: bool = False, usage_counts: dict | None = None, logprobs: dict | None = None) -> dict:
    """One streamed chunk; ``usage_counts`` makes it the closing usage chunk (no choices)."""
    if req.chat:
        kind, prefix = "chat.completion.chunk", "chatcmpl-"
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        kind, prefix = "text_completion", "cmpl-"
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    body = {"id": prefix + req.id, "object": kind, "created": req.created, "model": model_id,
            "choices": [] if usage_counts is not None else [choice]}
    if req.include_usage:
        body["usage"] = usage_counts
    return body
