"""The HTTP side: an OpenAI-compatible FastAPI app around one Generator.

Handlers validate, tokenize (on a thread of their own, never on the event loop), check the
context length, then hand a Job to the model thread and relay its events, as one JSON body or as
server-sent events. Every error, from malformed JSON to a failed generation, reaches the client
as OpenAI's error object; no input can end the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eaglespec.generate import GenerationConfig, Generator
from eaglespec.serve.metrics import ServerMetrics
from eaglespec.serve.protocol import (ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                      ChatCompletionRequest, Completion, CompletionChoice, CompletionRequest, Delta,
                                      ModelCard, ModelList, ResponseMessage, SamplingRequest, Usage, new_id)
from eaglespec.serve.worker import (ApiError, EngineWorker, Failed, Finished, Job, Piece, QueueFull,
                                    timeout_error)

log = logging.getLogger("eaglespec.serve")

STATIC = resources.files("eaglespec.serve") / "static"
#: how often a handler waiting on the model looks at its deadline and its client
POLL_S = 0.5
MAX_STOP_STRINGS = 4  # as OpenAI
DRAIN_BYTES = 16 << 20  # an oversized body up to this size is read (and dropped) before the 413


@dataclass(frozen=True)
class ServeConfig:
    """How the server admits and limits requests; `eaglespec serve` flags map onto it one to one."""

    model_name: str  # the id clients send as `model` and /v1/models lists
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_queue: int = 64  # requests that may wait for the model thread; past it, 429
    request_timeout: float = 600.0  # seconds from arrival (queueing included) to the last token
    max_request_bytes: int = 1 << 20  # a larger body gets 413

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("the served model name is empty")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")


# -- middleware --------------------------------------------------------------------------------


class BearerAuth:
    """/v1/* answers 401 unless `Authorization: Bearer <key>` matches (compared in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return await self.app(scope, receive, send)
        error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        await error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)


class BodyLimit:
    """413 for a request body over the limit, read before the app sees it, so a chunked body is
    limited too and the answer is the JSON error object."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large(scope, receive, send, drain=int(length) <= DRAIN_BYTES)
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self.too_large(scope, receive, send, drain=more)
        body: Message | None = {"type": "http.request", "body": b"".join(parts), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)

    async def too_large(self, scope: Scope, receive: Receive, send: Send, drain: bool) -> None:
        """Answer 413. A body of moderate size is read to its end first: most clients only read
        the answer after sending everything, and would see a broken pipe instead."""
        size = 0
        while drain and size <= DRAIN_BYTES:
            message = await receive()
            size += len(message.get("body", b""))
            drain = message["type"] == "http.request" and message.get("more_body", False)
        error = ApiError(413, f"the request body is larger than the server's limit ({self.max_bytes} bytes)",
                         code="request_too_large")
        await error_response(error)(scope, receive, send)


KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


class CountRequests:
    """eaglespec:http_requests by handler, method and status (unknown paths pooled as 'other')."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        handler = path if path in KNOWN_PATHS else "/static" if path.startswith("/static/") else "other"
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.http_requests.labels(handler, scope["method"], str(status)).inc()


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers={**error.headers, **(headers or {})})


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first pydantic error as a 400 naming its field (`messages.0.role`)."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    e = errors[0]
    loc = []
    for part in e.get("loc", ())[1:]:  # after "body"
        if isinstance(part, str) and (part in UNION_TAGS or not part.isidentifier()):
            break  # pydantic names the union member it tried: ("stop", "list[str]", 0) is the field stop
        loc.append(str(part))
    param = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", code="invalid_json")
    if e.get("type") == "missing" and not loc:
        return ApiError(400, "the request needs a JSON body")
    if e.get("type") == "model_attributes_type" or (not loc and e.get("type", "").endswith("_type")):
        return ApiError(400, "the request body must be a JSON object")
    return ApiError(400, f"{param or 'body'}: {e.get('msg', 'invalid value')}", param=param)


# -- the app -----------------------------------------------------------------------------------


def create_app(engine: Generator, config: ServeConfig) -> FastAPI:
    """An app serving `engine` under `config.model_name`. The model thread starts and stops with
    the app's lifespan (uvicorn runs it; so does `with TestClient(app)`)."""
    if engine.tokenizer is None:
        raise ValueError("serving needs a tokenizer")
    metrics = ServerMetrics(config.model_name)
    worker = EngineWorker(engine, metrics, config.max_queue)
    # One tokenizing thread, so the event loop never runs a chat template and at most this thread
    # encodes while the model thread decodes.
    tokenize = ThreadPoolExecutor(1, thread_name_prefix="eaglespec-tokenize")
    created = int(time.time())
    max_len = engine.target.max_len
    tree = engine.drafter.max_tree_size

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.close()
        tokenize.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="eaglespec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(BearerAuth, api_key=config.api_key)  # before the body is read
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts 401s too
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        codes = {404: "not_found", 405: "method_not_allowed"}
        error = ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                         code=codes.get(exc.status_code))
        return error_response(error, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def on_server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, "internal server error; see the server log", code="internal_error"))

    # -- helpers shared by the endpoints ---------------------------------------------------------

    def check_request(req: SamplingRequest) -> None:
        if req.model is not None and req.model != config.model_name:
            raise ApiError(404, f"the model '{req.model}' does not exist; this server serves "
                           f"'{config.model_name}'", param="model", code="model_not_found")
        if (bad := req.unsupported()) is not None:
            raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")
        stops = req.stop_strings
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must be non-empty", param="stop")

    async def encode(prompt: str | list[dict], chat: bool, param: str):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(tokenize, engine.encode, prompt, chat)
        except ValueError as e:
            raise ApiError(400, str(e), param=param) from None
        except Exception as e:  # a chat template that refuses the turns (say, two system turns)
            raise ApiError(400, f"the chat template refused the messages: {e}", param=param) from None

    def generation_config(req: SamplingRequest, prompt_len: int, prompt_param: str) -> GenerationConfig:
        room = max_len - prompt_len - tree  # new tokens that fit in the KV cache
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; with the draft tree ({tree}) it leaves no room "
                           f"in the context of {max_len} tokens", param=prompt_param, code="context_length_exceeded")
        limit = req.token_limit
        if limit is not None and limit <= 0:
            raise ApiError(400, f"{req.token_limit_param} must be > 0, got {limit}", param=req.token_limit_param)
        if limit is not None and limit > room:
            raise ApiError(400, f"{req.token_limit_param}={limit} does not fit: the context is {max_len} tokens, the "
                           f"prompt {prompt_len} and the draft tree {tree}, which leaves {room}",
                           param=req.token_limit_param, code="context_length_exceeded")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return GenerationConfig(max_new_tokens=limit or room, temperature=req.temperature, top_p=req.top_p,
                                top_k=max(req.top_k, 0), seed=seed, stop=req.stop_strings, ignore_eos=req.ignore_eos)

    def submit(ids, gen_config: GenerationConfig) -> Job:
        job = Job(ids, gen_config, config.request_timeout)
        try:
            worker.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {config.max_queue} requests are already waiting; "
                           f"retry in {e.retry_after_s} s", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        return job

    async def events(job: Job, request: Request) -> AsyncIterator[Piece | Finished]:
        """The job's events up to its end; raises ApiError on failure or timeout; cancels the job
        when the client goes away or the generator is closed early."""
        try:
            while True:
                event = await job.next_event(POLL_S)
                if event is None:
                    if time.monotonic() > job.deadline + POLL_S:  # the model thread is stuck in a step
                        raise timeout_error(job.timeout_s)
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(event, Failed):
                    raise event.error
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancel()

    def usage(job: Job, done: Finished) -> Usage:
        n = len(job.ids)
        return Usage(prompt_tokens=n, completion_tokens=done.completion_tokens,
                     total_tokens=n + done.completion_tokens)

    def sse(data: str) -> bytes:
        return format_sse_event(data_str=data)

    async def stream_events(job: Job, request: Request, chunk, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE body: one event per text piece, a last one with finish_reason and stats, usage if
        asked, then [DONE]. A failure after the headers went out becomes an error event."""
        try:
            first = chunk(None, None)
            if first is not None:
                yield sse(first.model_dump_json())
            async for event in events(job, request):
                if isinstance(event, Piece):
                    yield sse(chunk(event.text, None).model_dump_json())
                else:
                    last = chunk(None, event.reason)
                    last.speculative = event.speculative
                    yield sse(last.model_dump_json())
                    if include_usage:
                        tail = chunk(None, None, usage_only=True)
                        tail.usage = usage(job, event)
                        yield sse(tail.model_dump_json())
        except ApiError as e:
            yield sse(json.dumps(e.body()))
        yield sse("[DONE]")

    async def collect(job: Job, request: Request) -> tuple[str, Finished]:
        parts: list[str] = []
        async for event in events(job, request):
            if isinstance(event, Piece):
                parts.append(event.text)
            else:
                return "".join(parts), event
        raise ApiError(499, "client closed the request")  # nobody reads this answer

    def streaming(body: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- endpoints -----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_request(req)
        ids = await encode([m.as_template_turn() for m in req.messages], True, "messages")
        job = submit(ids, generation_config(req, len(ids), "messages"))
        rid = new_id("chatcmpl")
        if not req.stream:
            text, done = await collect(job, request)
            return ChatCompletion(id=rid, model=config.model_name, usage=usage(job, done), speculative=done.speculative,
                                  choices=[ChatChoice(message=ResponseMessage(content=text), finish_reason=done.reason)])
        now = int(time.time())

        def chunk(text: str | None, reason: str | None, usage_only: bool = False) -> ChatCompletionChunk:
            if usage_only:
                return ChatCompletionChunk(id=rid, created=now, model=config.model_name, choices=[])
            delta = Delta(role="assistant", content="") if text is None and reason is None else Delta(content=text)
            return ChatCompletionChunk(id=rid, created=now, model=config.model_name,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=reason)])

        return streaming(stream_events(job, request, chunk, req.include_usage))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_request(req)
        ids = await encode(req.prompt_text, False, "prompt")
        job = submit(ids, generation_config(req, len(ids), "prompt"))
        rid = new_id("cmpl")
        if not req.stream:
            text, done = await collect(job, request)
            return Completion(id=rid, model=config.model_name, usage=usage(job, done), speculative=done.speculative,
                              choices=[CompletionChoice(text=text, finish_reason=done.reason)])
        now = int(time.time())

        def chunk(text: str | None, reason: str | None, usage_only: bool = False) -> Completion | None:
            if usage_only:
                return Completion(id=rid, created=now, model=config.model_name, choices=[])
            if text is None and reason is None:
                return None  # completions have no opening role chunk
            return Completion(id=rid, created=now, model=config.model_name,
                              choices=[CompletionChoice(text=text or "", finish_reason=reason)])

        return streaming(stream_events(job, request, chunk, req.include_usage))

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_name, created=created, max_model_len=max_len)])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, "waiting": worker.waiting}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # warm the tokenizer on its thread: its first call may set options that later calls only read
    tokenize.submit(engine.encode, "hello", False).result()
    return app
