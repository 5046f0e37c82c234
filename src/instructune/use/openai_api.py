"""The OpenAI chat-completions API as `instructune serve` speaks it: requests checked, responses shaped.

A request is read by pydantic (types only) and then checked here, so every refusal is an `ApiError`
with OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) and a message that names
the field (`messages[1].role: unknown role 'robot'; use system, user or assistant`). Supported: `model`,
`messages` (text content, a string or text parts), `temperature`, `top_p`, `max_tokens` (or
`max_completion_tokens`), `stop`, `seed`, `stream` (+ `stream_options.include_usage`), `logprobs`,
`top_logprobs`, `n` (1 only). Settings that would change the answer but are not implemented
(`tools`, penalties, `logit_bias`, ...) are refused rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from instructune.data.conversation import Conversation, Message
from instructune.ranges import setting_problem

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Roles a request may use, and the role each becomes (OpenAI's newer `developer` is the system prompt)."""
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "response_format",
               "frequency_penalty", "presence_penalty")
"""Request fields that would change the answer; refused unless absent, null or zero."""


class ApiError(Exception):
    """A refused request: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}
        """Extra response headers (`Retry-After` on a 503)."""

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients read the error from."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ChatRequest(BaseModel):
    """The body of `POST /v1/chat/completions` (types only; `check_request` checks the values)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    n: int | None = None


@dataclass
class Settings:
    """What a checked request asks for, in the terms generation takes."""

    conversation: Conversation
    temperature: float
    top_p: float
    max_tokens: int | None
    """None: as many as the context and the server's default allow."""
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first of pydantic's errors as one clear 400 (`messages[0]: Input should be a valid dictionary`)."""
    error = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [part for part in error.get("loc", ()) if part != "body"]
    name = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    message = error.get("msg", "invalid value")
    if error.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({error.get('ctx', {}).get('error', message)})")
    return ApiError(400, f"{name}: {message}" if name else message, param=name or None)


def _content_text(content: Any, field: str) -> str:
    """A message's content as text: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{field}[{k}]: only text parts are supported, got {kind!r}", param=f"{field}[{k}]")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"{field}: expected a string or a list of text parts, got {type(content).__name__}",
                   param=field)


def request_conversation(messages: list[dict[str, Any]]) -> Conversation:
    """The conversation of a request's messages; the last must be the user's (it is what gets answered)."""
    if not messages:
        raise ApiError(400, "messages: at least one message is needed", param="messages")
    turns = []
    for k, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{k}].role: unknown role {role!r}; use system, user or assistant",
                           param=f"messages[{k}].role")
        if "content" not in message or message["content"] is None:
            raise ApiError(400, f"messages[{k}].content: missing", param=f"messages[{k}].content")
        turns.append(Message(ROLES[role], _content_text(message["content"], f"messages[{k}].content")))
    if turns[-1].role != "user":
        raise ApiError(400, f"messages[{len(turns) - 1}].role: the last message must be the user's, "
                            f"got {messages[-1]['role']!r}", param=f"messages[{len(turns) - 1}].role")
    return Conversation(messages=turns)


def _check_range(name: str, value: Any, setting: str) -> None:
    problem = setting_problem(setting, value)
    if problem:
        raise ApiError(400, f"{name}: {problem}", param=name)


def check_request(request: ChatRequest, model_name: str) -> Settings:
    """The settings of a request, or an `ApiError` naming what is wrong with it."""
    if request.model != model_name:
        raise ApiError(404, f"model {request.model!r} is not served here; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    extra = request.model_extra or {}
    for name in UNSUPPORTED:
        if extra.get(name) not in (None, 0, 0.0, [], {}):
            raise ApiError(400, f"{name}: not supported by instructune serve", param=name)
    if request.n not in (None, 1):
        raise ApiError(400, f"n: only one choice per request is supported, got {request.n}", param="n")
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    _check_range("temperature", temperature, "temperature")
    _check_range("top_p", top_p, "top_p")
    _check_range("max_tokens", max_tokens, "max_new_tokens")
    _check_range("seed", request.seed, "seed")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", param="stop")
    top_logprobs = request.top_logprobs or 0
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs: must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}",
                       param="top_logprobs")
    if top_logprobs and not request.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    include_usage = bool((request.stream_options or {}).get("include_usage"))
    return Settings(conversation=request_conversation(request.messages), temperature=temperature, top_p=top_p,
                    max_tokens=max_tokens, stop=stop, seed=request.seed, stream=request.stream,
                    include_usage=include_usage, logprobs=request.logprobs, top_logprobs=top_logprobs)


def token_logprob(text: str, logprob: float, top: list[tuple[str, float]]) -> dict[str, Any]:
    """One token in OpenAI's `logprobs.content` shape (`bytes` null for a token that is part of a character)."""
    def entry(token: str, value: float) -> dict[str, Any]:
        raw = None if "\ufffd" in token else list(token.encode("utf-8"))
        return {"token": token, "logprob": value, "bytes": raw}

    return {**entry(text, logprob), "top_logprobs": [entry(t, v) for t, v in top]}


def new_completion_id() -> str:
    """A fresh `chatcmpl-...` id."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(completion_id: str, model: str, content: str, finish_reason: str, usage: dict[str, int],
                    logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A whole (not streamed) chat completion."""
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None if logprobs is None else {"content": logprobs},
                         "finish_reason": finish_reason}],
            "usage": usage}


def chunk_body(completion_id: str, model: str, delta: dict[str, Any], *, finish_reason: str | None = None,
               logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One server-sent chunk of a streamed completion."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta,
                         "logprobs": None if logprobs is None else {"content": logprobs},
                         "finish_reason": finish_reason}]}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's token counts."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
