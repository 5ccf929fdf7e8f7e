"""The HTTP side: an OpenAI-compatible FastAPI app around one Generator.

A generation request is validated, tokenized (on a thread of its own, never on the event loop),
checked against the context length, then handed to the model thread as a Job whose events are
relayed as one JSON body or as server-sent events. Every error, from malformed JSON to a failed
generation, reaches the client as OpenAI's error object; no input can end the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from eaglespec.generate import GenerationConfig, Generator
from eaglespec.serve.errors import ApiError, timeout_error, validation_error
from eaglespec.serve.metrics import ServerMetrics
from eaglespec.serve.middleware import BearerAuth, BodyLimit, CountRequests
from eaglespec.serve.protocol import (ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                      ChatCompletionRequest, Completion, CompletionChoice, CompletionRequest, Delta,
                                      ModelCard, ModelList, ResponseMessage, SamplingRequest, SpeculativeStats, Usage,
                                      new_id)
from eaglespec.serve.worker import EngineWorker, Failed, Finished, Job, Piece, QueueFull

log = logging.getLogger("eaglespec.serve")

STATIC = resources.files("eaglespec.serve") / "static"
POLL_S = 0.5  # how often a handler waiting on the model looks at its deadline and its client
MAX_STOP_STRINGS = 4  # as OpenAI


@dataclass(frozen=True)
class ServeConfig:
    """How the server admits and limits requests; `eaglespec serve` flags map onto it one to one."""

    model_name: str  # the id clients send as `model` and /v1/models lists
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_queue: int = 64  # requests that may wait while one is generated; past it, 429
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


# -- the two response shapes of a stream -------------------------------------------------------


@dataclass
class ChatChunks:
    """chat.completion.chunk events: an opening role delta, content deltas, the finish."""

    model: str
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[ChatChunkChoice], **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, **extra)

    def opening(self) -> ChatCompletionChunk | None:
        return self._chunk([ChatChunkChoice(delta=Delta(role="assistant", content=""))])

    def piece(self, text: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=Delta(content=text))])

    def finish(self, reason: str, spec: SpeculativeStats) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=Delta(), finish_reason=reason)], speculative=spec)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage=usage)


@dataclass
class CompletionChunks:
    """text_completion events: text pieces, the finish (no opening event)."""

    model: str
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[CompletionChoice], **extra) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, **extra)

    def opening(self) -> Completion | None:
        return None

    def piece(self, text: str) -> Completion:
        return self._chunk([CompletionChoice(text=text)])

    def finish(self, reason: str, spec: SpeculativeStats) -> Completion:
        return self._chunk([CompletionChoice(text="", finish_reason=reason)], speculative=spec)

    def usage(self, usage: Usage) -> Completion:
        return self._chunk([], usage=usage)


# -- what both generation endpoints do ---------------------------------------------------------


class CompletionService:
    """From a parsed request to a running job, and from the job's events to an answer."""

    def __init__(self, engine: Generator, worker: EngineWorker, config: ServeConfig) -> None:
        self.engine = engine
        self.worker = worker
        self.config = config
        self.max_len = engine.target.max_len
        self.tree = engine.drafter.max_tree_size  # cache slots a step needs beyond the text
        # One tokenizing thread: the event loop never runs a chat template, and at most this
        # thread encodes while the model thread decodes.
        self.tokenize = ThreadPoolExecutor(1, thread_name_prefix="eaglespec-tokenize")
        # its first call may set tokenizer options that later calls only read
        self.tokenize.submit(engine.encode, "hello", False).result()

    async def start(self, req: SamplingRequest, prompt: str | list[dict], chat: bool, param: str) -> Job:
        """Check, tokenize and queue a request (400, 404 or 429 as ApiError)."""
        self.check(req)
        ids = await self.encode(prompt, chat, param)  # [prompt_len]
        job = Job(ids, self.generation_config(req, ids.shape[0], param), self.config.request_timeout)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {self.config.max_queue} requests are already waiting; "
                           f"retry in {e.retry_after_s} s", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        return job

    def check(self, req: SamplingRequest) -> None:
        name = self.config.model_name
        if req.model is not None and req.model != name:
            raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{name}'",
                           param="model", code="model_not_found")
        if (bad := req.unsupported()) is not None:
            raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")
        stops = req.stop_strings
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must be non-empty", param="stop")

    async def encode(self, prompt: str | list[dict], chat: bool, param: str):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.tokenize, self.engine.encode, prompt, chat)
        except ValueError as e:  # an empty prompt
            raise ApiError(400, str(e), param=param) from None
        except TemplateError as e:  # a chat template that refuses the turns (say, two system turns)
            raise ApiError(400, f"the chat template refused the messages: {e}", param=param) from None

    def generation_config(self, req: SamplingRequest, prompt_len: int, prompt_param: str) -> GenerationConfig:
        max_len, tree = self.max_len, self.tree
        room = max_len - prompt_len - tree  # new tokens that fit in the KV cache
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; with the draft tree ({tree}) it leaves no room "
                           f"in the context of {max_len} tokens", param=prompt_param, code="context_length_exceeded")
        limit, param = req.token_limit, req.token_limit_param
        if limit is not None and limit <= 0:
            raise ApiError(400, f"{param} must be > 0, got {limit}", param=param)
        if limit is not None and limit > room:
            raise ApiError(400, f"{param}={limit} does not fit: the context is {max_len} tokens, the prompt "
                           f"{prompt_len} and the draft tree {tree}, which leaves {room}",
                           param=param, code="context_length_exceeded")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return GenerationConfig(max_new_tokens=limit or room, temperature=req.temperature, top_p=req.top_p,
                                top_k=max(req.top_k, 0), seed=seed, stop=req.stop_strings, ignore_eos=req.ignore_eos)

    @staticmethod
    async def events(job: Job, request: Request) -> AsyncIterator[Piece | Finished]:
        """The job's events up to Finished; raises the ApiError of a failure or a timeout. Leaving
        early (the client went away, the stream was closed) cancels the job."""
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

    async def collect(self, job: Job, request: Request) -> tuple[str, Finished]:
        parts: list[str] = []
        async for event in self.events(job, request):
            if isinstance(event, Piece):
                parts.append(event.text)
            else:
                return "".join(parts), event
        raise ApiError(499, "the client closed the request")  # nobody reads this answer

    def stream(self, job: Job, request: Request, chunks: ChatChunks | CompletionChunks,
               include_usage: bool) -> StreamingResponse:
        """SSE: one event per text piece, one with finish_reason and stats, usage if asked, then
        [DONE]. A failure after the headers went out becomes an error event."""

        async def body() -> AsyncIterator[bytes]:
            try:
                if (opening := chunks.opening()) is not None:
                    yield sse(opening.model_dump_json())
                async for event in self.events(job, request):
                    if isinstance(event, Piece):
                        yield sse(chunks.piece(event.text).model_dump_json())
                    else:
                        yield sse(chunks.finish(event.reason, event.speculative).model_dump_json())
                        if include_usage:
                            yield sse(chunks.usage(usage(job, event)).model_dump_json())
            except ApiError as e:
                yield sse(json.dumps(e.body()))
            yield sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(data: str) -> bytes:
    return format_sse_event(data_str=data)


def usage(job: Job, done: Finished) -> Usage:
    n = job.ids.shape[0]
    return Usage(prompt_tokens=n, completion_tokens=done.completion_tokens, total_tokens=n + done.completion_tokens)


# -- the app -----------------------------------------------------------------------------------


def create_app(engine: Generator, config: ServeConfig) -> FastAPI:
    """An app serving `engine` as `config.model_name`; its model thread runs while the app does."""
    if engine.tokenizer is None:
        raise ValueError("serving needs a tokenizer")
    metrics = ServerMetrics(config.model_name)
    worker = EngineWorker(engine, metrics, config.max_queue)
    service = CompletionService(engine, worker, config)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.close()
        service.tokenize.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="eaglespec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(BearerAuth, api_key=config.api_key)  # before the body is read
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts 401s and 413s too

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        message, code = {404: (f"no such endpoint: {where}", "not_found"),
                         405: (f"method not allowed: {where}", "method_not_allowed")}.get(
                             exc.status_code, (str(exc.detail), None))
        return ApiError(exc.status_code, message, code=code).response(dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def on_server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "internal server error; see the server log", code="internal_error").response()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        job = await service.start(req, [m.as_template_turn() for m in req.messages], True, "messages")
        chunks = ChatChunks(config.model_name)  # its id names the answer, streamed or not
        if req.stream:
            return service.stream(job, request, chunks, req.include_usage)
        text, done = await service.collect(job, request)
        return ChatCompletion(id=chunks.id, model=config.model_name, usage=usage(job, done),
                              speculative=done.speculative,
                              choices=[ChatChoice(message=ResponseMessage(content=text), finish_reason=done.reason)])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        job = await service.start(req, req.prompt_text, False, "prompt")
        chunks = CompletionChunks(config.model_name)
        if req.stream:
            return service.stream(job, request, chunks, req.include_usage)
        text, done = await service.collect(job, request)
        return Completion(id=chunks.id, model=config.model_name, usage=usage(job, done), speculative=done.speculative,
                          choices=[CompletionChoice(text=text, finish_reason=done.reason)])

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_name, created=started, max_model_len=service.max_len)])

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
    return app
