"""ASGI middleware: a request id on every request, its log line, metrics and span,
and a bound on body size.

Pure ASGI rather than `@app.middleware("http")`: an exception raised there turns
into a 500 whatever its status, and it buffers streaming responses."""

from __future__ import annotations

import json
import logging
import time
import uuid

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentserve.metrics import HTTP_DURATION, HTTP_REQUESTS
from agentserve.tracing import record_span, tracer

access_log = logging.getLogger("agentserve.access")


async def send_json_error(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if 0 < len(supplied) <= 64 and supplied.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class AccessLogMiddleware:
    """Per request: one JSON log line, the request metrics and a tracing span (a
    no-op unless OpenTelemetry is configured). Never message content or keys: the
    thread appears only as a hash of its stored identity."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        span = tracer.start_span(f"{scope['method']} {scope['path']}", kind=SpanKind.SERVER)

        async def send_tracking_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            with trace.use_span(span, end_on_exit=False):
                await self.app(scope, receive, send_tracking_status)
        finally:
            duration = time.perf_counter() - started
            state = scope.get("state", {})
            route = getattr(scope.get("route"), "path", "unmatched")
            # Named and labelled before it ends: an ended span ignores both, and would
            # keep the raw path, which can hold the caller's thread name.
            record_span(span, scope["method"], route, status, str(state.get("request_id", "")))
            span.end()
            HTTP_REQUESTS.labels(route=route, method=scope["method"], status=str(status)).inc()
            HTTP_DURATION.labels(route=route).observe(duration)
            principal = state.get("principal")
            access_log.info(
                "request",
                extra={
                    "request_id": state.get("request_id"),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(duration * 1000, 1),
                    "tenant": getattr(principal, "tenant", None),
                    "thread_hash": state.get("thread_hash"),
                },
            )


class BodySizeLimitMiddleware:
    """Refuses bodies over the MAX_BODY_BYTES setting with 413, by Content-Length when
    given and by counting otherwise, before anything reaches the agent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes: int = scope["app"].state.settings.MAX_BODY_BYTES
        request_id = scope.get("state", {}).get("request_id", "")
        headers = [(b"x-request-id", request_id.encode())] if request_id else []
        too_large = f"request body is larger than {max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await send_json_error(send, 413, too_large, headers)
            return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await send_json_error(send, 413, too_large, headers)


class BodyTooLarge(Exception):
    pass


# What a `worker` process answers over HTTP: it runs background work only.
WORKER_PATHS = frozenset({"/health", "/ready", "/metrics"})


class RoleMiddleware:
    """With ROLE=worker, every route but the probes is a 404."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in WORKER_PATHS:
            settings = getattr(scope["app"].state, "settings", None)
            if settings is not None and settings.ROLE == "worker":
                await send_json_error(send, 404, "this process runs background work only (ROLE=worker)", [])
                return
        await self.app(scope, receive, send)


# What the LangGraph SDKs send from a browser, and what they must read back: the
# run id from Content-Location, the reconnect target from Location.
CORS_HEADERS = ["x-api-key", "authorization", "content-type", "last-event-id", "x-auth-scheme", "x-request-id"]
CORS_EXPOSED = ["Content-Location", "Location", "X-Request-Id", "Retry-After"]


class CorsFromSettings:
    """Starlette's CORS middleware with the origins from the settings, which are read
    when the service starts, after the middleware stack is built. Preflights are
    answered here, before authentication, as browsers send them without a key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cors: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        settings = getattr(app.state, "settings", None) if app is not None else None
        if scope["type"] != "http" or settings is None or not settings.cors_origins:
            await self.app(scope, receive, send)
            return
        if self._cors is None:
            origins = settings.cors_origins
            self._cors = CORSMiddleware(
                self.app,
                allow_origins=origins,
                allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE", "OPTIONS"],
                allow_headers=CORS_HEADERS,
                expose_headers=CORS_EXPOSED,
                max_age=600,
            )
        await self._cors(scope, receive, send)
