"""`instructune serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and a chat page for one model.

Endpoints: `POST /v1/chat/completions` (plain or streamed as server-sent events), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`, and the chat page at `/`. Prompts are the conversation rendered
with the model's own template and the generation prompt, exactly as training renders it. Every
request goes through one `GenerationQueue` (one thread runs the model, batching what it can). With an
API key, the `/v1/` endpoints need `Authorization: Bearer KEY`; `/health` and the page do not (the page
asks for the key and sends it with each request).

Under load and faults: at most `max_queue` requests wait (beyond: 503 with `Retry-After`); a request
that takes longer than `request_timeout` seconds, waiting included, ends with 504 (or an error event in
a stream) and gives its place up; a client that goes away frees its place at the next token; SIGTERM
(`DrainingServer`) stops accepting, refuses what waits with 503, lets the running batch finish and
exits; `/health` reports the queue.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from instructune.use.generation import encode_prompts
from instructune.use.generation_queue import GenerationQueue, Job, QueueClosed, QueueFull, scores_as_logprobs
from instructune.use.openai_api import (
    ApiError,
    ChatRequest,
    Settings,
    check_request,
    chunk_body,
    completion_body,
    new_completion_id,
    usage_body,
    validation_error,
)


def chat_page() -> str:
    """The chat page's HTML (self-contained: its style and script are inline)."""
    return (resources.files("instructune") / "resources" / "chat_page" / "index.html").read_text(encoding="utf-8")


def model_context(model) -> int | None:
    """How many positions the model reads (prompt and answer together), when its config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


DEFAULT_REQUEST_TIMEOUT_S = 600.0
"""How long a request may take, waiting included, unless `--request-timeout` says otherwise."""


def default_max_queue(batch_size: int) -> int:
    """Waiting requests allowed by default: two batches' worth, so one batch runs and the next two are ready."""
    return 2 * batch_size


class ChatService:
    """Requests in, answers out: prompts built and checked against the context, jobs queued, replies shaped."""

    def __init__(self, loaded, *, model_name: str, default_max_tokens: int = 512, batch_size: int = 16,
                 max_queue: int | None = None, request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S):
        self.loaded = loaded
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.batch_size = batch_size
        self.max_queue = default_max_queue(batch_size) if max_queue is None else max_queue
        self.request_timeout = request_timeout or None
        self.context = model_context(loaded.model)
        self.created = int(time.time())
        self.queue: GenerationQueue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the generation worker."""
        self.queue = GenerationQueue(self.loaded, batch_size=self.batch_size, max_waiting=self.max_queue)
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None

    def drain(self) -> None:
        """Stop taking requests: the waiting ones are refused (503), the running batch finishes. Safe to call
        from a signal handler: the work is handed to the event loop."""
        if self.queue is None:
            return
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.queue.drain)
        else:
            self.queue.drain()

    def health(self) -> dict[str, Any]:
        """What `/health` reports of the queue: waiting and running requests, and the bound."""
        stats = self.queue.stats() if self.queue is not None else {"waiting": 0, "running": 0}
        draining = self.queue is not None and (self.queue.draining or self.queue.closed)
        return {"status": "draining" if draining else "ok", "queue": stats["waiting"], "running": stats["running"],
                "max_queue": self.max_queue}

    def stop(self) -> None:
        """Stop the generation worker."""
        if self.queue is not None:
            self.queue.close()

    def model_card(self) -> dict[str, Any]:
        """The served model as `/v1/models` lists it."""
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "instructune"}

    def prompt_and_limit(self, settings: Settings) -> tuple[list[int], int]:
        """The prompt's ids and how many tokens the answer may have; a 400 when they do not fit the context."""
        assert self.queue is not None, "the service was not started"
        try:
            with self.queue.tokenizer_lock:
                prompt = encode_prompts(self.loaded.tokenizer, self.loaded.template, [settings.conversation])[0]
        except Exception as error:  # a template may raise anything (TemplateError, raise_exception(...), ...)
            # It refuses this conversation (roles that do not alternate, a system turn it does not take).
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ApiError(400, f"messages: the model's chat template refused this conversation ({detail})",
                           param="messages") from None
        if settings.max_tokens is not None:
            if self.context and len(prompt) + settings.max_tokens > self.context:
                raise ApiError(400, f"messages: the prompt ({len(prompt)} tokens) and max_tokens "
                                    f"({settings.max_tokens}) exceed the model's context of {self.context} tokens; "
                                    "shorten the messages or lower max_tokens",
                               param="messages", code="context_length_exceeded")
            return prompt, settings.max_tokens
        room = self.context - len(prompt) if self.context else self.default_max_tokens
        if room < 1:
            raise ApiError(400, f"messages: the prompt ({len(prompt)} tokens) fills the model's context of "
                                f"{self.context} tokens, leaving no room for an answer; shorten the messages",
                           param="messages", code="context_length_exceeded")
        return prompt, min(room, self.default_max_tokens)

    def submit(self, settings: Settings) -> tuple[Job, int, asyncio.Queue]:
        """Queue the request's job; returns it, its prompt length and the asyncio queue its events arrive on."""
        prompt, limit = self.prompt_and_limit(settings)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: tuple) -> None:  # called from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (the server is stopping): nobody is listening
                pass

        job = Job(prompt=prompt, max_tokens=limit, emit=emit,
                  temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed, stop=settings.stop,
                  logprobs=settings.logprobs, top_logprobs=settings.top_logprobs)
        try:
            self.queue.submit(job)
        except QueueFull as full:
            raise ApiError(503, f"{full}; retry in {full.retry_after} s (this server queues at most "
                                f"{self.max_queue}: --max-queue)", kind="server_error", code="server_busy",
                           headers={"Retry-After": str(full.retry_after)}) from None
        except QueueClosed:
            raise ApiError(503, "the server is shutting down; retry on another one or later", kind="server_error",
                           code="server_shutting_down", headers={"Retry-After": "5"}) from None
        job.deadline = loop.time() + self.request_timeout if self.request_timeout else None
        return job, len(prompt), events

    async def next_event(self, job: Job, events: asyncio.Queue) -> tuple:
        """The job's next event; a 504 `ApiError` (and the job cancelled) once its time is up."""
        wait = None if job.deadline is None else job.deadline - asyncio.get_running_loop().time()
        try:
            if wait is not None and wait <= 0:
                raise TimeoutError
            return await asyncio.wait_for(events.get(), timeout=wait)
        except TimeoutError:
            self.queue.cancel(job)
            raise ApiError(504, f"the request took longer than the server's limit of {self.request_timeout:g} s "
                                "(--request-timeout), waiting included; ask for fewer tokens or retry later",
                           kind="server_error", code="request_timeout") from None

    async def _cancel_on_disconnect(self, request: Request, job: Job, events: asyncio.Queue) -> None:
        """Cancel `job` when its client goes away (a plain answer: nobody else reads from the connection)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.queue.cancel(job)
        events.put_nowait(("cancelled",))

    def logprobs_of(self, piece, settings: Settings) -> list[dict[str, Any]] | None:
        """The piece's tokens in OpenAI's logprobs shape, when the request asked for them."""
        return (scores_as_logprobs(self.loaded.tokenizer, piece.tokens, settings.top_logprobs)
                if settings.logprobs else None)

    async def complete(self, settings: Settings, request: Request | None = None) -> dict[str, Any]:
        """The whole answer as one chat completion."""
        job, prompt_tokens, events = self.submit(settings)
        pieces, logprobs = [], []
        watch = asyncio.create_task(self._cancel_on_disconnect(request, job, events)) \
            if request is not None else None
        try:
            while True:
                event = await self.next_event(job, events)
                if event[0] == "piece":
                    pieces.append(event[1].text)
                    logprobs.extend(self.logprobs_of(event[1], settings) or [])
                elif event[0] == "cancelled":
                    raise ApiError(499, "the client closed the request", kind="server_error")
                elif event[0] == "done":
                    return completion_body(new_completion_id(), self.model_name, "".join(pieces), event[1],
                                           usage_body(prompt_tokens, event[2]),
                                           logprobs if settings.logprobs else None)
                else:
                    raise _event_error(event)
        finally:
            self.queue.cancel(job)  # the client went away, or the job ended: either way no more steps for it
            if watch is not None:
                watch.cancel()

    async def stream(self, settings: Settings, job: Job, prompt_tokens: int,
                     events: asyncio.Queue) -> AsyncIterator[str]:
        """The answer as server-sent events: a role chunk, content chunks, a finish chunk, [DONE]."""
        completion_id = new_completion_id()

        def sse(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield sse(chunk_body(completion_id, self.model_name, {"role": "assistant", "content": ""}))
            while True:
                try:
                    event = await self.next_event(job, events)
                except ApiError as error:  # out of time: the stream has begun, so the error is an event
                    yield sse(error.body())
                    break
                if event[0] == "piece":
                    yield sse(chunk_body(completion_id, self.model_name, {"content": event[1].text},
                                         logprobs=self.logprobs_of(event[1], settings)))
                elif event[0] == "done":
                    yield sse(chunk_body(completion_id, self.model_name, {}, finish_reason=event[1]))
                    if settings.include_usage:
                        yield sse({**chunk_body(completion_id, self.model_name, {}), "choices": [],
                                   "usage": usage_body(prompt_tokens, event[2])})
                    break
                else:
                    yield sse(_event_error(event).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.queue.cancel(job)


def _event_error(event: tuple) -> ApiError:
    """The `ApiError` of a worker's ("error", message[, status]) event: 503 while shutting down, else 500."""
    if len(event) > 2 and event[2] == 503:
        return ApiError(503, event[1], kind="server_error", code="server_shutting_down", headers={"Retry-After": "5"})
    return ApiError(500, event[1], kind="server_error")


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(loaded, *, model_name: str, api_key: str | None = None, default_max_tokens: int = 512,
               batch_size: int = 16, max_queue: int | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving `loaded` as `model_name`; its worker starts and stops with the app.
    `max_queue`: most waiting requests (default `default_max_queue`); `request_timeout`: seconds a request
    may take, waiting included (None or 0: no limit)."""
    service = ChatService(loaded, model_name=model_name, default_max_tokens=default_max_tokens,
                          batch_size=batch_size, max_queue=max_queue, request_timeout=request_timeout)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="instructune serve", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(list(error.errors())))

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if not given:
                return _error_response(ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                                                code="invalid_api_key"))
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return _error_response(ApiError(401, "incorrect API key", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(chat_page())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {**service.health(), "model": model_name, "api_key_required": bool(api_key)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return service.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, raw: Request):
        settings = check_request(request, model_name)
        if not settings.stream:
            return await service.complete(settings, raw)
        job, prompt_tokens, events = service.submit(settings)  # refusals come before the stream starts
        return StreamingResponse(service.stream(settings, job, prompt_tokens, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or SIGINT also drains the queue: what waits is refused with 503 at
    once, the running batch finishes, and uvicorn (which has stopped accepting connections) waits for those
    answers before it exits. A second Ctrl-C exits at once, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, service: ChatService):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        """uvicorn's signal handler: drain, then shut down as uvicorn does."""
        self.service.drain()
        super().handle_exit(sig, frame)


def server_for(app: FastAPI, **config) -> DrainingServer:
    """A uvicorn server for the app that drains on SIGTERM/SIGINT (see `DrainingServer`). It waits for the
    running batch up to the request time limit (the batch cannot outlast it), then a few seconds more."""
    timeout = app.state.service.request_timeout
    config.setdefault("timeout_graceful_shutdown", int(timeout) + 5 if timeout else None)
    return DrainingServer(uvicorn.Config(app, **config), app.state.service)


def serve(app: FastAPI, *, host: str, port: int) -> None:
    """Run the app with uvicorn until SIGTERM or Ctrl-C (drained: see `DrainingServer`)."""
    server_for(app, host=host, port=port, log_level="info").run()
