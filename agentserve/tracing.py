"""Optional OpenTelemetry traces, exported over OTLP/HTTP when the standard
OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variable is set; otherwise nothing is done
and the API's no-op tracer costs nothing. (LangSmith tracing needs no code: its
own LANGSMITH_* variables switch it on, and it sends from a background thread.)"""

from __future__ import annotations

import os
import time

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

tracer = trace.get_tracer("agentserve")


def configure_tracing(service_name: str = "agent") -> TracerProvider | None:
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


class TracingMiddleware:
    """A server span per HTTP request, named by its route, never by its content."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with tracer.start_as_current_span(f"{scope['method']} {scope['path']}", kind=SpanKind.SERVER) as span:
            started = time.perf_counter()

            async def send_recording_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            try:
                await self.app(scope, receive, send_recording_status)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.update_name(f"{scope['method']} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.request.method", scope["method"])
                span.set_attribute("agent.request_id", str(scope.get("state", {}).get("request_id", "")))
                span.set_attribute("agent.duration_ms", round((time.perf_counter() - started) * 1000, 1))
