"""ASGI middleware that answers before a route runs: API key, body size, request counting."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eaglespec.serve.errors import ApiError
from eaglespec.serve.metrics import ServerMetrics

DRAIN_BYTES = 16 << 20  # an oversized body up to this size is read (and dropped) before the 413


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
        await error.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)


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
        await error.response()(scope, receive, send)


KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


class CountRequests:
    """eaglespec:http_requests by handler, method and status (unknown paths pooled as 'other', so
    a scanner cannot grow the label set)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        handler = path if path in KNOWN_PATHS else "/static" if path.startswith("/static/") else "other"
        status = 500  # unless a response starts

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.http_requests.labels(handler, scope["method"], str(status)).inc()
